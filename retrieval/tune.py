"""Choosing an approximate index's search parameters: recall@k against exact search and queries/s over a grid of
Faiss search parameters (nprobe, efSearch, k_factor_rf, ...), and the fastest setting that reaches a recall.

    results = measure_grid(index, queries, k=10, grid=default_grid(index))
    best = fastest_reaching(results, 0.95)        # None when no setting reaches it

Exact neighbours come from the full-precision vectors the index keeps: a Flat index's, an HNSW graph's flat
storage, an IVF-Flat index's inverted lists (read a list at a time, so on-disk lists stream through), or a refine
stage's; an index that keeps only compressed codes (PQ, SQ without a refine stage) cannot be measured this way.
recall@k is the fraction of the exact k nearest found among the k returned (Faiss's "k-recall@k").
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import faiss
import numpy as np

from retrieval.errors import RetrievalError, UsageError
from retrieval.faiss_tools import METRICS, unwrapped, search_parameters
from retrieval.index import EmbeddingIndex, as_unit_float32

logger = logging.getLogger(__name__)


@dataclass
class Setting:
    """One point of the grid, measured."""

    search_params: str
    recall: float  # recall@k against exact search, mean over the queries
    queries_per_s: float  # all queries in one batched search, median of the repeats
    latency_ms: float  # one query at a time, median

    def to_json(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def default_grid(index: EmbeddingIndex) -> dict[str, list[int]]:
    """Search parameters worth trying for the index, by Faiss's names: nprobe (IVF) in powers of two up to the
    number of lists, efSearch (HNSW) 16..512, k_factor_rf (refine stage) 1..1,024."""
    chain = unwrapped(index.index)
    inner, grid = chain[-1], {}
    if isinstance(inner, faiss.IndexIVF):
        nlist = int(inner.nlist)
        grid["nprobe"] = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= nlist]
    elif isinstance(inner, faiss.IndexHNSW):
        grid["efSearch"] = [16, 32, 64, 128, 256, 512]
    if any(isinstance(p, faiss.IndexRefine) for p in chain):
        # fast-scan PQ codes (PQ16x4fs) are coarse and cheap to scan: they may need ~1,000 candidates per
        # neighbour re-ranked (benchmarks/history.md, "Indexes of a million")
        grid["k_factor_rf"] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    return grid


def parse_grid(items: list[str]) -> dict[str, list[float]]:
    """["nprobe=8,16,32", "k_factor_rf=2,4"] -> {"nprobe": [8, 16, 32], "k_factor_rf": [2, 4]}."""
    grid = {}
    for item in items:
        name, eq, values = item.partition("=")
        try:
            numbers = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            numbers = []
        if not eq or not name.strip() or not numbers or any(v < 0 for v in numbers):
            raise UsageError(f"`grid` {item!r}: expected name=value,value,... e.g. nprobe=8,16,32")
        grid[name.strip()] = [int(v) if v == int(v) else v for v in numbers]
    return grid


def grid_settings(grid: dict[str, list]) -> list[str]:
    """Every combination of the grid as a search-parameter string, in grid order."""
    if not grid:
        return []
    names = list(grid)
    return [",".join(f"{n}={v}" for n, v in zip(names, combo)) for combo in itertools.product(*grid.values())]


def exact_vectors(index: EmbeddingIndex, chunk: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(full-precision vectors, their ids) of the whole index, a chunk at a time; RetrievalError when the index
    keeps only compressed codes."""
    chain = unwrapped(index.index)
    flat = None
    refine = next((faiss.downcast_index(p.refine_index) for p in chain if isinstance(p, faiss.IndexRefine)), None)
    inner = chain[-1]
    if isinstance(refine, faiss.IndexFlat):
        flat = refine
    elif isinstance(inner, faiss.IndexFlat):
        flat = inner
    elif isinstance(inner, faiss.IndexHNSW) and isinstance(faiss.downcast_index(inner.storage), faiss.IndexFlat):
        flat = faiss.downcast_index(inner.storage)
    if flat is not None and not any(isinstance(p, faiss.IndexPreTransform) for p in chain):
        for start in range(0, int(flat.ntotal), chunk):
            n = min(chunk, int(flat.ntotal) - start)
            yield flat.reconstruct_n(start, n), index.ids[start:start + n]
        return
    if isinstance(inner, faiss.IndexIVFFlat) and len(chain) == 2:  # IDMap2 -> IVF,Flat (lists in memory or on disk)
        lists = inner.invlists
        d = inner.d
        xs, ps, held = [], [], 0
        for list_no in range(inner.nlist):
            n = lists.list_size(list_no)
            if not n:
                continue
            codes = faiss.rev_swig_ptr(lists.get_codes(list_no), n * inner.code_size)
            ids = faiss.rev_swig_ptr(lists.get_ids(list_no), n)
            xs.append(np.frombuffer(codes, np.float32).reshape(n, d).copy())
            ps.append(np.frombuffer(ids, np.int64).copy())
            held += n
            if held >= chunk:
                yield np.concatenate(xs), index.ids[np.concatenate(ps)]
                xs, ps, held = [], [], 0
        if xs:
            yield np.concatenate(xs), index.ids[np.concatenate(ps)]
        return
    raise RetrievalError(
        f"the {index.meta.get('factory')} index keeps only compressed codes, so exact neighbours cannot be computed "
        "from it; tune a build with a refine stage (add ',RFlat' to the factory) or with Flat codes (IVF...,Flat)")


def exact_neighbors(index: EmbeddingIndex, queries: np.ndarray, k: int) -> np.ndarray:
    """ids (n, k) of the exact k nearest indexed vectors of each query (by the index's metric)."""
    q = as_unit_float32(queries, "query embeddings")
    metric = METRICS[index.metric]
    heap = faiss.ResultHeap(len(q), k, keep_max=metric == faiss.METRIC_INNER_PRODUCT)
    for x, ids in exact_vectors(index):
        d, i = faiss.knn(q, x, min(k, len(x)), metric=metric)
        if d.shape[1] < k:  # pad a short chunk
            d = np.pad(d, ((0, 0), (0, k - d.shape[1])), constant_values=-np.inf if heap.keep_max else np.inf)
            i = np.pad(i, ((0, 0), (0, k - i.shape[1])), constant_values=-1)
        heap.add_result(d, np.where(i >= 0, ids[np.maximum(i, 0)], -1))
    heap.finalize()
    return heap.I


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row of `exact` (ids; -1 = none) found in the same row of `found`."""
    hits = [len(set(f[f >= 0].tolist()) & set(e[e >= 0].tolist())) / max(1, int((e >= 0).sum()))
            for f, e in zip(found, exact)]
    return float(np.mean(hits)) if hits else 0.0


def measure(index: EmbeddingIndex, queries: np.ndarray, k: int, params: str, exact: np.ndarray,
            repeats: int = 3, single: int = 200) -> Setting:
    """recall@k, batched queries/s (median of `repeats`) and one-query latency (median over `single` queries)."""
    q = as_unit_float32(queries, "query embeddings")
    times, found = [], None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        _, found = index.search(q, k, params=params or None)
        times.append(time.perf_counter() - start)
    lat = []
    for row in q[:single]:
        start = time.perf_counter()
        index.search(row[None], k, params=params or None)
        lat.append(time.perf_counter() - start)
    return Setting(params, recall_at_k(found, exact), len(q) / statistics.median(times),
                   1000 * statistics.median(lat) if lat else float("nan"))


def measure_grid(index: EmbeddingIndex, queries: np.ndarray, k: int, grid: dict[str, list],
                 repeats: int = 3, single: int = 200, progress=None,
                 target: float | None = None) -> tuple[list[Setting], np.ndarray]:
    """The settings of the grid measured (see measure); also returns the exact neighbours used.

    With a `target` recall, a setting is skipped when the one before it in the grid's last parameter (same other
    values, a smaller last value) already reached the target: every tuned parameter (nprobe, efSearch,
    k_factor_rf) only adds work as it grows, so the skipped settings are slower for no need."""
    settings = grid_settings(grid)
    if not settings:
        raise UsageError("`grid`: no search parameters to try (a Flat index is exact: there is nothing to tune)")
    for params in settings:
        search_parameters(index.index, params)  # a clear error before the exact search
    exact = exact_neighbors(index, queries, k)
    results = []
    reached: set[str] = set()  # the other parameters' values of rows that reached the target
    for params in settings:
        row = params.rsplit(",", 1)[0] if "," in params else ""
        if target is not None and row in reached:
            continue
        results.append(measure(index, queries, k, params, exact, repeats, single))
        if target is not None and results[-1].recall >= target:
            reached.add(row)
        if progress is not None:
            progress(results[-1])
    return results, exact


def fastest_reaching(results: list[Setting], target: float) -> Setting | None:
    """The setting with the most queries/s among those with recall >= target (None if none reaches it)."""
    good = [r for r in results if r.recall >= target]
    return max(good, key=lambda r: r.queries_per_s) if good else None
