"""Exact k-nearest-neighbour search and ranking of references: the engine behind the metrics and the `Search`
callable.

- Neighbours of a query are the references ordered by Euclidean distance, ties by reference position (Faiss's
  order). Leave-one-out: a query's own entry among the references is left out of its list (`drop_self`).
- `ExactSearch` is the exact search as a `Search` callable; `nearest_neighbors` runs any `Search` with
  leave-one-out; `PositionLookup` maps reference ids to positions.
- `rank_exact` and `rank_with_search` rank the references of each query's class, yielding `Ranking` blocks: per
  query R, the 1-based ranks of its relevant references as deep as the metrics need (max(R, k)), and its first k
  neighbours. They compute no metric; `retrieval.metrics` scores the rankings.

`rank_exact` keeps no neighbour lists: distances block by block (one matrix product per block of queries of one
class, computed in a helper thread while the previous block is ranked), only the entries below a sampled
threshold, and the ranks of each query's same-class references from whole-block sorts and counts. A block's
memory is bounded (`_BLOCK_ELEMENTS`), whatever the number of queries. `rank_with_search` ranks from the neighbour
lists of a search callable (an approximate index), fetched in chunks at that depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from retrieval.errors import RetrievalError, UsageError

Search = Callable[[np.ndarray, int], "tuple[np.ndarray, np.ndarray]"]
"""queries float32 (n, d), k -> (distances float32 (n, k) ascending, ids int64 (n, k)); missing: id -1, inf."""

# Elements of a (queries x references) block handled at once: bounds memory at ~100 MB per block.
_BLOCK_ELEMENTS = 1 << 23
_LOW32 = np.uint64(0xFFFFFFFF)
_FINITE_MAX = np.float32(np.finfo(np.float32).max)
NOT_RANKED = np.iinfo(np.int64).max // 4
"""`Ranking.ranks` entry of a relevant reference not ranked (farther than the query's depth)."""


def as_embeddings(x, what: str) -> np.ndarray:
    """`x` as a C-contiguous float32 (n, d) array of finite values, else RetrievalError naming `what`."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise RetrievalError(f"{what} must be a 2-d array (n, d), got shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise RetrievalError(f"{what} contain NaN or infinite values")
    return x


def as_labels(y, n: int, what: str) -> np.ndarray:
    """`y` as n non-negative int64 class indices, else RetrievalError naming `what`."""
    y = np.asarray(y).astype(np.int64, copy=False).reshape(-1)
    if len(y) != n:
        raise RetrievalError(f"{what}: {len(y)} labels for {n} embeddings")
    if len(y) and y.min() < 0:
        raise RetrievalError(f"{what} must be non-negative class indices")
    return y


# -- exact search ----------------------------------------------------------------------------------------------
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
        self.references = as_embeddings(references, "reference embeddings")
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
        q = as_embeddings(queries, "query embeddings")
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


# -- rankings --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ranking:
    """Where the relevant references of a block of queries rank (what every metric is scored from), and their
    first k neighbours. References are named by position in the reference arrays.

    `ranks[i]` ascends: the 1-based ranks, in the query's neighbour list (own entry left out), of the references
    with its label. Every such rank <= the query's depth max(R, k) is there; entries past that depth are only
    known to be farther (exact ranks, or NOT_RANKED), so a rank compared with a k or an R <= depth is exact.
    """

    rows: np.ndarray  # (b,) int64: the queries' indices
    relevant: np.ndarray  # (b,) int64: R, references with the query's label (own entry not counted); 0 = lone
    ranks: np.ndarray  # (b, w) int64, w >= each row's number of relevant references within its depth
    neighbors: np.ndarray  # (b, k) int64: positions of the first k neighbours, -1 past the end
    distances: np.ndarray  # (b, k) float32: their distances, inf past the end


def relevant_counts(query_labels: np.ndarray, reference_labels: np.ndarray, self_positions: np.ndarray) -> np.ndarray:
    """R per query: the references with its label, minus its own entry (`self_positions`, -1: none) among them."""
    counts = np.bincount(reference_labels, minlength=int(query_labels.max(initial=-1)) + 1)
    label_at = np.append(reference_labels, -1)
    own_counted = (self_positions >= 0) & (label_at[self_positions] == query_labels)
    return counts[query_labels] - own_counted.astype(np.int64)


def rank_with_search(queries, query_labels, reference_labels, find, self_positions, k: int) -> Iterator[Ranking]:
    """Rankings from neighbour lists: `find(queries, depth)` -> (positions, distances), as a `Search` gives them
    (positions instead of ids). Queries are fetched in chunks of similar depth max(R, k)."""
    relevant = relevant_counts(query_labels, reference_labels, self_positions)
    label_at = np.append(reference_labels, -1)  # label_at[-1] == -1: "no neighbour"
    order = np.argsort(np.maximum(relevant, k), kind="stable")
    depth = np.maximum(relevant[order], k)
    budget = _BLOCK_ELEMENTS // 4  # neighbour-list entries per chunk of queries
    start = 0
    while start < len(order):
        # queries sorted by depth: the chunk's last query needs the deepest search
        end = min(len(order), start + max(1, budget // int(depth[start])))
        while end - start > 1 and (end - start) * int(depth[end - 1]) > budget:
            end = start + max(1, (end - start) // 2)
        idx = order[start:end]
        d = int(depth[start:end].max())
        if (self_positions[idx] >= 0).any():
            pos, dist = find(queries[idx], d + 1)
            dist, pos = drop_self(dist, pos, self_positions[idx])
        else:
            pos, dist = find(queries[idx], d)
        rel = label_at[pos] == query_labels[idx, None]
        # the columns holding the query's label, in order, are its ranks: row i's j-th goes to ranks[i, j]
        count = np.count_nonzero(rel, axis=1)
        ranks = np.full((len(idx), int(count.max(initial=0))), NOT_RANKED, np.int64)
        ranks[np.arange(ranks.shape[1])[None, :] < count[:, None]] = np.flatnonzero(rel) % rel.shape[1] + 1
        yield Ranking(idx, relevant[idx], ranks, pos[:, :k], dist[:, :k])
        start = end


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


def rank_exact(queries, query_labels, references, reference_labels, self_positions, k: int) -> Iterator[Ranking]:
    """Rankings by exact search without neighbour lists: only the ranks of each query's references of its class.

    References are grouped by class and queries too, so a block of queries shares one slice of same-class
    columns. The candidates of a query are the entries <= a sampled threshold above its depth-th smallest (as in
    ExactSearch). Per block, in whole-array operations: the class slice is sorted row by row (excluded entries
    as +inf), the other candidates sorted by (row, value), and the rank of the t-th same-class reference is
    t + the number of others closer, counted by locating each other candidate among the sorted same-class
    values. Rows where a value is shared across the two sides (ties are ordered by id, as Faiss does) go
    through `_rank_row`, one query at a time. The first k neighbours are the candidates at or below the k-th
    smallest value, sorted by (value, id). Blocks come in class order, the next one computed in a helper thread
    while the caller uses the current one.
    """
    q, ql, rl = queries, query_labels, reference_labels
    relevant = relevant_counts(ql, rl, self_positions)
    order = np.argsort(rl, kind="stable")  # references grouped by class
    exact = ExactSearch(references[order])
    n_ref = len(order)
    counts = np.bincount(rl, minlength=int(ql.max(initial=0)) + 1)
    starts = np.cumsum(counts) - counts
    inverse = np.empty(n_ref, np.int64)
    inverse[order] = np.arange(n_ref)
    self_sorted = np.where(self_positions >= 0, inverse[np.maximum(self_positions, 0)], -1) if n_ref \
        else self_positions
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
        need = np.minimum(np.maximum(relevant[rows], k), n_ref - has_own.astype(np.int64))
        thresholds = _candidate_thresholds(key, min(int(np.maximum(relevant[rows], k).max()), n_ref))
        return rows, key, lo, hi, _block_candidates(key, thresholds, need, lo, hi, q_norms[rows])

    for rows, key, lo, hi, candidates in _pipelined(prepare, blocks):
        yield _rank_block(key, rows, q_norms[rows], candidates, relevant[rows], lo, hi, order, k)


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


def _rank_block(key, rows, q_norms, candidates, relevant, lo: int, hi: int, order: np.ndarray, m: int) -> Ranking:
    """`rank_exact` for one block of queries of one class, given its candidates (see there)."""
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
    ranks[np.isinf(p_sorted)] = NOT_RANKED  # not candidates: never within any depth
    simple = np.ones(n_rows, bool)
    simple[tie_rows] = False
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
    neighbors = np.full((n_rows, m), -1, np.int64)
    distances = np.full((n_rows, m), np.inf, np.float32)
    neighbors[cand_r[take], slot[take]] = cand_id[take]
    distances[cand_r[take], slot[take]] = np.sqrt(cand_v[take])
    for i in tie_rows.tolist():
        _rank_row(key[i], float(q_norms[i]), float(t[i]), lo, hi, order, ranks[i], neighbors[i], distances[i])
    return Ranking(rows, relevant, ranks, neighbors, distances)


def _rank_row(row: np.ndarray, q_norm: float, t: float, lo: int, hi: int, order: np.ndarray, ranks_out: np.ndarray,
              neighbors_out: np.ndarray, distances_out: np.ndarray) -> None:
    """One query's ranks and first neighbours from its distance-key row, written into the `_out` rows (the
    general path: value ties across classes, ordered by id); `t` is the row's candidate threshold from
    `_block_candidates`, which already holds enough entries."""
    m = len(neighbors_out)
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
    ranks_out[:] = NOT_RANKED
    ranks_out[: len(ranks)] = ranks
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
    neighbors_out[: len(top)] = _unpack_positions(top)
    distances_out[: len(top)] = np.sqrt(_unpack_values(top))
