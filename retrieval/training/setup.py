"""A Trainer from a resolved config: data and its validation slice, seeded tower and objective, sampler,
augmentation, optimizer and schedule, and what the checkpoints and the training state record."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Callable

import torch

from retrieval.augment import BatchAugment, Chain, DegradeAugment, ElasticAugment, build_class_expansions
from retrieval.config import AugmentConfig, Config, OptimizerConfig
from retrieval.data.specs import class_indices, load_dataset
from retrieval.data.splits import split_validation
from retrieval.distributed import ProcessGroup
from retrieval.errors import UsageError
from retrieval.objectives import build_objective
from retrieval.optim import OPTIMIZERS, SCHEDULES
from retrieval.precision import resolve_precision
from retrieval.sampling import SAMPLERS, ShardedBatchSampler
from retrieval.seeding import derive_seed
from retrieval.towers import build_tower
from retrieval.training.batches import Batches
from retrieval.training.loop import StepInfo, Trainer, TrainerSettings, Validation

logger = logging.getLogger(__name__)

# the data layer names its arguments in backticks; here they are the config's data.* keys
_DATA_ARGUMENT = re.compile(r"`(classes|exclude|subset)`")


def build_optimizer(o: OptimizerConfig, params, total_steps: int):
    """The optimizer (optimizer.name) and its learning-rate schedule (optimizer.schedule) over `total_steps`."""
    optimizer = OPTIMIZERS[o.name](params, lr=o.lr, weight_decay=o.weight_decay)
    return optimizer, SCHEDULES[o.schedule](optimizer, o.lr, o.warmup, total_steps)


def config_sha256(cfg: Config) -> str:
    """What a training state is checked against on resume: the config, less train.precision (a run may resume in
    another precision, with a warning, as under another thread count; runs saved before the key existed match)."""
    plain = cfg.to_dict()
    del plain["train"]["precision"]
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


def build_trainer(cfg: Config, out: Path, dev: torch.device, data_root=None, progress: bool = True,
                  on_step: Callable[[StepInfo], None] | None = None, group: ProcessGroup | None = None) -> Trainer:
    """Everything a resolved config describes: data (on `dev`), validation slice, seeded tower, objective,
    sampler, augmentation, optimizer and schedule, composed into a Trainer that writes to `out`. With a process
    `group`: batch norm over the global batch and this process's share of each batch."""
    d, t, o, a, seed = cfg.data, cfg.tower, cfg.objective, cfg.augment, cfg.seed
    ds = _load_data(cfg, data_root)
    train_pos, val_pos = split_validation(ds.labels, _validation_size(d.val_size, len(ds)), seed)
    train_labels = ds.labels[train_pos]
    classes_seen = [ds.classes[i] for i in torch.unique(train_labels).tolist()]
    mirror_labels = class_indices(ds.classes, a.non_digit_mirrors, d.spec, "augment.non_digit_mirrors")
    with torch.random.fork_rng(devices=[]):  # seeded initial weights without touching the caller's RNG
        torch.manual_seed(derive_seed(seed, "init"))
        tower = build_tower(t.name, t.embedding_size or None, t.deskew, t.test_shifts)
        objective = build_objective(o.name, tower.embedding_size, o.miner, o.loss_args, o.miner_args)
    precision = resolve_precision(cfg.train.precision, dev)
    tower.to(dev, memory_format=torch.channels_last)
    objective.to(dev)
    sampler = SAMPLERS[cfg.sampler.name](train_labels, cfg.train.batch_size, cfg.sampler.m, seed)
    if group is not None:
        tower = group.sync_batchnorm(tower)
        sampler = ShardedBatchSampler(sampler, group.rank, group.world_size)
    augment = BatchAugment(a.degrees, a.translate, a.scale, a.shear, a.group)
    degrade = DegradeAugment(a.lowres, a.blur, a.stroke, a.noise, a.contrast, a.degrade_p, a.edges, a.bands)
    params = list(tower.parameters()) + list(objective.parameters())
    optimizer, scheduler = build_optimizer(cfg.optimizer, params, cfg.train.epochs * len(sampler))
    checkpoint_meta = {
        "objective": objective.describe(),
        "data": {"spec": d.spec, "classes": list(d.classes) or None, "exclude": list(d.exclude) or None,
                 "subset": d.subset or None, "filters": ds.filters, "train_images": len(train_pos),
                 "val_images": len(val_pos), "val_seed": seed},
        "classes": ds.classes,
        "classes_seen": classes_seen,
        "preprocessing": ds.preprocessing,
        "config": cfg.name,
        "precision": precision,
        "seed": seed,
        "epochs": cfg.train.epochs,
        "sampler": sampler.describe(),
        "augment": _augment_meta(a, augment, degrade),
    }
    if group is not None:
        checkpoint_meta["distributed"] = group.describe()
    validation = Validation(ds.images[val_pos].to(dev), ds.labels[val_pos]) if len(val_pos) else None
    batches = Batches(
        ds.images[train_pos].to(dev), train_labels.to(dev), sampler, augment,
        # after the affine: elastic, then degrade
        elastic=(Chain(ElasticAugment(a.elastic) if a.elastic else None, degrade) if degrade.enabled
                 else ElasticAugment(a.elastic) if a.elastic else None),
        class_expansions=build_class_expansions(a.composite_classes, a.dihedral_classes, len(ds.classes), sampler.m,
                                                a.non_digit_slots, mirror_labels, a.non_digit_overlays),
    )
    settings = TrainerSettings(epochs=cfg.train.epochs, seed=seed, device=dev, precision=precision,
                               progress=progress, on_step=on_step, checkpoint_meta=checkpoint_meta,
                               state_meta={"config_sha256": config_sha256(cfg)})
    return Trainer(tower, objective, batches, optimizer, scheduler, settings, out, validation=validation, group=group)


def _load_data(cfg: Config, data_root):
    """The training split as data.* selects it; the data layer's errors name the config keys."""
    d = cfg.data
    try:
        return load_dataset(d.spec, root=data_root, classes=d.classes or None, exclude=d.exclude or None,
                            subset=d.subset or None, seed=cfg.seed)
    except UsageError as e:
        raise UsageError(_DATA_ARGUMENT.sub(r"data.\1", str(e))) from None


def _validation_size(val_size: int, images: int) -> int:
    """data.val_size, capped at a fifth of the images."""
    if val_size and val_size > images // 5:
        capped = images // 5
        logger.info(f"data.val_size {val_size} is more than a fifth of the {images:,} images; validating on {capped:,}")
        return capped
    return val_size


def _augment_meta(a: AugmentConfig, augment: BatchAugment, degrade: DegradeAugment) -> dict:
    return {**augment.describe(), "elastic": a.elastic, "composite_classes": a.composite_classes,
            "dihedral_classes": a.dihedral_classes,
            **({"degrade": degrade.describe()} if degrade.enabled else {}),
            **({"non_digit_slots": a.non_digit_slots} if a.non_digit_slots else {}),
            **({"non_digit_mirrors": list(a.non_digit_mirrors)} if a.non_digit_mirrors else {}),
            **({"non_digit_overlays": True} if a.non_digit_overlays else {})}
