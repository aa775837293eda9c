"""`retrieval quickstart`: the whole product in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from retrieval.cli import app
from retrieval.cli.common import DataRootOption, DeviceOption, PrecisionOption, print_json


@app.command("quickstart")
def quickstart(
    out: Path = typer.Option(Path("quickstart"), "--out", help="Folder for the run folders, the index and the report."),
    force: bool = typer.Option(False, "--force", help="Redo every step instead of reusing what --out holds."),
    tiny: bool = typer.Option(False, "--tiny", help="A smoke run: small subsets, one short epoch, few episodes."),
    fewshot: bool = typer.Option(True, "--fewshot/--no-fewshot",
                                 help="Also train the mnist-fewshot config (without 0,4,5,8) and run few-shot episodes."),
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    root: Optional[Path] = DataRootOption,
    json_out: bool = typer.Option(
        False, "--json",
        help='Print the summary as JSON: {"out", "run", "fewshot_run", "index", "report", "metrics", "fewshot", '
             '"queries", "seconds"}.',
    ),
) -> None:
    """Fetch MNIST, train mnist-default, index the training set, evaluate the test set against it
    (recall@1/2/4/8, precision@1, MAP@R, with a report), train mnist-fewshot and classify the held-out digits
    0,4,5,8 from 1 and 5 examples, query a few test digits, and print a summary with the paths written.

    Re-running reuses finished steps (and resumes an interrupted training run) unless --force.
    """
    from retrieval.workflows import quickstart as run

    result = run(out, force=force, tiny=tiny, fewshot_step=fewshot, device=device, root=root, precision=precision)
    if json_out:
        print_json(result.to_json())
    else:
        print("\n".join(result.summary_lines()))
