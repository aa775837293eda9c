"""retrieval.serve.batcher.MicroBatcher on its own (no server, no tower): which jobs share a batch, the split at
`max_items`, a failing job answered with its own error while the others of its batch are answered, and a lone
request that never waits. `process` here records what it is given, as the service's Service.process would run."""

from __future__ import annotations

import asyncio
import contextlib
import time

from retrieval.serve.batcher import MicroBatcher


class Recorder:
    """A `process` function: answers job j with ("done", j); raises ValueError for a batch holding a job named
    "bad"; records every batch it is given (as lists of job names)."""

    def __init__(self):
        self.batches: list[list[str]] = []

    def __call__(self, jobs):
        self.batches.append([name for name, _ in jobs])
        if any(name == "bad" for name, _ in jobs):
            raise ValueError("bad job")
        return [("done", name) for name, _ in jobs]


async def submit_together(batcher: MicroBatcher, jobs: list[tuple[str, int]]) -> list:
    """Announce every job's request first (as request handlers do before reading their bodies), then submit them
    one by one; -> each job's result or exception, in order."""
    with contextlib.ExitStack() as stack:
        arrivals = [stack.enter_context(batcher.arrival()) for _ in jobs]
        tasks = [asyncio.ensure_future(a.submit(job, job[1])) for a, job in zip(arrivals, jobs)]
        return await asyncio.gather(*tasks, return_exceptions=True)


def run(process, jobs, **kw):
    async def main():
        batcher = MicroBatcher(process, **kw)
        await batcher.start()
        try:
            return await submit_together(batcher, jobs), batcher.stats
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_a_failing_job_gets_its_error_and_the_others_their_answers():
    process = Recorder()
    jobs = [("a", 1), ("b", 2), ("bad", 1), ("c", 1)]
    results, stats = run(process, jobs, max_wait=5.0)
    assert results[0] == ("done", "a") and results[1] == ("done", "b") and results[3] == ("done", "c")
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad job"
    # one batch of all four (it failed), then each job alone
    assert process.batches == [["a", "b", "bad", "c"], ["a"], ["b"], ["bad"], ["c"]]
    assert stats.batches == 1 and stats.jobs == 4 and stats.items == 5


def test_batches_are_split_at_max_items():
    process = Recorder()
    jobs = [("a", 3), ("b", 3), ("c", 2), ("d", 4), ("e", 9), ("f", 1)]
    results, stats = run(process, jobs, max_wait=5.0, max_items=8)
    assert results == [("done", name) for name, _ in jobs]
    # in arrival order, as many jobs as fit in 8 images; a job larger than that runs alone
    assert process.batches == [["a", "b", "c"], ["d"], ["e"], ["f"]]
    assert stats.batches == 4 and stats.items == 22 and stats.largest_batch == 3


def test_announced_requests_are_waited_for_and_a_lone_one_is_not():
    process = Recorder()
    results, stats = run(process, [(str(i), 1) for i in range(6)], max_wait=5.0)
    assert len(results) == 6 and process.batches == [[str(i) for i in range(6)]]

    async def lone():
        batcher = MicroBatcher(process, max_wait=5.0)
        await batcher.start()
        try:
            t0 = time.perf_counter()
            with batcher.arrival() as arrival:
                result = await arrival.submit(("alone", 1))
            return result, time.perf_counter() - t0
        finally:
            await batcher.stop()

    result, seconds = asyncio.run(lone())
    assert result == ("done", "alone") and seconds < 2.5  # not the 5 s wait: nothing else was announced


def test_a_batch_returning_the_wrong_number_of_results_fails_each_job_alone():
    def short(jobs):  # a bug in process: one result missing when several jobs come together
        return [("done", name) for name, _ in jobs][:max(1, len(jobs) - 1)]

    results, _ = run(short, [("a", 1), ("b", 1)], max_wait=5.0)
    assert results == [("done", "a"), ("done", "b")]  # retried one by one, each answered
