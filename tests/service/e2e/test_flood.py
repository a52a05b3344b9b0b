"""The flood and the killed worker, end to end on two workers (issue #31): thousands of hostile connections
beside eight real clients, and a worker SIGKILLed under the command-line client's load.

Latency is measured and printed (``pytest -s``), not asserted: speed belongs to benchmarks; the README's
"Limits and security" gives the figures of a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.store.layout import ModelStore
from tests.helpers import ROOT, ServiceProcess, metric_samples, running, workers

pytestmark = pytest.mark.slow
PNG = {"Content-Type": "image/png"}
MiB = 2**20


@pytest.fixture(scope="module")
def two_workers(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("flood") / "service.log"
    with running(Path(model_store.root), log, MODELS="lenet5", WORKERS="2") as process:
        yield process


@pytest.fixture(scope="module")
def digits(digits_folder: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(digits_folder.rglob("*.png"))[:200]]


class NormalClients:
    """Eight clients on kept-alive connections, classifying digits until stopped: (start, seconds, status)."""

    def __init__(self, service: ServiceProcess, images: list[bytes], count: int = 8) -> None:
        self.service, self.images = service, images
        self.records: list[tuple[float, float, int]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(count)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=self.service.url, timeout=60) as client:
            while not self.stop.is_set():
                body = self.images[int(rng.integers(len(self.images)))]
                started = time.monotonic()
                try:
                    status = client.post("/classify?model=lenet5", content=body, headers=PNG).status_code
                except httpx.HTTPError:
                    status = 0
                self.records.append((started, time.monotonic() - started, status))

    def __enter__(self) -> NormalClients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def between(self, start: float, end: float) -> tuple[list[int], float, float]:
        """The statuses, p50 and p99 (ms) of the requests started in [start, end)."""
        chosen = [(seconds, status) for at, seconds, status in self.records if start <= at < end]
        latencies = np.array([seconds for seconds, _ in chosen]) * 1000
        return (
            [status for _, status in chosen],
            float(np.percentile(latencies, 50)),
            float(np.percentile(latencies, 99)),
        )


async def flood(port: int, hold: float) -> dict[str, int]:
    """2,000 connections (1,000 half heads, 1,000 heads of 1 MB) and 500 bodies that stall, held ``hold`` s."""
    outcome = {"opened": 0, "refused_at_connect": 0}
    held: list[asyncio.StreamWriter] = []

    async def connect(opening: bytes, wait_answer: bool) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            outcome["refused_at_connect"] += 1
            return
        outcome["opened"] += 1
        held.append(writer)
        with contextlib.suppress(OSError):
            writer.write(opening)
            await writer.drain()
            if wait_answer:
                await asyncio.wait_for(reader.read(200), hold)

    half = b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Slow: aaaa"
    huge = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MiB
    stalled = (
        b"POST /classify?model=lenet5 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 1000000\r\n\r\n" + b"\x89PNG" * 256
    )  # the app waits for the rest: it never comes
    tasks = []
    for i in range(2500):
        opening, answer = (half, False) if i % 5 in (0, 1) else (huge, True) if i % 5 in (2, 3) else (stalled, False)
        tasks.append(asyncio.ensure_future(connect(opening, answer)))
        if i % 100 == 99:
            await asyncio.sleep(0.05)  # 2,500 in about 1.3 s: a burst, not a SYN storm the backlog drops
    await asyncio.sleep(hold)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for writer in held:
        writer.close()
    return outcome


def rss_mib(service: ServiceProcess) -> list[float]:
    return [p.memory_info().rss / MiB for p in workers(service)]


def refused(service: ServiceProcess) -> dict[str, float]:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    return {labels["reason"]: value for labels, value in metric_samples(text, "cnn_connections_refused_total")}


def test_a_flood_of_hostile_connections_leaves_real_clients_served(
    two_workers: ServiceProcess, digits: list[bytes]
) -> None:
    """While 2,500 hostile connections come and are held past HEADER_TIMEOUT_S, eight real clients on their
    connections get 200 for every request, and no worker grows by 100 MiB."""
    refusals_before = refused(two_workers)
    with NormalClients(two_workers, digits) as normal:
        time.sleep(2)  # warm
        base_start = time.monotonic()
        time.sleep(5)
        base_end = time.monotonic()
        rss_base = rss_mib(two_workers)
        peak = list(rss_base)
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[:] = [max(a, b) for a, b in zip(peak, rss_mib(two_workers), strict=True)]
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        flood_start = time.monotonic()
        outcome = asyncio.run(flood(two_workers.port, hold=12))
        flood_end = time.monotonic()
        sampling.set()
        sampler.join()
        time.sleep(3)
        after_start = time.monotonic()
        time.sleep(5)
        after_end = time.monotonic()
    rss_after = rss_mib(two_workers)
    refusals = {k: v - refusals_before[k] for k, v in refused(two_workers).items()}

    phases = {"before": (base_start, base_end), "during": (flood_start, flood_end), "after": (after_start, after_end)}
    figures = {}
    for phase, (start, end) in phases.items():
        statuses, p50, p99 = normal.between(start, end)
        figures[phase] = {"requests": len(statuses), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1)}
        assert statuses and set(statuses) == {200}, (phase, sorted(set(statuses)))
    growth = [p - b for p, b in zip(peak, rss_base, strict=True)]
    report = {"normal": figures, "flood": outcome, "refused": refusals, "rss_base_mib": rss_base,
              "rss_peak_mib": peak, "rss_after_mib": rss_after, "cpu_flags": cpu_flags()}  # fmt: skip
    print("\nflood:", json.dumps(report))
    assert max(growth) < 100, report
    assert refusals["header_timeout"] > 0 and refusals["header_bytes"] > 0 and refusals["body_rate"] > 0, report
    assert max(a - b for a, b in zip(rss_after, rss_base, strict=True)) < 100, report


def ranked(predictions: list[dict[str, object]]) -> list[tuple[str, int, float]]:
    return [(str(p["label"]), int(p["index"]), float(p["score"])) for p in predictions]  # type: ignore[call-overload]


def cpu_flags() -> str:
    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
    wanted = ("avx2", "avx512f", "avx512_vnni", "amx_int8")
    return f"{os.cpu_count()} cores, " + " ".join(f for f in wanted if f in flags)


def test_a_worker_killed_under_load_loses_no_request_at_the_client(
    two_workers: ServiceProcess, digits_folder: Path, tmp_path: Path
) -> None:
    """``python -m client`` at concurrency 16 over 10,782 digit files (about 30 s); one worker is SIGKILLed after 3 s:
    BentoML's supervisor starts another, every file is answered, and each answer is the one the service gives
    for that image when nothing is killed."""
    sources = sorted(digits_folder.rglob("*.png"))
    reference: dict[str, list[tuple[str, int, float]]] = {}
    with httpx.Client(base_url=two_workers.url, timeout=60) as client:
        for path in sources:
            answer = client.post("/classify?model=lenet5&top_k=5", content=path.read_bytes(), headers=PNG).json()
            reference[path.name] = ranked(answer["results"][0]["predictions"])
    folder = tmp_path / "load"
    for copy in range(6):
        target = folder / str(copy)
        shutil.copytree(digits_folder, target)
    output = tmp_path / "answers.jsonl"
    command = [sys.executable, "-m", "client", str(folder), "--model", "lenet5", "--concurrency", "16",
               "--format", "jsonl", "--output", str(output), "--url", two_workers.url, "--no-progress"]  # fmt: skip
    before = workers(two_workers)
    started = time.monotonic()
    load = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        assert load.poll() is None, "the load ended before the kill: give it more files"
        os.kill(before[0].pid, signal.SIGKILL)
        _, errors = load.communicate(timeout=300)
    finally:  # a failure here leaves no client loading the next test's server
        load.kill()  # none once it has ended (Popen polls first)
        load.wait()
    seconds = time.monotonic() - started
    assert load.returncode == 0, errors

    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == 6 * len(sources)
    wrong = [line["path"] for line in lines if ranked(line["predictions"]) != reference[Path(line["path"]).name]]
    assert not wrong, wrong[:5]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and {p.pid for p in workers(two_workers)} & {before[0].pid}:
        time.sleep(0.5)
    while time.monotonic() < deadline and len(workers(two_workers)) < 2:
        time.sleep(0.5)
    assert len(workers(two_workers)) == 2 and before[0].pid not in {p.pid for p in workers(two_workers)}
    # the load is over: nothing is in flight, not even what the killed worker held when it died
    text = httpx.get(f"{two_workers.url}/metrics", timeout=10).text
    assert sum(value for _, value in metric_samples(text, "cnn_requests_in_flight")) == 0
    print(f"\nkilled worker: {len(lines)} files in {seconds:.1f} s, 0 failed ({cpu_flags()})")
