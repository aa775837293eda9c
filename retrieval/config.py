"""Training configs: one frozen dataclass per section, built from a TOML file (YAML too, when PyYAML is installed),
a dict or a run's config.json, then `--set key=value` overrides, and validated in one place (resolve_config).

The dataclasses are the schema: a config may set exactly their fields, read as `cfg.optimizer.lr`; an unknown key is
an error that names it and suggests the closest valid key, every value must have its field's type (overrides are
parsed by it), and the choices (tower, objective, sampler, optimizer, schedule) are the names of the registries that
build them. objective.loss_args and objective.miner_args are free-form tables of keyword arguments for the
pytorch-metric-learning classes, checked against their signatures when the objective is built. Config.to_dict() is
the plain form written to a run's config.json (lists for tuples, dicts for tables).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from retrieval.data.splits import DEFAULT_VAL_SIZE
from retrieval.errors import RetrievalError, UsageError
from retrieval.optim import OPTIMIZERS, SCHEDULES
from retrieval.precision import PRECISIONS
from retrieval.sampling import SAMPLERS
from retrieval.towers import TOWERS

Args = Mapping[str, Any]  # a free-form table: keyword arguments for a pytorch-metric-learning class


def _no_args() -> Args:
    return MappingProxyType({})


@dataclass(frozen=True)
class DataConfig:
    spec: str = "mnist:train"  # a training split; validation is carved from it, the test split is never touched
    classes: tuple[str, ...] = ()  # keep only these classes (empty: all)
    exclude: tuple[str, ...] = ()  # drop these classes (held out, e.g. for few-shot evaluation)
    subset: int = 0  # seeded random subset of this many images (0: all), for small runs
    val_size: int = DEFAULT_VAL_SIZE  # images carved from the training split for per-epoch validation (0: none)


@dataclass(frozen=True)
class TowerConfig:
    name: str = "default"  # default | hires (finer strokes, slower to train) | seed (the write-up's)
    embedding_size: int = 0  # 0: the tower's own default (64 for default and hires, 512 for seed)
    deskew: bool = False  # undo each image's slant before the network at inference (embedding, index, query)
    test_shifts: int = 0  # at inference, average the embeddings of the image shifted by up to this many pixels
    # each way ((2r+1)^2 passes: 1 -> 9x the embedding time); 0: off


@dataclass(frozen=True)
class ObjectiveConfig:
    name: str = "multi-similarity"  # multi-similarity | triplet | contrastive | pair
    miner: str = ""  # empty: the objective's default miner; "none": no miner
    loss_args: Args = field(default_factory=_no_args)  # keyword arguments for the PML loss (e.g. margin = 0.2)
    miner_args: Args = field(default_factory=_no_args)  # keyword arguments for the PML miner


@dataclass(frozen=True)
class SamplerConfig:
    name: str = "m-per-class"  # m-per-class (class-balanced batches) | random
    m: int = 16  # images per class slot in a batch (m-per-class)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 256
    precision: str = "auto"  # the tower's arithmetic: fp32 | bf16 (autocast) | auto: bf16 where the device has
    # native bfloat16 units, else fp32 (retrieval.precision); losses, optimizer state and embeddings stay fp32


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 0.003  # peak learning rate
    weight_decay: float = 0.0001
    schedule: str = "one-cycle"  # one-cycle | cosine | constant
    warmup: float = 0.2  # fraction of the steps spent warming up (one-cycle, cosine)


@dataclass(frozen=True)
class AugmentConfig:
    degrees: float = 10.0  # random rotation in [-degrees, degrees]
    translate: float = 0.1  # random shift, fraction of the image size
    scale: tuple[float, ...] = (0.9, 1.1)  # random zoom range
    shear: float = 0.0  # random shear in [-shear, shear] degrees
    group: int = 8  # images sharing one random affine (the transform is applied per group, on the device)
    elastic: float = 0.0  # elastic distortion: smooth random warp of each image by at most this many pixels (0: off)
    # What scans, photos and drawing tools do (augment.DegradeAugment; each image gets each kind with probability
    # degrade_p; 0 turns a kind off): resolution loss (lowres > 0: on), Gaussian blur up to this sigma in pixels,
    # stroke width thicker by up to this many pixels (or thinner by up to 1), Gaussian noise std and
    # salt-and-pepper fraction (x 0.6), background lift / ink dimming as a fraction of full scale.
    lowres: float = 0.0
    blur: float = 0.0
    stroke: float = 0.0
    noise: float = 0.0
    contrast: float = 0.0
    degrade_p: float = 0.5
    edges: bool = False  # DegradeAugment: the image replaced by its Canny edges or the 1 px contour of its ink
    bands: float = 0.0  # DegradeAugment: two opposite bands up to this many pixels wide inverted (dark margins)
    non_digit_slots: int = 0  # outlier exposure: class slots per batch given to synthetic non-digits (scribbles,
    # shapes, noise and blank pages, one shared label), so that non-digits land far from every digit
    non_digit_mirrors: tuple[str, ...] = ()  # classes whose left-right mirror image is no class (for MNIST
    # 2 3 4 5 6 7 9): mirrored images of them join the non-digit slots (needs non_digit_slots)
    non_digit_overlays: bool = False  # two images of different classes drawn over each other join the non-digit
    # slots (needs non_digit_slots)
    dihedral_classes: bool = False  # class expansion: each class slot turned by one of the square's 8 symmetries,
    # (class, symmetry) counting as a class of its own (for towers meant to generalise to unseen classes)
    composite_classes: float = 0.0  # class expansion: probability that a class slot is joined half-and-half
    # with another slot's images, (class a, class b, cut) counting as a class of its own (0: off)


@dataclass(frozen=True)
class Config:
    name: str = ""  # run name: names the default run folder runs/<name>/; empty -> the config file's stem
    seed: int = 0  # seeds weights, validation split, batches, augmentation and pair sampling
    data: DataConfig = field(default_factory=DataConfig)
    tower: TowerConfig = field(default_factory=TowerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict:
        """The plain nested dict (JSON types) of config.json."""
        return _plain(self)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- the schema: dotted key -> type, read from the dataclasses ---------------------------------------------------
def _schema(cls: type, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted, hint = f"{prefix}{f.name}", hints[f.name]
        out[dotted] = hint
        if dataclasses.is_dataclass(hint):
            out.update(_schema(hint, dotted + "."))
    return out


TYPES = _schema(Config)
SECTIONS = [k for k, t in TYPES.items() if dataclasses.is_dataclass(t)]
FREE_TABLES = [k for k, t in TYPES.items() if t == Args]
VALID_KEYS = [k for k in TYPES if k not in SECTIONS]
NUMBERS, NAMES = tuple[float, ...], tuple[str, ...]


def _unknown_key(dotted: str, source: str) -> UsageError:
    candidates = VALID_KEYS + SECTIONS
    close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
    if not close:  # a misspelt leaf in the right section, or a right leaf in the wrong section
        leaf = dotted.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in candidates], n=1, cutoff=0.75)
        close = [k for k in candidates if k.rsplit(".", 1)[-1] == close[0]][:1] if close else []
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UsageError(f"{source}: unknown config key '{dotted}'{hint}")


def _type_name(kind: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            NUMBERS: "a list of numbers", NAMES: "a list of strings"}[kind]


def _coerce(dotted: str, value: Any, kind: Any, source: str) -> Any:
    """Check `value` has type `kind` (ints are accepted for floats, class names may be ints); the plain value."""
    bad = UsageError(f"{source}: {dotted} must be {_type_name(kind)}, got {value!r}")
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise bad
        return value
    if not isinstance(value, list):
        raise bad
    if kind == NUMBERS:
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise bad
        return [float(v) for v in value]
    if any(isinstance(v, (bool, float, list, dict)) for v in value):
        raise bad
    return [str(v) for v in value]


def _merge(base: dict, user: Mapping, source: str, prefix: str = "") -> None:
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise _unknown_key(dotted, source)
        if dotted in FREE_TABLES:
            if not isinstance(value, Mapping):
                raise UsageError(f"{source}: {dotted} must be a table of keyword arguments, got {value!r}")
            base[key] = {str(k): v for k, v in value.items()}
        elif dotted in SECTIONS:
            if not isinstance(value, Mapping):
                raise UsageError(f"{source}: '{dotted}' is a section ([{dotted}]), got the value {value!r}")
            _merge(base[key], value, source, dotted + ".")
        else:
            if isinstance(value, Mapping):
                raise UsageError(f"{source}: {dotted} must be {_type_name(TYPES[dotted])}, got a table")
            base[key] = _coerce(dotted, value, TYPES[dotted], source)


def _parse_literal(text: str) -> Any:
    """A TOML value (number, bool, string, list); anything that does not parse stays a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _parse_override(dotted: str, text: str, kind: Any) -> Any:
    if kind is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise UsageError(f"--set {dotted}={text}: expected true or false")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"--set {dotted}={text}: expected an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"--set {dotted}={text}: expected a number") from None
    if kind is str:
        return text
    value = _parse_literal(text) if text.strip().startswith("[") else None
    if not isinstance(value, list):
        value = [v.strip() for v in text.split(",") if v.strip()]
        if kind == NUMBERS:
            try:
                value = [float(v) for v in value]
            except ValueError:
                raise UsageError(f"--set {dotted}={text}: expected comma-separated numbers") from None
    return value


def _apply_overrides(values: dict, overrides: Iterable[str]) -> None:
    """Apply `key=value` strings (parsed by the key's type) to the plain values, in order."""
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optimizer.lr=0.01")
        dotted, text = (s.strip() for s in item.split("=", 1))
        free = next((t for t in FREE_TABLES if dotted.startswith(t + ".")), None)
        if free:  # a keyword argument for a PML class: any name, value parsed as a TOML literal
            section, key = free.split("."), dotted[len(free) + 1 :]
            values[section[0]][section[1]][key] = _parse_literal(text)
            continue
        if dotted in SECTIONS or dotted in FREE_TABLES:
            example = next((k for k in VALID_KEYS if k.startswith(dotted + ".")), dotted + ".margin")
            raise UsageError(f"--set {dotted}: '{dotted}' is a section; set one of its keys, e.g. {example}=...")
        if dotted not in VALID_KEYS:
            raise _unknown_key(dotted, "--set")
        *path, leaf = dotted.split(".")
        node = values
        for part in path:
            node = node[part]
        kind = TYPES[dotted]
        node[leaf] = _coerce(dotted, _parse_override(dotted, text, kind), kind, "--set")


def _build(cls: type, values: Mapping) -> Any:
    """Plain values (already type-checked) -> the frozen dataclass: tuples for lists, read-only tables."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        value, hint = values[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value)
        elif hint == Args:
            value = MappingProxyType(dict(value))
        elif hint in (NUMBERS, NAMES):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _get(config: Config, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _validate(config: Config, source: str) -> Config:
    """Range and choice checks that types alone cannot express, section by section (the first failure is
    reported); returns the config."""
    check = _Checks(config, source)
    _check_data_and_tower(check, config)
    _check_training(check, config)
    _check_augment(check, config)
    return config


class _Checks:
    """The failures of one config's checks, naming its source and the value found."""

    def __init__(self, config: Config, source: str):
        self.config, self.source = config, source

    def fail(self, key: str, expected: str) -> UsageError:
        return UsageError(f"{self.source}: {key} must be {expected}, got {_plain(_get(self.config, key))!r}")

    def choice(self, key: str, registry: Iterable[str]) -> None:
        if _get(self.config, key) not in registry:
            raise self.fail(key, "one of " + ", ".join(registry))


def _check_data_and_tower(check: _Checks, c: Config) -> None:
    fail = check.fail
    if c.seed < 0:
        raise fail("seed", "a non-negative integer")
    for key, zero in (("data.subset", "all images"), ("data.val_size", "no validation"),
                      ("tower.embedding_size", "the tower's default")):
        if _get(c, key) < 0:
            raise fail(key, f"a non-negative integer (0: {zero})")
    if not c.data.spec.strip():
        raise fail("data.spec", "a dataset spec such as mnist:train")
    if c.data.spec.strip().lower().endswith(":test"):
        raise fail("data.spec", "a training split (the test split is kept for evaluation)")
    check.choice("tower.name", TOWERS)
    if not 0 <= c.tower.test_shifts <= 3:
        raise fail("tower.test_shifts", "a shift in pixels between 0 and 3")


def _check_training(check: _Checks, c: Config) -> None:
    """The objective, the sampler, the training loop and the optimizer."""
    from retrieval.objectives import OBJECTIVES  # (pytorch-metric-learning and SciPy's statistics: imported when
    # a config is checked for training, not by every command that reads a config, such as a one-picture query)

    fail = check.fail
    check.choice("objective.name", OBJECTIVES)
    check.choice("sampler.name", SAMPLERS)
    if c.sampler.m < 1:
        raise fail("sampler.m", "a positive integer")
    if c.train.epochs < 1:
        raise fail("train.epochs", "a positive number of epochs")
    if c.train.batch_size < 2:
        raise fail("train.batch_size", "at least 2")
    check.choice("train.precision", PRECISIONS)
    if c.sampler.name == "m-per-class" and c.train.batch_size % c.sampler.m:
        raise UsageError(f"{check.source}: train.batch_size ({c.train.batch_size}) must be a multiple of "
                         f"sampler.m ({c.sampler.m}) for the m-per-class sampler")
    check.choice("optimizer.name", OPTIMIZERS)
    if not c.optimizer.lr > 0:
        raise fail("optimizer.lr", "a positive number")
    if c.optimizer.weight_decay < 0:
        raise fail("optimizer.weight_decay", "a non-negative number")
    check.choice("optimizer.schedule", SCHEDULES)
    if not 0 < c.optimizer.warmup < 1:
        raise fail("optimizer.warmup", "a fraction between 0 and 1 (exclusive)")


def _check_augment(check: _Checks, c: Config) -> None:
    fail = check.fail
    for key in ("augment.degrees", "augment.shear"):
        if _get(c, key) < 0:
            raise fail(key, "a non-negative angle in degrees")
    if not 0 <= c.augment.translate < 0.5:
        raise fail("augment.translate", "a fraction in [0, 0.5)")
    scale = c.augment.scale
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise fail("augment.scale", "[low, high] with 0 < low <= high")
    if c.augment.group < 1:
        raise fail("augment.group", "a positive integer")
    if not 0 <= c.augment.composite_classes <= 1:
        raise fail("augment.composite_classes", "a probability between 0 and 1")
    if not 0 <= c.augment.elastic <= 7:
        raise fail("augment.elastic", "a displacement in pixels between 0 and 7")
    for key, top in (("augment.lowres", 1), ("augment.blur", 3), ("augment.stroke", 3), ("augment.noise", 1),
                     ("augment.contrast", 1), ("augment.degrade_p", 1), ("augment.bands", 13)):
        if not 0 <= _get(c, key) <= top:
            raise fail(key, f"a number between 0 and {top}")
    slots = c.train.batch_size // max(1, c.sampler.m)
    if not 0 <= c.augment.non_digit_slots < slots or (c.augment.non_digit_slots and c.sampler.m < 2):
        raise fail("augment.non_digit_slots", f"a number of class slots between 0 and {slots - 1} (batch_size / "
                   "sampler.m - 1), with sampler.m >= 2 so that non-digits have positives")
    for key in ("augment.non_digit_mirrors", "augment.non_digit_overlays"):
        if _get(c, key) and not c.augment.non_digit_slots:
            raise fail(key, "augment.non_digit_slots >= 1 (these images fill the non-digit slots)")


def resolve_config(user: Config | Mapping | None = None, overrides: Iterable[str] = (), source: str = "config",
                   name: str | None = None) -> Config:
    """Defaults <- `user` (a Config or a nested dict such as a config file's or a run's config.json) <- `key=value`
    overrides, type- and range-checked. `name` fills an empty run name (default "run")."""
    if isinstance(user, Config):
        user = user.to_dict()
    values = Config().to_dict()
    _merge(values, dict(user or {}), source)
    _apply_overrides(values, overrides)
    if not values["name"]:
        values["name"] = name or "run"
    return _validate(_build(Config, values), source)


def read_config_file(path: str | os.PathLike) -> dict:
    """Parse a TOML (or YAML) config file into a plain dict; clear errors for missing or malformed files."""
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"config file not found: {path}")
    text = path.read_bytes()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise RetrievalError(f"{path}: YAML configs need PyYAML (pip install pyyaml); or write it as TOML") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise RetrievalError(f"{path} is not valid YAML ({e})") from None
    else:
        try:
            data = tomllib.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise RetrievalError(f"{path} is not valid TOML ({e})") from None
    if not isinstance(data, dict):
        raise RetrievalError(f"{path}: expected a table of settings at the top level")
    return data


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """Read a config file, merge it over the defaults, apply overrides; the run name defaults to the file's stem."""
    path = Path(path)
    return resolve_config(read_config_file(path), overrides, source=str(path), name=path.stem)


def _leaves(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, Mapping) and dotted not in FREE_TABLES:
            out.update(_leaves(v, dotted + "."))
        else:
            out[dotted] = v
    return out


def config_diff(a: Mapping, b: Mapping) -> list[str]:
    """Dotted keys whose values differ between two resolved configs in their plain form (Config.to_dict())."""
    la, lb = _leaves(a), _leaves(b)
    return sorted(k for k in set(la) | set(lb) if la.get(k) != lb.get(k))
