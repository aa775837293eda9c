"""Query an index: images (files, folders, dataset items, tensors) -> tower -> neighbours -> predicted label.

    searcher = Searcher.open("indexes/run-mnist-train")          # index + its tower (fingerprint checked)
    results = searcher.query(["digit.png", "mnist:test[123]"], k=5)
    results[0].label, results[0].neighbors[0].distance

The predicted label is the majority label of the k neighbours; a tie goes to the tied label whose neighbours are
closer in total (then to the one holding the nearest neighbour). With a distance threshold (the calibrated one in
the index metadata, or `max_distance`), a query whose nearest neighbour is farther is labelled "unknown" ("far from
every class"); with a tower that carries a digit-or-not gate (retrieval.gate), a query whose digit score is below
the gate's threshold (the index's calibrated one, else the gate's own) is "unknown" as well ("not a digit"), unless
its neighbours answer one of the index's classes that is no digit (a symbol a user taught it: the gate only knows
digits from the rest).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from retrieval.data.preprocess import IMAGE_EXTENSIONS, load_image_files
from retrieval.data.specs import DatasetCache, parse_item_spec
from retrieval.embed import default_batch_size, embed_images, inference_tower
from retrieval.errors import RetrievalError, UsageError
from retrieval.faiss_tools import search_parameters
from retrieval.gate import DIGIT_CLASSES, FAR_FROM_EVERY_CLASS, NOT_A_DIGIT, digit_scores, gate_threshold
from retrieval.index import EmbeddingIndex, load_index, load_index_tower
from retrieval.precision import matching_precision
from retrieval.towers import Tower

logger = logging.getLogger(__name__)

UNKNOWN = "unknown"


@dataclass
class Neighbor:
    id: int
    label: str
    distance: float
    source: str

    def to_json(self) -> dict:
        return {"id": self.id, "label": self.label, "distance": round(self.distance, 6), "source": self.source}


@dataclass
class QueryResult:
    """One query: its name, the predicted label ("unknown" past the threshold; None when it failed), neighbours."""

    query: str
    label: str | None
    neighbors: list[Neighbor] = field(default_factory=list)
    true_label: str | None = None  # known for dataset items
    error: str | None = None
    image: torch.Tensor | None = None  # the preprocessed uint8 28x28 query image, for grids
    unknown: str | None = None  # why the label is "unknown": gate.NOT_A_DIGIT or gate.FAR_FROM_EVERY_CLASS
    digit_score: float | None = None  # the gate's digit probability, for a tower with a gate

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        out = {"query": self.query, "label": self.label, "neighbors": [n.to_json() for n in self.neighbors]}
        if self.unknown is not None:
            out["unknown"] = self.unknown
        if self.digit_score is not None:
            out["digit_score"] = round(self.digit_score, 6)
        if self.true_label is not None:
            out["true_label"] = self.true_label
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass
class QueryInput:
    """A named query image (uint8 28x28), or the reason it could not be read."""

    name: str
    image: torch.Tensor | None = None
    true_label: str | None = None
    error: str | None = None


def predict_labels(neighbor_labels, distances, max_distance: float | None = None) -> np.ndarray:
    """(n, k) neighbour labels (-1 = no neighbour) and ascending distances -> (n,) predicted labels.

    Majority vote; ties go to the smaller summed distance, then to the nearest neighbour's label. -1 where a row
    has no neighbour or its nearest neighbour is farther than `max_distance` (unknown).
    """
    labels = np.asarray(neighbor_labels, dtype=np.int64)
    dist = np.asarray(distances, dtype=np.float64)
    n, k = labels.shape
    out = np.full(n, -1, dtype=np.int64)
    if n == 0 or k == 0:
        return out
    valid = labels >= 0
    n_labels = int(labels.max()) + 1 if valid.any() else 0
    if n_labels == 0:
        return out
    rows = np.repeat(np.arange(n), k)[valid.ravel()]
    cols = labels.ravel()[valid.ravel()]
    votes = np.zeros((n, n_labels))
    total = np.zeros((n, n_labels))
    nearest = np.full((n, n_labels), np.inf)
    np.add.at(votes, (rows, cols), 1)
    np.add.at(total, (rows, cols), dist.ravel()[valid.ravel()])
    np.minimum.at(nearest, (rows, cols), dist.ravel()[valid.ravel()])
    # per row, lexicographic: most votes, then smallest summed distance, then nearest neighbour
    best = np.lexsort((nearest, total, -votes), axis=-1)[:, 0]
    has = valid.any(axis=1)
    out[has] = best[has]
    if max_distance is not None:
        out[dist[:, 0] > max_distance] = -1
    return out


def _image_files(folder: Path) -> tuple[list[Path], int]:
    """The image files under `folder` (sorted; hidden ones left out) and how many other files it holds."""
    every = [p for p in folder.rglob("*") if p.is_file()]
    images = sorted(p for p in every if p.suffix.lower() in IMAGE_EXTENSIONS
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return images, len(every) - len(images)


def resolve_query_inputs(paths: Sequence[str], root=None, datasets: DatasetCache | None = None) -> list[QueryInput]:
    """Image files, folders (every image in them, recursively) and dataset items (mnist:test[123]) -> inputs.

    Unreadable inputs become QueryInputs with an error, so the others can still be answered. The image files are
    decoded together, in parallel where there are many (load_image_files), and keep their places among the rest.
    """
    datasets = datasets or DatasetCache(root)
    inputs: list[QueryInput | str] = []  # a str: an image file, decoded below
    for text in paths:
        text = str(text)
        item = parse_item_spec(text)
        path = Path(text).expanduser()
        if item is not None and not path.exists():
            try:
                image, label = datasets.item(*item)
                inputs.append(QueryInput(text, image=image, true_label=label))
            except RetrievalError as e:
                inputs.append(QueryInput(text, error=str(e)))
            continue
        if path.is_dir():
            files, others = _image_files(path)
            if not files:
                inputs.append(QueryInput(text, error=f"{path}: no image files in this folder"))
            if others:
                logger.info(f"note: {path}: skipped {others} file(s) without an image extension or hidden")
            targets = [str(p) for p in files]
        elif path.exists():
            targets = [text]
        else:
            inputs.append(QueryInput(text, error=(
                f"{text}: not found (expected an image file, a folder of images or a dataset item like mnist:test[123])"
            )))
            continue
        inputs.extend(targets)
    decoded = iter(load_image_files([item for item in inputs if isinstance(item, str)], progress=True))
    out = []
    for item in inputs:
        if isinstance(item, str):
            image = next(decoded)
            item = (QueryInput(item, error=str(image)) if isinstance(image, RetrievalError)
                    else QueryInput(item, image=image))
        out.append(item)
    return out


class Searcher:
    """An index with the tower that built it: embeds query images and answers nearest-neighbour queries.

    precision: the queries' (retrieval.precision); auto follows the index's where this device runs it natively.
    prepared: (precision, tower as retrieval.embed.inference_tower prepared it for that precision) of another
    Searcher of the same tower: reused when this one embeds in that precision (prepared here otherwise)."""

    def __init__(self, index: EmbeddingIndex, tower, device="cpu", max_distance: float | None = None,
                 batch_size: int | None = None, search_params: str | None = None, precision: str | None = "auto",
                 prepared: tuple[str, Tower] | None = None):
        if max_distance is not None and not max_distance >= 0:
            raise UsageError(f"`max_distance` must be a distance >= 0, got {max_distance}")
        if search_params:
            search_parameters(index.index, search_params)  # a clear error now, not at the first query
        self.search_params = search_params or None  # Faiss search parameters for every query, else the index's
        self.index = index
        self.tower = tower
        self.device = torch.device(device)
        if self.device.type == "cuda" and index.search_device != self.device:
            index.use_device(self.device)  # Faiss on the GPU too, where its build has GPU support (asked once)
        self.batch_size = batch_size if batch_size is not None else default_batch_size(self.device)
        self.precision = matching_precision(precision, self.device, index.meta.get("precision"), "queries")
        self.embedding_tower = (prepared[1] if prepared is not None and prepared[0] == self.precision
                                else inference_tower(tower, self.precision))
        if max_distance is None:
            max_distance = (index.meta.get("calibration") or {}).get("max_distance")
        self.max_distance = None if max_distance is None else float(max_distance)
        self.gate_threshold = gate_threshold(index, tower)

    @classmethod
    def open(cls, folder: str | os.PathLike, device="cpu", checkpoint=None, max_distance: float | None = None,
             batch_size: int | None = None, search_params: str | None = None,
             precision: str | None = "auto") -> "Searcher":
        """Load the index in `folder` and its tower (the metadata's checkpoint, or `checkpoint` with the same
        fingerprint)."""
        index = load_index(folder)
        if search_params:
            search_parameters(index.index, search_params)  # before loading the tower
        ckpt = load_index_tower(index, device=device, checkpoint=checkpoint)
        return cls(index, ckpt.tower, device=device, max_distance=max_distance, batch_size=batch_size,
                   search_params=search_params, precision=precision)

    def embed(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (n, 28, 28) -> float32 (n, d) unit embeddings."""
        images = torch.as_tensor(images)
        if images.ndim == 2:
            images = images.unsqueeze(0)
        if images.dtype != torch.uint8 or images.ndim != 3:
            raise RetrievalError(f"query images must be uint8 (n, 28, 28), got {images.dtype} {tuple(images.shape)}")
        return embed_images(self.embedding_tower, images, batch_size=self.batch_size, device=self.device,
                            precision=self.precision)

    def effective_k(self, k: int) -> tuple[int, str | None]:
        """k clamped to the index size, with a note when it was larger."""
        k = int(k)
        if k <= 0:
            raise UsageError(f"`k` must be a positive number of neighbours, got {k}")
        n = len(self.index)
        if n == 0:
            raise RetrievalError("the index is empty")
        if k > n:
            return n, f"note: k={k} is larger than the index ({n} item{'s' if n != 1 else ''}); returning the whole index"
        return k, None

    def search_embeddings(self, embeddings, k: int, names: Sequence[str] | None = None,
                          true_labels: Sequence[str | None] | None = None,
                          search_params: str | None = None, digit_scores=None) -> list[QueryResult]:
        """Neighbours and predicted labels for query embeddings (k must not exceed the index size).
        `search_params`: Faiss search parameters for this search (default: the Searcher's, else the index's).
        `digit_scores`: the gate's scores of the same queries (Searcher.digit_scores); below the gate threshold a
        query answered as a digit (or unknown) is "unknown", not a digit."""
        dist, ids = self.index.search(embeddings, k, params=search_params or self.search_params)
        nb_labels = self.index.labels_of(ids)
        predicted = predict_labels(nb_labels, dist, self.max_distance)
        classes = self.index.classes
        pos = self.index.positions_of(ids)
        results = []
        for i in range(len(ids)):
            neighbors = [
                Neighbor(int(ids[i, j]), classes[nb_labels[i, j]], float(dist[i, j]), self.index.sources[pos[i, j]])
                for j in range(ids.shape[1]) if ids[i, j] >= 0
            ]
            label = classes[predicted[i]] if predicted[i] >= 0 else UNKNOWN
            score = None if digit_scores is None else float(digit_scores[i])
            reason = FAR_FROM_EVERY_CLASS if label == UNKNOWN and neighbors else None
            if (score is not None and self.gate_threshold is not None and score < self.gate_threshold
                    and (label == UNKNOWN or label in DIGIT_CLASSES)):
                label, reason = UNKNOWN, NOT_A_DIGIT
            results.append(QueryResult(
                query=names[i] if names is not None else str(i),
                label=label,
                neighbors=neighbors,
                true_label=true_labels[i] if true_labels is not None else None,
                unknown=reason,
                digit_score=score,
            ))
        return results

    def digit_scores(self, images: torch.Tensor, embeddings: np.ndarray | None = None) -> np.ndarray | None:
        """The gate's digit probabilities of uint8 (n, 28, 28) images (None when the tower has no gate)."""
        return digit_scores(self.tower, images, embeddings, device=self.device)

    def query_images(self, images: torch.Tensor, k: int = 5, names: Sequence[str] | None = None,
                     true_labels: Sequence[str | None] | None = None) -> list[QueryResult]:
        """uint8 (n, 28, 28) images -> results (k clamped to the index size)."""
        k, _ = self.effective_k(k)
        images = torch.as_tensor(images)
        if images.ndim == 2:
            images = images.unsqueeze(0)
        embeddings = self.embed(images)
        results = self.search_embeddings(embeddings, k, names, true_labels,
                                         digit_scores=self.digit_scores(images, embeddings))
        for r, img in zip(results, images):
            r.image = img
        return results

    def query(self, paths: Sequence[str], k: int = 5, root=None) -> list[QueryResult]:
        """Image files, folders and dataset items -> one result per image (failed inputs carry `error`)."""
        k, _ = self.effective_k(k)
        return self.query_inputs(resolve_query_inputs(paths, root=root), k)

    def query_inputs(self, inputs: Sequence[QueryInput], k: int) -> list[QueryResult]:
        good = [q for q in inputs if q.error is None]
        answered = {}
        if good:
            results = self.query_images(
                torch.stack([q.image for q in good]), k, [q.name for q in good], [q.true_label for q in good]
            )
            answered = {id(q): r for q, r in zip(good, results)}
        return [answered.get(id(q)) or QueryResult(q.name, None, error=q.error) for q in inputs]


def format_result(result: QueryResult, max_distance: float | None = None) -> str:
    """Plain-text block for one query."""
    if result.error is not None:
        return f"{result.query}: error: {result.error}"
    head = f"{result.query} -> {result.label}"
    if result.true_label is not None:
        head += f"  (true label {result.true_label})"
    if result.unknown == NOT_A_DIGIT:
        head += f"  (not a digit: digit score {result.digit_score:.4f})"
    elif result.label == UNKNOWN and result.neighbors and max_distance is not None:
        head += f"  (nearest neighbour at {result.neighbors[0].distance:.4f} > max distance {max_distance:.4f})"
    lines = [head]
    for rank, n in enumerate(result.neighbors, 1):
        lines.append(f"  {rank:3d}. id {n.id:<8d} label {n.label:<10s} distance {n.distance:.4f}  {n.source}")
    return "\n".join(lines)
