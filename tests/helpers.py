"""Starting the real service in a subprocess, and small image helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import psutil
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> tuple[int, ...]:
    """``count`` different free ports (held together while picked, so none is picked twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return tuple(int(s.getsockname()[1]) for s in sockets)


def whole_response(answer: bytes) -> bool:
    """Whether ``answer`` holds an HTTP response's head and all the body its Content-Length announces."""
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return length is None or len(body) >= int(length.group(1))


def encode(array: np.ndarray, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


T = TypeVar("T")

# how uvicorn and grpc say that a port is taken
BIND_FAILURES = ("address already in use", "failed to bind to address")


class PortTaken(RuntimeError):
    """The server could not bind a port picked free: another socket took it meanwhile."""


def bind_failed(log: Path) -> bool:
    """Whether a server's log says it could not bind a port."""
    text = log.read_text(errors="replace").lower()
    return any(failure in text for failure in BIND_FAILURES)


def on_fresh_ports(start: Callable[[], T], repick: Callable[[], None] = lambda: None, attempts: int = 3) -> T:
    """``start()`` again where it raised :class:`PortTaken`, after ``repick()`` chose fresh ports.

    A port picked free can be bound by another socket (any client's local port) in the
    seconds before the server binds it; CI saw it happen to MLServer's metrics port and to
    the service's gRPC port.
    """
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except PortTaken:
            if attempt == attempts:
                raise
            repick()
    raise AssertionError("unreachable")


class ServiceProcess:
    """``bentoml serve`` on 127.0.0.1 and a free port, with the given environment."""

    def __init__(self, store: Path, log_path: Path, **env: str) -> None:
        self.port, self.grpc_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            "MODEL_STORE": str(store),
            "HTTP_PORT": str(self.port),
            "HTTP_HOST": "127.0.0.1",
            "GRPC_PORT": str(self.grpc_port),
            "BENTOML_DO_NOT_TRACK": "true",
            # BentoML wipes $BENTOML_HOME/prometheus_multiproc_dir when a server starts: one home per
            # server, or starting a second server erases the first one's metrics.
            "BENTOML_HOME": str(log_path.parent / f"bentoml-home-{self.port}"),
            **env,
        }
        # a home chosen here is removed when the server stops (a benchmark's log lies in /tmp: so would its homes)
        self.own_home = None if "BENTOML_HOME" in env else Path(self.env["BENTOML_HOME"])
        self.process: subprocess.Popen[bytes] | None = None
        self.http_port_chosen = False  # by on_port: kept when the start is tried again

    def on_port(self, port: int) -> ServiceProcess:
        """Serve HTTP on ``port`` instead: a replacement replica takes its predecessor's port."""
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.env["HTTP_PORT"] = str(port)
        self.http_port_chosen = True
        return self

    def start(self, timeout: float = 120.0, wait_for: str = "/readyz") -> ServiceProcess:
        """Start ``bentoml serve`` and return once ``wait_for`` answers 200 (on fresh ports if one was taken)."""
        return on_fresh_ports(lambda: self._start(timeout, wait_for), self._repick)

    def _repick(self) -> None:
        http, grpc = free_ports(2)
        if not self.http_port_chosen:
            self.port, self.url, self.env["HTTP_PORT"] = http, f"http://127.0.0.1:{http}", str(http)
        self.grpc_port, self.grpc_target, self.env["GRPC_PORT"] = grpc, f"127.0.0.1:{grpc}", str(grpc)

    def _start(self, timeout: float, wait_for: str) -> ServiceProcess:
        command = [
            sys.executable, "-m", "bentoml", "serve", "service.service:CNNClassifier",
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        process = self.process
        # a worker that cannot bind logs it, and the server may wait on without it: give up at once
        unbound = functools.partial(bind_failed, self.log_path)
        if wait_for_ok(f"{self.url}{wait_for}", timeout, give_up=lambda: process.poll() is not None or unbound()):
            return self
        exited = process.poll()
        self.stop()
        why = f"exited with {exited}" if exited is not None else f"not ready after {timeout}s"
        raise (PortTaken if unbound() else RuntimeError)(f"service {why}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        code = self.process.returncode if self.process.poll() is not None else stop_group(self.process, timeout)
        if self.own_home is not None:
            shutil.rmtree(self.own_home, ignore_errors=True)
        return code


def workers(service: ServiceProcess) -> list[psutil.Process]:
    """The service's HTTP worker processes (BentoML's ``_bentoml_impl.worker``); one killed and not yet reaped
    (a zombie, whose command line cannot be read) is not among them."""
    assert service.process is not None

    def worker(process: psutil.Process) -> bool:
        try:
            return any("_bentoml_impl.worker" in part for part in process.cmdline())
        except psutil.Error:  # exited, or a zombie
            return False

    return [p for p in psutil.Process(service.process.pid).children(recursive=True) if worker(p)]


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is still running (zombies aside)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def gone(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` has exited (a zombie nobody reaped counts) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def stop_group(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM to the process's group (it leads one: start_new_session), then wait for every member:
    a child that outlives its parent (LitServe's worker drains its queue at full speed for 20 s and
    more) would take the cores of whatever is measured next. Stragglers get SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        code = process.wait()
    deadline = time.monotonic() + 5
    while group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_alive(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return code


def wait_for_ok(url: str, timeout: float, give_up: Callable[[], bool] = lambda: False) -> bool:
    """Poll ``url`` until it answers 200 (True), ``give_up()`` says so or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not give_up():
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


@contextlib.contextmanager
def running(store: Path, log_path: Path, **env: str) -> Iterator[ServiceProcess]:
    """The service, started and ready, for the length of the ``with`` block."""
    process = ServiceProcess(store, log_path, **env).start()
    try:
        yield process
    finally:
        process.stop()


def in_child_cgroup(controller: str, settings: dict[str, str], probe: str) -> subprocess.CompletedProcess[str]:
    """``python -c probe`` run in a new child of the cgroup v1 ``controller``'s root with ``settings`` written into
    it (removed after); the test is skipped where that controller is missing or not writable."""
    root = Path("/sys/fs/cgroup") / controller
    if not (root / next(iter(settings))).exists() or not os.access(root, os.W_OK):
        pytest.skip(f"needs a writable cgroup v1 {controller} controller at {root} (root on this kind of machine)")
    group = root / f"cnn-serving-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        for name, value in settings.items():
            (group / name).write_text(value)
        script = f'echo $$ > {group}/cgroup.procs && exec {sys.executable} -c "{probe}"'
        return subprocess.run(["sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        group.rmdir()


def tool(name: str) -> str:
    """The path of a command that `make test-tools` installs."""
    path = shutil.which(name)
    assert path, f"{name} is missing: `make test-tools` installs it (Debian package)"
    return path


@contextlib.contextmanager
def prometheus(directory: Path, config: dict[str, Any]) -> Iterator[str]:
    """A real Prometheus with ``config``, on a free loopback port; yields its URL."""
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    log_path = directory / "prometheus.log"

    def start() -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        command = [
            tool("prometheus"),
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        if wait_for_ok(f"{url}/-/ready", 60, give_up=lambda: process.poll() is not None):
            return process, url
        process.kill()
        process.wait(30)
        if bind_failed(log_path):
            raise PortTaken(port)
        raise AssertionError(log_path.read_text()[-2000:])

    process, url = on_fresh_ports(start)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(30)


def query(prometheus_url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """An instant PromQL query's result vector, now or ``at`` a Unix time."""
    params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
    response = httpx.get(f"{prometheus_url}/api/v1/query", params=params, timeout=10).json()
    assert response["status"] == "success", (expr, response)
    result: list[dict[str, Any]] = response["data"]["result"]
    return result


def classify(
    service: ServiceProcess, body: bytes, content_type: str = "image/jpeg", **params: str | int
) -> httpx.Response:
    """``POST /classify`` with ``body`` as the raw image."""
    headers = {"Content-Type": content_type}
    return httpx.post(f"{service.url}/classify", params=params, content=body, headers=headers, timeout=60)


def classified(service: ServiceProcess, body: bytes, model: str) -> dict[str, Any]:
    """``/classify``'s answer (top-5) for ``body``, which must be 200."""
    response = classify(service, body, "application/octet-stream", model=model, top_k=5)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def models(service: ServiceProcess) -> dict[str, Any]:
    """``GET /models``, by model name."""
    return {m["name"]: m for m in httpx.get(f"{service.url}/models", timeout=10).json()["models"]}


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` every 0.1 s; the time it held, or an AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


async def wait_until_async(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """:func:`wait_until` on an event loop: yield to it every 0.01 s until ``condition`` holds, else an
    AssertionError naming ``what`` (a test that never gets there fails instead of hanging)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.01)


def http_codes(service: ServiceProcess) -> dict[tuple[str, str], float]:
    """``cnn_http_requests_total`` now, by (route, code)."""
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    samples = metric_samples(text, "cnn_http_requests_total")
    return {(labels["route"], labels["code"]): value for labels, value in samples}


def request_outcomes(service: ServiceProcess) -> dict[str, float]:
    """``cnn_requests_total`` now, summed by outcome (2xx, 4xx, 5xx)."""
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    found: dict[str, float] = {}
    for labels, value in metric_samples(text, "cnn_requests_total"):
        found[labels["outcome"]] = found.get(labels["outcome"], 0.0) + value
    return found


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Samples of one metric from Prometheus' text format, as (labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found.append((dict(sample.labels), float(sample.value)))
    return found
