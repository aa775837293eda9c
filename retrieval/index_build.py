"""Building an index from dataset specs in bounded memory: in one process, or sharded across the processes of a
torchrun job (torch.distributed, gloo on CPU / NCCL on GPUs), with Faiss's own training, merging and on-disk lists.

Every process of a job runs `build_streaming` with the same arguments (one process is a job of one):

1. plan: the datasets are opened (retrieval.data.stream: labels and where each image lives, no images) and their
   rows, in order, cut into chunks of `chunk_size`; rank r takes a contiguous range of chunks, so the ranks' rows
   in rank order are the rows of a single-process build, and every chunk is the same in both.
2. embed: each rank reads and embeds its chunks one at a time (a folder's pictures are decoded and preprocessed
   on a thread per core, retrieval.data.preprocess.load_image_files; reading is timed apart, "read" in the
   build's seconds). An index without training (Flat, HNSW) is filled as the chunks come; a trained one (IVF, PQ,
   OPQ, ...) spools the embeddings to a temp file and keeps the rows of the seeded training sample (`train_size`
   rows of all, retrieval.faiss_tools.training_sample).
3. train: the sample is gathered on rank 0 in row order; rank 0 trains the empty index once (seeded k-means) and
   sends it to every rank (faiss.serialize_index bytes).
4. fill: each rank adds its spooled embeddings, a chunk at a time, to its copy. IVF lists store each vector's
   position in the final index as its id, so the copies merge without renumbering.
5. merge: rank 0 merges the other ranks' filled copies, in rank order, with Faiss's merge_from (inverted lists,
   flat codes, a refine stage's vectors). For `on_disk`, every rank writes its vectors as blocks of at most
   `block_size` (bounded memory whatever the size of the index) and rank 0 merges the blocks' lists into one
   file with faiss.contrib.ondisk.merge_ondisk. Graph indexes (HNSW) have no merge in Faiss, and a graph depends
   on the order of insertion: the other ranks send rank 0 their embeddings, which it inserts in row order.

The result is the index a single process builds from the same data (the same ids, codes, lists and graph), which
tests/test_index_build.py checks against 2 processes. Peak memory per process: the tower, the index (its share),
one chunk (`chunk_size` images and embeddings), plus 28 bytes per row for ids, labels and sources.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import torch
from tqdm import tqdm

from retrieval.data.preprocess import decode_workers
from retrieval.data.stream import StreamedDataset
from retrieval.embed import embed_images
from retrieval.errors import RetrievalError, UsageError
from retrieval.faiss_tools import (
    HNSW_BATCH, omp_threads, train_index, unwrapped, apply_search_params, check_on_disk, check_training_size,
    default_search_params, default_train_size, faiss_quiet, hnsw_pieces, index_ivf, metric_code, needs_training,
    no_prefetch, training_sample,
)
from retrieval.index import EmbeddingIndex, _as_unit_float32, new_index_meta, normalize_factory, prototypes_from_sums
from retrieval.items import SourceTable
from retrieval.logs import show_progress

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 16_384  # images read and embedded at a time (~17 MB of images and embeddings)
DEFAULT_BLOCK_SIZE = 262_144  # vectors per block of an on-disk build before it goes to a file


# -- the rows to index ----------------------------------------------------------------------------------------------
@dataclass
class BuildPlan:
    """The rows of the datasets, in order, their labels in the union of the classes, and the chunks."""

    datasets: list[StreamedDataset]
    classes: list[str]  # by name, in order of first appearance (as workflows.merge_datasets)
    label_maps: list[np.ndarray]  # per dataset: its class ids -> ids in `classes`
    starts: list[int]  # the first row of each dataset
    chunk_size: int

    @classmethod
    def of(cls, datasets: Sequence[StreamedDataset], chunk_size: int) -> "BuildPlan":
        classes: list[str] = []
        maps, starts, start = [], [], 0
        for ds in datasets:
            present = sorted(set(np.unique(ds.labels).tolist()))
            for i in present:
                if ds.classes[i] not in classes:
                    classes.append(ds.classes[i])
            mapping = np.full(len(ds.classes), -1, np.int64)
            for i in present:
                mapping[i] = classes.index(ds.classes[i])
            maps.append(mapping)
            starts.append(start)
            start += len(ds)
        return cls(list(datasets), classes, maps, starts, chunk_size)

    @property
    def rows(self) -> int:
        return self.starts[-1] + len(self.datasets[-1]) if self.datasets else 0

    def chunk_range(self, rank: int, world: int) -> tuple[int, int]:
        """Rows [start, stop) of rank `rank`: a contiguous range of whole chunks."""
        chunks = -(-self.rows // self.chunk_size)
        first, last = rank * chunks // world, (rank + 1) * chunks // world
        return min(first * self.chunk_size, self.rows), min(last * self.chunk_size, self.rows)

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, np.ndarray]:
        """Images of rows [start, stop) that could be read, and their row numbers."""
        images, rows = [], []
        for ds, first in zip(self.datasets, self.starts):
            lo, hi = max(start, first), min(stop, first + len(ds))
            if lo >= hi:
                continue
            imgs, kept = ds.read(lo - first, hi - first)
            images.append(imgs)
            rows.append(np.arange(lo, hi, dtype=np.int64)[kept])
        return torch.cat(images), np.concatenate(rows)

    @property
    def pictures(self) -> bool:
        """Whether some rows are picture files (folder datasets: decoded and preprocessed when read)."""
        return any(ds.paths is not None for ds in self.datasets)

    def labels(self) -> np.ndarray:
        """The label (in `classes`) of every row."""
        return np.concatenate([m[ds.labels] for ds, m in zip(self.datasets, self.label_maps)])

    def sources(self, kept: np.ndarray) -> SourceTable:
        """The sources of the rows `kept` (ascending)."""
        table = SourceTable()
        for ds, first in zip(self.datasets, self.starts):
            mask = np.zeros(len(ds), bool)
            inside = kept[(kept >= first) & (kept < first + len(ds))] - first
            mask[inside] = True
            table.extend_table(ds.source_table(mask))
        return table

    def close(self) -> None:
        for ds in self.datasets:
            ds.close()


# -- process group: the few messages a sharded build exchanges ------------------------------------------------------
class _Links:
    """Point-to-point messages between the ranks of the job (bytes, int64 and float32 arrays), or nothing to do
    in a single process."""

    def __init__(self, group):
        self.group = group
        self.rank = group.rank if group is not None else 0
        self.world = group.world_size if group is not None else 1

    def send(self, dst: int, payload: bytes | np.ndarray) -> None:
        import torch.distributed as dist

        data = payload.tobytes() if isinstance(payload, np.ndarray) else payload
        dist.send(torch.tensor([len(data)], dtype=torch.int64), dst)
        if data:
            dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst)

    def recv(self, src: int) -> bytes:
        import torch.distributed as dist

        size = torch.zeros(1, dtype=torch.int64)
        dist.recv(size, src)
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
        if len(buf):
            dist.recv(buf, src)
        return buf.numpy().tobytes()

    def all_gather_int(self, value: int) -> list[int]:
        if self.group is None:
            return [int(value)]
        import torch.distributed as dist

        parts = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(parts, torch.tensor([int(value)], dtype=torch.int64))
        return [int(p.item()) for p in parts]


def _array(data: bytes, dtype, width: int | None = None) -> np.ndarray:
    x = np.frombuffer(data, dtype=dtype).copy()
    return x.reshape(-1, width) if width else x


# -- filling an index at given positions ----------------------------------------------------------------------------
def _add_at(index: faiss.Index, x: np.ndarray, positions: np.ndarray) -> None:
    """Add vectors to an (unwrapped) index so that each one is at `positions` in the final index: IVF lists store
    the positions as ids, flat codes and graphs append (their position is their order)."""
    ix = faiss.downcast_index(index)
    if isinstance(ix, faiss.IndexPreTransform):
        xt = x
        for i in range(ix.chain.size()):
            xt = ix.chain.at(i).apply(xt)
        _add_at(ix.index, xt, positions)
        ix.ntotal += len(x)
    elif isinstance(ix, faiss.IndexRefine):
        _add_at(ix.base_index, x, positions)
        ix.refine_index.add(x)
        ix.ntotal += len(x)
    elif isinstance(ix, faiss.IndexIVF):
        ix.add_with_ids(x, positions)
    elif isinstance(ix, faiss.IndexHNSW):
        with omp_threads(1):  # one thread, pieces cut as index.add_with_ids cuts them: the same graph
            for a, b in hnsw_pieces(int(ix.ntotal), len(x)):
                ix.add(x[a:b])
    else:
        ix.add(x)


def _merge_into(dst: faiss.Index, src: faiss.Index) -> None:
    """Append the vectors of `src` (a filled copy of the same trained index) to `dst` with Faiss's merge_from."""
    d, s = faiss.downcast_index(dst), faiss.downcast_index(src)
    if isinstance(d, faiss.IndexPreTransform):
        _merge_into(d.index, s.index)
        d.ntotal += s.ntotal
    elif isinstance(d, faiss.IndexRefine):
        _merge_into(d.base_index, s.base_index)
        d.refine_index.merge_from(s.refine_index, 0)
        d.ntotal += s.ntotal
    else:
        d.merge_from(s, 0)  # IVF: the lists keep their ids (positions); flat codes: appended


def _set_total(index: faiss.Index, n: int) -> None:
    """Set ntotal on the wrappers above the IVF level (after merge_ondisk, which sets the IVF's)."""
    ix = faiss.downcast_index(index)
    while isinstance(ix, (faiss.IndexPreTransform, faiss.IndexRefine)):
        ix.ntotal = n
        ix = faiss.downcast_index(ix.base_index if isinstance(ix, faiss.IndexRefine) else ix.index)
    ix.ntotal = n


def mergeable(index: faiss.Index) -> bool:
    """Whether filled copies of the index merge with Faiss's merge_from (IVF lists, flat codes)."""
    return isinstance(unwrapped(index)[-1], (faiss.IndexIVF, faiss.IndexFlatCodes))


class _Spool:
    """Embeddings written to a temp file as they come and read back a chunk at a time (bounded memory)."""

    def __init__(self, folder: Path, name: str, d: int):
        self.path = folder / name
        self.d = d
        self.n = 0
        self._out = open(self.path, "wb")

    def write(self, x: np.ndarray) -> None:
        self._out.write(np.ascontiguousarray(x, np.float32).tobytes())
        self.n += len(x)

    def chunks(self, size: int):
        self._out.close()
        with open(self.path, "rb") as f:
            for start in range(0, self.n, size):
                count = min(size, self.n - start)
                yield start, np.fromfile(f, dtype=np.float32, count=count * self.d).reshape(count, self.d)

    def close(self) -> None:
        self._out.close()
        self.path.unlink(missing_ok=True)


class _Copy:
    """This rank's copy of the (trained) empty index, filled at positions: one copy in memory, or for an on-disk
    build blocks of at most `block_size` vectors, each written to a file when full."""

    def __init__(self, empty: bytes, spool: Path, block_size: int | None, rank: int):
        self.empty, self.spool, self.block_size, self.rank = empty, spool, block_size, rank
        self.index = faiss.deserialize_index(np.frombuffer(empty, np.uint8))
        self.blocks: list[Path] = []
        # a graph takes its vectors in pieces ending at multiples of HNSW_BATCH (hnsw_pieces): hold the rest
        self.graph = isinstance(unwrapped(self.index)[-1], faiss.IndexHNSW)
        self.held: list[np.ndarray] = []

    def add(self, x: np.ndarray, positions: np.ndarray) -> None:
        if self.graph:
            x = np.concatenate([*self.held, x]) if self.held else x
            now = len(x) - (int(self.index.ntotal) + len(x)) % HNSW_BATCH
            if now > 0:
                _add_at(self.index, x[:now], positions[:now])
            self.held = [x[now:]] if now < len(x) else []
            return
        start = 0
        while start < len(x):
            room = len(x) - start if self.block_size is None else self.block_size - int(self.index.ntotal)
            take = min(room, len(x) - start)
            _add_at(self.index, x[start:start + take], positions[start:start + take])
            start += take
            if self.block_size is not None and self.index.ntotal >= self.block_size:
                self._flush()

    def _flush(self) -> None:
        if self.block_size is None or self.index.ntotal == 0:
            return
        path = self.spool / f"block-{self.rank}-{len(self.blocks):05d}.faiss"
        faiss.write_index(self.index, str(path))
        self.blocks.append(path)
        self.index = faiss.deserialize_index(np.frombuffer(self.empty, np.uint8))

    def finish(self) -> None:
        if self.held:
            _add_at(self.index, self.held[0], np.zeros(0, np.int64))
            self.held = []
        self._flush()


# -- the build ------------------------------------------------------------------------------------------------------
@dataclass
class BuildResult:
    index: EmbeddingIndex | None  # None on ranks other than 0
    seconds: dict = field(default_factory=dict)  # read, embed, train, fill, merge
    rows_embedded: int = 0  # by this rank


def build_streaming(
    plan: BuildPlan,
    tower,
    *,
    factory: str = "Flat",
    metric: str = "ip",
    seed: int = 0,
    train_size: int | None = None,
    search_params: str | None = None,
    on_disk: bool = False,
    prototypes: bool = False,
    batch_size: int = 256,
    device="cpu",
    precision: str | None = "auto",
    block_size: int | None = None,
    group=None,
    out: Path | None = None,
    meta: dict | None = None,
) -> BuildResult:
    """Embed the plan's rows with `tower` (in `precision`: auto, fp32 or bf16) and build the index (see the module
    docstring), in bounded memory.

    `group`: the retrieval.distributed.ProcessGroup of a torchrun job (None: one process). `out`: the index
    folder, where rank 0 writes an on-disk index's lists file (lists-<token>.ivfdata, under a temp name until
    complete; the caller's save_index then names it). `meta`: extra metadata (tower, data, preprocessing, ...).
    Returns the index on rank 0 (unsaved), None elsewhere."""
    factory = normalize_factory(factory)
    code = metric_code(metric)
    links = _Links(group)
    rank, world = links.rank, links.world
    d = int(tower.embedding_size)
    try:
        sub = faiss.index_factory(d, factory, code)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        msg = msg.split(": ", 1)[-1] if "index_factory" in msg else msg
        raise UsageError(f"`factory` {factory!r}: Faiss cannot build it ({msg})") from None
    if on_disk:
        check_on_disk(sub, factory)
        if out is None and rank == 0:
            raise ValueError("an on-disk build needs the index folder `out`")
    if prototypes and on_disk:
        raise UsageError("`prototypes` stores one vector per class in memory; `on_disk` does not apply")
    rows = plan.rows
    if rows == 0:
        raise RetrievalError("no images to index")
    training = needs_training(sub) and not prototypes
    size = None
    if training:
        size = default_train_size(sub) if train_size is None else int(train_size)
        sample = training_sample(rows, size, seed)
        check_training_size(sub, factory, len(sample), available=rows, warn=rank == 0)  # fail before embedding
    else:
        sample = np.zeros(0, np.int64)
    merge = mergeable(sub)
    direct = not training and not prototypes and (merge or rank == 0)  # fill while embedding
    block_size = (block_size or DEFAULT_BLOCK_SIZE) if on_disk else None

    seconds: dict[str, float] = {}
    spool_dir = Path(tempfile.mkdtemp(prefix=f"retrieval-build-{rank}-"))
    spool = None
    try:
        empty = faiss.serialize_index(sub).tobytes()
        copy = _Copy(empty, spool_dir, block_size, rank) if direct else None
        if not direct and not prototypes:
            spool = _Spool(spool_dir, "embeddings.f32", d)
        sums = np.zeros((len(plan.classes), d), np.float64) if prototypes else None
        counts = np.zeros(len(plan.classes), np.int64) if prototypes else None
        labels_all = plan.labels() if prototypes else None
        start, stop = plan.chunk_range(rank, world)

        # 2. embed
        t0 = time.perf_counter()
        reading = 0.0  # of which reading the images (decoding and preprocessing a folder's pictures)
        kept_parts, sample_x = [], []
        position = 0  # this rank's vectors so far (direct fill: positions are only known locally, see below)
        bar = tqdm(total=stop - start, desc="embedding", unit="img", leave=False,
                   disable=not (rank == 0 and show_progress(True)))
        try:
            for first in range(start, stop, plan.chunk_size):
                t_read = time.perf_counter()
                images, kept = plan.read(first, min(first + plan.chunk_size, stop))
                reading += time.perf_counter() - t_read
                x = _as_unit_float32(embed_images(tower, images, batch_size=batch_size, device=device,
                                                  precision=precision))
                del images
                kept_parts.append(kept)
                if prototypes:
                    lab = labels_all[kept]
                    np.add.at(sums, lab, x)
                    counts += np.bincount(lab, minlength=len(plan.classes))
                elif direct:
                    copy.add(x, np.arange(position, position + len(x), dtype=np.int64))
                else:
                    spool.write(x)
                if training:
                    hit = np.isin(kept, sample)
                    if hit.any():
                        sample_x.append(x[hit])
                position += len(x)
                bar.update(min(first + plan.chunk_size, stop) - first)
        finally:
            bar.close()
        kept = np.concatenate(kept_parts) if kept_parts else np.zeros(0, np.int64)
        seconds["read"] = reading
        seconds["embed"] = time.perf_counter() - t0 - reading
        if rank == 0 and plan.pictures:
            where = f" (this process's {stop - start:,} rows)" if world > 1 else ""
            logger.info(f"decoded and preprocessed {stop - start:,} pictures in {reading:.1f}s "
                        f"({(stop - start) / max(reading, 1e-9):,.0f} images/s, {decode_workers()} threads){where}")
        counts_by_rank = links.all_gather_int(len(kept))
        total = sum(counts_by_rank)
        if total == 0:
            raise RetrievalError("none of the images could be read: nothing to index")
        offset = sum(counts_by_rank[:rank])

        if prototypes:
            return _prototypes(links, plan, sums, counts, kept, d, factory, metric, seed, search_params, meta,
                               seconds)

        # 3. train
        t0 = time.perf_counter()
        if training:
            empty = _train_once(links, sub, factory, sample_x, d, seed, rows, len(sample))
        seconds["train"] = time.perf_counter() - t0

        # 4. fill
        t0 = time.perf_counter()
        if not direct and (merge or rank == 0):
            copy = _Copy(empty, spool_dir, block_size, rank)
            for first, x in spool.chunks(plan.chunk_size):
                copy.add(x, np.arange(offset + first, offset + first + len(x), dtype=np.int64))
        if copy is not None and merge:
            copy.finish()  # (a graph takes the others' vectors first, in _gather)
        seconds["fill"] = time.perf_counter() - t0

        # 5. merge (rank 0) / hand over (the others)
        t0 = time.perf_counter()
        if rank != 0:
            _hand_over(links, merge, copy, spool, kept, plan.chunk_size)
            seconds["merge"] = time.perf_counter() - t0
            return BuildResult(None, seconds, len(kept))
        with _all_cores(links):
            final, kept_all = _gather(links, merge, copy, kept, empty, plan.chunk_size, on_disk, spool_dir, out,
                                      total)
        seconds["merge"] = time.perf_counter() - t0
    finally:
        if spool is not None:
            spool.close()
        shutil.rmtree(spool_dir, ignore_errors=True)

    top = _wrap(final.index, kept_all)
    if search_params is None:
        search_params = default_search_params(top)
    apply_search_params(top, search_params)
    labels = plan.labels()[kept_all]
    full_meta = new_index_meta(factory, metric, d, total, rows, plan.classes, search_params, seed,
                               None if size is None else min(size, rows), **(meta or {}))
    if on_disk:
        full_meta["on_disk"] = True
    index = EmbeddingIndex(top, full_meta, kept_all, labels, plan.sources(kept_all))
    if on_disk:
        index.lists_file = final.lists_file
    return BuildResult(index, seconds, len(kept))


@contextlib.contextmanager
def _all_cores(links: _Links):
    """Faiss on every core of this machine while rank 0 works alone (training, merging): torchrun gives each process
    one thread, and the other processes are waiting meanwhile. A no-op in a single process (its own settings)."""
    if links.world == 1:
        yield
        return
    from retrieval.embed import available_cores

    with omp_threads(available_cores()):
        yield


def _train_once(links: _Links, sub, factory: str, sample_x: list, d: int, seed: int, rows: int,
                planned: int) -> bytes:
    """Rank 0 trains `sub` on the sample (gathered from every rank in row order); every rank gets it trained."""
    x_here = np.concatenate(sample_x) if sample_x else np.zeros((0, d), np.float32)
    group = links.group
    if links.rank != 0:
        links.send(0, x_here)
        group.wait_release("to train the index")
        return group.broadcast_bytes(None)
    parts_x = [x_here]  # rank order is row order
    for src in range(1, links.world):
        parts_x.append(_array(links.recv(src), np.float32, d))
    x = np.concatenate(parts_x) if len(parts_x) > 1 else x_here
    try:
        if len(x) != planned:  # unreadable images left the sample short (checked already when complete)
            check_training_size(sub, factory, len(x), available=rows)
        t0 = time.perf_counter()
        with _all_cores(links):
            train_index(sub, factory, x, seed, checked=True)
        logger.info(f"trained {factory} on {len(x):,} vectors in {time.perf_counter() - t0:.1f}s")
        trained = faiss.serialize_index(sub).tobytes()
    except BaseException as e:
        if group is not None:
            group.fail(e)
        raise
    if group is not None:
        group.release(None)
        group.broadcast_bytes(trained)
    return trained


def _hand_over(links: _Links, merge: bool, copy: _Copy | None, spool: _Spool | None, kept: np.ndarray,
               chunk_size: int) -> None:
    """A rank other than 0 sends rank 0 what it made: its kept rows, then its filled copy (or its blocks), or
    for an index that does not merge, its embeddings a chunk at a time."""
    links.send(0, kept)
    if merge:
        parts = [p.read_bytes() for p in copy.blocks] if copy.block_size is not None else \
            [faiss.serialize_index(copy.index).tobytes()]
        links.send(0, np.array([len(parts)], np.int64))
        for part in parts:
            links.send(0, part)
        return
    n_chunks = -(-spool.n // chunk_size) if spool is not None else 0
    links.send(0, np.array([n_chunks], np.int64))
    if spool is not None:
        for _, x in spool.chunks(chunk_size):
            links.send(0, x)


@dataclass
class _Final:
    index: faiss.Index  # the unwrapped index, filled
    lists_file: Path | None = None


def _gather(links: _Links, merge: bool, copy: _Copy, kept: np.ndarray, empty: bytes, chunk_size: int,
            on_disk: bool, spool_dir: Path, out: Path | None, total: int) -> tuple[_Final, np.ndarray]:
    """Rank 0: the others' parts (received in rank order, spooled to files first so that no sender waits for a
    long merge), merged after its own."""
    kept_parts = [kept]
    received: list[tuple[str, list[Path]]] = []
    for src in range(1, links.world):
        kept_parts.append(_array(links.recv(src), np.int64))
        n = int(_array(links.recv(src), np.int64)[0])
        paths = []
        for j in range(n):
            path = spool_dir / f"from-{src}-{j:05d}.bin"
            path.write_bytes(links.recv(src))
            paths.append(path)
        received.append((str(src), paths))
    kept_all = np.concatenate(kept_parts)
    if merge and on_disk:
        blocks = copy.blocks + [p for _, paths in received for p in paths]
        return _merge_on_disk(empty, blocks, out, total), kept_all
    if merge:
        final = copy.index
        for _, paths in received:
            for path in paths:
                _merge_into(final, faiss.deserialize_index(np.fromfile(path, np.uint8)))
                path.unlink()
        return _Final(final), kept_all
    # a graph: rank 0's own vectors are in; insert the others' in row order
    for _, paths in received:
        for path in paths:
            x = np.fromfile(path, np.float32).reshape(-1, copy.index.d)
            copy.add(x, np.zeros(len(x), np.int64))  # (a graph's positions are its order)
            path.unlink()
    copy.finish()
    return _Final(copy.index), kept_all


def _merge_on_disk(empty: bytes, blocks: list[Path], out: Path, total: int) -> _Final:
    """One on-disk lists file in `out` from the blocks' inverted lists (faiss.contrib.ondisk.merge_ondisk), and
    the rest of the index (a refine stage's vectors) merged from the blocks in order."""
    from faiss.contrib.ondisk import merge_ondisk

    from retrieval.fsutil import atomic_path

    final = faiss.deserialize_index(np.frombuffer(empty, np.uint8))
    ivf = index_ivf(final)
    token = uuid.uuid4().hex[:16]
    path = Path(out) / f"lists-{token}.ivfdata"
    with atomic_path(path) as tmp:
        with faiss_quiet(), _quiet_faiss_logger():
            merge_ondisk(ivf, [str(p) for p in blocks], str(tmp))
    faiss.downcast_InvertedLists(ivf.invlists).filename = str(path)  # as the .faiss file records it
    no_prefetch(final)
    if any(isinstance(part, faiss.IndexRefine) for part in unwrapped(final)):
        refine = next(faiss.downcast_index(p) for p in unwrapped(final) if isinstance(p, faiss.IndexRefine))
        for block in blocks:
            part = faiss.read_index(str(block))
            block_refine = next(faiss.downcast_index(p) for p in unwrapped(part) if isinstance(p, faiss.IndexRefine))
            refine.refine_index.merge_from(block_refine.refine_index, 0)
    _set_total(final, total)
    return _Final(final, path)


@contextlib.contextmanager
def _quiet_faiss_logger():
    """merge_ondisk logs every file it reads at INFO on faiss.contrib.ondisk's logger."""
    log = logging.getLogger("faiss.contrib.ondisk")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _wrap(inner: faiss.Index, ids: np.ndarray) -> faiss.IndexIDMap2:
    """The IndexIDMap2 over the filled index, mapping its positions to `ids` (as add_with_ids would have)."""
    n = int(inner.ntotal)
    inner.ntotal = 0  # IndexIDMap2 wraps only an empty index; its vectors are in, the ids are set below
    top = faiss.IndexIDMap2(inner)
    inner.ntotal = n
    top.ntotal = n
    faiss.copy_array_to_vector(np.ascontiguousarray(ids, np.int64), top.id_map)
    top.construct_rev_map()
    return top


def _prototypes(links: _Links, plan: BuildPlan, sums, counts, kept, d, factory, metric, seed, search_params, meta,
                seconds) -> BuildResult:
    """One vector per class from the per-class sums of every rank (summed on rank 0)."""
    if links.rank != 0:
        links.send(0, sums)
        links.send(0, counts)
        return BuildResult(None, seconds, len(kept))
    for src in range(1, links.world):
        sums += _array(links.recv(src), np.float64, d)
        counts += _array(links.recv(src), np.int64)
    from retrieval.index import build_index

    vectors, labels, sources = prototypes_from_sums(sums, counts, plan.classes)
    logger.info(f"{len(vectors)} class prototypes (mean embedding per class) from {int(counts.sum()):,} images")
    index = build_index(vectors, labels, plan.classes, sources, factory=factory, metric=metric, seed=seed,
                        search_params=search_params, **{**(meta or {}), "prototypes": True})
    return BuildResult(index, seconds, len(kept))
