"""Filling a build's copy of the trained empty index so that every vector lands at its position in the final index
(IVF lists store the position as the id, flat codes and graphs append), merging filled copies with Faiss's own
merge_from, and wrapping the result in the IndexIDMap2 that maps positions to ids."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from retrieval.faiss_tools import HNSW_BATCH, hnsw_pieces, omp_threads, unwrapped


def add_at(index: faiss.Index, x: np.ndarray, positions: np.ndarray) -> None:
    """Add vectors to an (unwrapped) index so that each one is at `positions` in the final index: IVF lists store
    the positions as ids, flat codes and graphs append (their position is their order)."""
    ix = faiss.downcast_index(index)
    if isinstance(ix, faiss.IndexPreTransform):
        xt = x
        for i in range(ix.chain.size()):
            xt = ix.chain.at(i).apply(xt)
        add_at(ix.index, xt, positions)
        ix.ntotal += len(x)
    elif isinstance(ix, faiss.IndexRefine):
        add_at(ix.base_index, x, positions)
        ix.refine_index.add(x)
        ix.ntotal += len(x)
    elif isinstance(ix, faiss.IndexIVF):
        ix.add_with_ids(x, positions)
    elif isinstance(ix, faiss.IndexHNSW):
        with omp_threads(1):  # one thread, pieces cut as faiss_tools.add_with_ids cuts them: the same graph
            for a, b in hnsw_pieces(int(ix.ntotal), len(x)):
                ix.add(x[a:b])
    else:
        ix.add(x)


def merge_into(dst: faiss.Index, src: faiss.Index) -> None:
    """Append the vectors of `src` (a filled copy of the same trained index) to `dst` with Faiss's merge_from."""
    d, s = faiss.downcast_index(dst), faiss.downcast_index(src)
    if isinstance(d, faiss.IndexPreTransform):
        merge_into(d.index, s.index)
        d.ntotal += s.ntotal
    elif isinstance(d, faiss.IndexRefine):
        merge_into(d.base_index, s.base_index)
        d.refine_index.merge_from(s.refine_index, 0)
        d.ntotal += s.ntotal
    else:
        d.merge_from(s, 0)  # IVF: the lists keep their ids (positions); flat codes: appended


def set_total(index: faiss.Index, n: int) -> None:
    """Set ntotal on the wrappers above the IVF level (after merge_ondisk, which sets the IVF's)."""
    ix = faiss.downcast_index(index)
    while isinstance(ix, (faiss.IndexPreTransform, faiss.IndexRefine)):
        ix.ntotal = n
        ix = faiss.downcast_index(ix.base_index if isinstance(ix, faiss.IndexRefine) else ix.index)
    ix.ntotal = n


def mergeable(index: faiss.Index) -> bool:
    """Whether filled copies of the index merge with Faiss's merge_from (IVF lists, flat codes)."""
    return isinstance(unwrapped(index)[-1], (faiss.IndexIVF, faiss.IndexFlatCodes))


class Spool:
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


class HeldVectors:
    """Vectors already in memory, standing in for a Spool: read back a chunk at a time where they are."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.n = 0

    def write(self, x: np.ndarray) -> None:
        self.n += len(x)

    def chunks(self, size: int):
        for start in range(0, self.n, size):
            yield start, self.x[start:start + size]

    def close(self) -> None:
        pass


class IndexCopy:
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
                add_at(self.index, x[:now], positions[:now])
            self.held = [x[now:]] if now < len(x) else []
            return
        start = 0
        while start < len(x):
            room = len(x) - start if self.block_size is None else self.block_size - int(self.index.ntotal)
            take = min(room, len(x) - start)
            add_at(self.index, x[start:start + take], positions[start:start + take])
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
            add_at(self.index, self.held[0], np.zeros(0, np.int64))
            self.held = []
        self._flush()


def wrap_with_ids(inner: faiss.Index, ids: np.ndarray) -> faiss.IndexIDMap2:
    """The IndexIDMap2 over the filled index, mapping its positions to `ids` (as add_with_ids would have)."""
    n = int(inner.ntotal)
    inner.ntotal = 0  # IndexIDMap2 wraps only an empty index; its vectors are in, the ids are set below
    top = faiss.IndexIDMap2(inner)
    inner.ntotal = n
    top.ntotal = n
    faiss.copy_array_to_vector(np.ascontiguousarray(ids, np.int64), top.id_map)
    top.construct_rev_map()
    return top
