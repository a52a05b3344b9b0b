"""One benchmark run: the ceiling, the stack floor, the service over HTTP and gRPC, the no-op endpoint,
other process and instance counts, the peers (MLServer, LitServe) on the same graph, the baseline.

Each model is served by a service of its own (``MODELS=<model>``, otherwise the defaults), as
each peer serves one: a deployment for that model.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import psutil

from service.runtime.session import session_options
from service.settings import Settings
from service.store.layout import ModelStore
from service.store.metadata import ModelMetadata
from service.store.preprocess import preprocess
from service.store.tensors import INPUT_NAME

from .grpc_load import bytes_request, grpc_run, pixels_request
from .host import machine
from .load import RunResult, summarise
from .payloads import payload
from .targets import ratio, ratios, vs_floor
from .wrk import http_load

logger = logging.getLogger("benchmarks")
SHADOW_MODELS = ("lenet5", "resnet50")  # with "shadow": their INT8 variants are exported to shadow them
SHADOW_FRACTIONS = (1.0, 0.1)
# POST /explain: Grad-CAM at concurrency 1 and 4; occlusion (170 to 226 images a request) at 1, for three
# times as long, so that even ResNet-50's seconds-long requests are a few per run
EXPLAIN_RUNS = (("gradcam", (1, 4), 1), ("occlusion", (1,), 3))
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    models: tuple[str, ...]
    concurrency: tuple[int, ...]
    seconds: float  # per run
    requests: int  # per gRPC run, at most
    ceiling_seconds: float
    large_photo: bool
    paths: tuple[str, ...] = ("ceiling", "floor", "http", "grpc-bytes", "grpc-images", "noop", "explain", "scaling",
                              "shadow", "peers", "baseline")  # fmt: skip
    service_env: tuple[tuple[str, str], ...] = ()
    # the other process/instance layouts tried, and the concurrency they and the peers run at
    scaling: tuple[tuple[str, str], ...] = (
        ("http-workers1", "WORKERS=1"), ("http-workers2", "WORKERS=2"), ("http-instances2", "INSTANCES=2"),
    )  # fmt: skip
    peer_concurrency: tuple[int, ...] = (1, 16, 64)
    scaling_models: tuple[str, ...] | None = None  # the models the layouts are tried on; None: every model

    @classmethod
    def make(cls, models: tuple[str, ...], quick: bool) -> Plan:
        if quick:  # the layouts on the first model only: the same code for each model, three servers' starts apiece
            return cls(models, (1, 4), 1.0, 200, 0.5, large_photo=False, peer_concurrency=(1, 4),
                       scaling_models=models[:1])  # fmt: skip
        return cls(models, (1, 4, 16, 64), 8.0, 4000, 4.0, large_photo=True)


def session(store: ModelStore, model: str) -> tuple[ort.InferenceSession, ModelMetadata]:
    version = store.latest(model)
    assert version is not None
    meta = ModelMetadata.model_validate(version.read_metadata())
    options = session_options(Settings())
    return ort.InferenceSession(str(version.graph), options, providers=["CPUExecutionProvider"]), meta


def timed_runs(run: Any, seconds: float) -> tuple[list[float], float]:
    """``run()`` repeatedly for ``seconds`` (twice at least): each call's time, and the total."""
    latencies: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(latencies) < 2:
        t = time.perf_counter()
        run()
        latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - started


def ceiling(store: ModelStore, model: str, plan: Plan) -> list[RunResult]:
    """ONNX Runtime in-process on the exported graph, with the service's session options; no decoding."""
    graph, meta = session(store, model)
    results = []
    for batch in (1, 8, 32):
        images = np.random.default_rng(0).integers(0, 256, (batch, meta.input.size, meta.input.size,
                                                              meta.input.channels), dtype=np.uint8)  # fmt: skip
        graph.run(None, {INPUT_NAME: images})
        latencies, seconds = timed_runs(lambda: graph.run(None, {INPUT_NAME: images}), plan.ceiling_seconds)  # noqa: B023
        results.append(summarise("ceiling", model, batch, latencies, 0, seconds, batch))
    return results


def ceiling_with_decode(store: ModelStore, model: str, plan: Plan) -> RunResult:
    """The same, plus decoding the benchmark's files (one thread), then one call at batch 8: the
    work a service must do per image, done one step after the other in one process."""
    graph, meta = session(store, model)
    files, _ = payload(model, plan.large_photo)
    turn = iter(range(10**9))

    def step() -> None:
        batch = [files[next(turn) % len(files)] for _ in range(8)]
        graph.run(None, {INPUT_NAME: np.stack([preprocess(f, meta.input, max_pixels=10**9) for f in batch])})

    step()
    latencies, seconds = timed_runs(step, plan.ceiling_seconds)
    return summarise("ceiling+decode", model, 8, latencies, 0, seconds, 8)


def reference_answers(url: str, model: str, files: list[bytes], content_type: str) -> list[list[int]]:
    """The service's top-5 class indices for each payload file, to check the peers answer alike."""
    answers = []
    for body in files:
        response = httpx.post(f"{url}/classify", params={"model": model, "top_k": 5}, content=body,
                              headers={"Content-Type": content_type}, timeout=60)  # fmt: skip
        response.raise_for_status()
        answers.append([p["index"] for p in response.json()["results"][0]["predictions"]])
    return answers


def batch_totals(url: str, model: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    count = total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.labels.get("model") == model and sample.name == "cnn_batch_size_count":
                count += sample.value
            elif sample.labels.get("model") == model and sample.name == "cnn_batch_size_sum":
                total += sample.value
    return count, total


def process_cpu(pid: int) -> float:
    """User and system CPU seconds of ``pid`` and its descendants."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (steal included: the host took them)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def ours() -> float:
    """CPU seconds of the benchmark process and its children (wrk): the load generator."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


# A run during which other processes (or the host) took more than this many cores is measured again.
DISTURBED_CORES = 0.15


def priced(pid: int, measure: Callable[[], RunResult]) -> RunResult:
    """``measure()``, with the server's CPU time per image over the run (the price of an image there) and
    what neither the server nor the load generator used; a run that something else disturbed is repeated once."""
    for attempt in (1, 2):
        server, machine_, load = process_cpu(pid), machine_busy(), ours()
        result = measure()
        server = process_cpu(pid) - server
        others = machine_busy() - machine_ - server - (ours() - load)
        if result.images:
            result.server_cpu_ms = round(server * 1000 / result.images, 3)
        result.others_cores = round(max(0.0, others) / result.seconds, 3)
        if result.others_cores <= DISTURBED_CORES or attempt == 2:
            return result
        logger.warning("%s %s c=%d: %.2f cores taken by other processes meanwhile; measuring again",
                       result.model, result.path, result.concurrency, result.others_cores)  # fmt: skip
    raise AssertionError("unreachable")


def logged(result: RunResult) -> RunResult:
    logger.info("%s %s c=%d: %.1f images/s, p50 %.1f ms, p99 %.1f ms, %d errors", result.model, result.path,
                result.concurrency, result.images_per_s, result.p50_ms, result.p99_ms, result.errors)  # fmt: skip
    return result


@contextlib.contextmanager
def serving(store: ModelStore, model: str, plan: Plan, **extra: str) -> Iterator[Any]:
    """The service for ``model`` alone, with the plan's settings and ``extra``."""
    from tests.helpers import ServiceProcess

    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"benchmark-service-{model}.log"
    env = {"MODELS": model, "ENABLE_NOOP": "true", **dict(plan.service_env), **extra}
    service = ServiceProcess(store.root, log, **env).start()
    try:
        yield service
    finally:
        service.stop()


def request_seconds(url: str, files: list[bytes], content_type: str) -> float:
    """How long one request for ``url`` with the first file takes (its answer checked)."""
    started = time.perf_counter()
    httpx.post(url, content=files[0], headers={"Content-Type": content_type}, timeout=600).raise_for_status()
    return time.perf_counter() - started


def http_runs(
    url: str, model: str, plan: Plan, path: str, route: str, levels: tuple[int, ...], pid: int
) -> list[RunResult]:
    """wrk on ``url + route`` at each concurrency; ``pid`` is the server's, whose CPU is counted."""
    files, content_type = payload(model, plan.large_photo)
    loads = [partial(http_load, url + route, files, content_type, c, plan.seconds, path, model) for c in levels]
    return [logged(priced(pid, load)) for load in loads]


def grpc_result(target: str, pool: list[Any], path: str, model: str, concurrency: int, plan: Plan) -> RunResult:
    latencies, errors, seconds = asyncio.run(grpc_run(target, pool, concurrency, plan.requests, plan.seconds))
    return summarise(path, model, concurrency, latencies, errors, seconds)


def service_runs(service: Any, store: ModelStore, model: str, plan: Plan) -> list[RunResult]:
    files, _ = payload(model, plan.large_photo)
    meta = ModelMetadata.model_validate(store.latest(model).read_metadata())  # type: ignore[union-attr]
    pixels = [preprocess(f, meta.input, max_pixels=10**9)[None] for f in files]
    grpc_pools = {"grpc-bytes": [bytes_request(model, f) for f in files],
                  "grpc-images": [pixels_request(model, p) for p in pixels]}  # fmt: skip
    results = []
    for path in ("http", "grpc-bytes", "grpc-images", "noop"):
        if path not in plan.paths:
            continue
        for concurrency in plan.concurrency:
            before = batch_totals(service.url, model)
            if path in grpc_pools:
                load = partial(grpc_result, service.grpc_target, grpc_pools[path], path, model, concurrency, plan)
                result = priced(service.process.pid, load)
            else:
                route = f"/classify?model={model}" if path == "http" else "/noop"
                (result,) = http_runs(service.url, model, plan, path, route, (concurrency,), service.process.pid)
            after = batch_totals(service.url, model)
            if path != "noop" and after[0] > before[0]:
                result.mean_batch = round((after[1] - before[1]) / (after[0] - before[0]), 2)
            results.append(logged(result) if path.startswith("grpc") else result)
    return results


def floor_runs(models: tuple[str, ...], plan: Plan) -> list[RunResult]:
    """The stack floor (benchmarks/floor.py) with each model's files."""
    from tests.helpers import free_port

    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "benchmarks.floor:app", "--host", "127.0.0.1", "--port", str(port),
               "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _answers(f"{url}/noop"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the stack floor (benchmarks/floor.py) did not start")
            time.sleep(0.2)
        return [r for m in models for r in http_runs(url, m, plan, "floor", "/noop", plan.concurrency, process.pid)]
    finally:
        process.terminate()
        process.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.post(url, content=b"x", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def peer_runs(store: ModelStore, model: str, plan: Plan, reference: list[list[int]], workdir: Path) -> list[RunResult]:
    """MLServer and LitServe on the same graph, their answers checked against the service's first."""
    from tests.helpers import free_port, free_ports, on_fresh_ports

    from .peers.launch import start_litserve, start_mlserver

    files, _ = payload(model, plan.large_photo)
    version = store.latest(model)
    assert version is not None
    results = []
    starts = {"mlserver": lambda: start_mlserver(version.directory, free_ports(3), workdir),
              "litserve": lambda: start_litserve(version.directory, free_port(), workdir)}  # fmt: skip
    for name, start in starts.items():
        peer = on_fresh_ports(start)  # each start picks its own ports
        try:
            bodies = [peer.body(f) for f in files]
            for body, expected in zip(bodies, reference, strict=True):
                answer = peer.answer(httpx.post(peer.url, content=body, timeout=60,
                                                headers={"Content-Type": "application/json"}).json())  # fmt: skip
                if [p["index"] for p in answer] != expected:
                    raise RuntimeError(f"{name} answers {answer} where the service answers {expected}")
            for concurrency in plan.peer_concurrency:
                load = partial(http_load, peer.url, bodies, "application/json", concurrency, plan.seconds, name, model)
                results.append(logged(priced(peer.process.pid, load)))
        finally:
            peer.stop()
    return results


def baseline_runs(model: str, plan: Plan) -> list[RunResult]:
    """The PyTorch-eager baseline (benchmarks/baseline.py)."""
    from tests.helpers import free_port, wait_for_ok

    port = free_port()
    command = [sys.executable, "-m", "benchmarks.baseline", "--model", model, "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_for_ok(f"http://127.0.0.1:{port}/", 120, give_up=lambda: process.poll() is not None):
            raise RuntimeError(f"the baseline server for {model} did not start")
        return http_runs(f"http://127.0.0.1:{port}", model, plan, "baseline", "/", plan.concurrency, process.pid)
    finally:
        process.terminate()
        process.wait(30)


def model_runs(store: ModelStore, model: str, plan: Plan, workdir: Path) -> list[RunResult]:
    """Everything measured on one model's services and peers."""
    runs: list[RunResult] = []
    variant = model.endswith(("_int8", "_fp16"))
    with serving(store, model, plan) as service:
        runs += service_runs(service, store, model, plan)
        reference = reference_answers(service.url, model, *payload(model, plan.large_photo))
        for method, levels, longer in EXPLAIN_RUNS if "explain" in plan.paths and not variant else ():
            route = f"/explain?model={model}&method={method}"
            # wrk drops what is still in flight at its deadline: a run lasts a few requests' time at least
            one = request_seconds(service.url + route, *payload(model, plan.large_photo))
            timed = replace(plan, seconds=max(plan.seconds * longer, 3 * one))
            runs += http_runs(service.url, model, timed, f"explain-{method}", route, levels, service.process.pid)
    scaled = "scaling" in plan.paths and (plan.scaling_models is None or model in plan.scaling_models)
    for path, setting in plan.scaling if scaled else ():
        key, value = setting.split("=", 1)
        with serving(store, model, plan, **{key: value}) as service:
            route = f"/classify?model={model}"
            runs += http_runs(service.url, model, plan, path, route, plan.peer_concurrency, service.process.pid)
    if "shadow" in plan.paths and store.latest(f"{model}_int8") is not None:
        for fraction in SHADOW_FRACTIONS:  # its INT8 variant shadows it: the primary's price of a shadow
            with serving(store, model, plan, SHADOW=f"{model}:{model}_int8:{fraction:g}") as service:
                route = f"/classify?model={model}"
                path = f"http-shadow{fraction:g}"
                runs += http_runs(service.url, model, plan, path, route, plan.peer_concurrency, service.process.pid)
    if "peers" in plan.paths and not variant:
        runs += peer_runs(store, model, plan, reference, workdir)
    if "baseline" in plan.paths and not variant and not model.startswith("lenet5"):
        runs += baseline_runs(model, plan)
    return runs


def run(store: ModelStore, plan: Plan) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    runs: list[RunResult] = []
    for model in plan.models if "ceiling" in plan.paths else ():
        runs += ceiling(store, model, plan)
        if not model.startswith("lenet5"):
            runs.append(ceiling_with_decode(store, model, plan))
    if "floor" in plan.paths:
        runs += floor_runs(plan.models, plan)
    with tempfile.TemporaryDirectory(prefix="peers-") as workdir:
        for model in plan.models:
            runs += model_runs(store, model, plan, Path(workdir))
    host = machine()
    macs = {}
    for model in plan.models:
        meta = ModelMetadata.model_validate(store.latest(model).read_metadata())  # type: ignore[union-attr]
        macs[model] = meta.flops_per_image / 2
    floors = vs_floor(runs)
    return {
        "started": started,
        "quick": plan.seconds < 5,
        "machine": host,
        "plan": {**plan.__dict__, "service_env": dict(plan.service_env)},
        "runs": [r.to_dict() | {"vs_floor": floors.get((r.model, r.path, r.concurrency))} for r in runs],
        "ratios": ratios(runs, macs, host) + bookkeeping(store, plan.models),
        "int8_recipes": int8_recipes(store, plan.models),
    }


def bookkeeping(
    store: ModelStore, models: tuple[str, ...], batch: int = 16, repeats: int = 300
) -> list[dict[str, Any]]:
    """What every answer's quality signals cost in-process: the confidence and entropy histograms and
    the drift window, per image, at a batch of 16 (prometheus_client in multiprocess mode, as served)."""
    from service.metrics import Metrics
    from service.store.quality import Drift, distributions

    out = []
    with tempfile.TemporaryDirectory(prefix="metrics-") as directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        try:
            metrics = Metrics()
            for model in models:
                meta = ModelMetadata.model_validate(store.latest(model).read_metadata())  # type: ignore[union-attr]
                rng = np.random.default_rng(0)
                rows = rng.dirichlet(np.full(meta.num_classes, 0.1), size=batch).astype(np.float32)
                drift = Drift(distributions(rows) | {"source": "bench"}, meta.num_classes, 500, 0)
                started = time.perf_counter()
                for _ in range(repeats):
                    metrics.observe_predictions(model, "1", rows)
                    drift.add(rows)
                micros = (time.perf_counter() - started) / (repeats * batch) * 1e6
                name = f"{model}: answers' quality bookkeeping, microseconds per image ({meta.num_classes} classes)"
                out.append(ratio(name, micros, None))
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    return out


def int8_recipes(store: ModelStore, models: tuple[str, ...]) -> dict[str, Any]:
    """What the export measured for each INT8 recipe of the variants benchmarked (its metadata)."""
    found = {}
    for model in models:
        version = store.latest(model)
        quantization = version.read_metadata().get("quantization") if version is not None else None
        if quantization and "candidates" in quantization:
            found[model] = {"recipe": quantization["recipe"], "choice": quantization["choice"],
                            "cpu": quantization["cpu"], "candidates": quantization["candidates"]}  # fmt: skip
    return found
