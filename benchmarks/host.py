"""The machine a benchmark ran on, recorded beside its figures: CPU, cores, clock, the flags that set the price
of an image (FMA, AVX-512, VNNI, AMX), library versions and the commit. Imports nothing that registers gRPC
messages, so that benchmarks driving tritonclient can use it too."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import onnxruntime as ort

from service.store.host import cpu_count

ROOT = Path(__file__).resolve().parent.parent
# the commit the figures belong to, where the tree measured has no git of its own: BENCH_COMMIT=$(git rev-parse HEAD)
COMMIT_ENV = "BENCH_COMMIT"
# The CPU features the figures depend on (ONNX Runtime's kernels, INT8 dot products)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpuinfo(field: str) -> str | None:
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as info:
        return next(line.split(":", 1)[1].strip() for line in info if line.startswith(field))
    return None


def machine() -> dict[str, Any]:
    from export.precision import cpu_flags, cpu_info

    cpu = cpuinfo("model name") or platform.processor()
    mhz = cpuinfo("cpu MHz")
    commit = os.environ.get(COMMIT_ENV, "").strip()  # a copy of the tree without its git (another machine's)
    if not commit:
        try:
            run = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
            commit = run.stdout.strip()
        except OSError:
            commit = ""
    return {"cpu": cpu, "cores": cpu_count(), "providers": ["CPUExecutionProvider"], "commit": commit or "unknown",
            "python": platform.python_version(), "onnxruntime": ort.__version__,
            "clock_ghz": round(float(mhz) / 1000, 2) if mhz else None, "int8": cpu_info(),
            "cpu_flags": [flag for flag in CPU_FLAGS if flag in cpu_flags()]}  # fmt: skip


def record(found: dict[str, Any], out: Path, name: str) -> None:
    """Print the machine ``found["machine"]`` describes (the figures above it depend on it) and write ``found`` as
    ``out/name``."""
    host = found["machine"]
    print(f"on {host['cpu']}, {host['cores']} cores, flags {', '.join(host['cpu_flags'])}")  # noqa: T201
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(found, indent=2) + "\n")
