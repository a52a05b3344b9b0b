"""Several BentoML workers: each serves gRPC on the same port, and the metrics add up across them."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from service.store.layout import ModelStore

from ...helpers import ServiceProcess, encode, metric_samples, running

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
