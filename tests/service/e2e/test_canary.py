"""CANARY on the real service: a faithful INT8 candidate steps up and is promoted, a random one is rolled back,
and no request fails on the way, over /classify, the Open Inference Protocol's REST and gRPC."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from playwright.sync_api import sync_playwright

from service.store.layout import ModelStore

from ...helpers import ServiceProcess, metric_samples, running
from ..browser import CHROMIUM, draw_a_one, open_tab
from ..canary_load import canary_of, candidates, load
from ..pictures import held_out_drawings

pytestmark = pytest.mark.integration

PNG = {"Content-Type": "image/png"}
# both sides are LeNet-5 (FP32, and INT8 or random weights), about as fast: what their p99s differ by on a busy
# 2-core machine (a CI's) is its noise; the latency checks have tests of their own (tests/service/runtime)
LOADED_MACHINE = {"CANARY_LATENCY_SLACK_MS": "50"}


@pytest.fixture(scope="module")
def canary_store(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's trained LeNet-5, its INT8 variant, and a LeNet-5 with random weights as lenet5_rand."""
    return candidates(model_store.model_dir("lenet5"), tmp_path_factory.mktemp("canary") / "store")


def fresh(store: Path, tmp_path: Path) -> Path:
    """A copy of the store, so that each service has its own canary state beside it."""
    shutil.copytree(store, tmp_path / "store", ignore=shutil.ignore_patterns(".canary.json*"))
    return tmp_path / "store"


def test_a_faithful_int8_canary_steps_up_and_is_promoted_with_no_request_lost(
    canary_store: Path, tmp_path: Path
) -> None:
    images, _ = held_out_drawings(360)
    store = fresh(canary_store, tmp_path)
    with running(store, tmp_path / "service.log", MODELS="lenet5", WORKERS="1", CANARY="lenet5:lenet5_int8:0.1",
                 CANARY_STEPS="0.1,0.5,1.0", CANARY_WINDOW="100", **LOADED_MACHINE) as service:  # fmt: skip
        answers = asyncio.run(load(service, images, 3000))
        canary = canary_of(service)
        metrics = httpx.get(f"{service.url}/metrics", timeout=10).text
    assert len(answers) == 3000  # none failed: each would have raised
    assert {a["model"] for a in answers} == {"lenet5", "lenet5_int8"}
    # every answer names who gave it, over each protocol
    assert all(a["canary"] == ("lenet5:lenet5_int8" if a["model"] == "lenet5_int8" else None) for a in answers)
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
                 CANARY_STEPS="0.5,1.0", CANARY_WINDOW="100", **LOADED_MACHINE) as service:  # fmt: skip
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
    (rolled,) = [line for line in log.splitlines() if "canary lenet5:lenet5_rand ROLLED BACK at fraction 0.5: " in line]
    assert "confidence drift" in rolled


def oip_answers(service: ServiceProcess, image: bytes) -> list[tuple[str, str | None]]:
    """Who answered one Open Inference Protocol request for lenet5 over REST, then gRPC (tritonclient): the response's
    model_name and its ``canary`` parameter."""
    rest = triton_http.InferenceServerClient(service.url.removeprefix("http://"))
    grpc = triton_grpc.InferenceServerClient(service.grpc_target)
    found: list[tuple[str, str | None]] = []
    try:
        for module, client in ((triton_http, rest), (triton_grpc, grpc)):
            files = module.InferInput("image_bytes", [1], "BYTES")
            files.set_data_from_numpy(np.array([image], dtype=object))
            response = client.infer("lenet5", [files]).get_response()
            if module is triton_http:
                found.append((response["model_name"], (response.get("parameters") or {}).get("canary")))
            else:
                marker = response.parameters["canary"].string_param if "canary" in response.parameters else None
                found.append((response.model_name, marker))
    finally:
        rest.close()
        grpc.close()
    return found


def test_the_operator_steers_a_canary_and_the_page_marks_its_answers(canary_store: Path, tmp_path: Path) -> None:
    """Under ADMIN_TOKEN: pause (the primary answers), set the fraction to 1 (the candidate answers, and the page says
    it was a canary's answer), end it; a restart comes back to the state the operator left."""
    images, _ = held_out_drawings(4)
    store = fresh(canary_store, tmp_path)
    admin = {"Authorization": "Bearer boss"}
    env = {"MODELS": "lenet5", "WORKERS": "1", "CANARY": "lenet5:lenet5_int8:0.2", "ADMIN_TOKEN": "boss"}
    with running(store, tmp_path / "service.log", **env) as service:
        started = metric_samples(httpx.get(f"{service.url}/metrics", timeout=10).text, "cnn_canary_requests_total")
        assert {s["side"]: v for s, v in started} == {"primary": 0, "candidate": 0}  # increase() sees a first answer
        url = f"{service.url}/v2/repository/canaries/lenet5"
        assert httpx.post(url, json={"state": "paused"}, timeout=10).status_code == 401
        paused = httpx.post(url, json={"state": "paused"}, headers=admin, timeout=10)
        assert paused.status_code == 200 and paused.json()["fraction"] == 0.0
        answers = [httpx.post(f"{service.url}/classify?model=lenet5", content=image, headers=PNG, timeout=10).json()
                   for image in images * 5]  # fmt: skip
        assert {a["model"] for a in answers} == {"lenet5"} and not any("canary" in a for a in answers)
        assert oip_answers(service, images[0]) == [("lenet5", None), ("lenet5", None)]
        wrong = httpx.post(url, json={"fraction": 2}, headers=admin, timeout=10)
        assert wrong.status_code == 400 and "from 0 to 1" in wrong.json()["error"]
        unknown = httpx.post(f"{service.url}/v2/repository/canaries/resnet50", json={"state": "paused"},
                             headers=admin, timeout=10)  # fmt: skip
        assert unknown.status_code == 404 and "canaries: lenet5" in unknown.json()["error"]
        assert httpx.post(url, json={"state": "running", "fraction": 1.0}, headers=admin, timeout=10).status_code == 200
        answer = httpx.post(f"{service.url}/classify?model=lenet5", content=images[0], headers=PNG, timeout=10).json()
        assert (answer["model"], answer["canary"]) == ("lenet5_int8", "lenet5:lenet5_int8")
        assert oip_answers(service, images[0]) == [("lenet5_int8", "lenet5:lenet5_int8")] * 2
        assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: run `make test-tools`"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            tab = open_tab(browser, service.url)
            tab.page.wait_for_selector("#model-select:not([disabled])")
            tab.page.select_option("#model-select", "lenet5_int8")  # the candidate's card: one precision row
            card = tab.page.inner_text("#model-card")
            tab.page.select_option("#model-select", "lenet5")
            picture = tmp_path / "digit.png"
            picture.write_bytes(images[0])
            tab.page.set_input_files("#file-input", str(picture))
            tab.page.wait_for_selector(".result[data-status=done]")
            meta = tab.page.inner_text(".result .meta")
            canary = tab.page.get_attribute(".result", "data-canary")
            tab.page.wait_for_selector("#draw-panel:not([hidden])")
            draw_a_one(tab.page)  # drawn: the answer, then the layer maps of the version that gave it
            drawn = tab.page.inner_text("#draw-meta")
            layers = [r.url.split("?", 1)[1] for r in tab.requests if "/explain?" in r.url]
            browser.close()
        assert meta.startswith("lenet5_int8 v1 · canary answer (lenet5 → lenet5_int8)"), meta
        assert canary == "lenet5:lenet5_int8"
        assert drawn.startswith("lenet5_int8 v1 · canary answer"), drawn
        assert card.count("precision") == 1 and "INT8, of lenet5 v1, top-1 agreement" in card, card
        assert all(query.startswith("model=lenet5_int8&version=1&") for query in layers), layers  # not lenet5's
        assert tab.console_errors == []
        ended = httpx.post(url, json={"state": "ended"}, headers=admin, timeout=10).json()
        assert (ended["state"], ended["fraction"]) == ("ended", 0.0)
    with running(store, tmp_path / "again.log", **env) as service:  # the operator's state, not CANARY's 0.2
        listed = httpx.get(f"{service.url}/v2/repository/canaries", headers=admin, timeout=10).json()
        assert [(c["primary"], c["state"], c["fraction"]) for c in listed] == [("lenet5", "ended", 0.0)]
