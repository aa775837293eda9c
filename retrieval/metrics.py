"""Retrieval metrics of embeddings: recall@k, precision@k, MAP@R, R-precision, 1-NN accuracy per class, confusion.

Definitions follow pytorch-metric-learning's AccuracyCalculator (avg_of_avgs=False), so the values are the ones
papers report:

- Neighbours of a query are the references ordered by Euclidean distance, ties by reference id (Faiss's order).
- Leave-one-out: a query that is itself a reference (`query_self_ids`) has its own entry removed from its list.
- R of a query = number of references with its label, minus one when its own entry is among them.
- precision@k = fraction of the k nearest references that have the query's label.
- recall@k = 1 when at least one of the k nearest has the query's label, else 0 (the literature's Recall@K).
- R-precision = fraction of the R nearest that have the query's label.
- MAP@R = (1/R) * sum over the ranks i <= R holding the query's label of precision@i.
- Each is averaged over the queries; queries with R = 0 (no other reference of their class) are left out of the
  averages and counted as `lone`.

Only as deep as needed (max(R, k) per query). With reference embeddings the search is exact and keeps no
neighbour lists (`_ranked_stats`): distances block by block (one matrix product per block of queries of one
class), only the entries below a sampled threshold, and the ranks of each query's same-class references from
whole-block sorts and counts. With a search callable (an approximate index) the metrics come from its neighbour lists,
fetched in chunks at that depth. `ExactSearch` is the exact search as such a callable (ordered by (distance, id)).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from retrieval.errors import RetrievalError, UsageError

Search = Callable[[np.ndarray, int], "tuple[np.ndarray, np.ndarray]"]
"""queries float32 (n, d), k -> (distances float32 (n, k) ascending, ids int64 (n, k)); missing: id -1, inf."""

DEFAULT_KS = (1, 2, 4, 8, 16)
METRIC_DEFINITIONS = (
    "Neighbours: the references ordered by distance (ties by id); a query whose own image is a reference has "
    "that entry left out (leave-one-out). R = number of references with the query's label (not counting its "
    "own entry).",
    "recall@k: fraction of queries with at least one reference of their label among their k nearest "
    "(Recall@K of the metric-learning literature).",
    "precision@k: mean fraction of the k nearest references that have the query's label.",
    "MAP@R: mean over queries of (1/R) x the sum, over the ranks i <= R holding the query's label, of "
    "precision@i (pytorch-metric-learning's mean_average_precision_at_r).",
    "R-precision: mean fraction of the R nearest references that have the query's label.",
    "1-NN accuracy (per class): fraction of a class's queries whose nearest reference has their label "
    "(= recall@1 = precision@1).",
    "Confusion matrix: query class (rows) against the class of the nearest reference (columns).",
    "Queries with R = 0 (no other reference of their class) are left out of every average (counted as lone), "
    "as pytorch-metric-learning's AccuracyCalculator does.",
)
# Elements of a (queries x references) block handled at once: bounds memory at ~100 MB per block.
_BLOCK_ELEMENTS = 1 << 23
_LOW32 = np.uint64(0xFFFFFFFF)


def _as_embeddings(x, what: str) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise RetrievalError(f"{what} must be a 2-d array (n, d), got shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise RetrievalError(f"{what} contain NaN or infinite values")
    return x


def _as_labels(y, n: int, what: str) -> np.ndarray:
    y = np.asarray(y).astype(np.int64, copy=False).reshape(-1)
    if len(y) != n:
        raise RetrievalError(f"{what}: {len(y)} labels for {n} embeddings")
    if len(y) and y.min() < 0:
        raise RetrievalError(f"{what} must be non-negative class indices")
    return y


def _candidate_thresholds(key: np.ndarray, k: int) -> np.ndarray | None:
    """Per row, a value with (almost always) at least k entries <= it but not many more, estimated from every 8th
    column; None when k is so large that sorting whole rows is as cheap."""
    n = key.shape[1]
    if 4 * k >= n:
        return None
    stride = 8
    sample = key[:, ::stride]
    expected = k / stride
    rank = min(sample.shape[1], int(math.ceil(expected + 3.0 * math.sqrt(expected))) + 2)
    return np.partition(sample, rank - 1, axis=1)[:, rank - 1]


def _smallest_rows(key: np.ndarray, offsets: np.ndarray, k: int) -> np.ndarray:
    """For each row of `key` (B, N) plus its offset, the k smallest values (clamped at 0) in (value, position)
    order, packed as uint64 (float bits << 32 | position): non-negative floats order like their bit patterns, so
    one integer sort orders by value, then position.

    Exact: every entry <= the row's threshold is a candidate, and a row with fewer than k candidates takes all
    its columns.
    """
    n_rows, n = key.shape
    thresholds = _candidate_thresholds(key, k)
    packed = np.empty((n_rows, k), np.uint64)
    all_cols = np.arange(n, dtype=np.uint64)
    # Row by row: each row stays in cache while it is filtered, packed and sorted.
    for i in range(n_rows):
        row = key[i]
        cols = None if thresholds is None else np.flatnonzero(row <= thresholds[i])
        if cols is None or len(cols) < k:
            values, cols = row + offsets[i], all_cols
        else:
            values, cols = row[cols], cols.view(np.uint64)  # non-negative int64: the same bits
            values += offsets[i]
        np.maximum(values, 0.0, out=values)
        comp = values.view(np.uint32).astype(np.uint64)
        comp <<= np.uint64(32)
        comp |= cols
        comp.sort()
        packed[i] = comp[:k]
    return packed


def _unpack_positions(packed: np.ndarray) -> np.ndarray:
    return (packed & _LOW32).astype(np.int64)


def _unpack_values(packed: np.ndarray) -> np.ndarray:
    return (packed >> np.uint64(32)).astype(np.uint32).view(np.float32)


class ExactSearch:
    """Exact Euclidean k-NN over reference embeddings, as a `Search` callable.

    Order: ascending distance, ties by position (Faiss's flat-index order). `ids` (default 0..n-1) are what it
    returns for the references.
    """

    def __init__(self, references, ids=None):
        self.references = _as_embeddings(references, "reference embeddings")
        n, d = self.references.shape
        self.ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(self.ids) != n:
            raise ValueError(f"{len(self.ids)} ids for {n} reference embeddings")
        # Distances are computed as |q|^2 + |r|^2 - 2 q.r (a matrix product). Its float32 rounding error grows with
        # the norms, so both sides are first centred on the references' mean (distances do not change): embeddings
        # bunched in one region then get the precision of direct differences, and the order Faiss gives.
        # (The centre is rounded to multiples of 1/64, so data on a coarse grid stays exact: equal distances stay
        # equal, and ties keep their order by id.)
        self._center = (np.round(self.references.mean(axis=0, dtype=np.float64) * 64) / 64).astype(np.float32) \
            if n else None
        centred = self.references - self._center if n else self.references
        # [r, |r|^2] against [-2q, 1] gives |r|^2 - 2 q.r in one product: the squared distance minus |q|^2, which
        # is the same along a row, so it orders the references.
        norms = (centred.astype(np.float64) ** 2).sum(1, keepdims=True).astype(np.float32)
        self._augmented_t = np.ascontiguousarray(np.concatenate([centred, norms], axis=1).T)

    def __len__(self) -> int:
        return len(self.references)

    def __call__(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        positions, squared = self.positions(queries, k)
        dist = np.sqrt(squared)
        ids = np.where(positions >= 0, self.ids[positions], -1) if len(self.ids) else positions
        return dist, ids

    def positions(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like calling it, but positions (0..n-1, -1 past the end) and squared distances: the cheaper form."""
        q = _as_embeddings(queries, "query embeddings")
        k = int(k)
        if k <= 0:
            raise UsageError(f"k must be a positive number of neighbours, got {k}")
        n_ref = len(self.references)
        if n_ref and q.shape[1] != self.references.shape[1]:
            raise RetrievalError(
                f"query embeddings have dimension {q.shape[1]}, references {self.references.shape[1]}"
            )
        kk = min(k, n_ref)
        if kk < k or len(q) == 0:
            positions = np.full((len(q), k), -1, dtype=np.int64)
            squared = np.full((len(q), k), np.inf, dtype=np.float32)
        if n_ref == 0 or len(q) == 0:
            return positions, squared
        q = q - self._center
        q_aug = np.concatenate([-2.0 * q, np.ones((len(q), 1), np.float32)], axis=1)
        q_norms = (q.astype(np.float64) ** 2).sum(1).astype(np.float32)
        rows = int(np.clip(_BLOCK_ELEMENTS // 2 // n_ref, 1, 256))
        packed = np.empty((len(q), kk), np.uint64)
        for s in range(0, len(q), rows):
            key = q_aug[s : s + rows] @ self._augmented_t
            packed[s : s + rows] = _smallest_rows(key, q_norms[s : s + rows], kk)
        if kk == k:
            return _unpack_positions(packed), _unpack_values(packed)
        positions[:, :kk] = _unpack_positions(packed)
        squared[:, :kk] = _unpack_values(packed)
        return positions, squared


class PositionLookup:
    """Id -> position in an array of unique ids (-1 for id -1 or an unknown id); EmbeddingIndex uses it too."""

    def __init__(self, ids: np.ndarray):
        self.n = len(ids)
        self.dense = np.array_equal(ids, np.arange(len(ids)))
        if not self.dense:
            self.order = np.argsort(ids, kind="stable")
            self.sorted_ids = ids[self.order]

    def __call__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if self.dense:
            return np.where((ids >= 0) & (ids < self.n), ids, -1)
        if self.n == 0:
            return np.full(ids.shape, -1, np.int64)
        at = np.clip(np.searchsorted(self.sorted_ids, ids), 0, self.n - 1)
        return np.where((self.sorted_ids[at] == ids) & (ids >= 0), self.order[at], -1)


def drop_self(dist: np.ndarray, ids: np.ndarray, self_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove one column per row of a (n, k+1) result: the query's own id, else the last column (PML's rule)."""
    self_ids = np.asarray(self_ids, dtype=np.int64)
    hit = (ids == self_ids[:, None]) & (self_ids[:, None] >= 0)
    hit &= np.cumsum(hit, axis=1) == 1  # only the first occurrence
    hit[~hit.any(axis=1), -1] = True
    keep = ~hit
    shape = (ids.shape[0], ids.shape[1] - 1)
    return dist[keep].reshape(shape), ids[keep].reshape(shape)


def nearest_neighbors(queries, search: Search, k: int, self_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """k nearest references of each query, leaving out each query's own entry where `self_ids` names one."""
    if self_ids is None or not (np.asarray(self_ids) >= 0).any():
        return search(queries, k)
    dist, ids = search(queries, k + 1)
    return drop_self(dist, ids, self_ids)


@dataclass
class RetrievalMetrics:
    """Averages over the scored (non-lone) queries, per-class figures, and per-query nearest neighbours."""

    ks: tuple[int, ...]
    classes: list[str]
    n_queries: int
    n_references: int
    n_scored: int
    recall: dict[int, float]
    precision: dict[int, float]
    map_at_r: float
    r_precision: float
    confusion: np.ndarray  # (C, C) counts over all queries: row = query class, column = its nearest neighbour's
    query_labels: np.ndarray
    relevant: np.ndarray  # R per query (0 = lone)
    average_precision: np.ndarray  # AP@R per query (nan for lone queries)
    neighbor_ids: np.ndarray  # (n, m) the first m neighbours (m = max k), own entry excluded
    neighbor_distances: np.ndarray
    neighbor_labels: np.ndarray
    per_class: dict[str, dict] = field(default_factory=dict)

    @property
    def n_lone(self) -> int:
        return self.n_queries - self.n_scored

    @property
    def scored(self) -> np.ndarray:
        return self.relevant > 0

    @property
    def nn_correct(self) -> np.ndarray:
        return self.neighbor_labels[:, 0] == self.query_labels

    def to_json(self) -> dict:
        out: dict = {"n_queries": self.n_queries, "n_references": self.n_references, "n_scored": self.n_scored,
                     "n_lone": self.n_lone}
        out.update({f"recall@{k}": self.recall[k] for k in self.ks})
        out.update({f"precision@{k}": self.precision[k] for k in self.ks})
        out["map@r"] = self.map_at_r
        out["r_precision"] = self.r_precision
        out["per_class"] = self.per_class
        out["confusion_matrix"] = {
            "classes": list(self.classes),
            "rows": "query class",
            "columns": "class of the nearest neighbour",
            "counts": self.confusion.tolist(),
        }
        return out


def _parse_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] <= 0:
        raise UsageError(f"--k: expected positive neighbour counts such as 1,2,4,8,16, got {list(ks)}")
    return ks


class _QueryStats:
    """Per-query results filled by the two neighbour paths."""

    def __init__(self, n: int, ks: tuple[int, ...]):
        self.ks = ks
        self.m = ks[-1]  # neighbours kept per query (reports, calibration)
        self.hits = np.zeros((n, len(ks)), bool)
        self.prec = np.zeros((n, len(ks)), np.float64)
        self.rprec = np.full(n, np.nan)
        self.ap = np.full(n, np.nan)
        self.nb_pos = np.full((n, self.m), -1, np.int64)
        self.nb_dist = np.full((n, self.m), np.inf, np.float32)


def _list_stats(stats: _QueryStats, rows: np.ndarray, q, ql, label_at, self_pos, relevant, find, *, squared: bool,
                bar=None) -> None:
    """Metrics from neighbour lists: `find(queries, k)` -> (positions, distances or squared distances)."""
    ks, m = stats.ks, stats.m
    depth = np.maximum(relevant[rows], ks[-1])
    order = rows[np.argsort(depth, kind="stable")]
    depth = np.maximum(relevant[order], ks[-1])
    budget = _BLOCK_ELEMENTS // 4  # neighbour-list entries per chunk of queries
    start = 0
    while start < len(order):
        # queries sorted by depth: the chunk's last query needs the deepest search
        end = min(len(order), start + max(1, budget // int(depth[start])))
        while end - start > 1 and (end - start) * int(depth[end - 1]) > budget:
            end = start + max(1, (end - start) // 2)
        idx = order[start:end]
        d = int(depth[start:end].max())
        if (self_pos[idx] >= 0).any():
            pos, dist = find(q[idx], d + 1)
            dist, pos = drop_self(dist, pos, self_pos[idx])
        else:
            pos, dist = find(q[idx], d)
        rel = label_at[pos] == ql[idx, None]
        for j, k in enumerate(ks):
            stats.hits[idx, j] = rel[:, :k].any(axis=1)
            stats.prec[idx, j] = np.count_nonzero(rel[:, :k], axis=1) / k
        r = relevant[idx]
        rel &= np.arange(d)[None, :] < r[:, None]  # only the first R ranks count from here on
        # precision@i at each relevant rank i: (relevant so far) / i, summed by one matrix-vector product
        hits_so_far = np.cumsum(rel, axis=1, dtype=np.float64)
        hits_so_far *= rel
        with np.errstate(invalid="ignore", divide="ignore"):
            stats.rprec[idx] = np.where(r > 0, np.count_nonzero(rel, axis=1) / r, np.nan)
            stats.ap[idx] = np.where(r > 0, (hits_so_far @ (1.0 / np.arange(1, d + 1))) / r, np.nan)
        stats.nb_pos[idx] = pos[:, :m]
        stats.nb_dist[idx] = np.sqrt(dist[:, :m]) if squared else dist[:, :m]
        if bar is not None:
            bar.update(len(idx))
        start = end


_FINITE_MAX = np.float32(np.finfo(np.float32).max)


def _pipelined(work, items):
    """Yield work(item) for each item, computing the next item's result in a helper thread while the caller uses
    the current one (matrix products and large numpy operations release the GIL), with the BLAS library held to
    one thread: on two cores each side then gets one, instead of BLAS threads spinning against the caller."""
    from concurrent.futures import ThreadPoolExecutor

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn (a pytorch-metric-learning need)
        import contextlib

        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(limits=1, user_api="blas")
    with limits, ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(work, items[0]) if items else None
        for i in range(len(items)):
            result = pending.result()
            pending = pool.submit(work, items[i + 1]) if i + 1 < len(items) else None
            yield result


def _ranked_stats(stats: _QueryStats, q, ql, references, rl, self_pos, relevant, bar=None) -> None:
    """Metrics by exact search without neighbour lists: only the ranks of each query's references of its class.

    References are grouped by class and queries too, so a block of queries shares one slice of same-class
    columns. The candidates of a query are the entries <= a sampled threshold above its depth-th smallest (as in
    ExactSearch). Per block, in whole-array operations: the class slice is sorted row by row (excluded entries
    as +inf), the other candidates sorted by (row, value), and the rank of the t-th same-class reference is
    t + the number of others closer, counted by locating each other candidate among the sorted same-class
    values. Rows where a value is shared across the two sides (ties are ordered by id, as Faiss does) go
    through `_ranked_row`, one query at a time. The first m neighbours are the candidates at or below the m-th
    smallest value, sorted by (value, id).
    """
    kmax = stats.ks[-1]
    order = np.argsort(rl, kind="stable")  # references grouped by class
    exact = ExactSearch(references[order])
    n_ref = len(order)
    counts = np.bincount(rl, minlength=int(ql.max(initial=0)) + 1)
    starts = np.cumsum(counts) - counts
    inverse = np.empty(n_ref, np.int64)
    inverse[order] = np.arange(n_ref)
    self_sorted = np.where(self_pos >= 0, inverse[np.maximum(self_pos, 0)], -1) if n_ref else self_pos
    qc = q - exact._center
    q_aug = np.concatenate([-2.0 * qc, np.ones((len(q), 1), np.float32)], axis=1)
    q_norms = (qc.astype(np.float64) ** 2).sum(1).astype(np.float32)
    block = int(np.clip(_BLOCK_ELEMENTS // 2 // max(n_ref, 1), 1, 256))
    by_class = np.argsort(ql, kind="stable")
    group_starts = np.flatnonzero(np.r_[True, ql[by_class][1:] != ql[by_class][:-1]]) if len(q) else []
    group_ends = np.r_[group_starts[1:], len(q)] if len(q) else []
    blocks = [(int(ql[by_class[g0]]), by_class[g0:g1][b0 : b0 + block])
              for g0, g1 in zip(group_starts, group_ends) for b0 in range(0, g1 - g0, block)]

    def prepare(block):
        # helper thread: this block's distances and candidates
        c, rows = block
        key = q_aug[rows] @ exact._augmented_t
        lo, hi = (int(starts[c]), int(starts[c] + counts[c])) if c < len(counts) else (0, 0)
        own = self_sorted[rows]
        has_own = own >= 0
        key[np.flatnonzero(has_own), own[has_own]] = np.inf  # a query is not its own neighbour
        need = np.minimum(np.maximum(relevant[rows], kmax), n_ref - has_own.astype(np.int64))
        thresholds = _candidate_thresholds(key, min(int(np.maximum(relevant[rows], kmax).max()), n_ref))
        return rows, key, lo, hi, _block_candidates(key, thresholds, need, lo, hi, q_norms[rows])

    for rows, key, lo, hi, candidates in _pipelined(prepare, blocks):
        _ranked_block(stats, key, rows, q_norms[rows], candidates, relevant[rows], lo, hi, order)
        if bar is not None:
            bar.update(len(rows))


def _block_candidates(key, thresholds, need, lo: int, hi: int, q_norms):
    """A block's candidates: entries <= the row's threshold (every finite one where that gives fewer than
    `need`). Returns the thresholds used, the class slice's candidate mask, and the other candidates as
    (row, column, value) sorted by (row, value); values are squared distances clamped at 0."""
    n_rows, n = key.shape
    t = np.full(n_rows, _FINITE_MAX, np.float32) if thresholds is None else \
        np.minimum(thresholds, _FINITE_MAX).astype(np.float32)
    for attempt in range(2):
        same = key[:, lo:hi] <= t[:, None]
        n_r, n_c = [], []
        for c0, c1 in ((0, lo), (hi, n)):  # the columns left and right of the class slice
            rr, cc = np.divmod(np.flatnonzero(key[:, c0:c1] <= t[:, None]), c1 - c0) if c1 > c0 else ((), ())
            n_r.append(rr)
            n_c.append(np.asarray(cc, np.int64) + c0)
        n_r, n_c = np.concatenate(n_r).astype(np.int64), np.concatenate(n_c)
        short = np.flatnonzero(np.count_nonzero(same, axis=1) + np.bincount(n_r, minlength=n_rows) < need)
        if attempt or not len(short):
            break
        t[short] = _FINITE_MAX  # the sampled threshold fell short: take every (finite) column
    n_v = key.reshape(-1)[n_r * n + n_c]
    n_v += q_norms[n_r]
    np.maximum(n_v, 0.0, out=n_v)
    if n < (1 << 24):  # (row, value, column) packed in one integer: a plain sort instead of an argsort
        packed = (n_r.astype(np.uint64) << np.uint64(56)) | (n_v.view(np.uint32).astype(np.uint64) << np.uint64(24))
        packed |= n_c.astype(np.uint64)
        packed.sort()
        n_r = (packed >> np.uint64(56)).astype(np.int64)
        n_v = ((packed >> np.uint64(24)) & _LOW32).astype(np.uint32).view(np.float32)
        n_c = (packed & np.uint64((1 << 24) - 1)).astype(np.int64)
    else:
        by = np.lexsort((n_v, n_r))
        n_r, n_c, n_v = n_r[by], n_c[by], n_v[by]
    return t, same, n_r, n_c, n_v


def _ranked_block(stats: _QueryStats, key, rows, q_norms, candidates, relevant, lo: int, hi: int,
                  order: np.ndarray) -> None:
    """`_ranked_stats` for one block of queries of one class, given its candidates (see there)."""
    ks, m = stats.ks, stats.m
    ks_arr = np.array(ks)
    n_rows = len(rows)
    t, same, n_r, n_c, n_v = candidates
    # same-class slice: values (distance^2, clamped at 0) sorted per row, non-candidates as +inf
    pos = key[:, lo:hi] + q_norms[:, None]
    np.maximum(pos, 0.0, out=pos)
    np.copyto(pos, np.inf, where=~same)
    p_sorted = np.sort(pos, axis=1)
    width = hi - lo
    n_packed = (n_r.astype(np.uint64) << np.uint64(32)) | n_v.view(np.uint32).astype(np.uint64)
    n_count = np.bincount(n_r, minlength=n_rows)
    n_start = np.cumsum(n_count) - n_count
    # others closer than each same-class value: where each other lands among its row's sorted same-class values
    p_packed = ((np.arange(n_rows, dtype=np.uint64) << np.uint64(32))[:, None]
                | p_sorted.view(np.uint32).astype(np.uint64)).ravel()
    at = np.searchsorted(p_packed, n_packed, "right")  # same-class values <= the other's: it is not closer
    local = at - n_r * width
    tie_rows = np.unique(n_r[(local > 0) & (p_packed[np.maximum(at - 1, 0)] == n_packed)]) if width else n_r[:0]
    landing = np.bincount(n_r * (width + 1) + local, minlength=n_rows * (width + 1)).reshape(n_rows, width + 1)
    ranks = np.cumsum(landing[:, :width], axis=1)  # others closer ...
    ranks += np.arange(1, width + 1)[None, :]  # ... + the same-class position
    ranks[np.isinf(p_sorted)] = np.iinfo(np.int64).max // 4  # not candidates: never within any depth
    simple = np.ones(n_rows, bool)
    simple[tie_rows] = False
    sel = rows[simple]
    rk, r = (ranks, relevant) if not len(tie_rows) else (ranks[simple], relevant[simple])
    stats.hits[sel] = rk[:, :1] <= ks_arr[None, :] if width else False
    top = rk[:, : ks[-1]]
    stats.prec[sel] = (top[:, :, None] <= ks_arr[None, None, :]).sum(axis=1) / ks_arr
    inside = rk <= r[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        stats.rprec[sel] = np.where(r > 0, inside.sum(axis=1) / r, np.nan)
        precision_at = np.divide(np.arange(1, width + 1, dtype=np.float64)[None, :], rk, where=inside,
                                 out=np.zeros(rk.shape))
        stats.ap[sel] = np.where(r > 0, precision_at.sum(axis=1) / r, np.nan)
    # first m neighbours: the m-th smallest of (first m same-class, first m others) bounds them
    j = np.arange(m)
    n_first = np.where(j[None, :] < n_count[:, None], n_v[np.minimum(n_start[:, None] + j[None, :], len(n_v) - 1)]
                       if len(n_v) else np.inf, np.inf)
    u = np.sort(np.concatenate([p_sorted[:, :m], n_first], axis=1), axis=1)[:, m - 1]
    pr, pc = np.divmod(np.flatnonzero(same & (pos <= u[:, None])), width)
    keep = n_v <= u[n_r]
    cand_r = np.concatenate([pr, n_r[keep]])
    cand_v = np.concatenate([pos[pr, pc], n_v[keep]])
    cand_id = order[np.concatenate([lo + pc, n_c[keep]])]
    by = np.lexsort((cand_id, cand_v, cand_r))
    cand_r, cand_v, cand_id = cand_r[by], cand_v[by], cand_id[by]
    first_of_row = np.searchsorted(cand_r, np.arange(n_rows))
    slot = np.arange(len(cand_r)) - first_of_row[cand_r]
    take = (slot < m) & simple[cand_r]
    stats.nb_pos[rows[cand_r[take]], slot[take]] = cand_id[take]
    stats.nb_dist[rows[cand_r[take]], slot[take]] = np.sqrt(cand_v[take])
    for i in tie_rows.tolist():
        _ranked_row(stats, key[i], int(rows[i]), float(q_norms[i]), float(t[i]), lo, hi, int(relevant[i]), order)


def _ranked_row(stats: _QueryStats, row: np.ndarray, row_index: int, q_norm: float, t: float, lo: int, hi: int,
                r: int, order: np.ndarray) -> None:
    """One query's figures from its distance-key row (the general path: value ties across classes, ordered by
    id); `t` is the row's candidate threshold from `_block_candidates`, which already holds enough entries."""
    ks, m = stats.ks, stats.m
    ks_arr = np.array(ks)
    cols = np.flatnonzero(row <= t)
    values = row[cols]
    values += q_norm
    np.maximum(values, 0.0, out=values)
    a, b = np.searchsorted(cols, (lo, hi))  # cols ascend: the same-class slice is cols[a:b]
    pos_cols, pos_values = cols[a:b], values[a:b]
    neg_cols, neg_values = np.concatenate([cols[:a], cols[b:]]), np.concatenate([values[:a], values[b:]])
    p_sorted = np.sort(pos_values)
    n_sorted = np.sort(neg_values)
    # merge the two sorted runs (a stable sort of two runs is linear): ranks of same-class references,
    # counting others with an equal value as farther for now
    merged = np.argsort(np.concatenate([p_sorted, n_sorted]), kind="stable")
    ranks = np.flatnonzero(merged < len(p_sorted)) + 1
    closer = ranks - np.arange(1, len(ranks) + 1)
    tied = np.flatnonzero(n_sorted[np.minimum(closer, len(n_sorted) - 1)] == p_sorted) \
        if len(n_sorted) else closer[:0]
    if len(tied):
        # equal distances: others with a smaller id come first (Faiss's order); order the candidates
        # holding a tied value by (value, id) and count, for each same-class one, the others before it
        values_tied = p_sorted[tied]
        in_p, in_n = np.isin(pos_values, values_tied), np.isin(neg_values, values_tied)
        v = np.concatenate([pos_values[in_p], neg_values[in_n]])
        ids = order[np.concatenate([pos_cols[in_p], neg_cols[in_n]])]
        by = np.argsort((v.view(np.uint32).astype(np.uint64) << np.uint64(32)) | ids.view(np.uint64))
        other = by >= int(in_p.sum())
        others_so_far = np.cumsum(other)
        group_start = np.r_[True, v[by][1:] != v[by][:-1]]
        before_group = (others_so_far - other)[group_start][np.cumsum(group_start) - 1]
        ranks[np.flatnonzero(np.isin(p_sorted, values_tied))] += (others_so_far - before_group)[~other]
    stats.hits[row_index] = (ranks[0] <= ks_arr) if len(ranks) else False
    stats.prec[row_index] = np.searchsorted(ranks, ks_arr, "right") / ks_arr
    if r > 0:
        within = int(np.searchsorted(ranks, r, "right"))
        stats.rprec[row_index] = within / r
        stats.ap[row_index] = float(np.sum(np.arange(1, within + 1) / ranks[:within])) / r
    # first m neighbours: candidates at or below the m-th smallest value, by (value, original position)
    firsts = np.sort(np.concatenate([p_sorted[:m], n_sorted[:m]]))
    if len(firsts) == 0:
        return
    u = firsts[min(m, len(firsts)) - 1]
    first = values <= u
    original = order[cols[first]]
    packed = (values[first].view(np.uint32).astype(np.uint64) << np.uint64(32)) | original.astype(np.uint64)
    packed.sort()
    top = packed[:m]
    stats.nb_pos[row_index, : len(top)] = _unpack_positions(top)
    stats.nb_dist[row_index, : len(top)] = np.sqrt(_unpack_values(top))


def retrieval_metrics(
    queries,
    query_labels,
    references=None,
    reference_labels=None,
    *,
    search: Search | None = None,
    reference_ids=None,
    query_self_ids=None,
    ks: Sequence[int] = DEFAULT_KS,
    classes: Sequence[str] | None = None,
    progress: bool = False,
) -> RetrievalMetrics:
    """Retrieval metrics of `queries` against references (see the module docstring for the definitions).

    References are given as embeddings (`references`, searched exactly) or as a `search` callable (e.g.
    EmbeddingIndex.search) with `reference_labels` aligned to `reference_ids` (default 0..n-1). With neither,
    the queries are their own references, leave-one-out (AccuracyCalculator.get_accuracy(query, labels)).
    `query_self_ids[i]` is the id of query i's own entry among the references (-1: not there). Labels are
    class indices shared by queries and references; `classes` names them.
    """
    ks = _parse_ks(ks)
    q = _as_embeddings(queries, "query embeddings")
    ql = _as_labels(query_labels, len(q), "query labels")
    if search is None and references is None:
        references, reference_labels = q, ql
        if query_self_ids is None:
            query_self_ids = np.arange(len(q), dtype=np.int64)
    if reference_labels is None:
        raise ValueError("reference_labels are required")
    rl = _as_labels(reference_labels, len(np.asarray(reference_labels).reshape(-1)), "reference labels")
    ref_ids = np.arange(len(rl), dtype=np.int64) if reference_ids is None else \
        np.asarray(reference_ids, dtype=np.int64).reshape(-1)
    if len(ref_ids) != len(rl):
        raise ValueError(f"{len(ref_ids)} reference ids for {len(rl)} reference labels")
    position_of = PositionLookup(ref_ids)
    # Everything below works on positions in the reference arrays (-1: no neighbour).
    if search is None:
        references = _as_embeddings(references, "reference embeddings")
        if len(references) != len(rl):
            raise RetrievalError(f"reference labels: {len(rl)} labels for {len(references)} embeddings")
    n_ref = len(rl)
    label_at = np.append(rl, -1)  # label_at[-1] == -1: "no neighbour"
    id_at = np.append(ref_ids, -1)
    self_ids = (np.full(len(q), -1, np.int64) if query_self_ids is None
                else np.asarray(query_self_ids, dtype=np.int64).reshape(-1))
    if len(self_ids) != len(q):
        raise ValueError(f"{len(self_ids)} self ids for {len(q)} queries")
    self_pos = position_of(self_ids)

    n_classes = max(int(ql.max(initial=-1)), int(rl.max(initial=-1))) + 1
    if classes is None:
        classes = [str(i) for i in range(n_classes)]
    classes = [str(c) for c in classes]
    if n_classes > len(classes):
        raise ValueError(f"labels go up to {n_classes - 1} but only {len(classes)} class names were given")
    counts = np.bincount(rl, minlength=len(classes))
    own_counted = (self_pos >= 0) & (label_at[self_pos] == ql)
    relevant = counts[ql] - own_counted.astype(np.int64)

    stats = _QueryStats(len(q), ks)
    from tqdm import tqdm

    bar = tqdm(total=len(q), desc="neighbours", unit="query", disable=not progress, leave=False)
    try:
        if search is None:
            _ranked_stats(stats, q, ql, references, rl, self_pos, relevant, bar)
        else:
            def find(x, k):
                dist, ids = search(x, k)
                return position_of(ids), dist

            _list_stats(stats, np.arange(len(q)), q, ql, label_at, self_pos, relevant, find, squared=False, bar=bar)
    finally:
        bar.close()
    hits, prec, rprec, ap, nb_pos, nb_dist = stats.hits, stats.prec, stats.rprec, stats.ap, stats.nb_pos, stats.nb_dist

    nb_labels = label_at[nb_pos]
    nb_ids = id_at[nb_pos]
    scored = relevant > 0
    n_scored = int(scored.sum())

    def mean(x) -> float:
        return float(np.mean(x[scored], dtype=np.float64)) if n_scored else float("nan")

    # every query with a neighbour, lone ones too: where a class the references lack ends up is worth seeing
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    has_nn = nb_labels[:, 0] >= 0
    np.add.at(confusion, (ql[has_nn], nb_labels[has_nn, 0]), 1)
    per_class = {}
    for c in np.unique(ql[scored]):
        sel = scored & (ql == c)
        per_class[classes[c]] = {
            "queries": int(sel.sum()),
            "nn_accuracy": float(hits[sel, 0].mean()),
            "map@r": float(ap[sel].mean()),
            "r_precision": float(rprec[sel].mean()),
        }
    return RetrievalMetrics(
        ks=ks,
        classes=classes,
        n_queries=len(q),
        n_references=n_ref,
        n_scored=n_scored,
        recall={k: mean(hits[:, j].astype(np.float64)) for j, k in enumerate(ks)},
        precision={k: mean(prec[:, j]) for j, k in enumerate(ks)},
        map_at_r=mean(ap),
        r_precision=mean(rprec),
        confusion=confusion,
        query_labels=ql,
        relevant=relevant,
        average_precision=ap,
        neighbor_ids=nb_ids,
        neighbor_distances=nb_dist,
        neighbor_labels=nb_labels,
        per_class=per_class,
    )


# -- queries against an index folder (what `retrieval evaluate` and `retrieval calibrate` run) --------------------
def index_vectors(index) -> np.ndarray | None:
    """The stored vectors of an exact (Flat) EmbeddingIndex, in the order of index.ids; None for approximate
    indexes (their search is what their users get, so that is what gets evaluated)."""
    import faiss

    inner = faiss.downcast_index(index.index.index) if hasattr(index.index, "index") else None
    if isinstance(inner, faiss.IndexFlat) and inner.ntotal == len(index.ids):
        return inner.reconstruct_n(0, inner.ntotal)
    return None


def index_search(index) -> Search:
    """Exact search over a Flat index's vectors (the same neighbours, found faster than Faiss's k-heap at MAP@R
    depths), else the index's own search."""
    vectors = index_vectors(index)
    return index.search if vectors is None else ExactSearch(vectors, ids=index.ids)


@dataclass
class IndexQueries:
    """A query dataset embedded by an index's tower, with labels in the index's class space."""

    index: "object"  # retrieval.index.EmbeddingIndex
    dataset: "object"  # retrieval.data.ImageDataset
    embeddings: np.ndarray
    labels: np.ndarray  # index class ids; classes the index lacks get ids len(index.classes), ...
    classes: list[str]  # the index's classes, then the query classes it lacks
    missing_classes: list[str]
    self_ids: np.ndarray  # id of each query's own entry in the index (same source), else -1


def _source_key(source: str) -> str:
    from retrieval.data.specs import parse_item_spec

    return source if parse_item_spec(source) is not None else os.path.realpath(source)


def load_index_queries(folder, query_spec: str, *, root=None, classes=None, exclude=None, subset=None,
                       seed: int = 0, batch_size: int | None = None, device="cpu", checkpoint=None,
                       log: Callable[[str], None] | None = None) -> IndexQueries:
    """Load the index in `folder` and its tower, load and embed the query spec, match labels by class name and
    find each query's own entry in the index (by source) for leave-one-out."""
    from retrieval.data.specs import load_dataset
    from retrieval.embed import embed_images
    from retrieval.index import default_batch_size, load_index, load_index_tower

    log = log or (lambda msg: None)
    index = load_index(folder)
    if len(index) == 0:
        raise RetrievalError(f"the index in {folder} is empty")
    ckpt = load_index_tower(index, device=device, checkpoint=checkpoint)
    ds = load_dataset(query_spec, root=root, classes=classes, exclude=exclude, subset=subset, seed=seed, log=log)
    emb = embed_images(ckpt.tower, ds.images, batch_size=batch_size or default_batch_size(device), device=device,
                       progress=True, desc="embedding queries")
    all_classes = list(index.classes)
    missing = [c for c in ds.class_counts() if c not in all_classes]
    all_classes += missing
    to_index = np.array([all_classes.index(c) if c in all_classes else -1 for c in ds.classes], np.int64)
    labels = to_index[ds.labels.numpy()]
    by_source = {_source_key(s): i for s, i in zip(index.sources, index.ids.tolist())}
    self_ids = np.array([by_source.get(_source_key(s), -1) for s in ds.sources], np.int64)
    return IndexQueries(index, ds, emb, labels, all_classes, missing, self_ids)


def evaluate_index(folder, query_spec: str, ks: Sequence[int] = DEFAULT_KS, *, root=None, classes=None,
                   exclude=None, subset=None, seed: int = 0, batch_size: int | None = None, device="cpu",
                   checkpoint=None, log: Callable[[str], None] | None = None) -> tuple[RetrievalMetrics, IndexQueries]:
    """Retrieval metrics of the images of `query_spec` against the index in `folder` (see the module docstring).

    Queries whose own image is in the index are evaluated leave-one-out; queries of classes the index lacks
    have R = 0 and are left out of the averages (counted as lone)."""
    ks = _parse_ks(ks)
    iq = load_index_queries(folder, query_spec, root=root, classes=classes, exclude=exclude, subset=subset,
                            seed=seed, batch_size=batch_size, device=device, checkpoint=checkpoint, log=log)
    vectors = index_vectors(iq.index)
    metrics = retrieval_metrics(
        iq.embeddings, iq.labels, vectors, iq.index.labels, search=None if vectors is not None else iq.index.search,
        reference_ids=iq.index.ids, query_self_ids=iq.self_ids, ks=ks, classes=iq.classes, progress=True,
    )
    return metrics, iq
