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

Only as many neighbours as needed are looked at (max(R, k), per query). `ExactSearch` finds them exactly without
Faiss's k-heap (slow at the depths MAP@R needs): distances block by block, a sampled threshold, then a sort of
the few candidates per query.
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
    rank = min(sample.shape[1], int(math.ceil(expected * 1.1 + 3.0 * math.sqrt(expected))) + 2)
    return np.partition(sample, rank - 1, axis=1)[:, rank - 1]


def _smallest_rows(key: np.ndarray, offsets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `key` (B, N) plus its offset: positions of the k smallest values in (value, position)
    order, and those values clamped at 0 (float32 (B, k)).

    Exact: every entry <= the row's threshold is a candidate, and a row with fewer than k candidates takes all
    its columns. Candidates are packed as (float bits << 32 | position): non-negative floats order like their
    bit patterns, so one integer sort orders by value, then position.
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
            values, cols = row[cols], cols.astype(np.uint64)
            values += offsets[i]
        np.maximum(values, 0.0, out=values)
        comp = values.view(np.uint32).astype(np.uint64)
        comp <<= np.uint64(32)
        comp |= cols
        comp.sort()
        packed[i] = comp[:k]
    positions = (packed & _LOW32).astype(np.int64)
    values = (packed >> np.uint64(32)).astype(np.uint32).view(np.float32)
    return positions, values


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
        q = _as_embeddings(queries, "query embeddings")
        k = int(k)
        if k <= 0:
            raise UsageError(f"k must be a positive number of neighbours, got {k}")
        n_ref = len(self.references)
        if n_ref and q.shape[1] != self.references.shape[1]:
            raise RetrievalError(
                f"query embeddings have dimension {q.shape[1]}, references {self.references.shape[1]}"
            )
        dist = np.full((len(q), k), np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        if n_ref == 0 or len(q) == 0:
            return dist, ids
        kk = min(k, n_ref)
        q = q - self._center
        q_aug = np.concatenate([-2.0 * q, np.ones((len(q), 1), np.float32)], axis=1)
        q_norms = (q.astype(np.float64) ** 2).sum(1).astype(np.float32)
        rows = int(np.clip(_BLOCK_ELEMENTS // 2 // n_ref, 1, 256))
        for s in range(0, len(q), rows):
            key = q_aug[s : s + rows] @ self._augmented_t
            pos, d2 = _smallest_rows(key, q_norms[s : s + rows], kk)
            dist[s : s + rows, :kk] = np.sqrt(d2)
            ids[s : s + rows, :kk] = self.ids[pos]
        return dist, ids


class _LabelLookup:
    """Reference id -> label (-1 for id -1)."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray):
        self.labels = labels
        self.dense = len(ids) == 0 or np.array_equal(ids, np.arange(len(ids)))
        if not self.dense:
            self.order = np.argsort(ids, kind="stable")
            self.sorted_ids = ids[self.order]

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if self.dense and ids.size and 0 <= ids.min() and ids.max() < len(self.labels):
            return self.labels[ids]
        if self.dense:
            ok = (ids >= 0) & (ids < len(self.labels))
            return np.where(ok, self.labels[np.where(ok, ids, 0)] if len(self.labels) else -1, -1)
        at = np.clip(np.searchsorted(self.sorted_ids, ids), 0, len(self.sorted_ids) - 1)
        ok = (self.sorted_ids[at] == ids) & (ids >= 0)
        return np.where(ok, self.labels[self.order[at]], -1)


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
    if search is None:
        search = ExactSearch(references, ids=reference_ids)
        n_ref = len(search)
        ref_ids = search.ids
    else:
        ref_ids = None if reference_ids is None else np.asarray(reference_ids, dtype=np.int64).reshape(-1)
        n_ref = len(np.asarray(reference_labels).reshape(-1))
        if ref_ids is None:
            ref_ids = np.arange(n_ref, dtype=np.int64)
    rl = _as_labels(reference_labels, n_ref, "reference labels")
    if len(ref_ids) != len(rl):
        raise ValueError(f"{len(ref_ids)} reference ids for {len(rl)} reference labels")
    label_of = _LabelLookup(ref_ids, rl)
    self_ids = (np.full(len(q), -1, np.int64) if query_self_ids is None
                else np.asarray(query_self_ids, dtype=np.int64).reshape(-1))
    if len(self_ids) != len(q):
        raise ValueError(f"{len(self_ids)} self ids for {len(q)} queries")

    n_classes = max(int(ql.max(initial=-1)), int(rl.max(initial=-1))) + 1
    if classes is None:
        classes = [str(i) for i in range(n_classes)]
    classes = [str(c) for c in classes]
    if n_classes > len(classes):
        raise ValueError(f"labels go up to {n_classes - 1} but only {len(classes)} class names were given")
    counts = np.bincount(rl, minlength=len(classes))
    own_counted = (self_ids >= 0) & (label_of(self_ids) == ql)
    relevant = counts[ql] - own_counted.astype(np.int64)

    kmax = ks[-1]
    m = kmax  # neighbours kept per query for reports
    depth = np.maximum(relevant, kmax)
    needs_self = self_ids >= 0
    order = np.argsort(depth, kind="stable")
    nb_ids = np.full((len(q), m), -1, np.int64)
    nb_dist = np.full((len(q), m), np.inf, np.float32)
    hits = np.zeros((len(q), len(ks)), bool)
    prec = np.zeros((len(q), len(ks)), np.float64)
    rprec = np.full(len(q), np.nan)
    ap = np.full(len(q), np.nan)

    from tqdm import tqdm

    bar = tqdm(total=len(q), desc="neighbours", unit="query", disable=not progress, leave=False)
    budget = _BLOCK_ELEMENTS // 4  # neighbour-list entries per chunk of queries
    start = 0
    while start < len(q):
        # queries sorted by depth: the chunk's last query needs the deepest search
        end = min(len(q), start + max(1, budget // int(depth[order[start]])))
        while end - start > 1 and (end - start) * int(depth[order[end - 1]]) > budget:
            end = start + max(1, (end - start) // 2)
        idx = order[start:end]
        d = int(depth[idx].max())
        if needs_self[idx].any():
            dist, ids = search(q[idx], d + 1)
            dist, ids = drop_self(dist, ids, self_ids[idx])
        else:
            dist, ids = search(q[idx], d)
        rel = label_of(ids) == ql[idx, None]
        for j, k in enumerate(ks):
            hits[idx, j] = rel[:, :k].any(axis=1)
            prec[idx, j] = np.count_nonzero(rel[:, :k], axis=1) / k
        r = relevant[idx]
        rel &= np.arange(d)[None, :] < r[:, None]  # only the first R ranks count from here on
        # precision@i at each relevant rank i: (relevant so far) / i, summed by one matrix-vector product
        hits_so_far = np.cumsum(rel, axis=1, dtype=np.int32)
        hits_so_far *= rel
        with np.errstate(invalid="ignore", divide="ignore"):
            rprec[idx] = np.where(r > 0, np.count_nonzero(rel, axis=1) / r, np.nan)
            ap[idx] = np.where(r > 0, (hits_so_far @ (1.0 / np.arange(1, d + 1))) / r, np.nan)
        nb_ids[idx] = ids[:, :m]
        nb_dist[idx] = dist[:, :m]
        bar.update(len(idx))
        start = end
    bar.close()

    nb_labels = label_of(nb_ids)
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
def index_search(index) -> Search:
    """The search to evaluate an EmbeddingIndex with: for an exact (Flat) index, ExactSearch over its stored
    vectors (the same neighbours, found faster at MAP@R depths than Faiss's k-heap); otherwise the index's own
    (approximate) search, which is what its users get."""
    import faiss

    inner = faiss.downcast_index(index.index.index) if hasattr(index.index, "index") else None
    if isinstance(inner, faiss.IndexFlat) and inner.ntotal == len(index.ids):
        return ExactSearch(inner.reconstruct_n(0, inner.ntotal), ids=index.ids)
    return index.search


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
    metrics = retrieval_metrics(
        iq.embeddings, iq.labels, search=index_search(iq.index), reference_labels=iq.index.labels,
        reference_ids=iq.index.ids, query_self_ids=iq.self_ids, ks=ks, classes=iq.classes, progress=True,
    )
    return metrics, iq
