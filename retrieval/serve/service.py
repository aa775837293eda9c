"""The service of `retrieval serve`: an opened index and its tower, the micro-batcher in front of them, the decode
threads for uploads, and adding items (the compute side; the HTTP side lives in retrieval.serve.app)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.errors import UsageError
from retrieval.serve import library
from retrieval.serve.batcher import MicroBatcher
from retrieval.serve.library import ServiceError

# Requests whose pictures hold this many pixels in all (five MNIST digits) are preprocessed on the event loop: it
# takes less time than handing them to a decode thread and back.
INLINE_PIXELS = 64 * 64


@dataclass
class Limits:
    max_body_bytes: int = 16 * 1024 * 1024  # a request body larger than this is refused (413)
    max_images: int = 64  # images per request
    max_k: int = 100  # neighbours per query (also clamped to the index size, like the CLI)
    batch_wait: float = 0.002  # seconds the micro-batcher waits for requests that are still arriving
    max_batch_items: int = 256  # images per tower forward
    lock_timeout: float = 10.0  # seconds an add waits for another writer of the index folder
    threads: int = 1  # torch and Faiss threads of the compute thread (1 suits small batches on few cores)
    read_timeout: float = 30.0  # seconds a request's body may take to arrive once its head has (then 408, closed)
    decode_threads: int = 0  # threads decoding and preprocessing uploads (0: one per CPU core this process may use)


@dataclass
class QueryJob:
    images: torch.Tensor  # uint8 (n, 28, 28)
    names: list[str]
    k: int
    max_distance: float | None  # None: the server's threshold
    search_params: str | None = None  # Faiss search parameters for this request ("nprobe=64"); None: the index's


@dataclass
class JobResult:
    answers: list[dict]  # `retrieval query --json` entries
    max_distance: float | None  # the threshold that applied


@dataclass
class Service:
    """An opened index with its tower, the micro-batcher in front of them, and what adding items needs."""

    folder: Path
    folder_name: str
    searcher: Any  # retrieval.query.Searcher; replaced (never mutated) when items are added
    checkpoint: Any  # the tower's Checkpoint (its fingerprint is checked against the index on every add)
    uploads: Path
    token: str | None = None
    max_distance: float | None = None  # --max-distance; None: the index's calibrated threshold
    root: Path | None = None
    limits: Limits = field(default_factory=Limits)
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        threads = self.limits.threads
        self.compute_threads: dict | None = None  # what torch and Faiss report on the compute thread, once it runs

        def init_compute_thread():
            self.compute_threads = library.set_compute_threads(threads)

        self.batcher = MicroBatcher(self.process, max_wait=self.limits.batch_wait,
                                    max_items=self.limits.max_batch_items, thread_init=init_compute_thread)
        self.in_flight = 0  # HTTP requests being read or answered (RequestGuard counts them)
        # Pictures are decoded and preprocessed off the event loop, several at once where there are cores for it
        # (PIL's decoders and most numpy/scipy work release the GIL), while the loop reads the next requests.
        self.decode_threads = self.limits.decode_threads or available_cpus()
        self.decoder = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="retrieval-decode")
        self.references = library.ReferenceImages(self.root)
        # threading locks, taken in worker threads: the service outlives event loops (tests open several)
        self._reference_lock = threading.Lock()
        self._add_lock = threading.Lock()

    @classmethod
    def open(cls, folder, *, device: str = "cpu", checkpoint=None, max_distance: float | None = None,
             token_file=None, uploads=None, root=None, limits: Limits | None = None) -> "Service":
        folder = Path(folder)
        token = read_token(token_file) if token_file is not None else None
        searcher, ckpt = library.open_index(folder, device=device, checkpoint=checkpoint, max_distance=max_distance)
        uploads = Path(uploads) if uploads else library.default_uploads_folder(folder)
        if token is not None:  # adding is enabled: find out now that the images would have nowhere to go
            from retrieval.fsutil import ensure_writable_dir

            ensure_writable_dir(uploads, "uploads folder")
        return cls(folder=folder, folder_name=str(folder), searcher=searcher, checkpoint=ckpt, uploads=uploads,
                   token=token, max_distance=max_distance, root=Path(root) if root else None,
                   limits=limits or Limits())

    # -- the compute thread -----------------------------------------------------------------------------------------
    def process(self, jobs: list[QueryJob]) -> list[JobResult]:
        """One tower forward for every image of `jobs`, one Faiss search per distinct (k, threshold)."""
        searcher = self.searcher  # a snapshot: an add swaps in a new Searcher between batches
        images = jobs[0].images if len(jobs) == 1 else torch.cat([j.images for j in jobs])
        embeddings = library.embed(searcher, images)
        scores = library.digit_scores(searcher, images, embeddings)  # None for a tower without a gate
        groups: dict[tuple, list] = {}
        start = 0
        for i, job in enumerate(jobs):
            k = library.effective_k(searcher, job.k)
            groups.setdefault((k, job.max_distance, job.search_params), []).append(
                (i, start, start + len(job.images)))
            start += len(job.images)
        out: list[JobResult | None] = [None] * len(jobs)
        for (k, max_distance, search_params), members in groups.items():
            view = searcher if max_distance is None else library.searcher_for(searcher, max_distance=max_distance)
            if len(groups) == 1:  # the usual case: every job asks the same k and threshold
                subset, subset_scores = embeddings, scores
            else:
                rows = np.concatenate([np.arange(a, b) for _, a, b in members])
                subset, subset_scores = embeddings[rows], None if scores is None else scores[rows]
            names = [name for i, _, _ in members for name in jobs[i].names]
            answers = library.answer_queries(view, subset, k, names, search_params, subset_scores)
            at = 0
            for i, a, b in members:
                out[i] = JobResult(answers[at:at + b - a], view.max_distance)
                at += b - a
        return out

    # -- decoding uploads --------------------------------------------------------------------------------------------
    async def preprocess(self, opened: list[tuple[str, Any]]) -> torch.Tensor:
        """(name, opened PIL image) pairs -> uint8 (n, 28, 28), decoded in the decode threads (the pictures split
        into one contiguous share per thread), or here when they are a few tiny ones (MNIST-size: cheaper than the
        hand-off). A failure raises the error of the first failing picture in order."""
        if sum(img.size[0] * img.size[1] for _, img in opened) <= INLINE_PIXELS:
            tensors = _preprocess_share(opened)
        else:
            loop = asyncio.get_running_loop()
            shares = min(len(opened), self.decode_threads)
            bounds = [len(opened) * i // shares for i in range(shares + 1)]
            if shares == 1:
                tensors = await loop.run_in_executor(self.decoder, _preprocess_share, opened)
            else:
                results = await asyncio.gather(*(loop.run_in_executor(self.decoder, _preprocess_share, opened[a:b])
                                                 for a, b in zip(bounds, bounds[1:])))
                tensors = [t for share in results for t in share]
        for t in tensors:
            if isinstance(t, BaseException):
                raise t
        return torch.stack(tensors)

    # -- adding items ------------------------------------------------------------------------------------------------
    async def add(self, images: torch.Tensor, label: str):
        """Serialised: one add at a time in this process (a lock in the worker thread), and the folder lock
        against other writers. The new index replaces the served one only once it is saved."""

        def embed_on_compute_thread(x):
            return self.batcher.executor.submit(library.embed, self.searcher, x).result()

        def run():
            with self._add_lock:
                index, new_ids = library.add_items(self.folder, self.checkpoint, embed_on_compute_thread, images,
                                                   label, self.uploads, lock_timeout=self.limits.lock_timeout)
                self.searcher = library.searcher_for(self.searcher, index=index, max_distance=self.max_distance)
                return index, new_ids

        return await asyncio.get_running_loop().run_in_executor(None, run)

    async def reference_png(self, item_id: int) -> bytes:
        def run():
            with self._reference_lock:  # the first lookup may load a dataset: once
                return self.references.get(self.searcher.index, item_id)

        image = await asyncio.get_running_loop().run_in_executor(None, run)
        if image is None:
            raise ServiceError(f"item {item_id} has no stored image (a class prototype, or its file is gone)", 404)
        return library.png_bytes(image)


def _preprocess_share(opened) -> list:
    """Preprocess some opened uploads in this thread: a tensor, or the exception, per picture."""
    out = []
    for name, img in opened:
        try:
            out.append(library.preprocess_upload(img, name))
        except Exception as e:  # noqa: BLE001 -- answered in order by Service.preprocess
            out.append(e)
    return out


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def read_token(path) -> str:
    path = Path(path)
    try:
        token = path.read_text("utf-8").strip()
    except FileNotFoundError:
        raise UsageError(f"--token-file {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--token-file {path}: cannot read it ({e})") from None
    if not token or len(token.split()) != 1:
        raise UsageError(f"--token-file {path}: expected one token (a line without blanks)")
    return token
