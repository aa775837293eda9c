"""Training objectives: pytorch-metric-learning losses/miners configured by name, and the Siamese pair head.

An objective maps a batch of embeddings and labels to a scalar loss:
- MetricLossObjective wraps a real PML loss and an optional PML miner (triplet, contrastive, multi-similarity);
- PairObjective is the classic Siamese verification objective: for every anchor one same-class and one
  other-class partner from the batch, |f(a) - f(b)| -> PairHead -> cross-entropy.
Both are Objectives: what the trainer asks of one (the Protocol below). OBJECTIVES maps the names config key
objective.name accepts to their builders.

On a process group (retrieval.distributed) an objective's `distributed()` form computes the loss of the global
batch from each process's share of it:
- PML losses and miners are wrapped in PML's DistributedLossWrapper / DistributedMinerWrapper with
  efficient=False: every process mines and computes the loss on the all-gathered batch (its own rows keeping their
  gradient) and returns it times the number of processes N, so DDP's gradient average is exactly the gradient of
  the single-process loss. efficient=True (own rows as anchors against the gathered batch) would compute a
  (B/N x B) instead of a (B x B) similarity matrix, but the gradients that reach this process's rows as
  positives/negatives of other processes' anchors are lost: another training (on 64 embeddings over 2
  processes its gradient is 64% off the single-process one for each of these three losses, efficient=False's
  1e-7). At these sizes (B = 256, 64-d) the B x B work is negligible next to the tower.
- the pair objective is not a PML loss (the wrapper refuses it) and draws its pairs from the batch with the
  step's generator: it gathers the batch in rank order (the single-process order, so the same pairs are drawn),
  own rows keeping their gradient times N (retrieval.distributed.gather_batch), and computes the loss unscaled,
  so the pair head, whose gradient is then the same on every process, is not multiplied by N.
`loss_scale` says by how much the returned loss exceeds the global batch's loss (N, or 1).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Iterator, Mapping, Protocol

import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners
from torch import nn

from retrieval.errors import UsageError


class Objective(Protocol):
    """A module mapping a batch of embeddings and labels to a scalar loss (pairs drawn from `generator`)."""

    head: nn.Module | None  # the trainable part saved with the tower (the pair head), or None
    loss_scale: float  # the returned loss over the batch's loss (> 1 only for distributed() forms)

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def to(self, device: torch.device | str) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def describe(self) -> dict:
        """Settings recorded in checkpoint metadata."""

    def distributed(self) -> "Objective":
        """This objective on the current process group: given this process's share of each batch, a loss whose
        gradient, averaged over the processes by DDP, is that of this objective on the whole batch."""


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


class MetricLossObjective(nn.Module):
    """A PML loss fed by an optional PML miner: loss(emb, labels, miner(emb, labels))."""

    head = None
    loss_scale = 1.0

    def __init__(self, name: str, loss: nn.Module, miner: nn.Module | None = None, settings: dict | None = None):
        super().__init__()
        self.name = name
        self.loss = loss
        self.miner = miner
        self.settings = settings or {}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, indices)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "loss": type(self.loss).__name__,
            "miner": type(self.miner).__name__ if self.miner is not None else None,
            **self.settings,
        }

    def distributed(self) -> "MetricLossObjective":
        import torch.distributed as dist
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

        if any(True for _ in self.loss.parameters()):  # the N x loss would scale their gradient by N
            raise UsageError(f"objective {self.name}: a loss with trainable parameters cannot be trained on "
                             "several processes")
        miner = DistributedMinerWrapper(self.miner, efficient=False) if self.miner is not None else None
        wrapped = MetricLossObjective(self.name, DistributedLossWrapper(self.loss, efficient=False), miner,
                                      self.settings)
        wrapped.loss_scale = float(dist.get_world_size())
        return wrapped


def balanced_pairs(labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every anchor, one uniformly drawn same-class partner and one other-class partner within the batch.

    Returns (anchors, partners, same) as index/label tensors on labels' device; anchors without a same-class
    (or other-class) partner in the batch contribute no such pair. Randomness comes from `generator` (CPU) only.
    """
    cpu_labels = labels.detach().to("cpu")
    n = len(cpu_labels)
    same = cpu_labels[:, None] == cpu_labels[None, :]
    eye = torch.eye(n, dtype=torch.bool)
    noise = torch.rand((n, n), generator=generator)
    anchors, partners, targets = [], [], []
    for mask, target in ((same & ~eye, 1), (~same, 0)):
        has = mask.any(dim=1)
        # argmax of uniform noise restricted to the allowed partners = a uniform choice among them
        choice = torch.where(mask, noise, torch.full_like(noise, -1.0)).argmax(dim=1)
        idx = torch.nonzero(has).flatten()
        anchors.append(idx)
        partners.append(choice[idx])
        targets.append(torch.full((len(idx),), target, dtype=torch.long))
    device = labels.device
    return torch.cat(anchors).to(device), torch.cat(partners).to(device), torch.cat(targets).to(device)


class PairObjective(nn.Module):
    """Cross-entropy of the pair head on balanced positive/negative pairs drawn on the fly from the batch."""

    name = "pair"
    loss_scale = 1.0

    def __init__(self, head: PairHead):
        super().__init__()
        self.head = head

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        if generator is None:
            raise ValueError("the pair objective needs a generator to draw its pairs reproducibly")
        a, b, target = balanced_pairs(labels, generator)
        if len(a) == 0:
            raise UsageError("pair objective: a batch has no image pairs; use a larger batch")
        logits = self.head(embeddings[a], embeddings[b])
        return F.cross_entropy(logits.float(), target)

    def describe(self) -> dict:
        return {"name": "pair", "loss": "CrossEntropyLoss", "miner": None, "head": "|a-b| -> Linear -> 2 logits",
                "pairs": "per anchor one same-class and one other-class partner from the batch"}

    def distributed(self) -> "PairObjective":
        return DistributedPairObjective(self.head)


class DistributedPairObjective(PairObjective):
    """The pair objective on a process group: pairs drawn from, and the loss computed on, the gathered batch."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        from retrieval.distributed import gather_batch

        batch, batch_labels = gather_batch(embeddings, labels)
        return super().forward(batch, batch_labels, generator)


# Objective name -> (PML loss class, default loss kwargs, default miner name)
LOSSES: dict[str, tuple[type, dict, str]] = {
    "multi-similarity": (losses.MultiSimilarityLoss, {}, "multi-similarity"),
    "triplet": (losses.TripletMarginLoss, {"margin": 0.2}, "semihard"),
    "contrastive": (losses.ContrastiveLoss, {}, "pair-margin"),
}
# Miner name -> (objectives it serves, PML class, fixed kwargs)
MINERS: dict[str, tuple[tuple[str, ...], type, dict]] = {
    "semihard": (("triplet",), miners.TripletMarginMiner, {"type_of_triplets": "semihard"}),
    "hard": (("triplet",), miners.TripletMarginMiner, {"type_of_triplets": "hard"}),
    "all": (("triplet",), miners.TripletMarginMiner, {"type_of_triplets": "all"}),
    "batch-hard": (("triplet",), miners.BatchHardMiner, {}),
    "pair-margin": (("contrastive",), miners.PairMarginMiner, {}),
    "multi-similarity": (("multi-similarity",), miners.MultiSimilarityMiner, {}),
}
DISTANCES = {"cosine": distances.CosineSimilarity, "euclidean": distances.LpDistance}


def _accepted_kwargs(cls: type) -> list[str]:
    """Named keyword parameters of cls.__init__ and of the PML base classes it forwards **kwargs to."""
    names: list[str] = []
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None or klass is nn.Module or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "mat_based_loss"):
                names.append(p.name)
    return list(dict.fromkeys(names))


def _construct(cls: type, kwargs: Mapping[str, Any], key: str) -> nn.Module:
    accepted = _accepted_kwargs(cls)
    for name in kwargs:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"{key}.{name}: {cls.__name__} has no argument '{name}'{hint}; it takes: {', '.join(accepted)}")
    kwargs = dict(kwargs)
    if "distance" in kwargs:  # config files name a distance; PML wants an object
        name = kwargs["distance"]
        if name not in DISTANCES:
            raise UsageError(f"{key}.distance: expected one of {', '.join(DISTANCES)}, got {name!r}")
        kwargs["distance"] = DISTANCES[name]()
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise UsageError(f"{key}: cannot build {cls.__name__}({kwargs}): {e}") from None


def build_objective(
    name: str,
    embedding_size: int,
    miner: str = "",
    loss_args: Mapping[str, Any] | None = None,
    miner_args: Mapping[str, Any] | None = None,
) -> Objective:
    """Objective by name: multi-similarity | triplet | contrastive (PML loss + miner) or pair (PairHead + CE).

    `miner` "" picks the objective's default miner and "none" trains on all pairs/triplets of the batch;
    `loss_args` / `miner_args` are keyword arguments for the PML classes (`distance` may be "cosine" or
    "euclidean"); for triplet the miner's margin follows the loss's margin unless given.
    """
    if name not in OBJECTIVES:
        raise UsageError(f"unknown objective {name!r}; expected one of: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](name, embedding_size, miner, dict(loss_args or {}), dict(miner_args or {}))


def _pair_objective(name: str, embedding_size: int, miner: str, loss_args: dict, miner_args: dict) -> PairObjective:
    if miner not in ("", "none") or loss_args or miner_args:
        raise UsageError("objective 'pair' takes no miner, loss_args or miner_args (its loss is cross-entropy)")
    return PairObjective(PairHead(embedding_size))


def _metric_loss_objective(name: str, embedding_size: int, miner: str, loss_args: dict,
                           miner_args: dict) -> MetricLossObjective:
    loss_cls, loss_defaults, default_miner = LOSSES[name]
    loss_kwargs = {**loss_defaults, **loss_args}
    loss = _construct(loss_cls, loss_kwargs, "objective.loss_args")
    miner_name = miner or default_miner
    miner_module, miner_kwargs = None, {}
    if miner_name != "none":
        if miner_name not in MINERS or name not in MINERS[miner_name][0]:
            valid = [m for m, (objs, _, _) in MINERS.items() if name in objs] + ["none"]
            raise UsageError(f"objective.miner: {miner_name!r} does not work with {name}; expected one of: {', '.join(valid)}")
        _, miner_cls, fixed = MINERS[miner_name]
        miner_kwargs = dict(fixed)
        if miner_cls is miners.TripletMarginMiner and "margin" not in miner_args:
            miner_kwargs["margin"] = loss_kwargs.get("margin", 0.05)
        miner_kwargs.update(miner_args)
        miner_module = _construct(miner_cls, miner_kwargs, "objective.miner_args")
    elif miner_args:
        raise UsageError("objective.miner_args given but objective.miner is 'none'")
    settings = {"miner_name": miner_name, "loss_args": loss_kwargs, "miner_args": miner_kwargs}
    objective = MetricLossObjective(name, loss, miner_module, settings)
    _try_on_a_batch(objective, embedding_size)
    return objective


# Objective name -> builder (name, embedding_size, miner, loss_args, miner_args)
OBJECTIVES: dict[str, Callable[[str, int, str, dict, dict], Objective]] = {
    **{name: _metric_loss_objective for name in LOSSES},
    "pair": _pair_objective,
}


def _try_on_a_batch(objective: MetricLossObjective, embedding_size: int) -> None:
    """Arguments PML accepts but cannot use (margin = "abc") fail here, not hours into training."""
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(8, embedding_size, generator=g), dim=1)
    try:
        with torch.no_grad():
            loss = objective(emb, torch.arange(8) % 2)
        float(loss)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad argument
        args = {**objective.settings["loss_args"], **objective.settings["miner_args"]}
        raise UsageError(f"objective {objective.name} with arguments {args} fails on a test batch: "
                         f"{type(e).__name__}: {e}") from None
