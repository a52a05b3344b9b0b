"""HTTP load with wrk: raw bodies POSTed round-robin, a time bound, loopback targets only.

wrk (C, one event loop per thread) rather than a Python client: on two cores the load
generator shares the machine with the server, and a Python client's own cost per request
(~0.1 ms) is of the order of what is being measured on the small models. Its Lua script
(``post.lua``) rotates the payload files and prints a JSON summary.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .load import RunResult, check_loopback

SCRIPT = Path(__file__).with_name("post.lua")


def wrk_command() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk is missing: `make test-tools` installs it (Debian package wrk)")
    return found


def start(url: str, bodies: Sequence[bytes], content_type: str, concurrency: int, seconds: float,
          directory: Path) -> subprocess.Popen[str]:  # fmt: skip
    """wrk in the background; :func:`finish` reads its result."""
    check_loopback(url)
    files = []
    for i, body in enumerate(bodies):
        path = directory / f"body-{i}"
        path.write_bytes(body)
        files.append(str(path))
    duration = f"{max(1, round(seconds))}s"
    command = [wrk_command(), "-t", str(min(2, concurrency)), "-c", str(concurrency), "-d", duration,
               "--timeout", "120s", "-s", str(SCRIPT), url, "--", content_type, *files]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str], path: str, model: str, concurrency: int) -> RunResult:
    out, err = process.communicate(timeout=600)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({process.returncode}): {err.strip() or out.strip()}")
    summary = json.loads(lines[-1])
    if summary["requests"] == 0:  # a row of zeros would read as a measurement
        raise RuntimeError(f"wrk finished no request to {model} {path} at concurrency {concurrency}: "
                           "a request takes longer than the run")  # fmt: skip
    seconds = summary["duration_us"] / 1e6
    served = summary["requests"] - summary["status_errors"]
    errors = summary["status_errors"] + summary["socket_errors"]
    return RunResult(
        path=path, model=model, concurrency=concurrency, requests=summary["requests"], images=served,
        errors=errors, seconds=round(seconds, 3), images_per_s=round(served / seconds, 2),
        p50_ms=round(summary["p50_us"] / 1000, 2), p95_ms=round(summary["p95_us"] / 1000, 2),
        p99_ms=round(summary["p99_us"] / 1000, 2),
    )  # fmt: skip


def http_load(url: str, bodies: Sequence[bytes], content_type: str, concurrency: int, seconds: float, path: str,
              model: str) -> RunResult:  # fmt: skip
    """POST ``bodies`` round-robin to ``url`` with ``concurrency`` connections for ``seconds``."""
    with tempfile.TemporaryDirectory(prefix="wrk-") as directory:
        process = start(url, bodies, content_type, concurrency, seconds, Path(directory))
        return finish(process, path, model, concurrency)
