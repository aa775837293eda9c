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

Each metric is scored once, by a pure function of a `retrieval.knn.Ranking` (per query the ascending ranks of its
relevant references, as PML's `calculate_*` functions score `knn_labels`): `recall_at_k`, `precision_at_k`,
`r_precision`, `average_precision_at_r`. `retrieval_metrics` runs the ranking engine of `retrieval.knn` (exact
search over reference embeddings, or a search callable such as an approximate index) block by block and scores
each block, so memory stays bounded by a block whatever the number of queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from retrieval.errors import RetrievalError, UsageError
from retrieval.knn import (
    PositionLookup, Ranking, Search, as_embeddings, as_labels, rank_exact, rank_with_search,
)
from retrieval.logs import show_progress

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


def parse_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Neighbour counts sorted and deduplicated; UsageError unless all are positive."""
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] <= 0:
        raise UsageError(f"`k`: expected positive neighbour counts such as 1,2,4,8,16, got {list(ks)}")
    return ks


# -- scoring: pure functions of the ranks (retrieval.knn.Ranking.ranks, R) ------------------------------------
# `ranks` (n, w) ascends per row: the 1-based ranks of each query's relevant references, exact up to the query's
# depth max(R, max k) and only known to be farther beyond it; `relevant` (n,) is R.
def recall_at_k(ranks: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """(n, len(ks)) bool: whether a relevant reference is among the k nearest (its first rank <= k)."""
    ks = np.asarray(ks)
    if ranks.shape[1] == 0:
        return np.zeros((len(ranks), len(ks)), bool)
    return ranks[:, :1] <= ks[None, :]


def precision_at_k(ranks: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """(n, len(ks)) float64: the fraction of the k nearest that are relevant (ranks <= k, over k)."""
    ks = np.asarray(ks)
    top = ranks[:, : ks.max()]
    return (top[:, :, None] <= ks[None, None, :]).sum(axis=1) / ks


def r_precision(ranks: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(n,) float64: the fraction of the R nearest that are relevant (ranks <= R, over R); nan where R = 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(relevant > 0, np.count_nonzero(ranks <= relevant[:, None], axis=1) / relevant, np.nan)


def average_precision_at_r(ranks: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(n,) float64: AP@R = (1/R) x the sum, over the relevant ranks i <= R, of precision@i (the j-th relevant
    rank i has precision@i = j / i); nan where R = 0."""
    inside = ranks <= relevant[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision_at = np.divide(np.arange(1, ranks.shape[1] + 1, dtype=np.float64)[None, :], ranks, where=inside,
                                 out=np.zeros(ranks.shape))
        return np.where(relevant > 0, precision_at.sum(axis=1) / relevant, np.nan)


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
    ks = parse_ks(ks)
    q = as_embeddings(queries, "query embeddings")
    ql = as_labels(query_labels, len(q), "query labels")
    if search is None and references is None:
        references, reference_labels = q, ql
        if query_self_ids is None:
            query_self_ids = np.arange(len(q), dtype=np.int64)
    refs = _References.of(references, reference_labels, reference_ids, exact=search is None)
    # Everything below works on positions in the reference arrays (-1: no neighbour).
    self_pos = refs.position_of(_self_ids(query_self_ids, len(q)))
    classes = _class_names(classes, ql, refs.labels)
    scores = _QueryScores.empty(len(q), ks)
    scores.fill(_rankings(q, ql, refs, search, self_pos, ks[-1]), progress)
    return scores.summary(ql, refs, classes)


@dataclass
class _References:
    """The reference side of a scoring: labels and ids by position, the id -> position lookup, and the
    embeddings when they are searched exactly (None when a search callable stands for them)."""

    labels: np.ndarray
    ids: np.ndarray
    position_of: PositionLookup
    embeddings: np.ndarray | None

    @classmethod
    def of(cls, references, reference_labels, reference_ids, exact: bool) -> "_References":
        if reference_labels is None:
            raise ValueError("reference_labels are required")
        rl = as_labels(reference_labels, len(np.asarray(reference_labels).reshape(-1)), "reference labels")
        ref_ids = np.arange(len(rl), dtype=np.int64) if reference_ids is None else \
            np.asarray(reference_ids, dtype=np.int64).reshape(-1)
        if len(ref_ids) != len(rl):
            raise ValueError(f"{len(ref_ids)} reference ids for {len(rl)} reference labels")
        position_of = PositionLookup(ref_ids)
        if exact:
            references = as_embeddings(references, "reference embeddings")
            if len(references) != len(rl):
                raise RetrievalError(f"reference labels: {len(rl)} labels for {len(references)} embeddings")
        return cls(rl, ref_ids, position_of, references if exact else None)


def _self_ids(query_self_ids, n: int) -> np.ndarray:
    self_ids = (np.full(n, -1, np.int64) if query_self_ids is None
                else np.asarray(query_self_ids, dtype=np.int64).reshape(-1))
    if len(self_ids) != n:
        raise ValueError(f"{len(self_ids)} self ids for {n} queries")
    return self_ids


def _class_names(classes: Sequence[str] | None, query_labels: np.ndarray, reference_labels: np.ndarray) -> list[str]:
    n_classes = max(int(query_labels.max(initial=-1)), int(reference_labels.max(initial=-1))) + 1
    if classes is None:
        classes = [str(i) for i in range(n_classes)]
    classes = [str(c) for c in classes]
    if n_classes > len(classes):
        raise ValueError(f"labels go up to {n_classes - 1} but only {len(classes)} class names were given")
    return classes


def _rankings(q: np.ndarray, ql: np.ndarray, refs: _References, search: Search | None, self_pos: np.ndarray,
              m: int) -> Iterator[Ranking]:
    """The search: per block of queries, the ranks of their relevant references and their first m neighbours."""
    if search is None:
        return rank_exact(q, ql, refs.embeddings, refs.labels, self_pos, m)

    def find(x, k):
        dist, ids = search(x, k)
        return refs.position_of(ids), dist

    return rank_with_search(q, ql, refs.labels, find, self_pos, m)


@dataclass
class _QueryScores:
    """Per-query figures, filled block by block: R, recall and precision at each k, R-precision, AP@R, and the
    positions and distances of the first m = max k neighbours."""

    ks: tuple[int, ...]
    relevant: np.ndarray
    hits: np.ndarray
    precision: np.ndarray
    r_precision: np.ndarray
    average_precision: np.ndarray
    neighbor_positions: np.ndarray
    neighbor_distances: np.ndarray

    @classmethod
    def empty(cls, n: int, ks: tuple[int, ...]) -> "_QueryScores":
        m = ks[-1]  # neighbours kept per query (reports, calibration)
        return cls(ks, np.zeros(n, np.int64), np.zeros((n, len(ks)), bool), np.zeros((n, len(ks)), np.float64),
                   np.full(n, np.nan), np.full(n, np.nan), np.full((n, m), -1, np.int64),
                   np.full((n, m), np.inf, np.float32))

    def fill(self, rankings: Iterator[Ranking], progress: bool) -> None:
        from tqdm import tqdm

        bar = tqdm(total=len(self.relevant), desc="neighbours", unit="query", disable=not show_progress(progress),
                   leave=False)
        try:
            for r in rankings:
                self.add(r)
                bar.update(len(r.rows))
        finally:
            rankings.close()
            bar.close()

    def add(self, r: Ranking) -> None:
        """One block's per-query relevance, per-k figures and MAP@R terms, scored from its ranks."""
        rows = r.rows
        self.relevant[rows] = r.relevant
        self.hits[rows] = recall_at_k(r.ranks, self.ks)
        self.precision[rows] = precision_at_k(r.ranks, self.ks)
        self.r_precision[rows] = r_precision(r.ranks, r.relevant)
        self.average_precision[rows] = average_precision_at_r(r.ranks, r.relevant)
        self.neighbor_positions[rows] = r.neighbors
        self.neighbor_distances[rows] = r.distances

    def summary(self, ql: np.ndarray, refs: _References, classes: list[str]) -> RetrievalMetrics:
        """The averages over the scored queries, the confusion matrix and the per-class figures."""
        ks = self.ks
        nb_labels = np.append(refs.labels, -1)[self.neighbor_positions]  # position -1: "no neighbour", label -1
        nb_ids = np.append(refs.ids, -1)[self.neighbor_positions]
        scored = self.relevant > 0
        n_scored = int(scored.sum())

        def mean(x) -> float:
            return float(np.mean(x[scored], dtype=np.float64)) if n_scored else float("nan")

        return RetrievalMetrics(
            ks=ks,
            classes=classes,
            n_queries=len(ql),
            n_references=len(refs.labels),
            n_scored=n_scored,
            recall={k: mean(self.hits[:, j].astype(np.float64)) for j, k in enumerate(ks)},
            precision={k: mean(self.precision[:, j]) for j, k in enumerate(ks)},
            map_at_r=mean(self.average_precision),
            r_precision=mean(self.r_precision),
            confusion=_confusion(ql, nb_labels[:, 0], len(classes)),
            query_labels=ql,
            relevant=self.relevant,
            average_precision=self.average_precision,
            neighbor_ids=nb_ids,
            neighbor_distances=self.neighbor_distances,
            neighbor_labels=nb_labels,
            per_class=self.per_class(ql, scored, classes),
        )

    def per_class(self, ql: np.ndarray, scored: np.ndarray, classes: list[str]) -> dict[str, dict]:
        per_class = {}
        for c in np.unique(ql[scored]):
            sel = scored & (ql == c)
            per_class[classes[c]] = {
                "queries": int(sel.sum()),
                "nn_accuracy": float(self.hits[sel, 0].mean()),
                "map@r": float(self.average_precision[sel].mean()),
                "r_precision": float(self.r_precision[sel].mean()),
            }
        return per_class


def _confusion(query_labels: np.ndarray, nearest_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts, query class against its nearest neighbour's: every query with a neighbour, lone ones too
    (where a class the references lack ends up is worth seeing)."""
    confusion = np.zeros((n_classes, n_classes), np.int64)
    has_nn = nearest_labels >= 0
    np.add.at(confusion, (query_labels[has_nn], nearest_labels[has_nn]), 1)
    return confusion
