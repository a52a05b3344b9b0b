"""End to end, as an operator tried them: the two defects of issue #34's review that were reproduced against the
running service, on a store the real export stage wrote (the session's trained LeNet-5, as versions 1 and 2)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.store.layout import ModelStore

from ...helpers import encode, metric_samples, running

pytestmark = pytest.mark.integration

DIGIT = encode(np.full((28, 28), 255, dtype=np.uint8))
PNG = {"content-type": "image/png"}


def two_versions(model_store: ModelStore, root: Path) -> ModelStore:
    store = ModelStore(root)
    shutil.copytree(model_store.model_dir("lenet5"), store.model_dir("lenet5"), ignore=shutil.ignore_patterns(".*"))
    shutil.copytree(store.model_dir("lenet5") / "1", store.model_dir("lenet5") / "2")
    return store  # config.pbtxt: Triton's default policy, the latest version


def test_on_demand_requests_without_a_version_follow_the_policy_in_every_worker(
    model_store: ModelStore, tmp_path: Path
) -> None:
    """Fresh server, two workers: the first request asks for version 1; every request without a version, on new
    connections (either worker), is answered by version 2, the policy's."""
    store = two_versions(model_store, tmp_path / "store")
    env = {"MODEL_CONTROL": "on-demand", "WORKERS": "2", "MEMORY_BUDGET": "1GiB"}
    with running(store.root, tmp_path / "service.log", **env) as service:
        for _ in range(4):  # new connections: both workers load version 1 for a versioned request
            asked = httpx.post(f"{service.url}/classify", params={"model": "lenet5", "version": "1"},
                               content=DIGIT, headers=PNG, timeout=60)  # fmt: skip
            assert asked.status_code == 200 and asked.json()["version"] == "1"
        versions = []
        for _ in range(12):
            answer = httpx.post(f"{service.url}/classify", params={"model": "lenet5"}, content=DIGIT, headers=PNG,
                                timeout=60)  # fmt: skip
            assert answer.status_code == 200, answer.text
            versions.append(answer.json()["version"])
    assert versions == ["2"] * 12


def test_a_served_version_whose_graph_is_truncated_keeps_answering_and_models_names_the_problem(
    model_store: ModelStore, tmp_path: Path
) -> None:
    """MODEL_CONTROL=poll, version 2 serving; its model.onnx is truncated on disk: within a few polls /models names
    the problem and the metric says so, while every request is still answered by version 2 (no fall-back to 1)."""
    store = two_versions(model_store, tmp_path / "store")
    env = {"MODEL_CONTROL": "poll", "POLL_INTERVAL_S": "0.5"}
    with running(store.root, tmp_path / "service.log", **env) as service:
        graph = store.model_dir("lenet5") / "2" / "model.onnx"
        graph.write_bytes(graph.read_bytes()[:1000])
        deadline, problem = time.monotonic() + 20, None
        while problem is None and time.monotonic() < deadline:
            time.sleep(0.5)
            model = httpx.get(f"{service.url}/models", timeout=10).json()["models"][0]
            problem = next((s["files_problem"] for s in model["served"] if s["version"] == 2), None)
        assert problem is not None and "sha256 does not match" in problem
        assert [s["version"] for s in model["served"]] == [2] and model["status"] == "ready"
        answers = [httpx.post(f"{service.url}/classify", params={"model": "lenet5"}, content=DIGIT, headers=PNG,
                              timeout=60) for _ in range(5)]  # fmt: skip
        assert [(a.status_code, a.json()["version"]) for a in answers] == [(200, "2")] * 5
        text = httpx.get(f"{service.url}/metrics", timeout=10).text
        assert metric_samples(text, "cnn_model_files_changed") == [({"model": "lenet5", "version": "2"}, 1.0)]
