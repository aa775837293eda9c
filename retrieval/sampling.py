"""Batch samplers: which training images make up each step's batch, a pure function of (seed, epoch).

SAMPLERS maps the names config key sampler.name accepts to builders (labels, batch_size, m, seed) -> Sampler.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from retrieval.errors import UsageError
from retrieval.seeding import make_generator


class Sampler(Protocol):
    """What the trainer asks of a sampler."""

    batch_size: int
    m: int  # images per class slot: batches are runs of m images of one class (1: no such grouping)

    def __len__(self) -> int:
        """Batches (optimizer steps) per epoch."""

    def epoch_batches(self, epoch: int) -> torch.Tensor:
        """(len(self), batch_size) int64 positions into the training set, a pure function of (seed, epoch)."""

    def describe(self) -> dict:
        """Settings recorded in checkpoint metadata."""


class ClassBalancedBatchSampler:
    """Class-balanced batches, as PML's MPerClassSampler: each batch is batch_size/m class slots of m images.

    Unlike MPerClassSampler it is seeded (no global NumPy state), addressable by epoch, gives classes slots in
    proportion to their size and draws each class's images without replacement (so an epoch sees about every
    image once), and allows more slots than classes (with MNIST's 10 classes, batch 256 = 16 slots of 16: every
    class once, six of them twice).
    """

    name = "m-per-class"

    def __init__(self, labels: torch.Tensor, batch_size: int, m: int, seed: int):
        if batch_size % m:
            raise UsageError(f"batch size {batch_size} must be a multiple of m={m} for the m-per-class sampler")
        labels = labels.detach().to("cpu")
        self.batch_size, self.m, self.seed = batch_size, m, seed
        self.classes = torch.unique(labels)
        self.members = [torch.nonzero(labels == c).flatten() for c in self.classes]
        self.num_batches = len(labels) // batch_size
        if self.num_batches == 0:
            raise UsageError(f"batch size {batch_size} is larger than the {len(labels)} training images")

    def __len__(self) -> int:
        return self.num_batches

    def epoch_batches(self, epoch: int) -> torch.Tensor:
        g = make_generator(self.seed, "sampler", epoch)
        n_classes, slots = len(self.classes), self.batch_size // self.m
        full, extra = divmod(slots, n_classes)
        share = torch.tensor([len(m) for m in self.members], dtype=torch.float64)
        share /= share.sum()
        used = torch.zeros(n_classes, dtype=torch.float64)
        per_batch = []
        for b in range(self.num_batches):
            # the extra slots go to the classes furthest behind their share of the data (random among equals),
            # so over an epoch each class is drawn in proportion to its size and images repeat only at the end
            deficit = share * (b + 1) * slots - used - full + torch.rand(n_classes, generator=g, dtype=torch.float64) * 1e-3
            chosen = torch.argsort(deficit, descending=True)[:extra]
            slot_classes = torch.cat([torch.arange(n_classes).repeat(full), chosen])
            used += torch.bincount(slot_classes, minlength=n_classes)
            per_batch.append(slot_classes[torch.randperm(len(slot_classes), generator=g)])
        slot_classes = torch.stack(per_batch)  # (num_batches, slots)
        need = torch.bincount(slot_classes.flatten(), minlength=n_classes) * self.m
        streams = []  # per class: concatenated permutations of its members, long enough for the epoch
        for members, k in zip(self.members, need.tolist()):
            reps = -(-k // len(members)) if k else 0
            streams.append(torch.cat([members[torch.randperm(len(members), generator=g)] for _ in range(reps)])
                           if reps else members[:0])
        cursor = [0] * n_classes
        out = torch.empty(self.num_batches, self.batch_size, dtype=torch.long)
        for b in range(self.num_batches):
            for s, c in enumerate(slot_classes[b].tolist()):
                out[b, s * self.m : (s + 1) * self.m] = streams[c][cursor[c] : cursor[c] + self.m]
                cursor[c] += self.m
        return out

    def describe(self) -> dict:
        return {"name": self.name, "m": self.m, "batch_size": self.batch_size}


class RandomBatchSampler:
    """Plain shuffled batches (each image once per epoch, the remainder dropped), a pure function of (seed, epoch)."""

    name = "random"
    m = 1

    def __init__(self, labels: torch.Tensor, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = len(labels), batch_size, seed
        self.num_batches = self.n // batch_size
        if self.num_batches == 0:
            raise UsageError(f"batch size {batch_size} is larger than the {self.n} training images")

    def __len__(self) -> int:
        return self.num_batches

    def epoch_batches(self, epoch: int) -> torch.Tensor:
        perm = torch.randperm(self.n, generator=make_generator(self.seed, "sampler", epoch))
        return perm[: self.num_batches * self.batch_size].view(self.num_batches, self.batch_size)

    def describe(self) -> dict:
        return {"name": self.name, "batch_size": self.batch_size}


class ShardedBatchSampler:
    """One process's share of another sampler's batches, for training on N processes: every global batch (of
    `sampler.batch_size` images) is cut into N equal consecutive runs of rows and process `rank` takes run
    number `rank`. The shards of one step are disjoint and together they are the single-process batch, in its
    order, so N processes with per-process batch B/N see the same global batches as one process with batch B;
    it is as seeded and epoch-addressable as the sampler it shares out.
    """

    def __init__(self, sampler: Sampler, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is not among the {world_size} processes")
        if sampler.batch_size % world_size:
            raise UsageError(f"train.batch_size ({sampler.batch_size}) must be a multiple of the number of "
                             f"processes ({world_size}): each process takes an equal share of every batch")
        self.sampler, self.rank, self.world_size = sampler, rank, world_size
        self.global_batch_size = sampler.batch_size
        self.batch_size = sampler.batch_size // world_size
        self.m = sampler.m
        self.start = rank * self.batch_size  # this process's rows of each global batch: [start, stop)
        self.stop = self.start + self.batch_size

    def __len__(self) -> int:
        return len(self.sampler)

    def global_batches(self, epoch: int) -> torch.Tensor:
        """(len(self), global batch size): the batches of all processes together."""
        return self.sampler.epoch_batches(epoch)

    def epoch_batches(self, epoch: int) -> torch.Tensor:
        """(len(self), batch_size): this process's columns of the global batches."""
        return self.global_batches(epoch)[:, self.start:self.stop]

    def describe(self) -> dict:
        return self.sampler.describe()  # the global batches are the run's; how many processes share them is not


SAMPLERS: dict[str, Callable[[torch.Tensor, int, int, int], Sampler]] = {
    "m-per-class": ClassBalancedBatchSampler,
    "random": lambda labels, batch_size, m, seed: RandomBatchSampler(labels, batch_size, seed),
}
