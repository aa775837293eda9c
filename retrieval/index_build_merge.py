"""The few messages a sharded build exchanges (torch.distributed point to point, or nothing in one process): the
training sample gathered on rank 0 and the trained index sent back, the other ranks' filled copies (or blocks, or
for a graph their embeddings) handed to rank 0, and rank 0's merge of them (on-disk lists with
faiss.contrib.ondisk.merge_ondisk)."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from retrieval.faiss_tools import (
    check_training_size, faiss_quiet, index_ivf, no_prefetch, omp_threads, train_index, unwrapped,
)
from retrieval.fsutil import atomic_path
from retrieval.index_build_fill import IndexCopy, Spool, merge_into, set_total

logger = logging.getLogger(__name__)


class Links:
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


def received_array(data: bytes, dtype, width: int | None = None) -> np.ndarray:
    x = np.frombuffer(data, dtype=dtype).copy()
    return x.reshape(-1, width) if width else x


@contextlib.contextmanager
def all_cores(links: Links):
    """Faiss on every core of this machine while rank 0 works alone (training, merging): torchrun gives each process
    one thread, and the other processes are waiting meanwhile. A no-op in a single process (its own settings)."""
    if links.world == 1:
        yield
        return
    from retrieval.embed import available_cores

    with omp_threads(available_cores()):
        yield


def train_once(links: Links, sub, factory: str, sample_x: list, d: int, seed: int, rows: int, planned: int,
               announce: bool = True) -> bytes:
    """Rank 0 trains `sub` on the sample (gathered from every rank in row order); every rank gets it trained.
    `announce`: log how long the training took."""
    x_here = np.concatenate(sample_x) if sample_x else np.zeros((0, d), np.float32)
    group = links.group
    if links.rank != 0:
        links.send(0, x_here)
        group.wait_release("to train the index")
        return group.broadcast_bytes(None)
    parts_x = [x_here]  # rank order is row order
    for src in range(1, links.world):
        parts_x.append(received_array(links.recv(src), np.float32, d))
    x = np.concatenate(parts_x) if len(parts_x) > 1 else x_here
    try:
        if len(x) != planned:  # unreadable images left the sample short (checked already when complete)
            check_training_size(sub, factory, len(x), available=rows)
        t0 = time.perf_counter()
        with all_cores(links):
            train_index(sub, factory, x, seed, checked=True)
        if announce:
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


def hand_over(links: Links, merge: bool, copy: IndexCopy | None, spool: Spool | None, kept: np.ndarray,
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
class FilledIndex:
    index: faiss.Index  # the unwrapped index, filled
    lists_file: Path | None = None


def gather(links: Links, merge: bool, copy: IndexCopy, kept: np.ndarray, empty: bytes, chunk_size: int,
           on_disk: bool, spool_dir: Path, out: Path | None, total: int) -> tuple[FilledIndex, np.ndarray]:
    """Rank 0: the others' parts (received in rank order, spooled to files first so that no sender waits for a
    long merge), merged after its own."""
    kept_parts = [kept]
    received: list[tuple[str, list[Path]]] = []
    for src in range(1, links.world):
        kept_parts.append(received_array(links.recv(src), np.int64))
        n = int(received_array(links.recv(src), np.int64)[0])
        paths = []
        for j in range(n):
            path = spool_dir / f"from-{src}-{j:05d}.bin"
            path.write_bytes(links.recv(src))
            paths.append(path)
        received.append((str(src), paths))
    kept_all = np.concatenate(kept_parts)
    if merge and on_disk:
        blocks = copy.blocks + [p for _, paths in received for p in paths]
        return merge_on_disk(empty, blocks, out, total), kept_all
    if merge:
        final = copy.index
        for _, paths in received:
            for path in paths:
                merge_into(final, faiss.deserialize_index(np.fromfile(path, np.uint8)))
                path.unlink()
        return FilledIndex(final), kept_all
    # a graph: rank 0's own vectors are in; insert the others' in row order
    for _, paths in received:
        for path in paths:
            x = np.fromfile(path, np.float32).reshape(-1, copy.index.d)
            copy.add(x, np.zeros(len(x), np.int64))  # (a graph's positions are its order)
            path.unlink()
    copy.finish()
    return FilledIndex(copy.index), kept_all


def merge_on_disk(empty: bytes, blocks: list[Path], out: Path, total: int) -> FilledIndex:
    """One on-disk lists file in `out` from the blocks' inverted lists (faiss.contrib.ondisk.merge_ondisk), and
    the rest of the index (a refine stage's vectors) merged from the blocks in order."""
    from faiss.contrib.ondisk import merge_ondisk

    final = faiss.deserialize_index(np.frombuffer(empty, np.uint8))
    ivf = index_ivf(final)
    token = uuid.uuid4().hex[:16]
    path = Path(out) / f"lists-{token}.ivfdata"
    with atomic_path(path) as tmp:
        with faiss_quiet(), quiet_faiss_logger():
            merge_ondisk(ivf, [str(p) for p in blocks], str(tmp))
    faiss.downcast_InvertedLists(ivf.invlists).filename = str(path)  # as the .faiss file records it
    no_prefetch(final)
    if any(isinstance(part, faiss.IndexRefine) for part in unwrapped(final)):
        refine = next(faiss.downcast_index(p) for p in unwrapped(final) if isinstance(p, faiss.IndexRefine))
        for block in blocks:
            part = faiss.read_index(str(block))
            block_refine = next(faiss.downcast_index(p) for p in unwrapped(part) if isinstance(p, faiss.IndexRefine))
            refine.refine_index.merge_from(block_refine.refine_index, 0)
    set_total(final, total)
    return FilledIndex(final, path)


@contextlib.contextmanager
def quiet_faiss_logger():
    """merge_ondisk logs every file it reads at INFO on faiss.contrib.ondisk's logger."""
    log = logging.getLogger("faiss.contrib.ondisk")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)
