"""Every end-to-end operation once, over paths and plain options, returning a result object.

The CLI commands parse their options and call one of these; `quickstart` is a sequence of them; the HTTP service
and the torchrun entry point call the same functions. Messages go to `logging.getLogger(__name__)` (the CLI shows
them on stderr); errors are RetrievalError / UsageError naming the argument, never a CLI flag.

    build_index     checkpoint + dataset specs -> an index folder
    add_to_index    more dataset specs -> appended to an index folder with the index's own tower
    query           image files, folders, dataset items -> neighbours and predicted labels (+ a PNG grid)
    evaluate        a query spec against an index folder -> retrieval metrics (+ a report folder)
    evaluate_pairs  a checkpoint on balanced same/different pairs -> verification accuracy, ROC AUC
    calibrate       a query spec against an index folder -> the "unknown" distance threshold, stored
    tune_index      a query spec against an index folder -> the fastest search parameters reaching a recall, stored
    fewshot         a checkpoint (or raw pixels) on N-way K-shot episodes -> accuracy with confidence intervals
    export          a checkpoint -> its tower as an ONNX or TorchScript inference graph with a JSON sidecar
    train           a config -> a run folder (retrieval.trainer.train)
    quickstart      fetch, train, index, evaluate, few-shot, query: the whole chain into one folder
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from retrieval.checkpoint import Checkpoint, load_checkpoint
from retrieval.data.preprocess import PREPROCESSING
from retrieval.data.specs import DatasetCache, ImageDataset, default_data_root, load_dataset
from retrieval.embed import default_batch_size, embed_images, resolve_device
from retrieval.errors import RetrievalError, UsageError
from retrieval.fewshot import (
    FewShotResult, check_fewshot_settings, check_method, evaluate_fewshot, pixel_embeddings,
)
from retrieval.faiss_tools import metric_code
from retrieval.index import (
    EmbeddingIndex, META_NAME, check_index_target, class_prototypes, load_index, load_index_tower,
    normalize_factory, read_index_meta, save_index, tower_files, tower_meta, update_index_meta,
)
from retrieval.fsutil import exclusive_lock
from retrieval.grid import SourceImages, check_grid_target, query_grid_rows, render_grid
from retrieval.knn import ExactSearch, Search, nearest_neighbors
from retrieval.metrics import DEFAULT_KS, RetrievalMetrics, retrieval_metrics
from retrieval.pairs import (
    DEFAULT_ACCEPT, Calibration, Verification, acceptance_threshold, balanced_pairs, calibrate_threshold, verify_pairs,
)
from retrieval.precision import check_precision, matching_precision, resolve_precision
from retrieval.query import QueryResult, Searcher, resolve_query_inputs

logger = logging.getLogger(__name__)

PIXELS = "pixels"  # fewshot's checkpoint argument for the raw-pixel baseline


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _data_root(root) -> Path:
    return Path(root) if root is not None else default_data_root()


# -- datasets and embeddings ----------------------------------------------------------------------------------------
def merge_datasets(datasets: Sequence[ImageDataset]) -> tuple[torch.Tensor, np.ndarray, list[str], list[str]]:
    """Concatenate ImageDatasets: images uint8 (N,28,28), labels into the union of the classes present (by name,
    in order of first appearance), sources."""
    classes: list[str] = []
    images, labels, sources = [], [], []
    for ds in datasets:
        present = sorted(set(ds.labels.tolist()))
        for i in present:
            if ds.classes[i] not in classes:
                classes.append(ds.classes[i])
        mapping = torch.full((len(ds.classes),), -1, dtype=torch.int64)
        for i in present:
            mapping[i] = classes.index(ds.classes[i])
        images.append(ds.images)
        labels.append(mapping[ds.labels])
        sources.extend(ds.sources)
    return torch.cat(images), torch.cat(labels).numpy(), classes, sources


def _load_datasets(data_specs: Sequence[str], root, classes, exclude, subset, seed) -> tuple[list, list[dict]]:
    if not data_specs:
        raise UsageError("`data`: give at least one dataset spec")
    datasets = [load_dataset(spec, root=root, classes=classes, exclude=exclude, subset=subset, seed=seed)
                for spec in data_specs]
    entries = [{"spec": ds.spec, "filters": ds.filters, "images": len(ds), "preprocessing": ds.preprocessing,
                "added": _now()} for ds in datasets]
    return datasets, entries


def _embed(ckpt: Checkpoint, images: torch.Tensor, batch_size: int | None, device, precision: str) -> np.ndarray:
    """Embed (in `precision`, fp32 or bf16) with a progress bar, then log a one-line images/s summary."""
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    if batch_size <= 0:
        raise UsageError(f"`batch_size` must be positive, got {batch_size}")
    start = time.perf_counter()
    emb = embed_images(ckpt.tower, images, batch_size=batch_size, device=device, progress=True, precision=precision)
    seconds = time.perf_counter() - start
    logger.info(f"embedded {len(images):,} images in {seconds:.1f}s ({len(images) / max(seconds, 1e-9):,.0f} "
                f"images/s, {precision})")
    return emb


# -- index folders --------------------------------------------------------------------------------------------------
def default_index_name(checkpoint: str | os.PathLike, data_specs: Sequence[str], **variant) -> str:
    """`<run folder name>-<data specs>[-<variant>]`, sanitised to [A-Za-z0-9._-]."""
    p = Path(checkpoint)
    run = p.name if p.is_dir() else (p.parent.name or p.stem) if p.suffix in (".safetensors", ".json") else p.parent.name or p.name
    parts = [run or "index", *data_specs]
    for key, value in variant.items():
        if value is True:
            parts.append(key)
        elif value not in (None, False, "", []):
            parts.append(f"{key}{value}")
    name = re.sub(r"[^A-Za-z0-9._]+", "-", "-".join(str(x) for x in parts)).strip("-.")
    return re.sub(r"-{2,}", "-", name)[:120] or "index"


def build_index(
    checkpoint: str | os.PathLike,
    data_specs: Sequence[str],
    out: str | os.PathLike | None = None,
    *,
    factory: str = "Flat",
    metric: str = "ip",
    prototypes: bool = False,
    batch_size: int | None = None,
    device="auto",
    root=None,
    classes=None,
    exclude=None,
    subset: int | None = None,
    seed: int = 0,
    search_params: str | None = None,
    train_size: int | None = None,
    on_disk: bool = False,
    chunk_size: int | None = None,
    dist_timeout: float | None = None,
    precision: str | None = "auto",
) -> EmbeddingIndex | None:
    """Checkpoint + dataset specs -> an index saved in `out` (default indexes/<run>-<data>; the index's .folder),
    replacing any index there atomically. The folder lock is held from the start, so a second build into the
    same folder fails at once.

    The images are read and embedded `chunk_size` at a time (retrieval.index_build: memory for the tower, the
    index and one chunk); trained indexes (IVF, PQ, ...) are trained on a seeded sample of `train_size` vectors
    (default from the factory). `on_disk`: an IVF index's inverted lists in a file of the folder, memory-mapped
    when searched (built in blocks of retrieval.index_build.DEFAULT_BLOCK_SIZE vectors). Launched by torchrun with
    more than one process, every process calls this with the same arguments: each embeds its share of the rows
    (`dist_timeout`: seconds a process waits for the others), rank 0 merges the shares, writes the folder and
    returns the index; the others return None. `precision` (auto, fp32,
    bf16; retrieval.precision): the tower's arithmetic; the metadata's "precision" says which one embedded it."""
    from retrieval.distributed import is_comm_error, join as join_process_group

    if out is None:
        out = Path("indexes") / default_index_name(checkpoint, data_specs, classes=classes, exclude=exclude,
                                                   subset=subset, prototypes=prototypes)
    out = Path(out)
    factory = normalize_factory(factory)
    metric_code(metric)
    for name, value in (("train_size", train_size), ("chunk_size", chunk_size), ("batch_size", batch_size)):
        if value is not None and value <= 0:
            raise UsageError(f"`{name}` must be positive, got {value}")
    if prototypes and on_disk:
        raise UsageError("`on_disk` does not apply to `prototypes` (one vector per class)")
    precision = check_precision(precision)
    group = join_process_group(device, dist_timeout)  # None: one process
    device = group.device if group is not None else resolve_device(device)
    options = dict(factory=factory, metric=metric, prototypes=prototypes, batch_size=batch_size, device=device,
                   root=root, classes=classes, exclude=exclude, subset=subset, seed=seed,
                   search_params=search_params, train_size=train_size, on_disk=on_disk, chunk_size=chunk_size,
                   precision=resolve_precision(precision, device))
    try:
        if group is not None and not group.is_main:
            group.wait_release("to set up the index build")
            _build_rows(checkpoint, data_specs, None, group, **options)
            return None
        return _build_main(checkpoint, data_specs, out, group, **options)
    except Exception as e:
        if group is not None and is_comm_error(e):
            raise RetrievalError(f"rank {group.rank} of {group.world_size}: the index build stopped: another "
                                 f"process of the job failed or stopped answering ({str(e).strip().splitlines()[0]})"
                                 ) from None
        raise
    finally:
        if group is not None:
            group.close()


def _build_main(checkpoint, data_specs, out: Path, group, **options) -> EmbeddingIndex:
    """build_index in one process, or as rank 0 of a torchrun job (which releases the others once the folder,
    checkpoint and data are checked, or hands them its error)."""
    try:
        existed = check_index_target(out)
    except BaseException as e:
        if group is not None:
            group.fail(e)
        raise
    try:
        with exclusive_lock(out):
            old = (out / META_NAME).is_file()
            index = _build_rows(checkpoint, data_specs, out, group, **options)
            save_index(index, out, locked=True)
            if old:
                logger.info(f"replaced the previous index in {out}")
    except BaseException as e:
        if group is not None and not group.released:
            group.fail(e)
        if not existed and out.is_dir() and {p.name for p in out.iterdir()} <= {".lock"}:
            (out / ".lock").unlink(missing_ok=True)
            out.rmdir()
        raise
    logger.info(f"index: {len(index):,} vectors of {index.dimension} dims, {index.meta['factory']} ({index.metric}), "
                f"{len(index.label_counts())} classes -> {out}")
    return index


def _build_rows(checkpoint, data_specs, out: Path | None, group, *, factory, metric, prototypes, batch_size, device,
                root, classes, exclude, subset, seed, search_params, train_size, on_disk,
                chunk_size, precision) -> EmbeddingIndex | None:
    """Open the datasets and run retrieval.index_build.build_streaming (rank 0 releases the others first)."""
    from retrieval.data.stream import open_dataset
    from retrieval.index_build import DEFAULT_CHUNK_SIZE, BuildPlan, build_streaming

    main = group is None or group.is_main
    ckpt = load_checkpoint(checkpoint, device=device)
    if not data_specs:
        raise UsageError("`data`: give at least one dataset spec")
    datasets = [open_dataset(spec, root=_data_root(root), classes=classes, exclude=exclude, subset=subset, seed=seed)
                for spec in data_specs]
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    chunk = -(-chunk // batch_size) * batch_size  # whole batches: a chunk embeds as it would in one pass
    plan = BuildPlan.of(datasets, chunk)
    entries = []
    for ds, first in zip(datasets, plan.starts):
        entry = {"spec": ds.spec, "filters": ds.filters, "images": len(ds), "preprocessing": ds.preprocessing,
                 "added": _now(), "precision": precision}
        if not prototypes:
            entry["ids"] = [first, first + len(ds) - 1]
        entries.append(entry)
    meta = dict(tower=tower_meta(ckpt), preprocessing=PREPROCESSING, prototypes=bool(prototypes), data=entries,
                precision=precision) if main else {}
    if group is not None and main:
        group.release(None)  # the folder, checkpoint and data are fine: the others start
    try:
        result = build_streaming(plan, ckpt.tower, factory=factory, metric=metric, seed=seed, train_size=train_size,
                                 search_params=search_params, on_disk=on_disk, prototypes=prototypes,
                                 batch_size=batch_size, device=device, precision=precision,
                                 group=group, out=out, meta=meta)
    finally:
        plan.close()
    embed = result.seconds.get("embed", 0.0)
    if main and result.index is not None:
        result.index.meta["build"] = {"processes": group.world_size if group is not None else 1, "chunk_size": chunk,
                                      "seconds": {k: round(v, 3) for k, v in result.seconds.items()}}
    if main:
        where = f" (this process; {group.world_size} processes embedded their shares)" if group is not None else ""
        logger.info(f"embedded {result.rows_embedded:,} images in {embed:.1f}s "
                    f"({result.rows_embedded / max(embed, 1e-9):,.0f} images/s, {precision}){where}")
    return result.index


def add_to_index(
    folder: str | os.PathLike,
    data_specs: Sequence[str],
    *,
    checkpoint: str | os.PathLike | None = None,
    batch_size: int | None = None,
    device="auto",
    root=None,
    classes=None,
    exclude=None,
    subset: int | None = None,
    seed: int = 0,
    precision: str | None = "auto",
) -> tuple[EmbeddingIndex, np.ndarray]:
    """Embed more images with the index's own tower (fingerprint checked) and append them with new ids, saved
    atomically. Returns the index and the new ids. `precision`: auto embeds them in the index's precision (where
    this device runs it natively); another one warns."""
    folder = Path(folder)
    device = resolve_device(device)
    read_index_meta(folder)  # a clear error before taking the lock (which would create the folder)
    with exclusive_lock(folder):
        index = load_index(folder)
        ckpt = load_index_tower(index, device=device, checkpoint=checkpoint)
        if not tower_files(index.meta):  # written before towers were copied: it carries its tower from now on
            index.meta["tower"] = tower_meta(ckpt)
            logger.info(f"copying the tower into {folder} (the index named it by path only)")
        precision = matching_precision(precision, device, index.meta.get("precision"), f"images added to {folder}")
        datasets, entries = _load_datasets(data_specs, _data_root(root), classes, exclude, subset, seed)
        images, labels, names, sources = merge_datasets(datasets)
        emb = _embed(ckpt, images, batch_size, device, precision)
        entries = [{**entry, "precision": precision} for entry in entries]
        new_ids = append_embeddings(index, folder, emb, labels, names, sources, entries)
    return index, new_ids


def append_embeddings(index: EmbeddingIndex, folder: str | os.PathLike, embeddings: np.ndarray, labels: np.ndarray,
                      classes: Sequence[str], sources: Sequence[str], data: Sequence[dict] = ()) -> np.ndarray:
    """Append embeddings of the index's own tower (labels index `classes`) with new ids and save the index into
    `folder` atomically; the caller holds the folder lock and loaded `index` under it (add_to_index, the
    service's POST /items). An index of class prototypes gets one new prototype per new class and refuses
    classes it has. Returns the new ids."""
    if index.meta.get("prototypes"):
        already = [c for c in dict.fromkeys(np.asarray(classes)[np.unique(labels)].tolist()) if c in index.classes]
        if already:
            raise UsageError(
                f"{folder} holds one prototype per class and already has {', '.join(already)}; rebuild it with "
                "prototypes giving every dataset spec, or add only new classes"
            )
        embeddings, labels, sources = class_prototypes(embeddings, labels, classes)
    new_ids = index.add(embeddings, labels, classes, sources, data=data)
    save_index(index, folder, locked=True)
    logger.info(f"added {len(new_ids):,} vectors (ids {new_ids[0]}..{new_ids[-1]}); the index now holds {len(index):,}")
    if index.meta.get("calibration"):
        logger.info("note: the index has a calibrated distance threshold measured before this addition; "
                    "recalibrate it if its contents changed much")
    return new_ids


@dataclass
class Tuning:
    results: list  # retrieval.tune.Setting per grid point, in grid order
    chosen: object | None  # the fastest Setting reaching the target recall (None: none does)
    k: int
    target_recall: float
    queries: str  # what the queries were
    stored: bool  # whether the chosen setting was stored as the index's search parameters


def tune_index(
    folder: str | os.PathLike,
    queries: str,
    *,
    k: int = 10,
    target_recall: float = 0.95,
    grid: dict | None = None,
    store: bool = True,
    repeats: int = 3,
    root=None,
    classes=None,
    exclude=None,
    subset: int | None = 1000,
    seed: int = 0,
    batch_size: int | None = None,
    device="auto",
    checkpoint=None,
) -> Tuning:
    """Measure recall@k against exact search and queries/s of the index in `folder` for every point of `grid`
    (Faiss search parameters; default retrieval.tune.default_grid) with the images of `queries` (a seeded `subset`
    of them, default 1000), and store the fastest setting that reaches `target_recall` as the index's search
    parameters (meta "search_params", with the measurements under "tuned")."""
    from retrieval.tune import default_grid, fastest_reaching, measure_grid

    if not 0 < target_recall <= 1:
        raise UsageError(f"`target_recall` must be in (0, 1], got {target_recall}")
    if k <= 0:
        raise UsageError(f"`k` must be a positive number of neighbours, got {k}")
    iq = load_index_queries(folder, queries, root=root, classes=classes, exclude=exclude, subset=subset, seed=seed,
                            batch_size=batch_size, device=device, checkpoint=checkpoint)
    index = iq.index
    k = min(k, len(index))
    grid = default_grid(index) if grid is None else grid

    def progress(setting):
        logger.info(f"  {setting.search_params:<28} recall@{k} {setting.recall:.4f}  "
                    f"{setting.queries_per_s:>10,.0f} queries/s  {setting.latency_ms:.3f} ms/query")

    logger.info(f"tuning {index.meta['factory']} ({len(index):,} vectors) with {iq.describe()}")
    results, _ = measure_grid(index, iq.embeddings, k, grid, repeats=repeats, progress=progress,
                              target=target_recall)
    chosen = fastest_reaching(results, target_recall)
    stored = False
    if chosen is not None and store:
        update_index_meta(folder, search_params=chosen.search_params, tuned={
            "search_params": chosen.search_params, "k": k, "recall": round(chosen.recall, 6),
            "target_recall": target_recall, "queries_per_s": round(chosen.queries_per_s, 1),
            "latency_ms": round(chosen.latency_ms, 4), "queries": iq.describe(), "when": _now(),
            "grid": [r.to_json() for r in results],
        })
        stored = True
    return Tuning(results, chosen, k, target_recall, iq.describe(), stored)


# -- queries --------------------------------------------------------------------------------------------------------
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
    batch_size: int | None = None,
    device="auto",
    root=None,
    search_params: str | None = None,
    precision: str | None = "auto",
) -> QueryAnswers:
    """Image files, folders (every image inside) and dataset items -> neighbours and predicted labels.

    Unreadable inputs get a result with `error` (and an error in the log) and the others are still answered.
    With `grid`, a PNG of each answered query beside its neighbours is written there. `search_params` (Faiss's names: "nprobe=64",
    "efSearch=128", "k_factor_rf=8") replace the index's stored search parameters for these queries. `precision`:
    the queries' (auto: the index's where this device runs it natively)."""
    if grid is not None:
        check_grid_target(grid)
    searcher = Searcher.open(index, device=resolve_device(device), checkpoint=checkpoint, max_distance=max_distance,
                             batch_size=batch_size, search_params=search_params, precision=precision)
    k_used, note = searcher.effective_k(k)
    if note:
        logger.info(note)
    data_root = _data_root(root)
    datasets = DatasetCache(data_root)
    results = searcher.query_inputs(resolve_query_inputs(inputs, root=data_root, datasets=datasets), k_used)
    answers = QueryAnswers(results, k_used, searcher.max_distance)
    for r in answers.failed:  # answered None: say which input and why
        logger.error(r.error if r.query in r.error else f"{r.query}: {r.error}")
    if grid is not None:
        rows = query_grid_rows(results, SourceImages(data_root, datasets))
        if rows:
            drawn = render_grid(rows, grid, title=f"{Path(index).name}: {k_used} nearest neighbours")
            logger.info(f"wrote {grid}" + (f" (first {drawn} of {len(rows)} queries)" if drawn < len(rows) else ""))
            answers.grid = Path(grid)
        else:
            logger.info(f"no grid written to {grid}: no query was answered")
    return answers


# -- query datasets against an index (evaluate, calibrate) ----------------------------------------------------------
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
        text = f"{ds.spec}" + (f" {ds.filters}" if ds.filters else "") + f": {len(ds):,} images"
        own = int((self.self_ids >= 0).sum())
        if own:
            text += f", {own:,} of them in the index (left out of their own neighbours)"
        return text


def load_index_queries(folder, query_spec: str, *, root=None, classes=None, exclude=None, subset=None,
                       seed: int = 0, batch_size: int | None = None, device="auto",
                       checkpoint=None, precision: str | None = "auto") -> IndexQueries:
    """Load the index in `folder` and its tower, load and embed the query spec (`precision` auto: in the index's),
    match labels by class name and find each query's own entry in the index (by source) for leave-one-out."""
    device = resolve_device(device)
    index = load_index(folder)
    if len(index) == 0:
        raise RetrievalError(f"the index in {folder} is empty")
    precision = matching_precision(precision, device, index.meta.get("precision"), "queries")
    ckpt = load_index_tower(index, device=device, checkpoint=checkpoint)
    index.use_device(device)
    ds = load_dataset(query_spec, root=_data_root(root), classes=classes, exclude=exclude, subset=subset, seed=seed)
    emb = embed_images(ckpt.tower, ds.images, batch_size=batch_size or default_batch_size(device), device=device,
                       progress=True, desc="embedding queries", precision=precision)
    all_classes = list(index.classes)
    missing = [c for c in ds.class_counts() if c not in all_classes]
    all_classes += missing
    to_index = np.array([all_classes.index(c) if c in all_classes else -1 for c in ds.classes], np.int64)
    labels = to_index[ds.labels.numpy()]
    rows = index.sources.rows_of(ds.sources, key=os.path.realpath)  # item specs as they are, paths resolved
    self_ids = np.where(rows >= 0, index.ids[np.maximum(rows, 0)], -1).astype(np.int64)
    return IndexQueries(index, ds, emb, labels, all_classes, missing, self_ids)


@dataclass
class Evaluation:
    metrics: RetrievalMetrics
    queries: IndexQueries
    payload: dict  # what `retrieval evaluate --json` prints and the report's metrics.json holds
    context: dict  # how the report describes the index, tower and queries
    report_files: list[Path] = field(default_factory=list)


def evaluate(
    index: str | os.PathLike,
    queries: str,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    report: str | os.PathLike | None = None,
    root=None,
    classes=None,
    exclude=None,
    subset: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device="auto",
    checkpoint=None,
    precision: str | None = "auto",
) -> Evaluation:
    """Retrieval metrics of the images of `queries` against the index in `index` (see retrieval.metrics), and a
    report folder in `report` (replaced atomically) when given.

    Queries whose own image is in the index are evaluated leave-one-out; queries of classes the index lacks have
    R = 0 and are left out of the averages (counted as lone). Exact (Flat) indexes are searched exactly over their
    vectors, approximate ones with their own search, as their users get it."""
    if report is not None:
        from retrieval.reports import check_report_target

        check_report_target(report)
    iq = load_index_queries(index, queries, root=root, classes=classes, exclude=exclude, subset=subset, seed=seed,
                            batch_size=batch_size, device=device, checkpoint=checkpoint, precision=precision)
    vectors = iq.index.flat_vectors()
    metrics = retrieval_metrics(
        iq.embeddings, iq.labels, vectors, iq.index.labels, search=None if vectors is not None else iq.index.search,
        reference_ids=iq.index.ids, query_self_ids=iq.self_ids, ks=ks, classes=iq.classes, progress=True,
    )
    if iq.missing_classes:
        logger.info(f"note: the index has no images of class(es) {', '.join(iq.missing_classes)}: "
                    f"{metrics.n_lone:,} lone queries are left out of the averages")
    meta = iq.index.meta
    tower = meta.get("tower") or {}
    context = {
        "index": str(index),
        "index_description": f"{meta['factory']}, metric {meta['metric']}, {len(iq.index):,} vectors, "
                             f"{len(iq.index.classes)} classes",
        "tower": f"{tower.get('name')} ({tower.get('fingerprint', '')[:12]}) {tower.get('checkpoint', '')}",
        "queries": iq.describe(),
    }
    payload = {**metrics.to_json(), "index": str(index), "queries": queries, "filters": iq.dataset.filters,
               "left_out_own_entries": int((iq.self_ids >= 0).sum())}
    result = Evaluation(metrics, iq, payload, context)
    if report is not None:
        from retrieval.reports import write_report

        result.report_files = write_report(report, metrics, iq, context, payload=payload, root=_data_root(root),
                                           seed=seed)
        logger.info(f"wrote {report}/ ({', '.join(p.name for p in result.report_files)})")
    return result


def calibrate(
    index: str | os.PathLike,
    queries: str,
    *,
    store: bool = True,
    root=None,
    classes=None,
    exclude=None,
    subset: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device="auto",
    checkpoint=None,
    accept: float | None = None,
    gate: bool = True,
    non_digits: str | None = None,
    distance_accept: float | None = None,
    precision: str | None = "auto",
) -> tuple[Calibration, dict]:
    """Embed `queries` with the index's tower, calibrate the "unknown" threshold on nearest neighbours (own entries
    left out), and store it in the index metadata (unless store=False). Returns the calibration and the record.

    A tower with a digit-or-not gate (retrieval.gate; `gate=False` ignores it) gets its threshold here too, in
    record["gate"]: answering `accept` (default 0.99) of the in-distribution queries, or, with `non_digits` (a
    data spec of pictures that are no digit), the threshold that best separates the two (most digits answered
    minus non-digits answered). The gate then says "not a digit"; the distance threshold is left for "a digit of
    a class this index lacks": set by the rules below when some queries are of such classes, else only when
    `distance_accept` asks for it (the share of in-distribution queries it answers), since refusing far-off digits
    by distance is what refused badly corrupted digits before the gate (benchmarks/README.md). `precision`: the
    queries' arithmetic (auto: the index's, as for `query`).

    The rule: with `accept` given, the threshold answers that fraction of the in-distribution queries (those of the
    index's classes; pairs.acceptance_threshold). Without it: when some queries are of classes the index lacks
    (negatives), the threshold maximising F1 of "answered and right" (pairs.calibrate_threshold); when none are,
    the default acceptance rate pairs.DEFAULT_ACCEPT (0.99) of the queries, so that no hand-picked negatives
    are needed (F1 alone would then answer almost everything)."""
    iq = load_index_queries(index, queries, root=root, classes=classes, exclude=exclude, subset=subset, seed=seed,
                            batch_size=batch_size, device=device, checkpoint=checkpoint, precision=precision)
    dist, ids = nearest_neighbors(iq.embeddings, index_search(iq.index), 1, iq.self_ids)
    correct = iq.index.labels_of(ids[:, 0]) == iq.labels
    outside = iq.labels >= len(iq.index.classes)
    if accept is None and outside.any():
        cal, rule = calibrate_threshold(dist[:, 0], correct), "max-f1"
    else:
        rate = DEFAULT_ACCEPT if accept is None else float(accept)
        inside = ~outside
        base = acceptance_threshold(dist[inside, 0], correct[inside], rate)
        if outside.any():  # report over all queries, as the F1 rule does
            answered = dist[:, 0] <= base.max_distance
            tp, total = int((answered & correct).sum()), int(correct.sum())
            n = int(answered.sum())
            base = Calibration(base.max_distance, 2.0 * tp / (n + total) if n + total else 0.0, tp / n if n else 0.0,
                               tp / total if total else 0.0, n, int(np.isfinite(dist[:, 0]).sum()), total)
        cal, rule = base, f"accept {rate:g} of in-distribution queries"
    gate_record = _calibrate_gate(iq, outside, accept, non_digits, root, device, checkpoint) if gate else None
    if gate_record is not None and not outside.any():
        if distance_accept is None:
            every = acceptance_threshold(dist[:, 0], correct, 1.0)  # what answering every query scores
            cal = Calibration(None, every.f1, every.precision, every.recall, every.n_answered, every.n_queries,
                              every.n_correct)
            rule = "not set: the gate refuses non-digits (distance_accept sets one)"
        else:
            cal = acceptance_threshold(dist[:, 0], correct, float(distance_accept))
            rule = f"accept {float(distance_accept):g} of in-distribution queries"
    record = {
        **cal.to_json(),
        "rule": rule,
        "queries": queries,
        "filters": iq.dataset.filters,
        "classes_not_in_index": iq.missing_classes,
        "rejected_not_in_index": int((dist[outside, 0] > cal.max_distance).sum()),
        "queries_not_in_index": int(outside.sum()),
        "left_out_own_entries": int((iq.self_ids >= 0).sum()),
        "index_count": len(iq.index),
        **({"gate": gate_record} if gate_record is not None else {}),
        "created": _now(),
    }
    if store:
        update_index_meta(os.fspath(index), calibration=record)
        logger.info(f"stored in {Path(index) / META_NAME}")
    else:
        logger.info("not stored (dry run)")
    return cal, record


def _calibrate_gate(iq: IndexQueries, outside: np.ndarray, accept: float | None, non_digits: str | None, root,
                    device, checkpoint) -> dict | None:
    """The gate threshold of calibrate (None for a tower without a gate)."""
    from retrieval.gate import acceptance_threshold as gate_acceptance, digit_scores, separating_threshold

    ckpt = load_index_tower(iq.index, device=resolve_device(device), checkpoint=checkpoint)
    scores = digit_scores(ckpt.tower, iq.dataset.images, iq.embeddings, device=resolve_device(device))
    if scores is None:
        if non_digits:
            raise UsageError("`non_digits` calibrates a digit-or-not gate, and this index's tower has none "
                             "(retrieval gate train adds one)")
        return None
    inside = scores[~outside]
    out: dict = {}
    if non_digits:
        negatives = load_dataset(non_digits, root=_data_root(root))
        refused_scores = digit_scores(ckpt.tower, negatives.images, device=resolve_device(device))
        threshold = separating_threshold(inside, refused_scores)
        out.update(rule=f"most digits answered minus non-digits answered ({non_digits})", non_digits=non_digits,
                   non_digit_queries=int(len(refused_scores)),
                   refused_non_digits=float((refused_scores < threshold).mean()))
    else:
        rate = DEFAULT_ACCEPT if accept is None else float(accept)
        threshold = gate_acceptance(inside, rate)
        out["rule"] = f"accept {rate:g} of in-distribution queries"
    return {"threshold": threshold, **out, "answered": float((inside >= threshold).mean()),
            "in_distribution_queries": int(len(inside))}


# -- towers on their own (pairs, few-shot) --------------------------------------------------------------------------
@dataclass
class PairEvaluation:
    verification: Verification
    checkpoint: Checkpoint
    dataset: ImageDataset


def evaluate_pairs(
    checkpoint: str | os.PathLike,
    data: str,
    pairs_per_class: int = 500,
    seed: int = 0,
    *,
    root=None,
    classes=None,
    exclude=None,
    subset: int | None = None,
    batch_size: int | None = None,
    device="auto",
    precision: str | None = "auto",
) -> PairEvaluation:
    """Balanced same/different pairs from `data` (seeded), embedded by the checkpoint's tower (in `precision`: auto,
    fp32 or bf16), verified by the pair head (if the tower was trained with one) or by distance."""
    precision = check_precision(precision)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    ckpt = load_checkpoint(checkpoint, device=device)
    ds = load_dataset(data, root=_data_root(root), classes=classes, exclude=exclude, subset=subset, seed=seed)
    pairs = balanced_pairs(ds.labels.numpy(), pairs_per_class, seed)
    used, inverse = np.unique(np.r_[pairs.first, pairs.second], return_inverse=True)
    emb = embed_images(ckpt.tower, ds.images[torch.from_numpy(used)],
                       batch_size=batch_size or default_batch_size(device), device=device, progress=True,
                       precision=precision)
    a, b = emb[inverse[: len(pairs)]], emb[inverse[len(pairs):]]
    result = verify_pairs(a, b, pairs.same, ckpt.head, pairs_per_class=pairs_per_class, seed=seed)
    return PairEvaluation(result, ckpt, ds)


@dataclass
class FewShotRun:
    results: list[FewShotResult]
    embeddings_of: str  # "raw pixels" or the checkpoint path
    dataset: ImageDataset


def fewshot(
    checkpoint: str | os.PathLike,
    data: str,
    *,
    ways: int = 5,
    shots: int | Sequence[int] = (1, 5),
    queries: int = 15,
    episodes: int = 1000,
    method: str = "prototype",
    k: int = 1,
    seed: int = 0,
    classes=None,
    root=None,
    batch_size: int = 1024,
    device="auto",
    precision: str | None = "auto",
) -> FewShotRun:
    """N-way K-shot episodes (see retrieval.fewshot) over the images of `data`, embedded once by the checkpoint's
    tower (in `precision`: auto, fp32 or bf16), or by raw pixels when checkpoint is "pixels"."""
    if batch_size < 1:
        raise UsageError(f"`batch_size` must be a positive integer, got {batch_size}")
    shot_counts = [shots] if isinstance(shots, int) else list(shots)
    check_method(method, k, ways, shot_counts)  # before loading anything
    precision = check_precision(precision)
    ckpt = None
    if str(checkpoint) != PIXELS:
        device = resolve_device(device)
        precision = resolve_precision(precision, device)
        ckpt = load_checkpoint(checkpoint, device=device)
    ds = load_dataset(data, root=_data_root(root), classes=classes)
    # fail on impossible settings before spending time on embeddings
    check_fewshot_settings(ds.labels.numpy(), ways, shot_counts, queries, episodes, method, k, ds.classes)
    if ckpt is None:
        embeddings, what = pixel_embeddings(ds.images), "raw pixels"
    else:
        embeddings = embed_images(ckpt.tower, ds.images, batch_size=batch_size, device=device, progress=True,
                                  precision=precision)
        what = str(ckpt.path)
    results = evaluate_fewshot(embeddings, ds.labels, ways, shot_counts, queries=queries, episodes=episodes,
                               method=method, seed=seed, k=k, class_names=ds.classes)
    return FewShotRun(results, what, ds)


def train_digit_gate(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    form: str = "cnn",
    width: int = 16,
    steps: int = 1500,
    degrade_p: float = 0.3,
    seed: int = 0,
    accept: float = 0.99,
    digits: int = 20000,
    non_digits: int = 6000,
    root=None,
    device="auto",
    overwrite: bool = False,
) -> dict:
    """A copy of the run `checkpoint` in the run folder `out` whose tower carries a trained digit-or-not gate
    (retrieval.gate): `digits` pictures of the tower's training slice against `non_digits` pictures of each of
    retrieval.data.nondigits' training sources, `steps` steps; its threshold answers `accept` of 2,000 digits of
    the validation slice. The tower's own weights are unchanged (its embeddings too); its fingerprint covers the
    gate, so indexes are built anew from `out`. Returns the new checkpoint sidecar."""
    import shutil

    from retrieval.checkpoint import resolve_checkpoint, save_checkpoint
    from retrieval.data.nondigits import load_split
    from retrieval.fsutil import ensure_writable_dir
    from retrieval.gate import GateRecipe, acceptance_threshold as gate_acceptance, attach_gate, digit_pictures, \
        digit_scores, train_gate

    recipe = GateRecipe(form=form, width=int(width), steps=int(steps), degrade_p=float(degrade_p), seed=int(seed),
                        accept=float(accept))
    if recipe.steps < 1 or recipe.width < 1 or not 0 <= recipe.degrade_p <= 1 or not 0 < recipe.accept <= 1:
        raise UsageError("gate settings: `steps` and `width` must be positive, `degrade_p` in [0, 1], `accept` in "
                         "(0, 1]")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"`out` {out} already holds files; choose an empty folder (or overwrite)")
    device = resolve_device(device)
    source = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(source, device=device)
    attach_gate(ckpt.tower, None)  # a gate already there is replaced
    root = _data_root(root)
    positives, validation = digit_pictures(ckpt.meta, root=root, n=int(digits), seed=recipe.seed)
    sets = load_split("train", int(non_digits), seed=recipe.seed, root=root)
    negatives = np.concatenate([s.images for s in sets.values()])
    start = time.perf_counter()
    gate = train_gate(ckpt.tower, positives, negatives, recipe, device=device)
    seconds = time.perf_counter() - start
    attach_gate(ckpt.tower, gate)
    gate.threshold = gate_acceptance(digit_scores(ckpt.tower, validation, device=device), recipe.accept)
    ensure_writable_dir(out, "run folder")
    for name in ("config.json", "metrics.jsonl", "card.md"):  # the run's own record, as it was
        if (source.parent / name).is_file():
            shutil.copyfile(source.parent / name, out / name)
    skip = {"format", "tower", "embedding_size", "deskew", "test_shifts", "fingerprint", "has_pair_head", "gate"}
    record = {"recipe": {k: v for k, v in vars(recipe).items()}, "digits": int(len(positives)),
              "non_digits": {name: int(len(s.images)) for name, s in sets.items()},
              "threshold_rule": f"answers {recipe.accept:g} of {len(validation):,} validation digits",
              "seconds": round(seconds, 1), "from_checkpoint": str(source.resolve()), "created": _now()}
    return save_checkpoint(out / "best", ckpt.tower, ckpt.head, **{k: v for k, v in ckpt.meta.items() if k not in skip},
                           gate=record)


@dataclass
class Export:
    path: Path  # the ONNX / TorchScript file
    sidecar_path: Path  # its JSON sidecar
    sidecar: dict


def export(checkpoint: str | os.PathLike, format: str, out: str | os.PathLike, *, opset: int | None = None) -> Export:
    """The checkpoint's tower as an inference graph in `out` (see retrieval.export): ONNX (`opset`, default 17) or
    TorchScript, checked against the tower before it is written, with a JSON sidecar beside it."""
    from retrieval.export import DEFAULT_OPSET, FORMATS, check_export, export_tower

    if format not in FORMATS:
        raise UsageError(f"`format` {format!r}: expected one of: {', '.join(FORMATS)}")
    if opset is not None and format != "onnx":
        raise UsageError("`opset` applies to the onnx `format` only")
    ckpt = load_checkpoint(checkpoint, device="cpu")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    check_export(format, ckpt.tower, opset)
    start = time.perf_counter()
    sidecar = export_tower(ckpt, format, out, opset=opset)
    out = Path(out)
    parity = sidecar.get("parity")
    checked = (f"; max |difference| from the tower {parity['max_abs_diff']:.1e} on {parity['images']} check images "
               f"({parity['runtime']})") if parity else ""
    logger.info(f"exported the {sidecar['tower']} tower ({sidecar['embedding_size']}-d, inference options "
                f"deskew={sidecar['inference']['deskew']}, test_shifts={sidecar['inference']['test_shifts']}) as "
                f"{format} to {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f}s{checked}")
    return Export(out, out.with_name(out.name + ".json"), sidecar)


# -- training -------------------------------------------------------------------------------------------------------
def train(config, out_dir=None, **options) -> Path:
    """Train a tower as `config` says (a config file, the name of a shipped config such as "mnist-default", a
    Config or a dict) into `out_dir` (see retrieval.trainer.train for the options)."""
    from retrieval.trainer import train as run_training

    if isinstance(config, (str, os.PathLike)):
        config = resolve_config_path(config)
    return run_training(config, out_dir, **options)


def run_summary(run: str | os.PathLike, seconds: float | None = None) -> dict:
    """What a finished (or interrupted) training run amounts to, as `retrieval train --json` prints it: the best
    epoch and its validation figures, the last epoch's, the files written and the times (`seconds`: this call's
    wall time, when the caller measured it)."""
    run = Path(run)
    history = []
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        history = [json.loads(line) for line in metrics.read_text("utf-8").splitlines() if line.strip()]

    def checkpoint(name: str) -> dict | None:
        path = run / f"{name}.json"
        if not path.is_file():
            return None
        meta = json.loads(path.read_text("utf-8"))
        val = meta.get("val") or {}
        return {"epoch": meta.get("epoch"), "val_precision_at_1": val.get("precision_at_1"),
                "val_map_at_r": val.get("map_at_r"), "fingerprint": meta.get("fingerprint"),
                "checkpoint": str(run / f"{name}.safetensors"), "interrupted": bool(meta.get("interrupted"))}

    state = {}
    if (run / "state.json").is_file():
        state = json.loads((run / "state.json").read_text("utf-8"))
    last = checkpoint("last")
    config = json.loads((run / "config.json").read_text("utf-8")) if (run / "config.json").is_file() else {}
    return {
        "run": str(run),
        "config": config.get("name"),
        "epochs": (config.get("train") or {}).get("epochs"),
        "epochs_done": len(history),
        "finished": bool(state.get("finished")),
        "best": checkpoint("best"),
        "last": last,
        "validation": [{k: r.get(k) for k in ("epoch", "loss", "val_precision_at_1", "val_map_at_r")}
                       for r in history],
        "times": {
            "train_seconds": state.get("train_seconds", sum(float(r.get("epoch_seconds") or 0) for r in history)),
            "validation_seconds": sum(float(r.get("val_seconds") or 0) for r in history),
            "images_per_s_last_epoch": history[-1].get("images_per_s") if history else None,
            **({"wall_seconds": seconds} if seconds is not None else {}),
        },
        "files": {name: str(run / name) for name in ("config.json", "metrics.jsonl", "card.md", "state.json")
                  if (run / name).is_file()},
    }


# -- the whole chain ------------------------------------------------------------------------------------------------
FEWSHOT_CLASSES = ["0", "4", "5", "8"]
QUICKSTART_QUERIES = [f"mnist:test[{i}]" for i in range(6)]
# A tiny mode for tests and smoke checks: a small subset, one short epoch, few episodes.
TINY = {"train_subset": 800, "val_size": 200, "epochs": 1, "query_subset": 300, "episodes": 100}


@dataclass
class QuickstartResult:
    out: Path
    run: Path
    index: Path
    report: Path
    fewshot_run: Path | None
    metrics: dict
    fewshot: list = field(default_factory=list)
    queries: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    def summary_lines(self) -> list[str]:
        m = self.metrics
        lines = ["", "quickstart summary", "------------------"]
        rows = [(f"recall@{k}", m[f"recall@{k}"]) for k in (1, 2, 4, 8)]
        rows += [("precision@1", m["precision@1"]), ("MAP@R", m["map@r"])]
        lines.append(f"retrieval: mnist:test ({m['n_queries']:,} queries) vs index of mnist:train "
                     f"({m['n_references']:,} references)")
        lines += [f"  {name:<12} {value:.4f}" for name, value in rows]
        if self.fewshot:
            lines.append(f"few-shot: digits {','.join(FEWSHOT_CLASSES)} never seen in training, "
                         f"{self.fewshot[0].ways}-way, {self.fewshot[0].episodes} episodes")
            lines += [f"  {r.shots}-shot       {r.accuracy:.4f} +- {r.ci95:.4f}" for r in self.fewshot]
        if self.queries:
            lines.append("queries:")
            for r in self.queries:
                truth = f" (true {r.true_label})" if r.true_label is not None else ""
                lines.append(f"  {r.query:<16} -> {r.label}{truth}, nearest distance {r.neighbors[0].distance:.3f}")
        lines.append("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.seconds.items()))
        lines.append("wrote:")
        lines.append(f"  run folder      {self.run}")
        if self.fewshot_run:
            lines.append(f"  few-shot run    {self.fewshot_run}")
        lines.append(f"  index           {self.index}")
        lines.append(f"  report          {self.report}  (summary.md, metrics.json, plots)")
        lines.append(f"  model card      {self.run / 'card.md'}")
        return lines

    def to_json(self) -> dict:
        """What `retrieval quickstart --json` prints."""
        return {
            "out": str(self.out), "run": str(self.run),
            "fewshot_run": str(self.fewshot_run) if self.fewshot_run else None,
            "index": str(self.index), "report": str(self.report), "card": str(self.run / "card.md"),
            "metrics": self.metrics,
            "fewshot": [{"classes": FEWSHOT_CLASSES, **r.to_dict()} for r in self.fewshot],
            "queries": [r.to_json() for r in self.queries],
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def _finished_run(run: Path, epochs: int) -> bool:
    """A run folder whose `last` checkpoint is from the final epoch of an uninterrupted run."""
    meta_path = run / "last.json"
    if not (meta_path.is_file() and (run / "best.safetensors").is_file()):
        return False
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
    except (ValueError, OSError):
        return False
    return meta.get("epoch") == epochs and not meta.get("interrupted")


def shipped_configs() -> list[str]:
    """Names of the configs shipped inside the package (retrieval/configs/<name>.toml, package data)."""
    from importlib.resources import files

    folder = files("retrieval").joinpath("configs")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml")) if folder.is_dir() else []


def shipped_config(name: str) -> Path:
    """The path of a config shipped with the tool, by name (mnist-default, ...): package data, so it is found in
    a source checkout and in any installation alike."""
    from importlib.resources import files

    resource = files("retrieval").joinpath("configs", f"{name}.toml")
    if not resource.is_file():
        raise UsageError(f"`config` {name!r}: no shipped config of that name; shipped: {', '.join(shipped_configs())}")
    return Path(os.fspath(resource))  # the package is installed as files (a wheel or a checkout), never zipped


def resolve_config_path(config: str | os.PathLike) -> Path:
    """A config file path, or the name of a shipped config (mnist-default) when no such file exists."""
    path = Path(config)
    if path.is_file() or path.suffix or len(path.parts) != 1:
        return path
    return shipped_config(str(config))


def _quickstart_train(config_name: str, run: Path, overrides: list[str], force: bool, device, root) -> Path:
    from retrieval.config import load_config

    path = shipped_config(config_name)
    cfg = load_config(path, overrides)
    if not force and _finished_run(run, cfg.train.epochs):
        logger.info(f"[train] reusing the finished run in {run} (--force to retrain)")
        return run
    resume = not force and (run / "state.json").is_file()
    logger.info(f"[train] {'resuming' if resume else 'training'} {config_name} -> {run}")
    return train(path, run, device=device, resume=resume, overrides=overrides, data_root=root, overwrite=force)


def _quickstart_index(run: Path, folder: Path, subset: int | None, force: bool, device, root, precision) -> Path:
    fingerprint = load_checkpoint(run).fingerprint
    if not force and (folder / META_NAME).is_file():
        try:
            if read_index_meta(folder)["tower"]["fingerprint"] == fingerprint:
                logger.info(f"[index] reusing {folder} (built by the same tower)")
                return folder
        except (RetrievalError, KeyError, TypeError):
            pass
    logger.info(f"[index] embedding mnist:train and building a Flat index -> {folder}")
    build_index(run, ["mnist:train"], folder, subset=subset, device=device, root=root, precision=precision)
    return folder


def _card_with_test_figures(run: Path, evaluation: "Evaluation") -> None:
    """Rewrite the run's model card with the test figures just measured."""
    from retrieval.cards import write_run_card

    m = evaluation.metrics.to_json()
    ds = evaluation.queries.dataset
    test = {**{k: m.get(k) for k in ("recall@1", "precision@1", "map@r", "r_precision", "per_class")},
            "queries": f"{ds.spec} ({len(ds):,} images" + "".join(f", {k} {v}" for k, v in (ds.filters or {}).items())
                       + ")",
            "references": f"an index of mnist:train ({m['n_references']:,} images)"}
    write_run_card(run, test=test)


def quickstart(out: str | os.PathLike = "quickstart", *, force: bool = False, tiny: bool = False,
               fewshot_step: bool = True, device="auto", root=None,
               precision: str | None = "auto") -> QuickstartResult:
    """Fetch MNIST, train mnist-default, index mnist:train, evaluate mnist:test with a report, train mnist-fewshot
    and run its episodes, answer a few queries: every step into `out` (runs/, indexes/, reports/), each reusing
    what an earlier run left there. `precision` (auto, fp32, bf16): the towers' arithmetic in every step."""
    from retrieval.data.fetch import fetch_dataset

    out = Path(out)
    root = _data_root(root)
    device = str(resolve_device(device))
    precision = check_precision(precision)
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[name] = now - t
        t = now

    logger.info(f"[data] MNIST in {root}")
    fetch_dataset("mnist", root)
    lap("fetch")

    overrides = []
    if tiny:
        overrides = [f"data.subset={TINY['train_subset']}", f"data.val_size={TINY['val_size']}",
                     f"train.epochs={TINY['epochs']}"]
    if precision != "auto":  # else the configs' own train.precision (auto)
        overrides.append(f"train.precision={precision}")
    run = _quickstart_train("mnist-default", out / "runs" / "mnist-default", overrides, force, device, root)
    lap("train")

    index = _quickstart_index(run, out / "indexes" / "mnist-default-train", TINY["train_subset"] if tiny else None,
                              force, device, root, precision)
    lap("index")

    logger.info("[evaluate] mnist:test against the index")
    report = out / "reports" / "mnist-default-test"
    evaluation = evaluate(index, "mnist:test", (1, 2, 4, 8, 16), report=report, root=root,
                          subset=TINY["query_subset"] if tiny else None, device=device, precision=precision)
    _card_with_test_figures(run, evaluation)
    lap("evaluate")

    fewshot_run, fewshot_results = None, []
    if fewshot_step:
        fewshot_run = _quickstart_train("mnist-fewshot", out / "runs" / "mnist-fewshot", overrides, force, device,
                                        root)
        logger.info(f"[fewshot] 4-way episodes on mnist:test digits {','.join(FEWSHOT_CLASSES)}")
        fewshot_results = fewshot(fewshot_run, "mnist:test", classes=FEWSHOT_CLASSES, ways=4, shots=[1, 5],
                                  queries=15, episodes=TINY["episodes"] if tiny else 1000, seed=0, root=root,
                                  batch_size=256, device=device, precision=precision).results
        lap("fewshot")
    else:
        logger.info("[fewshot] skipped; to run it: retrieval train --config mnist-fewshot && "
                    "retrieval fewshot --checkpoint runs/mnist-fewshot --data mnist:test --classes 0,4,5,8 "
                    "--ways 4 --shots 1,5")

    logger.info(f"[query] {', '.join(QUICKSTART_QUERIES)}")
    answers = query(index, QUICKSTART_QUERIES, k=5, device=device, root=root, precision=precision)
    lap("query")

    return QuickstartResult(out=out, run=run, index=index, report=report, fewshot_run=fewshot_run,
                            metrics=evaluation.metrics.to_json(), fewshot=fewshot_results, queries=answers.results,
                            seconds=seconds)
