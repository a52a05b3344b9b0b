"""MODEL_CONTROL=explicit: the repository API with tritonclient (HTTP and gRPC), tokens, version policy, restarts."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from service.store.layout import ModelStore

from ...helpers import ServiceProcess
from ..lifecycle_load import DIGIT

pytestmark = pytest.mark.integration

API, ADMIN = "inference-token", "admin-token"
AS_ADMIN = {"authorization": f"Bearer {ADMIN}"}
AS_CLIENT = {"authorization": f"Bearer {API}"}


def explicit_store(model_store: ModelStore, root: Path) -> Path:
    """lenet5 with versions 1 and 2 under `latest { num_versions: 2 }`, and resnet18."""
    for name in ("lenet5", "resnet18"):
        shutil.copytree(model_store.model_dir(name), root / name, ignore=shutil.ignore_patterns(".staging*"))
    shutil.copytree(root / "lenet5" / "1", root / "lenet5" / "2")
    metadata = json.loads((root / "lenet5" / "2" / "metadata.json").read_text())
    (root / "lenet5" / "2" / "metadata.json").write_text(json.dumps({**metadata, "version": 2}))
    config = root / "lenet5" / "config.pbtxt"
    config.write_text(config.read_text().replace("num_versions: 1", "num_versions: 2"))
    return root


@pytest.fixture(scope="module")
def store(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return explicit_store(model_store, tmp_path_factory.mktemp("explicit_store"))


@pytest.fixture(scope="module")
def explicit(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("logs") / "explicit.log"
    env = {"MODEL_CONTROL": "explicit", "API_TOKEN": API, "ADMIN_TOKEN": ADMIN, "WORKERS": "2"}
    process = ServiceProcess(store, log, **env).start()
    yield process
    process.stop()


def classify(service: ServiceProcess, model: str, **params: object) -> httpx.Response:
    return httpx.post(f"{service.url}/classify", params={"model": model, **params}, content=DIGIT,
                      headers={"content-type": "image/png", **AS_CLIENT}, timeout=30)  # fmt: skip


def grpc_infer(service: ServiceProcess, model: str, version: str = "") -> str:
    client = triton_grpc.InferenceServerClient(service.grpc_target)
    files = triton_grpc.InferInput("image_bytes", [1], "BYTES")
    files.set_data_from_numpy(np.array([DIGIT], dtype=object))
    try:
        return client.infer(model, [files], model_version=version, headers=AS_CLIENT).get_response().model_version
    finally:
        client.close()


def test_the_admin_token_guards_the_repository_api(explicit: ServiceProcess) -> None:
    index = f"{explicit.url}/v2/repository/index"
    assert httpx.post(index, timeout=10).status_code == 401
    forbidden = httpx.post(index, headers=AS_CLIENT, timeout=10)
    assert forbidden.status_code == 403 and "ADMIN_TOKEN" in forbidden.json()["error"]
    assert httpx.post(index, headers=AS_ADMIN, timeout=10).status_code == 200
    assert classify(explicit, "lenet5").status_code == 200  # the inference token still does inference
    client = triton_grpc.InferenceServerClient(explicit.grpc_target)
    for headers, status in [({}, "UNAUTHENTICATED"), (AS_CLIENT, "PERMISSION_DENIED")]:
        with pytest.raises(InferenceServerException) as info:
            client.get_model_repository_index(headers=headers)
        assert str(info.value.status()) == f"StatusCode.{status}"
    assert client.get_model_repository_index(headers=AS_ADMIN).models


def test_the_index_lists_the_store_and_both_versions_of_the_policy(explicit: ServiceProcess) -> None:
    client = triton_http.InferenceServerClient(explicit.url.removeprefix("http://"))
    rows = {(m["name"], m["version"]): m["state"] for m in client.get_model_repository_index(headers=AS_ADMIN)}
    assert rows == {("lenet5", "1"): "READY", ("lenet5", "2"): "READY", ("resnet18", "1"): "READY"}


def test_latest_two_serves_both_versions_each_by_its_number(explicit: ServiceProcess) -> None:
    assert classify(explicit, "lenet5").json()["version"] == "2"  # no version: the highest
    for version in ("1", "2"):
        assert classify(explicit, "lenet5", version=version).json()["version"] == version
        assert grpc_infer(explicit, "lenet5", version) == version
        v2 = httpx.get(f"{explicit.url}/v2/models/lenet5/versions/{version}", headers=AS_CLIENT, timeout=10).json()
        assert v2["versions"] == ["1", "2"]
    missing = classify(explicit, "lenet5", version=3)
    assert missing.status_code == 404 and "lenet5 version 1, lenet5 version 2" in missing.json()["error"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unload_then_load_with_tritonclient(explicit: ServiceProcess, protocol: str) -> None:
    if protocol == "http":
        client: triton_http.InferenceServerClient | triton_grpc.InferenceServerClient = (
            triton_http.InferenceServerClient(explicit.url.removeprefix("http://"))
        )
    else:
        client = triton_grpc.InferenceServerClient(explicit.grpc_target)
    client.unload_model("resnet18", headers=AS_ADMIN)
    for _ in range(6):  # both workers answer: none serves it any more
        assert classify(explicit, "resnet18").status_code == 404
        with pytest.raises(InferenceServerException) as info:
            grpc_infer(explicit, "resnet18")
        assert "not loaded" in str(info.value)
    assert not client.is_model_ready("resnet18", headers=AS_CLIENT)
    index = {m["name"]: m for m in triton_http.InferenceServerClient(explicit.url.removeprefix("http://"))
             .get_model_repository_index(headers=AS_ADMIN)}  # fmt: skip
    assert index["resnet18"]["state"] == "UNAVAILABLE"
    client.load_model("resnet18", headers=AS_ADMIN)
    assert client.is_model_ready("resnet18", headers=AS_CLIENT)
    for _ in range(6):
        assert classify(explicit, "resnet18").status_code == 200


def test_a_load_never_takes_a_path_a_config_or_files(explicit: ServiceProcess, store: Path) -> None:
    outside = store.parent / "outside"
    shutil.copytree(store / "lenet5", outside / "lenet5")  # a loadable model one "../" away from the store
    state = store / ".model-control.json"
    before = state.stat().st_mtime_ns
    url = f"{explicit.url}/v2/repository/models/..%2Foutside%2Flenet5/load"
    escaped = httpx.post(url, headers=AS_ADMIN, timeout=10)
    assert escaped.status_code in (400, 404)
    grpc_client = triton_grpc.InferenceServerClient(explicit.grpc_target)
    for name in ("../outside/lenet5", "/etc/passwd", "lenet5/../../outside"):
        with pytest.raises(InferenceServerException) as info:
            grpc_client.load_model(name, headers=AS_ADMIN)
        assert str(info.value.status()) == "StatusCode.INVALID_ARGUMENT" and "never a path" in str(info.value)
    with pytest.raises(InferenceServerException) as info:
        grpc_client.load_model("lenet5", headers=AS_ADMIN, config="{}", files={"file:1/model.onnx": b"graph"})
    assert "refused" in str(info.value)
    refused = httpx.post(f"{explicit.url}/v2/repository/models/lenet5/load", headers=AS_ADMIN, timeout=10,
                         json={"parameters": {"config": "{}"}})  # fmt: skip
    assert refused.status_code == 400 and "never a configuration or files" in refused.json()["error"]
    assert state.stat().st_mtime_ns == before  # nothing was declared
    ours = [line for line in explicit.log_path.read_text().splitlines() if "[service." in line]
    assert not [line for line in ours if "outside" in line]  # the service never looked there


def test_a_restart_comes_back_to_the_declared_state(explicit: ServiceProcess) -> None:
    client = triton_http.InferenceServerClient(explicit.url.removeprefix("http://"))
    client.unload_model("resnet18", headers=AS_ADMIN)
    workers = psutil.Process(explicit.process.pid).children(recursive=True) if explicit.process else []
    explicit.stop()
    explicit.start()
    try:
        assert classify(explicit, "resnet18").status_code == 404  # not the start-up state (every model)
        assert classify(explicit, "lenet5").status_code == 200
    finally:
        client = triton_http.InferenceServerClient(explicit.url.removeprefix("http://"))
        client.load_model("resnet18", headers=AS_ADMIN)
    assert workers  # the server that was stopped had its workers


def test_other_modes_refuse_the_repository_api(model_store: ModelStore, tmp_path: Path) -> None:
    from ...helpers import running

    with running(Path(model_store.root), tmp_path / "none.log", MODELS="lenet5") as service:
        http = httpx.post(f"{service.url}/v2/repository/models/lenet5/unload", timeout=10)
        with pytest.raises(InferenceServerException) as info:
            triton_grpc.InferenceServerClient(service.grpc_target).unload_model("lenet5")
    assert http.status_code == 409 and "MODEL_CONTROL=explicit" in http.json()["error"]
    assert str(info.value.status()) == "StatusCode.FAILED_PRECONDITION"


def server_rss(service: ServiceProcess) -> int:
    assert service.process is not None
    root = psutil.Process(service.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


@pytest.mark.slow
def test_twenty_load_unload_cycles_of_resnet18_give_the_memory_back(model_store: ModelStore, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(model_store.model_dir("resnet18"), store / "resnet18", ignore=shutil.ignore_patterns(".staging*"))
    from ...helpers import running

    with running(store, tmp_path / "cycles.log", MODEL_CONTROL="explicit") as service:
        client = triton_http.InferenceServerClient(service.url.removeprefix("http://"))
        loaded, unloaded = [], []
        for _ in range(20):
            client.unload_model("resnet18")
            unloaded.append(server_rss(service))
            client.load_model("resnet18")
            response = httpx.post(f"{service.url}/classify?model=resnet18", content=DIGIT,
                                  headers={"content-type": "image/png"}, timeout=30)  # fmt: skip
            assert response.status_code == 200
            loaded.append(server_rss(service))
    mib = [round(r / 2**20) for r in loaded]
    print(f"\nresident memory with resnet18 loaded, after each of 20 cycles (MiB): {mib}")
    print(f"  unloaded (MiB): {[round(r / 2**20) for r in unloaded]}")
    print(f"  last / first: {loaded[-1] / loaded[0]:.3f}")
    assert loaded[-1] <= 1.10 * loaded[0]
    assert max(unloaded) < min(loaded)  # an unload really gives the sessions back
