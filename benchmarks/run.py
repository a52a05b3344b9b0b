"""One benchmark run: the ceiling, the service over HTTP and gRPC, the no-op endpoint, other
process and instance counts, the peers (MLServer, LitServe) on the same graph, the baseline."""

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
import tempfile
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
    paths: tuple[str, ...] = ("ceiling", "http", "grpc-bytes", "grpc-images", "noop", "scaling", "peers", "baseline")
    service_env: tuple[tuple[str, str], ...] = ()
    # the other process/instance layouts tried, and the concurrency they and the peers run at
    scaling: tuple[tuple[str, str], ...] = (("http-instances2", "INSTANCES=2"), ("http-workers2", "WORKERS=2"))
    peer_concurrency: tuple[int, ...] = (1, 16, 64)

    @classmethod
    def make(cls, models: tuple[str, ...], quick: bool) -> Plan:
        if quick:
            return cls(models, (1, 4), 1.5, 200, 0.5, large_photo=False, peer_concurrency=(1, 4))
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


def cpuinfo(field: str) -> str | None:
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as info:
        return next(line.split(":", 1)[1].strip() for line in info if line.startswith(field))
    return None


# The CPU features the figures depend on (ONNX Runtime's kernels, INT8 dot products)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def machine() -> dict[str, Any]:
    from export.precision import cpu_flags, cpu_info

    cpu = cpuinfo("model name") or platform.processor()
    mhz = cpuinfo("cpu MHz")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"cpu": cpu, "cores": cpu_count(), "providers": ["CPUExecutionProvider"], "commit": commit or "unknown",
            "python": platform.python_version(), "onnxruntime": ort.__version__,
            "clock_ghz": round(float(mhz) / 1000, 2) if mhz else None, "int8": cpu_info(),
            "cpu_flags": [flag for flag in CPU_FLAGS if flag in cpu_flags()]}  # fmt: skip


def ratio(name: str, value: float, target: float | None) -> dict[str, Any]:
    met = None if target is None else value >= target
    return {"name": name, "value": round(value, 3), "target": target, "met": met}


def best(runs: list[RunResult], model: str, path: str) -> float:
    return max((r.images_per_s for r in runs if r.model == model and r.path == path), default=0.0)


def at(runs: list[RunResult], model: str, path: str, concurrency: int) -> float:
    return next((r.images_per_s for r in runs if (r.model, r.path, r.concurrency) == (model, path, concurrency)), 0.0)


# Multiply-accumulates per cycle and core: AVX2/AVX-512 FP32 FMA (Zen 4 runs AVX-512 on
# 256-bit units: 2 x 8 lanes) and INT8 with VNNI (2 x 32 lanes).
MAC_PER_CYCLE = {"fp32": 16, "int8": 64}
CEILING_TARGETS = {"resnet50": 0.95, "resnet50_int8": 0.85}
PEER_TARGETS = {"resnet50": 1.0, "lenet5": 1.2}


def physical_fraction(images_per_s: float, macs_per_image: float, precision: str, machine: dict[str, Any]) -> float:
    peak = machine["cores"] * machine["clock_ghz"] * 1e9 * MAC_PER_CYCLE[precision]
    return images_per_s * macs_per_image / peak


def ratios(runs: list[RunResult], macs: dict[str, float], machine: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for ResNet-50 (FP32, INT8) and LeNet-5; the same ratios, untargeted, for others."""
    out = []
    for model in sorted({r.model for r in runs}):
        top = best(runs, model, "ceiling")
        if model.startswith("lenet5"):  # there the HTTP stack is the cost: against the no-op endpoint
            noop = best(runs, model, "noop")
            if noop and model == "lenet5":
                out.append(ratio("lenet5 HTTP /classify / no-op (requests/s)", best(runs, model, "http") / noop, 0.6))
        elif top:
            out.append(ratio(f"{model} HTTP / ceiling", best(runs, model, "http") / top, CEILING_TARGETS.get(model)))
            if best(runs, model, "grpc-images"):
                out.append(ratio(f"{model} gRPC images / ceiling", best(runs, model, "grpc-images") / top, None))
        for peer in ("mlserver", "litserve"):
            for concurrency in (16, 1):
                theirs = at(runs, model, peer, concurrency)
                if theirs:
                    target = PEER_TARGETS.get(model) if concurrency == 16 else 1.0
                    value = at(runs, model, "http", concurrency) / theirs
                    out.append(ratio(f"{model} HTTP / {peer} at concurrency {concurrency}", value, target))
        baseline = best(runs, model, "baseline")
        if baseline:
            target = 2.0 if model == "resnet50" else None
            out.append(ratio(f"{model} service / PyTorch baseline", best(runs, model, "http") / baseline, target))
        int8 = f"{model}_int8"
        if at(runs, int8, "ceiling", 8) and at(runs, model, "ceiling", 8):
            value = at(runs, int8, "ceiling", 8) / at(runs, model, "ceiling", 8)
            out.append(ratio(f"{int8} / {model} in-process at batch 8", value, 2.5 if model == "resnet50" else None))
        precision = "int8" if model.endswith("_int8") else "fp32"
        if model in macs and machine.get("clock_ghz") and at(runs, model, "ceiling", 8):
            fraction = physical_fraction(at(runs, model, "ceiling", 8), macs[model], precision, machine)
            name = f"{model} in-process batch 8 / physical {precision.upper()} limit"
            out.append(ratio(f"{name} ({MAC_PER_CYCLE[precision]} MAC/cycle/core at {machine['clock_ghz']} GHz)",
                             fraction, None))  # fmt: skip
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
    return ([digit_png()], "image/png") if model.startswith("lenet5") else (photos(large), "image/jpeg")


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


async def scaling_runs(url: str, model: str, plan: Plan, path: str) -> list[RunResult]:
    """/classify on the service started with another process/instance layout."""
    files, content_type = payload(model, plan.large_photo)
    results = []
    for concurrency in plan.peer_concurrency:
        latencies, errors, seconds = await http_run(url, f"/classify?model={model}", files, content_type, concurrency,
                                                    plan.requests, plan.seconds)  # fmt: skip
        results.append(summarise(path, model, concurrency, latencies, errors, seconds))
        logger.info("%s %s c=%d: %.1f images/s", model, path, concurrency, results[-1].images_per_s)
    return results


def peer_runs(store: ModelStore, model: str, plan: Plan, reference: list[list[int]], workdir: Path) -> list[RunResult]:
    """MLServer and LitServe on the same graph, their answers checked against the service's first."""
    from tests.helpers import free_port

    from .peers.launch import start_litserve, start_mlserver

    files, _ = payload(model, plan.large_photo)
    version = store.latest(model)
    assert version is not None
    results = []
    starts = {"mlserver": lambda: start_mlserver(version.directory, (free_port(), free_port(), free_port()), workdir),
              "litserve": lambda: start_litserve(version.directory, free_port(), workdir)}  # fmt: skip
    for name, start in starts.items():
        peer = start()
        try:
            bodies = [peer.body(f) for f in files]
            for body, expected in zip(bodies, reference, strict=True):
                answer = peer.answer(httpx.post(peer.url, content=body, timeout=60,
                                                      headers={"Content-Type": "application/json"}).json())  # fmt: skip
                if [p["index"] for p in answer] != expected:
                    raise RuntimeError(f"{name} answers {answer} where the service answers {expected}")
            for concurrency in plan.peer_concurrency:
                latencies, errors, seconds = asyncio.run(
                    http_run(peer.base, peer.path, bodies, "application/json", concurrency, plan.requests, plan.seconds)
                )
                results.append(summarise(name, model, concurrency, latencies, errors, seconds))
                logger.info("%s %s c=%d: %.1f images/s, p50 %.0f ms, p99 %.0f ms", model, name, concurrency,
                            results[-1].images_per_s, results[-1].p50_ms, results[-1].p99_ms)  # fmt: skip
        finally:
            peer.stop()
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
    references = {}
    try:
        for model in plan.models:
            runs += asyncio.run(service_runs(service.url, service.grpc_target, store, model, plan))
            references[model] = reference_answers(service.url, model, *payload(model, plan.large_photo))
    finally:
        service.stop()
    for path, setting in plan.scaling if "scaling" in plan.paths else ():
        key, value = setting.split("=", 1)
        service = ServiceProcess(store.root, log, **{**env, key: value}).start()
        try:
            for model in plan.models:
                runs += asyncio.run(scaling_runs(service.url, model, plan, path))
        finally:
            service.stop()
    with tempfile.TemporaryDirectory(prefix="peers-") as workdir:
        for model in plan.models if "peers" in plan.paths else ():
            if not model.endswith(("_int8", "_fp16")):
                runs += peer_runs(store, model, plan, references[model], Path(workdir))
    for model in plan.models if "baseline" in plan.paths else ():
        if not model.startswith("lenet5") and not model.endswith(("_int8", "_fp16")):
            runs += asyncio.run(baseline_runs(model, plan, free_port()))
    host = machine()
    macs = {}
    for model in plan.models:
        meta = ModelMetadata.model_validate(store.latest(model).read_metadata())  # type: ignore[union-attr]
        macs[model] = meta.flops_per_image / 2
    return {
        "started": started,
        "quick": plan.seconds < 5,
        "machine": host,
        "plan": {**plan.__dict__, "service_env": dict(plan.service_env)},
        "runs": [r.to_dict() for r in runs],
        "ratios": ratios(runs, macs, host),
    }
