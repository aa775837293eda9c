"""Building an index in bounded memory: in one process, or sharded across the processes of a torchrun job
(torch.distributed, gloo on CPU / NCCL on GPUs), with Faiss's own training, merging and on-disk lists.

Every process of a job runs `build_streaming` with the same arguments (one process is a job of one). It hands
the work to a BuildState (what this process knows and holds) and the rows (retrieval.index_build_rows: images of
dataset specs and the tower that embeds them, or vectors already embedded), in named steps:

1. plan (BuildState): the rows, in order, cut into chunks of `chunk_size`; rank r takes a contiguous range of
   chunks, so the ranks' rows in rank order are the rows of a single-process build, and every chunk is the same
   in both. The index's training sample (`train_size` rows of all, retrieval.faiss_tools.training_sample) is
   chosen and checked before anything is embedded.
2. embed: each rank reads and embeds its chunks one at a time (a folder's pictures are decoded and preprocessed
   by a process or thread per core, retrieval.data.preprocess.load_image_files; reading is timed apart, "read" in the
   build's seconds). An index without training (Flat, HNSW) is filled as the chunks come; a trained one (IVF, PQ,
   OPQ, ...) spools the embeddings to a temp file and keeps the rows of the training sample.
3. train: the sample is gathered on rank 0 in row order; rank 0 trains the empty index once (seeded k-means) and
   sends it to every rank (faiss.serialize_index bytes).
4. fill: each rank adds its spooled embeddings, a chunk at a time, to its copy. IVF lists store each vector's
   position in the final index as its id, so the copies merge without renumbering (retrieval.index_build_fill).
5. merge: rank 0 merges the other ranks' filled copies, in rank order, with Faiss's merge_from (inverted lists,
   flat codes, a refine stage's vectors). For `on_disk`, every rank writes its vectors as blocks of at most
   `block_size` (bounded memory whatever the size of the index) and rank 0 merges the blocks' lists into one
   file with faiss.contrib.ondisk.merge_ondisk. Graph indexes (HNSW) have no merge in Faiss, and a graph depends
   on the order of insertion: the other ranks send rank 0 their embeddings, which it inserts in row order
   (retrieval.index_build_merge).
6. finish: rank 0 wraps the filled index in an IndexIDMap2 with the rows' ids, labels, sources and metadata.

The result is the index a single process builds from the same data (the same ids, codes, lists and graph), which
tests/test_index_build.py checks against 2 processes; retrieval.index.build_index (vectors in memory) is the same
pipeline over one chunk. Peak memory per process: the tower, the index (its share), one chunk (`chunk_size` images
and embeddings), plus 28 bytes per row for ids, labels and sources.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from retrieval.data.preprocess import decode_workers, decoding_pool
from retrieval.embedding_index import EmbeddingIndex, new_index_meta, normalize_factory, prototypes_from_sums
from retrieval.errors import RetrievalError, UsageError
from retrieval.faiss_tools import (
    apply_search_params, check_on_disk, check_training_size, default_search_params, default_train_size, metric_code,
    needs_training, training_sample,
)
from retrieval.index_build_fill import IndexCopy, mergeable, wrap_with_ids
from retrieval.index_build_merge import FilledIndex, Links, all_cores, gather, hand_over, received_array, train_once
from retrieval.index_build_rows import ArrayRows, BuildPlan, TowerRows
from retrieval.logs import show_progress

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_BLOCK_SIZE", "IndexSpec", "BuildResult", "BuildState", "BuildPlan",
           "TowerRows", "ArrayRows", "build_streaming", "build_from_arrays", "make_faiss_index"]

DEFAULT_CHUNK_SIZE = 16_384  # images read and embedded at a time (~17 MB of images and embeddings)
DEFAULT_BLOCK_SIZE = 262_144  # vectors per block of an on-disk build before it goes to a file


@dataclass(frozen=True)
class IndexSpec:
    """The index to make of the rows: the Faiss factory and metric, its training (seeded sample of `train_size`;
    None: the factory's default), search parameters (None: the factory's default), one vector per class
    (`prototypes`), inverted lists on disk (`on_disk`, written in blocks of `block_size` vectors)."""

    factory: str = "Flat"
    metric: str = "ip"
    seed: int = 0
    train_size: int | None = None
    search_params: str | None = None
    on_disk: bool = False
    prototypes: bool = False
    block_size: int | None = None


@dataclass
class BuildResult:
    index: EmbeddingIndex | None  # None on ranks other than 0
    seconds: dict = field(default_factory=dict)  # read, embed, train, fill, merge
    rows_embedded: int = 0  # by this rank


def make_faiss_index(d: int, factory: str, code: int) -> faiss.Index:
    """faiss.index_factory, its error said in the factory string's terms."""
    try:
        return faiss.index_factory(d, factory, code)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        msg = msg.split(": ", 1)[-1] if "index_factory" in msg else msg
        raise UsageError(f"`factory` {factory!r}: Faiss cannot build it ({msg})") from None


class BuildState:
    """What one process of a build knows and holds, from the plan (checked here, before anything is embedded) to
    the merge: the empty index, the training sample, this rank's copy or spool, the rows it kept, the timings."""

    def __init__(self, rows, spec: IndexSpec, links: Links, out: Path | None):
        self.rows, self.links, self.out = rows, links, out
        self.spec = spec
        self.factory = normalize_factory(spec.factory)
        code = metric_code(spec.metric)
        self.rank, self.world = links.rank, links.world
        self.d = int(rows.dimension)
        self.sub = make_faiss_index(self.d, self.factory, code)
        self._check_storage()
        if rows.rows == 0:
            raise RetrievalError("no images to index")
        self.training = needs_training(self.sub) and not spec.prototypes
        self.train_size, self.sample = self._training_sample()
        self.merge = mergeable(self.sub)
        self.direct = not self.training and not spec.prototypes and (self.merge or self.rank == 0)  # fill as embedded
        self.block_size = (spec.block_size or DEFAULT_BLOCK_SIZE) if spec.on_disk else None
        self.seconds: dict[str, float] = {}
        self.empty: bytes = b""  # the (trained) empty index, serialized
        self.copy: IndexCopy | None = None
        self.spool = None  # this rank's embeddings waiting for the training (index_build_fill.Spool, HeldVectors)
        self.sample_x: list[np.ndarray] = []
        self.sums = self.counts = None  # per-class sums and counts of a prototypes build
        self.kept = np.zeros(0, np.int64)  # the rows this rank embedded (those that could be read)
        self.total = self.offset = 0  # rows kept by every rank; by the ranks before this one
        self.spool_dir = Path(tempfile.mkdtemp(prefix=f"retrieval-build-{self.rank}-"))

    def _check_storage(self) -> None:
        if self.spec.on_disk:
            check_on_disk(self.sub, self.factory)
            if self.out is None and self.rank == 0:
                raise ValueError("an on-disk build needs the index folder `out`")
        if self.spec.prototypes and self.spec.on_disk:
            raise UsageError("`prototypes` stores one vector per class in memory; `on_disk` does not apply")

    def _training_sample(self) -> tuple[int | None, np.ndarray]:
        if not self.training:
            return None, np.zeros(0, np.int64)
        rows = self.rows.rows
        size = default_train_size(self.sub) if self.spec.train_size is None else int(self.spec.train_size)
        sample = training_sample(rows, size, self.spec.seed)
        check_training_size(self.sub, self.factory, len(sample), available=rows, warn=self.rank == 0)
        return size, sample

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
        shutil.rmtree(self.spool_dir, ignore_errors=True)


def build_streaming(rows, spec: IndexSpec = IndexSpec(), *, group=None, out: Path | None = None,
                    meta: dict | None = None) -> BuildResult:
    """Build the index `spec` describes of `rows` (index_build_rows.TowerRows: a plan's images and the tower that
    embeds them; ArrayRows: vectors already embedded), in bounded memory (see the module docstring).

    `group`: the retrieval.distributed.ProcessGroup of a torchrun job (None: one process). `out`: the index
    folder, where rank 0 writes an on-disk index's lists file (lists-<token>.ivfdata, under a temp name until
    complete; the caller's save then names it). `meta`: extra metadata (tower, data, preprocessing, ...).
    Returns the index on rank 0 (unsaved), None elsewhere."""
    state = BuildState(rows, spec, Links(group), out)
    try:
        embed_shares(state)
        count_rows(state)
        if spec.prototypes:
            return build_prototypes(state, meta)
        train(state)
        fill(state)
        final, kept_all = merge(state)
    finally:
        state.close()
    index = finish(state, final, kept_all, meta) if final is not None else None
    return BuildResult(index, state.seconds, len(state.kept))


def embed_shares(state: BuildState) -> None:
    """Step 2: embed this rank's chunks, each one filling the copy, spooled, or summed per class (prototypes);
    the training sample's vectors kept."""
    rows, spec = state.rows, state.spec
    state.empty = faiss.serialize_index(state.sub).tobytes()
    if state.direct:
        state.copy = IndexCopy(state.empty, state.spool_dir, state.block_size, state.rank)
    elif not spec.prototypes:
        state.spool = rows.spool(state.spool_dir)
    labels_all = rows.labels() if spec.prototypes else None
    if spec.prototypes:
        state.sums = np.zeros((len(rows.classes), state.d), np.float64)
        state.counts = np.zeros(len(rows.classes), np.int64)
    start, stop = rows.chunk_range(state.rank, state.world)
    t0, read_before = time.perf_counter(), rows.reading
    kept_parts = []
    position = 0  # this rank's vectors so far (direct fill: positions are only known locally, see fill)
    bar = tqdm(total=stop - start, desc="embedding", unit="img", leave=False,
               disable=not (state.rank == 0 and rows.announces and show_progress(True)))
    try:
        for first in range(start, stop, rows.chunk_size):
            x, kept = rows.embed(first, min(first + rows.chunk_size, stop))
            kept_parts.append(kept)
            if spec.prototypes:
                lab = labels_all[kept]
                np.add.at(state.sums, lab, x)
                state.counts += np.bincount(lab, minlength=len(rows.classes))
            elif state.direct:
                state.copy.add(x, np.arange(position, position + len(x), dtype=np.int64))
            else:
                state.spool.write(x)
            if state.training:
                hit = np.isin(kept, state.sample)
                if hit.any():
                    state.sample_x.append(x[hit])
            position += len(x)
            bar.update(min(first + rows.chunk_size, stop) - first)
    finally:
        bar.close()
    state.kept = np.concatenate(kept_parts) if kept_parts else np.zeros(0, np.int64)
    reading = rows.reading - read_before
    state.seconds["read"] = reading
    state.seconds["embed"] = time.perf_counter() - t0 - reading
    if state.rank == 0 and rows.pictures:
        where = f" (this process's {stop - start:,} rows)" if state.world > 1 else ""
        workers = decode_workers()
        pool = decoding_pool(min(rows.chunk_size, stop - start), workers)
        decoders = f"{workers} {pool}" if pool else "1 thread"
        logger.info(f"decoded and preprocessed {stop - start:,} pictures in {reading:.1f}s "
                    f"({(stop - start) / max(reading, 1e-9):,.0f} images/s, {decoders}){where}")


def count_rows(state: BuildState) -> None:
    """How many rows every rank kept: the total, and where this rank's start in the final index."""
    counts_by_rank = state.links.all_gather_int(len(state.kept))
    state.total = sum(counts_by_rank)
    if state.total == 0:
        raise RetrievalError("none of the images could be read: nothing to index")
    state.offset = sum(counts_by_rank[:state.rank])


def train(state: BuildState) -> None:
    """Step 3: rank 0 trains the empty index on the sample gathered from every rank; every rank gets it."""
    t0 = time.perf_counter()
    if state.training:
        state.empty = train_once(state.links, state.sub, state.factory, state.sample_x, state.d, state.spec.seed,
                                 state.rows.rows, len(state.sample), announce=state.rows.announces)
    state.seconds["train"] = time.perf_counter() - t0


def fill(state: BuildState) -> None:
    """Step 4: add the spooled embeddings to this rank's copy of the trained index, at their final positions."""
    t0 = time.perf_counter()
    if not state.direct and (state.merge or state.rank == 0):
        state.copy = IndexCopy(state.empty, state.spool_dir, state.block_size, state.rank)
        for first, x in state.spool.chunks(state.rows.chunk_size):
            start = state.offset + first
            state.copy.add(x, np.arange(start, start + len(x), dtype=np.int64))
    if state.copy is not None and state.merge:
        state.copy.finish()  # (a graph takes the others' vectors first, in gather)
    state.seconds["fill"] = time.perf_counter() - t0


def merge(state: BuildState) -> tuple[FilledIndex | None, np.ndarray | None]:
    """Step 5: the other ranks hand rank 0 their parts; rank 0 merges them after its own. Returns the filled
    index and the rows it holds, in order, on rank 0; (None, None) elsewhere."""
    t0 = time.perf_counter()
    if state.rank != 0:
        hand_over(state.links, state.merge, state.copy, state.spool, state.kept, state.rows.chunk_size)
        state.seconds["merge"] = time.perf_counter() - t0
        return None, None
    with all_cores(state.links):
        final, kept_all = gather(state.links, state.merge, state.copy, state.kept, state.empty, state.rows.chunk_size,
                                 state.spec.on_disk, state.spool_dir, state.out, state.total)
    state.seconds["merge"] = time.perf_counter() - t0
    return final, kept_all


def finish(state: BuildState, final: FilledIndex, kept_all: np.ndarray, meta: dict | None) -> EmbeddingIndex:
    """Step 6: the EmbeddingIndex over the filled index, with the kept rows' ids, labels, sources and metadata."""
    spec, rows = state.spec, state.rows
    top = wrap_with_ids(final.index, kept_all)
    search_params = default_search_params(top) if spec.search_params is None else spec.search_params
    apply_search_params(top, search_params)
    trained_on = None if state.train_size is None else min(state.train_size, rows.rows)
    full_meta = new_index_meta(state.factory, spec.metric, state.d, state.total, rows.rows, rows.classes,
                               search_params, spec.seed, trained_on, **(meta or {}))
    if spec.on_disk:
        full_meta["on_disk"] = True
    index = EmbeddingIndex(top, full_meta, kept_all, rows.labels()[kept_all], rows.sources(kept_all))
    if spec.on_disk:
        index.lists_file = final.lists_file
    return index


def build_prototypes(state: BuildState, meta: dict | None) -> BuildResult:
    """One vector per class from the per-class sums of every rank (summed on rank 0), indexed as `spec` says."""
    links, rows = state.links, state.rows
    if links.rank != 0:
        links.send(0, state.sums)
        links.send(0, state.counts)
        return BuildResult(None, state.seconds, len(state.kept))
    for src in range(1, links.world):
        state.sums += received_array(links.recv(src), np.float64, state.d)
        state.counts += received_array(links.recv(src), np.int64)
    vectors, labels, sources = prototypes_from_sums(state.sums, state.counts, rows.classes)
    logger.info(f"{len(vectors)} class prototypes (mean embedding per class) from {int(state.counts.sum()):,} images")
    spec = IndexSpec(state.factory, state.spec.metric, state.spec.seed, search_params=state.spec.search_params)
    index = build_from_arrays(vectors, labels, rows.classes, sources, spec, {**(meta or {}), "prototypes": True})
    return BuildResult(index, state.seconds, len(state.kept))


def build_from_arrays(embeddings, labels, classes, sources, spec: IndexSpec = IndexSpec(),
                      meta: dict | None = None) -> EmbeddingIndex:
    """The index `spec` describes of vectors already embedded (labels index `classes`), with ids 0..n-1: the
    streaming build over one chunk in this process."""
    return build_streaming(ArrayRows(embeddings, labels, classes, sources), spec, meta=meta).index
