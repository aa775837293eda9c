"""Questions to an index folder: pictures and dataset items answered, and query datasets embedded against it
(what evaluation and calibration start from)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from retrieval.compute import Compute
from retrieval.data.selection import Selection
from retrieval.data.specs import DatasetCache, ImageDataset, data_root, filters_text
from retrieval.errors import RetrievalError
from retrieval.grid import SourceImages, check_grid_target, query_grid_rows, render_grid
from retrieval.index import EmbeddingIndex, load_index, load_index_tower
from retrieval.knn import ExactSearch, Search
from retrieval.query import QueryResult, Searcher, resolve_query_inputs

logger = logging.getLogger(__name__)


@dataclass
class QueryAnswers:
    results: list[QueryResult]
    k: int  # neighbours per query (k clamped to the index size)
    max_distance: float | None  # the "unknown" threshold in force
    grid: Path | None = None  # the PNG written, if any

    @property
    def failed(self) -> list[QueryResult]:
        return [r for r in self.results if r.error is not None]


def query(
    index: str | os.PathLike,
    inputs: Sequence[str],
    k: int = 5,
    *,
    max_distance: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    grid: str | os.PathLike | None = None,
    root=None,
    search_params: str | None = None,
    compute: Compute | None = None,
) -> QueryAnswers:
    """Image files, folders (every image inside) and dataset items (read from `root`) -> neighbours and predicted
    labels.

    Unreadable inputs get a result with `error` (and an error in the log) and the others are still answered.
    With `grid`, a PNG of each answered query beside its neighbours is written there. `search_params` (Faiss's
    names: "nprobe=64", "efSearch=128", "k_factor_rf=8") replace the index's stored search parameters for these
    queries. `compute`'s precision: the queries' (auto: the index's where this device runs it natively)."""
    if grid is not None:
        check_grid_target(grid)
    compute = Compute.of(compute).on_device()
    searcher = Searcher.open(index, device=compute.device, checkpoint=checkpoint, max_distance=max_distance,
                             batch_size=compute.batch_size, search_params=search_params, precision=compute.precision)
    k_used, note = searcher.effective_k(k)
    if note:
        logger.info(note)
    root = data_root(root)
    datasets = DatasetCache(root)
    results = searcher.query_inputs(resolve_query_inputs(inputs, root=root, datasets=datasets), k_used)
    answers = QueryAnswers(results, k_used, searcher.max_distance)
    for r in answers.failed:  # answered None: say which input and why
        logger.error(r.error if r.query in r.error else f"{r.query}: {r.error}")
    if grid is not None:
        _write_grid(answers, grid, SourceImages(root, datasets), f"{Path(index).name}: {k_used} nearest neighbours")
    return answers


def _write_grid(answers: QueryAnswers, grid, sources: SourceImages, title: str) -> None:
    rows = query_grid_rows(answers.results, sources)
    if not rows:
        logger.info(f"no grid written to {grid}: no query was answered")
        return
    drawn = render_grid(rows, grid, title=title)
    logger.info(f"wrote {grid}" + (f" (first {drawn} of {len(rows)} queries)" if drawn < len(rows) else ""))
    answers.grid = Path(grid)


def index_search(index: EmbeddingIndex) -> Search:
    """Exact search over a Flat index's vectors on the CPU (the same neighbours, found faster than Faiss's k-heap
    at MAP@R depths), else the index's own search (on a GPU where use_device put it)."""
    vectors = None if index.on_gpu else index.flat_vectors()
    return index.search if vectors is None else ExactSearch(vectors, ids=index.ids)


@dataclass
class IndexQueries:
    """A query dataset embedded by an index's tower, with labels in the index's class space."""

    index: EmbeddingIndex
    dataset: ImageDataset
    embeddings: np.ndarray
    labels: np.ndarray  # index class ids; classes the index lacks get ids len(index.classes), ...
    classes: list[str]  # the index's classes, then the query classes it lacks
    missing_classes: list[str]
    self_ids: np.ndarray  # id of each query's own entry in the index (same source), else -1

    def describe(self) -> str:
        ds = self.dataset
        text = f"{ds.spec}" + (f" ({filters_text(ds.filters)})" if ds.filters else "") + f": {len(ds):,} images"
        own = int((self.self_ids >= 0).sum())
        if own:
            text += f", {own:,} of them in the index (left out of their own neighbours)"
        return text


def load_index_queries(folder, queries: Selection | str, *, compute: Compute | None = None,
                       checkpoint=None) -> IndexQueries:
    """Load the index in `folder` and its tower, load and embed the images of `queries` (a single-spec Selection
    or a spec; `compute`'s precision auto: the index's), match labels by class name and find each query's own
    entry in the index (by source) for leave-one-out."""
    queries = Selection.of(queries)
    compute = Compute.of(compute).on_device()
    index = load_index(folder)
    if len(index) == 0:
        raise RetrievalError(f"the index in {folder} is empty")
    compute = compute.pinned(index.meta.get("precision"), "queries")
    ckpt = load_index_tower(index, device=compute.device, checkpoint=checkpoint)
    index.use_device(compute.device)
    ds = queries.load_one()
    emb = compute.embed(ckpt.tower, ds.images, desc="embedding queries")
    all_classes = list(index.classes)
    missing = [c for c in ds.class_counts() if c not in all_classes]
    all_classes += missing
    to_index = np.array([all_classes.index(c) if c in all_classes else -1 for c in ds.classes], np.int64)
    labels = to_index[ds.labels.numpy()]
    rows = index.sources.rows_of(ds.sources, key=os.path.realpath)  # item specs as they are, paths resolved
    self_ids = np.where(rows >= 0, index.ids[np.maximum(rows, 0)], -1).astype(np.int64)
    return IndexQueries(index, ds, emb, labels, all_classes, missing, self_ids)
