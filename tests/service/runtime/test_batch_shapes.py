"""Batch shapes known in advance (``BATCH_SIZES``): a batch is padded up to the next shape, the padding never
reaches an answer or a metric, and every shape is warmed before the version serves."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from pydantic import ValidationError

from service.errors import ServiceError
from service.runtime.batching import BatchStats, DynamicBatcher
from service.runtime.session import load_model
from service.settings import Settings
from service.store.layout import ModelStore

from .harness import RuntimeFactory, StoreFactory

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def echo_run(calls: list[int]):  # type: ignore[no-untyped-def]
    """A 'model' whose logits echo each image's first pixel (padding's zeros included), noting each call's size."""

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(images))
        first = images.reshape(len(images), -1)[:, :1].astype(np.float32)
        return first, first * 2

    return run


@pytest.mark.parametrize(
    ("env", "configured", "provider", "shapes"),
    [
        ({}, None, CUDA, (1, 2, 4, 8, 16, 32)),  # auto on CUDA: powers of two up to MAX_BATCH_SIZE (32)
        ({}, 64, CUDA, (1, 2, 4, 8, 16, 32)),  # the exported config's 64 is above MAX_BATCH_SIZE
        ({}, None, CPU, None),  # auto on the CPU: any size, as before (padding only costs there)
        ({}, 8, CUDA, (1, 2, 4, 8)),  # the model's config.pbtxt says 8
        ({"max_batch_size": 48}, None, CUDA, (1, 2, 4, 8, 16, 32, 48)),  # the largest batch is always a shape
        ({"batch_sizes": "pow2", "max_batch_size": 8}, None, CPU, (1, 2, 4, 8)),
        ({"batch_sizes": " 8, 1,8 ", "max_batch_size": 16}, None, CUDA, (1, 8, 16)),
        ({"batch_sizes": "1,8,32"}, 16, CUDA, (1, 8, 16)),  # sizes above the model's largest batch are left out
        ({"batch_sizes": "8,32"}, None, CUDA, (1, 8, 32)),  # 1 always: where an out-of-memory 8 halves to (warmed)
        ({"batch_sizes": "any"}, None, CUDA, None),
    ],
)
def test_batch_shapes_by_setting_config_and_provider(
    env: dict[str, Any], configured: int | None, provider: str, shapes: Any
) -> None:
    settings = Settings(**env)
    assert settings.batch_shapes(provider, settings.batch_limit(configured)) == shapes


@pytest.mark.parametrize(
    ("env", "configured", "limit", "warmup"),
    [
        ({}, None, 32, (1, 32)),
        ({}, 64, 32, (1, 32)),  # MAX_BATCH_SIZE caps the model's own limit
        ({}, 4, 4, (1, 4)),  # and a lower limit of the model's is kept
        ({"max_batch_size": 128}, 64, 64, (1, 64)),
        ({"warmup_batches": (1, 2, 64)}, 16, 16, (1, 2, 16)),  # never above the model's largest batch
    ],
)
def test_largest_batch_and_warm_up_per_model(
    env: dict[str, Any], configured: int | None, limit: int, warmup: tuple[int, ...]
) -> None:
    settings = Settings(**env)
    assert settings.batch_limit(configured) == limit
    assert settings.warmup(limit) == warmup


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"batch_sizes": "0"}, "use auto, pow2, any, or sizes from 1 to 1024"),
        ({"batch_sizes": "powers"}, "use auto, pow2, any, or sizes from 1 to 1024"),
        ({"batch_sizes": "1,64", "max_batch_size": 32}, "BATCH_SIZES has [64] above MAX_BATCH_SIZE=32"),
    ],
)
def test_a_wrong_batch_sizes_setting_says_what_would_be_right(env: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(**env)
    assert message in str(raised.value)


def test_padded_batches_answer_every_request_with_its_own_rows_only() -> None:
    """Requests of 1 to 3 images batched under shapes (1, 2, 4, 8): every call runs one of the shapes, each answer
    is its own rows, and what observers see (size, probabilities) leaves the padding out."""
    calls: list[int] = []
    stats: list[BatchStats] = []
    batcher = DynamicBatcher("m", [echo_run(calls)], max_batch_size=8, max_delay=0.005, max_queue_images=100,
                             on_batch=stats.append, batch_sizes=(1, 2, 4, 8))  # fmt: skip
    requests = [np.full((1 + i % 3, 2, 2, 1), 10 + i, dtype=np.uint8) for i in range(25)]

    async def everyone() -> list[tuple[np.ndarray, ...]]:
        return await asyncio.gather(*(batcher.infer(r) for r in requests))

    for i, (logits, probabilities) in enumerate(asyncio.run(everyone())):
        assert logits.shape == (1 + i % 3, 1) and np.all(logits == 10 + i) and np.all(probabilities == 2 * (10 + i))
    assert set(calls) <= {1, 2, 4, 8}
    assert sum(s.size for s in stats) == sum(len(r) for r in requests)
    assert any(s.shape > s.size for s in stats)  # some batch was padded ...
    for s in stats:  # ... and its zero rows are in no figure
        assert s.shape in (1, 2, 4, 8) and s.size <= s.shape and s.probabilities is not None
        assert len(s.probabilities) == s.size and np.all(s.probabilities >= 20)


def test_an_out_of_memory_batch_halves_what_ran_down_to_a_warmed_shape() -> None:
    """17 images run as 32 rows and find no memory: the largest batch becomes 16 (half of what ran, a shape), the
    request gets a 503 that says so, and the next batch of 12 runs as the warmed shape 16."""
    calls: list[int] = []

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(images))
        if len(images) >= 32:
            raise MemoryError("out of memory")
        return images[:, :1, 0, 0].astype(np.float32), images[:, :1, 0, 0].astype(np.float32)

    batcher = DynamicBatcher("m", [run], max_batch_size=32, max_delay=0, max_queue_images=100,
                             batch_sizes=(1, 2, 4, 8, 16, 32))  # fmt: skip
    with pytest.raises(ServiceError) as raised:
        asyncio.run(batcher.infer(np.ones((17, 2, 2, 1), np.uint8)))
    assert raised.value.status_code == 503 and "a batch of 17 (run as 32) images" in raised.value.message
    assert batcher.max_batch_size == 16 and "at most 16" in raised.value.message
    logits, _ = asyncio.run(batcher.infer(np.full((12, 2, 2, 1), 7, np.uint8)))
    assert calls == [32, 16] and logits.shape == (12, 1) and np.all(logits == 7)
    assert [batcher.shape_for(n) for n in (1, 3, 9, 16)] == [1, 4, 16, 16]
    unpadded = DynamicBatcher("m", [run], max_batch_size=8, max_delay=0, max_queue_images=10)
    assert [unpadded.shape_for(n) for n in (1, 3, 5)] == [1, 3, 5]


def test_requests_queued_before_an_out_of_memory_batch_run_in_pieces_within_the_new_limit() -> None:
    """A device that holds 16 rows; requests of 32, 20, 24 and 32 images queued at once. The first batch (32) finds
    no memory and the largest batch becomes 16; the others were queued under the old limit and run in pieces of at
    most 16, each a warmed shape, every image answered with its own row: one 503, not four, and no shape unwarmed."""
    calls: list[int] = []

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(images))
        if len(images) > 16:
            raise MemoryError("out of memory")
        first = images[:, 0, 0, :1].astype(np.float32)
        return first, first

    shapes = (1, 2, 4, 8, 16, 32)
    batcher = DynamicBatcher("m", [run], max_batch_size=32, max_delay=0, max_queue_images=1000, batch_sizes=shapes)
    sizes = (32, 20, 24, 32)
    requests = [np.arange(n, dtype=np.uint8)[:, None, None, None] + 100 * (i % 2) for i, n in enumerate(sizes)]

    async def everyone() -> list[Any]:
        return await asyncio.gather(*(batcher.infer(r) for r in requests), return_exceptions=True)

    first, *others = asyncio.run(everyone())
    assert isinstance(first, ServiceError) and first.status_code == 503
    for answer, request in zip(others, requests[1:], strict=True):
        assert not isinstance(answer, BaseException), answer
        np.testing.assert_array_equal(answer[0][:, 0], request[:, 0, 0, 0])
    assert calls[0] == 32 and all(call <= 16 and call in shapes for call in calls[1:]), calls
    assert batcher.max_batch_size == 16 and batcher.queued_images == 0


def test_a_request_run_in_pieces_fails_whole_at_its_first_failed_piece_and_runs_no_more_of_them() -> None:
    """After an out-of-memory batch halves the limit to 16, a request of 32 runs as two pieces; its first fails,
    so the request fails with that error and its second piece, whose answer nobody would read, never runs."""
    calls: list[int] = []

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(images))
        if len(images) > 16:
            raise MemoryError("out of memory")
        if images[0, 0, 0, 0] == 7:
            raise RuntimeError("this piece fails")
        return images[:, 0, 0, :1].astype(np.float32), images[:, 0, 0, :1].astype(np.float32)

    batcher = DynamicBatcher("m", [run], max_batch_size=32, max_delay=0, max_queue_images=1000,
                             batch_sizes=(1, 2, 4, 8, 16, 32))  # fmt: skip
    failing = np.full((32, 2, 2, 1), 7, np.uint8)

    async def both() -> list[Any]:
        return await asyncio.gather(batcher.infer(np.ones((32, 2, 2, 1), np.uint8)), batcher.infer(failing),
                                    return_exceptions=True)  # fmt: skip

    first, second = asyncio.run(both())
    assert isinstance(first, ServiceError) and first.status_code == 503
    assert isinstance(second, RuntimeError) and "this piece fails" in str(second)
    assert calls == [32, 16] and batcher.queued_images == 0


def test_batches_that_ran_together_out_of_memory_lower_the_limit_once() -> None:
    """Two instances each run 32 rows at the same time and both find no memory: the limit halves once (to 16), not
    once per batch (the second ran under the limit the first had already lowered)."""
    started = threading.Barrier(2, timeout=10)

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        started.wait()  # both batches are running before either fails
        raise MemoryError("out of memory")

    batcher = DynamicBatcher("m", [run, run], max_batch_size=32, max_delay=0, max_queue_images=1000,
                             batch_sizes=(1, 2, 4, 8, 16, 32))  # fmt: skip

    async def both() -> list[Any]:
        return await asyncio.gather(*(batcher.infer(np.ones((32, 2, 2, 1), np.uint8)) for _ in range(2)),
                                    return_exceptions=True)  # fmt: skip

    answers = asyncio.run(both())
    assert all(isinstance(a, ServiceError) and a.status_code == 503 for a in answers), answers
    assert batcher.max_batch_size == 16


class _Recording:
    """A session that notes the batch size of every call it runs."""

    def __init__(self, session: ort.InferenceSession, shapes: list[int]) -> None:
        self._session, self._shapes = session, shapes

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._shapes.append(len(next(iter(feeds.values()))))
        return self._session.run(names, feeds)


def test_real_sessions_warm_every_shape_and_padded_answers_equal_lone_ones(model_store: ModelStore) -> None:
    """LeNet-5 on ONNX Runtime with BATCH_SIZES=pow2 up to 8: the warm-up runs 1, 2, 4 and 8; live traffic only
    ever runs those; and each image's answer in a padded batch is its answer alone."""
    stored = model_store.latest("lenet5")
    assert stored is not None
    model = load_model(model_store, stored, Settings(providers="cpu", batch_sizes="pow2", max_batch_size=8))
    assert model.max_batch_size == 8 and model.batch_sizes == (1, 2, 4, 8)
    warmed: list[int] = []
    model.sessions = [_Recording(s, warmed) for s in model.sessions]  # type: ignore[misc]
    model.warm_up(Settings(max_batch_size=8).warmup(model.max_batch_size))
    assert sorted(set(warmed)) == [1, 2, 4, 8]
    warmed.clear()  # WARMUP_BATCHES sizes run as the shapes a request of that size would: 3 as 4, never 3
    model.warm_up((3, 5))
    assert sorted(warmed) == [1, 2, 4, 8]

    live: list[int] = []
    model.sessions = [_Recording(s._session, live) for s in model.sessions]  # type: ignore[attr-defined]
    batcher = DynamicBatcher("lenet5", [model.runner(0)], max_batch_size=8, max_delay=0.005, max_queue_images=100,
                             batch_sizes=model.batch_sizes)  # fmt: skip
    rng = np.random.default_rng(0)
    requests = [rng.integers(0, 256, (1 + i % 3, 32, 32, 1), dtype=np.uint8) for i in range(20)]

    async def everyone() -> list[tuple[np.ndarray, ...]]:
        return await asyncio.gather(*(batcher.infer(r) for r in requests))

    answers = asyncio.run(everyone())
    alone = model.sessions[0]._session  # type: ignore[attr-defined]
    for request, (logits, probabilities, *_) in zip(requests, answers, strict=True):
        for row in range(len(request)):
            expected_logits, expected = alone.run(["logits", "probabilities"], {"images": request[row : row + 1]})
            np.testing.assert_allclose(probabilities[row : row + 1], expected, atol=1e-6)
            np.testing.assert_allclose(logits[row : row + 1], expected_logits, atol=1e-5)
    assert set(live) <= set(warmed) and any(n not in (1, 2) for n in live)  # batched, and only warmed shapes


def test_each_model_batches_up_to_its_config_max_batch_size_or_max_batch_size_whichever_is_lower(
    make_store: StoreFactory, make_runtime: RuntimeFactory
) -> None:
    """Real LeNet-5 sessions: ``small`` (config.pbtxt ``max_batch_size: 4``) batches up to 4 and ``plain`` (as
    exported, 64) up to MAX_BATCH_SIZE, 32 by default or 128 where set (then 64, the model's own limit); ``none``
    (``max_batch_size: 0``, Triton's "no batch dimension") fails with what to write."""
    store = make_store(small=[1], plain=[1], none=[1])
    for name, size in (("small", 4), ("none", 0)):
        config = store.model_dir(name) / "config.pbtxt"
        config.write_text(re.sub(r"max_batch_size: \d+", f"max_batch_size: {size}", config.read_text()))

    def limits(**settings: Any) -> dict[str, int | str]:
        runtime = make_runtime(store, warmup_batches=(), **settings)
        runtime.control.reconcile()
        entries = {name: runtime.repository.versions[name][1] for name in ("small", "plain", "none")}
        return {name: entry.batcher.max_batch_size if entry.batcher is not None else str(entry.reason)
                for name, entry in entries.items()}  # fmt: skip

    default = limits(max_batch_size=32)  # the setting's default (the harness sets 4)
    assert (default["small"], default["plain"]) == (4, 32)
    assert "config.pbtxt" in str(default["none"]) and "write 1 for one image per call" in str(default["none"])
    raised = limits(max_batch_size=128)
    assert (raised["small"], raised["plain"]) == (4, 64)


def test_a_batch_taken_before_another_instance_ran_out_of_memory_runs_in_the_shape_it_was_taken_for() -> None:
    """Two instances: 32 rows fail on the first while a request of 20 is taken for the second under the old limit
    and starts after the failure lowered it to 16. It runs padded to 32, the warmed shape it was taken for: its
    shape was chosen as it started, and no shape held 20 within 16, so it ran 20 rows, a shape never warmed."""
    gate, ran = threading.Event(), []

    def failing(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ran.append(("first", len(images)))
        gate.wait(10)
        raise MemoryError("out of memory")

    def serving(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ran.append(("second", len(images)))
        return images[:, :1, 0, 0].astype(np.float32), images[:, :1, 0, 0].astype(np.float32)

    batcher = DynamicBatcher("m", [failing, serving], max_batch_size=32, max_delay=0, max_queue_images=100,
                             batch_sizes=(1, 2, 4, 8, 16, 32))  # fmt: skip

    async def scenario() -> np.ndarray:
        first = asyncio.ensure_future(batcher.infer(np.ones((32, 2, 2, 1), np.uint8)))
        await asyncio.sleep(0.1)  # the first instance runs its 32 rows
        second: list[asyncio.Future[Any]] = []

        def in_one_turn() -> None:  # the failure comes back, and a request arrives, before either is handled
            gate.set()
            time.sleep(0.2)
            second.append(batcher._submit(np.full((20, 2, 2, 1), 5, np.uint8), None).future)

        asyncio.get_running_loop().call_soon(in_one_turn)
        with pytest.raises(ServiceError):
            await first
        for _ in range(300):
            if second:
                break
            await asyncio.sleep(0.01)
        logits, _ = await asyncio.wait_for(second[0], 10)
        return logits

    logits = asyncio.run(scenario())
    assert batcher.max_batch_size == 16 and logits.shape == (20, 1) and np.all(logits == 5)
    assert ran == [("first", 32), ("second", 32)]
