"""Dataset specs read in chunks: what `load_dataset` selects (the same classes, exclusions and seeded subset, in
the same order, with the same sources), but only the labels and where each image lives are held in memory; the
images are read a chunk at a time, so indexing millions of images needs memory for one chunk, not for all.

    ds = open_dataset("mnist:train", root)           # or idx:DIR, folder:DIR; classes=, exclude=, subset=, seed=
    len(ds), ds.labels, ds.classes
    images, kept = ds.read(0, 4096)                  # uint8 (k, 28, 28) of rows 0..4095 that could be read
    ds.source_table()                                # the rows' sources, compact (retrieval.items.SourceTable)

IDX files (MNIST's, or an `idx:DIR` pair) are read at the positions asked for: uncompressed files by seeking,
gzipped ones by decompressing forward. Folder images are decoded when their chunk is read; one that cannot be
decoded is skipped with a warning (`kept` is False for it), where `load_dataset` drops it before anything else
(so with unreadable files, `subset` picks among the files listed rather than among the readable ones).
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from retrieval.data.idx import read_idx
from retrieval.data.preprocess import IMAGE_EXTENSIONS, PREPROCESSING, load_image_files
from retrieval.data.specs import (
    class_sort_key, split_spec, data_root, idx_source, numbered_classes, select_rows,
)
from retrieval.data import SPEC_HELP
from retrieval.errors import RetrievalError, UsageError
from retrieval.items import SourceTable

logger = logging.getLogger(__name__)

_UBYTE = 0x08


class IdxImages:
    """The images of an IDX file (N, H, W), read at given positions without loading the rest."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.gz = _is_gzip(self.path)
        self._file = None
        with self._open() as f:
            head = f.read(4)
            if len(head) < 4 or head[0] or head[1] or head[2] != _UBYTE or head[3] != 3:
                raise RetrievalError(f"{self.path} is not an IDX file of unsigned bytes holding images "
                                     f"(magic {head.hex()}, expected 00000803)")
            dims = f.read(12)
            if len(dims) < 12:
                raise RetrievalError(f"{self.path} is truncated inside its header")
        self.count, self.height, self.width = struct.unpack(">3I", dims)
        self.header = 16
        self.item_bytes = self.height * self.width
        expected = self.header + self.count * self.item_bytes
        size = self._data_size()
        if size is not None and size != expected:
            state = "truncated" if size < expected else "longer than its header says"
            raise RetrievalError(f"{self.path} is {state}: header {[self.count, self.height, self.width]} needs "
                                 f"{expected - self.header} bytes of data, found {size - self.header}")

    def _open(self):
        return gzip.open(self.path, "rb") if self.gz else open(self.path, "rb")

    def _data_size(self) -> int | None:
        """Bytes of IDX data: the file size, or for gzip the size its trailer records (modulo 2**32)."""
        if not self.gz:
            return self.path.stat().st_size
        with open(self.path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            recorded = struct.unpack("<I", f.read(4))[0]
        expected = self.header + self.count * self.item_bytes
        return expected if recorded == expected % (1 << 32) else recorded

    def read(self, positions: np.ndarray) -> np.ndarray:
        """uint8 (len(positions), H, W) at ascending `positions`."""
        positions = np.asarray(positions, np.int64)
        out = np.empty((len(positions), self.height, self.width), np.uint8)
        if not len(positions):
            return out
        if self._file is None:
            self._file = self._open()
        f = self._file
        first, last = int(positions[0]), int(positions[-1])
        if self.gz and f.tell() > self.header + first * self.item_bytes:
            f.seek(0)  # gzip seeks backwards by starting over
        if last - first + 1 <= 4 * len(positions) + 64:  # dense: one read of the span
            f.seek(self.header + first * self.item_bytes)
            span = f.read((last - first + 1) * self.item_bytes)
            if len(span) != (last - first + 1) * self.item_bytes:
                raise RetrievalError(f"{self.path} is truncated: images {first}..{last} are not all there")
            block = np.frombuffer(span, np.uint8).reshape(-1, self.height, self.width)
            out[:] = block[positions - first]
            return out
        for i, p in enumerate(positions.tolist()):
            f.seek(self.header + p * self.item_bytes)
            data = f.read(self.item_bytes)
            if len(data) != self.item_bytes:
                raise RetrievalError(f"{self.path} is truncated: image {p} is not all there")
            out[i] = np.frombuffer(data, np.uint8).reshape(self.height, self.width)
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except FileNotFoundError:
        raise RetrievalError(f"IDX file not found: {path}") from None
    except OSError as e:
        raise RetrievalError(f"cannot read IDX file {path}: {e.strerror or e}") from None


@dataclass
class StreamedDataset:
    """A dataset spec's selection, its images read on demand (see the module docstring)."""

    spec: str
    classes: list[str]
    labels: np.ndarray  # int64 (n,), indices into classes
    rows: np.ndarray  # int64 (n,): each item's position in its IDX file or folder listing
    preprocessing: str
    filters: dict = field(default_factory=dict)
    prefix: str | None = None  # sources are f"{prefix}[{row}]" (IDX datasets)
    paths: list[str] | None = None  # folder datasets: the file of each listing position
    idx: IdxImages | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes)).tolist()
        return {name: n for name, n in zip(self.classes, counts) if n > 0}

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, np.ndarray]:
        """Rows [start, stop): (uint8 images of the rows that could be read, bool mask of those rows)."""
        rows = self.rows[start:stop]
        if self.idx is not None:
            return torch.from_numpy(self.idx.read(rows)), np.ones(len(rows), bool)
        images, kept = [], np.zeros(len(rows), bool)
        for i, image in enumerate(load_image_files([self.paths[r] for r in rows.tolist()])):  # in parallel
            if isinstance(image, RetrievalError):
                logger.warning(f"skipped {image}")
            else:
                images.append(image)
                kept[i] = True
        if not images:
            return torch.zeros((0, 28, 28), dtype=torch.uint8), kept
        return torch.stack(images), kept

    def source_table(self, mask: np.ndarray | None = None) -> SourceTable:
        """Sources of the rows (those where `mask` is true)."""
        rows = self.rows if mask is None else self.rows[mask]
        if self.prefix is not None:
            return SourceTable.indexed(self.prefix, rows)
        return SourceTable.from_strings(self.paths[r] for r in rows.tolist())

    def sources(self, start: int, stop: int) -> list[str]:
        return [f"{self.prefix}[{r}]" if self.prefix is not None else self.paths[r]
                for r in self.rows[start:stop].tolist()]

    def close(self) -> None:
        if self.idx is not None:
            self.idx.close()


def _list_folder(folder: Path) -> tuple[list[str], list[str], np.ndarray]:
    """classes, image paths and their labels of folder:DIR, listed as load_dataset lists them (nothing decoded)."""
    if not folder.is_dir():
        raise RetrievalError(f"folder:{folder}: folder not found")
    class_dirs = sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")),
                        key=lambda d: class_sort_key(d.name))
    if not class_dirs:
        raise RetrievalError(f"folder:{folder}: no class sub-folders; expected {folder}/<label>/*.png")
    classes = [d.name for d in class_dirs]
    paths, labels = [], []
    for label, d in enumerate(class_dirs):
        for path in sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                logger.warning(f"skipped {path} (not an image extension)")
                continue
            paths.append(str(path))
            labels.append(label)
    if not paths:
        raise RetrievalError(f"folder:{folder}: no image files in {len(classes)} class folder(s)")
    return classes, paths, np.asarray(labels, np.int64)


def open_dataset(
    spec: str,
    root: str | os.PathLike | None = None,
    classes: Sequence[str | int] | str | None = None,
    exclude: Sequence[str | int] | str | None = None,
    subset: int | None = None,
    seed: int = 0,
    fetch: bool = True,
) -> StreamedDataset:
    """The selection load_dataset(spec, ...) makes, with the images left where they are."""
    root = data_root(root)
    kind, rest = split_spec(spec)
    idx = paths = prefix = None
    preprocessing = "none (MNIST-format IDX)"
    source = idx_source(kind, rest, root, fetch)
    if source is not None:
        idx = IdxImages(source.images)
        labels = read_idx(source.labels, expect_ndim=1).astype(np.int64)
        if idx.count != len(labels):
            raise RetrievalError(f"{source.images} holds {idx.count} images but {source.labels} holds "
                                 f"{len(labels)} labels")
        names, prefix = source.classes or numbered_classes(labels), source.prefix
    elif kind == "folder":
        names, paths, labels = _list_folder(Path(rest).expanduser())
        preprocessing = PREPROCESSING
    else:
        raise UsageError(f"unknown dataset spec {spec!r}; expected {SPEC_HELP}")
    rows, filters = select_rows(labels, names, spec, classes, exclude, subset, seed)
    labels = labels[rows]
    return StreamedDataset(spec, names, labels, rows, preprocessing, filters, prefix, paths, idx)
