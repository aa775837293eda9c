"""Optimizers and learning-rate schedules by name: the choices of config keys optimizer.name and optimizer.schedule.

A schedule builder takes (optimizer, peak lr, warm-up fraction, total steps); the scheduler it returns is stepped
once per optimizer step.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW}


def one_cycle(optimizer: torch.optim.Optimizer, lr: float, warmup: float, total: int) -> LRScheduler:
    return OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=warmup)


def cosine(optimizer: torch.optim.Optimizer, lr: float, warmup: float, total: int) -> LRScheduler:
    """Linear warm-up, then cosine to zero."""
    warm = max(1, round(warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return LambdaLR(optimizer, factor)


def constant(optimizer: torch.optim.Optimizer, lr: float, warmup: float, total: int) -> LRScheduler:
    return LambdaLR(optimizer, lambda step: 1.0)


SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, float, float, int], LRScheduler]] = {
    "one-cycle": one_cycle,
    "cosine": cosine,
    "constant": constant,
}
