"""Towers from configs: training runs, the shipped configs, what a run amounts to, a digit-or-not gate on a
trained tower."""

from __future__ import annotations

import logging
import os
import shutil
import time
from importlib.resources import files
from pathlib import Path

import numpy as np

from retrieval.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from retrieval.data.nondigits import load_split
from retrieval.data.specs import data_root
from retrieval.embed import resolve_device
from retrieval.errors import UsageError
from retrieval.fsutil import ensure_writable_dir
from retrieval.gate import (
    GateRecipe, acceptance_threshold as gate_acceptance, attach_gate, digit_pictures, digit_scores, train_gate
)
from retrieval.run_folder import RECORD_FILES, RunFolder
from retrieval.workflows.common import now

logger = logging.getLogger(__name__)


def train(config, out_dir=None, **options) -> Path:
    """Train a tower as `config` says (a config file, the name of a shipped config such as "mnist-default", a
    Config or a dict) into `out_dir` (see retrieval.training.train for the options)."""
    from retrieval.training import train as run_training  # here: training's imports (torchvision) cost a second

    if isinstance(config, (str, os.PathLike)):
        config = resolve_config_path(config)
    return run_training(config, out_dir, **options)


def run_summary(run: str | os.PathLike, seconds: float | None = None) -> dict:
    """What a finished (or interrupted) training run amounts to, as `retrieval train --json` prints it
    (RunFolder.summary; `seconds`: this call's wall time, when the caller measured it)."""
    return RunFolder(run).summary(seconds)


def shipped_config_folder() -> Path:
    """The folder of the configs shipped with the tool: package data (retrieval/configs/) in an installed wheel,
    the checkout's top-level configs/ in a source checkout or an editable install (setup.py installs the one as
    the other)."""
    package = Path(os.fspath(files("retrieval")))  # installed as files (a wheel or a checkout), never zipped
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def shipped_configs() -> list[str]:
    """Names of the configs shipped with the tool (configs/<name>.toml)."""
    folder = shipped_config_folder()
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def shipped_config(name: str) -> Path:
    """The path of a config shipped with the tool, by name (mnist-default, ...): found in a source checkout and in
    any installation alike."""
    path = shipped_config_folder() / f"{name}.toml"
    if not path.is_file():
        raise UsageError(f"`config` {name!r}: no shipped config of that name; shipped: {', '.join(shipped_configs())}")
    return path


def resolve_config_path(config: str | os.PathLike) -> Path:
    """A config file path, or the name of a shipped config (mnist-default) when no such file exists."""
    path = Path(config)
    if path.is_file() or path.suffix or len(path.parts) != 1:
        return path
    return shipped_config(str(config))


def train_digit_gate(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    recipe=None,
    digits: int = 20000,
    non_digits: int = 6000,
    root=None,
    device="auto",
    overwrite: bool = False,
) -> dict:
    """A copy of the run `checkpoint` in the run folder `out` whose tower carries a trained digit-or-not gate
    (retrieval.gate): `digits` pictures of the tower's training slice against `non_digits` pictures of each of
    retrieval.data.nondigits' training sources, trained as `recipe` says (a retrieval.gate.GateRecipe; None:
    its defaults); its threshold answers the recipe's `accept` of 2,000 digits of the validation slice. The tower's own weights are unchanged (its embeddings too); its fingerprint covers the
    gate, so indexes are built anew from `out`. Returns the new checkpoint sidecar."""

    recipe = GateRecipe() if recipe is None else recipe
    if recipe.steps < 1 or recipe.width < 1 or not 0 <= recipe.degrade_p <= 1 or not 0 < recipe.accept <= 1:
        raise UsageError("gate settings: `steps` and `width` must be positive, `degrade_p` in [0, 1], `accept` in "
                         "(0, 1]")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"`out` {out} already holds files; choose an empty folder (or overwrite)")
    device = resolve_device(device)
    source = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(source, device=device)
    attach_gate(ckpt.tower, None)  # a gate already there is replaced
    root = data_root(root)
    positives, labels, validation = digit_pictures(ckpt.meta, root=root, n=int(digits), seed=recipe.seed)
    sets = load_split("train", int(non_digits), seed=recipe.seed, root=root)
    negatives = np.concatenate([s.images for s in sets.values()])
    start = time.perf_counter()
    gate = train_gate(ckpt.tower, positives, negatives, recipe, device=device, positive_labels=labels)
    seconds = time.perf_counter() - start
    attach_gate(ckpt.tower, gate)
    gate.threshold = gate_acceptance(digit_scores(ckpt.tower, validation, device=device), recipe.accept)
    ensure_writable_dir(out, "run folder")
    for name in RECORD_FILES:  # the run's own record, as it was
        if (source.parent / name).is_file():
            shutil.copyfile(source.parent / name, out / name)
    skip = {"format", "tower", "embedding_size", "deskew", "test_shifts", "fingerprint", "has_pair_head", "gate"}
    record = {"recipe": {k: v for k, v in vars(recipe).items()}, "digits": int(len(positives)),
              "non_digits": {name: int(len(s.images)) for name, s in sets.items()},
              "threshold_rule": f"answers {recipe.accept:g} of {len(validation):,} validation digits",
              "seconds": round(seconds, 1), "from_checkpoint": str(source.resolve()), "created": now()}
    return save_checkpoint(RunFolder(out).best, ckpt.tower, ckpt.head, **{k: v for k, v in ckpt.meta.items() if k not in skip},
                           gate=record)
