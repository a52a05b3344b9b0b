"""CANARY on the real service: a faithful INT8 candidate steps up and is promoted, a random one is rolled back,
and no request fails on the way, over /classify, the Open Inference Protocol's REST and gRPC."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from playwright.sync_api import sync_playwright
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from export.pipeline import ExportOptions, export_model
from export.precision import VariantOptions, export_variant
from service.store.layout import ModelStore

from ...helpers import ServiceProcess, metric_samples, running
from ..browser import CHROMIUM, open_tab
from ..pictures import held_out_drawings

pytestmark = pytest.mark.integration

CONCURRENCY = 8
PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def canary_store(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's trained LeNet-5, its INT8 variant, and a LeNet-5 with random weights as lenet5_rand."""
    root = tmp_path_factory.mktemp("canary") / "store"
    shutil.copytree(model_store.model_dir("lenet5"), root / "lenet5")
    store = ModelStore(root)
    export_variant("lenet5", store, VariantOptions("int8", recipe="u8s8"))
    export_model("lenet5", store, ExportOptions(weights="random", as_name="lenet5_rand", progress=False))
    return root


def fresh(store: Path, tmp_path: Path) -> Path:
    """A copy of the store, so that each service has its own canary state beside it."""
    shutil.copytree(store, tmp_path / "store", ignore=shutil.ignore_patterns(".canary.json*"))
    return tmp_path / "store"


async def one(client: httpx.AsyncClient, channel: grpc.aio.Channel, i: int, image: bytes) -> tuple[str, str, bool]:
    """Request ``i`` for lenet5, over gRPC (every tenth from the 5th), OIP REST (every tenth from the 9th) or
    /classify: (the model that answered, its version, whether the answer says a canary gave it)."""
    if i % 10 == 5:
        request = pb.ModelInferRequest(model_name="lenet5")
        request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(len(image).to_bytes(4, "little") + image)
        response = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        return response.model_name, response.model_version, response.model_name == "lenet5_int8"
    if i % 10 == 9:
        header = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": len(image) + 4}}]}).encode()  # fmt: skip
        reply = await client.post("/v2/models/lenet5/infer", content=header + len(image).to_bytes(4, "little") + image,
                                  headers={"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
        assert reply.status_code == 200, reply.text
        size = int(reply.headers.get("Inference-Header-Content-Length", len(reply.content)))
        body = json.loads(reply.content[:size])
        return body["model_name"], body["model_version"], body["model_name"] == "lenet5_int8"
    reply = await client.post("/classify", params={"model": "lenet5"}, content=image,
                              headers={"Content-Type": "image/png"})  # fmt: skip
    assert reply.status_code == 200, reply.text
    body = reply.json()
    return body["model"], body["version"], body.get("canary") == "lenet5:lenet5_int8"


async def load(service: ServiceProcess, images: list[bytes], count: int, watch: bool = False) -> list[dict[str, Any]]:
    """``count`` requests at CONCURRENCY; each answer with when it was sent. ``watch``: also when /models first
    said the canary was rolled back (a record with ``rolled_back_at``)."""
    answers: list[dict[str, Any]] = []
    rolled_back_at: list[float] = []
    queue = iter(range(count))
    async with (
        httpx.AsyncClient(base_url=service.url, timeout=60) as client,
        grpc.aio.insecure_channel(service.grpc_target) as channel,
    ):

        async def worker() -> None:
            for i in queue:
                sent = time.monotonic()
                model, version, marked = await one(client, channel, i, images[i % len(images)])
                answers.append({"i": i, "sent": sent, "model": model, "version": version, "marked": marked})

        async def watcher() -> None:
            while not rolled_back_at:
                models = (await client.get("/models")).json()["models"]
                if next(m for m in models if m["name"] == "lenet5")["canary"]["state"] == "rolled_back":
                    rolled_back_at.append(time.monotonic())
                await asyncio.sleep(0.05)

        watching = asyncio.get_running_loop().create_task(watcher()) if watch else None
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        if watching is not None:
            await asyncio.wait_for(watching, 10)
    return answers + [{"rolled_back_at": at} for at in rolled_back_at]


def canary_of(service: ServiceProcess) -> dict[str, Any]:
    models = httpx.get(f"{service.url}/models", timeout=10).json()["models"]
    return next(m for m in models if m["name"] == "lenet5")["canary"]


def test_a_faithful_int8_canary_steps_up_and_is_promoted_with_no_request_lost(
    canary_store: Path, tmp_path: Path
) -> None:
    images, _ = held_out_drawings(360)
    store = fresh(canary_store, tmp_path)
    with running(store, tmp_path / "service.log", MODELS="lenet5", WORKERS="1", CANARY="lenet5:lenet5_int8:0.1",
                 CANARY_STEPS="0.1,0.5,1.0", CANARY_WINDOW="100") as service:  # fmt: skip
        answers = asyncio.run(load(service, images, 3000))
        canary = canary_of(service)
        metrics = httpx.get(f"{service.url}/metrics", timeout=10).text
    assert len(answers) == 3000  # none failed: each would have raised
    assert {a["model"] for a in answers} == {"lenet5", "lenet5_int8"}
    assert all(a["marked"] == (a["model"] == "lenet5_int8") for a in answers)  # every answer names who gave it
    assert canary["state"] == "promoted" and canary["fraction"] == 1.0, canary
    windows = canary["history"]
    assert [w["figures"]["fraction"] for w in windows] == [0.1, 0.5, 1.0] and all(w["passed"] for w in windows)
    for window in windows[:2]:  # each step's share of the requests it saw, within 3 points of its fraction
        routed = window["figures"]["requests"]
        share = routed["candidate"] / (routed["candidate"] + routed["primary"])
        assert abs(share - window["figures"]["fraction"]) <= 0.03, window
        assert window["figures"]["top1_agreement"] >= 0.97 and window["figures"]["compared"] >= 25, window
    last = sorted(answers, key=lambda a: a["sent"])[-500:]
    assert {a["model"] for a in last} == {"lenet5_int8"}  # promoted: the candidate answers everything
    state = {s["state"]: v for s, v in metric_samples(metrics, "cnn_canary_state")}
    assert state["promoted"] == 1 and state["running"] == 0 and state["rolled_back"] == 0
    sides = {s["side"]: v for s, v in metric_samples(metrics, "cnn_canary_requests_total")}
    assert sides["primary"] + sides["candidate"] == 3000
    assert "PROMOTED: lenet5_int8 now answers every request for lenet5" in (tmp_path / "service.log").read_text()
    stored = json.loads((store / ".canary.json").read_text())["canaries"]["lenet5:lenet5_int8"]
    assert stored["state"] == "promoted"


def test_a_random_candidate_is_rolled_back_within_one_window(canary_store: Path, tmp_path: Path) -> None:
    images, _ = held_out_drawings(360)
    store = fresh(canary_store, tmp_path)
    with running(store, tmp_path / "service.log", MODELS="lenet5", WORKERS="1", CANARY="lenet5:lenet5_rand:0.5",
                 CANARY_STEPS="0.5,1.0", CANARY_WINDOW="100") as service:  # fmt: skip
        records = asyncio.run(load(service, images, 600, watch=True))
        canary = canary_of(service)
        metrics = httpx.get(f"{service.url}/metrics", timeout=10).text
        after = asyncio.run(load(service, images, 100))
    (seen,) = [r["rolled_back_at"] for r in records if "rolled_back_at" in r]
    answers = [r for r in records if "model" in r]
    assert len(answers) == 600 and len(after) == 100  # none failed
    assert canary["state"] == "rolled_back" and canary["fraction"] == 0.0
    (window,) = canary["history"]  # the first window failed
    assert not window["passed"] and window["figures"]["answers"] == 100
    assert "confidence drift" in canary["reason"] and canary["reason"] == "; ".join(window["failures"])
    assert window["figures"]["confidence_drift"] > 0.1
    by_candidate = [a for a in answers if a["model"] == "lenet5_rand"]
    assert 100 <= len(by_candidate) <= 110  # one window, and the few in flight when it closed
    assert not [a for a in answers if a["sent"] > seen and a["model"] == "lenet5_rand"]  # none sent after it
    assert {a["model"] for a in after} == {"lenet5"}
    state = {s["state"]: v for s, v in metric_samples(metrics, "cnn_canary_state")}
    assert state["rolled_back"] == 1
    log = (tmp_path / "service.log").read_text()
    assert "canary lenet5:lenet5_rand ROLLED BACK at fraction 0.5: confidence drift" in log


def test_the_operator_steers_a_canary_and_the_page_marks_its_answers(canary_store: Path, tmp_path: Path) -> None:
    """Under ADMIN_TOKEN: pause (the primary answers), set the fraction to 1 (the candidate answers, and the page says
    it was a canary's answer), end it; a restart comes back to the state the operator left."""
    images, _ = held_out_drawings(4)
    store = fresh(canary_store, tmp_path)
    admin = {"Authorization": "Bearer boss"}
    env = {"MODELS": "lenet5", "WORKERS": "1", "CANARY": "lenet5:lenet5_int8:0.2", "ADMIN_TOKEN": "boss"}
    with running(store, tmp_path / "service.log", **env) as service:
        url = f"{service.url}/v2/repository/canaries/lenet5"
        assert httpx.post(url, json={"state": "paused"}, timeout=10).status_code == 401
        paused = httpx.post(url, json={"state": "paused"}, headers=admin, timeout=10)
        assert paused.status_code == 200 and paused.json()["fraction"] == 0.0
        answers = [httpx.post(f"{service.url}/classify?model=lenet5", content=image, headers=PNG, timeout=10).json()
                   for image in images * 5]  # fmt: skip
        assert {a["model"] for a in answers} == {"lenet5"} and not any("canary" in a for a in answers)
        wrong = httpx.post(url, json={"fraction": 2}, headers=admin, timeout=10)
        assert wrong.status_code == 400 and "from 0 to 1" in wrong.json()["error"]
        unknown = httpx.post(f"{service.url}/v2/repository/canaries/resnet50", json={"state": "paused"},
                             headers=admin, timeout=10)  # fmt: skip
        assert unknown.status_code == 404 and "canaries: lenet5" in unknown.json()["error"]
        assert httpx.post(url, json={"state": "running", "fraction": 1.0}, headers=admin, timeout=10).status_code == 200
        answer = httpx.post(f"{service.url}/classify?model=lenet5", content=images[0], headers=PNG, timeout=10).json()
        assert (answer["model"], answer["canary"]) == ("lenet5_int8", "lenet5:lenet5_int8")
        assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: run `make test-tools`"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            tab = open_tab(browser, service.url)
            tab.page.wait_for_selector("#model-select:not([disabled])")
            tab.page.select_option("#model-select", "lenet5")
            picture = tmp_path / "digit.png"
            picture.write_bytes(images[0])
            tab.page.set_input_files("#file-input", str(picture))
            tab.page.wait_for_selector(".result[data-status=done]")
            meta = tab.page.inner_text(".result .meta")
            canary = tab.page.get_attribute(".result", "data-canary")
            browser.close()
        assert meta.startswith("lenet5_int8 v1 · canary answer (lenet5 → lenet5_int8)"), meta
        assert canary == "lenet5:lenet5_int8"
        ended = httpx.post(url, json={"state": "ended"}, headers=admin, timeout=10).json()
        assert (ended["state"], ended["fraction"]) == ("ended", 0.0)
    with running(store, tmp_path / "again.log", **env) as service:  # the operator's state, not CANARY's 0.2
        listed = httpx.get(f"{service.url}/v2/repository/canaries", headers=admin, timeout=10).json()
        assert [(c["primary"], c["state"], c["fraction"]) for c in listed] == [("lenet5", "ended", 0.0)]
