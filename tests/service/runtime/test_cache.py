"""RESPONSE_CACHE_MB in-process: the key, the LRU bound in bytes, identical requests computed once, errors not kept,
and a version's entries dropped when it is released; on the real runtime where it matters (LeNet-5's graph)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from service.errors import InvalidInput
from service.frontends.v2.handler import OipHandler, RequestedOutput, Tensor
from service.metrics import RequestRecord, get_metrics
from service.runtime.batching import BatchStats
from service.runtime.cache import ResponseCache, cache_key
from service.runtime.entry import ModelEntry
from service.server import Runtime

from ..pictures import held_out_drawings
from .harness import RuntimeFactory, StoreFactory

MODEL = ModelEntry("lenet5", 1)
PNG = b"\x89PNG one image"


def test_the_key_changes_with_every_part_and_with_nothing_else() -> None:
    base = cache_key("", "classify", "lenet5", 1, (5, None), [PNG])
    assert base == cache_key("", "classify", "lenet5", 1, (5, None), [PNG])
    changed = [
        cache_key("tenant-a", "classify", "lenet5", 1, (5, None), [PNG]),
        cache_key("", "oip", "lenet5", 1, (5, None), [PNG]),
        cache_key("", "classify", "resnet18", 1, (5, None), [PNG]),
        cache_key("", "classify", "lenet5", 2, (5, None), [PNG]),
        cache_key("", "classify", "lenet5", 1, (3, None), [PNG]),
        cache_key("", "classify", "lenet5", 1, (5, 0.5), [PNG]),
        cache_key("", "classify", "lenet5", 1, (5, None), [PNG + b"!"]),
        cache_key("", "classify", "lenet5", 1, (5, None), [PNG, PNG]),
        # the parts are length-prefixed: the same bytes cut elsewhere are another request
        cache_key("", "classify", "lenet5", 1, (5, None), [PNG[:4], PNG[4:]]),
    ]
    assert len({base, *changed}) == len(changed) + 1
    pixels = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
    as_array = cache_key("", "oip", "lenet5", 1, (), [pixels])
    assert as_array == cache_key("", "oip", "lenet5", 1, (), [pixels.tobytes()])  # hashed as its buffer


def answer_of(size: int) -> bytes:
    return bytes(size)


def run_cached(cache: ResponseCache, key: bytes, value: Any, entry: ModelEntry = MODEL) -> tuple[Any, bool]:
    async def compute() -> Any:
        return value

    return asyncio.run(cache.get_or_compute(key, entry, compute))


def test_least_recently_used_answers_go_first_to_stay_within_the_bytes() -> None:
    one = len(answer_of(1000)) + 33  # sys.getsizeof of 1,000 bytes
    cache = ResponseCache(3 * one, get_metrics())
    for key in (b"a", b"b", b"c"):
        run_cached(cache, key, answer_of(1000))
    assert len(cache) == 3 and cache.bytes == 3 * one
    assert run_cached(cache, b"a", None)[1] is True  # a used: b is now the oldest
    run_cached(cache, b"d", answer_of(1000))
    assert run_cached(cache, b"b", answer_of(1000))[1] is False  # evicted (and now back, in c's place)
    assert [run_cached(cache, k, None)[1] for k in (b"a", b"d", b"b")] == [True, True, True]
    assert cache.bytes <= cache.max_bytes and len(cache) == 3
    # an answer larger than the whole cache is answered, not kept, and evicts nothing
    value, hit = run_cached(cache, b"huge", answer_of(4 * one))
    assert len(value) == 4 * one and not hit and len(cache) == 3 and run_cached(cache, b"huge", b"")[1] is False


def test_identical_requests_at_the_same_moment_are_computed_once_and_a_failure_is_not_kept() -> None:
    cache = ResponseCache(1 << 20, get_metrics())
    calls = 0

    async def slow(fail: bool) -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        if fail:
            raise InvalidInput("not an image")
        return b"the answer"

    async def many(fail: bool) -> list[Any]:
        requests = [cache.get_or_compute(b"key", MODEL, lambda: slow(fail)) for _ in range(64)]
        return await asyncio.gather(*requests, return_exceptions=True)

    failed = asyncio.run(many(fail=True))
    assert calls == 1 and len(cache) == 0
    assert all(isinstance(e, InvalidInput) and e.message == "not an image" for e in failed)  # each got the error
    answered = asyncio.run(many(fail=False))
    assert calls == 2 and len(cache) == 1
    assert answered == [(b"the answer", False)] + [(b"the answer", True)] * 63
    assert all(value is answered[0][0] for value, _ in answered)  # the one object, stored once


def test_a_request_that_shares_an_answer_is_told_so_whatever_the_outcome() -> None:
    """Of 8 identical requests at once, 7 take the first's computation: each of those 7 is told it shares the answer
    (a canary leaves it out of its window), when it fails as when it succeeds, and so is a later stored hit."""
    told: list[int] = []
    cache = ResponseCache(1 << 20, get_metrics(), shared=lambda: told.append(1))

    async def slow(fail: bool) -> bytes:
        await asyncio.sleep(0.05)
        if fail:
            raise InvalidInput("not an image")
        return b"the answer"

    async def many(fail: bool) -> int:
        told.clear()
        requests = [cache.get_or_compute(b"shared", MODEL, lambda: slow(fail)) for _ in range(8)]
        await asyncio.gather(*requests, return_exceptions=True)
        return len(told)

    assert asyncio.run(many(fail=True)) == 7
    assert asyncio.run(many(fail=False)) == 7
    assert asyncio.run(many(fail=False)) == 8  # all stored hits now


def test_a_cancelled_waiter_cancels_nothing_and_a_cancelled_computation_hands_over() -> None:
    told: list[int] = []
    cache = ResponseCache(1 << 20, get_metrics(), shared=lambda: told.append(1))
    calls = 0

    async def slow() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return b"the answer"

    async def main() -> tuple[Any, Any]:
        first = asyncio.ensure_future(cache.get_or_compute(b"k", MODEL, slow))
        waiter = asyncio.ensure_future(cache.get_or_compute(b"k", MODEL, slow))
        await asyncio.sleep(0.01)
        waiter.cancel()
        answered = await first
        # the request computing goes away: the one waiting computes instead, and is answered
        computing = asyncio.ensure_future(cache.get_or_compute(b"other", MODEL, slow))
        patient = asyncio.ensure_future(cache.get_or_compute(b"other", MODEL, slow))
        await asyncio.sleep(0.01)
        computing.cancel()
        return answered, await patient

    answered, patient = asyncio.run(main())
    assert answered == (b"the answer", False) and patient == (b"the answer", False)
    assert calls == 3 and len(cache) == 2
    assert told == []  # it computed its own answer: a canary counts it


def test_dropping_a_version_empties_its_entries_only_and_keeps_none_computing_then() -> None:
    cache = ResponseCache(1 << 20, get_metrics())
    other = ModelEntry("lenet5", 2)
    run_cached(cache, b"a", answer_of(10))
    run_cached(cache, b"b", answer_of(10))
    run_cached(cache, b"c", answer_of(10), other)
    assert cache.drop("lenet5", 1) == 2
    assert len(cache) == 1 and run_cached(cache, b"c", None, other)[1] is True

    async def released_meanwhile() -> bytes:
        cache.released(other)  # its version goes while this answer is computed (a loader thread, in the service)
        return b"late"

    asyncio.run(cache.get_or_compute(b"d", other, released_meanwhile))
    assert len(cache) == 0 and cache.bytes == 0


# --- the real runtime: LeNet-5's graph behind the Classifier and the Open Inference Protocol's handler -----


def cached_runtime(make_store: StoreFactory, make_runtime: RuntimeFactory, **settings: Any) -> Runtime:
    runtime = make_runtime(make_store(lenet5=[1]), response_cache_mb=8, max_batch_size=64, **settings)
    runtime.control.reconcile()
    return runtime


def inferences(runtime: Runtime) -> list[int]:
    """The size of each batch the version runs from now on (the ``batch`` hook, as the metrics see it)."""
    sizes: list[int] = []

    @runtime.hooks.batch.subscribe
    def batch(entry: ModelEntry, stats: BatchStats) -> None:
        sizes.append(stats.size)

    return sizes


def classify(runtime: Runtime, files: list[bytes], k: int = 5, min_confidence: float | None = None) -> Any:
    async def run() -> tuple[Any, str | None]:
        record = RequestRecord()
        return await runtime.classifier.classify("lenet5", None, files, k, min_confidence, record), record.cache

    return asyncio.run(run())


def test_classify_hits_return_the_first_answer_without_inference(
    make_store: StoreFactory, make_runtime: RuntimeFactory
) -> None:
    runtime = cached_runtime(make_store, make_runtime)
    sizes = inferences(runtime)
    files, _ = held_out_drawings(3)
    first, outcome = classify(runtime, files[:1])
    assert outcome == "miss" and sizes == [1]
    again, outcome = classify(runtime, files[:1])
    assert outcome == "hit" and again is first and sizes == [1]
    # each parameter that changes the answer is another entry: computed again
    assert classify(runtime, files[:1], k=3)[1] == "miss"
    assert classify(runtime, files[:1], min_confidence=0.99)[1] == "miss"
    assert classify(runtime, files[:2])[1] == "miss"
    assert classify(runtime, files[1:2])[1] == "miss"
    assert sizes == [1, 1, 1, 2, 1]
    # a bad body is refused, every time (not kept)
    for _ in range(2):
        with pytest.raises(InvalidInput):
            classify(runtime, [b"not an image"])


def test_64_identical_concurrent_requests_run_one_inference(
    make_store: StoreFactory, make_runtime: RuntimeFactory
) -> None:
    runtime = cached_runtime(make_store, make_runtime)
    sizes = inferences(runtime)
    files, _ = held_out_drawings(1)

    async def many() -> list[Any]:
        async def one() -> tuple[Any, str | None]:
            record = RequestRecord()
            return await runtime.classifier.classify("lenet5", None, list(files), 5, None, record), record.cache

        return await asyncio.gather(*(one() for _ in range(64)))

    answered = asyncio.run(many())
    assert sizes == [1]  # one image through the graph, once
    assert sorted(outcome for _, outcome in answered) == ["hit"] * 63 + ["miss"]
    assert all(classified is answered[0][0] for classified, _ in answered)


def test_unloading_the_version_empties_its_entries(make_store: StoreFactory, make_runtime: RuntimeFactory) -> None:
    runtime = cached_runtime(make_store, make_runtime)
    cache = runtime.classifier.cache
    assert cache is not None
    files, _ = held_out_drawings(4)
    for file in files:
        classify(runtime, [file])
    assert len(cache) == 4 and cache.bytes > 0
    entry = runtime.repository.serving("lenet5")
    assert entry is not None
    runtime.repository.unload(entry)  # fires `released`, as the lifecycle's and the residency's unloads do
    assert len(cache) == 0 and cache.bytes == 0


def test_the_protocol_handler_caches_by_tensor_and_outputs_asked(
    make_store: StoreFactory, make_runtime: RuntimeFactory
) -> None:
    runtime = cached_runtime(make_store, make_runtime)
    oip = OipHandler(runtime.classifier, runtime.control)
    sizes = inferences(runtime)
    files, _ = held_out_drawings(2)

    def infer(inputs: list[Tensor], requested: list[RequestedOutput]) -> tuple[list[Tensor], str | None]:
        async def run() -> tuple[list[Tensor], str | None]:
            record = RequestRecord()
            with await oip.lease("lenet5") as entry:
                return await oip.infer(entry, inputs, requested, record), record.cache

        return asyncio.run(run())

    encoded = Tensor("image_bytes", "BYTES", [1], np.array(files[:1], dtype=object))
    top3 = [RequestedOutput("probabilities", classification=3)]
    first, outcome = infer([encoded], top3)
    assert outcome == "miss" and sizes == [1]
    again, outcome = infer([Tensor("image_bytes", "BYTES", [1], np.array(files[:1], dtype=object))], top3)
    assert outcome == "hit" and again is first and sizes == [1]
    assert infer([encoded], [RequestedOutput("probabilities", classification=2)])[1] == "miss"
    logits, outcome = infer([encoded], [RequestedOutput("logits")])
    assert outcome == "miss" and logits[0].data.base is None  # its own array, not a view holding its batch's
    other = Tensor("image_bytes", "BYTES", [1], np.array(files[1:], dtype=object))
    assert infer([other], top3)[1] == "miss"
    pixels = np.zeros((1, 32, 32, 1), np.uint8)
    assert infer([Tensor("images", "UINT8", [1, 32, 32, 1], pixels)], [])[1] == "miss"
    assert infer([Tensor("images", "UINT8", [1, 32, 32, 1], pixels.copy())], [])[1] == "hit"
    assert sizes == [1, 1, 1, 1, 1]
    # the same image through /classify is another front end's answer (another shape): not shared
    assert classify(runtime, files[:1])[1] == "miss"
    # an error stays an error
    for _ in range(2):
        with pytest.raises(InvalidInput, match="Unknown output"):
            infer([encoded], [RequestedOutput("nothing")])
