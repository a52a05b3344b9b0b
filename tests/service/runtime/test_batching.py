"""The dynamic batcher's shutdown in-process (issue #34's defect 12)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.errors import ServiceError
from service.runtime.batching import DynamicBatcher


def test_closing_fails_every_waiting_request_at_once_and_never_blocks_the_event_loop() -> None:
    """One batch is running (its call takes seconds) and three requests wait behind it when the version is unloaded:
    all four get a 503 that says to send them again, at once, and close() does not wait for the running call."""
    release = threading.Event()

    def slow(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        release.wait(5)
        return images, images

    async def main() -> tuple[float, list[BaseException | tuple[np.ndarray, ...]], BaseException | None]:
        batcher = DynamicBatcher("m", [slow], max_batch_size=2, max_delay=0, max_queue_images=64)
        running = asyncio.ensure_future(batcher.infer(np.zeros((2, 1))))
        await asyncio.sleep(0.1)  # its batch is in the session call now
        waiting = [asyncio.ensure_future(batcher.infer(np.zeros((1, 1)))) for _ in range(3)]
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        await batcher.close()
        closed_in = time.perf_counter() - started
        answers = await asyncio.wait_for(asyncio.gather(running, *waiting, return_exceptions=True), 2.5)
        try:
            await batcher.infer(np.zeros((1, 1)))
        except ServiceError as late:
            return closed_in, answers, late
        finally:
            release.set()
        return closed_in, answers, None

    closed_in, answers, late = asyncio.run(main())
    assert closed_in < 2.5  # half the running call's 5 s: close() did not wait for it
    assert len(answers) == 4
    for answer in answers:
        assert isinstance(answer, ServiceError), answer
        assert answer.status_code == 503 and answer.retry_after and "unloaded" in answer.message
    assert isinstance(late, ServiceError) and late.status_code == 503  # a request after the close is refused too


@pytest.mark.parametrize("parts", [[np.zeros((1, 2)), np.zeros((1, 3))]])
def test_a_batch_that_cannot_be_joined_fails_its_requests_not_the_batcher(parts: list[np.ndarray]) -> None:
    """Requests whose images cannot be concatenated fail with the error; the next request is served."""

    def echo(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return images, images

    async def main() -> tuple[list[BaseException | tuple[np.ndarray, ...]], tuple[np.ndarray, ...]]:
        batcher = DynamicBatcher("m", [echo], max_batch_size=4, max_delay=0.05, max_queue_images=64)
        with batcher.expect(), batcher.expect():  # both arrive before the batch forms
            failed = asyncio.gather(*(batcher.infer(part) for part in parts), return_exceptions=True)
            await asyncio.sleep(0)
        answers = await asyncio.wait_for(failed, 2.0)
        after = await asyncio.wait_for(batcher.infer(np.ones((1, 2))), 2.0)
        await batcher.close()
        return answers, after

    answers, after = asyncio.run(main())
    assert all(isinstance(answer, ValueError) for answer in answers)
    assert after[0].tolist() == [[1.0, 1.0]]
