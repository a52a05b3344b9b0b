"""Faults of the device, in-process on a real LeNet-5 graph: an out-of-memory batch (issue #31)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

from service.errors import ServiceError
from service.metrics import get_metrics

from .harness import RuntimeFactory, StoreFactory

# what ONNX Runtime's CUDA provider raises when its arena cannot grow (microsoft/onnxruntime#16307, #20038)
ARENA_FAILURE = (
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. "
    "Name:'/features/features.0/Conv' Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:376 "
    "void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*, bool, "
    "onnxruntime::WaitNotificationFn) Failed to allocate memory for requested buffer of size 939524096"
)


def _oom_total(name: str) -> float:
    metrics = get_metrics()
    return float(metrics.child(metrics.device_oom, name, "1")._value.get())


@pytest.mark.parametrize("error", [RuntimeException(ARENA_FAILURE), MemoryError()], ids=["cuda-arena", "host"])
def test_an_out_of_memory_batch_gets_503_and_the_next_batches_fit(
    make_store: StoreFactory, make_runtime: RuntimeFactory, error: Exception
) -> None:
    """A device that holds batches of 4 but not 8: the batch of 8 fails with 503 + Retry-After (not 500), the
    model's largest batch drops to 4, the same request sent again is answered as the graph answers it, and
    the version stays ready."""
    store = make_store(oom=[1])
    runtime = make_runtime(store, max_batch_size=8)
    repository, control = runtime.repository, runtime.control
    control.reconcile()
    entry = repository.versions["oom"][1]
    assert entry.status == "ready" and entry.batcher is not None
    batcher = entry.batcher
    run = batcher._runs[0]
    expected = run(np.random.default_rng(0).integers(0, 255, (8, 32, 32, 1), dtype=np.uint8))
    sizes: list[int] = []

    def small_device(images: np.ndarray) -> Any:
        sizes.append(len(images))
        if len(images) > 4:
            raise error
        return run(images)

    batcher._runs[0] = small_device
    before = _oom_total("oom")
    images = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 1), dtype=np.uint8)

    async def send() -> Any:
        with await runtime.classifier.acquire("oom") as leased:
            assert leased.batcher is not None
            return await leased.batcher.infer(images)

    with pytest.raises(ServiceError) as refused:
        asyncio.run(send())
    assert refused.value.status_code == 503 and refused.value.retry_after == 1
    assert "out of memory" in refused.value.message and "at most 4" in refused.value.message
    assert batcher.max_batch_size == 4 and entry.status == "ready"
    assert _oom_total("oom") == before + 1

    answered = asyncio.run(send())
    assert sizes == [8, 4, 4]
    for got, want in zip(answered, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_other_inference_errors_are_not_taken_for_memory(
    make_store: StoreFactory, make_runtime: RuntimeFactory
) -> None:
    """A failing node that is not an allocation keeps its own error (500) and the batch size."""
    store = make_store(broken=[1])
    runtime = make_runtime(store, max_batch_size=8)
    repository, control = runtime.repository, runtime.control
    control.reconcile()
    batcher = repository.versions["broken"][1].batcher
    assert batcher is not None

    def failing(images: np.ndarray) -> Any:
        raise RuntimeException("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input")

    batcher._runs[0] = failing

    async def send() -> Any:
        return await batcher.infer(np.zeros((2, 32, 32, 1), np.uint8))

    with pytest.raises(RuntimeException):
        asyncio.run(send())
    assert batcher.max_batch_size == 8
