"""The training split's validation slice: which images a trainer holds out, and the one a checkpoint's trainer held
out (so that a gate, a benchmark or a selection figure reads exactly what the tower never trained on)."""

from __future__ import annotations

import torch

from retrieval.seeding import make_generator

DEFAULT_VAL_SIZE = 5000  # images carved from the training split for per-epoch validation (DataConfig.val_size)


def split_validation(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train positions, validation positions) of a training split."""
    perm = torch.randperm(len(labels), generator=make_generator(seed, "validation"))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def run_split(meta: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(train positions, validation positions) of mnist:train as the trainer of a checkpoint (its sidecar `meta`)
    split it; sidecars from before the split was recorded: the default split."""
    data = meta.get("data") or {}
    return split_validation(labels, int(data.get("val_images") or DEFAULT_VAL_SIZE), int(data.get("val_seed", 0)))
