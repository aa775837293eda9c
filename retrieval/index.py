"""Embeddings -> a Faiss index with stable int64 ids, labels and sources, saved to a folder with its metadata.

An index folder holds three artifacts named by `meta.json`:

    meta.json               factory, metric, dimension, count, classes, tower, data, files, checksums, ...
    index-<token>.faiss     the Faiss index (always an IndexIDMap2, so ids survive appends)
    items-<token>.npz       per id: label (index into meta["classes"]) and source ("mnist:train[12]", a path, ...)
                            as arrays (retrieval.items; items-<token>.json in folders written before, still read)
    lists-<token>.ivfdata   with `on_disk` (IVF only): the inverted lists, memory-mapped read-only when loaded
    tower-<fp>.safetensors  a copy of the tower that embedded the vectors (<fp>: the start of its fingerprint),
    tower-<fp>.json         with its checkpoint sidecar and its model card (meta["tower"]["files"] names them),
    tower-<fp>.md           so a copied folder (cp -r, rsync, tar) answers queries anywhere

Saving writes the tower files (unless the folder already holds them, byte for byte) and the data files under
fresh names (an on-disk lists file the index already maps in this folder is kept: a build writes it there, under a
temp name until complete), then atomically replaces meta.json (the commit point), then deletes the files the old
meta.json named. A committed lists file is never written to: adding to an on-disk index copies its lists.
A crash at any moment leaves either the old or the new index whole. Indexes written before the tower was copied
name it by absolute path only (meta["tower"]["checkpoint"]); they still load, with a hint to rebuild.
Writers hold `retrieval.fsutil.exclusive_lock(folder)`, so two builds into one folder never interleave.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

import retrieval
from retrieval.checkpoint import load_checkpoint
from retrieval.errors import RetrievalError, UsageError
from retrieval.fsutil import atomic_path, atomic_write_json, exclusive_lock, read_json, sha256_file
from retrieval.items import SourceTable, read_items, write_items
from retrieval.knn import PositionLookup

FORMAT = "retrieval-index/1"
META_NAME = "meta.json"
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
# Faiss k-means wants about this many training points per centroid (it warns below it).
POINTS_PER_CENTROID = 39
# Keys that describe the stored files; update_index_meta must not change them.
STRUCTURAL_KEYS = ("format", "files", "factory", "metric", "dimension", "count", "next_id", "classes")

_IDMAP_PREFIX = re.compile(r"^\s*IDMap2?\s*,\s*", re.IGNORECASE)
# Data files: the Faiss index, the items (.npz; .json in folders written before), the on-disk inverted lists.
_DATA_FILE = r"(index-[0-9a-f]+\.faiss|items-[0-9a-f]+\.(json|npz)|lists-[0-9a-f]+\.ivfdata)"
_OWN_FILE = re.compile(rf"^({_DATA_FILE}|\.({_DATA_FILE}|meta\.json)\..*\.tmp)$")
# The copied tower: weights, checkpoint sidecar and model card (and their temp names while being written).
_TOWER_FILE = re.compile(r"^tower-[0-9a-f]+\.(safetensors|json|md)$")
_TOWER_TEMP = re.compile(r"^\.tower-[0-9a-f]+\.(safetensors|json|md)\..*\.tmp$")
TOWER_KINDS = {"weights": ".safetensors", "sidecar": ".json", "card": ".md"}


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


# The default training sample: this many vectors per centroid of the largest k-means the index runs (the least Faiss
# accepts without a warning; training time grows with it, recall barely: benchmarks/README.md, "Indexes of a
# million"), or DEFAULT_TRAIN_SIZE for indexes trained otherwise (scalar quantizers, PCA, ...).
TRAIN_POINTS_PER_CENTROID = POINTS_PER_CENTROID
DEFAULT_TRAIN_SIZE = 65_536


def needs_training(index: faiss.Index) -> bool:
    return not index.is_trained


def default_train_size(index: faiss.Index) -> int:
    """How many vectors a trained index is trained on unless told (see TRAIN_POINTS_PER_CENTROID)."""
    sizes = [TRAIN_POINTS_PER_CENTROID * k for _, k, _ in _trainable_parts(index)]
    return max(sizes, default=DEFAULT_TRAIN_SIZE)


def training_sample(n: int, size: int, seed: int) -> np.ndarray:
    """The positions (ascending) of a seeded sample of `size` of n vectors: all of them when size >= n."""
    if size <= 0:
        raise UsageError(f"`train_size` must be a positive number of vectors, got {size}")
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False)).astype(np.int64)


def check_training_size(index: faiss.Index, factory: str, n: int, available: int | None = None,
                        warn: bool = True) -> None:
    """Refuse n training vectors when a k-means of the index needs more (one per centroid); warn, once, when it
    has fewer than Faiss wants (POINTS_PER_CENTROID per centroid). `available`: how many vectors there are to
    train on (the hint then says whether `train_size` can be raised)."""
    for what, k, cp in _trainable_parts(index):
        if n < k:
            suggestion = f"IVF{max(1, n // POINTS_PER_CENTROID)}" if what == "inverted lists" else "fewer bits (e.g. PQ16x4)"
            raise RetrievalError(
                f"factory {factory!r} needs at least {k:,} training vectors for its {what}, got {n:,}; "
                f"use a smaller index ({suggestion}) or Flat"
            )
        if warn and n < POINTS_PER_CENTROID * k:
            more = (f"; raise `train_size` (up to the {available:,} vectors indexed)" if available is not None
                    and available > n else "")
            logger.warning(
                f"factory {factory!r}: {n:,} training vectors for {k:,} centroids ({what}); Faiss wants "
                f"about {POINTS_PER_CENTROID} per centroid ({POINTS_PER_CENTROID * k:,}), so clustering will be poor"
                f"{more}"
            )
            break  # one warning


def _train(index: faiss.Index, factory: str, x: np.ndarray, seed: int, *, checked: bool = False) -> None:
    """Train `index` on `x` with seeded k-means (check_training_size first, unless the caller did)."""
    if not checked:
        check_training_size(index, factory, len(x))
    for what, k, cp in _trainable_parts(index):
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
    """Set Faiss ParameterSpace settings ("nprobe=16,k_factor_rf=4") on the index itself (its default for every
    search). `k_factor` is taken as `k_factor_rf` on a refined index (the field of IndexRefine is k_factor)."""
    if not params:
        return
    params = _refine_alias(index, params)
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        raise UsageError(f"search parameters {params!r} do not apply to this index ({msg})") from None


def _refine_alias(index: faiss.Index, params: str) -> str:
    chain = _unwrapped(index)
    if any(isinstance(p, faiss.IndexRefine) for p in chain) and not any(isinstance(p, faiss.IndexIVFPQR) for p in chain):
        return re.sub(r"(^|,)\s*k_factor\s*=", r"\1k_factor_rf=", params)
    return params


# Per-query search parameters: Faiss SearchParameters objects, passed to one search, never stored in the index (so
# concurrent searches with different settings do not interfere). The names are ParameterSpace's.
SEARCH_PARAM_NAMES = ("nprobe", "max_codes", "efSearch", "quantizer_efSearch", "k_factor_rf", "k_factor")


def parse_search_params(params: str) -> dict[str, float]:
    """"nprobe=16,efSearch=64" -> {"nprobe": 16, "efSearch": 64}; a clear error for anything else."""
    values: dict[str, float] = {}
    for part in (params or "").split(","):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not eq or not name or not np.isfinite(number):
            raise UsageError(f"search parameters {params!r}: expected name=value pairs separated by commas, e.g. "
                             "nprobe=32 or efSearch=128,k_factor_rf=4")
        if not 0 < number <= 1_000_000_000:
            raise UsageError(f"search parameters {params!r}: {name} must be positive (and at most 1e9)")
        values[name] = int(number) if number == int(number) else number
    return values


def search_parameters(index: faiss.Index, params: str) -> tuple[faiss.SearchParameters | None, list]:
    """Faiss SearchParameters for one search of `index` with `params` (ParameterSpace names: nprobe, max_codes,
    efSearch, quantizer_efSearch, k_factor_rf (or k_factor) for a refined index); settings not named keep the
    index's own. Returns (parameters, the objects they point to, to keep alive while searching)."""
    values = parse_search_params(params)
    if not values:
        return None, []
    if "k_factor" in values and "k_factor_rf" not in values:
        values["k_factor_rf"] = values["k_factor"]
    used: set[str] = {"k_factor"} if "k_factor" in values else set()
    keep: list = []

    def build(ix):
        ix = faiss.downcast_index(ix)
        if isinstance(ix, faiss.IndexIDMap):
            return build(ix.index)
        if isinstance(ix, faiss.IndexPreTransform):
            inner = build(ix.index)
            if inner is None:
                return None
            p = faiss.SearchParametersPreTransform()
            p.index_params = inner
            keep.append(p)
            return p
        if isinstance(ix, faiss.IndexRefine):
            p = faiss.IndexRefineSearchParameters()
            p.k_factor = float(values.get("k_factor_rf", ix.k_factor))
            used.add("k_factor_rf")
            base = build(ix.base_index)
            if base is not None:
                p.base_index_params = base
            keep.append(p)
            return p
        if isinstance(ix, faiss.IndexIVF):
            p = faiss.SearchParametersIVF()
            p.nprobe = int(values.get("nprobe", ix.nprobe))
            p.max_codes = int(values.get("max_codes", ix.max_codes))
            used.update(("nprobe", "max_codes"))
            quantizer = faiss.downcast_index(ix.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):
                q = faiss.SearchParametersHNSW()
                q.efSearch = int(values.get("quantizer_efSearch", quantizer.hnsw.efSearch))
                used.add("quantizer_efSearch")
                keep.append(q)
                p.quantizer_params = q
            keep.append(p)
            return p
        if isinstance(ix, faiss.IndexHNSW):
            p = faiss.SearchParametersHNSW()
            p.efSearch = int(values.get("efSearch", ix.hnsw.efSearch))
            used.add("efSearch")
            keep.append(p)
            return p
        return None

    top = build(index)
    unused = [name for name in values if name not in used]
    if unused:
        known = [n for n in SEARCH_PARAM_NAMES if n in used] or ["none"]
        raise UsageError(f"search parameters {params!r} do not apply to this index ({', '.join(unused)}: this "
                         f"index takes {', '.join(known)})")
    return top, keep  # `keep`: every object built, each level pointed to by the one above it


# -- on-disk inverted lists -------------------------------------------------------------------------------------
def index_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF level of an index (under id maps, pre-transforms and a refine stage), if any."""
    inner = _unwrapped(index)[-1]
    return inner if isinstance(inner, faiss.IndexIVF) else None


def lists_on_disk(index: faiss.Index) -> bool:
    ivf = index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def check_on_disk(index: faiss.Index, factory: str) -> None:
    """Refuse on-disk inverted lists for an index that cannot have them (not IVF, or fast-scan's packed lists)."""
    ivf = index_ivf(index)
    if ivf is None:
        raise UsageError(f"`on_disk` needs an IVF index (e.g. IVF1024,Flat or IVF4096,PQ16), not {factory!r}")
    if not isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists):
        raise UsageError(f"`on_disk`: {factory!r} keeps its inverted lists in a packed layout (fast-scan) that "
                         "Faiss cannot keep on disk; use e.g. IVF4096,PQ16 or IVF1024,Flat")


@contextlib.contextmanager
def faiss_quiet():
    """Faiss's on-disk inverted lists print progress lines on stdout from C++ ("resizing ..."), where the CLI
    prints its results: point file descriptor 1 at /dev/null meanwhile (flushing C's buffer before restoring)."""
    import ctypes

    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def no_prefetch(index: faiss.Index) -> None:
    """Turn off the prefetch threads of on-disk inverted lists: Faiss starts 32 of them per search to read the lists
    a search will visit ahead of it, which pays on a cold, slow disk, but costs about 1 ms per query (a lone query
    took 1.3-1.5 ms instead of 0.15-0.26 ms) once the lists are in the page cache, where searched lists stay."""
    ivf = index_ivf(index)
    if ivf is not None and lists_on_disk(index):
        faiss.downcast_InvertedLists(ivf.invlists).prefetch_nthread = 0


def lists_to_memory(index: faiss.Index) -> None:
    """Replace memory-mapped on-disk inverted lists by a copy in memory (before adding: the file that a committed
    index names is never written to)."""
    ivf = index_ivf(index)
    if ivf is None or not lists_on_disk(index):
        return
    disk = faiss.downcast_InvertedLists(ivf.invlists)
    memory = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for i in range(ivf.nlist):
        n = disk.list_size(i)
        if n:
            memory.add_entries(i, n, disk.get_ids(i), disk.get_codes(i))
    ivf.replace_invlists(memory, True)
    memory.this.disown()


def write_lists(index: faiss.Index, path: Path, sources: Sequence | None = None) -> int:
    """Write the index's inverted lists (or those of `sources`, InvertedLists of the same shape, concatenated per
    list in order) as an on-disk lists file at `path`, written under a temp name and renamed, and make the index
    use it. Returns its size in bytes."""
    ivf = index_ivf(index)
    sources = [ivf.invlists] if sources is None else list(sources)
    with atomic_path(path) as tmp:
        vector = faiss.InvertedListsPtrVector()
        for lists in sources:
            vector.push_back(lists)
        with faiss_quiet():
            disk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(tmp))
            total = disk.merge_from_multiple(vector.data(), vector.size(), False)
        ivf.replace_invlists(disk, True)
        disk.this.disown()
        ivf.ntotal = total
    disk.filename = str(path)  # what the .faiss file records; read back relative to the index folder
    no_prefetch(index)
    return path.stat().st_size


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
        self._gpu = self._device = None  # a GPU copy searched instead of .index (use_device), and its device

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
        q = _as_unit_float32(queries, "query embeddings")
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
            with _omp_threads(1):
                scores, ids = _faiss_search(searched, q, k, sp)
        else:
            scores, ids = _faiss_search(searched, q, k, sp)
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
        self._device = device if self._gpu is not None else None
        return self._gpu is not None

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

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
        if lists_on_disk(self.index):  # the mapped file belongs to the committed index: add to a copy in memory
            lists_to_memory(self.index)
            self.lists_file = None
        _add_with_ids(self.index, x, new_ids)
        self.ids = np.concatenate([self.ids, new_ids])
        self.labels = np.concatenate([self.labels, new_labels])
        self.sources.extend(str(s) for s in sources)
        self._pos = None
        self._refresh_gpu_copy()
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


def _faiss_search(index: faiss.Index, x: np.ndarray, k: int, params) -> tuple[np.ndarray, np.ndarray]:
    """index.search, with SearchParameters when given. faiss.contrib.torch_utils (imported by pytorch-metric-learning)
    replaces Index.search by a torch-aware one without `params`, keeping the numpy one as search_numpy."""
    if params is None:
        return index.search(x, k)
    return getattr(index, "search_numpy", index.search)(x, k, params=params)


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


# HNSW inserts the vectors of one add() by level, highest first, so its graph depends on how the vectors are cut
# into add() calls: they are always added in pieces ending at multiples of this many vectors (hnsw_pieces), so an
# index built at once, from chunks of any size (retrieval.index_build) or across processes has the same graph.
HNSW_BATCH = 4096


def hnsw_pieces(start: int, n: int) -> list[tuple[int, int]]:
    """[a, b) slices of n vectors appended at position `start`, cut where start + b is a multiple of HNSW_BATCH."""
    pieces, pos = [], 0
    while pos < n:
        take = min(n - pos, HNSW_BATCH - (start + pos) % HNSW_BATCH)
        pieces.append((pos, pos + take))
        pos += take
    return pieces


def _add_with_ids(index: faiss.Index, x: np.ndarray, ids: np.ndarray) -> None:
    if _is_hnsw(index):
        # HNSW inserts in parallel in a nondeterministic order; one thread gives the same graph every time.
        with _omp_threads(1):
            if isinstance(_unwrapped(index)[-1], faiss.IndexHNSW):
                for a, b in hnsw_pieces(int(index.ntotal), len(x)):
                    index.add_with_ids(x[a:b], ids[a:b])
            else:
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
    train_size: int | None = None,
    **meta,
) -> EmbeddingIndex:
    """Build a Faiss index (faiss.index_factory string, metric ip|l2) over unit embeddings with ids 0..n-1.

    Indexes that need training (IVF, PQ) are trained on a seeded sample of `train_size` of the embeddings
    (training_sample; default default_train_size). `search_params` (ParameterSpace syntax, e.g. "nprobe=16")
    default to `default_search_params`. Extra keyword arguments go into the metadata (tower, data, preprocessing,
    ...). retrieval.index_build builds the same index from chunks (and across processes).
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
    trained_on = None
    if needs_training(sub):
        size = default_train_size(sub) if train_size is None else int(train_size)
        sample = training_sample(len(x), size, seed)
        check_training_size(sub, factory, len(sample), available=len(x))
        _train(sub, factory, x if len(sample) == len(x) else x[sample], seed, checked=True)
        trained_on = len(sample)
    index = faiss.IndexIDMap2(sub)
    if search_params is None:
        search_params = default_search_params(index)
    apply_search_params(index, search_params)
    ids = np.arange(len(x), dtype=np.int64)
    _add_with_ids(index, x, ids)
    full_meta = new_index_meta(factory, metric, int(x.shape[1]), int(index.ntotal), len(x), classes, search_params,
                               seed, trained_on, **meta)
    return EmbeddingIndex(index, full_meta, ids, labels, [str(s) for s in sources])


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
        "created": _now(),
        "tool_version": retrieval.__version__,
        "faiss_version": faiss.__version__,
    }
    for key, value in meta.items():
        if key in STRUCTURAL_KEYS:
            raise ValueError(f"metadata key {key!r} is set by build_index")
        full_meta[key] = value
    return full_meta


# -- files ------------------------------------------------------------------------------------------------------
def _remove_unreferenced(folder: Path, keep: set[str]) -> None:
    """Delete our own data/temp files that meta.json no longer names (old versions, leftovers of killed saves)."""
    for p in folder.iterdir():
        if p.name not in keep and _is_own_file(p.name):
            p.unlink(missing_ok=True)


def _is_own_file(name: str) -> bool:
    return bool(_OWN_FILE.match(name) or _TOWER_FILE.match(name) or _TOWER_TEMP.match(name))


def is_index_folder_content(name: str) -> bool:
    """True for the files an index folder may hold (used to refuse writing an index into an unrelated folder)."""
    return name in (META_NAME, ".lock") or _is_own_file(name)


def tower_files(meta: dict) -> dict[str, str]:
    """{"weights"|"sidecar"|"card": file name} of the tower copy an index's metadata names ({} for indexes written
    before towers were copied); names that are not plain tower-<fp>.* file names are refused."""
    files = (meta.get("tower") or {}).get("files") if isinstance(meta.get("tower"), dict) else None
    if not isinstance(files, dict):
        return {}
    out = {}
    for kind in TOWER_KINDS:
        name = files.get(kind)
        if name is None:
            continue
        if not isinstance(name, str) or not _TOWER_FILE.match(name) or not name.endswith(TOWER_KINDS[kind]):
            raise RetrievalError(f"index metadata names tower file {name!r} for its {kind}; expected "
                                 f"tower-<hex>{TOWER_KINDS[kind]} in the index folder")
        out[kind] = name
    return out


def _copy_file(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)


def _save_tower_files(index: EmbeddingIndex, folder: Path) -> set[str]:
    """Make `folder` hold the tower files the metadata names, each written atomically. Weights and sidecar: kept
    when already there with the recorded SHA-256, else copied from the folder the index was loaded from, else from
    the checkpoint it was built with (any source verified by SHA-256). The card: the run's card of a fresh build,
    else kept or copied like the others, else rendered from the sidecar. Returns the file names."""
    from retrieval.cards import checkpoint_card

    names = tower_files(index.meta)
    if not names:
        return set()
    info = index.meta["tower"]
    files = info["files"]
    original = Path(str(info["checkpoint"])) if info.get("checkpoint") else None
    loaded_from = Path(index.folder) if index.folder is not None else None
    for kind in ("weights", "sidecar"):
        if kind not in names:
            continue
        name, want = names[kind], files.get(f"{kind}_sha256")
        candidates = [folder / name] + ([loaded_from / name] if loaded_from else [])
        if original is not None:
            candidates.append(original.with_suffix(TOWER_KINDS[kind]))
        source = next((p for p in candidates if p.is_file() and (want is None or sha256_file(p) == want)), None)
        if source is None:
            raise RetrievalError(
                f"cannot write the index into {folder}: its tower's {kind} ({name}, fingerprint "
                f"{str(info.get('fingerprint'))[:12]}) is neither in the folder nor at {original} any more"
            )
        if source != folder / name:
            _copy_file(source, folder / name)
    if "card" in names:
        target = folder / names["card"]
        copy = loaded_from / names["card"] if loaded_from else None
        if loaded_from is None and original is not None and original.is_file():
            with atomic_path(target) as tmp:  # a fresh build: the run's card as it is now
                tmp.write_text(checkpoint_card(original), encoding="utf-8")
        elif target.is_file():
            pass
        elif copy is not None and copy.is_file():
            _copy_file(copy, target)
        elif "weights" in names:
            with atomic_path(target) as tmp:
                tmp.write_text(checkpoint_card(folder / names["weights"]), encoding="utf-8")
    return set(names.values())


def save_index(index: EmbeddingIndex, folder: str | os.PathLike, *, locked: bool = False) -> Path:
    """Write `index` into `folder` atomically (see the module docstring); returns the meta.json path.

    Holds exclusive_lock(folder) unless `locked` says the caller already holds it (e.g. across a whole build).
    """
    folder = Path(folder)
    if not locked:
        with exclusive_lock(folder):
            return save_index(index, folder, locked=True)
    tower_names = _save_tower_files(index, folder)
    token = uuid.uuid4().hex[:16]
    faiss_name, items_name = f"index-{token}.faiss", f"items-{token}.npz"
    lists = _save_lists(index, folder, token) if index.meta.get("on_disk") else {}
    with atomic_path(folder / faiss_name) as tmp:
        try:
            with faiss_quiet() if lists else contextlib.nullcontext():
                faiss.write_index(index.index, str(tmp))
        except RuntimeError as e:
            raise RetrievalError(f"cannot write {folder / faiss_name}: {str(e).strip().splitlines()[-1]}") from None
    write_items(folder / items_name, index.ids, index.labels, index.sources)
    meta = dict(index.meta)
    meta["count"] = len(index)
    meta["dimension"] = index.dimension
    meta["files"] = {
        "faiss": faiss_name,
        "faiss_sha256": sha256_file(folder / faiss_name),
        "items": items_name,
        "items_sha256": sha256_file(folder / items_name),
        **lists,
    }
    atomic_write_json(folder / META_NAME, meta)  # the commit point
    index.meta = meta
    index.folder = folder
    _remove_unreferenced(folder, {faiss_name, items_name, *([lists["lists"]] if lists else []), *tower_names})
    return folder / META_NAME


_LISTS_NAME = re.compile(r"^lists-[0-9a-f]+\.ivfdata$")


def _save_lists(index: EmbeddingIndex, folder: Path, token: str) -> dict:
    """The on-disk inverted lists of an index being saved into `folder`: the file it maps when that file is in
    the folder and unchanged (a fresh build wrote it there), else a new file lists-<token>.ivfdata written from
    its lists (in memory after an add, or mapped from another folder). Returns the meta["files"] entries."""
    current = index.lists_file
    known = index.meta.get("files") or {}
    if (current is not None and lists_on_disk(index.index) and current.is_file()
            and current.parent.resolve() == folder.resolve()):
        sha = known.get("lists_sha256") if known.get("lists") == current.name else None
        return {"lists": current.name, "lists_bytes": current.stat().st_size, "lists_sha256": sha or sha256_file(current)}
    path = folder / f"lists-{token}.ivfdata"
    size = write_lists(index.index, path)
    index.lists_file = path
    return {"lists": path.name, "lists_bytes": size, "lists_sha256": sha256_file(path)}


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
    lists_name = files.get("lists")
    if lists_name is not None and not (isinstance(lists_name, str) and _LISTS_NAME.match(lists_name)):
        raise RetrievalError(f"{meta_path} names the inverted lists file {lists_name!r}; expected lists-<hex>.ivfdata")
    lists_path = folder / lists_name if lists_name else None
    for path, what in ((faiss_path, "index file"), (items_path, "index items file"),
                       (lists_path, "on-disk inverted lists file")):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{what} not found: {path} (named by {meta_path})")
    for path, key in ((faiss_path, "faiss_sha256"), (items_path, "items_sha256")):
        if files.get(key) and sha256_file(path) != files[key]:
            raise RetrievalError(f"{path} is corrupt or was changed: its SHA-256 does not match {meta_path}")
    if lists_path is not None and files.get("lists_bytes") is not None \
            and lists_path.stat().st_size != files["lists_bytes"]:
        # the lists are not hashed at every load (they may be larger than memory); their size is checked
        raise RetrievalError(f"{lists_path} is corrupt or was changed: it holds {lists_path.stat().st_size:,} bytes, "
                             f"{meta_path} says {files['lists_bytes']:,}")
    try:
        if lists_path is None:
            index = faiss.read_index(str(faiss_path))
        else:  # the lists file is memory-mapped read-only, found beside the .faiss file wherever the folder is
            with faiss_quiet():
                index = faiss.read_index(str(faiss_path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        raise RetrievalError(f"{faiss_path} is not a readable Faiss index ({str(e).strip().splitlines()[-1]})") from None
    if lists_path is not None:
        disk = faiss.downcast_InvertedLists(index_ivf(index).invlists) if index_ivf(index) is not None else None
        if not isinstance(disk, faiss.OnDiskInvertedLists) or Path(disk.filename).name != lists_name:
            raise RetrievalError(f"{faiss_path} does not use the inverted lists file {lists_name} that {meta_path} "
                                 "names")
        no_prefetch(index)
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
    ids, labels, sources = read_items(items_path)
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
    loaded.lists_file = lists_path
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


# IndexIDMap2 keeps a hash map from id to position beside its id array: about this many bytes per vector.
REV_MAP_BYTES = 40


def index_sizes(index: EmbeddingIndex) -> dict:
    """Bytes of the index: on disk, per file of its folder (faiss, items, lists, tower) and in total; and about how
    much memory it takes loaded (the Faiss structures as written, the items arrays, the id map's hash map), with
    the on-disk inverted lists apart (memory-mapped: paged in as searched, never all resident unless read all)."""
    folder = Path(index.folder) if index.folder is not None else None
    files = index.meta.get("files") or {}
    disk: dict[str, int] = {}
    if folder is not None:
        for key in ("faiss", "items", "lists"):
            if files.get(key) and (folder / files[key]).is_file():
                disk[key] = (folder / files[key]).stat().st_size
        tower = sum((folder / name).stat().st_size for name in tower_files(index.meta).values()
                    if (folder / name).is_file())
        if tower:
            disk["tower"] = tower
    sources = index.sources.arrays()
    items_memory = int(index.ids.nbytes + index.labels.nbytes + sum(a.nbytes for a in sources.values()))
    faiss_memory = disk.get("faiss")
    if faiss_memory is None:  # not saved: measure the serialized form
        with faiss_quiet() if lists_on_disk(index.index) else contextlib.nullcontext():
            faiss_memory = int(faiss.serialize_index(index.index).nbytes)
    memory = faiss_memory + items_memory + REV_MAP_BYTES * len(index)
    return {
        "disk": {**disk, "total": sum(disk.values())},
        "memory": {"index": faiss_memory, "items": items_memory, "id_map": REV_MAP_BYTES * len(index),
                   "total": memory},
        "mapped": disk.get("lists", 0),  # on-disk inverted lists: mapped, not loaded
    }


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
    """The Checkpoint whose tower built `index`, verified by fingerprint and embedding size: `checkpoint` when given,
    else the copy in the index folder, else (indexes written before towers were copied) the checkpoint path the
    metadata names, with a hint to rebuild."""
    info = index.meta.get("tower") or {}
    names = tower_files(index.meta)
    folder = Path(index.folder) if index.folder is not None else None
    old_format = not names
    hint = (f"the index {folder or ''} was written by an earlier version that did not copy its tower into the folder; "
            "rebuild it with `retrieval index build` (or add to it with `retrieval index add`) so that it carries "
            "its tower and works wherever the folder is copied")
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint, device=device)
        check_tower_matches(index, ckpt)
        if old_format:
            logger.warning(f"note: {hint}")
        return ckpt
    if names.get("weights"):
        copy = folder / names["weights"] if folder is not None else None
        if copy is not None and copy.is_file():
            ckpt = load_checkpoint(copy, device=device)
            check_tower_matches(index, ckpt)
            return ckpt
        path = info.get("checkpoint")
        if not (path and Path(path).is_file()):
            where = f"{copy} is missing" if copy is not None else "the index was never saved"
            raise RetrievalError(f"the index's copy of its tower is gone ({where}) and so is the checkpoint it was "
                                 f"built with ({path}); give a copy of that checkpoint as `checkpoint`")
        logger.warning(f"the index's copy of its tower is missing ({copy}); using the checkpoint it was built with, "
                       f"{path}")
        ckpt = load_checkpoint(path, device=device)
        check_tower_matches(index, ckpt)
        return ckpt
    path = info.get("checkpoint")
    if not path:
        raise RetrievalError("the index metadata names no checkpoint; give it as `checkpoint`")
    if not Path(path).exists() and not Path(str(path) + ".safetensors").exists():
        raise RetrievalError(
            f"the checkpoint this index was built with is gone: {path}; give a copy of it as `checkpoint` "
            f"(this index predates self-contained index folders: rebuild it so it carries its tower)"
        )
    logger.warning(f"note: {hint}")
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
    """The metadata block describing the tower (from a Checkpoint) that an index stores: name, size, fingerprint,
    the checkpoint it came from, and the names (and SHA-256) of the copies save_index puts in the index folder."""
    weights = Path(ckpt.path).resolve()
    sidecar = weights.with_suffix(".json")
    stem = f"tower-{ckpt.fingerprint[:16]}"
    try:
        recorded = read_json(sidecar, "checkpoint metadata").get("fingerprint")
    except (RetrievalError, AttributeError):
        recorded = None
    if recorded != ckpt.fingerprint:
        raise RetrievalError(f"{sidecar} changed while it was in use (another training run writing it?); try again")
    return {
        "name": ckpt.meta.get("tower", ckpt.tower.arch),
        "embedding_size": int(ckpt.tower.embedding_size),
        "fingerprint": ckpt.fingerprint,
        "checkpoint": str(weights),
        "files": {
            "weights": stem + TOWER_KINDS["weights"],
            "weights_sha256": sha256_file(weights),
            "sidecar": stem + TOWER_KINDS["sidecar"],
            "sidecar_sha256": sha256_file(sidecar),
            "card": stem + TOWER_KINDS["card"],
        },
    }


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
