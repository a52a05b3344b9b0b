"""The session host (``SESSION_HOST=shared``): one process holding the sessions every worker runs, fed through
shared memory. Real ONNX Runtime sessions of the exported models, a real host process, real sockets."""

from __future__ import annotations

import gc
import mmap
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pytest

from service.errors import ModelNotReady
from service.runtime import session_host
from service.runtime.session import ModelLoadError, load_model, session_options
from service.settings import Settings
from service.store.host import cpu_count
from service.store.layout import ModelStore, StoredVersion
from service.store.tensors import INPUT_NAME, OUTPUT_NAMES

from ...helpers import gone, wait_until
from .harness import StoreFactory

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def host() -> Iterator[session_host.HostProcess]:
    with session_host.hosted() as started:
        yield started


def _latest(store: ModelStore, name: str) -> StoredVersion:
    stored = store.latest(name)
    assert stored is not None
    return stored


@pytest.fixture
def lenet5(model_store: ModelStore) -> Path:
    return _latest(model_store, "lenet5").graph


def _images(count: int, side: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, side, side, 1), dtype=np.uint8)


def _local(graph: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(graph), session_options(Settings()), providers=CPU)


def _remote(graph: Path, host: session_host.HostProcess, instance: int = 0) -> session_host.RemoteSession:
    spec = session_host.OpenSpec(str(graph), instance, list(CPU), threads=1)
    return session_host.RemoteSession(spec, host.address, host.key)


def _held(host: session_host.HostProcess, graph: Path) -> list[tuple[int, int]]:
    """(instance, connections) of each session the host holds for ``graph``."""
    stats = session_host.host_stats(host.address, host.key)
    return sorted((s["instance"], s["users"]) for s in stats if s["graph"] == str(graph))


def test_a_shared_session_answers_as_the_workers_own(host: session_host.HostProcess, lenet5: Path) -> None:
    remote, local = _remote(lenet5, host), _local(lenet5)
    assert remote.get_providers()[0] == "CPUExecutionProvider"
    assert [(i.name, i.type, i.shape[1:]) for i in remote.get_inputs()] == [(INPUT_NAME, "tensor(uint8)", [32, 32, 1])]
    # a batch of 1 first: the buffers start small (a page at least; LeNet-5's image is a quarter of one), batches of
    # 2 to 4 fill that page, and the 64-image batch then outgrows both (its answers come back through the socket
    # once, and through the grown buffer after)
    for count in (1, 2, 3, 4, 64, 64, 5):
        images = _images(count, seed=count)
        got = remote.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        want = local.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape == (count, 10)
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)


def test_workers_share_one_session_per_instance_and_the_last_to_go_closes_it(
    host: session_host.HostProcess, lenet5: Path
) -> None:
    first, second, other = _remote(lenet5, host), _remote(lenet5, host), _remote(lenet5, host, instance=1)
    assert _held(host, lenet5) == [(0, 2), (1, 1)]
    assert first.host_pid == second.host_pid == host.process.pid
    first.close()  # the host lets go when it reads the connection's end, on a thread of its own
    wait_until(lambda: _held(host, lenet5) == [(0, 1), (1, 1)], 10, "the closed client's hold released")
    del second, other  # dropped, as a worker drops an unloaded version: the references close them
    gc.collect()
    deadline = time.monotonic() + 10
    while _held(host, lenet5) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _held(host, lenet5) == []


def test_concurrent_runs_from_several_connections_keep_their_answers_apart(
    host: session_host.HostProcess, lenet5: Path
) -> None:
    local = _local(lenet5)
    sessions = [_remote(lenet5, host, instance=i % 2) for i in range(4)]

    def run(index: int) -> bool:
        session = sessions[index % 4]
        images = _images(1 + index % 9, seed=index)
        got = session.run(["probabilities"], {INPUT_NAME: images})[0]
        return bool(np.allclose(got, local.run(["probabilities"], {INPUT_NAME: images})[0], rtol=0, atol=1e-6))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(run, range(64)))


def test_a_graph_the_host_cannot_open_fails_the_load_with_its_reason(
    host: session_host.HostProcess, make_store: StoreFactory
) -> None:
    store = make_store(lenet5=[1])
    stored = _latest(store, "lenet5")
    stored.graph.write_bytes(b"not a graph")
    with pytest.raises(ModelLoadError, match=r"ONNX Runtime cannot load .*model\.onnx: .*(INVALID_PROTOBUF|Protobuf)"):
        load_model(store, stored, Settings(providers="cpu"))
    assert [s for s in session_host.host_stats(host.address, host.key) if s["graph"] == str(stored.graph)] == []


def test_a_version_loaded_where_a_host_runs_is_served_from_it(
    host: session_host.HostProcess, model_store: ModelStore
) -> None:
    settings = Settings(providers="cpu", instances="2", workers=2)
    model = load_model(model_store, _latest(model_store, "lenet5"), settings)
    assert model.session_host == host.process.pid
    assert all(isinstance(s, session_host.RemoteSession) for s in model.sessions) and model.instances == 2
    assert model.threads == max(1, cpu_count() // 2)  # the host's sessions share every CPU, not the worker's share
    images = _images(3)
    answers = model.runner(1)(images)
    expected = _local(model.stored.graph).run(list(model.output_names), {INPUT_NAME: images})
    for got, want in zip(answers, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_a_client_without_the_key_is_refused_and_the_host_goes_on(host: session_host.HostProcess, lenet5: Path) -> None:
    with pytest.raises(AuthenticationError):
        Client(host.address, "AF_UNIX", authkey=b"not the key")
    assert _remote(lenet5, host).run(["probabilities"], {INPUT_NAME: _images(2)})[0].shape == (2, 10)


def test_a_host_that_died_is_named_by_the_next_run_as_a_503(lenet5: Path) -> None:
    with session_host.hosted() as started:
        session = _remote(lenet5, started)
        started.process.send_signal(signal.SIGKILL)
        started.process.wait(10)
        with pytest.raises(session_host.SessionHostGone, match="cannot reach the session host: ") as raised:
            session.run(["probabilities"], {INPUT_NAME: _images(1)})
        assert raised.value.status_code == 503 and raised.value.retry_after == 1  # safe to send again


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGSTOP, and wait until every thread of ``process`` has stopped: the signal wakes one of them, which stops the
    rest, and a thread woken meanwhile by a request could still answer it (CI saw a run answered so)."""
    process.send_signal(signal.SIGSTOP)

    def stopped() -> bool:
        tasks = list(Path(f"/proc/{process.pid}/task").iterdir())
        return all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for t in tasks)

    wait_until(stopped, 10, "every thread of the session host stopped")


def test_a_host_that_gives_no_answer_is_killed_and_the_run_answers_503(lenet5: Path) -> None:
    """A host alive but stuck (stopped here; a library's deadlock, a hung device) left every batch thread waiting on
    it for ever, each holding its instance: requests piled up and /readyz said ready. Past the bound the worker kills
    it (its end stops the server, as any end of the host does) and the run answers 503."""
    with session_host.hosted() as started:
        spec = session_host.OpenSpec(str(lenet5), 0, list(CPU), threads=1)
        session = session_host.RemoteSession(spec, started.address, started.key, answer_within=3.0)  # opens too
        assert session.run(["probabilities"], {INPUT_NAME: _images(2)})[0].shape == (2, 10)
        _stop(started.process)
        began = time.monotonic()
        with pytest.raises(session_host.SessionHostGone, match="gave no answer within 3 s") as raised:
            session.run(["probabilities"], {INPUT_NAME: _images(2)})
        assert raised.value.status_code == 503 and time.monotonic() - began < 10
        assert started.process.wait(10) == -signal.SIGKILL
        with pytest.raises(session_host.SessionHostGone, match="cannot reach"):  # no late answer read as this one's
            session.run(["probabilities"], {INPUT_NAME: _images(2)})


def test_a_host_stopped_before_the_handshake_fails_the_open_in_bounded_time_and_is_killed(lenet5: Path) -> None:
    """A worker's first open knows the host's pid from its environment (no reply has named it yet)."""
    with session_host.hosted() as started:
        _stop(started.process)
        try:
            spec = session_host.OpenSpec(str(lenet5), 0, list(CPU), threads=1)
            with pytest.raises(session_host.SessionHostGone, match="gave no answer within 1 s"):
                session_host.RemoteSession(spec, started.address, started.key, answer_within=1.0)
            assert started.process.wait(10) == -signal.SIGKILL
        finally:
            started.process.send_signal(signal.SIGCONT)


def test_the_bound_on_the_hosts_answer_outlasts_any_request() -> None:
    assert session_host.answer_within(Settings()) == 240.0  # four of REQUEST_TIMEOUT_S's 60 s
    assert session_host.answer_within(Settings(request_timeout_s=5)) == 120.0  # never under two minutes


def test_a_broken_connection_is_opened_again_by_the_next_run(host: session_host.HostProcess, lenet5: Path) -> None:
    session, images = _remote(lenet5, host, instance=3), _images(4)
    before = session.run(["probabilities"], {INPUT_NAME: images})[0]
    session._state[0].close()  # the connection ends under the session (as where the host's side of it failed)
    after = session.run(["probabilities"], {INPUT_NAME: images})[0]
    np.testing.assert_array_equal(after, before)
    wait_until(lambda: (3, 1) in _held(host, lenet5), 10, "the old connection released, the new one holding")


def test_a_session_opened_again_is_the_file_the_worker_loaded_or_a_503_that_says_it_changed(
    host: session_host.HostProcess, lenet5: Path, tmp_path: Path
) -> None:
    """A connection breaks after the graph's file was replaced: the host, which let the session go with its last
    user, does not open the new file in its place (it was never verified); the run is a 503 naming the change,
    without Retry-After (the version must be loaded again), and so is the next."""
    graph = tmp_path / "model.onnx"
    shutil.copy(lenet5, graph)
    session, images = _remote(graph, host, instance=5), _images(2)
    session.run(["probabilities"], {INPUT_NAME: images})
    replaced = tmp_path / "new.onnx"
    shutil.copy(lenet5, replaced)
    replaced.replace(graph)  # same bytes, another file: what a re-export in place leaves
    session._state[0].close()
    wait_until(lambda: not _held(host, graph), 10, "the host letting the session go with its only user")
    for _ in range(2):
        with pytest.raises(ModelNotReady) as raised:
            session.run(["probabilities"], {INPUT_NAME: images})
        assert "its graph is no longer the file this worker loaded and verified" in raised.value.message
        assert str(tmp_path) not in raised.value.message  # the server's paths are in its log only
        assert raised.value.status_code == 503 and raised.value.retry_after is None and not _held(host, graph)


def test_buffers_the_host_cannot_map_end_the_connection_and_the_next_run_opens_another(
    host: session_host.HostProcess, lenet5: Path
) -> None:
    session, images = _remote(lenet5, host, instance=4), _images(2)
    small = [session_host._Buffer(mmap.PAGESIZE) for _ in range(2)]
    with pytest.raises(session_host.SessionHostGone):  # sizes beyond the files: the host cannot map them
        session._ask(("buffers", 1 << 20, 1 << 20), *[b.fd for b in small if b.fd is not None])
    for buffer in small:
        buffer.close()
    want = _local(lenet5).run(["probabilities"], {INPUT_NAME: images})[0]
    np.testing.assert_allclose(session.run(["probabilities"], {INPUT_NAME: images})[0], want, rtol=0, atol=1e-6)


def test_the_host_ignores_a_stop_signal_until_its_server_closes_its_stdin(lenet5: Path) -> None:
    """A Ctrl-C or a stop sent to every process reaches the server, whose workers still need the host to drain."""
    with session_host.hosted() as started:
        session = _remote(lenet5, started)
        for stop in (signal.SIGINT, signal.SIGTERM):
            started.process.send_signal(stop)
        time.sleep(0.5)
        assert session.run(["probabilities"], {INPUT_NAME: _images(1)})[0].shape == (1, 10)
        started.stop()
        assert started.process.returncode == 0
        assert not Path(started.address).parent.exists()  # its socket and private directory removed


def test_sessions_opened_and_closed_at_once_by_many_never_open_a_graph_twice(
    lenet5: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers loading and unloading one version at the same moment (on demand, say): a graph and instance is
    opened only where the host holds no session of it, and each release takes only its own."""
    real, opened, twice = ort.InferenceSession, [0], []
    host, spec = session_host.SessionHost(), session_host.OpenSpec(str(lenet5), 0, list(CPU), threads=1)

    class Counted(real):  # type: ignore[misc, valid-type]  # ONNX Runtime's own session, counted
        def __init__(self, *args: object, **kwargs: object) -> None:
            time.sleep(0.01)  # a wider window between looking a session up and opening one
            super().__init__(*args, **kwargs)
            opened[0] += 1
            twice.extend(held for held in list(host.sessions.values()) if held.session is not None)

    monkeypatch.setattr(session_host.ort, "InferenceSession", Counted)

    def churn(_: int) -> None:
        for _ in range(20):
            key, held = host.acquire(spec)
            host.release(key, held)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(churn, range(6)))  # a release that took another's session would raise here (KeyError)
    assert host.sessions == {} and opened[0] >= 1
    assert twice == []


def test_a_graph_that_fails_to_open_fails_every_waiter_and_is_tried_again(tmp_path: Path) -> None:
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"not a graph")
    host, spec = session_host.SessionHost(), session_host.OpenSpec(str(graph), 0, list(CPU), threads=1)
    with ThreadPoolExecutor(3) as pool:
        failures = [pool.submit(host.acquire, spec) for _ in range(3)]
        for failure in failures:
            with pytest.raises(RuntimeError, match=r"INVALID_PROTOBUF|Protobuf"):
                failure.result(timeout=60)
    assert host.sessions == {}


def test_the_host_goes_when_the_process_that_started_it_goes(tmp_path: Path) -> None:
    """A server killed outright (SIGKILL: no atexit) leaves no host behind holding the GPU."""
    script = textwrap.dedent("""
        import sys, time
        from service.runtime import session_host
        print(session_host.start().process.pid, flush=True)
        time.sleep(600)
    """)
    starter = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[3], stdout=subprocess.PIPE)
    assert starter.stdout is not None
    pid = int(starter.stdout.readline())
    assert psutil.pid_exists(pid)
    starter.kill()
    starter.wait()
    assert gone(pid, 15), "the session host outlived the process that started it"


@pytest.mark.parametrize(
    ("overrides", "shared"),
    [
        ({"session_host": "auto", "workers": 4, "providers": "cpu"}, False),  # the CPU keeps its own sessions
        ({"session_host": "auto", "workers": 4, "providers": "cuda"}, True),  # several workers on CUDA: one context
        ({"session_host": "auto", "workers": 1, "providers": "cuda"}, False),  # one worker is already one context
        ({"session_host": "shared", "workers": 1, "providers": "cpu"}, True),
        ({"session_host": "worker", "workers": 4, "providers": "cuda"}, False),
    ],
)
def test_where_the_sessions_live(overrides: dict[str, object], shared: bool) -> None:
    assert session_host.shares_sessions(Settings(**overrides)) is shared  # type: ignore[arg-type]
