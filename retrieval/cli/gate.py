"""`retrieval gate train`: a digit-or-not gate for a trained tower (retrieval.gate), so `unknown` can say "not a digit"."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from retrieval.cli import app
from retrieval.cli.common import DataRootOption, DeviceOption, print_json

gate_app = typer.Typer(help="The digit-or-not gate in front of the lookup (retrieval.gate).", no_args_is_help=True)
app.add_typer(gate_app, name="gate")


@gate_app.command("train")
def train(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A training run folder or a .safetensors file."),
    out: Path = typer.Option(..., "--out", help="The new run folder: the same tower with the gate (best.safetensors)."),
    form: str = typer.Option("cnn", "--form", help="cnn (a separate small CNN), trunk (a head on the tower's "
                             "convolution map) or embedding (a head on the embedding)."),
    steps: int = typer.Option(1500, "--steps", min=1, help="Training steps (256 pictures each)."),
    degrade_p: float = typer.Option(0.3, "--degrade-p", help="Each degradation on this share of the pictures."),
    accept: float = typer.Option(0.99, "--accept", help="The gate's own threshold answers this share of the "
                                 "validation digits (`calibrate` sets an index's)."),
    digits: int = typer.Option(20000, "--digits", min=1, help="Digits of the tower's training slice to train on."),
    non_digits: int = typer.Option(6000, "--non-digits", min=1, help="Pictures of each non-digit training source."),
    digit_classes: bool = typer.Option(
        False, "--digit-classes", help="An output per digit class and one for 'no digit' (trained on the digits' "
        "labels) instead of one digit-or-not output: refuses more letters and silhouettes, answers fewer "
        "zigzagged, rotated and scaled digits (benchmarks/README.md)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the pictures, the weights and the batches."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a folder that already holds files."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: all "
                                          "cores; on a busy machine one is fastest).", show_default=False),
    root: Optional[Path] = DataRootOption,
    device: str = DeviceOption,
    json_out: bool = typer.Option(False, "--json", help="Print the new checkpoint sidecar as JSON."),
) -> None:
    """Train a digit-or-not gate for the tower: its training digits (through the robust recipe's augmentation,
    some drawn as the web canvas and a phone photo would) against pictures that are no digit, drawn from Hershey's
    stroke fonts, KanjiVG, Debian handwriting fonts and synthetic marks (retrieval.data.nondigits; the fonts come
    with `apt-get install`, see .ci/run). The tower's weights are not changed; build indexes from --out.

    Example: retrieval gate train --checkpoint runs/mnist-robust --out runs/mnist-robust-gate
    """
    from retrieval.gate import GateRecipe
    from retrieval.workflows import train_digit_gate

    if threads:
        import torch

        torch.set_num_threads(threads)
    recipe = GateRecipe(form=form, steps=int(steps), degrade_p=float(degrade_p), seed=int(seed), accept=float(accept),
                        classes=10 if digit_classes else 0)
    sidecar = train_digit_gate(checkpoint, out, recipe=recipe, digits=digits, non_digits=non_digits, root=root,
                               device=device, overwrite=overwrite)
    if json_out:
        print_json(sidecar)
    else:
        g = sidecar["gate"]
        print(f"gate        {g['form']}, threshold {g['threshold']:.4f} ({g['threshold_rule']}), "
              f"trained in {g['seconds']:.0f}s")
        from retrieval.run_folder import BEST, RunFolder

        print(RunFolder(out).weights(BEST))
