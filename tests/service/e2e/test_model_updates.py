"""MODEL_CONTROL=poll under load: a new version exported into the store takes over, a corrupt one never does.

Every test runs steady HTTP and gRPC load (concurrency 8) through the change and checks
that no request failed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from service.store.layout import ModelStore

from ...helpers import ROOT, ServiceProcess, metric_samples, models, running, wait_until
from ..lifecycle_load import DIGIT, SteadyLoad, percentiles

pytestmark = pytest.mark.integration

POLL_S = 1.0


def lenet5_store(model_store: ModelStore, root: Path) -> Path:
    shutil.copytree(model_store.model_dir("lenet5"), root / "lenet5", ignore=shutil.ignore_patterns(".staging*"))
    return root


def only_version_2(service: ServiceProcess) -> bool:
    """Whether LeNet-5 serves version 2 alone, in every worker: ``/models`` tells of the worker that answered it,
    ``cnn_model_ready`` of them all (a version's series, while any worker holds it)."""
    described = models(service)["lenet5"]
    if described["version"] != 2 or described["served"][-1:] != described["served"]:
        return False
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    ready = {labels["version"]: value for labels, value in metric_samples(text, "cnn_model_ready")
             if labels["model"] == "lenet5"}  # fmt: skip
    return ready == {"2": 1.0}


def fresh_connection_versions(service: ServiceProcess, count: int) -> set[str]:
    """The versions answering ``count`` requests, each on a new connection (so any worker may answer)."""
    versions = set()
    for i in range(count):
        if i % 2:
            client = triton_grpc.InferenceServerClient(service.grpc_target)
            files = triton_grpc.InferInput("image_bytes", [1], "BYTES")
            files.set_data_from_numpy(np.array([DIGIT], dtype=object))
            versions.add(client.infer("lenet5", [files]).get_response().model_version)
            client.close()
        else:
            response = httpx.post(f"{service.url}/classify?model=lenet5", content=DIGIT,
                                  headers={"content-type": "image/png"}, timeout=30)  # fmt: skip
            versions.add(response.json()["version"])
    return versions


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_exported_version_takes_over_under_load_and_no_request_fails(
    model_store: ModelStore, tmp_path: Path, workers: str
) -> None:
    store = lenet5_store(model_store, tmp_path / "store")
    env = {"MODEL_CONTROL": "poll", "POLL_INTERVAL_S": str(POLL_S), "WORKERS": workers, "MODELS": ""}
    with running(store, tmp_path / "poll.log", **env) as service, SteadyLoad(service) as load:
        time.sleep(3)
        exporting = time.monotonic()
        command = [sys.executable, "-m", "export", "lenet5", "--out", str(store), "--epochs", "3", "--no-progress"]
        export = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            written = wait_until(lambda: (store / "lenet5" / "2").is_dir(), 120, "the export writing version 2")
            assert export.wait(120) == 0, export.stderr.read() if export.stderr else ""
        finally:  # a failure here leaves no training on the cores the next tests need
            export.kill()  # none once it has ended (Popen polls first)
            export.wait()
        wait_until(lambda: load.first("2") is not None, 60, "an answer from version 2")
        served = wait_until(lambda: only_version_2(service), 60, "version 1 released by every worker")
        time.sleep(3)
        warmup = models(service)["lenet5"]["warmup_seconds"] + models(service)["lenet5"]["load_seconds"]
        later = fresh_connection_versions(service, 40)
        metrics = httpx.get(f"{service.url}/metrics", timeout=10).text
    answers = load.answers
    switched = load.first("2")
    assert switched is not None
    print(f"\nWORKERS={workers}: export wrote v2 {written - exporting:.1f} s after it started; first v2 request "
          f"{switched - written:+.2f} s after it was written, v1 released {served - written:.2f} s after")  # fmt: skip
    print(f"  before the export:  {percentiles([a for a in answers if a.at < exporting])}")
    print(f"  during the switch:  {percentiles([a for a in answers if exporting <= a.at < served])}")
    print(f"  after the switch:   {percentiles([a for a in answers if a.at >= served])}")
    failed = [a for a in answers if a.error]
    assert not failed, failed[:5]
    assert switched - written <= 2 * POLL_S + warmup + 10  # polls, load and warm-up, and the slack of 2 busy cores
    assert {a.version for a in answers if a.at >= served} == {"2"} and later == {"2"}  # no worker left behind
    assert {a.protocol for a in answers if a.version == "2"} == {"http", "grpc"}
    ready = {labels["version"]: value for labels, value in metric_samples(metrics, "cnn_model_ready")}
    assert ready == {"2": 1.0}  # version 1's series is gone, not stuck at 0
    changes = {(s["action"], s["outcome"]): v for s, v in metric_samples(metrics, "cnn_model_changes_total")}
    assert changes[("load", "success")] == 2 * int(workers) and changes[("unload", "success")] == int(workers)
    assert ("load", "failure") not in changes
    switches = {s["phase"]: v for s, v in metric_samples(metrics, "cnn_model_switch_seconds_count")}
    assert switches == {"load": 2 * int(workers), "unload": int(workers)}


def test_a_corrupt_version_never_replaces_the_serving_one_and_a_fixed_one_does(
    model_store: ModelStore, tmp_path: Path
) -> None:
    store = lenet5_store(model_store, tmp_path / "store")
    env = {"MODEL_CONTROL": "poll", "POLL_INTERVAL_S": str(POLL_S)}
    with running(store, tmp_path / "corrupt.log", **env) as service, SteadyLoad(service) as load:
        time.sleep(2)
        good = (store / "lenet5" / "1" / "model.onnx").read_bytes()
        staging = tmp_path / "v2"
        shutil.copytree(store / "lenet5" / "1", staging)
        (staging / "model.onnx").write_bytes(good[: len(good) // 2])  # truncated
        staging.rename(store / "lenet5" / "2")
        seen: list[dict[str, Any]] = []  # the answer that listed it: each worker polls the store on its own, so the
        # worker asked next may not have seen version 2 yet

        def v2_failed() -> bool:
            seen.append(models(service)["lenet5"])
            return any(v["status"] == "failed" for v in seen[-1]["served"])

        failed_at = wait_until(v2_failed, 10 * POLL_S + 10, "version 2 listed as failed")
        lenet5 = seen[-1]
        time.sleep(2)
        assert load.first("2") is None
        (store / "lenet5" / "2" / "model.onnx").write_bytes(good)  # the copy, finished
        wait_until(lambda: load.first("2") is not None, 30, "version 2 serving once fixed")
        repository_call = httpx.post(f"{service.url}/v2/repository/index", timeout=10)
    assert not [a for a in load.answers if a.error]
    assert {a.version for a in load.answers if a.at < failed_at + 2} == {"1"}
    assert lenet5["version"] == 1 and lenet5["status"] == "ready"
    [v2] = [v for v in lenet5["served"] if v["version"] == 2]
    assert v2["status"] == "failed" and "sha256 does not match" in v2["reason"]
    # in poll mode the repository API is off, and says how to turn it on
    assert repository_call.status_code == 409 and "MODEL_CONTROL=explicit" in repository_call.json()["error"]
    assert "lenet5 v2: not loaded yet" in service.log_path.read_text()  # first seen as a copy in progress
