"""The README's first command, as a newcomer runs it: ``make serve``.

On an empty store it exports the default set (offline: LeNet-5, trained here; the ImageNet
networks are skipped with their reasons) and serves it; on a store that holds models it
exports nothing and serves them at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest

from .helpers import ROOT, free_ports, wait_for_ok

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@contextmanager
def make_serve(store: Path, home: Path, log: Path, timeout: float) -> Iterator[tuple[str, float]]:
    """``make serve`` on ``store`` and free loopback ports; yields its URL and the seconds it took to be ready."""
    port, grpc_port = free_ports(2)
    env = {**os.environ, "MODEL_STORE": str(store), "HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(port),
           "GRPC_PORT": str(grpc_port), "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}  # fmt: skip
    env.pop("MAKEFLAGS", None)  # `make test`'s own flags are not a newcomer's
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(["make", "serve"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        ready = wait_for_ok(f"{url}/readyz", timeout, give_up=lambda: process.poll() is not None)
        why = f"exited with {process.returncode}" if process.poll() is not None else f"not ready after {timeout}s"
        assert ready, f"make serve {why}:\n{log.read_text(errors='replace')[-4000:]}"
        yield url, time.monotonic() - started
    finally:
        with suppress(ProcessLookupError):  # it may have exited on its own (the assertion says why)
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def files(store: Path) -> dict[str, int]:
    """Every file of the store (but the service's own state) with its modification time."""
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}


def test_make_serve_exports_into_an_empty_store_then_serves_what_it_holds(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    with make_serve(store, tmp_path / "home-1", tmp_path / "first.log", timeout=600) as (url, seconds):
        models = {m["name"]: m for m in httpx.get(f"{url}/models", timeout=10).json()["models"]}
        print(f"\nmake serve on an empty store: exported and ready in {seconds:.1f} s")
    assert models["lenet5"]["status"] == "ready" and models["lenet5"]["weights"]["kind"] == "trained"
    assert sorted(p.name for p in (store / "lenet5").iterdir() if p.is_dir()) == ["1"]
    written = files(store)

    with make_serve(store, tmp_path / "home-2", tmp_path / "second.log", timeout=120) as (url, seconds):
        answer = httpx.get(f"{url}/models", timeout=10).json()
        print(f"make serve on a store that holds models: ready in {seconds:.1f} s")
    log = (tmp_path / "second.log").read_text(errors="replace")
    assert [m["name"] for m in answer["models"]] == ["lenet5"] and answer["models"][0]["version"] == 1
    assert "python -m export" not in log  # nothing exported
    assert files(store) == written  # nothing written: no new version, no file touched
