"""Readiness across BentoML workers: the server is ready when every worker has loaded and warmed up.

Each worker answers ``/readyz`` (and gRPC ``ServerReady``) for itself, and the kernel picks
which worker gets a connection, so a worker that is ready cannot vouch for one still
loading. Each worker leaves a marker in a directory private to this server (named by
the ``bentoml serve`` process's pid and start time); the server is ready when there are
as many markers of live workers as configured workers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import psutil


class WorkerReadiness:
    def __init__(self, workers: int, server_pid: int | None = None) -> None:
        self.workers = workers
        server = psutil.Process(server_pid or os.getppid())
        name = f"cnn-serving-ready-{server.pid}-{int(server.create_time())}"
        self.directory = Path(tempfile.gettempdir()) / name
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self.marker = self.directory / str(os.getpid())

    def mark_ready(self) -> None:
        self.marker.touch()

    def all_ready(self) -> bool:
        live = [p for p in self.directory.iterdir() if p.name.isdigit() and psutil.pid_exists(int(p.name))]
        return len(live) >= self.workers

    def withdraw(self) -> None:
        """Remove this worker's marker; the last worker out removes the directory."""
        self.marker.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: another worker is still up
            self.directory.rmdir()
