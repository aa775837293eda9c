"""The rows an index build takes, in order, a chunk at a time: images of dataset specs embedded by a tower
(TowerRows over a BuildPlan), or vectors already embedded (ArrayRows). Both give the build the same things: the
rows' classes, labels and sources, each rank's range of chunks, and a chunk's unit vectors with the rows kept."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from retrieval.compute import Compute
from retrieval.data.stream import StreamedDataset
from retrieval.embed import embed_images
from retrieval.embedding_index import as_unit_float32
from retrieval.errors import RetrievalError
from retrieval.index_build_fill import HeldVectors, Spool
from retrieval.items import SourceTable


def chunk_range(rows: int, chunk_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of rank `rank`: a contiguous range of whole chunks."""
    chunks = -(-rows // chunk_size)
    first, last = rank * chunks // world, (rank + 1) * chunks // world
    return min(first * chunk_size, rows), min(last * chunk_size, rows)


@dataclass
class BuildPlan:
    """The rows of the datasets, in order, their labels in the union of the classes, and the chunks."""

    datasets: list[StreamedDataset]
    classes: list[str]  # by name, in order of first appearance (as data.selection.merge_datasets)
    label_maps: list[np.ndarray]  # per dataset: its class ids -> ids in `classes`
    starts: list[int]  # the first row of each dataset
    chunk_size: int

    @classmethod
    def of(cls, datasets: Sequence[StreamedDataset], chunk_size: int) -> "BuildPlan":
        classes: list[str] = []
        maps, starts, start = [], [], 0
        for ds in datasets:
            present = sorted(set(np.unique(ds.labels).tolist()))
            for i in present:
                if ds.classes[i] not in classes:
                    classes.append(ds.classes[i])
            mapping = np.full(len(ds.classes), -1, np.int64)
            for i in present:
                mapping[i] = classes.index(ds.classes[i])
            maps.append(mapping)
            starts.append(start)
            start += len(ds)
        return cls(list(datasets), classes, maps, starts, chunk_size)

    @property
    def rows(self) -> int:
        return self.starts[-1] + len(self.datasets[-1]) if self.datasets else 0

    def chunk_range(self, rank: int, world: int) -> tuple[int, int]:
        """Rows [start, stop) of rank `rank`: a contiguous range of whole chunks."""
        return chunk_range(self.rows, self.chunk_size, rank, world)

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, np.ndarray]:
        """Images of rows [start, stop) that could be read, and their row numbers."""
        images, rows = [], []
        for ds, first in zip(self.datasets, self.starts):
            lo, hi = max(start, first), min(stop, first + len(ds))
            if lo >= hi:
                continue
            imgs, kept = ds.read(lo - first, hi - first)
            images.append(imgs)
            rows.append(np.arange(lo, hi, dtype=np.int64)[kept])
        return torch.cat(images), np.concatenate(rows)

    @property
    def pictures(self) -> bool:
        """Whether some rows are picture files (folder datasets: decoded and preprocessed when read)."""
        return any(ds.paths is not None for ds in self.datasets)

    def labels(self) -> np.ndarray:
        """The label (in `classes`) of every row."""
        return np.concatenate([m[ds.labels] for ds, m in zip(self.datasets, self.label_maps)])

    def sources(self, kept: np.ndarray) -> SourceTable:
        """The sources of the rows `kept` (ascending)."""
        table = SourceTable()
        for ds, first in zip(self.datasets, self.starts):
            mask = np.zeros(len(ds), bool)
            inside = kept[(kept >= first) & (kept < first + len(ds))] - first
            mask[inside] = True
            table.extend_table(ds.source_table(mask))
        return table

    def close(self) -> None:
        for ds in self.datasets:
            ds.close()


class TowerRows:
    """The plan's images, embedded a chunk at a time by `tower` on a pinned Compute (device, batch, precision)."""

    announces = True  # logs its reading and the index's training (a build from dataset specs)

    def __init__(self, plan: BuildPlan, tower, compute: Compute):
        self.plan, self.tower, self.compute = plan, tower, compute
        self.reading = 0.0  # seconds spent reading images (decoding and preprocessing a folder's pictures)

    @property
    def dimension(self) -> int:
        return int(self.tower.embedding_size)

    @property
    def rows(self) -> int:
        return self.plan.rows

    @property
    def chunk_size(self) -> int:
        return self.plan.chunk_size

    @property
    def classes(self) -> list[str]:
        return self.plan.classes

    @property
    def pictures(self) -> bool:
        return self.plan.pictures

    def chunk_range(self, rank: int, world: int) -> tuple[int, int]:
        return self.plan.chunk_range(rank, world)

    def embed(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Unit embeddings of the rows [start, stop) that could be read, and those rows."""
        t_read = time.perf_counter()
        images, kept = self.plan.read(start, stop)
        self.reading += time.perf_counter() - t_read
        x = as_unit_float32(embed_images(self.tower, images, batch_size=self.compute.batch,
                                         device=self.compute.device, precision=self.compute.precision))
        return x, kept

    def spool(self, folder: Path) -> Spool:
        """Where this rank's embeddings wait for the index's training: a temp file."""
        return Spool(folder, "embeddings.f32", self.dimension)

    def labels(self) -> np.ndarray:
        return self.plan.labels()

    def sources(self, kept: np.ndarray) -> SourceTable:
        return self.plan.sources(kept)


class ArrayRows:
    """Vectors already embedded, with their labels (indices into `classes`) and sources: one chunk, one process."""

    announces = False
    pictures = False
    reading = 0.0

    def __init__(self, embeddings, labels, classes: Sequence[str], sources: Sequence[str]):
        x = as_unit_float32(embeddings)
        labels = np.asarray(labels, dtype=np.int64)
        if len(x) == 0:
            raise RetrievalError("no embeddings to index")
        if len(labels) != len(x) or len(sources) != len(x):
            raise ValueError(f"embeddings ({len(x)}), labels ({len(labels)}) and sources ({len(sources)}) differ "
                             "in length")
        if labels.min() < 0 or labels.max() >= len(classes):
            raise ValueError(f"labels must index classes (0..{len(classes) - 1})")
        self.x, self._labels, self.classes, self._sources = x, labels, list(classes), sources

    @property
    def dimension(self) -> int:
        return int(self.x.shape[1])

    @property
    def rows(self) -> int:
        return len(self.x)

    @property
    def chunk_size(self) -> int:
        return len(self.x)

    def chunk_range(self, rank: int, world: int) -> tuple[int, int]:
        return chunk_range(self.rows, self.chunk_size, rank, world)

    def embed(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[start:stop], np.arange(start, stop, dtype=np.int64)

    def spool(self, folder: Path) -> HeldVectors:
        """The vectors wait for the index's training where they are, in memory."""
        return HeldVectors(self.x)

    def labels(self) -> np.ndarray:
        return self._labels

    def sources(self, kept: np.ndarray) -> SourceTable:
        return SourceTable.from_strings(str(self._sources[i]) for i in kept.tolist())
