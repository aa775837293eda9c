"""Embeddings -> a Faiss index with stable int64 ids, labels and sources, saved to a folder with its metadata.

An index folder holds three artifacts named by `meta.json`:

    meta.json               factory, metric, dimension, count, classes, tower, data, files, checksums, ...
    index-<token>.faiss     the Faiss index (always an IndexIDMap2, so ids survive appends)
    items-<token>.json      per id: label (index into meta["classes"]) and source ("mnist:train[12]", a path, ...)

Saving writes the two data files under fresh names, then atomically replaces meta.json (the commit point), then
deletes the files the old meta.json named. A crash at any moment leaves either the old or the new index whole.
Writers hold `retrieval.fsutil.exclusive_lock(folder)`, so two builds into one folder never interleave.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

import retrieval
from retrieval.checkpoint import load_checkpoint
from retrieval.errors import RetrievalError, UsageError
from retrieval.fsutil import atomic_path, atomic_write_json, exclusive_lock, read_json
from retrieval.knn import PositionLookup

FORMAT = "retrieval-index/1"
META_NAME = "meta.json"
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
# Faiss k-means wants about this many training points per centroid (it warns below it).
POINTS_PER_CENTROID = 39
# Keys that describe the stored files; update_index_meta must not change them.
STRUCTURAL_KEYS = ("format", "files", "factory", "metric", "dimension", "count", "next_id", "classes")

_IDMAP_PREFIX = re.compile(r"^\s*IDMap2?\s*,\s*", re.IGNORECASE)
_OWN_FILE = re.compile(r"^(index-[0-9a-f]+\.faiss|items-[0-9a-f]+\.json|\.(index-[0-9a-f]+\.faiss|items-[0-9a-f]+\.json|meta\.json)\..*\.tmp)$")


logger = logging.getLogger(__name__)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def normalize_factory(factory: str) -> str:
    """Drop an 'IDMap,'/'IDMap2,' prefix (ids are always kept) and surrounding blanks."""
    text = _IDMAP_PREFIX.sub("", factory or "").strip()
    if not text:
        raise UsageError("`factory`: empty Faiss factory string; expected e.g. Flat, HNSW32, IVF256,Flat, IVF256,PQ16")
    return text


def metric_code(metric: str) -> int:
    """The Faiss metric constant of "ip" or "l2"."""
    if metric not in METRICS:
        raise UsageError(f"`metric`: unknown metric {metric!r}; expected one of: {', '.join(METRICS)}")
    return METRICS[metric]


def _as_unit_float32(x, what: str = "embeddings") -> np.ndarray:
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    if x.ndim != 2:
        raise RetrievalError(f"{what} must be a 2-d array (n, d), got shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise RetrievalError(f"{what} contain NaN or infinite values")
    faiss.normalize_L2(x)  # the distance contract assumes unit vectors (the towers already emit them)
    return x


def _unwrapped(index: faiss.Index) -> list[faiss.Index]:
    """The index and the indexes it wraps (pre-transforms, id maps), outermost first."""
    chain = [faiss.downcast_index(index)]
    while isinstance(chain[-1], (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexRefine)):
        inner = chain[-1].base_index if isinstance(chain[-1], faiss.IndexRefine) else chain[-1].index
        chain.append(faiss.downcast_index(inner))
    return chain


def _trainable_parts(index: faiss.Index):
    """(description, number of centroids, ClusteringParameters) for each k-means an index runs when trained."""
    inner = _unwrapped(index)[-1]
    parts = []
    if isinstance(inner, faiss.IndexIVF):
        parts.append(("inverted lists", int(inner.nlist), inner.cp))
    pq = getattr(inner, "pq", None)
    if isinstance(pq, faiss.ProductQuantizer):
        parts.append((f"PQ codebooks ({pq.M} x {pq.ksub} centroids)", int(pq.ksub), pq.cp))
    return parts


def _train(index: faiss.Index, factory: str, x: np.ndarray, seed: int) -> None:
    n = len(x)
    for what, k, cp in _trainable_parts(index):
        if n < k:
            suggestion = f"IVF{max(1, n // POINTS_PER_CENTROID)}" if what == "inverted lists" else "fewer bits (e.g. PQ16x4)"
            raise RetrievalError(
                f"factory {factory!r} needs at least {k:,} training vectors for its {what}, got {n:,}; "
                f"use a smaller index ({suggestion}) or Flat"
            )
        if n < POINTS_PER_CENTROID * k:
            logger.warning(
                f"factory {factory!r}: {n:,} training vectors for {k:,} centroids ({what}); Faiss wants "
                f"about {POINTS_PER_CENTROID} per centroid ({POINTS_PER_CENTROID * k:,}), so clustering will be poor"
            )
        cp.seed = int(seed)
        cp.min_points_per_centroid = 1  # we warned above, once, instead of Faiss once per sub-quantizer
    for part in _unwrapped(index):
        if getattr(part, "do_polysemous_training", False):
            # Polysemous codes only serve Hamming-filtered search, which we never enable; training them is
            # slow (simulated annealing: seconds even for a few hundred vectors).
            part.do_polysemous_training = False
    if not index.is_trained:
        index.train(x)


def _is_hnsw(index: faiss.Index) -> bool:
    inner = _unwrapped(index)[-1]
    return isinstance(inner, faiss.IndexHNSW) or (
        isinstance(inner, faiss.IndexIVF) and isinstance(faiss.downcast_index(inner.quantizer), faiss.IndexHNSW)
    )


def default_search_params(index: faiss.Index) -> str:
    """Sensible query-time settings: probe 1/16 of IVF lists (at least 8), HNSW efSearch 64, and re-rank 4k
    candidates exactly for a refined index (",RFlat")."""
    chain = _unwrapped(index)
    inner, params = chain[-1], []
    if isinstance(inner, faiss.IndexIVF):
        params.append(f"nprobe={min(int(inner.nlist), max(8, int(inner.nlist) // 16))}")
    elif isinstance(inner, faiss.IndexHNSW):
        params.append("efSearch=64")
    if any(isinstance(part, faiss.IndexRefine) for part in chain):
        params.append("k_factor_rf=4")
    return ",".join(params)


def apply_search_params(index: faiss.Index, params: str) -> None:
    if not params:
        return
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        raise UsageError(f"search parameters {params!r} do not apply to this index ({msg})") from None


class EmbeddingIndex:
    """A Faiss index of unit embeddings with stable ids, a label and a source per id, and its metadata.

    `search` returns Euclidean distances between unit vectors for both metrics (ip: sqrt(2 - 2 cos)), ascending;
    slots past the end of the index hold id -1 and distance inf.
    """

    def __init__(self, index: faiss.Index, meta: dict, ids: np.ndarray, labels: np.ndarray, sources: list[str]):
        self.index = index
        self.meta = meta
        self.ids = np.asarray(ids, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sources = list(sources)
        self.folder: Path | None = None  # where it was loaded from or last saved to
        self._pos = None  # PositionLookup of self.ids, built on first use

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
    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 (n, d) -> (distances float32 (n, k) ascending, ids int64 (n, k))."""
        k = int(k)
        if k <= 0:
            raise UsageError(f"k must be a positive number of neighbours, got {k}")
        q = _as_unit_float32(queries, "query embeddings")
        if q.shape[1] != self.dimension:
            raise RetrievalError(
                f"query embeddings have dimension {q.shape[1]} but the index holds {self.dimension}-d vectors "
                "(a different tower?)"
            )
        if len(q) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        if len(q) < faiss.omp_get_max_threads():
            # Faiss parallelises over queries: a lone query gains nothing from a thread team, and on a busy
            # machine waking one costs more than the search (measured in benchmarks/index.py).
            with _omp_threads(1):
                scores, ids = self.index.search(q, k)
        else:
            scores, ids = self.index.search(q, k)
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

    # -- growth --------------------------------------------------------------------------------------------------
    def add(self, embeddings, labels, classes: Sequence[str], sources: Sequence[str], data: Sequence[dict] = ()) -> np.ndarray:
        """Append vectors with fresh ids. `labels` index `classes` (the new data's class names): they are mapped
        to this index's classes by name, new names are appended. `data` entries (spec, filters, ...) are recorded
        in meta["data"] with the new id range. Returns the new ids."""
        x = _as_unit_float32(embeddings)
        if x.shape[1] != self.dimension:
            raise RetrievalError(f"embeddings have dimension {x.shape[1]} but the index holds {self.dimension}-d vectors")
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(x) or len(sources) != len(x):
            raise ValueError("embeddings, labels and sources must have the same length")
        mapping = np.array([self._class_id(c) for c in classes], dtype=np.int64)
        new_labels = mapping[labels] if len(labels) else labels
        start = int(self.meta.get("next_id", int(self.ids.max()) + 1 if len(self.ids) else 0))
        new_ids = np.arange(start, start + len(x), dtype=np.int64)
        _add_with_ids(self.index, x, new_ids)
        self.ids = np.concatenate([self.ids, new_ids])
        self.labels = np.concatenate([self.labels, new_labels])
        self.sources.extend(str(s) for s in sources)
        self._pos = None
        self.meta["count"] = len(self)
        self.meta["next_id"] = start + len(x)
        self.meta["updated"] = _now()
        for entry in data:
            self.meta.setdefault("data", []).append({**entry, "ids": [int(start), int(start + len(x) - 1)]})
        return new_ids

    def _class_id(self, name: str) -> int:
        name = str(name)
        if name not in self.meta["classes"]:
            self.meta["classes"].append(name)
        return self.meta["classes"].index(name)


@contextlib.contextmanager
def _omp_threads(n: int):
    """Run Faiss with n OpenMP threads inside the block (the setting is per calling thread in OpenMP)."""
    before = faiss.omp_get_max_threads()
    if n == before:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _add_with_ids(index: faiss.Index, x: np.ndarray, ids: np.ndarray) -> None:
    if _is_hnsw(index):
        # HNSW inserts in parallel in a nondeterministic order; one thread gives the same graph every time.
        with _omp_threads(1):
            index.add_with_ids(x, ids)
    else:
        index.add_with_ids(x, ids)


def build_index(
    embeddings,
    labels,
    classes: Sequence[str],
    sources: Sequence[str],
    factory: str = "Flat",
    metric: str = "ip",
    seed: int = 0,
    *,
    search_params: str | None = None,
    **meta,
) -> EmbeddingIndex:
    """Build a Faiss index (faiss.index_factory string, metric ip|l2) over unit embeddings with ids 0..n-1.

    Indexes that need training (IVF, PQ) are trained on `embeddings` (seeded). `search_params` (ParameterSpace
    syntax, e.g. "nprobe=16") default to `default_search_params`. Extra keyword arguments go into the metadata
    (tower, data, preprocessing, ...).
    """
    factory = normalize_factory(factory)
    code = metric_code(metric)
    x = _as_unit_float32(embeddings)
    labels = np.asarray(labels, dtype=np.int64)
    if len(x) == 0:
        raise RetrievalError("no embeddings to index")
    if len(labels) != len(x) or len(sources) != len(x):
        raise ValueError(f"embeddings ({len(x)}), labels ({len(labels)}) and sources ({len(sources)}) differ in length")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(f"labels must index classes (0..{len(classes) - 1})")
    try:
        sub = faiss.index_factory(x.shape[1], factory, code)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        msg = msg.split(": ", 1)[-1] if "index_factory" in msg else msg
        raise UsageError(f"`factory` {factory!r}: Faiss cannot build it ({msg})") from None
    _train(sub, factory, x, seed)
    index = faiss.IndexIDMap2(sub)
    if search_params is None:
        search_params = default_search_params(index)
    apply_search_params(index, search_params)
    ids = np.arange(len(x), dtype=np.int64)
    _add_with_ids(index, x, ids)
    full_meta = {
        "format": FORMAT,
        "factory": factory,
        "metric": metric,
        "dimension": int(x.shape[1]),
        "count": int(index.ntotal),
        "next_id": len(x),
        "classes": [str(c) for c in classes],
        "search_params": search_params,
        "seed": int(seed),
        "created": _now(),
        "tool_version": retrieval.__version__,
        "faiss_version": faiss.__version__,
    }
    for key, value in meta.items():
        if key in STRUCTURAL_KEYS:
            raise ValueError(f"metadata key {key!r} is set by build_index")
        full_meta[key] = value
    return EmbeddingIndex(index, full_meta, ids, labels, [str(s) for s in sources])


# -- files ------------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _remove_unreferenced(folder: Path, keep: set[str]) -> None:
    """Delete our own data/temp files that meta.json no longer names (old versions, leftovers of killed saves)."""
    for p in folder.iterdir():
        if p.name not in keep and _OWN_FILE.match(p.name):
            p.unlink(missing_ok=True)


def is_index_folder_content(name: str) -> bool:
    """True for the files an index folder may hold (used to refuse writing an index into an unrelated folder)."""
    return name in (META_NAME, ".lock") or bool(_OWN_FILE.match(name))


def save_index(index: EmbeddingIndex, folder: str | os.PathLike, *, locked: bool = False) -> Path:
    """Write `index` into `folder` atomically (see the module docstring); returns the meta.json path.

    Holds exclusive_lock(folder) unless `locked` says the caller already holds it (e.g. across a whole build).
    """
    folder = Path(folder)
    if not locked:
        with exclusive_lock(folder):
            return save_index(index, folder, locked=True)
    token = uuid.uuid4().hex[:16]
    faiss_name, items_name = f"index-{token}.faiss", f"items-{token}.json"
    with atomic_path(folder / faiss_name) as tmp:
        try:
            faiss.write_index(index.index, str(tmp))
        except RuntimeError as e:
            raise RetrievalError(f"cannot write {folder / faiss_name}: {str(e).strip().splitlines()[-1]}") from None
    items = {"ids": index.ids.tolist(), "labels": index.labels.tolist(), "sources": index.sources}
    atomic_write_json(folder / items_name, items)
    meta = dict(index.meta)
    meta["count"] = len(index)
    meta["dimension"] = index.dimension
    meta["files"] = {
        "faiss": faiss_name,
        "faiss_sha256": _sha256(folder / faiss_name),
        "items": items_name,
        "items_sha256": _sha256(folder / items_name),
    }
    atomic_write_json(folder / META_NAME, meta)  # the commit point
    index.meta = meta
    index.folder = folder
    _remove_unreferenced(folder, {faiss_name, items_name})
    return folder / META_NAME


def read_index_meta(folder: str | os.PathLike) -> dict:
    """meta.json of an index folder, checked for the keys every reader relies on."""
    folder = Path(folder)
    if not folder.exists():
        raise RetrievalError(f"index folder not found: {folder}")
    if not folder.is_dir():
        raise RetrievalError(f"{folder} is not an index folder (expected a folder holding {META_NAME})")
    path = folder / META_NAME
    meta = read_json(path, "index metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RetrievalError(f"{path} is not retrieval index metadata (format {FORMAT!r} expected)")
    required = ("files", "factory", "metric", "dimension", "count", "classes")
    missing = [k for k in required if k not in meta]
    files = meta.get("files")
    if not missing and not (isinstance(files, dict) and isinstance(files.get("faiss"), str) and isinstance(files.get("items"), str)):
        missing.append("files.faiss/files.items")
    if missing:
        raise RetrievalError(f"{path} is incomplete: missing {', '.join(missing)}")
    return meta


def _load_files(folder: Path, meta: dict) -> EmbeddingIndex:
    meta_path = folder / META_NAME
    files = meta["files"]
    faiss_path, items_path = folder / files["faiss"], folder / files["items"]
    for path, what in ((faiss_path, "index file"), (items_path, "index items file")):
        if not path.is_file():
            raise FileNotFoundError(f"{what} not found: {path} (named by {meta_path})")
    for path, key in ((faiss_path, "faiss_sha256"), (items_path, "items_sha256")):
        if files.get(key) and _sha256(path) != files[key]:
            raise RetrievalError(f"{path} is corrupt or was changed: its SHA-256 does not match {meta_path}")
    try:
        index = faiss.read_index(str(faiss_path))
    except RuntimeError as e:
        raise RetrievalError(f"{faiss_path} is not a readable Faiss index ({str(e).strip().splitlines()[-1]})") from None
    if not isinstance(index, faiss.IndexIDMap2):
        raise RetrievalError(f"{faiss_path} is a {type(index).__name__}, expected an IndexIDMap2 (stable ids)")
    if index.d != meta["dimension"]:
        raise RetrievalError(
            f"{meta_path} says dimension {meta['dimension']} but {faiss_path} holds {index.d}-d vectors"
        )
    if index.ntotal != meta["count"]:
        raise RetrievalError(f"{meta_path} says {meta['count']} vectors but {faiss_path} holds {index.ntotal}")
    if meta["metric"] not in METRICS or index.metric_type != METRICS[meta["metric"]]:
        raise RetrievalError(f"{meta_path} says metric {meta['metric']!r} but {faiss_path} uses another metric")
    items = read_json(items_path, "index items file")
    try:
        ids = np.asarray(items["ids"], dtype=np.int64)
        labels = np.asarray(items["labels"], dtype=np.int64)
        sources = [str(s) for s in items["sources"]]
    except (KeyError, TypeError, ValueError) as e:
        raise RetrievalError(f"{items_path} is not an index items file ({e})") from None
    if not (len(ids) == len(labels) == len(sources) == index.ntotal):
        raise RetrievalError(
            f"{items_path} lists {len(ids)} ids / {len(labels)} labels / {len(sources)} sources "
            f"but {faiss_path} holds {index.ntotal} vectors"
        )
    if not np.array_equal(ids, faiss.vector_to_array(index.id_map)):
        raise RetrievalError(f"{items_path}: its ids differ from the ids stored in {faiss_path}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(meta["classes"])):
        raise RetrievalError(f"{items_path}: labels out of range for the {len(meta['classes'])} classes in {meta_path}")
    apply_search_params(index, meta.get("search_params") or "")
    loaded = EmbeddingIndex(index, meta, ids, labels, sources)
    loaded.folder = folder
    return loaded


def load_index(folder: str | os.PathLike) -> EmbeddingIndex:
    """Load an index folder, checking meta.json against the Faiss and items files (clear error naming the file)."""
    folder = Path(folder)
    for attempt in range(3):
        meta = read_index_meta(folder)
        try:
            return _load_files(folder, meta)
        except FileNotFoundError as e:
            # A concurrent save may have committed a new version and deleted the files we were about to read.
            if attempt < 2 and read_index_meta(folder).get("files") != meta["files"]:
                continue
            raise RetrievalError(str(e)) from None
    raise AssertionError("unreachable")


def update_index_meta(folder: str | os.PathLike, **changes) -> dict:
    """Atomically rewrite meta.json with `changes` (a value of None deletes the key); returns the new metadata.

    For annotations such as `calibration={"max_distance": 0.8, ...}`; keys describing the stored files
    (format, files, factory, metric, dimension, count, next_id, classes) cannot be changed this way.
    """
    folder = Path(folder)
    bad = [k for k in changes if k in STRUCTURAL_KEYS]
    if bad:
        raise ValueError(f"update_index_meta cannot change {', '.join(bad)}; rebuild or use index add")
    with exclusive_lock(folder):
        meta = read_index_meta(folder)
        for key, value in changes.items():
            if value is None:
                meta.pop(key, None)
            else:
                meta[key] = value
        meta["updated"] = _now()
        atomic_write_json(folder / META_NAME, meta)
    return meta


def load_index_tower(index: EmbeddingIndex, device="cpu", checkpoint: str | os.PathLike | None = None):
    """The Checkpoint whose tower built `index` (from the metadata's checkpoint path, or `checkpoint`), verified by
    fingerprint and embedding size."""
    tower_meta = index.meta.get("tower") or {}
    path = checkpoint if checkpoint is not None else tower_meta.get("checkpoint")
    if not path:
        raise RetrievalError("the index metadata names no checkpoint; give it as `checkpoint`")
    if checkpoint is None and not Path(path).exists() and not Path(str(path) + ".safetensors").exists():
        raise RetrievalError(
            f"the checkpoint this index was built with is gone: {path}; give a copy of it as `checkpoint`"
        )
    ckpt = load_checkpoint(path, device=device)
    check_tower_matches(index, ckpt)
    return ckpt


def check_tower_matches(index: EmbeddingIndex, ckpt) -> None:
    """Raise a clear error unless `ckpt` holds the tower the index was built with."""
    tower_meta = index.meta.get("tower") or {}
    want = tower_meta.get("fingerprint")
    if ckpt.tower.embedding_size != index.dimension:
        raise RetrievalError(
            f"checkpoint {ckpt.path} embeds into {ckpt.tower.embedding_size} dimensions but the index holds "
            f"{index.dimension}-d vectors: it is not the tower this index was built with"
        )
    if want and ckpt.fingerprint != want:
        raise RetrievalError(
            f"checkpoint {ckpt.path} (fingerprint {ckpt.fingerprint[:12]}) is not the tower this index was built "
            f"with (fingerprint {want[:12]}, {tower_meta.get('checkpoint')})"
        )


def tower_meta(ckpt) -> dict:
    """The metadata block describing the tower (from a Checkpoint) that an index stores."""
    return {
        "name": ckpt.meta.get("tower", ckpt.tower.arch),
        "embedding_size": int(ckpt.tower.embedding_size),
        "fingerprint": ckpt.fingerprint,
        "checkpoint": str(Path(ckpt.path).resolve()),
    }


def class_prototypes(embeddings: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
    """One unit vector per class present: the re-normalised mean embedding. Returns (vectors, labels, sources)."""
    present = np.unique(labels)
    vectors = np.stack([embeddings[labels == c].mean(axis=0) for c in present]).astype(np.float32)
    faiss.normalize_L2(vectors)
    counts = [int((labels == c).sum()) for c in present]
    sources = [f"prototype:{classes[c]} ({n} image{'s' if n != 1 else ''})" for c, n in zip(present, counts)]
    return vectors, present.astype(np.int64), sources


def check_index_target(folder: str | os.PathLike) -> bool:
    """Refuse to write an index into a folder holding other things; returns whether the folder already existed."""
    folder = Path(folder)
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise UsageError(f"`out` {folder} exists and is not a folder")
    foreign = [p.name for p in folder.iterdir() if not is_index_folder_content(p.name)]
    if foreign:
        raise UsageError(
            f"`out` {folder} holds other files ({', '.join(sorted(foreign)[:3])}{', ...' if len(foreign) > 3 else ''}); "
            "choose a new or empty folder, or an existing index folder to replace it"
        )
    return True
