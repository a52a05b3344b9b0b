"""The repository in-process: the table a request is routed and leased by, what it refuses and why, the drain
of an unload, and the hooks that let what watches it attach."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.errors import InvalidInput, ModelNotFound, ModelNotReady, ServiceError
from service.runtime.entry import ModelEntry
from service.runtime.hooks import Hooks
from service.runtime.repository import Repository
from service.settings import Settings

from ...helpers import wait_until
from ..pictures import held_out_drawings
from .harness import RuntimeFactory, StoreFactory


@pytest.fixture
def repository(make_store: StoreFactory) -> Repository:
    store = make_store(lenet=[1, 2], policy="all: { }")
    settings = Settings(model_store=store.root, workers=1, max_batch_size=4, warmup_batches=(1,), intra_op_threads=1)
    return Repository(settings, Hooks())


def load_all(repository: Repository) -> list[ModelEntry]:
    return [repository.load(stored, ()) for stored in repository.store.versions("lenet")]


def test_a_request_is_routed_to_the_highest_ready_version_unless_it_names_one(repository: Repository) -> None:
    one, two = load_all(repository)
    assert (one.status, two.status) == ("ready", "ready")
    assert repository.get("lenet") is two and repository.get("lenet", 1) is one
    assert repository.default_model == "lenet" and repository.get(None) is two
    with repository.lease("lenet", 1) as leased:
        assert leased is one and one.in_flight == 1 and two.in_flight == 0
    assert one.in_flight == 0
    for entry in (one, two):
        repository.unload(entry)


@pytest.mark.parametrize(
    ("name", "version", "error", "says"),
    [
        ("", None, InvalidInput, "Empty model name: use one of lenet"),
        ("../lenet", None, InvalidInput, "Invalid model name '../lenet': use one of lenet"),
        ("alexnet", None, ModelNotFound, "alexnet"),
        ("lenet", 3, ModelNotFound, "lenet version 1, lenet version 2"),
    ],
)
def test_what_a_request_cannot_have_is_refused_with_what_would_be_right(
    repository: Repository, name: str, version: int | None, error: type[ServiceError], says: str
) -> None:
    entries = load_all(repository)
    with pytest.raises(error) as refused:
        repository.lease(name, version)
    assert says in refused.value.message
    assert all(entry.in_flight == 0 for entry in entries)  # a refused request holds nothing
    for entry in entries:
        repository.unload(entry)


def test_a_version_that_fails_to_load_is_listed_with_its_reason_and_the_others_serve(
    repository: Repository,
) -> None:
    (repository.store.model_dir("lenet") / "1" / "model.onnx").write_bytes(b"not a graph")
    one, two = load_all(repository)
    assert one.status == "failed" and one.reason is not None and "model.onnx" in one.reason
    with pytest.raises(ModelNotReady) as refused:
        repository.lease("lenet", 1)
    assert "version 1 is not available" in refused.value.message
    assert repository.get("lenet") is two
    assert repository.state()["models"]["lenet"]["1"]["status"] == "failed"
    repository.unload(two)


def test_an_unload_waits_for_the_requests_that_hold_the_version(repository: Repository) -> None:
    _, two = load_all(repository)
    unloaded = threading.Event()
    with repository.lease("lenet", 2) as leased:
        thread = threading.Thread(target=lambda: (repository.unload(leased), unloaded.set()))
        thread.start()
        wait_until(lambda: two.status == "draining", 30, "version 2 draining")
        assert two.status == "draining" and not unloaded.is_set()  # out of routing, not released under us
        with pytest.raises(ModelNotFound):
            repository.lease("lenet", 2)
        assert repository.get("lenet").version == 1  # new requests go to the version that stays
    thread.join(10)
    assert unloaded.is_set() and two.model is None and 2 not in repository.versions["lenet"]


def test_the_hooks_see_loads_batches_and_releases_without_the_repository_knowing_who_watches(
    make_store: StoreFactory,
) -> None:
    store = make_store(lenet=[1])
    settings = Settings(model_store=store.root, workers=1, max_batch_size=4, warmup_batches=(1,), intra_op_threads=1)
    hooks, seen = Hooks(), []
    hooks.ready.subscribe(lambda entry, seconds: seen.append(("ready", entry.version, entry.status, seconds > 0)))
    hooks.changed.subscribe(lambda entry, action, outcome, _: seen.append((action, entry.version, outcome)))
    hooks.batch.subscribe(lambda entry, stats: seen.append(("batch", entry.version, stats.size, stats.requests)))
    hooks.released.subscribe(lambda entry: seen.append(("released", entry.version, entry.status)))
    repository = Repository(settings, hooks)
    (entry,) = [repository.load(stored, ()) for stored in repository.store.versions("lenet")]

    async def infer() -> None:
        assert entry.batcher is not None
        await entry.batcher.infer(np.zeros((3, 32, 32, 1), np.uint8))

    asyncio.run(infer())
    repository.unload(entry)
    assert seen == [
        ("ready", 1, "loading", True),  # before it takes requests: a watcher is in place for its first batch
        ("load", 1, "success"),
        ("batch", 1, 3, 1),
        ("released", 1, "draining"),
        ("unload", 1, "success"),
    ]


def test_a_version_its_watchers_cannot_take_is_failed_not_served_unwatched(make_store: StoreFactory) -> None:
    store = make_store(lenet=[1])
    settings = Settings(model_store=store.root, workers=1, max_batch_size=4, warmup_batches=(1,), intra_op_threads=1)
    hooks = Hooks()

    def broken(entry: ModelEntry, seconds: float) -> None:
        raise KeyError("confidence")

    hooks.ready.subscribe(broken)
    repository = Repository(settings, hooks)
    (entry,) = [repository.load(stored, ()) for stored in repository.store.versions("lenet")]
    assert entry.status == "failed" and entry.reason == "KeyError: 'confidence'"
    assert entry.batcher is None and entry.model is None
    with pytest.raises(ModelNotReady) as refused:
        repository.lease("lenet")
    assert "KeyError" in refused.value.message


def test_a_watcher_that_fails_on_an_answer_is_logged_and_the_answer_stands(
    make_store: StoreFactory, make_runtime: RuntimeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscriber of ``answered`` or ``batch`` that raises (a canary's candidate with odd metadata, say) is
    logged; the request it watched is still answered and the subscribers after it still run."""
    store = make_store(lenet=[1])
    settings = Settings(model_store=store.root, workers=1, max_batch_size=4, warmup_batches=(1,), intra_op_threads=1)
    hooks, seen = Hooks(), []

    def broken(*args: object) -> None:
        raise AttributeError("'NoneType' object has no attribute 'get'")

    hooks.batch.subscribe(broken)
    hooks.batch.subscribe(lambda entry, stats: seen.append(stats.size))
    repository = Repository(settings, hooks)
    (entry,) = [repository.load(stored, ()) for stored in repository.store.versions("lenet")]
    assert entry.batcher is not None
    outputs = asyncio.run(entry.batcher.infer(np.zeros((2, 32, 32, 1), np.uint8)))
    assert outputs[0].shape == (2, 10) and seen == [2]
    assert "broken failed; what it watched goes on" in caplog.text

    # answered: on the request's own path (Classifier.classify), after the batch
    caplog.clear()
    runtime = make_runtime(make_store(lenet5=[1]))
    runtime.control.reconcile()
    runtime.hooks.answered.subscribe(broken)
    runtime.hooks.answered.subscribe(lambda entry, images, probabilities, seconds: seen.append(len(images)))
    files, _ = held_out_drawings(3)
    classified = asyncio.run(runtime.classifier.classify("lenet5", None, files, 1))
    assert len(classified.answers) == 3 and seen == [2, 3]
    assert "broken failed; what it watched goes on" in caplog.text
