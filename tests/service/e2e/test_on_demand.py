"""MODEL_CONTROL=on-demand: the whole store on a small memory budget, loaded on first request, least recently
used evicted, no request lost; against the real service, the real store and real memory."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from skimage import data as photos

from export.pipeline import ExportOptions, export_model
from service.store.layout import ModelStore
from service.store.metadata import InputMeta
from service.store.preprocess import preprocess

from ...helpers import ServiceProcess, encode, in_child_cgroup, metric_samples, models, running, wait_until
from ..lifecycle_load import Workload, worker_rss

pytestmark = pytest.mark.integration

MiB = 2**20
# lenet5 is pinned; the other four take about 1.3 GiB resident here, and the budget holds about half
ZOO = {"lenet5": 0.35, "resnet18": 0.25, "googlenet": 0.18, "resnet50": 0.12, "alexnet": 0.10}  # how often asked
BUDGET_MIB = 700
RSS_MARGIN_MIB = 150  # what the budget does not count: decoding, request buffers, a load's transient peak
PHOTO = encode(photos.chelsea(), "JPEG", quality=90)
ON_DEMAND = {"MODEL_CONTROL": "on-demand", "WORKERS": "1", "MAX_BATCH_SIZE": "8"}  # warm-up at batch 1 and 8


@pytest.fixture(scope="module")
def zoo(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """Five networks with random weights: the session's three, and AlexNet and ResNet-50 exported here."""
    store = ModelStore(tmp_path_factory.mktemp("zoo") / "store")
    for name in ("lenet5", "resnet18", "googlenet"):
        shutil.copytree(model_store.model_dir(name), store.model_dir(name), ignore=shutil.ignore_patterns(".staging*"))
    for name in ("alexnet", "resnet50"):
        export_model(name, store, ExportOptions(weights="random", progress=False))
    return store


JPEG = {"content-type": "image/jpeg"}


def classify(service: ServiceProcess, model: str) -> httpx.Response:
    return httpx.post(f"{service.url}/classify", params={"model": model}, content=PHOTO, headers=JPEG, timeout=120)


def metric(service: ServiceProcess, name: str) -> dict[tuple[str, ...], float]:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    return {tuple(labels.values()): value for labels, value in metric_samples(text, name)}


def reference(store: ModelStore, name: str) -> np.ndarray:
    """The photo's probabilities from the graph run directly, as an always-loaded server gives them."""
    version = store.latest(name)
    assert version is not None
    spec = InputMeta.model_validate(version.read_metadata()["input"])
    session = ort.InferenceSession(str(version.graph), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"images": preprocess(PHOTO, spec, max_pixels=10**8)[None]})[0][0]


@pytest.fixture(scope="module")
def zoo_service(zoo: ModelStore) -> Iterator[ServiceProcess]:
    env = {**ON_DEMAND, "PINNED": "lenet5", "MEMORY_BUDGET": f"{BUDGET_MIB}MiB"}
    with running(zoo.root, zoo.root.parent / "zoo.log", **env) as service:
        yield service


def test_the_whole_zoo_answers_within_the_budget_and_no_request_fails(
    zoo: ModelStore, zoo_service: ServiceProcess
) -> None:
    listed = {m["name"]: m for m in httpx.get(f"{zoo_service.url}/models", timeout=10).json()["models"]}
    assert set(listed) == set(ZOO) and listed["lenet5"]["residency"]["state"] == "resident"
    assert {listed[n]["status"] for n in ZOO if n != "lenet5"} == {"not loaded"}
    baseline = worker_rss(zoo_service)
    workload = Workload(zoo_service, ZOO, PHOTO, seconds=30)
    workload.run()
    failed = [a for a in workload.answers if a[5] is not None]
    assert not failed, failed[:5]
    asked = {a[0] for a in workload.answers}
    assert asked == set(ZOO), asked
    for name in ZOO:  # the same answers as the graph run directly: cold or warm, HTTP or gRPC
        expected = np.sort(reference(zoo, name))[::-1][:3]
        for answer in (a for a in workload.answers if a[0] == name):
            np.testing.assert_allclose(answer[4], expected, atol=1e-4)
    evictions = metric(zoo_service, "cnn_model_evictions_total")
    loads = metric(zoo_service, "cnn_model_loads_total")
    assert sum(evictions.values()) > 0
    assert not any(v for (model, _), v in evictions.items() if model == "lenet5")  # pinned: never evicted
    waits = sum(metric(zoo_service, "cnn_cold_start_waits_total").values())
    peak, budget = max(workload.rss), BUDGET_MIB * MiB
    cold = [a[3] for a in workload.answers if a[3] > 0.3]
    print(f"\n{len(workload.answers)} requests, 0 failed; {int(sum(loads.values()))} loads, "
          f"{int(sum(evictions.values()))} evictions, {int(waits)} requests waited for a cold start "
          f"(p50 {np.median(cold) if cold else 0:.2f} s); worker RSS {baseline / MiB:.0f} MiB at start (LeNet-5 "
          f"pinned), peak {peak / MiB:.0f} MiB; budget + baseline {(budget + baseline) / MiB:.0f} MiB")  # fmt: skip
    costs = {m["name"]: m["residency"].get("measured_bytes", m["residency"].get("bytes_when_resident", 0)) // MiB
             for m in httpx.get(f"{zoo_service.url}/models", timeout=10).json()["models"]}  # fmt: skip
    print(f"resident MiB its load added, per model (largest measured): {costs}")
    assert peak <= baseline + budget + RSS_MARGIN_MIB * MiB


def test_a_long_request_is_not_evicted_under_and_concurrent_first_requests_share_one_load(
    zoo: ModelStore, tmp_path: Path
) -> None:
    """Room for LeNet-5 (pinned) and one of ResNet-18 (294 MiB by its export's estimate) and GoogLeNet (229): GoogLeNet
    waits for ResNet-18's occlusion (170 copies of the photo through it) to finish before ResNet-18 makes room;
    then eight first requests for ResNet-18 again cause one load."""
    env = {**ON_DEMAND, "PINNED": "lenet5", "MEMORY_BUDGET": "330MiB"}
    with running(zoo.root, tmp_path / "long.log", **env) as service:
        assert classify(service, "resnet18").status_code == 200
        done: dict[str, float] = {}

        def explain() -> int:
            response = httpx.post(f"{service.url}/explain", params={"model": "resnet18", "method": "occlusion"},
                                  content=PHOTO, headers=JPEG, timeout=120)  # fmt: skip
            done["explain"] = time.monotonic()
            return response.status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            long = pool.submit(explain)
            wait_until(lambda: long.done() or any(v["in_flight"] for v in models(service)["resnet18"]["served"]),
                       30, "the occlusion holding ResNet-18")  # fmt: skip
            other = classify(service, "googlenet")
            answered = time.monotonic()
            assert long.result() == 200 and other.status_code == 200, other.text
            assert answered >= done["explain"]  # GoogLeNet's load waited for ResNet-18 to fall idle
            evictions = metric(service, "cnn_model_evictions_total")
            assert evictions.get(("resnet18", "pressure")) == 1.0
            firsts = list(pool.map(lambda _: classify(service, "resnet18").status_code, range(8)))
        assert firsts == [200] * 8
        loads = metric(service, "cnn_model_loads_total")
        assert loads[("resnet18", "request")] == 2.0  # once at the start of this test, once for the eight
        # 50 load/evict cycles: the memory an eviction frees goes back
        rss = []
        for _ in range(50):
            for name in ("googlenet", "resnet18"):
                assert classify(service, name).status_code == 200
            rss.append(worker_rss(service))
        print(f"\nworker RSS after cycle 1: {rss[0] / MiB:.0f} MiB, 10: {rss[9] / MiB:.0f}, 50: {rss[-1] / MiB:.0f}")
        # the first cycles still find the allocator's pages to settle (338 -> 379 MiB seen once in CI); after them,
        # 40 more cycles must not grow it: a leak of even 2 MiB a cycle fails
        assert rss[-1] <= 1.25 * rss[0] and rss[-1] - rss[9] <= 64 * MiB


def test_where_no_room_can_be_made_the_answer_is_503_with_its_reason(zoo: ModelStore, tmp_path: Path) -> None:
    env = {**ON_DEMAND, "PINNED": "lenet5,resnet18", "MEMORY_BUDGET": "400MiB"}  # ResNet-18 counts 294 MiB
    with running(zoo.root, tmp_path / "full.log", **env) as service:
        assert metric(service, "cnn_budget_exhausted_total")[("googlenet",)] == 0.0  # before: increase() sees 0 -> 1
        refused = classify(service, "googlenet")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert "held by pinned models (lenet5, resnet18)" in refused.json()["error"]
        too_large = classify(service, "resnet50")  # its export's estimate: 610 MiB
        assert too_large.status_code == 503 and "it cannot be served here" in too_large.json()["error"]
        assert classify(service, "resnet18").status_code == 200
        assert metric(service, "cnn_budget_exhausted_total")[("googlenet",)] == 1.0
        assert metric(service, "cnn_budget_exhausted_total")[("resnet50",)] == 1.0
        unknown = classify(service, "vgg99")
        assert unknown.status_code == 404 and "googlenet" in unknown.json()["error"]  # the store's models
        # the page offers every model of the store, and says which take a cold start
        from playwright.sync_api import sync_playwright

        from ..browser import CHROMIUM, open_tab

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = open_tab(browser, service.url).page
            page.wait_for_selector("#model-select:not([disabled])")
            options = {o.get_attribute("value"): (o.inner_text(), o.is_enabled())
                       for o in page.query_selector_all("#model-select option")}  # fmt: skip
            browser.close()
        assert options["googlenet"] == ("googlenet (GoogLeNet) — loads on first use", True)
        assert options["resnet18"] == ("resnet18 (ResNet)", True) and set(options) == {
            "lenet5",
            "resnet18",
            "googlenet",
            "alexnet",
            "resnet50",
        }


def test_the_page_learns_what_a_cold_model_offers_from_its_first_answer(zoo: ModelStore, tmp_path: Path) -> None:
    """LeNet-5 not resident: /models has no layer maps to offer for it until it loads, and the page read /models
    again only while a model said "loading", so a drawing's layer maps and the card's memory row waited for a
    reload of the page."""
    from playwright.sync_api import sync_playwright

    from ..browser import CHROMIUM, draw_a_one, open_tab

    with running(zoo.root, tmp_path / "page.log", **ON_DEMAND) as service, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        tab = open_tab(browser, service.url)
        tab.page.wait_for_selector("#model-select:not([disabled])")
        tab.page.select_option("#model-select", "lenet5")
        before = tab.page.inner_text("#model-card")
        draw_a_one(tab.page)
        tab.page.wait_for_selector("#layers:not([hidden])", timeout=30_000)
        after = tab.page.inner_text("#model-card")
        maps = len(tab.page.query_selector_all("#layers canvas"))
        browser.close()
    assert "not resident" in before and "MiB resident" in after, after
    assert maps == 6 + 6 + 16 + 16 and tab.console_errors == []


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cgroup.controllers": "memory", "memory.max": "max", "pod/memory.max": "1073741824"}, 2**30),  # v2
        ({"cgroup.controllers": "memory", "memory.max": "max", "pod/memory.max": "max"}, None),
        ({"memory/memory.limit_in_bytes": "9223372036854771712", "memory/pod/memory.limit_in_bytes": "536870912"},
         2**29),  # v1, the root's "no limit" ignored
    ],
)  # fmt: skip
def test_the_cgroup_memory_limit_is_the_tightest_on_the_way_up(
    tmp_path: Path, files: dict[str, str], expected: int | None
) -> None:
    from service.memory import cgroup_memory_limit

    for name, text in files.items():
        (tmp_path / "cgroup" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cgroup" / name).write_text(text + "\n")
    v2 = "cgroup.controllers" in files
    (tmp_path / "self").write_text("0::/pod\n" if v2 else "5:memory:/pod\n")
    assert cgroup_memory_limit(tmp_path / "cgroup", tmp_path / "self") == expected


def test_the_default_budget_comes_from_a_real_cgroup_memory_limit() -> None:
    probe = "from service.memory import default_budget; print(*default_budget(100 * 2**20, 2))"
    inside = in_child_cgroup("memory", {"memory.limit_in_bytes": str(2 * 2**30)}, probe)
    assert inside.returncode == 0, inside.stderr
    budget, how = inside.stdout.split(" ", 1)
    assert int(budget) == int(2 * 2**30 * 0.9) - 2 * 100 * 2**20
    assert how.startswith("the cgroup memory limit 2048 MiB")


def test_two_workers_share_the_budget_and_idle_models_are_unloaded(zoo: ModelStore, tmp_path: Path) -> None:
    env = {**ON_DEMAND, "WORKERS": "2", "PINNED": "lenet5", "MEMORY_BUDGET": "1GiB", "IDLE_UNLOAD_S": "10"}
    with running(zoo.root, tmp_path / "workers.log", **env) as service:
        assert metric(service, "cnn_memory_budget_bytes")[()] == 2**30  # each worker half of it, summed
        for _ in range(6):  # new connections: either worker may answer, and loads its own
            with httpx.Client(base_url=service.url, timeout=120) as client:
                response = client.post("/classify", params={"model": "googlenet"}, content=PHOTO, headers=JPEG)
                assert response.status_code == 200
        loads = metric(service, "cnn_model_loads_total")
        assert 1 <= loads[("googlenet", "request")] <= 2
        # idle for IDLE_UNLOAD_S (10 s: longer than a worker goes unasked between the requests above, the other's
        # GoogLeNet cold start on a busy machine included), then a sweep
        wait_until(lambda: metric(service, "cnn_model_evictions_total").get(("googlenet", "idle")) == loads[
            ("googlenet", "request")], 60, "each worker's googlenet unloaded as idle")  # fmt: skip
        evictions = metric(service, "cnn_model_evictions_total")
        assert evictions[("googlenet", "idle")] == loads[("googlenet", "request")]
        assert not evictions.get(("lenet5", "idle"))  # pinned
    assert "shared by 2 workers" in (tmp_path / "workers.log").read_text()


def test_a_soak_mixing_versions_shadow_and_explanations_loses_nothing_and_counts_what_is_resident(
    zoo: ModelStore, tmp_path: Path
) -> None:
    """Issue #34's soak: the five networks under the skewed load (HTTP and gRPC) with requests for LeNet-5's older
    version, a shadow of ResNet-18 by GoogLeNet, Grad-CAMs of LeNet-5 and coarse occlusions of ResNet-18 mixed in.
    No request fails; afterwards what the budget counts is what the resident versions' exports estimate (and LeNet-5's
    explanation graph, scaled from its estimate by the graphs' sizes) within 5%; the model-control thread still
    sweeps idle models."""
    store = ModelStore(tmp_path / "store")  # the zoo, with LeNet-5 twice: version 2 serves, version 1 when asked
    shutil.copytree(zoo.root, store.root, copy_function=os.link)
    shutil.copytree(zoo.model_dir("lenet5") / "1", store.model_dir("lenet5") / "2", copy_function=os.link)
    env = {**ON_DEMAND, "PINNED": "lenet5", "MEMORY_BUDGET": f"{BUDGET_MIB}MiB", "IDLE_UNLOAD_S": "6",
           "SHADOW": "resnet18:googlenet:0.3"}  # fmt: skip
    digit = encode(np.full((28, 28), 255, dtype=np.uint8))
    mixed: list[tuple[str, int, str]] = []
    stop = threading.Event()

    def mix() -> None:
        asks = [
            ("/classify", {"model": "lenet5", "version": "1"}, digit, "image/png"),
            ("/explain", {"model": "lenet5", "method": "gradcam"}, digit, "image/png"),
            ("/explain", {"model": "resnet18", "method": "occlusion", "patch": "112", "stride": "112"}, PHOTO,
             "image/jpeg"),
        ]  # fmt: skip
        with httpx.Client(base_url=service.url, timeout=120) as client:
            while not stop.is_set():
                for path, params, body, kind in asks:
                    response = client.post(path, params=params, content=body, headers={"content-type": kind})
                    mixed.append((path, response.status_code, response.text[:200]))
                stop.wait(0.5)  # a share of the traffic, not a second saturating load on two cores

    with running(store.root, tmp_path / "soak.log", **env) as service:
        mixers = [threading.Thread(target=mix)]
        for thread in mixers:
            thread.start()
        workload = Workload(service, ZOO, PHOTO, seconds=30, concurrency=6)
        try:
            workload.run()
        finally:
            stop.set()
            for thread in mixers:
                thread.join(120)
        failed = [a for a in workload.answers if a[5] is not None] + [m for m in mixed if m[1] != 200]
        assert not failed, failed[:5]
        assert {path for path, _, _ in mixed} == {"/classify", "/explain"}
        models = {m["name"]: m for m in httpx.get(f"{service.url}/models", timeout=10).json()["models"]}
        expected, counted = 0, 0
        for name, info in models.items():
            if info["residency"]["state"] != "resident":
                continue
            counted += info["residency"]["bytes"]
            for served in (s for s in info["served"] if s["status"] == "ready"):
                version = store.model_dir(name) / str(served["version"])
                estimate = json.loads((version / "metadata.json").read_text())["memory"]["resident_estimate_bytes"]
                expected += estimate
                if name == "lenet5" and served["version"] == 2:  # its Grad-CAMs opened version 2's graph
                    graphs = (version / "explain.onnx").stat().st_size / (version / "model.onnx").stat().st_size
                    expected += int(estimate * graphs)
        shadowed = models["resnet18"]["shadow"][0]
        print(f"\n{len(workload.answers) + len(mixed)} requests ({len(mixed)} versioned or explanations), 0 failed; "
              f"counted {counted / MiB:.0f} MiB for the resident versions, their estimates {expected / MiB:.0f} MiB; "
              f"shadowed {shadowed['images']} images, skipped {shadowed['skipped']}")  # fmt: skip
        assert {s["version"] for s in models["lenet5"]["served"]} == {1, 2}
        assert abs(counted - expected) <= 0.05 * expected
        assert shadowed["images"] + sum(shadowed["skipped"].values()) > 0

        def idle_evictions() -> float:
            return sum(v for (_, reason), v in metric(service, "cnn_model_evictions_total").items() if reason == "idle")

        idle_before = idle_evictions()
        # IDLE_UNLOAD_S, then a sweep (every 1.5 s at this setting): the model-control thread is alive and sweeping
        wait_until(lambda: idle_evictions() > idle_before, 60, "an idle model unloaded after the soak")
