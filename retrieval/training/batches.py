"""The data path of training: which images each step takes and how they become a batch."""

from __future__ import annotations

from typing import Sequence

import torch

from retrieval.augment import BatchTransform, ClassExpansion, Rows
from retrieval.sampling import Sampler, ShardedBatchSampler


class Batches:
    """Each step's batch: the sampler's positions into `images` (uint8, N x H x W, on the training device) and
    `labels`, scaled to [0, 1], the class expansions (new classes made from the sampled ones), then `augment` and
    `elastic` (batch transforms).

    Distributed (`sampler` a ShardedBatchSampler): this process's share of each global batch; the transforms draw
    for the whole batch and apply this process's rows (augment.Rows)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sampler: Sampler, augment: BatchTransform,
                 elastic: BatchTransform | None = None, class_expansions: Sequence[ClassExpansion] = ()):
        self.images, self.labels, self.sampler = images, labels, sampler
        self.augment, self.elastic, self.class_expansions = augment, elastic, tuple(class_expansions)
        # this process's rows of each global batch (distributed), else None
        self.rows = (Rows(sampler.start, sampler.stop, sampler.global_batch_size)
                     if isinstance(sampler, ShardedBatchSampler) else None)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    @property
    def images_per_step(self) -> int:
        """Images of one optimizer step, over all processes."""
        return getattr(self.sampler, "global_batch_size", self.sampler.batch_size)

    def plan(self, epoch: int) -> torch.Tensor:
        """The positions of each step's batch: this process's share, or in a distributed run with class
        expansions the whole batch (make keeps this process's rows after expanding)."""
        if self.rows is not None and self.class_expansions:
            return self.sampler.global_batches(epoch)
        return self.sampler.epoch_batches(epoch)

    def make(self, positions: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Index the on-device uint8 images, scale to [0, 1] and augment: the whole data path of a step.

        Distributed: `positions` are this process's share of the step's batch, or the whole batch when class
        expansions mix it (they then run on the whole batch and this process keeps its rows)."""
        x = self.images[positions].unsqueeze(1).float().div_(255.0)
        y = self.labels[positions]
        for expand in self.class_expansions:
            x, y = expand(x, y, generator)
        rows = self.rows
        if rows is not None and len(x) == rows.total:  # the whole batch was made here: keep this process's rows
            x, y = x[rows.start:rows.stop], y[rows.start:rows.stop]
        x = self.augment(x, generator) if rows is None else self.augment(x, generator, rows)
        if self.elastic is not None:
            x = self.elastic(x, generator) if rows is None else self.elastic(x, generator, rows)
        # channels-last: faster convolutions on CUDA and with oneDNN on CPU, in fp32 and bf16 alike
        return x.contiguous(memory_format=torch.channels_last), y
