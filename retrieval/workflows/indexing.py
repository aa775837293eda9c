"""Index folders from towers: build one, add to one, tune its search parameters."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from retrieval.checkpoint import load_checkpoint
from retrieval.compute import Compute
from retrieval.data.preprocess import PREPROCESSING
from retrieval.data.selection import Selection, merge_datasets
from retrieval.distributed import is_comm_error, join as join_process_group
from retrieval.errors import RetrievalError, UsageError
from retrieval.faiss_tools import metric_code
from retrieval.index import (
    EmbeddingIndex, IndexFolder, class_prototypes, load_index_tower, normalize_factory, tower_files, tower_meta
)
from retrieval.index_build import DEFAULT_CHUNK_SIZE, IndexSpec, build_streaming
from retrieval.index_build_rows import BuildPlan, TowerRows
from retrieval.tune import default_grid, fastest_reaching, measure_grid
from retrieval.workflows.common import now
from retrieval.workflows.querying import load_index_queries

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class BuildRequest:
    """What one index build does, checked: the tower, the images, the Faiss index to make, how to compute."""

    checkpoint: str | os.PathLike
    data: Selection
    factory: str
    metric: str
    prototypes: bool
    search_params: str | None
    train_size: int | None
    on_disk: bool
    chunk_size: int | None
    compute: Compute  # pinned: device and precision resolved

    def index_spec(self):
        """The retrieval.index_build.IndexSpec of this build."""
        return IndexSpec(self.factory, self.metric, self.data.seed, train_size=self.train_size,
                         search_params=self.search_params, on_disk=self.on_disk, prototypes=self.prototypes)


def build_index(
    checkpoint: str | os.PathLike,
    data: Selection | Sequence[str],
    out: str | os.PathLike | None = None,
    *,
    factory: str = "Flat",
    metric: str = "ip",
    prototypes: bool = False,
    search_params: str | None = None,
    train_size: int | None = None,
    on_disk: bool = False,
    chunk_size: int | None = None,
    compute: Compute | None = None,
    dist_timeout: float | None = None,
) -> EmbeddingIndex | None:
    """Checkpoint + the images of `data` (a Selection, or dataset specs) -> an index saved in `out` (default
    indexes/<run>-<data>; the index's .folder), replacing any index there atomically. The folder lock is held
    from the start, so a second build into the same folder fails at once.

    The images are read and embedded `chunk_size` at a time (retrieval.index_build: memory for the tower, the
    index and one chunk); trained indexes (IVF, PQ, ...) are trained on a seeded sample of `train_size` vectors
    (default from the factory). `on_disk`: an IVF index's inverted lists in a file of the folder, memory-mapped
    when searched (built in blocks of retrieval.index_build.DEFAULT_BLOCK_SIZE vectors). Launched by torchrun with
    more than one process, every process calls this with the same arguments: each embeds its share of the rows
    (`dist_timeout`: seconds a process waits for the others), rank 0 merges the shares, writes the folder and
    returns the index; the others return None. `compute`'s precision (auto, fp32, bf16; retrieval.precision):
    the tower's arithmetic; the metadata's "precision" says which one embedded it."""
    data = Selection.of(data)
    compute = Compute.of(compute)
    if out is None:
        out = Path("indexes") / default_index_name(checkpoint, data.specs, classes=data.classes,
                                                   exclude=data.exclude, subset=data.subset, prototypes=prototypes)
    out = Path(out)
    _check_build_options(metric, train_size, chunk_size, prototypes, on_disk)
    group = join_process_group(compute.device, dist_timeout)  # None: one process
    if group is not None:
        compute = Compute(group.device, compute.batch_size, compute.precision)
    request = BuildRequest(checkpoint, data, normalize_factory(factory), metric, prototypes, search_params,
                           train_size, on_disk, chunk_size, compute.pinned())
    try:
        if group is not None and not group.is_main:
            group.wait_release("to set up the index build")
            _build_rows(request, None, group)
            return None
        return _build_main(request, out, group)
    except Exception as e:
        if group is not None and is_comm_error(e):
            raise RetrievalError(f"rank {group.rank} of {group.world_size}: the index build stopped: another "
                                 f"process of the job failed or stopped answering ({str(e).strip().splitlines()[0]})"
                                 ) from None
        raise
    finally:
        if group is not None:
            group.close()


def _check_build_options(metric: str, train_size, chunk_size, prototypes: bool, on_disk: bool) -> None:
    metric_code(metric)
    for name, value in (("train_size", train_size), ("chunk_size", chunk_size)):
        if value is not None and value <= 0:
            raise UsageError(f"`{name}` must be positive, got {value}")
    if prototypes and on_disk:
        raise UsageError("`on_disk` does not apply to `prototypes` (one vector per class)")


def _build_main(request: BuildRequest, out: Path, group) -> EmbeddingIndex:
    """build_index in one process, or as rank 0 of a torchrun job (which releases the others once the folder,
    checkpoint and data are checked, or hands them its error)."""
    folder = IndexFolder(out)
    try:
        existed = folder.check_target()
    except BaseException as e:
        if group is not None:
            group.fail(e)
        raise
    try:
        with folder.lock():
            old = folder.holds_index()
            index = _build_rows(request, out, group)
            folder.save(index, locked=True)
            if old:
                logger.info(f"replaced the previous index in {out}")
    except BaseException as e:
        if group is not None and not group.released:
            group.fail(e)
        if not existed:
            folder.remove_if_unused()
        raise
    logger.info(f"index: {len(index):,} vectors of {index.dimension} dims, {index.meta['factory']} ({index.metric}), "
                f"{len(index.label_counts())} classes -> {out}")
    return index


def _build_rows(request: BuildRequest, out: Path | None, group) -> EmbeddingIndex | None:
    """Open the datasets and run retrieval.index_build.build_streaming (rank 0 releases the others first)."""
    main = group is None or group.is_main
    compute = request.compute
    ckpt = load_checkpoint(request.checkpoint, device=compute.device)
    datasets = request.data.open()
    chunk = DEFAULT_CHUNK_SIZE if request.chunk_size is None else request.chunk_size
    chunk = -(-chunk // compute.batch) * compute.batch  # whole batches: a chunk embeds as it would in one pass
    plan = BuildPlan.of(datasets, chunk)
    meta = _build_meta(request, ckpt, datasets, plan) if main else {}
    if group is not None and main:
        group.release(None)  # the folder, checkpoint and data are fine: the others start
    try:
        result = build_streaming(TowerRows(plan, ckpt.tower, compute), request.index_spec(), group=group, out=out,
                                 meta=meta)
    finally:
        plan.close()
    embed = result.seconds.get("embed", 0.0)
    if main and result.index is not None:
        result.index.meta["build"] = {"processes": group.world_size if group is not None else 1, "chunk_size": chunk,
                                      "seconds": {k: round(v, 3) for k, v in result.seconds.items()}}
    if main:
        where = f" (this process; {group.world_size} processes embedded their shares)" if group is not None else ""
        logger.info(f"embedded {result.rows_embedded:,} images in {embed:.1f}s "
                    f"({result.rows_embedded / max(embed, 1e-9):,.0f} images/s, {compute.precision}){where}")
    return result.index


def data_entry(ds, precision: str) -> dict:
    """How an index's metadata records one dataset spec it holds."""
    return {"spec": ds.spec, "filters": ds.filters, "images": len(ds), "preprocessing": ds.preprocessing,
            "added": now(), "precision": precision}


def _build_meta(request: BuildRequest, ckpt, datasets, plan) -> dict:
    entries = []
    for ds, first in zip(datasets, plan.starts):
        entry = data_entry(ds, request.compute.precision)
        if not request.prototypes:
            entry["ids"] = [first, first + len(ds) - 1]
        entries.append(entry)
    return dict(tower=tower_meta(ckpt), preprocessing=PREPROCESSING, prototypes=bool(request.prototypes),
                data=entries, precision=request.compute.precision)


def add_to_index(
    folder: str | os.PathLike,
    data: Selection | Sequence[str],
    *,
    checkpoint: str | os.PathLike | None = None,
    compute: Compute | None = None,
) -> tuple[EmbeddingIndex, np.ndarray]:
    """Embed the images of `data` with the index's own tower (fingerprint checked) and append them with new ids,
    saved atomically. Returns the index and the new ids. `compute`'s precision: auto embeds them in the index's
    precision (where this device runs it natively); another one warns."""
    folder = Path(folder)
    data = Selection.of(data)
    compute = Compute.of(compute).on_device()  # the precision once the index is read
    index_folder = IndexFolder(folder)
    index_folder.read_meta()  # a clear error before taking the lock (which would create the folder)
    with index_folder.lock():
        index = index_folder.load()
        ckpt = load_index_tower(index, device=compute.device, checkpoint=checkpoint)
        if not tower_files(index.meta):  # written before towers were copied: it carries its tower from now on
            index.meta["tower"] = tower_meta(ckpt)
            logger.info(f"copying the tower into {folder} (the index named it by path only)")
        compute = compute.pinned(index.meta.get("precision"), f"images added to {folder}")
        datasets = data.load()
        images, labels, names, sources = merge_datasets(datasets)
        emb = compute.embed(ckpt.tower, images, log=True)
        entries = [data_entry(ds, compute.precision) for ds in datasets]
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
    IndexFolder(folder).save(index, locked=True)
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
    queries: Selection | str,
    *,
    k: int = 10,
    target_recall: float = 0.95,
    grid: dict | None = None,
    store: bool = True,
    repeats: int = 3,
    compute: Compute | None = None,
    checkpoint=None,
) -> Tuning:
    """Measure recall@k against exact search and queries/s of the index in `folder` for every point of `grid`
    (Faiss search parameters; default retrieval.tune.default_grid) with the images of `queries` (a Selection, or
    a spec of which a seeded subset of 1000 is taken), and store the fastest setting that reaches `target_recall`
    as the index's search parameters (meta "search_params", with the measurements under "tuned")."""
    if not 0 < target_recall <= 1:
        raise UsageError(f"`target_recall` must be in (0, 1], got {target_recall}")
    if k <= 0:
        raise UsageError(f"`k` must be a positive number of neighbours, got {k}")
    iq = load_index_queries(folder, Selection.of(queries, subset=1000), compute=compute, checkpoint=checkpoint)
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
        IndexFolder(folder).update_meta(search_params=chosen.search_params, tuned={
            "search_params": chosen.search_params, "k": k, "recall": round(chosen.recall, 6),
            "target_recall": target_recall, "queries_per_s": round(chosen.queries_per_s, 1),
            "latency_ms": round(chosen.latency_ms, 4), "queries": iq.describe(), "when": now(),
            "grid": [r.to_json() for r in results],
        })
        stored = True
    return Tuning(results, chosen, k, target_recall, iq.describe(), stored)
