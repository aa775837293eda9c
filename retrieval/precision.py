"""Arithmetic precision of the tower's forward pass: "fp32", or "bf16" (bfloat16 autocast) where the hardware
multiplies in bfloat16 natively, about twice the fp32 rate (benchmarks/README.md).

Under "bf16" only the tower's convolutions and matrix products run in bfloat16 (torch.autocast); the tower's input
scaling and its L2 normalisation, the losses, miners, distances, the optimizer and its state stay in fp32, and
embeddings leave the tower (and are stored and searched) as fp32.

Every precision setting (configs' train.precision, the workflows, embed_images, Trainer, the CLI's --precision)
defaults to "auto": $RETRIEVAL_PRECISION when set, else bf16 on a CUDA device or a CPU with native bfloat16 units
(torch's own capability checks: AVX-512 BF16 or AMX on x86, the BF16 extension on Arm), fp32 elsewhere: never bf16
on a CPU that would emulate it (oneDNN does, on any AVX-512 CPU, at a fraction of the fp32 speed). Embedding for an
index (queries, additions) follows the precision the index records instead (matching_precision).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform

import torch

from retrieval.errors import UsageError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
ENV_VAR = "RETRIEVAL_PRECISION"  # what "auto" means when set (fp32 or bf16)


def check_precision(precision: str | None, name: str = "precision") -> str:
    """A precision setting, normalised ("auto" for None); a one-line UsageError naming `name` otherwise."""
    value = "auto" if precision is None else str(precision).strip().lower()
    if value not in PRECISIONS:
        raise UsageError(f"`{name}` {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return value


def _torch_says(check: str) -> bool:
    """One of torch's CPU capability checks (False when this torch build lacks it)."""
    fn = getattr(torch.cpu, check, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:  # pragma: no cover - a build without the check's backend
        return False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware, as torch reports it. oneDNN's own answer
    (torch.ops.mkldnn._is_mkldnn_bf16_supported) is true on every AVX-512 x86 CPU, emulated or not, so on x86 the
    answer is the instruction sets: AVX-512 BF16 or AMX tiles; on Arm oneDNN's answer is the BF16 extension."""
    if not torch.backends.mkldnn.is_available():
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
        return _torch_says("_is_avx512_bf16_supported") or _torch_says("_is_amx_tile_supported")
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - a build without oneDNN's op
        return False


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` runs bfloat16 matrix products natively (CUDA: compute capability 8.0 and up)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision(precision: str | None, device: torch.device | str, prefer: str | None = None) -> str:
    """A setting ("auto", "fp32", "bf16"; None: auto) -> "fp32" or "bf16" for `device`.

    auto: $RETRIEVAL_PRECISION when set; else `prefer` (e.g. the precision an index was embedded in) when the
    device runs it natively; else bf16 where the device has native bfloat16 units, fp32 elsewhere. An explicit bf16
    on a device that would emulate it is honoured, with a warning (it is slower than fp32 there)."""
    value = check_precision(precision)
    device = torch.device(device)
    if value == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            value = check_precision(env, f"${ENV_VAR}")
    if value == "auto":
        native = native_bf16(device)
        if prefer in ("fp32", "bf16"):
            return prefer if prefer == "fp32" or native else "fp32"
        return "bf16" if native else "fp32"
    if value == "bf16" and not native_bf16(device):
        logger.warning(f"precision bf16 on {device.type}: this {device.type.upper()} has no native bfloat16 units; "
                       "it is emulated (slower than fp32)")
    return value


def autocast(device: torch.device | str, precision: str):
    """The context the tower's forward pass runs in: bf16 autocast on `device` for "bf16", nothing for "fp32"."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision must be resolved to fp32 or bf16, got {precision!r}")
    return contextlib.nullcontext()


def matching_precision(precision: str | None, device: torch.device | str, recorded: str | None, what: str) -> str:
    """The precision to embed more images for embeddings made in `recorded` (an index's meta "precision"; None:
    not recorded): auto follows `recorded` where the device runs it natively (resolve_precision's `prefer`); an
    explicit other precision is honoured with a warning naming `what` (bf16 and fp32 embeddings of one image differ
    by about 1e-3 in each coordinate, so neighbours at nearly equal distances may swap; benchmarks/README.md)."""
    value = check_precision(precision)
    resolved = resolve_precision(value, device, prefer=recorded)
    if value != "auto" and recorded in ("fp32", "bf16") and resolved != recorded:
        logger.warning(f"{what} embedded in {resolved}, the index's embeddings in {recorded}: distances may differ "
                       f"slightly from the index's own (precision auto follows the index)")
    return resolved
