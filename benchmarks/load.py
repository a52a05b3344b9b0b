"""An asyncio load generator: a fixed number of requests, a time bound, loopback targets only.

In-process rather than hey or wrk because it drives HTTP uploads, multipart and gRPC alike
and records every request's latency and outcome; aiohttp keeps its own CPU cost per request
small, which matters when client and server share two cores.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

import aiohttp
import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class RunResult:
    """One load run: throughput, latency percentiles (ms), errors, mean batch size."""

    path: str
    model: str
    concurrency: int
    requests: int
    images: int
    errors: int
    seconds: float
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_loopback(url: str) -> None:
    host = urlparse(url if "://" in url else f"//{url}").hostname
    if host not in LOOPBACK:
        raise ValueError(f"benchmarks only target loopback, not {host!r}")


async def drive(
    call: Callable[[int], Awaitable[bool]], concurrency: int, requests: int, seconds: float
) -> tuple[list[float], int, float]:
    """Run ``call(i)`` (True = success) with ``concurrency`` in flight, ``requests`` at most, ``seconds`` at most."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal issued, errors
        while issued < requests and time.perf_counter() < deadline:
            index = issued
            issued += 1
            started = time.perf_counter()
            try:
                ok = await call(index)
            except (TimeoutError, aiohttp.ClientError, OSError):
                ok = False
            latencies.append(time.perf_counter() - started)
            errors += not ok

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


def summarise(path: str, model: str, concurrency: int, latencies: Sequence[float], errors: int, seconds: float,
              images_per_request: int = 1) -> RunResult:  # fmt: skip
    done = len(latencies)
    ms = np.array(latencies or [0.0]) * 1000
    return RunResult(
        path=path, model=model, concurrency=concurrency, requests=done, images=(done - errors) * images_per_request,
        errors=errors, seconds=round(seconds, 3), images_per_s=round((done - errors) * images_per_request / seconds, 2),
        p50_ms=round(float(np.percentile(ms, 50)), 2), p95_ms=round(float(np.percentile(ms, 95)), 2),
        p99_ms=round(float(np.percentile(ms, 99)), 2),
    )  # fmt: skip


async def http_run(url: str, path: str, bodies: Sequence[bytes], content_type: str, concurrency: int,
                   requests: int, seconds: float) -> tuple[list[float], int, float]:  # fmt: skip
    """POST raw bodies round-robin to ``url`` + ``path``."""
    check_loopback(url)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(base_url=url, connector=connector, timeout=timeout) as session:

        async def call(i: int) -> bool:
            body = bodies[i % len(bodies)]
            async with session.post(path, data=body, headers={"Content-Type": content_type}) as response:
                await response.read()
                return response.status == 200

        return await drive(call, concurrency, requests, seconds)
