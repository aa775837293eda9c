"""A trained tower as a standalone inference graph: ONNX (onnxruntime, TensorRT, browsers...) or TorchScript (libtorch).

The graph takes float32 images N x 1 x 28 x 28 in the preprocessing's scaling (pixel / 255: background 0, ink 1,
as MNIST) with a dynamic batch size, and returns N x D float32 embeddings of unit L2 norm (and, for a tower with
a digit-or-not gate (retrieval.gate), N digit probabilities as a second output, `digit_scores`): exactly what the
tower computes at inference, its inference options included (deskew: the slant taken out of each image; test_shifts:
the mean over shifted copies). An option the format cannot express is refused with a message naming it (deskew
needs GridSample, ONNX opset 16 or later).

Beside FILE, a JSON sidecar (FILE.json: tower.onnx.json) names the input and output, their scaling, the
preprocessing pictures need first, the embedding size, the tower's fingerprint and the largest difference
measured between the exported graph and the tower on a check batch. The ONNX file carries the same facts in its
metadata_props, the TorchScript file as the extra file `retrieval.json`.

    from retrieval.checkpoint import load_checkpoint
    sidecar = export_tower(load_checkpoint("runs/mnist-default"), "onnx", "tower.onnx")
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from retrieval.errors import RetrievalError, UsageError
from retrieval.fsutil import atomic_path, atomic_write_json, sha256_file
from retrieval.towers import PIXEL_MEAN, PIXEL_STD

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
FORMAT = "retrieval-export/1"
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
GATE_OUTPUT_NAME = "digit_scores"  # a gated tower's second output (retrieval.gate): digit probability per image
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 13, 20  # what the TorchScript-based ONNX exporter emits for these towers
GRID_SAMPLE_OPSET = 16  # deskew resamples the image (GridSample), an operator of ONNX opset 16 and later
PARITY_TOLERANCE = 1e-4  # the exported graph must agree with the tower this closely on the check batch
INPUT_SCALING = (f"float32 N x 1 x 28 x 28, pixel / 255: background 0.0, ink 1.0 (a light digit on a dark background, "
                 f"as MNIST); the graph itself subtracts the MNIST mean {PIXEL_MEAN} and divides by the std {PIXEL_STD}")


def sidecar_name(out: str | os.PathLike) -> Path:
    """FILE -> FILE.json (tower.onnx -> tower.onnx.json), so the two formats of one tower never share a sidecar."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def check_export(fmt: str, tower, opset: int = DEFAULT_OPSET) -> None:
    """Refuse a format the tower cannot be exported to, naming the option that blocks it."""
    if fmt not in FORMATS:
        raise UsageError(f"`format` {fmt!r}: expected one of: {', '.join(FORMATS)}")
    if fmt != "onnx":
        return
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise UsageError(f"`opset` {opset}: expected an ONNX opset from {MIN_OPSET} to {MAX_OPSET}")
    if tower.deskew and opset < GRID_SAMPLE_OPSET:
        raise UsageError(
            f"cannot export this tower to ONNX opset {opset}: its inference option deskew (tower.deskew) resamples "
            f"each image with GridSample, which ONNX has from opset {GRID_SAMPLE_OPSET}; use `opset` "
            f"{GRID_SAMPLE_OPSET} or later, or the torchscript `format`"
        )


def check_images(n: int = 16, seed: int = 0) -> torch.Tensor:
    """A deterministic batch to compare the exported graph with the tower: sparse random ink on a dark background
    (slanted strokes for deskew to act on), plus one blank image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    x = torch.where(torch.rand(n, 1, 28, 28, generator=g) < 0.25, x, torch.zeros(()))
    ys = torch.arange(28).view(28, 1)
    for i in range(n - 1):  # a thick slanted stroke through the middle
        slope = (i % 5 - 2) * 0.3
        xs = (14 + slope * (ys - 14)).round().long().clamp(1, 26)
        for dx in (-1, 0, 1):
            x[i, 0, ys.squeeze(1)[4:24], (xs.squeeze(1) + dx)[4:24]] = 1.0
    x[-1] = 0.0
    return x


class _GatedGraph(torch.nn.Module):
    """A tower with a digit-or-not gate as one graph: (embeddings, digit probabilities)."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, x):
        embeddings = self.tower(x)
        return embeddings, torch.sigmoid(self.tower.gate(x, embeddings))


def _graph(tower) -> tuple[torch.nn.Module, list[str]]:
    """The module to export and its output names: the tower, or the tower and its gate."""
    if tower._modules.get("gate") is None:
        return tower, [OUTPUT_NAME]
    return _GatedGraph(tower).eval(), [OUTPUT_NAME, GATE_OUTPUT_NAME]


def _inference_options(tower) -> str:
    options = [name for name, on in (("deskew", tower.deskew), (f"test_shifts={tower.test_shifts}", tower.test_shifts))
               if on]
    return ", ".join(options) if options else "none"


def _export_onnx(tower, path: Path, opset: int, metadata: dict) -> None:
    try:
        import onnx
    except ImportError:
        raise RetrievalError("ONNX export needs the onnx package: pip install 'retrieval[export]' (or onnx)") from None
    example = check_images(4)
    buffer = io.BytesIO()
    graph, outputs = _graph(tower)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and folding notes
            torch.onnx.export(
                graph, (example,), buffer, input_names=[INPUT_NAME], output_names=outputs,
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
                opset_version=int(opset),
                do_constant_folding=True, dynamo=False,
            )
    except Exception as e:  # the exporter raises many types; say what was being exported
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RetrievalError(f"ONNX export (opset {opset}) of the {tower.arch} tower with inference options "
                             f"{_inference_options(tower)} failed: {first}") from None
    model = onnx.load_from_string(buffer.getvalue())
    model.doc_string = f"retrieval tower {metadata['tower']} -> {metadata['embedding_size']}-d unit embeddings"
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"retrieval.{key}", value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def _export_torchscript(tower, path: Path, metadata: dict) -> None:
    example = check_images(4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notice
            traced = torch.jit.trace(_graph(tower)[0], (example,), check_trace=False)
            traced = torch.jit.freeze(traced)
            torch.jit.save(traced, str(path), _extra_files={"retrieval.json": json.dumps(metadata, indent=2)})
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RetrievalError(f"TorchScript export of the {tower.arch} tower with inference options "
                             f"{_inference_options(tower)} failed: {first}") from None


def run_exported(path: str | os.PathLike, fmt: str, images: np.ndarray, all_outputs: bool = False):
    """Embed float32 (N, 1, 28, 28) images with an exported file (onnxruntime or torch.jit); `all_outputs`: every
    output as a list (a gated tower's digit scores second)."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out = session.run(None, {INPUT_NAME: images})
        return out if all_outputs else out[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            out = module(torch.from_numpy(images))
    out = [t.numpy() for t in out] if isinstance(out, (tuple, list)) else [out.numpy()]
    return out if all_outputs else out[0]


def _parity(tower, path: Path, fmt: str) -> dict | None:
    """Largest |exported - tower| over the check batch, run as two batches of different sizes (dynamic batch)."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            logger.info("onnxruntime is not installed: the exported graph was not run against the tower "
                        "(pip install 'retrieval[export]')")
            return None
        runtime = f"onnxruntime {onnxruntime.__version__}"
    else:
        runtime = f"torch.jit {torch.__version__}"
    x = check_images()
    graph, names = _graph(tower)
    with torch.inference_mode():
        want = graph(x)
    want = [t.float().numpy() for t in want] if isinstance(want, tuple) else [want.float().numpy()]
    parts = [run_exported(path, fmt, x[:1].numpy(), all_outputs=True),
             run_exported(path, fmt, x[1:].numpy(), all_outputs=True)]
    if len(parts[0]) != len(want):
        raise RetrievalError(f"the exported graph has {len(parts[0])} output(s), the tower {len(want)}")
    diffs = {}
    for i, name in enumerate(names):
        got = np.concatenate([parts[0][i], parts[1][i]])
        if got.shape != want[i].shape:
            raise RetrievalError(f"the exported graph returns {name} of shape {got.shape} for {tuple(x.shape)} "
                                 f"images, the tower {want[i].shape}")
        diffs[name] = float(np.abs(got - want[i]).max())
    diff = max(diffs.values())
    if not diff <= PARITY_TOLERANCE:
        raise RetrievalError(f"the exported graph differs from the tower by up to {diff:.2e} on the check batch "
                             f"(tolerance {PARITY_TOLERANCE:g}); nothing was written")
    return {"max_abs_diff": diff, **({"max_abs_diff_per_output": diffs} if len(diffs) > 1 else {}),
            "images": len(x), "batches": [1, len(x) - 1], "runtime": runtime}


def export_tower(ckpt, fmt: str, out: str | os.PathLike, *, opset: int = DEFAULT_OPSET) -> dict:
    """Write the Checkpoint's tower to `out` as an ONNX or TorchScript inference graph (checked against the tower on
    a batch of images before it is renamed into place), then its JSON sidecar; returns the sidecar."""
    import retrieval
    from retrieval.data.preprocess import PREPROCESSING

    out = Path(out)
    tower = ckpt.tower
    check_export(fmt, tower, opset)
    if out.suffix == ".json":
        raise UsageError(f"`out` {out}: the .json name is the sidecar's; name the {fmt} file e.g. tower."
                         f"{'onnx' if fmt == 'onnx' else 'pt'}")
    if out.is_dir():
        raise UsageError(f"`out` {out} is a folder; give a file name")
    sidecar_path = sidecar_name(out)
    was_training, device = tower.training, next(tower.parameters()).device
    tower.to("cpu").eval()
    metadata = {
        "format": FORMAT,
        "tower": str(ckpt.meta.get("tower", tower.arch)),
        "embedding_size": int(tower.embedding_size),
        "fingerprint": ckpt.fingerprint,
        "inference": {"deskew": bool(tower.deskew), "test_shifts": int(tower.test_shifts)},
        "input": {"name": INPUT_NAME, "shape": ["N", 1, 28, 28], "dtype": "float32", "scaling": INPUT_SCALING},
        "output": {"name": OUTPUT_NAME, "shape": ["N", int(tower.embedding_size)], "dtype": "float32",
                   "normalised": "unit L2 norm: compare with inner product or Euclidean distance (0 to 2)"},
        "preprocessing": {"pictures": PREPROCESSING, "training_images": ckpt.meta.get("preprocessing")},
    }
    gate = tower._modules.get("gate")
    if gate is not None:
        metadata["gate_output"] = {
            "name": GATE_OUTPUT_NAME, "shape": ["N"], "dtype": "float32",
            "meaning": f"probability that the image is a digit; below {gate.threshold:.6g} (the gate's threshold; "
                       "an index's calibrated one may differ) it is not a digit", "form": gate.form}
    try:
        with atomic_path(out) as tmp:
            if fmt == "onnx":
                _export_onnx(tower, tmp, opset, metadata)
            else:
                _export_torchscript(tower, tmp, metadata)
            parity = _parity(tower, tmp, fmt)
    finally:
        tower.to(device).train(was_training)
    sidecar = {
        **metadata,
        "export_format": fmt,
        "file": out.name,
        "file_sha256": sha256_file(out),
        **({"opset": int(opset)} if fmt == "onnx" else {}),
        "parity": parity,
        "checkpoint": str(Path(ckpt.path).resolve()),
        "config": ckpt.meta.get("config"),
        "classes_seen": ckpt.meta.get("classes_seen"),
        "has_pair_head": bool(ckpt.meta.get("has_pair_head")),
        "torch_version": torch.__version__,
        "tool_version": retrieval.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    atomic_write_json(sidecar_path, sidecar)
    return sidecar
