"""A canary's way on the real service: a faithful INT8 LeNet-5 stepped up and promoted, a random one rolled back.

    python -m benchmarks.canary [--store DIR] [--requests 3000] [--concurrency 8] [--out DIR]

Per scenario, the service on a store with the trained LeNet-5 (trained into ``--store`` where it lacks one), its
INT8 variant and a LeNet-5 with random weights (``lenet5_rand``); ``CANARY_STEPS=0.1,0.5,1.0``,
``CANARY_WINDOW=100``; ``--requests`` requests for lenet5 at ``--concurrency``, over /classify, OIP REST and
gRPC in turn. Reports each window's fraction, the candidate's share of the requests it saw, its verdict and
figures, the requests that failed, and the candidate's answers to requests sent after a rollback was visible.
Prints a summary with the CPU and its flags, and writes ``canary.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from export.pipeline import ExportOptions, export_model
from service.store.layout import ModelStore
from tests.helpers import running
from tests.service.canary_load import canary_of, candidates, load
from tests.service.pictures import held_out_drawings

from .host import machine, record

SCENARIOS = [  # (name, CANARY, WORKERS)
    ("int8 promoted, 1 worker", "lenet5:lenet5_int8:0.1", "1"),
    ("int8 promoted, 2 workers", "lenet5:lenet5_int8:0.1", "2"),
    ("random weights rolled back", "lenet5:lenet5_rand:0.1", "1"),
]


def scenario(store: Path, canary: str, workers: str, requests: int, concurrency: int, log: Path) -> dict[str, Any]:
    (store / ".canary.json").unlink(missing_ok=True)  # each scenario starts afresh
    images, _ = held_out_drawings(360)
    env = {"MODELS": "lenet5", "WORKERS": workers, "CANARY": canary, "CANARY_STEPS": "0.1,0.5,1.0",
           "CANARY_WINDOW": "100"}  # fmt: skip
    with running(store, log, **env) as service:
        started = time.perf_counter()
        records = asyncio.run(load(service, images, requests, watch="rand" in canary, concurrency=concurrency))
        seconds = time.perf_counter() - started
        state = canary_of(service)
    answers = [r for r in records if "model" in r]
    seen = [r["rolled_back_at"] for r in records if "rolled_back_at" in r]
    primary, candidate = canary.split(":")[:2]
    marker = f"{primary}:{candidate}"  # what a candidate's answer carries over every protocol
    return {
        "canary": canary, "workers": int(workers), "requests": requests, "concurrency": concurrency,
        "seconds": round(seconds, 2), "failed": requests - len(answers),
        "answered_by": dict(Counter(a["model"] for a in answers)),
        "unmarked_candidate_answers": sum(a["model"] == candidate and a["canary"] != marker for a in answers),
        "candidate_answers_sent_after_the_rollback_was_visible": (
            sum(a["sent"] > seen[0] and a["model"] == candidate for a in answers) if seen else None
        ),
        "state": state["state"], "reason": state["reason"],
        "windows": [{"passed": w["passed"], "failures": w["failures"], "share": share(w["figures"]["requests"]),
                     **w["figures"]} for w in state["history"]],
    }  # fmt: skip


def share(requests: dict[str, int]) -> float:
    """The candidate's share of the requests a window saw."""
    return round(requests["candidate"] / max(1, requests["candidate"] + requests["primary"]), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.canary", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("benchmarks/.store-canary"))
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    trained = ModelStore(args.store / "trained")
    if trained.latest("lenet5") is None:
        export_model("lenet5", trained, ExportOptions(weights="trained", progress=False))
    work = Path(tempfile.mkdtemp(prefix="canary-"))
    store = candidates(trained.model_dir("lenet5"), work / "store")
    found: dict[str, Any] = {"machine": machine(), "runs": []}
    for name, canary, workers in SCENARIOS:
        row = scenario(store, canary, workers, args.requests, args.concurrency, work / f"{len(found['runs'])}.log")
        found["runs"].append({"scenario": name, **row})
        steps = "; ".join(f"{w['fraction']:g}: share {w['share']:.1%}, {'pass' if w['passed'] else 'FAIL'}"
                          for w in row["windows"])  # fmt: skip
        print(f"{name}: {row['state']} after {len(row['windows'])} windows ({steps}); {row['failed']} failed of "  # noqa: T201
              f"{row['requests']} in {row['seconds']} s; answered by {row['answered_by']}")  # fmt: skip
    record(found, args.out, "canary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
