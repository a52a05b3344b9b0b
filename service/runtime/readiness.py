"""Readiness across BentoML workers: the server is ready when every worker has loaded and warmed up.

Each worker answers ``/readyz`` (and gRPC ``ServerReady``) for itself, and the kernel picks
which worker gets a connection, so a worker that is ready cannot vouch for one still
loading. Each worker leaves a marker in a directory private to this server (named by
the ``bentoml serve`` process's pid and start time); the server is ready when there are
as many markers of live workers as configured workers.

Beside its marker each worker publishes the versions it serves (``<pid>.json``), so a
repository call answered by one worker can wait for all of them, and ``/metrics`` shows
every worker's model state whichever worker answers the scrape.

The last worker out removes the directory. Where nobody withdrew (the server and its workers
killed outright), the next server's first process removes it (:func:`sweep`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import psutil

from ..store.atomic import replace_text

logger = logging.getLogger(__name__)

PREFIX = "cnn-serving-readiness-"  # then the server's pid and when it started (see _started)
# the name before the start time counted from boot: such a server is judged by its pid alone, and it judges
# by its own rule only names under its own prefix, which this one does not match
EARLIER_PREFIX = "cnn-serving-ready-"


def sweep() -> list[Path]:
    """Remove the readiness directories of servers that no longer run; the ones removed."""
    removed = []
    temp = Path(tempfile.gettempdir())
    for path in [*temp.glob(f"{PREFIX}*"), *temp.glob(f"{EARLIER_PREFIX}*")]:
        earlier = path.name.startswith(EARLIER_PREFIX)
        pid, _, started = path.name.removeprefix(EARLIER_PREFIX if earlier else PREFIX).partition("-")
        if not (pid.isdigit() and started.isdigit()):
            continue
        if psutil.pid_exists(int(pid)) if earlier else _running(int(pid), int(started)):
            continue
        with contextlib.suppress(OSError):  # another user's, or another server sweeping at the same moment
            shutil.rmtree(path)
            removed.append(path)
    if removed:
        logger.info("removed the readiness directories of %d server(s) that no longer run", len(removed))
    return removed


def _started(process: psutil.Process) -> int:
    """When ``process`` started, in milliseconds since the machine booted. Not its start time since the epoch:
    that is the boot time read now plus this, and the boot time moves when the system clock is set, so a live
    server's directory could stop matching its name and be swept from under it (as seen here: a test server's
    ``/readyz`` answered 500 once another server had started on the same machine)."""
    return round((process.create_time() - psutil.boot_time()) * 1000)  # both read the boot time: it cancels out


def _running(pid: int, started: int) -> bool:
    try:
        return _started(psutil.Process(pid)) == started  # not a later process given the same pid
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # cannot tell: leave it
        return True


class WorkerReadiness:
    def __init__(self, workers: int, server_pid: int | None = None) -> None:
        self.workers = workers
        pid = server_pid or os.getppid()
        try:
            server = psutil.Process(pid)
        except psutil.NoSuchProcess:  # it died as this worker started: nothing to be ready for
            raise RuntimeError(f"the server process (pid {pid}) is gone: this worker does not start") from None
        name = f"{PREFIX}{server.pid}-{_started(server)}"
        self.directory = Path(tempfile.gettempdir()) / name
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self.marker = self.directory / str(os.getpid())

    def mark_ready(self) -> None:
        self.marker.touch()

    def all_ready(self) -> bool:
        live = [p for p in self.directory.iterdir() if p.name.isdigit() and psutil.pid_exists(int(p.name))]
        return len(live) >= self.workers

    def publish(self, state: dict[str, Any]) -> None:
        """Write this worker's model state; replaced atomically, so a reader never sees half of it, and staged per
        thread, so that two threads of a worker publishing at once (the residency thread's unload beside a
        request's cold start) do not move each other's half-written state (the repository orders them)."""
        replace_text(self.directory / f"{os.getpid()}.json", json.dumps(state))

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
