"""images (uint8, N x 28 x 28) -> embeddings (float32, N x D), in batches under inference mode, in fp32 or under
bf16 autocast (retrieval.precision)."""

from __future__ import annotations

import contextlib
import copy
import os

import numpy as np
import torch
from tqdm import tqdm

from retrieval.errors import UsageError
from retrieval.logs import show_progress
from retrieval.precision import autocast, resolve_precision
from retrieval.towers import Tower


def images_to_input(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [0, 1] on `device`."""
    return images.to(device, non_blocking=True).unsqueeze(1).float().div_(255.0)


@contextlib.contextmanager
def evaluating(module: torch.nn.Module):
    """`module` in eval mode for the block, each submodule's own mode restored after it. Only the submodules in
    training mode are touched: for a module already in eval mode (a served tower) this costs a lone query nothing,
    where module.eval() and .train() would walk every submodule twice."""
    training = [m for m in module.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield module
    finally:
        for m in training:
            m.training = True


@torch.inference_mode()
def embed_images(
    tower: Tower,
    images: torch.Tensor,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "embedding",
    precision: str | None = "auto",
) -> np.ndarray:
    """Embed uint8 images with `tower` (kept in eval mode); returns a float32 numpy array (N, D).
    `precision`: the tower's arithmetic, auto (bf16 where `device` has native bfloat16 units), fp32 or bf16
    (retrieval.precision); the embeddings are fp32 either way."""
    device = torch.device(device) if device is not None else next(tower.parameters()).device
    if precision not in ("fp32", "bf16"):  # auto (resolved ones pass as they are: a warning once, not per call)
        precision = resolve_precision(precision, device)
    out = np.empty((len(images), tower.embedding_size), dtype=np.float32)
    bar = tqdm(total=len(images), desc=desc, unit="img", leave=False) if show_progress(progress) else None
    try:
        with evaluating(tower):
            for start in range(0, len(images), batch_size):
                # channels-last, as the towers' weights are (retrieval.towers.build_tower)
                batch = images_to_input(images[start : start + batch_size], device).contiguous(
                    memory_format=torch.channels_last)
                with autocast(device, precision):
                    emb = tower(batch)
                out[start : start + len(batch)] = emb.float().cpu().numpy()
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return out


def inference_tower(tower: Tower, precision: str) -> Tower:
    """`tower` ready for many small embedding calls at a resolved `precision`: under "bf16", an eval-mode copy whose
    backbone's convolutions and linear layers hold their weights in bfloat16. Autocast casts them to exactly
    that on every forward pass (the same rounding: the same embeddings), which costs a lone query more than its
    arithmetic; here they are cast once. The copy is for embed_images only (under autocast): the gate and
    training keep the fp32 tower. Under "fp32", `tower` itself."""
    if precision != "bf16":
        return tower
    fast = copy.deepcopy(tower).eval()
    for module in fast.backbone.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.to(torch.bfloat16)
    return fast


def default_batch_size(device=None) -> int:
    """Embedding batch size: 256 on CPU (the default tower's activations stay in cache there), 4096 on a GPU
    (throughput keeps growing with the batch); benchmarks/README.md has the measurements."""
    return 4096 if device is not None and torch.device(device).type == "cuda" else 256


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """None / "auto" -> CUDA when available, else CPU; an explicit CUDA device that is missing is an error."""
    if device is None or str(device).strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device).strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError):
        raise UsageError(f"`device` {device!r}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"`device` {device}: CUDA is not available on this machine (use cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"`device` {device}: only cpu and cuda are supported")
    return dev
