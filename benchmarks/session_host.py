"""Where the sessions live: each worker its own (``SESSION_HOST=worker``) or one session host for all (``shared``).

    python -m benchmarks.session_host [--store DIR] [--workers 2] [--seconds 10] [--repeats 2] [--out DIR]

The real server (``bentoml serve``) with ``--workers`` workers on LeNet-5 (a drawn digit, PNG) and ResNet-18 with
random weights (256-px JPEGs), exported into ``--store`` where it lacks them; wrk at the given concurrency for
``--seconds`` after a 2 s warm-up, the two settings in turn ``--repeats`` times. Per run: images/s, p50, p99, and
the resident memory of the server's processes (every model copy counts; a page two processes share counts once
per process). The host is built for the GPU, where it replaces a CUDA context per worker; on the CPU it shows what
the hop to the host costs. Prints the CPU and its flags, and writes ``session_host.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from export.pipeline import ExportOptions, export_model
from service.store.layout import ModelStore
from tests.helpers import ServiceProcess

from . import wrk
from .host import machine, record
from .payloads import digit_png, photos_at

MODELS = {"lenet5": 16, "resnet18": 8}  # and the concurrency each is driven at


def resident_mib(service: ServiceProcess) -> float:
    assert service.process is not None
    root = psutil.Process(service.process.pid)
    tree = [root, *root.children(recursive=True)]
    return round(sum(p.memory_info().rss for p in tree) / 2**20, 1)


def one(store: ModelStore, model: str, where: str, workers: int, seconds: float, log: Path) -> dict[str, Any]:
    files, content_type = ([digit_png()], "image/png") if model == "lenet5" else (photos_at(256), "image/jpeg")
    env = {"MODELS": model, "WORKERS": str(workers), "SESSION_HOST": where}
    service = ServiceProcess(store.root, log, **env).start(timeout=180)
    try:
        url, concurrency = f"{service.url}/classify?model={model}", MODELS[model]
        with tempfile.TemporaryDirectory() as directory:
            wrk.finish(wrk.start(url, files, content_type, concurrency, 2, Path(directory)), "http", model, concurrency)
            result = wrk.finish(wrk.start(url, files, content_type, concurrency, seconds, Path(directory)), "http",
                                model, concurrency)  # fmt: skip
        memory = resident_mib(service)
    finally:
        service.stop()
    return {"model": model, "session_host": where, "workers": workers, "concurrency": concurrency,
            "images_per_s": result.images_per_s, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
            "errors": result.errors, "resident_mib": memory}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.session_host", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("benchmarks/.store-session-host"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    store = ModelStore(args.store)
    for model in MODELS:
        if store.latest(model) is None:
            export_model(model, store, ExportOptions(weights="random", progress=False))
    found: dict[str, Any] = {"machine": machine(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="session-host-") as logs:
        for repeat in range(args.repeats):
            for model in MODELS:
                for where in ("worker", "shared"):
                    log = Path(logs) / f"{model}-{where}-{repeat}.log"
                    row = one(store, model, where, args.workers, args.seconds, log)
                    found["runs"].append(row)
                    print(f"{model} WORKERS={row['workers']} SESSION_HOST={where} c={row['concurrency']}: "  # noqa: T201
                          f"{row['images_per_s']:.1f} images/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
                          f"{row['errors']} errors, {row['resident_mib']} MiB resident")  # fmt: skip
                    time.sleep(1)
    record(found, args.out, "session_host.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
