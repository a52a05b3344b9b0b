"""CUDA_GRAPHS: the session that runs each batch shape on its own fixed buffers (what replays a CUDA graph on a GPU),
run here on the CPU's buffers with a real LeNet-5 session; the setting's options, its refusals and its fallback.
The capture itself needs a GPU: tests/gpu."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np
import onnxruntime as ort
import pytest

from service.runtime import cuda, cuda_graphs, session_host
from service.runtime.session import ModelLoadError, load_model
from service.settings import Settings
from service.store.layout import ModelStore
from service.store.tensors import INPUT_NAME, OUTPUT_NAMES

from ...helpers import wait_until


def _lenet5_session(model_store: ModelStore) -> ort.InferenceSession:
    stored = model_store.latest("lenet5")
    assert stored is not None
    return ort.InferenceSession(str(stored.graph), providers=[cuda.CPU])


@pytest.fixture(scope="module")
def lenet5(model_store: ModelStore) -> ort.InferenceSession:
    return _lenet5_session(model_store)


def _digits(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 32, 32, 1), dtype=np.uint8)


def _equal(got: list[np.ndarray], expected: list[np.ndarray]) -> bool:
    return len(got) == len(expected) and all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))


def test_each_shape_answers_as_the_session_does_on_buffers_of_its_own(lenet5: ort.InferenceSession) -> None:
    captured = cuda_graphs.CapturedSession(lenet5, "cpu")
    names = list(OUTPUT_NAMES)
    answers = {}
    for seed, batch in enumerate((1, 3, 8, 3, 1, 8)):
        images = _digits(batch, seed)
        got = captured.run(names, {INPUT_NAME: images})
        assert _equal(got, lenet5.run(names, {INPUT_NAME: images}))
        answers[seed] = (images, got)
    assert captured.graphs == 3  # one per shape, however often it ran
    for images, got in answers.values():  # the answers are the caller's: later runs of a shape leave them alone
        assert _equal(got, lenet5.run(names, {INPUT_NAME: images}))
    graphs = {shape.options.get_run_config_entry(cuda_graphs.GRAPH_ID) for shape in captured._shapes.values()}
    assert graphs == {"0", "1", "2"}  # each shape its own graph
    assert captured.get_inputs()[0].name == INPUT_NAME  # the rest is the session's


def test_every_output_when_none_are_named(lenet5: ort.InferenceSession) -> None:
    captured = cuda_graphs.CapturedSession(lenet5, "cpu")
    images = _digits(2, 7)
    assert _equal(captured.run(None, {INPUT_NAME: images}), lenet5.run(None, {INPUT_NAME: images}))


def test_threads_sharing_a_session_each_get_their_own_answers(lenet5: ort.InferenceSession) -> None:
    """The session host runs one session from a thread per worker: runs of one shape share its buffers."""
    captured = cuda_graphs.CapturedSession(lenet5, "cpu")
    names = list(OUTPUT_NAMES)
    batches = [_digits(b, seed) for seed, b in enumerate([1, 2, 4] * 8)]
    expected = [lenet5.run(names, {INPUT_NAME: images}) for images in batches]
    wrong: list[int] = []

    def work(offset: int) -> None:
        for turn in range(60):
            i = (offset + turn) % len(batches)
            if not _equal(captured.run(names, {INPUT_NAME: batches[i]}), expected[i]):
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(k * 5,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and wrong == []
    assert captured.graphs == 3


class _Watched:
    """The real session, noting the thread of each call that runs it (ONNX Runtime keeps a CUDA graph per thread)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session, self.threads = session, set()

    def __getattr__(self, name: str) -> object:
        found = getattr(self.session, name)
        if name not in ("run", "run_with_iobinding"):
            return found

        def noted(*args: object) -> object:
            self.threads.add(threading.get_ident())
            return found(*args)

        return noted


def test_every_run_of_a_session_is_on_one_thread_of_its_own(lenet5: ort.InferenceSession) -> None:
    watched = _Watched(lenet5)
    captured = cuda_graphs.CapturedSession(watched, "cpu")  # type: ignore[arg-type]
    callers = [threading.Thread(target=captured.run, args=(None, {INPUT_NAME: _digits(b, b)})) for b in (1, 2, 1, 4)]
    for caller in callers:
        caller.start()
        caller.join(timeout=60)
    captured.run(None, {INPUT_NAME: _digits(2, 9)})  # and from this one
    assert len(watched.threads) == 1 and threading.get_ident() not in watched.threads
    assert not {c.ident for c in callers} & watched.threads


def test_a_capture_waits_for_runs_and_runs_wait_for_a_waiting_capture() -> None:
    gate = cuda_graphs.Gate()
    order: list[str] = []
    inside, release = threading.Event(), threading.Event()

    def run(name: str, hold: bool = False) -> None:
        with gate.shared():
            order.append(name)
            if hold:
                inside.set()
                release.wait(10)

    def capture() -> None:
        with gate.exclusive():
            order.append("capture")

    first = threading.Thread(target=run, args=("first", True))
    first.start()
    assert inside.wait(10)
    capturing = threading.Thread(target=capture)
    capturing.start()
    wait_until(lambda: gate._waiting == 1, 10, "the capture waiting on the run in progress")
    later = threading.Thread(target=run, args=("later",))
    later.start()
    later.join(timeout=0.3)
    assert later.is_alive() and order == ["first"]  # a run that came after the capture waits for it
    release.set()
    for thread in (first, capturing, later):
        thread.join(timeout=10)
    assert order == ["first", "capture", "later"]


def test_a_session_without_graphs_waits_out_a_capture(lenet5: ort.InferenceSession) -> None:
    """An explanation's CUDA session where CUDA_GRAPHS=on: its runs share the gate that a capture holds alone."""
    gated = cuda_graphs.GatedSession(lenet5)
    images = _digits(2, 3)
    answers: list[list[np.ndarray]] = []
    with cuda_graphs.GATE.exclusive():
        running = threading.Thread(target=lambda: answers.append(gated.run(None, {INPUT_NAME: images})))
        running.start()
        running.join(timeout=0.3)
        assert running.is_alive() and not answers
    running.join(timeout=30)
    assert len(answers) == 1 and _equal(answers[0], lenet5.run(None, {INPUT_NAME: images}))


@pytest.mark.parametrize("wrapper", ["captured", "gated"])
def test_a_dropped_session_is_freed_only_while_no_capture_runs(model_store: ModelStore, wrapper: str) -> None:
    """A wrapped session's last reference may go anywhere, on a thread that holds the gate included (a worker's
    unload, an eviction, the batch that finished last): its device memory (the session's, its shapes' buffers) is
    freed once no capture runs, and dropping it waits for nothing."""
    session = _lenet5_session(model_store)  # of its own: its end is watched
    wrapped: cuda_graphs.CapturedSession | cuda_graphs.GatedSession
    if wrapper == "captured":
        wrapped = cuda_graphs.CapturedSession(session, "cpu")
        wrapped.run(None, {INPUT_NAME: _digits(2, 0)})
        (shape,) = wrapped._shapes.values()
        held = [weakref.ref(session), weakref.ref(shape.input), weakref.ref(shape.outputs[0])]
        del shape
    else:
        wrapped = cuda_graphs.GatedSession(session)
        held = [weakref.ref(session)]
    del session
    with cuda_graphs.GATE.exclusive():  # a capture, on the thread where the last reference goes
        del wrapped
        gc.collect()
        time.sleep(0.3)  # the release thread's time to free it, were it not waiting
        assert all(ref() is not None for ref in held)  # still held: freeing it now would fail the capture
    wait_until(lambda: all(ref() is None for ref in held), 10, "the session freed once the capture ended")


def test_a_dropped_session_is_freed_at_once_where_no_capture_runs(model_store: ModelStore) -> None:
    """As an unwrapped session is: a load that follows an unload finds its memory back."""
    session = _lenet5_session(model_store)  # of its own: its end is watched
    alive = weakref.ref(session)
    gated = cuda_graphs.GatedSession(session)
    del session
    assert alive() is not None
    del gated
    assert alive() is None
    with cuda_graphs.GATE.exclusive():  # and the gate is left as it was: a capture still runs alone
        pass


def test_a_shape_whose_capture_failed_leaves_its_graph_id_unused(lenet5: ort.InferenceSession,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """ONNX Runtime may hold a graph for an id whose run then failed: the next shape must not replay it."""
    captured = cuda_graphs.CapturedSession(lenet5, "cpu")
    replay = captured._replay
    failures = iter([RuntimeError("CUDA failure 700: an illegal memory access")])

    def once_failing(shape: object, array: np.ndarray) -> list[np.ndarray]:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return replay(shape, array)  # type: ignore[arg-type]

    monkeypatch.setattr(captured, "_replay", once_failing)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        captured.run(None, {INPUT_NAME: _digits(1, 0)})
    images = _digits(2, 1)
    assert _equal(captured.run(None, {INPUT_NAME: images}), lenet5.run(None, {INPUT_NAME: images}))
    (shape,) = captured._shapes.values()
    assert captured.graphs == 1 and shape.options.get_run_config_entry(cuda_graphs.GRAPH_ID) == "1"


def test_shapes_past_the_limit_run_without_a_graph(lenet5: ort.InferenceSession,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 2)
    captured = cuda_graphs.CapturedSession(lenet5, "cpu")
    names = list(OUTPUT_NAMES)
    for seed, batch in enumerate((1, 2, 5, 6)):
        images = _digits(batch, seed)
        assert _equal(captured.run(names, {INPUT_NAME: images}), lenet5.run(names, {INPUT_NAME: images}))
    assert captured.graphs == 2


def test_the_setting_asks_for_graphs_on_classifier_sessions_only() -> None:
    on = Settings(providers="cuda", cuda_graphs="on")
    classifier = cuda.providers_for(on, "fp16", graphs=True)
    assert classifier[0][1]["enable_cuda_graph"] == "1" and cuda_graphs.wanted(classifier) == 0  # type: ignore[index]
    explanation = cuda.providers_for(on, "fp32")  # Grad-CAM's sessions: any shape, no graphs
    assert "enable_cuda_graph" not in explanation[0][1] and cuda_graphs.wanted(explanation) is None  # type: ignore[index]
    off = cuda.providers_for(Settings(providers="cuda"), "fp16", graphs=True)
    assert "enable_cuda_graph" not in off[0][1] and cuda_graphs.wanted(off) is None  # type: ignore[index]
    assert cuda.providers_for(Settings(providers="cpu", cuda_graphs="on"), "fp32", graphs=True) == [cuda.CPU]


def test_graphs_without_fixed_shapes_are_refused_with_what_to_set(model_store: ModelStore) -> None:
    stored = model_store.latest("lenet5")
    assert stored is not None
    with pytest.raises(ModelLoadError) as raised:
        load_model(model_store, stored, Settings(providers="cuda", cuda_graphs="on", batch_sizes="any"))
    assert "BATCH_SIZES=any" in str(raised.value) and "CUDA_GRAPHS=off" in str(raised.value)


def test_a_session_the_cpu_took_runs_as_it_is(model_store: ModelStore) -> None:
    """PROVIDERS=auto with CUDA_GRAPHS=on where CUDA does not load: the CPU's session, no graphs, no buffers."""
    stored = model_store.latest("lenet5")
    assert stored is not None
    providers = cuda.providers_for(Settings(providers="cuda", cuda_graphs="on"), "fp32", graphs=True)
    session = session_host.inference_session(str(stored.graph), ort.SessionOptions(), providers)
    if cuda.gpu_count() == 0:  # this machine: ONNX Runtime moved it to the CPU
        assert session.get_providers()[0] == cuda.CPU and isinstance(session, ort.InferenceSession)
    else:
        assert isinstance(session, cuda_graphs.CapturedSession)
