"""A pure-Python load generator fast enough for a GPU: several processes, each with its own asyncio loop.

No wrk on the GPU machine, and one Python process cannot drive thousands of requests a second (a client
costs ~0.1-0.2 ms of CPU per request): the concurrency is split over ``processes`` spawned workers, kept for
the whole benchmark, each running :func:`benchmarks.load.drive` with aiohttp (HTTP) or
:func:`benchmarks.grpc_load.grpc_run` (gRPC). Each worker reports its latencies, errors, window and its own CPU
time, so a reader can see whether the generator, rather than the server, was the limit (``client_cores``).
Spawned, not forked: the parent holds threads (the NVML sampler) and a forked child could inherit a held lock.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..load import RunResult, check_loopback, drive, summarise

UNBOUNDED = 10**12  # requests: the runs are bounded by time
REQUEST_TIMEOUT = 30.0  # s: a request the server never answers fails, rather than hold a run (and the budget) up
BOUNDARY = "gpu-bench-7c1f"


@dataclass(frozen=True)
class Share:
    """What one load process did: its latencies (s), its failed requests, its measured window (s), its own CPU
    seconds over the window, and the first failure's description."""

    latencies: list[float]
    errors: int
    seconds: float
    cpu_seconds: float
    first_error: str | None


def split(concurrency: int, processes: int) -> list[int]:
    """``concurrency`` spread over at most ``processes`` workers, none idle."""
    workers = max(1, min(processes, concurrency))
    return [concurrency // workers + (i < concurrency % workers) for i in range(workers)]


def multipart(files: Sequence[bytes], content_type: str) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with ``files`` as ``image`` fields, and its Content-Type: built once, so that
    sending a multi-image request costs the client no encoding."""
    parts = []
    for i, data in enumerate(files):
        head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{i}"\r\n'
                f"Content-Type: {content_type}\r\n\r\n")  # fmt: skip
        parts += [head.encode(), data, b"\r\n"]
    parts.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={BOUNDARY}"


def _until(start_at: float) -> None:
    """Sleep until ``start_at`` (``time.monotonic``, one clock for every process of the machine)."""
    time.sleep(max(0.0, start_at - time.monotonic()))


def _ready(_: int) -> int:
    time.sleep(0.3)  # long enough that every worker of the pool is spawned to take one
    return 0


async def _http(url: str, bodies: Sequence[bytes], content_type: str, concurrency: int, warmup: float,
                seconds: float) -> Share:  # fmt: skip
    import aiohttp

    failures: list[str] = []
    headers = {"Content-Type": content_type}
    connector, timeout = aiohttp.TCPConnector(limit=0), aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def call(i: int) -> bool:
            try:
                async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as response:
                    body = await response.read()
                    if response.status == 200:
                        return True
                    failure = f"HTTP {response.status}: {body[:300]!r}"
            except aiohttp.ClientError as exc:
                failure = f"{type(exc).__name__}: {exc}"
            if not failures:
                failures.append(failure)
            return False

        if warmup > 0:  # connections opened, the server's pools and batches in their steady state
            await drive(call, concurrency, UNBOUNDED, warmup)
        cpu = time.process_time()
        latencies, errors, measured = await drive(call, concurrency, UNBOUNDED, seconds)
        cpu = time.process_time() - cpu
    return Share(latencies, errors, measured, cpu, failures[0] if failures else None)


def http_share(concurrency: int, start_at: float, url: str, bodies: Sequence[bytes], content_type: str, warmup: float,
               seconds: float) -> Share:  # fmt: skip
    """One process's part of an HTTP run: POST ``bodies`` round-robin to ``url``, ``concurrency`` in flight."""
    check_loopback(url)
    _until(start_at)
    return asyncio.run(_http(url, bodies, content_type, concurrency, warmup, seconds))


def grpc_share(concurrency: int, start_at: float, target: str, model: str, pixels: Sequence[np.ndarray], warmup: float,
               seconds: float) -> Share:  # fmt: skip
    """One process's part of a gRPC run: Open Inference Protocol requests of uint8 ``images``, decoded already."""
    from ..grpc_load import grpc_run, pixels_request

    pool = [pixels_request(model, p) for p in pixels]
    _until(start_at)
    if warmup > 0:
        asyncio.run(grpc_run(target, pool, concurrency, UNBOUNDED, warmup, REQUEST_TIMEOUT))
    cpu = time.process_time()
    latencies, errors, measured = asyncio.run(grpc_run(target, pool, concurrency, UNBOUNDED, seconds, REQUEST_TIMEOUT))
    return Share(latencies, errors, measured, time.process_time() - cpu, None)


class LoadPool:
    """The load processes, spawned once and reused by every run."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.pool = self._spawn()

    def _spawn(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))
        list(pool.map(_ready, range(self.processes)))  # spawned now, not inside the first run's window
        return pool

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> LoadPool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _run(self, share: Any, concurrency: int, path: str, model: str, *args: Any) -> tuple[RunResult, dict[str, Any]]:
        start_at = time.monotonic() + 0.3
        try:
            futures = [self.pool.submit(share, c, start_at, *args) for c in split(concurrency, self.processes)]
            shares: list[Share] = [f.result() for f in futures]
        except BrokenProcessPool:  # a load process died: this run fails, the next ones get a new pool
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._spawn()
            raise
        seconds = max(s.seconds for s in shares)
        latencies = [latency for s in shares for latency in s.latencies]
        result = summarise(path, model, concurrency, latencies, sum(s.errors for s in shares), seconds)
        extra = {
            "load_processes": len(shares),
            "client_cores": round(sum(s.cpu_seconds for s in shares) / seconds, 2),
            "first_error": next((s.first_error for s in shares if s.first_error), None),
        }
        return result, extra

    def http(self, url: str, bodies: Sequence[bytes], content_type: str, concurrency: int, warmup: float,
             seconds: float, path: str, model: str) -> tuple[RunResult, dict[str, Any]]:  # fmt: skip
        """POST ``bodies`` (one image each) to ``url`` at ``concurrency`` for ``seconds`` after ``warmup``."""
        return self._run(http_share, concurrency, path, model, url, list(bodies), content_type, warmup, seconds)

    def grpc(self, target: str, model: str, pixels: Sequence[np.ndarray], concurrency: int, warmup: float,
             seconds: float, path: str) -> tuple[RunResult, dict[str, Any]]:  # fmt: skip
        """gRPC ``ModelInfer`` with the uint8 ``pixels`` (one image each, [1, H, W, C]) at ``concurrency``."""
        return self._run(grpc_share, concurrency, path, model, target, model, list(pixels), warmup, seconds)
