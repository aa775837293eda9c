"""One training step's arithmetic: the loss of a batch (TrainStep) and the epoch's running sums (EpochTotals)."""

from __future__ import annotations

import torch

from retrieval.objectives import Objective
from retrieval.precision import autocast
from retrieval.towers import Tower


class TrainStep(torch.nn.Module):
    """The one place a training step computes its loss: the tower under the precision's autocast
    (retrieval.precision), the objective (loss, miner, distances, a pair head) on fp32 embeddings outside it.

    Tower and objective are one module so that DistributedDataParallel wraps both (the pair head included); a
    distributed run gives it the objective's distributed() form, whose loss is the global batch's."""

    def __init__(self, tower: Tower, objective: Objective, device: torch.device, precision: str):
        super().__init__()
        self.tower, self.objective, self.device, self.precision = tower, objective, device, precision

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with autocast(self.device, self.precision):
            emb = self.tower(x)
        return self.objective(emb.float(), y, generator)


class EpochTotals:
    """The running sums of the epoch in progress: the loss (a float64 tensor on the training device, so that adding
    a step's loss never waits for the device), steps and seconds."""

    def __init__(self, device: torch.device, loss_sum: float = 0.0, steps: int = 0, seconds: float = 0.0):
        self.loss_sum = torch.tensor(loss_sum, dtype=torch.float64, device=device)
        self.steps, self.seconds = steps, seconds

    def to_json(self) -> dict:
        return {"loss_sum": float(self.loss_sum), "steps": self.steps, "seconds": self.seconds}
