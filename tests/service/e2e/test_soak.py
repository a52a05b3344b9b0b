"""Sustained load: concurrency 32 across three models over HTTP and gRPC (``SOAK_SECONDS``, default 120).

No 5xx but deliberate load shedding (503, counted); resident memory after the soak within
15% of its value after warm-up; the server's CPU time per request in the last minute close to
the first minute's (a service that gets dearer as it runs, a leak of work, fails this). Latency
percentiles of both minutes are reported, not asserted: they follow whatever else the machine
is running, which is not the service's doing.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from skimage import data
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from service.store.layout import ModelStore

from ...helpers import ServiceProcess, encode, metric_samples, running

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "120"))
CONCURRENCY = 32
MODELS = ("lenet5", "resnet18", "googlenet")
FILES = {"lenet5": encode(255 - data.camera()[::8, ::8]), "resnet18": encode(data.chelsea(), "JPEG"),
         "googlenet": encode(data.coffee(), "JPEG")}  # fmt: skip


@pytest.fixture(scope="module")
def soak_service(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("logs") / "soak.log"
    with running(Path(model_store.root), log, MODELS=",".join(MODELS)) as process:
        yield process


Sample = tuple[float, float, str]  # (finished at, seconds, outcome)


async def run_load(service: ServiceProcess, seconds: float) -> list[Sample]:
    samples: list[Sample] = []
    deadline = time.monotonic() + seconds
    grpc_client = triton_aio.InferenceServerClient(service.grpc_target)
    # idle connections dropped before the server's keep-alive timeout (5 s): httpx's default expiry is the same 5 s,
    # so a connection idle through a worker's gRPC turns could be reused as the server closes it (a ReadError)
    limits = httpx.Limits(max_connections=64, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=service.url, timeout=60, limits=limits) as http:

        async def worker(index: int) -> None:
            turn = index
            while time.monotonic() < deadline:
                model, protocol = MODELS[turn % 3], ("http", "grpc")[(turn // 3) % 2]
                turn += 1
                started = time.monotonic()
                if protocol == "http":
                    response = await http.post(f"/classify?model={model}", content=FILES[model],
                                               headers={"Content-Type": "application/octet-stream"})  # fmt: skip
                    outcome = str(response.status_code)
                else:
                    files = InferInput("image_bytes", [1], "BYTES")
                    files.set_data_from_numpy(np.array([FILES[model]], dtype=object))
                    try:
                        await grpc_client.infer(model, [files])
                        outcome = "200"
                    except InferenceServerException as exc:
                        outcome = str(exc.status())
                samples.append((time.monotonic(), time.monotonic() - started, outcome))

        await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    await grpc_client.close()
    return samples


def process_metric(service: ServiceProcess, name: str) -> float:
    """The whole server's ``process_*`` figure (every worker summed)."""
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    return metric_samples(text, name)[0][1]


def measured_load(service: ServiceProcess, seconds: float) -> tuple[list[Sample], float]:
    """The load for ``seconds``, and the server's CPU seconds per successful request meanwhile."""
    cpu = process_metric(service, "process_cpu_seconds_total")
    samples = asyncio.run(run_load(service, seconds))
    cpu = process_metric(service, "process_cpu_seconds_total") - cpu
    return samples, cpu / max(1, sum(s[2] == "200" for s in samples))


def percentiles(samples: list[Sample]) -> tuple[float, float, float]:
    latencies = np.array([s[1] for s in samples if s[2] == "200"])
    return tuple(float(np.percentile(latencies, q)) for q in (50, 95, 99))  # type: ignore[return-value]


def test_soak(soak_service: ServiceProcess) -> None:
    asyncio.run(run_load(soak_service, 15))  # warm-up: allocator pools, thread pools, connections
    warm_rss = process_metric(soak_service, "process_resident_memory_bytes")
    window = min(60.0, SOAK_SECONDS / 2)
    first, cpu_first = measured_load(soak_service, window)
    rest = SOAK_SECONDS - 2 * window
    middle = asyncio.run(run_load(soak_service, rest)) if rest > 0 else []
    last, cpu_last = measured_load(soak_service, window)
    final_rss = process_metric(soak_service, "process_resident_memory_bytes")
    samples = first + middle + last

    outcomes: dict[str, int] = {}
    for _, _, outcome in samples:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    shed = outcomes.get("503", 0) + outcomes.get("StatusCode.UNAVAILABLE", 0)
    p_first, p_last = percentiles(first), percentiles(last)
    print(
        f"\nsoak {SOAK_SECONDS:.0f}s at concurrency {CONCURRENCY}: {len(samples)} requests, "
        f"{len(samples) / SOAK_SECONDS:.1f}/s, outcomes {outcomes}, shed {shed}\n"
        f"latency p50/p95/p99 first {window:.0f}s: {' / '.join(f'{v * 1000:.0f}' for v in p_first)} ms; "
        f"last {window:.0f}s: {' / '.join(f'{v * 1000:.0f}' for v in p_last)} ms\n"
        f"server CPU per request: first {cpu_first * 1000:.1f} ms, last {cpu_last * 1000:.1f} ms\n"
        f"resident memory after warm-up {warm_rss / 2**20:.0f} MiB, after the soak {final_rss / 2**20:.0f} MiB"
    )
    assert set(outcomes) <= {"200", "503", "StatusCode.UNAVAILABLE"}, outcomes  # no 5xx but load shedding
    assert outcomes.get("200", 0) > 0.99 * len(samples)
    assert final_rss <= 1.15 * warm_rss and final_rss >= 0.85 * warm_rss
    assert cpu_last <= 1.5 * cpu_first
