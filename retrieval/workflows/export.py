"""A trained tower as an inference graph (ONNX, TorchScript) with its JSON sidecar."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from retrieval.checkpoint import load_checkpoint
from retrieval.errors import UsageError
from retrieval.export import DEFAULT_OPSET, FORMATS, check_export, export_tower

logger = logging.getLogger(__name__)


@dataclass
class Export:
    path: Path  # the ONNX / TorchScript file
    sidecar_path: Path  # its JSON sidecar
    sidecar: dict


def export(checkpoint: str | os.PathLike, format: str, out: str | os.PathLike, *, opset: int | None = None) -> Export:
    """The checkpoint's tower as an inference graph in `out` (see retrieval.export): ONNX (`opset`, default 17) or
    TorchScript, checked against the tower before it is written, with a JSON sidecar beside it."""
    if format not in FORMATS:
        raise UsageError(f"`format` {format!r}: expected one of: {', '.join(FORMATS)}")
    if opset is not None and format != "onnx":
        raise UsageError("`opset` applies to the onnx `format` only")
    ckpt = load_checkpoint(checkpoint, device="cpu")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    check_export(format, ckpt.tower, opset)
    start = time.perf_counter()
    sidecar = export_tower(ckpt, format, out, opset=opset)
    out = Path(out)
    parity = sidecar.get("parity")
    checked = (f"; max |difference| from the tower {parity['max_abs_diff']:.1e} on {parity['images']} check images "
               f"({parity['runtime']})") if parity else ""
    logger.info(f"exported the {sidecar['tower']} tower ({sidecar['embedding_size']}-d, inference options "
                f"deskew={sidecar['inference']['deskew']}, test_shifts={sidecar['inference']['test_shifts']}) as "
                f"{format} to {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f}s{checked}")
    return Export(out, out.with_name(out.name + ".json"), sidecar)
