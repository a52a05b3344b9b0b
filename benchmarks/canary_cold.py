"""An on-demand canary whose candidate is not resident: how long requests take while it loads.

    python -m benchmarks.canary_cold [--store DIR] [--repeats 3] [--out DIR]

In-process (the runtime as a worker builds it, no server): ResNet-18 with random weights as the primary (exported
into ``--store`` where it lacks one) and a copy of it, ``twin``, as the candidate; ``MODEL_CONTROL=on-demand``,
``CANARY=resnet18:twin:0.5``. With the primary resident and the candidate not, one 224-px JPEG is classified again
and again until the candidate is resident: how many requests that took, who answered them, the slowest and the
median. A request diverted while the candidate is cold would wait for its load, were it not answered by the primary.
Prints the CPU and its flags, and writes ``canary_cold.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image
from skimage import data

from export.pipeline import ExportOptions, export_model
from service.metrics import get_metrics
from service.runtime.residency import Residency
from service.server import build_runtime
from service.settings import Settings
from service.store.layout import ModelStore

from .host import machine, record

MAX_REQUESTS = 500


def store_with_twin(source: Path, work: Path) -> Path:
    primary = ModelStore(source)
    if primary.latest("resnet18") is None:
        export_model("resnet18", primary, ExportOptions(weights="random", progress=False))
    store = work / "store"
    shutil.copytree(primary.model_dir("resnet18"), store / "resnet18")
    shutil.copytree(primary.model_dir("resnet18"), store / "twin")
    config = store / "twin" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "resnet18"', 'name: "twin"'))
    return store


def once(store: Path, state: Path, image: bytes) -> dict[str, Any]:
    state.unlink(missing_ok=True)
    settings = Settings(model_store=store, workers=1, model_control="on-demand", memory_budget="4GiB",
                        canary="resnet18:twin:0.5", canary_state=state)  # fmt: skip
    runtime = build_runtime(settings, get_metrics())
    residency = runtime.residency
    assert isinstance(residency, Residency)
    runtime.start()

    async def run() -> dict[str, Any]:
        await residency.ensure("resnet18", None)  # the primary resident, the candidate not
        started, latencies, answered_by = time.perf_counter(), list[float](), Counter[str]()
        while runtime.repository.serving("twin") is None and len(latencies) < MAX_REQUESTS:
            sent = time.perf_counter()
            answered_by[(await runtime.classifier.classify("resnet18", None, [image], k=1)).model] += 1
            latencies.append(time.perf_counter() - sent)
        while runtime.repository.serving("twin") is None:
            await asyncio.sleep(0.005)
        slowest, median = 1000 * max(latencies), 1000 * statistics.median(latencies)
        return {"requests_until_resident": len(latencies), "answered_by": dict(answered_by),
                "slowest_ms": round(slowest, 1), "median_ms": round(median, 1),
                "candidate_resident_s": round(time.perf_counter() - started, 3)}  # fmt: skip

    try:
        return asyncio.run(run())
    finally:
        if runtime.canaries is not None:
            runtime.canaries.stop()
        runtime.residency.shutdown()
        runtime.decoders.shutdown(wait=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.canary_cold", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("benchmarks/.store-canary-cold"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="canary-cold-"))
    store = store_with_twin(args.store, work)
    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, "JPEG")
    found: dict[str, Any] = {"machine": machine(), "runs": []}
    for _ in range(args.repeats):
        row = once(store, work / "canary.json", buffer.getvalue())
        found["runs"].append(row)
        print(f"{row['requests_until_resident']} requests until the candidate was resident "  # noqa: T201
              f"({row['candidate_resident_s']} s), answered by {row['answered_by']}: slowest {row['slowest_ms']} ms, "
              f"median {row['median_ms']} ms")  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    record(found, args.out, "canary_cold.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
