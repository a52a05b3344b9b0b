"""The real service under load: HTTP JPEG and gRPC uint8 runs, and the every-batch-size run.

Each :class:`~benchmarks.gpu.plan.Server` is ``bentoml serve`` started as :func:`benchmarks.run.serving` starts it
(``tests.helpers.ServiceProcess``: 127.0.0.1, free ports, a ``BENTOML_HOME`` of its own) with ``PROVIDERS``,
``WORKERS``, ``MODELS`` and ``MAX_BATCH_SIZE`` from the plan. Over each run's measured window (after its warm-up)
a background thread samples the GPU's % busy (NVML) and the server's CPU time; the mean batch comes from the
service's own ``cnn_batch_size`` histogram.

The every-batch-size run sends, at concurrency 1 on the freshly started server, multipart requests of every size
from 1 to ``MAX_BATCH_SIZE`` images, each size ``repeats`` times in seeded shuffled rounds: at concurrency 1 a
request of k images is one ONNX Runtime call of batch k (the service's histogram confirms it), so every batch
size the service can form is run, and a size that is slow the first time (a shape the service did not warm up:
an exhaustive cuDNN search, an allocation) shows in that size's p99. Its target compares the largest per-size
p99 with the run's p50.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service.store.layout import ModelStore
from service.store.metadata import ModelMetadata
from service.store.preprocess import preprocess

from ..payloads import payload, photos_at
from ..run import batch_totals, process_cpu
from .loadgen import REQUEST_TIMEOUT, LoadPool, multipart
from .nvml import Nvml
from .plan import Plan, Server

BODY_SIDE = 256  # the JPEG bodies' shorter side: ImageNet-sized, the size the service resizes to


def bodies(model: str) -> tuple[list[bytes], str]:
    """What a model is sent over HTTP: the photos as JPEG, ImageNet-sized; LeNet-5 its PNG digit."""
    return payload(model, large=False) if model.startswith("lenet5") else (photos_at(BODY_SIDE), "image/jpeg")


class Window:
    """A run's measured window, from ``after`` seconds on: the GPU's % busy every 0.1 s and the server's CPU."""

    def __init__(self, nvml: Nvml, pid: int, after: float) -> None:
        self.nvml, self.pid, self.after = nvml, pid, after
        self.busy: list[int] = []
        self.memory: list[int] = []
        self.reason = nvml.reason
        self.cpu: tuple[float, float] | None = None  # CPU seconds and wall seconds over the window
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="window", daemon=True)

    def _watch(self) -> None:
        if self._stop.wait(self.after):
            return
        cpu, started = process_cpu(self.pid), time.perf_counter()
        while not self._stop.wait(0.1):
            if self.nvml.handle is None or self.reason != self.nvml.reason:
                continue
            try:
                busy, memory = self.nvml.sample()
            except Exception as exc:  # what NVML cannot tell ends the GPU's samples, with the reason
                self.reason = f"NVML sampling failed: {type(exc).__name__}: {exc}"
                continue
            self.busy.append(busy)
            self.memory.append(memory)
        self.cpu = (process_cpu(self.pid) - cpu, time.perf_counter() - started)

    def __enter__(self) -> Window:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def figures(self) -> dict[str, Any]:
        """The GPU's mean and largest % busy, its largest memory used, and the server's mean cores busy."""
        cores = round(self.cpu[0] / self.cpu[1], 2) if self.cpu and self.cpu[1] > 0 else None
        if not self.busy:
            reason = self.reason or "no sample in the window"
            return {"gpu_busy_mean_pct": None, "gpu_busy_max_pct": None, "gpu_memory_max_mib": None,
                    "gpu_samples": 0, "gpu_reason": reason, "server_cores": cores}  # fmt: skip
        return {"gpu_busy_mean_pct": round(sum(self.busy) / len(self.busy), 1), "gpu_busy_max_pct": max(self.busy),
                "gpu_memory_max_mib": round(max(self.memory) / 2**20), "gpu_samples": len(self.busy),
                "gpu_reason": None, "server_cores": cores}  # fmt: skip


class NotServed(RuntimeError):
    """The service started, but its model failed to load (its reason and the log's end in the message)."""


@contextlib.contextmanager
def started(store: ModelStore, model: str, env: dict[str, str], log: Path, timeout: float) -> Iterator[Any]:
    """The service with ``env``, ready, for the ``with`` block. Up first (``/livez``), then ready (``/readyz``)
    while ``/models`` says the model is not failed: a model that cannot load (PROVIDERS=cuda without a usable
    CUDA) fails the start at once rather than after ``timeout``."""
    from tests.helpers import ServiceProcess

    deadline = time.monotonic() + timeout  # one bound for both waits
    service = ServiceProcess(store.root, log, **env)
    try:  # the start inside: a SIGTERM while it waits must stop the server too (in its own session, nothing else does)
        service.start(timeout=timeout, wait_for="/livez")
        wait_ready(service, model, max(1.0, deadline - time.monotonic()))
        yield service
    finally:
        service.stop()


def wait_ready(service: Any, model: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            found = {m["name"]: m for m in httpx.get(f"{service.url}/models", timeout=5).json()["models"]}
            state = found.get(model, {})
            if state.get("status") == "failed":
                raise NotServed(f"{model} failed to load: {state.get('reason')}\n{service.log()[-1500:]}")
            if state.get("status") == "ready" and httpx.get(f"{service.url}/readyz", timeout=5).status_code == 200:
                return
        if service.process.poll() is not None:
            raise NotServed(f"the service exited with {service.process.returncode}:\n{service.log()[-1500:]}")
        time.sleep(0.3)
    raise NotServed(f"{model} not ready after {timeout:.0f} s:\n{service.log()[-1500:]}")


def mean_batch(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    calls = after[0] - before[0]
    return round((after[1] - before[1]) / calls, 2) if calls > 0 else None


def measured(service: Any, model: str, path: str, concurrency: int, load: Callable[[], Any], plan: Plan,
             nvml: Nvml) -> dict[str, Any]:  # fmt: skip
    """One load run on ``service``, with the batch sizes it made and the window's GPU and CPU figures."""
    before = batch_totals(service.url, model)
    with Window(nvml, service.process.pid, 0.3 + plan.warmup) as window:
        result, extra = load()
    after = batch_totals(service.url, model)
    result.mean_batch = mean_batch(before, after)  # warm-up included: the histogram has no window
    figures = window.figures()
    if window.cpu and result.images:  # the server's CPU time per image, as the CPU benchmark prices one
        result.server_cpu_ms = round(window.cpu[0] * 1000 / result.images, 3)
    return {k: v for k, v in result.to_dict().items() if k != "others_cores"} | extra | figures


def sweep(service: Any, model: str, plan: Plan, nvml: Nvml) -> dict[str, Any]:
    """The every-batch-size run (module docstring); bounded by ``plan.sweep_seconds``."""
    files, content_type = bodies(model)
    sizes = range(1, plan.max_batch + 1)
    requests = {k: multipart([files[i % len(files)] for i in range(k)], content_type) for k in sizes}
    order = [k for r in range(plan.sweep_repeats) for k in random.Random(r).sample(list(sizes), len(sizes))]
    latencies: dict[int, list[float]] = {k: [] for k in sizes}
    errors, sent, images = 0, 0, 0
    url = f"{service.url}/classify?model={model}"
    before = batch_totals(service.url, model)
    deadline = time.perf_counter() + plan.sweep_seconds
    with httpx.Client(timeout=REQUEST_TIMEOUT) as client, Window(nvml, service.process.pid, 0) as window:
        for k in order:
            if time.perf_counter() > deadline:
                break
            begun = time.perf_counter()
            ok = answered(client, url, *requests[k], k)
            latencies[k].append(time.perf_counter() - begun)
            errors, sent, images = errors + (not ok), sent + 1, images + k
    after = batch_totals(service.url, model)
    if not sent:
        raise RuntimeError(f"the every-batch-size run sent nothing within its {plan.sweep_seconds} s")
    return sweep_figures(latencies, errors, sent, images, before, after, plan) | window.figures()


def answered(client: httpx.Client, url: str, body: bytes, content_type: str, images: int) -> bool:
    """Whether a request of ``images`` images got 200 with an answer for each (any other outcome is an error)."""
    try:
        response = client.post(url, content=body, headers={"Content-Type": content_type})
        return response.status_code == 200 and len(response.json()["results"]) == images
    except (httpx.HTTPError, ValueError, KeyError):
        return False


def sweep_figures(latencies: dict[int, list[float]], errors: int, sent: int, images: int,
                  before: tuple[float, float], after: tuple[float, float], plan: Plan) -> dict[str, Any]:  # fmt: skip
    def ms(values: list[float], q: float) -> float:
        return round(float(np.percentile(np.array(values) * 1000, q)), 2)

    by_size = [{"images": k, "requests": len(v), "p50_ms": ms(v, 50), "p99_ms": ms(v, 99),
                "first_ms": round(v[0] * 1000, 2)} for k, v in latencies.items() if v]  # fmt: skip
    every = [t for v in latencies.values() for t in v]
    largest = max(by_size, key=lambda s: s["p99_ms"])
    worst = max(by_size, key=lambda s: s["p99_ms"] / s["p50_ms"])
    p50 = ms(every, 50)
    calls, rows = after[0] - before[0], after[1] - before[1]
    return {
        "concurrency": 1, "max_batch": plan.max_batch, "repeats": plan.sweep_repeats, "bound_s": plan.sweep_seconds,
        "sizes_covered": len(by_size), "sizes_wanted": plan.max_batch, "requests": sent, "errors": errors,
        "images": images, "p50_ms": p50, "largest_p99_ms": largest["p99_ms"], "largest_p99_at": largest["images"],
        "ratio": round(largest["p99_ms"] / p50, 2),
        "worst_size": {"images": worst["images"], "p50_ms": worst["p50_ms"], "p99_ms": worst["p99_ms"],
                       "ratio": round(worst["p99_ms"] / worst["p50_ms"], 2)},
        "batches_run": int(calls), "images_run": int(rows),
        "one_batch_per_request": int(calls) == sent and int(rows) == images, "by_size": by_size,
    }  # fmt: skip


def serve(store: ModelStore, server: Server, plan: Plan, pool: LoadPool, nvml: Nvml, logs: Path, homes: Path,
          record: dict[str, Any], save: Callable[[], None], say: Callable[[str], None],
          time_left: Callable[[], float]) -> None:  # fmt: skip
    """Start ``server`` and fill ``record`` with its runs, saving after each (a later failure keeps them), while
    ``time_left()`` allows: a run that would outlast it is not started (``record["cut_short"]``). Its log is added
    to the file ``logs`` once it stops, its ``BENTOML_HOME`` (metrics' files) is under ``homes``."""
    name = f"{server.model}-workers{server.workers}"
    log = homes / f"{name}.log"
    try:
        _serve(store, server, plan, pool, nvml, homes / name, log, record, save, say, time_left)
    finally:
        with logs.open("ab") as kept:
            kept.write(f"===== {server.label} =====\n".encode())
            if log.exists():
                kept.write(log.read_bytes())


def _serve(store: ModelStore, server: Server, plan: Plan, pool: LoadPool, nvml: Nvml, home: Path, log: Path,
           record: dict[str, Any], save: Callable[[], None], say: Callable[[str], None],
           time_left: Callable[[], float]) -> None:  # fmt: skip
    from tests.helpers import workers

    env = plan.service_env(server) | {"BENTOML_HOME": str(home)}
    began = time.perf_counter()
    start_timeout = max(10.0, min(plan.start_timeout, time_left()))
    with started(store, server.model, env, log, start_timeout) as service:
        listed = {m["name"]: m for m in httpx.get(f"{service.url}/models", timeout=10).json()["models"]}
        record |= {"start_seconds": round(time.perf_counter() - began, 1), "workers_resolved": len(workers(service)),
                   "session_host": listed[server.model].get("session_host") is not None}  # fmt: skip
        where = "in the session host" if record["session_host"] else "in each worker"
        say(
            f"{server.label}: ready in {record['start_seconds']} s with {record['workers_resolved']} worker(s), "
            f"sessions {where}"
        )
        if server.sweep:
            record["sweep"] = found = sweep(service, server.model, plan, nvml)
            say(f"{server.label} every batch size 1..{plan.max_batch}: {found['requests']} requests "
                f"({found['sizes_covered']} sizes), p50 {found['p50_ms']} ms, largest p99 {found['largest_p99_ms']} "
                f"ms at {found['largest_p99_at']} images: {found['ratio']}x; {found['errors']} errors")  # fmt: skip
            save()
        files, content_type = bodies(server.model)
        url = f"{service.url}/classify?model={server.model}"
        runs = [("http", c) for c in server.http] + [("grpc-pixels", c) for c in server.grpc]
        if time_left() < len(runs) * (plan.warmup + plan.seconds + 5):
            kept = max(0, int(time_left() // (plan.warmup + plan.seconds + 5)))
            record["cut_short"] = f"{len(runs) - kept} of its {len(runs)} runs left out: the budget was spent"
            say(f"{server.label}: {record['cut_short']}")
            runs = runs[:kept]
        http = [c for path, c in runs if path == "http"]
        grpc = [c for path, c in runs if path == "grpc-pixels"]
        for c in http:
            load = partial(pool.http, url, files, content_type, c, plan.warmup, plan.seconds, "http", server.model)
            record["runs"].append(logged(measured(service, server.model, "http", c, load, plan, nvml), server, say))
            save()
        if grpc:
            meta = ModelMetadata.model_validate(store.latest(server.model).read_metadata())  # type: ignore[union-attr]
            pixels = [preprocess(f, meta.input, max_pixels=10**9)[None] for f in files]
            for c in grpc:
                load = partial(pool.grpc, service.grpc_target, server.model, pixels, c, plan.warmup, plan.seconds,
                               "grpc-pixels")  # fmt: skip
                run = measured(service, server.model, "grpc-pixels", c, load, plan, nvml)
                record["runs"].append(logged(run, server, say))
                save()


def logged(run: dict[str, Any], server: Server, say: Callable[[str], None]) -> dict[str, Any]:
    busy = "" if run["gpu_busy_mean_pct"] is None else f", GPU {run['gpu_busy_mean_pct']}% busy"
    say(f"{server.label} {run['path']} c={run['concurrency']}: {run['images_per_s']:.1f} images/s, p50 "
        f"{run['p50_ms']} ms, p99 {run['p99_ms']} ms, {run['errors']} errors of {run['requests']}, mean batch "
        f"{run['mean_batch']}{busy}, server {run['server_cores']} cores, client {run['client_cores']} "
        "cores")  # fmt: skip
    if run["errors"] and run.get("first_error"):
        say(f"  first error: {run['first_error']}")
    return run
