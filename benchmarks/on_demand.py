"""What serving the whole store on demand costs: cold starts per network, and a skewed workload's hit ratio and
throughput at two budgets beside the same workload on a server that keeps every model loaded.

    python -m benchmarks.on_demand [--store DIR] [--budgets 700MiB,1400MiB] [--seconds 30] [--out DIR]

The store gets LeNet-5, ResNet-18, GoogLeNet, AlexNet and ResNet-50 with random weights where it lacks them
(their arithmetic is the real one). Cold starts: room beside pinned LeNet-5 for the largest network alone,
asked in turn with each other one ``--repeats`` times, so that every request loads its model (client-side
latency: load, warm-up and the answer). Workload: eight clients, half HTTP and half gRPC, popularity skewed
like real traffic (``POPULARITY``); a hit is a request that found its model resident. Prints a table with
the CPU and its flags, and writes ``on_demand.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from skimage import data as photos

from export.pipeline import ExportOptions, export_model
from service.store.layout import ModelStore
from tests.helpers import ServiceProcess, encode, metric_samples, running
from tests.service.lifecycle_load import Workload

from .arguments import models_problem
from .host import machine, record

POPULARITY = {"lenet5": 0.35, "resnet18": 0.25, "googlenet": 0.18, "resnet50": 0.12, "alexnet": 0.10}
PHOTO = encode(photos.chelsea(), "JPEG", quality=90)
SERVER = {"WORKERS": "1", "MAX_BATCH_SIZE": "8"}


def zoo(store: ModelStore, names: list[str]) -> None:
    for name in names:
        if store.latest(name) is None:
            export_model(name, store, ExportOptions(weights="random", progress=False))


def counter(service: ServiceProcess, name: str) -> float:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    return sum(value for _, value in metric_samples(text, name))


def estimate(store: ModelStore, name: str) -> int:
    version = store.latest(name)
    assert version is not None
    return int(version.read_metadata()["memory"]["resident_estimate_bytes"])


def cold_starts(store: ModelStore, names: list[str], repeats: int, log: Path) -> dict[str, dict[str, float]]:
    """Room beside pinned LeNet-5 for the largest network alone, asked in turn with each other one: every
    request loads its model."""
    others = [name for name in names if name != "lenet5"]
    largest = max(others, key=lambda name: estimate(store, name))
    budget = estimate(store, "lenet5") + estimate(store, largest) + 16 * 2**20
    env = {**SERVER, "MODEL_CONTROL": "on-demand", "PINNED": "lenet5", "MEMORY_BUDGET": str(budget)}
    seconds: dict[str, list[float]] = {name: [] for name in others}
    turns = [name for other in others if other != largest for name in (largest, other)]
    with running(store.root, log, **env) as service, httpx.Client(timeout=120) as client:
        for _ in range(repeats):
            for name in turns:
                started = time.perf_counter()
                response = client.post(f"{service.url}/classify", params={"model": name}, content=PHOTO,
                                       headers={"content-type": "image/jpeg"})  # fmt: skip
                response.raise_for_status()
                seconds[name].append(time.perf_counter() - started)
    return {name: {"p50_s": round(float(np.percentile(s, 50)), 3), "p95_s": round(float(np.percentile(s, 95)), 3),
                   "samples": len(s)} for name, s in seconds.items()}  # fmt: skip


def workload(store: ModelStore, popularity: dict[str, float], budget: str | None, seconds: float,
             log: Path) -> dict[str, Any]:  # fmt: skip
    names = ",".join(popularity)
    env = ({**SERVER, "MODEL_CONTROL": "on-demand", "PINNED": "lenet5", "MEMORY_BUDGET": budget} if budget
           else {**SERVER, "MODELS": names})  # fmt: skip
    with running(store.root, log, **env) as service:
        load = Workload(service, popularity, PHOTO, seconds)
        load.run()
        waited = counter(service, "cnn_cold_start_waits_total") if budget else 0.0
        evictions = counter(service, "cnn_model_evictions_total") if budget else 0.0
    answered = [a for a in load.answers if a[5] is None]
    latencies = np.array([a[3] for a in answered]) * 1000
    p50, p95 = (round(float(v), 1) for v in np.percentile(latencies, [50, 95]))
    return {"budget": budget or "every model loaded", "requests": len(load.answers),
            "failed": len(load.answers) - len(answered), "requests_per_s": round(len(answered) / seconds, 1),
            "hit_ratio": round(1 - waited / max(len(answered), 1), 3), "evictions": int(evictions),
            "p50_ms": p50, "p95_ms": p95, "peak_rss_mib": round(max(load.rss) / 2**20)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.on_demand", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("benchmarks/.store"))
    parser.add_argument("--budgets", default="700MiB,1400MiB")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=5, help="cold starts per network (%(default)s)")
    parser.add_argument("--models", default=",".join(POPULARITY), help="a subset of %(default)s, for a quick run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if problem := models_problem(args.models, POPULARITY):  # the workload's shares are these networks'
        parser.error(f"--models {args.models}: {problem}")
    logging.basicConfig(level=logging.WARNING)
    names = [name for name in args.models.split(",") if name]
    popularity = {name: share for name, share in POPULARITY.items() if name in names}
    store = ModelStore(args.store)
    zoo(store, names)
    logs = Path(tempfile.mkdtemp(prefix="on-demand-"))
    found: dict[str, Any] = {"machine": machine(), "cold_starts": cold_starts(store, names, args.repeats,
                                                                              logs / "cold.log")}  # fmt: skip
    for name, figures in found["cold_starts"].items():
        print(f"cold start {name:10} p50 {figures['p50_s']:6.3f} s  p95 {figures['p95_s']:6.3f} s")  # noqa: T201
    found["workloads"] = [workload(store, popularity, budget or None, args.seconds, logs / f"load-{i}.log")
                          for i, budget in enumerate([*args.budgets.split(","), ""])]  # fmt: skip
    for row in found["workloads"]:
        print(f"{row['budget']:>20}: {row['requests_per_s']:7.1f} requests/s, hit ratio {row['hit_ratio']:.3f}, "  # noqa: T201
              f"{row['evictions']} evictions, p50 {row['p50_ms']} ms, p95 {row['p95_ms']} ms, "
              f"{row['failed']} failed, peak RSS {row['peak_rss_mib']} MiB")  # fmt: skip
    record(found, args.out, "on_demand.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
