"""What the response cache (``RESPONSE_CACHE_MB``) saves: hits, and a hit's server time beside a miss's.

    python -m benchmarks.cache [--store DIR] [--models lenet5,resnet50] [--requests 1000] [--images 50] [--out DIR]

Per model, one worker with ``RESPONSE_CACHE_MB=64`` and ``ACCESS_LOG=json``; ``--requests`` sequential
``POST /classify`` cycling over ``--images`` distinct digits (scikit-learn's, drawn as PNGs), each hit checked
byte for byte against its image's first answer. The server time is the access log's ``seconds`` (from the
service's first middleware to the answer's last byte); the client's is the round trip. The store gets the
models with random weights where it lacks them. Prints a table with the CPU and its flags, and writes
``cache.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from export.pipeline import ExportOptions, export_model
from export.registry import list_models
from service.store.layout import ModelStore
from tests.helpers import running
from tests.service.pictures import held_out_drawings

from .arguments import models_problem
from .host import machine, record

SERVER = {"WORKERS": "1", "RESPONSE_CACHE_MB": "64", "ACCESS_LOG": "json"}


def percentiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100)
    return {"p50_ms": round(statistics.median(values) * 1e3, 3), "p99_ms": round(cuts[98] * 1e3, 3)}


def measure(store: ModelStore, model: str, requests: int, count: int, log: Path) -> dict[str, Any]:
    images, _ = held_out_drawings(count)
    first: dict[int, bytes] = {}
    client_seconds: dict[str, list[float]] = {"hit": [], "miss": []}
    with (
        running(Path(store.root), log, MODELS=model, **SERVER) as service,
        httpx.Client(base_url=service.url, timeout=60) as client,
    ):
        for i in range(requests):
            started = time.perf_counter()
            response = client.post("/classify", params={"model": model}, content=images[i % count],
                                   headers={"content-type": "image/png"})  # fmt: skip
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            outcome = response.headers["x-cache"]
            client_seconds[outcome].append(elapsed)
            if first.setdefault(i % count, response.content) != response.content:
                raise AssertionError(f"request {i}: a hit's body differs from its image's first answer")
        time.sleep(0.5)  # the last access lines flushed
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"time"')]
    server = {o: [float(line["seconds"]) for line in lines if line.get("cache") == o] for o in ("hit", "miss")}
    return {
        "model": model,
        "requests": requests,
        "images": count,
        "hits": len(server["hit"]),
        "server_hit": percentiles(server["hit"]),
        "server_miss": percentiles(server["miss"]),
        "client_hit": percentiles(client_seconds["hit"]),
        "client_miss": percentiles(client_seconds["miss"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cache", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("benchmarks/.store"))
    parser.add_argument("--models", default="lenet5,resnet50")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if problem := models_problem(args.models, (*list_models(), *ModelStore(args.store).names())):
        parser.error(f"--models {args.models}: {problem}")
    logging.basicConfig(level=logging.WARNING)
    store = ModelStore(args.store)
    logs = Path(tempfile.mkdtemp(prefix="cache-"))
    found: dict[str, Any] = {"machine": machine(), "runs": []}
    for model in [name for name in args.models.split(",") if name]:
        if store.latest(model) is None:
            export_model(model, store, ExportOptions(weights="random", progress=False))
        row = measure(store, model, args.requests, args.images, logs / f"{model}.log")
        found["runs"].append(row)
        print(f"{model:9} {row['hits']} hits of {row['requests']} over {row['images']} images; server time: hit "  # noqa: T201
              f"p50 {row['server_hit']['p50_ms']} ms p99 {row['server_hit']['p99_ms']} ms, miss p50 "
              f"{row['server_miss']['p50_ms']} ms; client round trip: hit p50 {row['client_hit']['p50_ms']} ms, "
              f"miss p50 {row['client_miss']['p50_ms']} ms")  # fmt: skip
    record(found, args.out, "cache.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
