"""Training configs: TOML files (YAML too, when PyYAML is installed) merged over typed defaults and validated.

A config is a nested dict with exactly the keys of DEFAULTS (two free-form tables excepted: objective.loss_args
and objective.miner_args hold keyword arguments for the pytorch-metric-learning classes and are checked against
their signatures when the objective is built). Every value has the type of its default, so `--set key=value`
overrides are typed by the default; an unknown key is an error that names it and suggests the closest valid key.
"""

from __future__ import annotations

import copy
import difflib
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from retrieval.errors import RetrievalError, UsageError

DEFAULTS: dict[str, Any] = {
    "name": "",  # run name: names the default run folder runs/<name>/; empty -> the config file's stem
    "seed": 0,  # seeds weights, validation split, batches, augmentation and pair sampling
    "data": {
        "spec": "mnist:train",  # a training split; validation is carved from it, the test split is never touched
        "classes": [],  # keep only these classes (empty: all)
        "exclude": [],  # drop these classes (held out, e.g. for few-shot evaluation)
        "subset": 0,  # seeded random subset of this many images (0: all), for small runs
        "val_size": 5000,  # images carved from the training split for per-epoch validation (0: none)
    },
    "tower": {
        "name": "default",  # default | hires (finer strokes, 2.4x the training time) | seed (the write-up's)
        "embedding_size": 0,  # 0: the tower's own default (64 for default and hires, 512 for seed)
        "deskew": False,  # undo each image's slant before the network at inference (embedding, index, query)
        "test_shifts": 0,  # at inference, average the embeddings of the image shifted by up to this many pixels
        # each way ((2r+1)^2 passes: 1 -> 9x the embedding time); 0: off
    },
    "objective": {
        "name": "multi-similarity",  # multi-similarity | triplet | contrastive | pair
        "miner": "",  # empty: the objective's default miner; "none": no miner
        "loss_args": {},  # keyword arguments for the PML loss (e.g. margin = 0.2)
        "miner_args": {},  # keyword arguments for the PML miner
    },
    "sampler": {
        "name": "m-per-class",  # m-per-class (class-balanced batches) | random
        "m": 16,  # images per class slot in a batch (m-per-class)
    },
    "train": {
        "epochs": 5,
        "batch_size": 256,
    },
    "optimizer": {
        "name": "adamw",
        "lr": 0.003,  # peak learning rate
        "weight_decay": 0.0001,
        "schedule": "one-cycle",  # one-cycle | cosine | constant
        "warmup": 0.2,  # fraction of the steps spent warming up (one-cycle, cosine)
    },
    "augment": {
        "degrees": 10.0,  # random rotation in [-degrees, degrees]
        "translate": 0.1,  # random shift, fraction of the image size
        "scale": [0.9, 1.1],  # random zoom range
        "shear": 0.0,  # random shear in [-shear, shear] degrees
        "group": 8,  # images sharing one random affine (the transform is applied per group, on the device)
        "elastic": 0.0,  # elastic distortion: smooth random warp of each image by at most this many pixels (0: off)
        "dihedral_classes": False,  # class expansion: each class slot turned by one of the square's 8 symmetries,
        # (class, symmetry) counting as a class of its own (for towers meant to generalise to unseen classes)
        "composite_classes": 0.0,  # class expansion: probability that a class slot is joined half-and-half
        # with another slot's images, (class a, class b, cut) counting as a class of its own (0: off)
    },
}

FREE_TABLES = ("objective.loss_args", "objective.miner_args")
OBJECTIVES = ("multi-similarity", "triplet", "contrastive", "pair")
SAMPLERS = ("m-per-class", "random")
SCHEDULES = ("one-cycle", "cosine", "constant")
OPTIMIZERS = ("adamw",)


def _leaf_keys(tree: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, dict) and dotted not in FREE_TABLES:
            keys += _leaf_keys(v, dotted + ".")
        else:
            keys.append(dotted)
    return keys


VALID_KEYS = _leaf_keys(DEFAULTS)
SECTIONS = [k for k, v in DEFAULTS.items() if isinstance(v, dict)]


def _unknown_key(dotted: str, source: str) -> UsageError:
    candidates = VALID_KEYS + SECTIONS
    close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
    if not close:  # a misspelt leaf in the right section, or a right leaf in the wrong section
        leaf = dotted.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in candidates], n=1, cutoff=0.75)
        close = [k for k in candidates if k.rsplit(".", 1)[-1] == close[0]][:1] if close else []
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UsageError(f"{source}: unknown config key '{dotted}'{hint}")


def _type_name(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string"
    if isinstance(default, list):
        return "a list of numbers" if default and isinstance(default[0], float) else "a list of strings"
    return type(default).__name__


def _coerce(dotted: str, value: Any, default: Any, source: str) -> Any:
    """Check `value` has the type of `default` (ints are accepted for floats, class names may be ints)."""
    bad = UsageError(f"{source}: {dotted} must be {_type_name(default)}, got {value!r}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise bad
        if default and isinstance(default[0], float):
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
                raise bad
            return [float(v) for v in value]
        if any(isinstance(v, (bool, float, list, dict)) for v in value):
            raise bad
        return [str(v) for v in value]
    raise bad  # pragma: no cover


def _merge(base: dict, user: Mapping, source: str, prefix: str = "") -> None:
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise _unknown_key(dotted, source)
        default = base[key]
        if dotted in FREE_TABLES:
            if not isinstance(value, Mapping):
                raise UsageError(f"{source}: {dotted} must be a table of keyword arguments, got {value!r}")
            base[key] = {str(k): v for k, v in value.items()}
        elif isinstance(default, dict):
            if not isinstance(value, Mapping):
                raise UsageError(f"{source}: '{dotted}' is a section ([{dotted}]), got the value {value!r}")
            _merge(default, value, source, dotted + ".")
        else:
            if isinstance(value, Mapping):
                raise UsageError(f"{source}: {dotted} must be {_type_name(default)}, got a table")
            base[key] = _coerce(dotted, value, default, source)


def _parse_literal(text: str) -> Any:
    """A TOML value (number, bool, string, list); anything that does not parse stays a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _parse_override(dotted: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise UsageError(f"--set {dotted}={text}: expected true or false")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"--set {dotted}={text}: expected an integer") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"--set {dotted}={text}: expected a number") from None
    if isinstance(default, str):
        return text
    if isinstance(default, list):
        value = _parse_literal(text) if text.strip().startswith("[") else None
        if not isinstance(value, list):
            value = [v.strip() for v in text.split(",") if v.strip()]
            if default and isinstance(default[0], float):
                try:
                    value = [float(v) for v in value]
                except ValueError:
                    raise UsageError(f"--set {dotted}={text}: expected comma-separated numbers") from None
        return value
    raise UsageError(f"--set {dotted}: cannot override a whole section")  # pragma: no cover


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Apply `key=value` strings (typed by the default's type) to a resolved config, in order."""
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optimizer.lr=0.01")
        dotted, text = (s.strip() for s in item.split("=", 1))
        free = next((t for t in FREE_TABLES if dotted.startswith(t + ".")), None)
        if free:  # a keyword argument for a PML class: any name, value parsed as a TOML literal
            section, key = free.split("."), dotted[len(free) + 1 :]
            config[section[0]][section[1]][key] = _parse_literal(text)
            continue
        if dotted in SECTIONS or dotted in FREE_TABLES:
            example = next((k for k in VALID_KEYS if k.startswith(dotted + ".")), dotted + ".margin")
            raise UsageError(f"--set {dotted}: '{dotted}' is a section; set one of its keys, e.g. {example}=...")
        if dotted not in VALID_KEYS:
            raise _unknown_key(dotted, "--set")
        *path, leaf = dotted.split(".")
        node = config
        for part in path:
            node = node[part]
        node[leaf] = _coerce(dotted, _parse_override(dotted, text, DEFAULTS_LOOKUP[dotted]), DEFAULTS_LOOKUP[dotted], "--set")
    return config


def _lookup(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, dict) and dotted not in FREE_TABLES:
            out.update(_lookup(v, dotted + "."))
        else:
            out[dotted] = v
    return out


DEFAULTS_LOOKUP = _lookup(DEFAULTS)


def validate(config: dict, source: str = "config") -> dict:
    """Range and choice checks that types alone cannot express; returns the config."""

    def fail(key: str, expected: str) -> UsageError:
        value = get(config, key)
        return UsageError(f"{source}: {key} must be {expected}, got {value!r}")

    if get(config, "seed") < 0:
        raise fail("seed", "a non-negative integer")
    for key in ("data.subset", "data.val_size", "tower.embedding_size"):
        if get(config, key) < 0:
            raise fail(key, "a non-negative integer (0: " + ("all images" if key == "data.subset" else
                       "no validation" if key == "data.val_size" else "the tower's default") + ")")
    if not get(config, "data.spec").strip():
        raise fail("data.spec", "a dataset spec such as mnist:train")
    if get(config, "data.spec").strip().lower().endswith(":test"):
        raise fail("data.spec", "a training split (the test split is kept for evaluation)")
    from retrieval.towers import TOWERS

    if get(config, "tower.name") not in TOWERS:
        raise fail("tower.name", "one of " + ", ".join(TOWERS))
    if not 0 <= get(config, "tower.test_shifts") <= 3:
        raise fail("tower.test_shifts", "a shift in pixels between 0 and 3")
    if get(config, "objective.name") not in OBJECTIVES:
        raise fail("objective.name", "one of " + ", ".join(OBJECTIVES))
    if get(config, "sampler.name") not in SAMPLERS:
        raise fail("sampler.name", "one of " + ", ".join(SAMPLERS))
    if get(config, "sampler.m") < 1:
        raise fail("sampler.m", "a positive integer")
    if get(config, "train.epochs") < 1:
        raise fail("train.epochs", "a positive number of epochs")
    if get(config, "train.batch_size") < 2:
        raise fail("train.batch_size", "at least 2")
    if get(config, "sampler.name") == "m-per-class" and get(config, "train.batch_size") % get(config, "sampler.m"):
        raise UsageError(
            f"{source}: train.batch_size ({get(config, 'train.batch_size')}) must be a multiple of sampler.m "
            f"({get(config, 'sampler.m')}) for the m-per-class sampler"
        )
    if get(config, "optimizer.name") not in OPTIMIZERS:
        raise fail("optimizer.name", "one of " + ", ".join(OPTIMIZERS))
    if not get(config, "optimizer.lr") > 0:
        raise fail("optimizer.lr", "a positive number")
    if get(config, "optimizer.weight_decay") < 0:
        raise fail("optimizer.weight_decay", "a non-negative number")
    if get(config, "optimizer.schedule") not in SCHEDULES:
        raise fail("optimizer.schedule", "one of " + ", ".join(SCHEDULES))
    if not 0 < get(config, "optimizer.warmup") < 1:
        raise fail("optimizer.warmup", "a fraction between 0 and 1 (exclusive)")
    for key in ("augment.degrees", "augment.shear"):
        if get(config, key) < 0:
            raise fail(key, "a non-negative angle in degrees")
    if not 0 <= get(config, "augment.translate") < 0.5:
        raise fail("augment.translate", "a fraction in [0, 0.5)")
    scale = get(config, "augment.scale")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise fail("augment.scale", "[low, high] with 0 < low <= high")
    if get(config, "augment.group") < 1:
        raise fail("augment.group", "a positive integer")
    if not 0 <= get(config, "augment.composite_classes") <= 1:
        raise fail("augment.composite_classes", "a probability between 0 and 1")
    if not 0 <= get(config, "augment.elastic") <= 7:
        raise fail("augment.elastic", "a displacement in pixels between 0 and 7")
    return config


def get(config: Mapping, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node


def resolve_config(user: Mapping | None = None, overrides: Iterable[str] = (), source: str = "config",
                   name: str | None = None) -> dict:
    """DEFAULTS <- user dict <- `key=value` overrides, type- and range-checked. `name` fills an empty name."""
    config = copy.deepcopy(DEFAULTS)
    _merge(config, dict(user or {}), source)
    config = apply_overrides(config, overrides)
    if not config["name"]:
        config["name"] = name or "run"
    return validate(config, source)


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


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict:
    """Read a config file, merge it over DEFAULTS, apply overrides; the run name defaults to the file's stem."""
    path = Path(path)
    return resolve_config(read_config_file(path), overrides, source=str(path), name=path.stem)


def config_diff(a: Mapping, b: Mapping) -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    la, lb = _lookup(a), _lookup(b)
    return sorted(k for k in set(la) | set(lb) if la.get(k) != lb.get(k))
