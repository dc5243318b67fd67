"""`ssl_vit.serve.engine.MicroBatcher`: one batch at a time; what queues while a batch runs goes into the next batch
as soon as that one ends (no further window), up to max_batch; an error reaches every request of its batch."""
import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ssl_vit.serve.engine import MicroBatcher


class GatedWork:
    """fn(items) for the batcher: records each batch, blocks until released, flags overlapping calls."""

    def __init__(self):
        self.batches, self.release, self.running, self.overlapped = [], threading.Event(), 0, False
        self.lock = threading.Lock()

    def __call__(self, items):
        with self.lock:
            self.running += 1
            self.overlapped |= self.running > 1
            self.batches.append(list(items))
        self.release.wait(10)
        with self.lock:
            self.running -= 1
        if "bad" in items:
            raise ValueError("bad item")
        return [item * 10 for item in items]


async def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_items_queued_during_a_batch_run_next_without_the_window_and_batches_never_overlap():
    async def scenario():
        work, pool = GatedWork(), ThreadPoolExecutor(2)  # two threads: overlapping batches would be possible
        batcher = MicroBatcher(work, window_s=30.0, max_batch=2, executor=pool)
        batcher.expect()
        batcher.expect()
        first = [asyncio.ensure_future(batcher.submit(i, expected=True)) for i in (1, 2)]  # max_batch: runs now
        await wait_for(lambda: len(work.batches) == 1)
        queued = [asyncio.ensure_future(batcher.submit(i)) for i in (3, 4, 5)]  # arrive while [1, 2] runs
        await asyncio.sleep(0.05)
        assert len(work.batches) == 1  # nothing else starts while a batch runs
        started = time.monotonic()
        work.release.set()
        results = await asyncio.wait_for(asyncio.gather(*first, *queued), 10)  # the queued must not be stranded
        pool.shutdown()
        return work, results, time.monotonic() - started

    work, results, seconds = asyncio.run(scenario())
    assert results == [10, 20, 30, 40, 50]
    assert work.batches == [[1, 2], [3, 4], [5]]  # up to max_batch each, in arrival order
    assert not work.overlapped
    assert seconds < 5  # the 30 s window never held the queued items back


def test_an_idle_batcher_waits_for_expected_items_and_never_for_company_that_is_not_coming():
    async def scenario():
        work, pool = GatedWork(), ThreadPoolExecutor(1)
        work.release.set()
        batcher = MicroBatcher(work, window_s=30.0, max_batch=8, executor=pool)
        started = time.monotonic()
        alone = await asyncio.wait_for(batcher.submit(1), 10)  # nothing on its way: no 30 s window
        lone_seconds = time.monotonic() - started
        batcher.expect()  # 3 is being decoded
        batcher.expect()  # and so is one that will fail
        first = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.05)
        assert len(work.batches) == 1  # 2 waits for the expected ones
        second = asyncio.ensure_future(batcher.submit(3, expected=True))
        await asyncio.sleep(0.05)
        assert len(work.batches) == 1  # one is still on its way
        batcher.withdraw()  # it failed: 2 and 3 go now
        results = await asyncio.wait_for(asyncio.gather(first, second), 10)
        pool.shutdown()
        return work, alone, lone_seconds, results

    work, alone, lone_seconds, results = asyncio.run(scenario())
    assert alone == 10 and lone_seconds < 5
    assert results == [20, 30] and work.batches == [[1], [2, 3]]


def test_an_error_reaches_each_request_of_its_batch_and_the_next_batch_still_runs():
    async def scenario():
        work, pool = GatedWork(), ThreadPoolExecutor(1)
        work.release.set()
        batcher = MicroBatcher(work, window_s=0.01, max_batch=2, executor=pool)
        batcher.expect()
        failing = await asyncio.gather(batcher.submit("bad"), batcher.submit(3, expected=True),
                                       return_exceptions=True)
        after = await batcher.submit(4)
        pool.shutdown()
        return failing, after

    failing, after = asyncio.run(scenario())
    assert all(isinstance(e, ValueError) for e in failing) and after == 40


@pytest.mark.parametrize("window_s", [0.0, 0.01])
def test_many_concurrent_items_all_answered_in_order(window_s):
    async def scenario():
        pool = ThreadPoolExecutor(1)
        batcher = MicroBatcher(lambda items: [i + 1 for i in items], window_s=window_s, max_batch=7, executor=pool)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(50)))
        pool.shutdown()
        return results, batcher

    results, batcher = asyncio.run(scenario())
    assert results == list(range(1, 51)) and batcher.items == 50 and batcher.batches >= 50 // 7
