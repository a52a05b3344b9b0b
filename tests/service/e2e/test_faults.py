"""Broken model files, a graph failing inside ONNX Runtime, an empty store: the service stays up."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from service.store.layout import ModelStore

from ...helpers import ROOT, ServiceProcess, encode, metric_samples, running

pytestmark = pytest.mark.integration

DIGIT = encode(np.full((28, 28), 255, dtype=np.uint8))


def batch_of_eight_only_graph(path: Path, distance: bool = True) -> None:
    """A valid LeNet-shaped graph whose fixed Reshape fails at runtime for any batch but 8 (with LeNet-5's
    typicality ``distance`` output, unless told)."""
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1, 2, 3], keepdims=0),  # [N]
        helper.make_node("Reshape", ["mean", "eight"], ["column"]),  # [8, 1]: the fault
        helper.make_node("Expand", ["column", "wide"], ["logits"]),  # [8, 10]
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        *([helper.make_node("Identity", ["mean"], ["distance"])] if distance else []),
    ]
    constants = [
        helper.make_tensor("eight", TensorProto.INT64, [2], [8, 1]),
        helper.make_tensor("wide", TensorProto.INT64, [2], [8, 10]),
    ]
    graph = helper.make_graph(
        nodes, "fails_unless_eight",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 32, 32, 1])],
        [*(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 10]) for n in ("logits", "probabilities")),
         *([helper.make_tensor_value_info("distance", TensorProto.FLOAT, ["batch"])] if distance else [])],
        initializer=constants,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def record_graph_hash(version: Path) -> None:
    metadata = json.loads((version / "metadata.json").read_text())
    metadata["onnx"]["sha256"] = hashlib.sha256((version / "model.onnx").read_bytes()).hexdigest()
    (version / "metadata.json").write_text(json.dumps(metadata))


@pytest.fixture(scope="module")
def faulty(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("faulty_store")
    source = model_store.model_dir("lenet5")
    broken = ["missing_graph", "truncated_graph", "not_onnx", "bad_metadata", "runtime_fault", "no_distance"]
    for name in ["lenet5", *broken]:
        shutil.copytree(source, root / name, ignore=shutil.ignore_patterns(".staging*"))
    (root / "missing_graph" / "1" / "model.onnx").unlink()
    graph = root / "truncated_graph" / "1" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:2000])
    (root / "not_onnx" / "1" / "model.onnx").write_text("this is not a protobuf\n")
    (root / "bad_metadata" / "1" / "metadata.json").write_text("{ not json")
    batch_of_eight_only_graph(root / "runtime_fault" / "1" / "model.onnx")
    batch_of_eight_only_graph(root / "no_distance" / "1" / "model.onnx", distance=False)
    for name in ("not_onnx", "runtime_fault", "no_distance"):  # recorded as the export would: past the integrity check
        record_graph_hash(root / name / "1")
    with running(root, root.parent / "faulty.log", WARMUP_BATCHES="[8]") as process:
        yield process


def classify(service: ServiceProcess, model: str, files: int = 1) -> httpx.Response:
    parts = [("image", (f"{i}.png", DIGIT, "image/png")) for i in range(files)]
    return httpx.post(f"{service.url}/classify", params={"model": model}, files=parts, timeout=30)


def test_broken_models_are_listed_with_the_reason_and_the_rest_serve(faulty: ServiceProcess) -> None:
    models = {m["name"]: m for m in httpx.get(f"{faulty.url}/models", timeout=10).json()["models"]}
    assert models["lenet5"]["status"] == "ready" and models["runtime_fault"]["status"] == "ready"
    reasons = {
        "missing_graph": "model.onnx is missing",
        "truncated_graph": "model.onnx's sha256 does not match metadata.json",
        "not_onnx": "ONNX Runtime cannot load",
        "bad_metadata": "metadata.json is invalid",
        "no_distance": "the metadata has a typicality check, but the graph has no 'distance' output",
    }
    for name, reason in reasons.items():
        assert models[name]["status"] == "failed" and reason in models[name]["reason"], models[name]
        response = classify(faulty, name)
        assert response.status_code == 503 and reason in response.json()["error"]
    assert httpx.get(f"{faulty.url}/readyz", timeout=5).status_code == 200
    assert classify(faulty, "lenet5").status_code == 200


def test_an_exception_inside_inference_fails_that_request_only(faulty: ServiceProcess) -> None:
    failed = classify(faulty, "runtime_fault", files=1)
    assert failed.status_code == 500 and "Internal error" in failed.json()["error"]
    assert classify(faulty, "runtime_fault", files=8).status_code == 200  # the same model, a batch it can run
    assert classify(faulty, "lenet5").status_code == 200

    client = triton_grpc.InferenceServerClient(faulty.grpc_target)
    files = triton_grpc.InferInput("image_bytes", [1], "BYTES")
    files.set_data_from_numpy(np.array([DIGIT], dtype=object))
    with pytest.raises(InferenceServerException) as info:
        client.infer("runtime_fault", [files])
    assert str(info.value.status()) == "StatusCode.INTERNAL"
    assert client.infer("lenet5", [files]).as_numpy("probabilities").shape == (1, 10)


def test_a_full_queue_sheds_with_503_and_counts_it(model_store: ModelStore, tmp_path: Path) -> None:
    """MAX_QUEUE_IMAGES=2: concurrent one-image requests find the queue full now and then and are told to retry
    (503, counted as shed); a request of three, which no queue of two could ever hold, is told that instead (413)."""
    with running(Path(model_store.root), tmp_path / "shed.log", MODELS="lenet5", MAX_QUEUE_IMAGES="2") as process:
        three = classify(process, "lenet5", files=3)
        assert three.status_code == 413 and "MAX_QUEUE_IMAGES" in three.json()["error"]
        shed: list[httpx.Response] = []

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=process.url, timeout=30) as client:
                one = [("image", ("0.png", DIGIT, "image/png"))]
                sent = [client.post("/classify", params={"model": "lenet5"}, files=one) for _ in range(48)]
                return await asyncio.gather(*sent)

        for _ in range(20):  # bounded: a burst of 48 on a queue of 2 sheds almost always at once
            answers = asyncio.run(burst())
            assert {a.status_code for a in answers} <= {200, 503}
            shed += [a for a in answers if a.status_code == 503]
            if shed:
                break
        assert shed and "retry shortly" in shed[0].json()["error"]
        assert classify(process, "lenet5", files=1).status_code == 200
        text = httpx.get(f"{process.url}/metrics", timeout=10).text
    counts = {labels["protocol"]: v for labels, v in metric_samples(text, "cnn_requests_shed_total")}
    assert counts == {"http": float(len(shed)), "grpc": 0.0}


def test_an_empty_store_is_refused_with_the_remedy(tmp_path: Path) -> None:
    env = {**os.environ, "MODEL_STORE": str(tmp_path / "nothing-here")}
    result = subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )  # a start that is not refused fails here, not hangs
    assert result.returncode == 2 and "make export" in result.stderr


def test_invalid_settings_are_refused_one_line_each_by_their_variables(tmp_path: Path) -> None:
    """No pydantic traceback: each setting that is wrong, by its environment name, with what it would take."""
    env = {**os.environ, "MODEL_STORE": str(tmp_path), "MAX_BATCH_SIZE": "abc", "PROVIDERS": "gpu",
           "HTTP_PORT": "0", "MAX_TOP_K": "-1"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert "MAX_BATCH_SIZE=abc: Input should be a valid integer" in result.stderr
    assert "  PROVIDERS=gpu: Input should be 'auto', 'cuda' or 'cpu'" in lines
    assert "  HTTP_PORT=0: Input should be greater than or equal to 1" in lines
    assert "  MAX_TOP_K=-1: Input should be greater than or equal to 1" in lines
    assert len(lines) == 1 + 4  # the heading, one line per wrong setting


def test_settings_that_disagree_are_refused_with_the_check_s_own_words(tmp_path: Path) -> None:
    env = {**os.environ, "MODEL_STORE": str(tmp_path), "MAX_BATCH_SIZE": "8", "BATCH_SIZES": "1,16"}
    result = subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and "BATCH_SIZES has [16] above MAX_BATCH_SIZE=8: lower them" in result.stderr


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"MEMORY_BUDGET": "1MiB"}, "less than the smallest model of the store, lenet5"),
        ({"MEMORY_BUDGET": "100MiB", "PINNED": "resnet18"}, "PINNED models resnet18 take 294 MiB, more than"),
    ],
)
def test_an_on_demand_budget_that_cannot_serve_the_store_is_refused_with_what_would(
    model_store: ModelStore, env: dict[str, str], says: str
) -> None:
    """Every request would get 503 for ever (a budget below the smallest model, pinned models above it): the start
    is refused, naming the figure that would do."""
    env = {**os.environ, "MODEL_STORE": str(model_store.root), "MODEL_CONTROL": "on-demand", "WORKERS": "1", **env}
    result = subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )  # a start that is not refused fails here, not hangs
    assert result.returncode == 2 and says in result.stderr and "MiB for the models" in result.stderr


def test_bentoml_serve_on_an_empty_store_stays_unready_and_says_why(tmp_path: Path) -> None:
    process = ServiceProcess(tmp_path, tmp_path / "empty.log").start(wait_for="/livez")
    try:
        time.sleep(1)
        assert httpx.get(f"{process.url}/readyz", timeout=5).status_code == 503
        assert "make export" in process.log_path.read_text()
        with grpc.insecure_channel(process.grpc_target) as channel:  # gRPC's standard health says the same
            health, statuses = health_pb2_grpc.HealthStub(channel), health_pb2.HealthCheckResponse
            for name in ("", "inference.GRPCInferenceService"):  # not ready
                assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == (
                    statuses.NOT_SERVING
                )
            live = health_pb2.HealthCheckRequest(service="liveness")
            assert health.Check(live, timeout=10).status == statuses.SERVING
    finally:
        process.stop()
