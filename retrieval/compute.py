"""Where and how towers run: the device, the embedding batch size and the arithmetic precision."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from retrieval.embed import default_batch_size, embed_images, resolve_device
from retrieval.errors import UsageError
from retrieval.precision import check_precision, matching_precision

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Compute:
    """`device`: auto (CUDA when available), cpu, cuda or cuda:N; `batch_size`: images per embedding batch (None:
    the device's default, retrieval.embed.default_batch_size); `precision`: auto, fp32 or bf16
    (retrieval.precision). Built once by the caller and passed down; `pinned()` resolves the device and
    precision before use."""

    device: str | torch.device = "auto"
    batch_size: int | None = None
    precision: str | None = "auto"

    def __post_init__(self):
        if self.batch_size is not None and self.batch_size <= 0:
            raise UsageError(f"`batch_size` must be positive, got {self.batch_size}")
        object.__setattr__(self, "precision", check_precision(self.precision))

    @classmethod
    def of(cls, compute: "Compute | None") -> "Compute":
        return Compute() if compute is None else compute

    def on_device(self) -> "Compute":
        """The same settings with the device resolved (auto -> cuda or cpu; a missing CUDA device is an error)."""
        return replace(self, device=resolve_device(self.device))

    def pinned(self, recorded: str | None = None, what: str = "images") -> "Compute":
        """The same settings with the device resolved (auto -> cuda or cpu; a missing CUDA device is an error) and
        the precision resolved to fp32 or bf16 for it: auto is bf16 where the device has native bfloat16 units;
        beside vectors embedded in `recorded` (an index's), auto follows them where the device runs that natively
        and another precision warns, naming `what` (retrieval.precision.matching_precision)."""
        device = resolve_device(self.device)
        return replace(self, device=device, precision=matching_precision(self.precision, device, recorded, what))

    @property
    def batch(self) -> int:
        """The embedding batch size in force."""
        return default_batch_size(self.device) if self.batch_size is None else self.batch_size

    def embed(self, tower, images: torch.Tensor, desc: str = "embedding", log: bool = False) -> np.ndarray:
        """Embed uint8 images with a progress bar (on a pinned Compute); `log`: then a one-line images/s summary."""
        start = time.perf_counter()
        out = embed_images(tower, images, batch_size=self.batch, device=self.device, progress=True, desc=desc,
                           precision=self.precision)
        if log:
            seconds = time.perf_counter() - start
            logger.info(f"embedded {len(images):,} images in {seconds:.1f}s "
                        f"({len(images) / max(seconds, 1e-9):,.0f} images/s, {self.precision})")
        return out
