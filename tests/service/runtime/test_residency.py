"""MODEL_CONTROL=on-demand's residency in-process: what a request waits for, what the budget counts, what an
eviction may take, on real LeNet-5 graphs (issue #34's defects 1, 2, 4, 5, 6, 8, 9, 10 and 11)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest

import service.runtime.repository as repository_module
from service.errors import ModelNotReady, ServiceError
from service.runtime.entry import ModelEntry
from service.runtime.residency import BudgetExhausted, ColdStart, Residency
from service.server import Runtime
from service.store.layout import StoredVersion

from .harness import MiB, RuntimeFactory, StoreFactory, signalled

DIGIT = np.zeros((1, 32, 32, 1), np.uint8)
ON_DEMAND = {"model_control": "on-demand"}


async def classify(runtime: Runtime, name: str, version: int | None = None) -> ModelEntry:
    with await runtime.classifier.acquire(name, version) as entry:
        assert entry.batcher is not None
        await entry.batcher.infer(DIGIT)
        return entry


def test_a_model_loaded_for_waiting_requests_is_not_evicted_before_they_lease_it(
    make_store: StoreFactory, make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 1: alpha's load ends and beta's, queued behind it, starts at once on the residency thread; the
    event loop is held for a moment there, so beta plans its room before alpha's waiter has leased alpha."""
    runtime = make_runtime(make_store(alpha=[1], beta=[1]), memory_budget="150MiB", **ON_DEMAND)
    repository = runtime.repository
    loads: Counter[str] = Counter()
    real_load = repository.load
    loop: asyncio.AbstractEventLoop | None = None

    def load(stored: StoredVersion, signature: Any) -> ModelEntry:
        loads[stored.name] += 1
        entry = real_load(stored, signature)
        if stored.name == "alpha":
            assert loop is not None
            loop.call_soon_threadsafe(time.sleep, 0.5)  # before the load's result reaches its waiter
        return entry

    monkeypatch.setattr(repository, "load", load)

    async def main() -> list[ModelEntry]:
        nonlocal loop
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(classify(runtime, "alpha"))
        await asyncio.sleep(0)  # alpha's load is asked for first
        return await asyncio.gather(first, classify(runtime, "beta"))

    answered = asyncio.run(main())
    assert [entry.name for entry in answered] == ["alpha", "beta"]
    assert loads == {"alpha": 1, "beta": 1}  # nobody's load was thrown away before it answered


def test_requests_without_a_version_follow_the_policy_whatever_was_asked_before(
    make_store: StoreFactory, make_runtime: RuntimeFactory
) -> None:
    """Defect 2: version 1 asked for by name first; requests without a version must still get the policy's
    version 2 (config.pbtxt: Triton's default, the latest one)."""
    runtime = make_runtime(make_store(lenet=[1, 2]), memory_budget="1GiB", **ON_DEMAND)

    async def main() -> list[int]:
        asked = [await classify(runtime, "lenet", 1)]
        asked += [await classify(runtime, "lenet") for _ in range(3)]
        asked += [await classify(runtime, "lenet", 1)]
        return [entry.version for entry in asked]

    assert asyncio.run(main()) == [1, 2, 2, 2, 1]


def test_an_explanation_graph_takes_room_in_the_budget(make_store: StoreFactory, make_runtime: RuntimeFactory) -> None:
    """Defect 4: a Grad-CAM opens the network a second time; the budget counts it, and makes room for it."""
    runtime = make_runtime(make_store(alpha=[1], beta=[1]), memory_budget="210MiB", **ON_DEMAND)
    repository = runtime.repository
    residency = runtime.residency
    assert isinstance(residency, Residency)

    async def main() -> int:
        await classify(runtime, "beta")
        await classify(runtime, "alpha")
        before = residency.used()
        with await runtime.classifier.acquire("alpha") as entry:
            graph = await repository.gradcams.get(entry)
            await graph.batcher.infer((DIGIT, np.array([-1])))
        return before

    before = asyncio.run(main())
    assert before == 200 * MiB
    assert residency.resident["alpha"].cost > 110 * MiB  # its explanation graph holds LeNet-5's features again
    assert set(residency.resident) == {"alpha"}  # beta made room for it
    assert residency.used() <= residency.budget


def test_an_explanation_graph_that_fails_to_open_is_not_charged_however_often_asked(
    make_store: StoreFactory, make_runtime: RuntimeFactory
) -> None:
    """A Grad-CAM whose explain.onnx cannot be opened is a 503 each time; the room counted for it before it opened
    is given back each time, so the model costs what it did (the count grew by a graph per request)."""
    store = make_store(alpha=[1])
    runtime = make_runtime(store, memory_budget="1GiB", **ON_DEMAND)
    residency = runtime.residency
    assert isinstance(residency, Residency)

    async def main() -> list[BaseException]:
        await classify(runtime, "alpha")
        (store.model_dir("alpha") / "1" / "explain.onnx").write_bytes(b"not an ONNX graph")
        failures = []
        for _ in range(3):
            with await runtime.classifier.acquire("alpha") as entry:
                with pytest.raises(ModelNotReady) as raised:
                    await runtime.repository.gradcams.get(entry)
                failures.append(raised.value)
        return failures

    failures = asyncio.run(main())
    assert all("Cannot load the explanation graph" in str(f) for f in failures)
    assert residency.resident["alpha"].cost == 100 * MiB == residency.used()


def test_an_explanation_graph_whose_requester_went_away_is_kept_and_counted_once(
    make_store: StoreFactory, make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request that began a Grad-CAM's load is cancelled while the graph opens: the load finishes, the graph is
    kept for the next request, which neither opens it nor counts it again."""
    runtime = make_runtime(make_store(alpha=[1]), memory_budget="1GiB", **ON_DEMAND)
    residency, gradcams = runtime.residency, runtime.repository.gradcams
    assert isinstance(residency, Residency)
    opening, go_on, opened = threading.Event(), threading.Event(), []
    real_open = gradcams._open

    def slow_open(*args: Any) -> Any:
        opening.set()
        assert go_on.wait(30)
        opened.append(args[0].version)
        return real_open(*args)

    monkeypatch.setattr(gradcams, "_open", slow_open)

    async def main() -> tuple[int, int]:
        await classify(runtime, "alpha")
        with await runtime.classifier.acquire("alpha") as entry:
            first = asyncio.create_task(gradcams.get(entry))
            await signalled(opening)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            counted = residency.resident["alpha"].cost
            go_on.set()
            graph = await gradcams.get(entry)  # waits for the load the cancelled request began
            assert await gradcams.get(entry) is graph
            await graph.batcher.infer((DIGIT, np.array([-1])))
        return counted, residency.resident["alpha"].cost

    counted, after = asyncio.run(main())
    assert opened == [1] and after == counted > 100 * MiB


def test_an_explanation_graph_whose_version_was_released_while_it_loaded_is_a_503_and_closed(
    make_store: StoreFactory, make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version is released while its Grad-CAM graph opens: the graph is closed, not kept for a version that is
    gone, and the request that waited for it gets Stranded (503, send again), not a 500 from a closed batcher."""
    runtime = make_runtime(make_store(alpha=[1]), memory_budget="1GiB", **ON_DEMAND)
    gradcams = runtime.repository.gradcams
    opening, go_on, opened = threading.Event(), threading.Event(), []
    real_open = gradcams._open

    def slow_open(*args: Any) -> Any:
        opening.set()
        assert go_on.wait(30)
        opened.append(real_open(*args))
        return opened[-1]

    monkeypatch.setattr(gradcams, "_open", slow_open)

    async def main() -> BaseException:
        await classify(runtime, "alpha")
        with await runtime.classifier.acquire("alpha") as entry:
            waiting = asyncio.create_task(gradcams.get(entry))
            await signalled(opening)
            await asyncio.to_thread(gradcams.release, entry)  # as the lifecycle's thread does
            go_on.set()
            with pytest.raises(ServiceError) as raised:
                await waiting
            return raised.value

    refused = asyncio.run(main())
    assert isinstance(refused, ServiceError) and refused.status_code == 503 and refused.retry_after == 1
    assert "unloaded while its explanation graph loaded" in refused.message
    assert gradcams.loaded == {} and opened and opened[0].batcher._closed


def test_a_request_that_arrives_as_the_explanation_graph_finishes_loading_gets_it(
    make_store: StoreFactory, make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second request runs in the loop turn where the load has ended: it gets the graph the first one gets, not
    a Stranded 503 (nothing was unloaded)."""
    runtime = make_runtime(make_store(alpha=[1]), memory_budget="1GiB", **ON_DEMAND)
    gradcams = runtime.repository.gradcams
    real_open, release = gradcams._open, threading.Event()
    monkeypatch.setattr(gradcams, "_open", lambda *args: (release.wait(30), real_open(*args))[1])

    async def main() -> tuple[Any, Any]:
        await classify(runtime, "alpha")
        with await runtime.classifier.acquire("alpha") as entry:
            first = asyncio.create_task(gradcams.get(entry))
            await asyncio.sleep(0.01)
            (loading,) = gradcams._loading.values()
            release.set()  # held until seen under way: it ends while the second request waits for it

            async def second() -> Any:
                while not loading.done():  # a step of another request, queued as the load ends
                    await asyncio.sleep(0)
                return await gradcams.get(entry)

            return await asyncio.gather(first, second())

    got_first, got_second = asyncio.run(main())
    assert got_second is got_first and gradcams.loaded == {("alpha", 1): got_first}


def test_a_load_measured_beside_other_work_does_not_inflate_the_model_for_good(
    make_store: StoreFactory, make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 5: while alpha loads, something else grows the worker by 400 MiB (a decode, another graph's load);
    its cost stays its export's estimate, and after an eviction it loads again in a 300 MiB budget."""
    runtime = make_runtime(make_store(alpha=[1]), memory_budget="300MiB", **ON_DEMAND)
    residency = runtime.residency
    assert isinstance(residency, Residency)
    readings = iter([0, 400 * MiB])  # before and after alpha's first load
    monkeypatch.setattr(repository_module, "resident_bytes", lambda: next(readings, 0))

    asyncio.run(classify(runtime, "alpha"))
    assert residency.resident["alpha"].grown == 400 * MiB  # measured and shown, not counted
    assert residency.resident["alpha"].cost == 100 * MiB
    assert residency.evict("alpha", "pressure")
    assert asyncio.run(classify(runtime, "alpha")).version == 1
    assert residency.used() == 100 * MiB


def test_a_version_that_failed_to_load_is_not_charged(make_store: StoreFactory, make_runtime: RuntimeFactory) -> None:
    """Defect 6: of the two versions its policy serves, version 1 cannot be opened (its files are whole, its graph
    is not ONNX): only version 2 counts."""
    store = make_store(alpha=[1, 2], policy="latest: { num_versions: 2 }")
    broken = store.model_dir("alpha") / "1"
    (broken / "model.onnx").write_bytes(b"not an ONNX graph")
    metadata = json.loads((broken / "metadata.json").read_text())
    metadata["onnx"]["sha256"] = hashlib.sha256(b"not an ONNX graph").hexdigest()
    (broken / "metadata.json").write_text(json.dumps(metadata))
    runtime = make_runtime(store, memory_budget="1GiB", **ON_DEMAND)
    repository = runtime.repository

    assert asyncio.run(classify(runtime, "alpha")).version == 2
    assert repository.versions["alpha"][1].status == "failed"
    assert isinstance(runtime.residency, Residency) and runtime.residency.used() == 100 * MiB


def test_an_eviction_whose_unload_fails_still_frees_its_room(
    make_store: StoreFactory, make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 8: the batcher's shutdown times out during an eviction: the model is gone all the same, its cost
    leaves the budget, and the next load fits."""
    runtime = make_runtime(make_store(alpha=[1], beta=[1]), memory_budget="150MiB", **ON_DEMAND)
    repository = runtime.repository
    residency = runtime.residency
    assert isinstance(residency, Residency)
    entry = asyncio.run(classify(runtime, "alpha"))
    assert entry.batcher is not None

    def stuck(timeout: float = 10.0) -> None:
        raise TimeoutError("the batcher did not stop")

    monkeypatch.setattr(entry.batcher, "shutdown", stuck)
    assert residency.evict("alpha", "pressure")
    assert "alpha" not in residency.resident and "alpha" not in repository.versions
    assert residency.used() == 0
    assert asyncio.run(classify(runtime, "beta")).name == "beta"


def test_the_idle_sweep_outlives_a_failed_eviction(
    make_store: StoreFactory, make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 8: an error in one idle sweep must not end the residency's thread."""
    runtime = make_runtime(make_store(alpha=[1]), memory_budget="1GiB", idle_unload_s=1, **ON_DEMAND)
    residency = runtime.residency
    assert isinstance(residency, Residency)
    sweeps: list[float] = []

    def sweep() -> None:
        sweeps.append(time.monotonic())
        if len(sweeps) == 1:
            raise RuntimeError("an eviction went wrong")

    monkeypatch.setattr(residency, "evict_idle", sweep)
    runtime.start()
    try:
        deadline = time.monotonic() + 10
        while len(sweeps) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        residency.shutdown()
    assert len(sweeps) >= 3


def test_a_cold_start_answers_before_the_request_times_out(
    make_store: StoreFactory, make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 9: a load longer than the time the request has left (REQUEST_TIMEOUT_S, or a gRPC deadline) answers
    503 with Retry-After before the request's own time-out would answer 504; the load goes on."""
    runtime = make_runtime(make_store(alpha=[1]), memory_budget="1GiB", cold_start_timeout_s=60, **ON_DEMAND)
    repository = runtime.repository
    real_load, release = repository.load, threading.Event()

    def slow_load(stored: StoredVersion, signature: Any) -> ModelEntry:
        release.wait(30)  # longer than the request has: held until its 503 is in
        return real_load(stored, signature)

    monkeypatch.setattr(repository, "load", slow_load)

    from service.runtime.deadline import request_deadline

    async def main() -> tuple[float, ServiceError]:
        request_deadline.set(asyncio.get_running_loop().time() + 3.0)  # as the HTTP time-out middleware sets it
        started = time.perf_counter()
        with pytest.raises(ColdStart) as refused:
            await runtime.classifier.acquire("alpha")
        return time.perf_counter() - started, refused.value

    waited, error = asyncio.run(main())
    release.set()
    assert error.status_code == 503 and error.retry_after and "still loading" in error.message
    # 2.7 s: the request's own time-out left a tenth for the 503 to travel (measured from the message, as the wall
    # clock adds whatever a loaded machine's scheduler adds)
    wait = float(error.message.split("still loading after ")[1].split(" s")[0])
    assert 2.5 < wait < 3.0 and waited < wait + 2, (wait, waited)
    deadline = time.monotonic() + 20
    while repository.serving("alpha") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert repository.serving("alpha") is not None


def test_on_demand_says_why_a_model_cannot_load(make_store: StoreFactory, make_runtime: RuntimeFactory) -> None:
    """Defect 10: a store model whose config.pbtxt is wrong answers 503 with that reason, not 404 'unknown'."""
    store = make_store(alpha=[1])
    (store.model_dir("alpha") / "config.pbtxt").write_text("version_policy: { newest: { } }\n")
    runtime = make_runtime(store, memory_budget="1GiB", **ON_DEMAND)

    with pytest.raises(ModelNotReady) as refused:
        asyncio.run(classify(runtime, "alpha"))
    assert refused.value.status_code == 503
    assert "config.pbtxt" in refused.value.message and "unknown version_policy 'newest'" in refused.value.message


def test_oip_metadata_of_a_store_model_loads_it(
    make_store: StoreFactory, make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 10: GET /v2/models/NAME (and gRPC ModelMetadata) for a model of the store that is not resident
    loads it, as an inference would, instead of answering 404."""
    from service.frontends.v2.handler import OipHandler

    runtime = make_runtime(make_store(alpha=[1]), memory_budget="1GiB", **ON_DEMAND)
    repository, control = runtime.repository, runtime.control
    handler = OipHandler(runtime.classifier, control)
    metadata = asyncio.run(handler.metadata("alpha"))
    assert metadata["name"] == "alpha" and metadata["versions"] == ["1"]
    assert repository.serving("alpha") is not None


def test_no_model_is_evicted_for_a_load_that_cannot_fit_anyway(
    make_store: StoreFactory, make_runtime: RuntimeFactory
) -> None:
    """Defect 11: pinned alpha (100 MiB) and idle beta (100) in 300 MiB; gamma needs 250: even without beta it
    cannot fit, so beta stays, and gamma is refused with the reason."""
    store = make_store(alpha=[1], beta=[1], gamma=[1], estimates={"gamma": 250})
    runtime = make_runtime(store, memory_budget="300MiB", pinned="alpha", **ON_DEMAND)
    residency = runtime.residency
    assert isinstance(residency, Residency)

    async def main() -> None:
        await classify(runtime, "alpha")
        await classify(runtime, "beta")
        await classify(runtime, "gamma")

    with pytest.raises(BudgetExhausted, match="pinned models \\(alpha\\)"):
        asyncio.run(main())
    assert set(residency.resident) == {"alpha", "beta"}


def test_a_stopping_worker_starts_no_more_loads(make_store: StoreFactory, make_runtime: RuntimeFactory) -> None:
    """Once the worker stops, a load queued before (a cold start, a warm model at start) is refused, not run into
    an entry nothing would close."""
    runtime = make_runtime(make_store(alpha=[1]), memory_budget="1GiB", **ON_DEMAND)
    residency = runtime.residency
    assert isinstance(residency, Residency)
    residency.shutdown()
    with pytest.raises(ModelNotReady, match="the server is stopping"):
        residency.load("alpha", None, "request")
    assert "alpha" not in runtime.repository.versions


def test_a_load_waiting_for_room_as_the_worker_stops_loads_nothing(
    make_store: StoreFactory, make_runtime: RuntimeFactory
) -> None:
    """beta waits for the room alpha holds while it answers; the worker stops, alpha's request ends: beta is
    refused, not loaded (after the repository closed, its entry would outlive the worker)."""
    runtime = make_runtime(make_store(alpha=[1], beta=[1]), memory_budget="150MiB", cold_start_timeout_s=60,
                           **ON_DEMAND)  # fmt: skip
    residency = runtime.residency
    assert isinstance(residency, Residency)

    async def main() -> None:
        await classify(runtime, "alpha")
        with await runtime.classifier.acquire("alpha"):
            waiting = asyncio.ensure_future(asyncio.to_thread(residency.load, "beta", None, "request"))
            await asyncio.sleep(0.5)
            assert not waiting.done()  # alpha is busy: no room yet
            residency.shutdown()
        with pytest.raises(ModelNotReady, match="the server is stopping"):
            await waiting

    asyncio.run(main())
    assert "beta" not in runtime.repository.versions and "alpha" in residency.resident


@pytest.mark.parametrize("turns", range(3))
def test_an_explanation_graph_load_cut_off_by_its_event_loop_is_begun_again_on_the_next(
    make_store: StoreFactory, make_runtime: RuntimeFactory, turns: int
) -> None:
    """The event loop of the request that began a Grad-CAM's load ends (a test's asyncio.run) before the load took
    its first step, or during it: the next loop's request gets the graph, not the cancelled load."""
    runtime = make_runtime(make_store(alpha=[1]), memory_budget="1GiB", **ON_DEMAND)
    gradcams = runtime.repository.gradcams

    async def begin() -> None:
        with await runtime.classifier.acquire("alpha") as entry:
            asyncio.get_running_loop().create_task(gradcams.get(entry))
            for _ in range(turns):
                await asyncio.sleep(0)

    async def explain() -> np.ndarray:
        with await runtime.classifier.acquire("alpha") as entry:
            graph = await asyncio.wait_for(gradcams.get(entry), 30)
            return (await graph.batcher.infer((DIGIT, np.array([-1]))))[0]

    asyncio.run(begin())
    assert asyncio.run(explain()).shape[0] == 1


def test_a_load_begun_on_an_event_loop_that_ended_is_begun_again_by_the_next(
    make_store: StoreFactory, make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load still in its thread as its event loop ends never answers that loop: the next loop's request waits for
    a load of its own (queued behind it on the loads' thread), not for one it can never await."""
    runtime = make_runtime(make_store(alpha=[1]), memory_budget="1GiB", **ON_DEMAND)
    repository = runtime.repository
    real_load, loading, release = repository.load, threading.Event(), threading.Event()

    def slow_load(stored: StoredVersion, signature: Any) -> ModelEntry:
        loading.set()
        release.wait(30)
        return real_load(stored, signature)

    monkeypatch.setattr(repository, "load", slow_load)

    async def begin() -> None:
        asyncio.get_running_loop().create_task(classify(runtime, "alpha"))
        await signalled(loading)

    asyncio.run(begin())
    assert repository.serving("alpha") is None  # still loading, its loop gone
    release.set()
    assert asyncio.run(asyncio.wait_for(classify(runtime, "alpha"), 30)).name == "alpha"
