"""Dataset specs (`mnist:train`, `fashion-mnist:test`, `idx:DIR`, `folder:DIR`) -> an in-memory ImageDataset."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from retrieval.data import SPEC_HELP
from retrieval.data.fetch import (
    DATASETS,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    dataset_dir,
    dataset_files_present,
    fetch_dataset,
)
from retrieval.data import corrupt
from retrieval.data.idx import read_idx_pair
from retrieval.data.preprocess import IMAGE_EXTENSIONS, PREPROCESSING, load_image_files
from retrieval.errors import RetrievalError, UsageError

logger = logging.getLogger(__name__)



def default_data_root() -> Path:
    """$RETRIEVAL_DATA_ROOT, else $XDG_CACHE_HOME/retrieval/data, else ~/.cache/retrieval/data."""
    if os.environ.get("RETRIEVAL_DATA_ROOT"):
        return Path(os.environ["RETRIEVAL_DATA_ROOT"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "retrieval" / "data"


def data_root(root: str | os.PathLike | None) -> Path:
    """`root` as a path, or the default data root when none is given."""
    return Path(root) if root is not None else default_data_root()


@dataclass
class ImageDataset:
    """uint8 images (N, 28, 28), int64 labels indexing `classes`, and where each image came from."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    sources: list[str]
    spec: str
    preprocessing: str = "none (MNIST-format IDX)"
    filters: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def label_names(self) -> list[str]:
        return [self.classes[i] for i in self.labels.tolist()]

    def select(self, positions: Sequence[int] | torch.Tensor) -> "ImageDataset":
        pos = torch.as_tensor(positions, dtype=torch.long)
        return ImageDataset(
            images=self.images[pos],
            labels=self.labels[pos],
            classes=self.classes,
            sources=[self.sources[i] for i in pos.tolist()],
            spec=self.spec,
            preprocessing=self.preprocessing,
            filters=dict(self.filters),
        )

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return {name: n for name, n in zip(self.classes, counts) if n > 0}

    def describe(self) -> dict:
        x = self.images.float() / 255.0
        return {
            "spec": self.spec,
            "filters": self.filters,
            "images": len(self),
            "image_size": list(self.images.shape[1:]),
            "classes": len(self.class_counts()),
            "per_class": self.class_counts(),
            "pixel_mean": round(float(x.mean()), 6) if len(self) else None,
            "pixel_std": round(float(x.std()), 6) if len(self) > 1 else None,
        }


def split_spec(spec: str) -> tuple[str, str]:
    if ":" not in spec:
        raise UsageError(f"dataset spec {spec!r} has no kind; expected {SPEC_HELP}")
    kind, rest = spec.split(":", 1)
    return kind.strip().lower(), rest


@dataclass(frozen=True)
class IdxSource:
    """Where the images of an IDX-backed spec (a built-in dataset, `idx:DIR`, `mnist-c:SPLIT/NAME`) live: the IDX
    file pair, the class names (None: the labels' numbers) and the prefix of its items' sources."""

    images: Path
    labels: Path
    classes: list[str] | None
    prefix: str


def idx_source(kind: str, rest: str, root: Path, fetch: bool) -> IdxSource | None:
    """The IdxSource of spec `kind:rest` (built-in datasets fetched, corrupted sets made, when missing), or None when
    the spec is not IDX-backed. load_dataset reads the pair whole, open_dataset at the positions asked for."""
    if kind in DATASETS:
        split = rest.strip().lower()
        if split not in ("train", "test"):
            base = split.split("[", 1)[0]
            if "[" in split and base in ("train", "test"):  # one image of a split, where a dataset is expected
                raise UsageError(f"dataset spec {kind}:{split}: one image ([...]) is not a dataset here; "
                                 f"use {kind}:{base} (picking an image by position works in query and classify)")
            raise UsageError(f"dataset spec {kind}:{split}: split must be 'train' or 'test'")
        if not dataset_files_present(kind, root):
            if not fetch:
                raise RetrievalError(f"{kind} is not in {root}; run `retrieval data fetch {kind}`")
            logger.info(f"{kind} not found in {root}; fetching it")
            fetch_dataset(kind, root)
        folder = dataset_dir(root, kind)
        images, labels = ((TRAIN_IMAGES, TRAIN_LABELS) if split == "train" else (TEST_IMAGES, TEST_LABELS))
        return IdxSource(folder / images, folder / labels, list(DATASETS[kind].classes), f"{kind}:{split}")
    if kind == "idx":
        images, labels = idx_pair(Path(rest).expanduser())
        return IdxSource(images, labels, None, f"idx:{rest}")
    if kind == corrupt.KIND:  # mnist-c:test/fog: MNIST with a corruption, made once and cached in the root
        split, name = corrupt.parse_spec(rest)
        folder = corrupt.ensure_corrupted(rest, root, fetch)
        return IdxSource(folder / corrupt.IMAGES, folder / corrupt.LABELS, list(DATASETS["mnist"].classes),
                         f"{corrupt.KIND}:{split}/{name}")
    return None


def numbered_classes(labels: np.ndarray) -> list[str]:
    """Class names of a dataset without names: "0".."max label"."""
    return [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]


_IDX_IMAGES = re.compile(r"(.*)idx3-ubyte(\.gz)?$")


def idx_pair(folder: Path) -> tuple[Path, Path]:
    """The one (images, labels) IDX file pair of an `idx:DIR` folder."""
    if not folder.is_dir():
        raise RetrievalError(f"idx:{folder}: folder not found")
    pairs = []
    for img in sorted(folder.iterdir()):
        m = _IDX_IMAGES.match(img.name)
        if not m:
            continue
        prefix = m.group(1)
        stem = prefix[: -len("images-")] if prefix.endswith("images-") else prefix
        candidates = [p for p in folder.iterdir() if re.match(re.escape(stem) + r"(labels-)?idx1-ubyte(\.gz)?$", p.name)]
        if candidates:
            pairs.append((img, sorted(candidates)[0]))
    if len(pairs) != 1:
        found = ", ".join(p[0].name for p in pairs) or "none"
        raise RetrievalError(
            f"idx:{folder}: expected exactly one pair of *idx3-ubyte[.gz] / *idx1-ubyte[.gz] files, found {found}"
        )
    return pairs[0]


def filters_text(filters: dict) -> str:
    """A selection's filters as people read them: "classes 3,5, subset 20, seed 1"."""
    return ", ".join(f"{key} {','.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"
                     for key, value in filters.items())


def class_sort_key(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _load_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    if not folder.is_dir():
        raise RetrievalError(f"folder:{folder}: folder not found")
    class_dirs = sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")),
                        key=lambda d: class_sort_key(d.name))
    if not class_dirs:
        raise RetrievalError(f"folder:{folder}: no class sub-folders; expected {folder}/<label>/*.png")
    classes = [d.name for d in class_dirs]
    paths, path_labels, skipped = [], [], []
    for label, d in enumerate(class_dirs):
        for path in sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append(f"{path} (not an image extension)")
                continue
            paths.append(path)
            path_labels.append(label)
    images, labels, sources = [], [], []
    for path, label, image in zip(paths, path_labels, load_image_files(paths)):  # decoded in parallel
        if isinstance(image, RetrievalError):
            skipped.append(str(image))
            continue
        images.append(image)
        labels.append(label)
        sources.append(str(path))
    for msg in skipped:
        logger.warning(f"skipped {msg}")
    if not images:
        raise RetrievalError(f"folder:{folder}: no readable images in {len(classes)} class folder(s)")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), classes, sources


def _as_name_list(values) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    return [str(v).strip() for v in values]


def class_indices(names: Sequence[str], wanted: Sequence[str], spec: str, option: str) -> list[int]:
    """The label numbers of class names `wanted` among a dataset's `names`; a UsageError naming `option` when some
    are not there."""
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise UsageError(f"{option}: {', '.join(unknown)} not among the classes of {spec} ({', '.join(names)})")
    return [list(names).index(c) for c in wanted]


def select_rows(labels: np.ndarray, names: Sequence[str], spec: str, classes=None, exclude=None,
                subset: int | None = None, seed: int = 0) -> tuple[np.ndarray, dict]:
    """The rows (ascending positions) a dataset keeps: classes kept / excluded by name, then a seeded subset of
    `subset` rows; and the filters that record it. Shared by load_dataset and the streamed open_dataset, so both
    select the very same images."""
    keep, drop = _as_name_list(classes), _as_name_list(exclude)
    mask = np.ones(len(labels), bool)
    for option, wanted in (("classes", keep), ("exclude", drop)):
        if wanted is None:
            continue
        hit = np.isin(labels, class_indices(names, wanted, spec, f"`{option}`"))
        mask &= hit if option == "classes" else ~hit
    filters = {}
    if keep is not None:
        filters["classes"] = keep
    if drop is not None:
        filters["exclude"] = drop
    rows = np.flatnonzero(mask).astype(np.int64)
    if subset is not None:
        if subset <= 0:
            raise UsageError(f"`subset` must be a positive number of images, got {subset}")
        if subset < len(rows):
            g = torch.Generator().manual_seed(seed)
            rows = rows[torch.randperm(len(rows), generator=g)[:subset].sort().values.numpy()]
        filters.update(subset=subset, seed=seed)
    if len(rows) == 0:
        raise RetrievalError(f"{spec}: no images left after filtering ({filters_text(filters)})")
    return rows, filters


def load_dataset(
    spec: str,
    root: str | os.PathLike | None = None,
    classes: Sequence[str | int] | str | None = None,
    exclude: Sequence[str | int] | str | None = None,
    subset: int | None = None,
    seed: int = 0,
    fetch: bool = True,
) -> ImageDataset:
    """Load the images a spec names, keep/exclude classes (by name), then take a seeded subset of `subset` images."""
    root = data_root(root)
    kind, rest = split_spec(spec)
    preprocessing = "none (MNIST-format IDX)"
    source = idx_source(kind, rest, root, fetch)
    if source is not None:
        images, labels = read_idx_pair(source.images, source.labels)
        names = source.classes or numbered_classes(labels)
        images, labels = torch.from_numpy(images), torch.from_numpy(labels)
        sources = [f"{source.prefix}[{i}]" for i in range(len(labels))]
    elif kind == "folder":
        images, labels, names, sources = _load_folder(Path(rest).expanduser())
        preprocessing = PREPROCESSING
    else:
        raise UsageError(f"unknown dataset spec {spec!r}; expected {SPEC_HELP}")
    ds = ImageDataset(images, labels, names, sources, spec, preprocessing)

    rows, filters = select_rows(ds.labels.numpy(), names, spec, classes, exclude, subset, seed)
    if len(rows) < len(ds):
        ds = ds.select(torch.from_numpy(rows))
    ds.filters = filters
    return ds


_ITEM = re.compile(r"^(?P<spec>[a-z-]+:.+)\[(?P<pos>\d+)\]$")


def parse_item_spec(text: str) -> tuple[str, int] | None:
    """`mnist:test[123]` -> ("mnist:test", 123); anything else -> None."""
    m = _ITEM.match(text)
    if not m:
        return None
    kind = m.group("spec").split(":", 1)[0]
    if kind not in DATASETS and kind not in ("idx", corrupt.KIND):
        return None
    return m.group("spec"), int(m.group("pos"))


class DatasetCache:
    """Loads each dataset spec once (queries and grids often name many items of one dataset)."""

    def __init__(self, root=None):
        self.root = root
        self._cache: dict[str, ImageDataset] = {}

    def get(self, spec: str) -> ImageDataset:
        if spec not in self._cache:
            self._cache[spec] = load_dataset(spec, root=self.root)
        return self._cache[spec]

    def item(self, spec: str, position: int):
        """(uint8 image, class name) of `spec[position]`."""
        ds = self.get(spec)
        if not 0 <= position < len(ds):
            raise RetrievalError(f"{spec}[{position}]: position out of range ({spec} has {len(ds):,} images)")
        return ds.images[position], ds.classes[int(ds.labels[position])]
