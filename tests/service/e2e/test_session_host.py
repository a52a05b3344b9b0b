"""``SESSION_HOST=shared`` on the real server: two BentoML workers, one process holding their sessions (each
graph opened once, for both), answers over HTTP and gRPC equal to a server whose worker holds its own, and a
server that stops, rather than answer errors, when that process dies."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton_grpc
from skimage import data as photos

from service.store.layout import ModelStore

from ...helpers import ServiceProcess, classified, encode, gone, models, running, wait_until
from ..pictures import held_out_drawings

pytestmark = pytest.mark.integration

PHOTOS = [encode(getattr(photos, name)(), "JPEG", quality=90) for name in ("chelsea", "coffee", "astronaut")]


@pytest.fixture(scope="module")
def shared(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("logs") / "session-host.log"
    with running(Path(model_store.root), log, WORKERS="2", SESSION_HOST="shared", MODELS="lenet5,resnet18") as process:
        yield process


def _children(service: ServiceProcess) -> list[psutil.Process]:
    assert service.process is not None
    return psutil.Process(service.process.pid).children()


def _host(service: ServiceProcess) -> psutil.Process:
    hosts = [p for p in _children(service) if "service.runtime.session_host" in p.cmdline()]
    assert len(hosts) == 1, [p.cmdline() for p in _children(service)]
    return hosts[0]


def test_two_workers_run_one_session_per_graph_in_the_host(shared: ServiceProcess) -> None:
    host = _host(shared)
    workers = [p for p in _children(shared) if any("_bentoml_impl.worker" in part for part in p.cmdline())]
    assert len(workers) == 2
    for _ in range(12):  # a new connection each time: either worker answers
        listed = models(shared)
        assert listed["lenet5"]["session_host"] == listed["resnet18"]["session_host"] == host.pid
    log = shared.log_path.read_text()
    for name in ("lenet5", "resnet18"):
        assert log.count(f"{name} v1: ready on CPUExecutionProvider in the session host (pid {host.pid})") == 2
        assert log.count(f"session host: opened {Path(shared.env['MODEL_STORE']) / name / '1' / 'model.onnx'}") == 1


def test_answers_match_a_worker_holding_its_own_sessions(shared: ServiceProcess, service: ServiceProcess) -> None:
    drawings, _ = held_out_drawings(4)
    for model, bodies in (("lenet5", drawings), ("resnet18", PHOTOS)):
        for body in bodies:
            got, want = classified(shared, body, model), classified(service, body, model)
            top, expected = got["results"][0]["predictions"], want["results"][0]["predictions"]
            assert [p["index"] for p in top] == [p["index"] for p in expected]
            np.testing.assert_allclose([p["score"] for p in top], [p["score"] for p in expected], rtol=0, atol=1e-5)


def test_grpc_answers_through_the_host(shared: ServiceProcess, service: ServiceProcess) -> None:
    def infer(target: ServiceProcess) -> np.ndarray:
        client = triton_grpc.InferenceServerClient(target.grpc_target)
        files = triton_grpc.InferInput("image_bytes", [len(PHOTOS)], "BYTES")
        files.set_data_from_numpy(np.array(PHOTOS, dtype=object))
        return np.asarray(client.infer("resnet18", [files]).as_numpy("probabilities"))

    got, want = infer(shared), infer(service)
    assert got.shape == (3, 1000)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_the_server_stops_when_its_session_host_dies(model_store: ModelStore, tmp_path: Path) -> None:
    with running(Path(model_store.root), tmp_path / "dies.log", WORKERS="1", SESSION_HOST="shared",
                 MODELS="lenet5") as server:  # fmt: skip
        host = _host(server)
        assert models(server)["lenet5"]["session_host"] == host.pid
        host.send_signal(signal.SIGKILL)
        assert server.process is not None
        wait_until(lambda: server.process is not None and server.process.poll() is not None, 60, "the server stopped")
        assert f"the session host (pid {host.pid}) exited with code -9" in server.log_path.read_text()


def test_ctrl_c_stops_the_server_and_then_its_host(model_store: ModelStore, tmp_path: Path) -> None:
    """SIGINT to the server's whole process group, as a terminal's Ctrl-C sends it: the workers drain and stop, then
    the server stops the host; nothing reports the host as having died."""
    with running(Path(model_store.root), tmp_path / "ctrl-c.log", WORKERS="1", SESSION_HOST="shared",
                 MODELS="lenet5") as server:  # fmt: skip
        host = _host(server)
        assert server.process is not None
        os.killpg(server.process.pid, signal.SIGINT)
        wait_until(lambda: server.process is not None and server.process.poll() is not None, 60, "the server stopped")
        assert gone(host.pid, 15), "the host did not stop"
    log = server.log_path.read_text()
    assert "session host" in log and "exited with code" not in log
