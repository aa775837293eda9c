"""`retrieval train`: train a Siamese tower from a config file."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from retrieval.cli import app
from retrieval.cli.common import DataRootOption, DeviceOption, log, print_json


@app.command("train")
def train_command(
    config: Optional[Path] = typer.Option(
        None, "--config", "-c",
        help="Config file (TOML; YAML with PyYAML), or the name of a shipped config: mnist-default, mnist-triplet, "
             "mnist-contrastive, mnist-seed-pair, mnist-fewshot, mnist-robust.",
        show_default=False,
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Run folder (default: runs/<config name>/).", show_default=False,
    ),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Override train.epochs.", show_default=False),
    device: str = DeviceOption,
    precision: Optional[str] = typer.Option(
        None, "--precision", metavar="auto|fp32|bf16",
        help="Override train.precision (default: the config's, auto): the tower's arithmetic in training and "
             "validation; auto is bf16 where the device has native bfloat16 units, else fp32. A --resume in "
             "another precision than the run's warns: the weights then differ from an uninterrupted run.",
        show_default=False,
    ),
    overrides: Optional[List[str]] = typer.Option(
        None, "--set", help="Override a config key, typed like its default; repeatable: --set optimizer.lr=0.01",
        show_default=False, metavar="KEY=VALUE",
    ),
    subset: Optional[int] = typer.Option(
        None, "--subset", help="Train on a seeded subset of this many images (sets data.subset), for small runs.",
        show_default=False,
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the interrupted run in the run folder exactly where it stopped.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in a run folder that holds a run."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="CPU threads (default: all cores available to this process). A --resume under another count than the run was trained with warns: the weights then differ in the last bits from an uninterrupted run.", show_default=False,
    ),
    root: Optional[Path] = DataRootOption,
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar (epoch lines are still logged)."),
    dist_timeout: Optional[float] = typer.Option(
        None, "--dist-timeout", min=0.001, metavar="SECONDS",
        help="Under torchrun: how long a process waits for the others (joining, any collective) before the job "
             "fails with a message, instead of hanging (default 300).", show_default=False,
    ),
    json_out: bool = typer.Option(
        False, "--json",
        help='Print the final summary as JSON instead of the run folder: {"run", "best": {"epoch", '
             '"val_precision_at_1", "val_map_at_r", "checkpoint", ...}, "last", "validation": [per epoch], '
             '"times", "files"}.',
    ),
) -> None:
    """Train a tower with the config's objective; write checkpoints `best` and `last`, metrics.jsonl and the
    resolved config to the run folder, then print the folder.

    Ctrl-C saves `last` and the training state (exit code 130); `--resume` then continues bit for bit.

    Several processes or machines: torchrun --standalone --nproc-per-node N -m retrieval train ... (train.batch_size
    is the global batch, shared out; rank 0 writes the run folder and prints; README "Scaling out").
    """
    import time

    from retrieval.distributed import is_follower
    from retrieval.errors import UsageError
    from retrieval.logs import setup_cli_logging
    from retrieval.training import TrainingInterrupted
    from retrieval.workflows import train

    follower = is_follower()  # a process of a torchrun launch other than rank 0: warnings and errors only
    if follower:
        setup_cli_logging(-1)

    if config is None and not (resume and out is not None):
        raise UsageError("--config is required (only --resume --out RUN can reuse the run's own config)")
    sets = _config_overrides(overrides, epochs, subset, precision)
    start = time.perf_counter()
    try:
        run = train(config, out, device=device, resume=resume, overrides=sets, data_root=root,
                    overwrite=overwrite, progress=not no_progress, threads=threads, dist_timeout=dist_timeout)
    except TrainingInterrupted as e:
        _log_interrupted(e)
        raise typer.Exit(130)
    seconds = time.perf_counter() - start
    if not follower:
        _report(run, seconds, json_out)


def _config_overrides(overrides: Optional[List[str]], epochs: Optional[int], subset: Optional[int],
                      precision: Optional[str]) -> list[str]:
    """The --set overrides, then those of the options that override one config key."""
    sets = list(overrides or [])
    if epochs is not None:
        sets.append(f"train.epochs={epochs}")
    if subset is not None:
        sets.append(f"data.subset={subset}")
    if precision is not None:
        from retrieval.precision import check_precision

        sets.append(f"train.precision={check_precision(precision)}")
    return sets


def _log_interrupted(e) -> None:
    """What Ctrl-C left behind, and the command that continues the run."""
    from retrieval.distributed import launched_world_size

    log(f"interrupted: {e.message}")
    if e.saved:
        if launched_world_size() > 1:
            log(f"continue with: torchrun ... -m retrieval train --resume --out {e.run_dir} (the same launch "
                "options, or another number of processes)")
        else:
            log(f"continue with: retrieval train --resume --out {e.run_dir}")


def _report(run: Path, seconds: float, json_out: bool) -> None:
    """Log the best epoch; print the run folder, or its summary as JSON."""
    from retrieval.run_folder import BEST, RunFolder

    folder = RunFolder(run)
    best = [r for r in folder.history() if r.get("best")]
    if best:
        b = best[-1]
        log(f"best epoch {b['epoch']}: val precision@1 {b['val_precision_at_1']:.4f}, MAP@R {b['val_map_at_r']:.4f} "
            f"-> {folder.weights(BEST)}")
    if json_out:
        print_json(folder.summary(seconds=round(seconds, 3)))
    else:
        print(run)
