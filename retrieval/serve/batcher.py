"""Micro-batching: requests that arrive together share one tower forward and one Faiss search.

Each request handler announces itself when it starts reading its body (`arrival()`), has its images decoded (by
the service's decode threads), then queues a job and awaits its answer. One coroutine drains the queue: it takes every job queued,
and while other announced requests are still being read or decoded it waits for them to join, at most `max_wait`
seconds (2 ms by default) and up to `max_items` images. The batch then runs on one dedicated compute thread (so
the event loop keeps reading the next requests meanwhile, and the tower and the Faiss index are only ever used
by one thread); jobs arriving during that time form the next batch. A lone request never waits: nothing else is
announced. A batch that fails is retried job by job, so one bad job fails alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass
class BatchStats:
    batches: int = 0
    jobs: int = 0
    items: int = 0
    largest_batch: int = 0  # jobs
    largest_batch_items: int = 0  # images
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)  # jobs per batch -> batches

    def to_json(self) -> dict:
        return {"batches": self.batches, "jobs": self.jobs, "items": self.items, "largest_batch": self.largest_batch,
                "largest_batch_items": self.largest_batch_items,
                "mean_jobs_per_batch": round(self.jobs / self.batches, 3) if self.batches else 0.0}


class _Arrival:
    def __init__(self, batcher: "MicroBatcher"):
        self._batcher = batcher
        self._pending = True

    async def submit(self, job: Any, items: int = 1) -> Any:
        """Queue `job` (holding `items` images) and wait for its result."""
        b = self._batcher
        if b._task is None:  # served without a lifespan (some ASGI test clients): start on first use
            await b.start()
        fut = asyncio.get_running_loop().create_future()
        b._queue.append((job, items, fut))
        self._leave()
        b._wake()
        return await fut

    def _leave(self) -> None:
        if self._pending:
            self._pending = False
            self._batcher._arriving -= 1


class MicroBatcher:
    """Runs `process(jobs) -> results` (one result per job, in order) on one compute thread, on batches of the jobs
    that arrive together."""

    def __init__(self, process: Callable[[Sequence[Any]], Sequence[Any]], *, max_wait: float = 0.002,
                 max_items: int = 256, thread_init: Callable[[], None] | None = None):
        self._process = process
        self._thread_init = thread_init
        self.max_wait = float(max_wait)
        self.max_items = int(max_items)
        self._queue: collections.deque = collections.deque()
        self._arriving = 0
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stopped = False
        self.executor = self._new_executor()
        self.stats = BatchStats()

    # -- lifecycle --------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            return
        if self._stopped:  # restarted (a second lifespan of the same app, in tests)
            self.executor = self._new_executor()
        self._event = asyncio.Event()
        self._stopped = False
        self._task = asyncio.create_task(self._run(), name="micro-batcher")
        # start the compute thread now (its initializer sets its threads), not on the first request
        await asyncio.get_running_loop().run_in_executor(self.executor, int)

    async def stop(self) -> None:
        """Answer what is queued, then stop the drain loop and the compute thread."""
        self._stopped = True
        self._wake()
        if self._task is not None:
            await self._task
            self._task = None
        self.executor.shutdown(wait=True)

    def _new_executor(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(1, thread_name_prefix="retrieval-compute", initializer=self._thread_init)

    # -- requests ---------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def arrival(self):
        """Announce a request that will submit a job soon (the drain loop waits briefly for announced requests)."""
        self._arriving += 1
        arrival = _Arrival(self)
        try:
            yield arrival
        finally:
            arrival._leave()
            self._wake()

    async def call(self, fn: Callable, *args) -> Any:
        """Run fn(*args) on the compute thread (between batches), e.g. embedding images to add."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- the drain loop ---------------------------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._event is not None:
            self._event.set()

    def _queued_items(self) -> int:
        return sum(n for _, n, _ in self._queue)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._stopped:
                    return
                self._event.clear()
                await self._event.wait()
                continue
            if self._arriving > 0 and self.max_wait > 0:
                deadline = loop.time() + self.max_wait
                while self._arriving > 0 and self._queued_items() < self.max_items:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self._event.clear()
                    try:
                        await asyncio.wait_for(self._event.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
            batch, items = [], 0
            while self._queue and (not batch or items + self._queue[0][1] <= self.max_items):
                job = self._queue.popleft()
                batch.append(job)
                items += job[1]
            self.stats.batches += 1
            self.stats.jobs += len(batch)
            self.stats.items += items
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            self.stats.largest_batch_items = max(self.stats.largest_batch_items, items)
            self.stats.batch_sizes[len(batch)] += 1
            results = await loop.run_in_executor(self.executor, self._run_batch, [job for job, _, _ in batch])
            for (_, _, fut), result in zip(batch, results):
                if fut.done():  # the request went away
                    continue
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    def _run_batch(self, jobs: list) -> list:
        try:
            results = list(self._process(jobs))
            if len(results) != len(jobs):
                raise RuntimeError(f"batch processing returned {len(results)} results for {len(jobs)} jobs")
            return results
        except Exception as batch_error:
            if len(jobs) == 1:
                return [batch_error]
            out = []
            for job in jobs:  # isolate the job that failed
                try:
                    out.append(self._process([job])[0])
                except Exception as e:
                    out.append(e)
            return out
