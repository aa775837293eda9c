"""The in-memory index: a Faiss index of unit embeddings with stable int64 ids, a label and a source per id, and
its metadata (what retrieval.index_folder writes to meta.json). Built by retrieval.index_build, saved and loaded by
retrieval.index_folder.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

import retrieval
from retrieval.errors import RetrievalError, UsageError
from retrieval.faiss_tools import (
    add_with_ids, apply_search_params, faiss_search, lists_on_disk, lists_to_memory, omp_threads, search_parameters,
)
from retrieval.items import SourceTable
from retrieval.knn import PositionLookup

FORMAT = "retrieval-index/1"
# Keys that describe the stored files; update_index_meta must not change them.
STRUCTURAL_KEYS = ("format", "files", "factory", "metric", "dimension", "count", "next_id", "classes")

_IDMAP_PREFIX = re.compile(r"^\s*IDMap2?\s*,\s*", re.IGNORECASE)


def now() -> str:
    """The current UTC time, to the second, as the metadata records it."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def normalize_factory(factory: str) -> str:
    """Drop an 'IDMap,'/'IDMap2,' prefix (ids are always kept) and surrounding blanks."""
    text = _IDMAP_PREFIX.sub("", factory or "").strip()
    if not text:
        raise UsageError("`factory`: empty Faiss factory string; expected e.g. Flat, HNSW32, IVF256,Flat, IVF256,PQ16")
    return text


def as_unit_float32(x, what: str = "embeddings") -> np.ndarray:
    """A C-contiguous float32 copy of `x` (n, d), checked finite, each row scaled to unit length."""
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    if x.ndim != 2:
        raise RetrievalError(f"{what} must be a 2-d array (n, d), got shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise RetrievalError(f"{what} contain NaN or infinite values")
    faiss.normalize_L2(x)  # the distance contract assumes unit vectors (the towers already emit them)
    return x


class EmbeddingIndex:
    """A Faiss index of unit embeddings with stable ids, a label and a source per id, and its metadata.

    `search` returns Euclidean distances between unit vectors for both metrics (ip: sqrt(2 - 2 cos)), ascending;
    slots past the end of the index hold id -1 and distance inf.
    """

    def __init__(self, index: faiss.Index, meta: dict, ids: np.ndarray, labels: np.ndarray,
                 sources: Sequence[str] | SourceTable):
        self.index = index
        self.meta = meta
        self.ids = np.asarray(ids, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sources = sources if isinstance(sources, SourceTable) else SourceTable.from_strings(sources)
        self.folder: Path | None = None  # where it was loaded from or last saved to
        self.lists_file: Path | None = None  # the on-disk inverted lists file the index maps, as it is there
        self._pos = None  # PositionLookup of self.ids, built on first use
        self._gpu = self._device = None  # a GPU copy searched instead of .index (use_device); the device asked for

    # -- description -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dimension(self) -> int:
        return int(self.index.d)

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def metric(self) -> str:
        return self.meta["metric"]

    def label_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes)) if len(self.labels) else np.zeros(0, int)
        return {self.classes[i]: int(n) for i, n in enumerate(counts) if n > 0}

    def positions_of(self, ids) -> np.ndarray:
        """Positions in .ids/.labels/.sources of `ids` (-1 for -1 or unknown ids)."""
        if self._pos is None:
            self._pos = PositionLookup(self.ids)
        return self._pos(ids)

    def labels_of(self, ids) -> np.ndarray:
        """int64 labels (indices into .classes) of `ids`; -1 where the id is -1."""
        pos = self.positions_of(ids)
        return np.where(pos >= 0, self.labels[np.maximum(pos, 0)] if len(self.labels) else -1, -1).astype(np.int64)

    def sources_of(self, ids) -> list:
        pos = self.positions_of(ids)
        return [self.sources[p] if p >= 0 else None for p in pos.ravel().tolist()]

    # -- search --------------------------------------------------------------------------------------------------
    def search(self, queries, k: int, params: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 (n, d) -> (distances float32 (n, k) ascending, ids int64 (n, k)).

        `params`: search parameters for this search only (e.g. "nprobe=64"; see search_parameters), instead of
        the index's own (meta["search_params"])."""
        k = int(k)
        if k <= 0:
            raise UsageError(f"k must be a positive number of neighbours, got {k}")
        q = as_unit_float32(queries, "query embeddings")
        if q.shape[1] != self.dimension:
            raise RetrievalError(
                f"query embeddings have dimension {q.shape[1]} but the index holds {self.dimension}-d vectors "
                "(a different tower?)"
            )
        sp, _keep = search_parameters(self.index, params) if params else (None, [])
        searched = self._gpu if self._gpu is not None and sp is None else self.index
        if len(q) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        if len(q) < faiss.omp_get_max_threads():
            # Faiss parallelises over queries: a lone query gains nothing from a thread team, and on a busy
            # machine waking one costs more than the search (measured in benchmarks/index.py).
            with omp_threads(1):
                scores, ids = faiss_search(searched, q, k, sp)
        else:
            scores, ids = faiss_search(searched, q, k, sp)
        scores = np.where(ids >= 0, scores, 0.0)  # Faiss pads with -1 ids and +-FLT_MAX scores
        if self.metric == "ip":
            dist = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * scores))
        else:
            dist = np.sqrt(np.maximum(0.0, scores))
        dist = dist.astype(np.float32)
        dist[ids < 0] = np.inf
        if k > 1 and (dist[:, 1:] < dist[:, :-1]).any():
            # Approximate indexes may return near-ties out of order after the conversion; keep the contract.
            order = np.argsort(dist, axis=1, kind="stable")
            dist, ids = np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)
        return dist, ids.astype(np.int64, copy=False)

    def use_device(self, device) -> bool:
        """Search on `device` from now on: a GPU copy of the Faiss index when the device is CUDA and Faiss has
        GPU support (faiss_gpu), else the CPU index. Per-search parameters (`params`) search the CPU index.
        Returns whether searches run on a GPU."""
        from retrieval.faiss_gpu import to_search_device

        self._gpu = to_search_device(self.index, device)
        self._device = device
        return self._gpu is not None

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    @property
    def search_device(self):
        """The device last given to use_device (None: never asked; searches run on the CPU unless on_gpu)."""
        return self._device

    def _refresh_gpu_copy(self) -> None:
        if self._gpu is not None:  # the copy holds the vectors and settings of when it was made
            self.use_device(self._device)

    def flat_vectors(self) -> np.ndarray | None:
        """The stored vectors of an exact (Flat) index, in the order of .ids; None for approximate indexes (their
        search is what their users get, so that is what gets evaluated)."""
        inner = faiss.downcast_index(self.index.index) if hasattr(self.index, "index") else None
        if isinstance(inner, faiss.IndexFlat) and inner.ntotal == len(self.ids):
            return inner.reconstruct_n(0, inner.ntotal)
        return None

    def set_search_params(self, params: str) -> None:
        """Faiss ParameterSpace settings, e.g. "nprobe=16" or "efSearch=128"; recorded in the metadata."""
        apply_search_params(self.index, params)
        self.meta["search_params"] = params
        self._refresh_gpu_copy()

    # -- growth --------------------------------------------------------------------------------------------------
    def add(self, embeddings, labels, classes: Sequence[str], sources: Sequence[str], data: Sequence[dict] = ()) -> np.ndarray:
        """Append vectors with fresh ids. `labels` index `classes` (the new data's class names): they are mapped
        to this index's classes by name, new names are appended. `data` entries (spec, filters, ...) are recorded
        in meta["data"] with the new id range. Returns the new ids."""
        x = as_unit_float32(embeddings)
        if x.shape[1] != self.dimension:
            raise RetrievalError(f"embeddings have dimension {x.shape[1]} but the index holds {self.dimension}-d vectors")
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(x) or len(sources) != len(x):
            raise ValueError("embeddings, labels and sources must have the same length")
        mapping = np.array([self._class_id(c) for c in classes], dtype=np.int64)
        new_labels = mapping[labels] if len(labels) else labels
        start = int(self.meta.get("next_id", int(self.ids.max()) + 1 if len(self.ids) else 0))
        new_ids = np.arange(start, start + len(x), dtype=np.int64)
        if lists_on_disk(self.index):  # the mapped file belongs to the committed index: add to a copy in memory
            lists_to_memory(self.index)
            self.lists_file = None
        add_with_ids(self.index, x, new_ids)
        self.ids = np.concatenate([self.ids, new_ids])
        self.labels = np.concatenate([self.labels, new_labels])
        self.sources.extend(str(s) for s in sources)
        self._pos = None
        self._refresh_gpu_copy()
        self.meta["count"] = len(self)
        self.meta["next_id"] = start + len(x)
        self.meta["updated"] = now()
        for entry in data:
            self.meta.setdefault("data", []).append({**entry, "ids": [int(start), int(start + len(x) - 1)]})
        return new_ids

    def _class_id(self, name: str) -> int:
        name = str(name)
        if name not in self.meta["classes"]:
            self.meta["classes"].append(name)
        return self.meta["classes"].index(name)


def new_index_meta(factory: str, metric: str, dimension: int, count: int, next_id: int, classes: Sequence[str],
                   search_params: str, seed: int, trained_on: int | None, **meta) -> dict:
    """The metadata of a freshly built index (extra keyword arguments: tower, data, preprocessing, ...)."""
    full_meta = {
        "format": FORMAT,
        "factory": factory,
        "metric": metric,
        "dimension": int(dimension),
        "count": int(count),
        "next_id": int(next_id),
        "classes": [str(c) for c in classes],
        "search_params": search_params,
        "seed": int(seed),
        **({"train_size": int(trained_on)} if trained_on is not None else {}),
        "created": now(),
        "tool_version": retrieval.__version__,
        "faiss_version": faiss.__version__,
    }
    for key, value in meta.items():
        if key in STRUCTURAL_KEYS:
            raise ValueError(f"metadata key {key!r} is set by build_index")
        full_meta[key] = value
    return full_meta


def class_prototypes(embeddings: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
    """One unit vector per class present: the re-normalised mean embedding. Returns (vectors, labels, sources)."""
    labels = np.asarray(labels, np.int64)
    sums = np.zeros((len(classes), embeddings.shape[1]), np.float64)
    np.add.at(sums, labels, embeddings)
    return prototypes_from_sums(sums, np.bincount(labels, minlength=len(classes)), classes)


def prototypes_from_sums(sums: np.ndarray, counts: np.ndarray, classes: Sequence[str]):
    """class_prototypes from per-class sums (float64 (classes, d)) and counts of embeddings (e.g. accumulated a
    chunk at a time). Returns (vectors, labels, sources) of the classes present."""
    present = np.flatnonzero(np.asarray(counts) > 0)
    vectors = (sums[present] / np.asarray(counts)[present, None]).astype(np.float32)
    faiss.normalize_L2(vectors)
    sources = [f"prototype:{classes[c]} ({int(counts[c])} image{'s' if counts[c] != 1 else ''})" for c in present]
    return vectors, present.astype(np.int64), sources
