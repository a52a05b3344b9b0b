"""The monitoring stack: a real Prometheus scraping the real service with the repository's configuration."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from prometheus_client.parser import text_string_to_metric_families
from skimage import data

from service.store.layout import ModelStore

from ..helpers import ROOT, ServiceProcess, encode, metric_samples, prometheus, query, running, tool

MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "cnn-serving.json"
SCRAPE_JOB = "serving/cnn-serving"


def test_compose_files_validate(tmp_path: Path) -> None:
    compose = tool("docker-compose")
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]):
        args = [a for f in files for a in ("-f", f)]
        result = subprocess.run([compose, *args, "config"], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        config = yaml.safe_load(result.stdout)
        assert {"classifier", "prometheus", "grafana"} <= set(config["services"])
        assert all("healthcheck" in service for service in config["services"].values())
    gpu = config["services"]["classifier"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert gpu["count"] == 1  # the service uses CUDA's device 0: more would be held and never used
    assert config["services"]["classifier"]["image"] == "cnn-classifier:latest-gpu"  # the GPU bento's image
    environment = config["services"]["classifier"]["environment"]
    assert environment["PROVIDERS"] == "cuda" and environment["WORKERS"] == "0"  # the service's sizing, not 1
    text = (ROOT / "docker-compose.yml").read_text().lower()
    assert "password: ${" in text and "password: admin" not in text  # no secret in the file
    for name in ("prometheus", "grafana"):  # loopback unless MONITORING_BIND; docker-compose v1 writes a string
        (port,) = config["services"][name]["ports"]
        assert (port.split(":")[0] if isinstance(port, str) else port["host_ip"]) == "127.0.0.1", (name, port)


def test_prometheus_config_is_valid() -> None:
    result = subprocess.run([tool("promtool"), "check", "config", str(MONITORING / "prometheus.yml")],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def dashboard_module() -> Any:
    sys.path.insert(0, str(MONITORING))
    try:
        import dashboard
    finally:
        sys.path.remove(str(MONITORING))
    return dashboard


def features(expr: str) -> set[str]:
    """The settings an expression's series need (``dashboard.FEATURES``): none for most."""
    return {setting for prefix, setting in dashboard_module().FEATURES.items() if prefix in expr}


def test_dashboard_json_is_the_generated_one() -> None:
    dashboard = dashboard_module()
    assert DASHBOARD.read_text() == dashboard.render(), "stale: run `make dashboard`"
    variables = [v["name"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"]]
    assert variables == ["job", "model"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("bentofile", "name", "libraries"),
    [
        ("bentofile.yaml", "cnn_classifier", ()),
        (
            "bentofile.gpu.yaml",
            "cnn_classifier_gpu",
            ("onnxruntime-gpu[cuda,cudnn]", "nvidia-cudnn-cu13", "nvidia-cublas"),
        ),
    ],
)
def test_bentoml_build_makes_a_bento_without_torch(
    tmp_path: Path, bentofile: str, name: str, libraries: tuple[str, ...]
) -> None:
    """The CPU bento and the GPU one (CUDA's and cuDNN's libraries from NVIDIA's wheels, PROVIDERS=cuda)."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "true"}
    bentoml = str(Path(sys.executable).parent / "bentoml")
    result = subprocess.run([bentoml, "build", "-f", bentofile, "."], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (bento,) = [p for p in (tmp_path / "bentos" / name).iterdir() if p.name != "latest"]
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime-gpu" in requirements and "torch" not in requirements
    assert all(library in requirements for library in libraries)
    assert ("PROVIDERS" in (bento / "env" / "docker" / "Dockerfile").read_text()) == bool(libraries)
    assert (bento / "src" / "service" / "service.py").is_file()
    assert not (bento / "src" / "model_store").exists()  # mounted, never baked in

    # the image BentoML's `containerize` builds from this Dockerfile (rendered here with no container engine)
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "torch" not in dockerfile.lower()
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1] == "bentoml"  # the last USER is the one that runs: non-root (uid 1034)
    exposed = {int(line.split()[1]) for line in dockerfile.splitlines() if line.startswith("EXPOSE ")}
    assert {3000, 8001} <= exposed
    page = bento / "src" / "service" / "frontends" / "page" / "static"
    assert {"index.html", "page.js", "page.css", "docs.html", "docs.js"} <= {p.name for p in page.iterdir()}


@contextlib.contextmanager
def scraping(service: ServiceProcess, directory: Path) -> Iterator[str]:
    """Prometheus with the repository's scrape configuration, pointed at ``service``.

    The job is renamed, as a cluster's Prometheus names it after the Service: the dashboard
    must not depend on docker-compose's job name.
    """
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["rule_files"] = [str(MONITORING / "alerts.yml")]
    (job,) = config["scrape_configs"]
    job["job_name"] = SCRAPE_JOB
    job["static_configs"] = [{"targets": [f"127.0.0.1:{service.port}"]}]
    with prometheus(directory, config) as url:
        yield url


@pytest.fixture(scope="module")
def prometheus_url(service: ServiceProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with scraping(service, tmp_path_factory.mktemp("prometheus")) as url:
        yield url


def typical(service: ServiceProcess, body: bytes) -> bool:
    answer = httpx.post(f"{service.url}/classify?model=lenet5", content=body, headers={"Content-Type": "image/png"})
    return bool(answer.json()["results"][0]["typical"])


def mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def images_by_protocol(service: ServiceProcess) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    return {(s["model"], s["protocol"]): v for s, v in metric_samples(text, "cnn_images_total")}


def send_mixed_load(service: ServiceProcess) -> dict[tuple[str, str], int]:
    """HTTP and gRPC, two models, some client errors; returns the images sent that must succeed."""
    photo = encode(data.chelsea(), "JPEG")
    digit = encode(np.full((28, 28), 255, dtype=np.uint8))

    jpeg = {"Content-Type": "image/jpeg"}
    pair = [("image", ("a.png", digit)), ("image", ("b.png", digit))]

    async def http_load() -> None:
        async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
            models = ["resnet18", "lenet5"] * 10
            ok = [client.post(f"/classify?model={m}", content=photo, headers=jpeg) for m in models]
            two = [client.post("/classify?model=lenet5", files=pair) for _ in range(5)]
            bad = [
                client.post("/classify?model=nope", content=photo, headers=jpeg),
                client.post("/classify?model=resnet18", content=b"junk", headers=jpeg),
            ]
            responses = await asyncio.gather(*ok, *two, *bad)
            assert [r.status_code for r in responses] == [200] * 25 + [404, 400]

    asyncio.run(http_load())
    client = triton_grpc.InferenceServerClient(service.grpc_target)
    files = triton_grpc.InferInput("image_bytes", [3], "BYTES")
    files.set_data_from_numpy(np.array([photo] * 3, dtype=object))
    for _ in range(4):
        client.infer("resnet18", [files])
    return {("resnet18", "http"): 10, ("lenet5", "http"): 10 + 5 * 2, ("resnet18", "grpc"): 4 * 3}


@pytest.mark.integration
def test_every_dashboard_query_returns_data_and_counters_match(service: ServiceProcess, prometheus_url: str) -> None:
    before = images_by_protocol(service)
    sent = send_mixed_load(service)
    after = images_by_protocol(service)
    for key, count in sent.items():
        assert after.get(key, 0) - before.get(key, 0) == count, key

    # Prometheus has scraped the final counts
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        scraped = {(r["metric"]["model"], r["metric"]["protocol"]): float(r["value"][1])
                   for r in query(prometheus_url, "cnn_images_total")}  # fmt: skip
        if all(scraped.get(key) == after[key] for key in sent):
            break
        time.sleep(1)
    assert all(scraped.get(key) == after[key] for key in sent), (scraped, after)

    empty = unanswered_dashboard_queries(prometheus_url)
    assert not empty, f"dashboard queries without data: {empty}"


def empty_dashboard_queries(prometheus_url: str, on: frozenset[str] = frozenset()) -> list[str]:
    """The dashboard's queries that return nothing, of those whose features (``dashboard.FEATURES``) are ``on``."""
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"] if features(t["expr"]) <= on]
    empty = []
    for expr in expressions:
        concrete = expr.replace("$job", SCRAPE_JOB).replace("$model", ".*").replace("$__rate_interval", "1m")
        if not query(prometheus_url, concrete):
            empty.append(expr)
    return empty


def unanswered_dashboard_queries(
    prometheus_url: str, on: frozenset[str] = frozenset(), of: Callable[[str], object] = bool, within: float = 30
) -> list[str]:
    """Those of :func:`empty_dashboard_queries` that ``of`` keeps, once none is left or after ``within`` seconds: a
    rate needs two scrapes in its window, and a busy machine delays the scrape of the last series to appear."""
    deadline = time.monotonic() + within
    while (empty := [e for e in empty_dashboard_queries(prometheus_url, on) if of(e)]) and time.monotonic() < deadline:
        time.sleep(1)
    return empty


@pytest.mark.integration
def test_every_dashboard_query_answers_on_a_server_that_only_classified_digits(
    service: ServiceProcess, model_store: ModelStore, digits_folder: Path, tmp_path: Path
) -> None:
    """Real handwritten digits, none unfamiliar to the trained LeNet-5: the "unfamiliar images" panel reads 0
    (its counter exists from the load on), not "No data", and so does every other panel."""
    candidates = [path.read_bytes() for path in sorted(digits_folder.rglob("*.png"))[::9]]
    digits = [body for body in candidates if typical(service, body)]  # the session's service: the same graph
    assert len(digits) > 150
    store, log, directory = Path(model_store.root), tmp_path / "service.log", mkdir(tmp_path / "prometheus")
    with running(store, log, MODELS="lenet5", DRIFT_WINDOW="20") as fresh, scraping(fresh, directory) as url:
        with httpx.Client(base_url=fresh.url, timeout=30) as client:
            for body in digits:
                answer = client.post("/classify?model=lenet5", content=body, headers={"Content-Type": "image/png"})
                assert answer.status_code == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not query(url, f"cnn_images_total >= {len(digits)}"):
            time.sleep(1)
        empty = unanswered_dashboard_queries(url)
        atypical = query(url, "cnn_prediction_atypical_total")
        assert atypical and all(float(r["value"][1]) == 0 for r in atypical), atypical
        assert not empty, f"dashboard queries without data: {empty}"


def queried_metric_names(on: frozenset[str] = frozenset()) -> set[str]:
    """Every ``cnn_*`` and ``process_*`` series the dashboard, the alerts and the autoscaler query, of those whose
    features are ``on``."""
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    alerts = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    expressions += [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    keda = ROOT / "deploy" / "kubernetes" / "components" / "keda" / "scaledobject.yaml"
    expressions += [t["metadata"]["query"] for t in yaml.safe_load(keda.read_text())["spec"]["triggers"]]
    names = {name for expr in expressions for name in re.findall(r"\b(?:cnn|process)_[a-z_]+\b", expr)}
    return {name for name in names if features(name) <= on}


@pytest.mark.integration
def test_metrics_exposes_every_series_the_dashboard_alerts_and_autoscaler_query(service: ServiceProcess) -> None:
    """/metrics is the service's own (BentoML's is off): nothing a panel, an alert or KEDA reads may go missing."""
    digit = encode(np.full((28, 28), 255, dtype=np.uint8))
    response = httpx.post(f"{service.url}/classify?model=lenet5", content=digit, headers={"Content-Type": "image/png"})
    assert response.status_code == 200
    exposition = httpx.get(f"{service.url}/metrics", timeout=10)
    assert exposition.status_code == 200 and exposition.headers["content-type"].startswith("text/plain")
    exposed = {sample.name for family in text_string_to_metric_families(exposition.text) for sample in family.samples}
    wanted = queried_metric_names()
    assert {"cnn_request_seconds_sum", "cnn_model_ready", "cnn_http_requests_total"} <= wanted  # the parse works
    assert wanted - exposed == set(), f"queried but not on /metrics: {sorted(wanted - exposed)}"
    assert not any(name.startswith("bentoml_") for name in exposed)  # BentoML's request metrics are off


@pytest.mark.integration
def test_the_canary_and_cache_panels_answer_where_they_are_on(model_store: ModelStore, tmp_path: Path) -> None:
    """With CANARY and RESPONSE_CACHE_MB set, every panel of theirs has data and every series they and the alerts
    query is on /metrics (elsewhere they are left out: their series cannot exist)."""
    on = frozenset(dashboard_module().FEATURES.values())
    photo = encode(data.chelsea(), "JPEG", quality=90)
    store, log, directory = tmp_path / "store", tmp_path / "service.log", mkdir(tmp_path / "prometheus")
    for name in ("resnet18", "googlenet"):  # a store of its own: the canary's state is written beside the models
        shutil.copytree(model_store.model_dir(name), store / name, ignore=shutil.ignore_patterns(".staging*"))
    env = {"MODELS": "resnet18,googlenet", "CANARY": "resnet18:googlenet:0.5", "RESPONSE_CACHE_MB": "16"}
    with running(store, log, **env) as served, scraping(served, directory) as url:
        with httpx.Client(base_url=served.url, timeout=60) as client:
            for _ in range(8):  # the same photo: a miss on each side, then hits
                answer = client.post("/classify?model=resnet18", content=photo, headers={"Content-Type": "image/jpeg"})
                assert answer.status_code == 200
        exposed = {s.name for f in text_string_to_metric_families(httpx.get(f"{served.url}/metrics").text)
                   for s in f.samples}  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not query(url, "sum(cnn_canary_requests_total) >= 8"):
            time.sleep(1)
        empty = unanswered_dashboard_queries(url, on, of=features)  # the rest: the tests above
    assert not empty, f"dashboard queries without data: {empty}"
    wanted = {name for name in queried_metric_names(on) if features(name)}
    assert {"cnn_canary_state", "cnn_cache_hits_total"} <= wanted
    assert wanted - exposed == set(), f"queried but not on /metrics: {sorted(wanted - exposed)}"
