"""Several BentoML workers: each serves gRPC on the same port, and the metrics add up across them."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from service.store.layout import ModelStore

from ...helpers import ServiceProcess, encode, gone, metric_samples, running, wait_until, workers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_workers(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("logs") / "two-workers.log"
    with running(Path(model_store.root), log, WORKERS="2", MODELS="lenet5") as process:
        yield process


def test_every_worker_serves_grpc_on_the_shared_port(two_workers: ServiceProcess) -> None:
    digit = encode(np.full((28, 28), 255, dtype=np.uint8))

    def call(_: int) -> int:
        client = triton_grpc.InferenceServerClient(two_workers.grpc_target)  # a new connection each time
        files = triton_grpc.InferInput("image_bytes", [1], "BYTES")
        files.set_data_from_numpy(np.array([digit], dtype=object))
        return int(client.infer("lenet5", [files]).as_numpy("probabilities").shape[1])

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(call, range(24))) == [10] * 24
    assert two_workers.log_path.read_text().count("gRPC (Open Inference Protocol) listening") == 2
    text = httpx.get(f"{two_workers.url}/metrics", timeout=10).text
    served = sum(v for labels, v in metric_samples(text, "cnn_requests_total") if labels["protocol"] == "grpc")
    assert served == 24  # counted once each, whichever worker answered


def test_a_worker_killed_outright_takes_its_gauges_out_of_metrics(model_store: ModelStore, tmp_path: Path) -> None:
    """SIGKILL (as the kernel's OOM killer sends) runs nothing in the worker; BentoML starts another, the summed
    gauges count the living (the budget is MEMORY_BUDGET again, not one and a half of it) and the death is
    counted once. Workers that stop with their server take their gauges along and count no death."""
    budget = 256 * 2**20
    home = tmp_path / "home"
    with running(Path(model_store.root), tmp_path / "killed-worker.log", WORKERS="2", MODELS="lenet5",
                 MODEL_CONTROL="on-demand", MEMORY_BUDGET="256MiB", BENTOML_HOME=str(home)) as process:  # fmt: skip

        def summed(name: str) -> float:
            return sum(value for _, value in metric_samples(httpx.get(f"{process.url}/metrics", timeout=10).text, name))

        assert summed("cnn_memory_budget_bytes") == budget
        assert summed("cnn_worker_deaths_total") == 0
        killed = workers(process)[0].pid
        os.kill(killed, signal.SIGKILL)
        assert gone(killed, 30)

        def replaced() -> bool:
            pids = {worker.pid for worker in workers(process)}
            ready = httpx.get(f"{process.url}/readyz", timeout=10).status_code == 200
            return len(pids) == 2 and killed not in pids and ready

        wait_until(replaced, 90, "another worker in the killed one's place, ready")
        assert summed("cnn_memory_budget_bytes") == budget
        assert summed("cnn_requests_in_flight") == 0
        assert [summed("cnn_worker_deaths_total") for _ in range(4)] == [1] * 4  # whichever worker answers
        assert process.log_path.read_text().count(f"worker {killed} ended without shutting down") == 1
    files = home / "prometheus_multiproc_dir"
    assert sorted(files.glob("counter_*.db")) and not sorted(files.glob("gauge_live*")), sorted(files.iterdir())
