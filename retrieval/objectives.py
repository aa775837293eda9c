"""Training objectives: pytorch-metric-learning losses/miners configured by name, and the Siamese pair head."""

from __future__ import annotations

import torch
from torch import nn


class PairHead(nn.Module):
    """The classic Siamese verification head: |f(a) - f(b)| -> Linear -> 2 logits (different, same)."""

    def __init__(self, embedding_size: int):
        super().__init__()
        self.linear = nn.Linear(embedding_size, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.linear((a - b).abs())

    @torch.no_grad()
    def same_probability(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.forward(a, b).float().softmax(dim=1)[:, 1]
