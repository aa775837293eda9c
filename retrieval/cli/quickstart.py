"""`retrieval quickstart`: the whole product in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from retrieval.cli import app
from retrieval.cli.common import DataRootOption, log


@app.command("quickstart")
def quickstart(
    out: Path = typer.Option(Path("quickstart"), "--out", help="Folder for the run folders, the index and the report."),
    force: bool = typer.Option(False, "--force", help="Redo every step instead of reusing what --out holds."),
    tiny: bool = typer.Option(False, "--tiny", help="A smoke run: small subsets, one short epoch, few episodes."),
    fewshot: bool = typer.Option(True, "--fewshot/--no-fewshot",
                                 help="Also train configs/mnist-fewshot (without 0,4,5,8) and run few-shot episodes."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu or cuda."),
    root: Optional[Path] = DataRootOption,
) -> None:
    """Fetch MNIST, train mnist-default, index the training set, evaluate the test set against it
    (recall@1/2/4/8, precision@1, MAP@R, with a report), train mnist-fewshot and classify the held-out digits
    0,4,5,8 from 1 and 5 examples, query a few test digits, and print a summary with the paths written.

    Re-running reuses finished steps (and resumes an interrupted training run) unless --force.
    """
    from retrieval.quickstart import run_quickstart
    from retrieval.train import resolve_device

    dev = str(resolve_device(device))
    result = run_quickstart(out, force=force, tiny=tiny, fewshot=fewshot, device=dev, root=root, log=log)
    print("\n".join(result.summary_lines()))
