"""The dynamic batcher on its own, with a stand-in for the session call."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any

import numpy as np
import pytest

from service.errors import Overloaded, PayloadTooLarge, Stranded
from service.runtime.batching import BatchStats, DynamicBatcher


def echo_run(calls: list[int], delay: float = 0.02):  # type: ignore[no-untyped-def]
    """A 'model' whose logits echo each image's first pixel, so rows can be traced back."""

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(images))
        time.sleep(delay)
        first = images.reshape(len(images), -1)[:, :1].astype(np.float32)
        return first, first * 2

    return run


def images(value: int, n: int = 1) -> np.ndarray:
    return np.full((n, 2, 2, 1), value, dtype=np.uint8)


async def _gather(batcher: DynamicBatcher, requests: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    return await asyncio.gather(*(batcher.infer(r) for r in requests))


def test_concurrent_requests_share_calls_and_get_their_own_rows() -> None:
    calls: list[int] = []
    stats: list[BatchStats] = []
    batcher = DynamicBatcher(
        "m", [echo_run(calls)], max_batch_size=8, max_delay=0.001, max_queue_images=100, on_batch=stats.append
    )
    requests = [images(i, n=1 + i % 3) for i in range(30)]
    results = asyncio.run(_gather(batcher, requests))
    for i, (logits, probabilities) in enumerate(results):
        assert logits.shape == (1 + i % 3, 1) and np.all(logits == i) and np.all(probabilities == 2 * i)
    assert sum(calls) == sum(len(r) for r in requests)
    assert max(calls) > 1 and max(calls) <= 8  # batched, never past the limit
    assert len(calls) < len(requests)
    assert sum(s.requests for s in stats) == len(requests)


def test_a_request_larger_than_the_batch_limit_is_split() -> None:
    calls: list[int] = []
    batcher = DynamicBatcher("m", [echo_run(calls)], max_batch_size=4, max_delay=0, max_queue_images=100)
    logits, _ = asyncio.run(batcher.infer(np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)))
    assert logits.ravel().tolist() == list(range(10)) and max(calls) <= 4


def test_every_output_keeps_its_rows_when_batched_and_when_split() -> None:
    """A graph with a typicality check returns a third output, one value per image: it follows its rows."""
    stats: list[BatchStats] = []

    def run(images: np.ndarray) -> tuple[np.ndarray, ...]:
        first = images.reshape(len(images), -1)[:, :1].astype(np.float32)
        return first, first * 2, first[:, 0] * 3

    batcher = DynamicBatcher("m", [run], max_batch_size=4, max_delay=0.001, max_queue_images=100, on_batch=stats.append)
    split = asyncio.run(batcher.infer(np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)))
    assert [output.shape for output in split] == [(10, 1), (10, 1), (10,)]
    assert split[2].tolist() == [3.0 * i for i in range(10)]
    shared = asyncio.run(_gather(batcher, [images(i, n=1 + i % 3) for i in range(12)]))
    for i, (_, _, distances) in enumerate(shared):
        assert distances.tolist() == [3.0 * i] * (1 + i % 3)
    assert stats and all(s.distances is not None and len(s.distances) == s.size for s in stats)


def test_inputs_with_a_value_per_image_travel_with_their_rows() -> None:
    """An explanation graph takes each image with its class: both are split, joined and sliced together."""
    observed: list[BatchStats] = []

    def run(inputs: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
        pixels, classes = inputs
        return pixels.reshape(len(pixels), -1)[:, :1].astype(np.float32), classes.astype(np.float32) * 10

    batcher = DynamicBatcher(
        "m", [run], max_batch_size=4, max_delay=0.001, max_queue_images=100, on_batch=observed.append
    )

    async def both() -> list[tuple[np.ndarray, ...]]:
        first = (np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1), np.arange(6, dtype=np.int64))
        second = (np.full((3, 1, 1, 1), 9, dtype=np.uint8), np.full(3, 7, dtype=np.int64))
        return await asyncio.gather(batcher.infer(first, observe=False), batcher.infer(second))

    (pixels_a, classes_a), (pixels_b, classes_b) = asyncio.run(both())
    assert pixels_a.ravel().tolist() == list(range(6)) and classes_a.tolist() == [10.0 * i for i in range(6)]
    assert pixels_b.ravel().tolist() == [9] * 3 and classes_b.tolist() == [70.0] * 3
    # only the observed request's rows reach the quality metrics
    assert sum(0 if s.probabilities is None else len(s.probabilities) for s in observed) == 3


def test_a_full_queue_sheds_load() -> None:
    calls: list[int] = []
    batcher = DynamicBatcher("m", [echo_run(calls, delay=0.2)], max_batch_size=2, max_delay=0, max_queue_images=4)

    async def scenario() -> list[object]:
        return await asyncio.gather(*(batcher.infer(images(i)) for i in range(10)), return_exceptions=True)

    outcomes = asyncio.run(scenario())
    shed = [o for o in outcomes if isinstance(o, Overloaded)]
    served = [o for o in outcomes if isinstance(o, tuple)]
    assert shed and served and len(shed) + len(served) == 10
    assert "retry" in str(shed[0])


def test_a_request_larger_than_the_whole_queue_is_413_not_a_503_to_retry() -> None:
    """An empty queue of 4 images: a request of 5 could never be queued, so it is told so (413, with the setting),
    not told to retry; one of 4 runs."""
    batcher = DynamicBatcher("m", [echo_run([])], max_batch_size=2, max_delay=0, max_queue_images=4)
    with pytest.raises(PayloadTooLarge) as raised:
        asyncio.run(batcher.infer(np.zeros((5, 2, 2, 1), np.uint8)))
    assert raised.value.status_code == 413
    assert "queues at most 4 images (MAX_QUEUE_IMAGES) and this request has 5" in raised.value.message
    assert asyncio.run(batcher.infer(np.zeros((4, 2, 2, 1), np.uint8)))[0].shape[0] == 4


def test_a_failing_call_fails_its_batch_only() -> None:
    failures = threading.Event()

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not failures.is_set():
            failures.set()
            raise RuntimeError("boom")
        out = np.zeros((len(batch), 1), dtype=np.float32)
        return out, out

    batcher = DynamicBatcher("m", [run], max_batch_size=4, max_delay=0, max_queue_images=100)

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.infer(images(1))
        logits, _ = await batcher.infer(images(2))  # the next request is served
        assert logits.shape == (1, 1)

    asyncio.run(scenario())


def test_a_lone_request_does_not_wait_but_an_announced_one_is_waited_for() -> None:
    calls: list[int] = []
    # a long delay, so that waiting for it could not be mistaken for a slow machine
    batcher = DynamicBatcher("m", [echo_run(calls, delay=0)], max_batch_size=8, max_delay=5.0, max_queue_images=100)

    async def lone() -> float:
        started = time.perf_counter()
        await batcher.infer(images(1))
        return time.perf_counter() - started

    assert asyncio.run(lone()) < 4  # nobody announced: no 5 s wait for company

    async def with_company() -> None:
        async def late_arrival() -> None:
            with batcher.expect():
                await asyncio.sleep(0.05)  # decoding
            await batcher.infer(images(2))  # submitted in the step its announcement ends, as the Classifier does

        await asyncio.gather(late_arrival(), batcher.infer(images(1)))

    calls.clear()
    asyncio.run(with_company())
    assert calls == [2]  # the announced request joined the first one's batch


def test_instances_run_batches_at_the_same_time() -> None:
    """Two instances: two session calls overlap, never three, and every request gets its own rows."""
    active, most = 0, 0
    lock = threading.Lock()

    def make_run(instance: int):  # type: ignore[no-untyped-def]
        def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            nonlocal active, most
            with lock:
                active += 1
                most = max(most, active)
            time.sleep(0.05)
            with lock:
                active -= 1
            first = images.reshape(len(images), -1)[:, :1].astype(np.float32)
            return first, np.full_like(first, instance)

        return run

    batcher = DynamicBatcher("m", [make_run(0), make_run(1)], max_batch_size=2, max_delay=0, max_queue_images=100)
    requests = [images(i) for i in range(16)]
    results = asyncio.run(_gather(batcher, requests))
    assert [int(logits[0, 0]) for logits, _ in results] == list(range(16))
    assert most == 2
    assert {int(p[0, 0]) for _, p in results} == {0, 1}  # both instances served


def test_a_request_over_the_batch_limit_fails_whole_at_its_first_failed_chunk_and_runs_no_more() -> None:
    """Six images in chunks of two: the first chunk's call fails, so the request fails, and its other chunks are
    neither run for a client that has its answer nor left counted among the queued images."""
    calls: list[list[int]] = []

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(batch[:, 0, 0, 0].tolist())
        time.sleep(0.05)
        if len(calls) == 1:
            raise RuntimeError("boom")
        out = batch.reshape(len(batch), -1)[:, :1].astype(np.float32)
        return out, out

    batcher = DynamicBatcher("m", [run], max_batch_size=2, max_delay=0, max_queue_images=100)

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.infer(np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1).repeat(2, 1).repeat(2, 2))
        await asyncio.sleep(0.3)  # what would still run has run

    asyncio.run(scenario())
    assert calls == [[0, 1]] and batcher.queued_images == 0


def test_requests_cancelled_while_queued_give_their_share_of_the_queue_back_at_once() -> None:
    """One call runs for two seconds with four requests queued behind it (MAX_QUEUE_IMAGES=4), then they are
    cut off (REQUEST_TIMEOUT_S, or clients gone): the next request is queued, not refused as if they still
    waited."""
    batcher = DynamicBatcher("m", [echo_run([], delay=2.0)], max_batch_size=1, max_delay=0, max_queue_images=4)

    async def scenario() -> int:
        running = asyncio.ensure_future(batcher.infer(images(0)))
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(batcher.infer(images(i))) for i in range(1, 5)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await batcher.infer(images(8))  # the queue is full
        for request in waiting:
            request.cancel()
        await asyncio.sleep(0)  # the cancellations are delivered
        queued = batcher.queued_images
        logits, _ = await batcher.infer(images(9))
        assert np.all(logits == 9)
        await running
        return queued

    assert asyncio.run(scenario()) == 0


@pytest.mark.parametrize("turns", range(6))
def test_an_event_loop_that_ends_mid_request_leaves_the_instance_to_the_next_loop(turns: int) -> None:
    """A background request (the shadow's, a canary's comparison) cancelled as its event loop ends, at any turn of
    its way through the batcher, holding an instance or not: the next loop's request is still answered. (A batch
    task cancelled before its first step never ran its ``finally``, and the instance it held was never free
    again: the next request waited for ever.)"""
    calls: list[int] = []
    batcher = DynamicBatcher("m", [echo_run(calls, delay=0)], max_batch_size=4, max_delay=0.05, max_queue_images=8)

    async def ends_after_turns() -> None:
        asyncio.get_running_loop().create_task(batcher.infer(images(1)))
        for _ in range(turns):
            await asyncio.sleep(0)

    async def mid_wait_for_company() -> None:
        with batcher.expect():  # a request decoding: the batch forming waits for it, until it ends with the loop
            asyncio.get_running_loop().create_task(batcher.infer(images(1)))
            for _ in range(turns):
                await asyncio.sleep(0)

    run_and_end(ends_after_turns())
    logits, _ = asyncio.run(asyncio.wait_for(batcher.infer(images(7)), 5))
    assert logits.ravel().tolist() == [7]
    run_and_end(mid_wait_for_company())
    logits, _ = asyncio.run(asyncio.wait_for(batcher.infer(images(8)), 5))
    assert logits.ravel().tolist() == [8]


def run_and_end(main: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run(main)``, whose end cancels every task left and runs the loop until they end, bounded: a task
    that a cancel does not end fails the test instead of hanging it."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main)
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            _, pending = loop.run_until_complete(asyncio.wait(left, timeout=5))
            assert not pending, f"tasks a cancel did not end: {pending}"
    finally:
        loop.close()


def test_a_batcher_last_used_on_an_ended_event_loop_closes_on_another() -> None:
    """Its worker, done with the loop it ran on, is not awaited again: the close strands what comes next."""
    batcher = DynamicBatcher("m", [echo_run([], delay=0)], max_batch_size=4, max_delay=0, max_queue_images=8)
    asyncio.run(batcher.infer(images(1)))
    asyncio.run(batcher.close())
    with pytest.raises(Stranded):
        asyncio.run(batcher.infer(images(2)))
