"""Readiness across BentoML workers: the server is ready when every worker has loaded and warmed up.

Each worker answers ``/readyz`` (and gRPC ``ServerReady``) for itself, and the kernel picks
which worker gets a connection, so a worker that is ready cannot vouch for one still
loading. Each worker leaves a marker in a directory private to this server (named by
the ``bentoml serve`` process's pid and start time); the server is ready when there are
as many markers of live workers as configured workers.

Beside its marker each worker publishes the versions it serves (``<pid>.json``), so a
repository call answered by one worker can wait for all of them, and ``/metrics`` shows
every worker's model state whichever worker answers the scrape.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import psutil


class WorkerReadiness:
    def __init__(self, workers: int, server_pid: int | None = None) -> None:
        self.workers = workers
        pid = server_pid or os.getppid()
        try:
            server = psutil.Process(pid)
        except psutil.NoSuchProcess:  # it died as this worker started: nothing to be ready for
            raise RuntimeError(f"the server process (pid {pid}) is gone: this worker does not start") from None
        name = f"cnn-serving-ready-{server.pid}-{int(server.create_time())}"
        self.directory = Path(tempfile.gettempdir()) / name
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self.marker = self.directory / str(os.getpid())

    def mark_ready(self) -> None:
        self.marker.touch()

    def all_ready(self) -> bool:
        live = [p for p in self.directory.iterdir() if p.name.isdigit() and psutil.pid_exists(int(p.name))]
        return len(live) >= self.workers

    def publish(self, state: dict[str, Any]) -> None:
        """Write this worker's model state; replaced atomically, so a reader never sees half of it."""
        staging = self.directory / f".{os.getpid()}.json.tmp"
        staging.write_text(json.dumps(state), encoding="utf-8")
        os.replace(staging, self.directory / f"{os.getpid()}.json")

    def states(self) -> dict[int, dict[str, Any]]:
        """Every live worker's last published state, by pid."""
        found = {}
        for path in self.directory.glob("*.json"):
            pid = path.stem
            if not pid.isdigit() or not psutil.pid_exists(int(pid)):
                continue
            with contextlib.suppress(OSError, ValueError):
                found[int(pid)] = json.loads(path.read_text(encoding="utf-8"))
        return found

    def withdraw(self) -> None:
        """Remove this worker's marker and state; the last worker out removes the directory."""
        self.marker.unlink(missing_ok=True)
        (self.directory / f"{os.getpid()}.json").unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: another worker is still up
            self.directory.rmdir()
