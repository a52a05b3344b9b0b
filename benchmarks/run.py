"""One benchmark run: the ceiling, the service over HTTP and gRPC, the no-op endpoint, the baseline."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
from PIL import Image

from service.cpus import cpu_count
from service.runtime.preprocess import preprocess
from service.runtime.session import session_options
from service.settings import Settings
from service.store.layout import ModelStore
from service.store.metadata import ModelMetadata

from .grpc_load import bytes_request, grpc_run, pixels_request
from .load import RunResult, http_run, summarise

logger = logging.getLogger("benchmarks")
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    models: tuple[str, ...]
    concurrency: tuple[int, ...]
    seconds: float  # per run, at most
    requests: int  # per run, at most
    ceiling_seconds: float
    large_photo: bool
    paths: tuple[str, ...] = ("ceiling", "http", "grpc-bytes", "grpc-images", "noop", "baseline")
    service_env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def make(cls, models: tuple[str, ...], quick: bool) -> Plan:
        if quick:
            return cls(models, (1, 4), 1.5, 200, 0.5, large_photo=False)
        return cls(models, (1, 4, 16, 64), 8.0, 2000, 4.0, large_photo=True)


def photos(large: bool) -> list[bytes]:
    """scikit-image's photos as JPEG files: native size, 1600x1200 and (full mode) one 4000x3000."""
    from skimage import data

    images = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("chelsea", "coffee", "astronaut")]
    sizes = [None, (1600, 1200)] + ([(4000, 3000)] if large else [])
    files = []
    for size in sizes:
        for image in images if size != (4000, 3000) else images[:1]:
            buffer = io.BytesIO()
            (image if size is None else image.resize(size, Image.Resampling.BICUBIC)).save(buffer, "JPEG", quality=90)
            files.append(buffer.getvalue())
    return files


def digit_png() -> bytes:
    canvas = np.full((64, 64), 255, dtype=np.uint8)
    canvas[12:52, 28:36] = 0  # a "1" in dark ink
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, "PNG")
    return buffer.getvalue()


def ceiling(store: ModelStore, model: str, plan: Plan) -> list[RunResult]:
    """ONNX Runtime in-process on the exported graph, with the service's session options."""
    version = store.latest(model)
    assert version is not None
    meta = ModelMetadata.model_validate(version.read_metadata())
    session = ort.InferenceSession(str(version.graph), session_options(Settings()), providers=["CPUExecutionProvider"])
    results = []
    for batch in (1, 8, 32):
        images = np.random.default_rng(0).integers(0, 256, (batch, meta.input.size, meta.input.size,
                                                              meta.input.channels), dtype=np.uint8)  # fmt: skip
        session.run(None, {"images": images})
        latencies: list[float] = []
        started = time.perf_counter()
        while time.perf_counter() - started < plan.ceiling_seconds or len(latencies) < 2:
            t = time.perf_counter()
            session.run(None, {"images": images})
            latencies.append(time.perf_counter() - t)
        result = summarise("ceiling", model, batch, latencies, 0, time.perf_counter() - started, batch)
        results.append(result)
    return results


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


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as info:
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"cpu": cpu, "cores": cpu_count(), "providers": ["CPUExecutionProvider"], "commit": commit or "unknown",
            "python": platform.python_version(), "onnxruntime": ort.__version__}  # fmt: skip


def ratio(name: str, value: float, target: float | None) -> dict[str, Any]:
    met = None if target is None else value >= target
    return {"name": name, "value": round(value, 3), "target": target, "met": met}


def best(runs: list[RunResult], model: str, path: str) -> float:
    return max((r.images_per_s for r in runs if r.model == model and r.path == path), default=0.0)


def ratios(runs: list[RunResult]) -> list[dict[str, Any]]:
    """The issue's targets for ResNet-50 and LeNet-5; the same ratios, untargeted, for other models."""
    out = []
    for model in sorted({r.model for r in runs}):
        top = best(runs, model, "ceiling")
        if model == "lenet5":
            noop = best(runs, model, "noop")
            if noop:
                out.append(ratio("lenet5 HTTP /classify / no-op (requests/s)", best(runs, model, "http") / noop, 0.6))
            continue
        targets = (0.90, 0.95, 2.0) if model == "resnet50" else (None, None, None)
        out.append(ratio(f"{model} HTTP / ceiling", best(runs, model, "http") / top, targets[0]))
        out.append(ratio(f"{model} gRPC images / ceiling", best(runs, model, "grpc-images") / top, targets[1]))
        baseline = best(runs, model, "baseline")
        if baseline:
            out.append(ratio(f"{model} service / PyTorch baseline", best(runs, model, "http") / baseline, targets[2]))
    return out


def start_baseline(model: str, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.baseline", "--model", model, "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the baseline server for {model} did not start")


def payload(model: str, large: bool) -> tuple[list[bytes], str]:
    return ([digit_png()], "image/png") if model == "lenet5" else (photos(large), "image/jpeg")


async def service_runs(url: str, grpc_target: str, store: ModelStore, model: str, plan: Plan) -> list[RunResult]:
    files, content_type = payload(model, plan.large_photo)
    meta = ModelMetadata.model_validate(store.latest(model).read_metadata())  # type: ignore[union-attr]
    pixels = [preprocess(f, meta.input, max_pixels=10**9)[None] for f in files]
    classify = f"/classify?model={model}"
    paths = {
        "http": lambda c: http_run(url, classify, files, content_type, c, plan.requests, plan.seconds),
        "grpc-bytes": lambda c: grpc_run(grpc_target, [bytes_request(model, f) for f in files], c, plan.requests,
                                         plan.seconds),
        "grpc-images": lambda c: grpc_run(grpc_target, [pixels_request(model, p) for p in pixels], c, plan.requests,
                                          plan.seconds),
        "noop": lambda c: http_run(url, "/noop", files, content_type, c, plan.requests, plan.seconds),
    }  # fmt: skip
    results = []
    for path, runner in paths.items():
        if path not in plan.paths:
            continue
        for concurrency in plan.concurrency:
            before = batch_totals(url, model)
            latencies, errors, seconds = await runner(concurrency)
            result = summarise(path, model, concurrency, latencies, errors, seconds)
            after = batch_totals(url, model)
            if path != "noop" and after[0] > before[0]:
                result.mean_batch = round((after[1] - before[1]) / (after[0] - before[0]), 2)
            logger.info("%s %s c=%d: %.1f images/s, p50 %.0f ms, p99 %.0f ms, %d errors", model, path, concurrency,
                        result.images_per_s, result.p50_ms, result.p99_ms, result.errors)  # fmt: skip
            results.append(result)
    return results


async def baseline_runs(model: str, plan: Plan, port: int) -> list[RunResult]:
    files, content_type = payload(model, plan.large_photo)
    process = start_baseline(model, port)
    try:
        results = []
        for concurrency in plan.concurrency:
            url = f"http://127.0.0.1:{port}"
            latencies, errors, seconds = await http_run(url, "/", files, content_type, concurrency, plan.requests,
                                                        plan.seconds)  # fmt: skip
            results.append(summarise("baseline", model, concurrency, latencies, errors, seconds))
            logger.info("%s baseline c=%d: %.1f images/s", model, concurrency, results[-1].images_per_s)
        return results
    finally:
        process.terminate()
        process.wait(30)


def run(store: ModelStore, plan: Plan) -> dict[str, Any]:
    from tests.helpers import ServiceProcess, free_port

    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    runs: list[RunResult] = []
    for model in plan.models if "ceiling" in plan.paths else ():
        runs += ceiling(store, model, plan)
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "benchmark-service.log"
    env = {"MODELS": ",".join(plan.models), "ENABLE_NOOP": "true", **dict(plan.service_env)}
    service = ServiceProcess(store.root, log, **env).start()
    try:
        for model in plan.models:
            runs += asyncio.run(service_runs(service.url, service.grpc_target, store, model, plan))
    finally:
        service.stop()
    for model in plan.models if "baseline" in plan.paths else ():
        if model != "lenet5":
            runs += asyncio.run(baseline_runs(model, plan, free_port()))
    return {
        "started": started,
        "quick": plan.seconds < 5,
        "machine": machine(),
        "plan": {**plan.__dict__, "service_env": dict(plan.service_env)},
        "runs": [r.to_dict() for r in runs],
        "ratios": ratios(runs),
    }
