"""What a load run measures, and an asyncio driver for the gRPC load (HTTP load is wrk's, see ``wrk.py``).

The gRPC driver issues a fixed number of requests with a time bound, to loopback targets
only, and records every request's latency and outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

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
    server_cpu_ms: float | None = None  # CPU time the server's processes spent per image (user + system)
    others_cores: float | None = None  # CPU taken meanwhile by neither the server nor the load (cores)

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
            except (TimeoutError, OSError):
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
