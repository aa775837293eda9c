"""Faiss's own vocabulary, used by the index folder format (retrieval.index) and the streaming builds
(retrieval.index_build): metrics, training (seeded k-means on a sample, how many vectors a factory wants), search
parameters by Faiss's names (per index and per search), IVF inverted lists on disk, and adding vectors so that an
HNSW graph does not depend on how they were cut into chunks. Nothing here knows about folders, items or towers.
"""

from __future__ import annotations

import contextlib
import logging
import re
import os
import sys
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from retrieval.errors import RetrievalError, UsageError
from retrieval.fsutil import atomic_path

logger = logging.getLogger(__name__)

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
# Faiss k-means wants about this many training points per centroid (it warns below it).
POINTS_PER_CENTROID = 39


def metric_code(metric: str) -> int:
    """The Faiss metric constant of "ip" or "l2"."""
    if metric not in METRICS:
        raise UsageError(f"`metric`: unknown metric {metric!r}; expected one of: {', '.join(METRICS)}")
    return METRICS[metric]


def unwrapped(index: faiss.Index) -> list[faiss.Index]:
    """The index and the indexes it wraps (pre-transforms, id maps), outermost first."""
    chain = [faiss.downcast_index(index)]
    while isinstance(chain[-1], (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexRefine)):
        inner = chain[-1].base_index if isinstance(chain[-1], faiss.IndexRefine) else chain[-1].index
        chain.append(faiss.downcast_index(inner))
    return chain


def _trainable_parts(index: faiss.Index):
    """(description, number of centroids, ClusteringParameters) for each k-means an index runs when trained."""
    inner = unwrapped(index)[-1]
    parts = []
    if isinstance(inner, faiss.IndexIVF):
        parts.append(("inverted lists", int(inner.nlist), inner.cp))
    pq = getattr(inner, "pq", None)
    if isinstance(pq, faiss.ProductQuantizer):
        parts.append((f"PQ codebooks ({pq.M} x {pq.ksub} centroids)", int(pq.ksub), pq.cp))
    return parts


# The default training sample: this many vectors per centroid of the largest k-means the index runs (the least Faiss
# accepts without a warning; training time grows with it, recall barely: benchmarks/history.md, "Indexes of a
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


def train_index(index: faiss.Index, factory: str, x: np.ndarray, seed: int, *, checked: bool = False) -> None:
    """Train `index` on `x` with seeded k-means (check_training_size first, unless the caller did)."""
    if not checked:
        check_training_size(index, factory, len(x))
    for what, k, cp in _trainable_parts(index):
        cp.seed = int(seed)
        cp.min_points_per_centroid = 1  # we warned above, once, instead of Faiss once per sub-quantizer
    for part in unwrapped(index):
        if getattr(part, "do_polysemous_training", False):
            # Polysemous codes only serve Hamming-filtered search, which we never enable; training them is
            # slow (simulated annealing: seconds even for a few hundred vectors).
            part.do_polysemous_training = False
    if not index.is_trained:
        index.train(x)


def _is_hnsw(index: faiss.Index) -> bool:
    inner = unwrapped(index)[-1]
    return isinstance(inner, faiss.IndexHNSW) or (
        isinstance(inner, faiss.IndexIVF) and isinstance(faiss.downcast_index(inner.quantizer), faiss.IndexHNSW)
    )


def default_search_params(index: faiss.Index) -> str:
    """Sensible query-time settings: probe 1/16 of IVF lists (at least 8), HNSW efSearch 64, and re-rank 4k
    candidates exactly for a refined index (",RFlat")."""
    chain = unwrapped(index)
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
    chain = unwrapped(index)
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
    levels = _SearchParameterLevels(values)
    top = levels.build(index)
    unused = [name for name in values if name not in levels.used]
    if unused:
        known = [n for n in SEARCH_PARAM_NAMES if n in levels.used] or ["none"]
        raise UsageError(f"search parameters {params!r} do not apply to this index ({', '.join(unused)}: this "
                         f"index takes {', '.join(known)})")
    return top, levels.keep  # `keep`: every object built, each level pointed to by the one above it


class _SearchParameterLevels:
    """SearchParameters built level by level down an index's wrappers (id maps pass through, pre-transforms and
    refine stages point to their inner level's), with the names used on the way and every object built."""

    def __init__(self, values: dict[str, float]):
        self.values = values
        self.used: set[str] = {"k_factor"} if "k_factor" in values else set()
        self.keep: list = []

    def build(self, ix: faiss.Index) -> faiss.SearchParameters | None:
        ix = faiss.downcast_index(ix)
        if isinstance(ix, faiss.IndexIDMap):
            return self.build(ix.index)
        if isinstance(ix, faiss.IndexPreTransform):
            return self.pre_transform(ix)
        if isinstance(ix, faiss.IndexRefine):
            return self.refine(ix)
        if isinstance(ix, faiss.IndexIVF):
            return self.ivf(ix)
        if isinstance(ix, faiss.IndexHNSW):
            return self.hnsw(ix)
        return None

    def pre_transform(self, ix: faiss.IndexPreTransform) -> faiss.SearchParameters | None:
        inner = self.build(ix.index)
        if inner is None:
            return None
        p = faiss.SearchParametersPreTransform()
        p.index_params = inner
        self.keep.append(p)
        return p

    def refine(self, ix: faiss.IndexRefine) -> faiss.SearchParameters:
        p = faiss.IndexRefineSearchParameters()
        p.k_factor = float(self.values.get("k_factor_rf", ix.k_factor))
        self.used.add("k_factor_rf")
        base = self.build(ix.base_index)
        if base is not None:
            p.base_index_params = base
        self.keep.append(p)
        return p

    def ivf(self, ix: faiss.IndexIVF) -> faiss.SearchParameters:
        p = faiss.SearchParametersIVF()
        p.nprobe = int(self.values.get("nprobe", ix.nprobe))
        p.max_codes = int(self.values.get("max_codes", ix.max_codes))
        self.used.update(("nprobe", "max_codes"))
        quantizer = faiss.downcast_index(ix.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            q = faiss.SearchParametersHNSW()
            q.efSearch = int(self.values.get("quantizer_efSearch", quantizer.hnsw.efSearch))
            self.used.add("quantizer_efSearch")
            self.keep.append(q)
            p.quantizer_params = q
        self.keep.append(p)
        return p

    def hnsw(self, ix: faiss.IndexHNSW) -> faiss.SearchParameters:
        p = faiss.SearchParametersHNSW()
        p.efSearch = int(self.values.get("efSearch", ix.hnsw.efSearch))
        self.used.add("efSearch")
        self.keep.append(p)
        return p


# -- on-disk inverted lists -------------------------------------------------------------------------------------
def index_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF level of an index (under id maps, pre-transforms and a refine stage), if any."""
    inner = unwrapped(index)[-1]
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
    a search will visit ahead of it, which pays on a cold, slow disk, but once the lists are in the page cache
    (where searched lists stay) starting them costs a lone query several times its search."""
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


# Faiss scores queries against flat vectors (a flat index, an IVF index's quantizer) one query at a time with its
# own kernels while the batch is below faiss.cvar.distance_compute_blas_threshold, and through BLAS from there on.
# Faiss 1.15 counts the batch in floats (queries x dimension) and starts BLAS at 128,000 (2,000 64-d queries), but
# BLAS is the cheaper per query from a few queries up (benchmarks/README.md): from this many, searches use it. A
# batch's scores may then differ from one-at-a-time ones in the last bits of a float (as a batched tower forward's
# embeddings may).
BLAS_FROM_QUERIES = 4


def faiss_search(index: faiss.Index, x: np.ndarray, k: int, params) -> tuple[np.ndarray, np.ndarray]:
    """index.search, with SearchParameters when given, through BLAS from BLAS_FROM_QUERIES queries.
    faiss.contrib.torch_utils (imported by pytorch-metric-learning) replaces Index.search by a torch-aware one
    without `params`, keeping the numpy one as search_numpy."""
    with blas_threshold(BLAS_FROM_QUERIES * x.shape[1]):
        if params is None:
            return index.search(x, k)
        return getattr(index, "search_numpy", index.search)(x, k, params=params)


@contextlib.contextmanager
def blas_threshold(floats: int):
    """Faiss's distance_compute_blas_threshold at most `floats` inside the block (a process-wide setting: restored
    after it, so that other work, k-means training among it, keeps Faiss's own)."""
    before = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = min(before, floats)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = before


@contextlib.contextmanager
def omp_threads(n: int):
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


def add_with_ids(index: faiss.Index, x: np.ndarray, ids: np.ndarray) -> None:
    if _is_hnsw(index):
        # HNSW inserts in parallel in a nondeterministic order; one thread gives the same graph every time.
        with omp_threads(1):
            if isinstance(unwrapped(index)[-1], faiss.IndexHNSW):
                for a, b in hnsw_pieces(int(index.ntotal), len(x)):
                    index.add_with_ids(x[a:b], ids[a:b])
            else:
                index.add_with_ids(x, ids)
    else:
        index.add_with_ids(x, ids)
