"""`retrieval fewshot`: N-way K-shot episodes over a dataset's images, embedded once by a tower (or raw pixels)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from retrieval.cli import app
from retrieval.cli.common import ClassesOption, DataRootOption, DeviceOption, PrecisionOption, SpecHelp, print_json
from retrieval.errors import UsageError


def parse_int_list(text: str, option: str) -> list[int]:
    """"1,5" -> [1, 5]; a clear UsageError for anything else."""
    items = [t.strip() for t in text.split(",")]
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise UsageError(f"{option} expects comma-separated integers like 1,5; got {text!r}") from None
    if not values:
        raise UsageError(f"{option} expects at least one integer")
    if len(set(values)) != len(values):
        raise UsageError(f"{option} lists a value twice: {text!r}")
    return values


@app.command("fewshot")
def fewshot(
    checkpoint: str = typer.Option(
        ..., "--checkpoint",
        help="Run folder (best, else last checkpoint), checkpoint file, or the word 'pixels' for the raw-pixel "
             "baseline (pixels normalised like a tower's input, then L2-normalised). Write ./pixels for a run "
             "folder named pixels.",
    ),
    data: str = typer.Option(..., "--data", help=SpecHelp),
    classes: Optional[str] = ClassesOption,
    ways: int = typer.Option(5, "--ways", help="Classes per episode (N)."),
    shots: str = typer.Option("1,5", "--shots", help="Support images per class (K); several as 1,5."),
    queries: int = typer.Option(15, "--queries", help="Query images per class and episode."),
    episodes: int = typer.Option(1000, "--episodes", help="Episodes per shot count."),
    method: str = typer.Option(
        "prototype", "--method",
        help="prototype: nearest class mean (re-normalised); knn: vote of the --k most similar support images.",
    ),
    k: Optional[int] = typer.Option(
        None, "--k", help="Neighbours for --method knn (default 1; ties go to the larger summed similarity). "
                          "Refused with --method prototype, which has no neighbours to count.", show_default=False,
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the episode sampler; the same seed draws the same episodes "
                                               "for every checkpoint, so results compare pairwise."),
    json_out: bool = typer.Option(False, "--json", help='Print {"ways","shots","episodes","accuracy","ci95"} '
                                                        "(a list of them for several shot counts)."),
    root: Optional[Path] = DataRootOption,
    batch_size: int = typer.Option(1024, "--batch-size", help="Images per embedding batch."),
    device: str = DeviceOption,
    precision: str = PrecisionOption,
) -> None:
    """Few-shot classification by the standard episodic protocol.

    Each episode draws --ways classes (among --classes, default all of the data), then --shots support and
    --queries query images per class, all distinct. Queries are classified against that episode's support set
    only: by the nearest class prototype (mean support embedding, re-normalised) or by k-NN over the support
    images, with cosine similarity. Reported per shot count: mean accuracy over episodes and its 95% confidence
    interval, 1.96 * std / sqrt(episodes). Example, digits the fewshot tower never saw:

      retrieval fewshot --checkpoint runs/mnist-fewshot --data mnist:test --classes 0,4,5,8 --ways 4 --shots 1,5
    """
    from retrieval.workflows import Compute, Selection, fewshot as run

    shot_counts = parse_int_list(shots, "--shots")
    if k is not None and method != "knn":
        raise UsageError(f"--k applies to --method knn only; --method {method} classifies by the nearest class mean")
    outcome = run(checkpoint, Selection(data, root, classes), ways=ways, shots=shot_counts, queries=queries,
                  episodes=episodes, method=method, k=1 if k is None else k, seed=seed,
                  compute=Compute(device, batch_size, precision))
    results, ds, what = outcome.results, outcome.dataset, outcome.embeddings_of
    if json_out:
        rows = [{"ways": r.ways, "shots": r.shots, "episodes": r.episodes, "accuracy": r.accuracy, "ci95": r.ci95}
                for r in results]
        print_json(rows[0] if len(rows) == 1 else rows)
        return
    counts = ds.class_counts()
    print(f"embeddings  {what}")
    print(f"data        {data}: {len(ds):,} images of {len(counts)} classes ({', '.join(counts)})")
    extra = f", k={k}" if method == "knn" else ""
    print(f"protocol    {ways}-way, {queries} queries per class, {episodes} episodes, {method}{extra}, seed {seed}")
    print(f"{'shots':>5}  {'accuracy':>8}  {'95% CI':>8}")
    for r in results:
        print(f"{r.shots:>5}  {r.accuracy:8.4f}  {'±' + format(r.ci95, '.4f'):>8}")
