"""`retrieval export`: a trained tower as an ONNX or TorchScript inference graph, for use outside PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from retrieval.cli import app
from retrieval.cli.common import print_json


@app.command("export")
def export(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="A training run folder (its best, else last checkpoint) or a .safetensors file."
    ),
    format: str = typer.Option(..., "--format", help="onnx (onnxruntime, TensorRT, ...) or torchscript (libtorch)."),
    out: Path = typer.Option(
        ..., "--out", help="The file to write (e.g. tower.onnx, tower.pt); its JSON sidecar goes beside it "
                           "(tower.onnx.json).",
    ),
    opset: Optional[int] = typer.Option(
        None, "--opset", help="ONNX opset (default 17; 13-20; a deskewing tower needs 16 or later).",
        show_default=False,
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the sidecar as JSON instead of the file name."),
) -> None:
    """Write the tower as an inference graph: input float32 N x 1 x 28 x 28 scaled like the preprocessing (pixel
    / 255, ink 1 on background 0), dynamic batch; output N x D unit-norm embeddings, the tower's inference options
    (deskew, shift averaging) included.

    The graph is run against the tower on a check batch before it is written (ONNX: when onnxruntime is
    installed); the JSON sidecar names the input scaling, preprocessing, embedding size, fingerprint and the
    largest difference measured.

    Example: retrieval export --checkpoint runs/mnist-default --format onnx --out mnist-default.onnx
    """
    from retrieval.workflows import export as run

    result = run(checkpoint, format, out, opset=opset)
    if json_out:
        print_json(result.sidecar)
    else:
        print(result.path)
