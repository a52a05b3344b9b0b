"""``make profile``: where one worker's CPU goes under the ``/noop`` and LeNet-5 ``/classify`` loads.

The real service (``ENABLE_NOOP=true``, LeNet-5 from the benchmark's store) takes wrk's load
at concurrency 16 while py-spy samples its worker process without stopping it. Each
sample is a Python stack of a thread that was running (idle threads are left out); a
stack belongs to the layer of its innermost frame whose code has one (``LAYERS``), so
``json.dumps`` called from our handler counts as JSON, and a ``contextlib`` frame as
whatever called it. Writes ``benchmarks/results/profile-LABEL-LOAD.svg`` (flame graphs,
frames coloured by layer) and adds LABEL's shares to ``profile.json`` and ``profile.md``:
``--label before`` and ``--label after`` put two states of the code side by side.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from service.store.layout import ModelStore

from . import flamegraph, wrk
from .host import machine
from .payloads import digit_png

logger = logging.getLogger("benchmarks.profile")

# (layer, colour, pattern on a frame's "function (file:line)"), first match wins
LAYERS: tuple[tuple[str, str, str], ...] = (
    ("ONNX Runtime", "#4e79a7", r"onnxruntime/"),
    ("decode (Pillow, preprocess)", "#59a14f", r"PIL/|service/store/preprocess\.py"),
    ("metrics (prometheus_client)", "#edc948", r"prometheus_client/|service/metrics\.py"),
    ("JSON", "#b07aa1", r"json/|orjson"),
    ("tracing (OpenTelemetry)", "#ff9da7", r"opentelemetry/|service/frontends/tracing\.py"),
    ("BentoML middlewares", "#e15759", r"bentoml/_internal/|_bentoml_impl/server/app\.py"),
    ("routing", "#f28e2b", r"\bmatches \(|\b_match \(|PassiveMount|Router\.app \(starlette"),
    ("HTTP parsing (uvicorn)", "#76b7b2", r"uvicorn/|h11/|httptools"),
    ("batching", "#9c755f", r"service/runtime/batching\.py"),
    ("our request path", "#8cd17d", r"\(service/"),
    ("FastAPI / Starlette", "#f1ce63", r"fastapi/|starlette/|anyio/"),
    ("event loop, threads", "#bab0ac", r"asyncio/|uvloop|selectors\.py|concurrent/futures|threading\.py"),
)
OTHER, OTHER_COLOUR = "other", "#d4d4d4"
LOADS = {"noop": "/noop", "classify": "/classify?model=lenet5"}


def layer_of(frame: str) -> str | None:
    return next((name for name, _, pattern in LAYERS if re.search(pattern, frame)), None)


def stack_layer(stack: tuple[str, ...]) -> str:
    """The layer of the innermost frame that has one."""
    return next((layer for frame in reversed(stack) if (layer := layer_of(frame))), OTHER)


def colour_of(frame: str) -> str:
    layer = layer_of(frame)
    return next((colour for name, colour, _ in LAYERS if name == layer), OTHER_COLOUR)


ROOT = Path(__file__).resolve().parent.parent
# py-spy's full file names, from the package (site-packages, the standard library, this repository) on
PREFIX = re.compile(r"\((?:[^()]*/site-packages/|[^()]*/lib/python3\.\d+/|" + re.escape(f"{ROOT}/") + ")")


def read_collapsed(path: Path) -> dict[tuple[str, ...], int]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(PREFIX.sub("(", frame) for frame in stack.split(";"))] += int(count)
    return dict(stacks)


def shares(stacks: dict[tuple[str, ...], int]) -> dict[str, float]:
    by_layer: Counter[str] = Counter()
    for stack, count in stacks.items():
        by_layer[stack_layer(stack)] += count
    total = sum(by_layer.values()) or 1
    return {layer: round(100 * by_layer[layer] / total, 1) for layer in [*(n for n, _, _ in LAYERS), OTHER]}


def worker_pid(server_pid: int, timeout: float = 30) -> int:
    """The BentoML worker serving HTTP: the process running ``_bentoml_impl.worker``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(server_pid).children(recursive=True):
            if any("_bentoml_impl.worker" in part for part in child.cmdline()):
                return child.pid
        time.sleep(0.5)
    raise RuntimeError("no BentoML worker process found")


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise RuntimeError("py-spy is missing: `make setup` installs it (dev dependency)")
    return found


def record(url: str, pid: int, load: str, seconds: float, directory: Path) -> tuple[dict[tuple[str, ...], int], Any]:
    """wrk on ``load`` while py-spy samples ``pid``; the stacks and wrk's result."""
    body = digit_png()
    process = wrk.start(url + LOADS[load], [body], "image/png", 16, seconds + 3, directory)
    time.sleep(1)  # past the connection set-up
    raw = directory / f"{load}.txt"
    subprocess.run([py_spy(), "record", "--pid", str(pid), "--duration", str(round(seconds)), "--rate", "250",
                    "--nonblocking", "--full-filenames", "--format", "raw", "--output", str(raw)],
                   check=True, capture_output=True)  # fmt: skip
    result = wrk.finish(process, load, "lenet5", 16)
    return read_collapsed(raw), result


def write(results: dict[str, Any], out: Path) -> None:
    (out / "profile.json").write_text(json.dumps(results, indent=2) + "\n")
    columns = [(label, load) for label in results for load in results[label]["loads"]]
    lines = ["| layer | " + " | ".join(f"{label} {load}" for label, load in columns) + " |",
             "|---|" + "---|" * len(columns)]  # fmt: skip
    for name in [*(n for n, _, _ in LAYERS), OTHER]:
        cells = [f"{results[label]['loads'][load]['layers'].get(name, 0.0):.1f}%" for label, load in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = [f"{results[label]['loads'][load]['requests_per_s']:,.0f}" for label, load in columns]
    lines.append("| **requests/s** (wrk, concurrency 16, while sampled) | " + " | ".join(cells) + " |")
    (out / "profile.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from tests.helpers import ServiceProcess

    from .__main__ import ensure_models

    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="latest", help="name of this state of the code (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="sampling time per load")
    parser.add_argument("--store", type=Path, default=Path("benchmarks/.store"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="a service setting")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    store = ModelStore(args.store)
    ensure_models(store, ("lenet5",), quick=False)
    args.out.mkdir(parents=True, exist_ok=True)
    existing = json.loads((args.out / "profile.json").read_text()) if (args.out / "profile.json").exists() else {}
    env = {"MODELS": "lenet5", "ENABLE_NOOP": "true", **dict(e.split("=", 1) for e in args.env)}
    entry: dict[str, Any] = {"recorded": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                             "machine": machine(), "env": env, "loads": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="profile-") as directory:
        service = ServiceProcess(store.root, Path(directory) / "service.log", **env).start()
        try:
            assert service.process is not None
            pid = worker_pid(service.process.pid)
            for load in LOADS:
                stacks, result = record(service.url, pid, load, args.seconds, Path(directory))
                layers = shares(stacks)
                title = f"{args.label}: one worker under POST {LOADS[load]} at concurrency 16"
                legend = {name: colour for name, colour, _ in LAYERS} | {OTHER: OTHER_COLOUR}
                svg = flamegraph.render(stacks, title, colour_of, legend)
                (args.out / f"profile-{args.label}-{load}.svg").write_text(svg)
                entry["loads"][load] = {"requests_per_s": result.images_per_s, "errors": result.errors,
                                        "samples": sum(stacks.values()), "layers": layers}  # fmt: skip
                logger.info("%s %s: %.0f requests/s; %s", args.label, load, result.images_per_s,
                            ", ".join(f"{k} {v}%" for k, v in layers.items() if v))  # fmt: skip
        finally:
            service.stop()
    write(existing | {args.label: entry}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
