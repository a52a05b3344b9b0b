"""Readiness across workers: one ready worker does not make the server ready."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from service.runtime.readiness import WorkerReadiness, sweep


@pytest.fixture
def tmpdir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    return tmp_path


def test_the_server_is_ready_only_when_every_worker_is(tmpdir_env: Path) -> None:
    this = WorkerReadiness(workers=2, server_pid=os.getpid())
    assert not this.all_ready()
    this.mark_ready()
    assert not this.all_ready()  # the other worker is still loading

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (this.directory / str(other.pid)).touch()  # the other worker's marker
        assert this.all_ready()
    finally:
        other.kill()
        other.wait()
    assert not this.all_ready()  # a dead worker's marker does not count

    this.withdraw()
    assert not this.marker.exists()


def test_servers_do_not_share_markers(tmpdir_env: Path) -> None:
    first = WorkerReadiness(workers=1, server_pid=os.getpid())
    second = WorkerReadiness(workers=1, server_pid=os.getppid())
    first.mark_ready()
    assert first.all_ready() and not second.all_ready()


def test_a_worker_whose_server_is_gone_does_not_start(tmpdir_env: Path) -> None:
    server = subprocess.Popen([sys.executable, "-c", "pass"])
    server.wait()  # reaped: its pid names no process
    with pytest.raises(RuntimeError, match=rf"server process \(pid {server.pid}\) is gone"):
        WorkerReadiness(workers=1, server_pid=server.pid)
    assert not list(tmpdir_env.iterdir())  # and it left no marker directory


def test_a_new_server_removes_only_what_servers_that_no_longer_run_left(tmpdir_env: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    this = psutil.Process()
    running = WorkerReadiness(workers=1, server_pid=this.pid).directory.name
    started = int(running.rpartition("-")[2])
    prefix = running.rpartition(f"{this.pid}-")[0]
    names = {
        "killed": f"{prefix}{gone.pid}-{started}",  # its server is no more
        "reused": f"{prefix}{this.pid}-{started - 1}",  # its pid now names a later process
        "other": f"{prefix}not-a-server",
        # an earlier version's (start time since the epoch), judged by its pid alone
        "earlier killed": f"cnn-serving-ready-{gone.pid}-1796517032",
        "earlier running": f"cnn-serving-ready-{this.pid}-1796517032",
    }
    for name in [*names.values(), running]:
        (tmpdir_env / name).mkdir(exist_ok=True)
        (tmpdir_env / name / "1234").touch()  # a worker's marker, never withdrawn
    removed = sweep()
    assert sorted(p.name for p in removed) == sorted([names["killed"], names["reused"], names["earlier killed"]])
    kept = [running, names["other"], names["earlier running"]]
    assert sorted(p.name for p in tmpdir_env.iterdir()) == sorted(kept)


def test_a_running_servers_directory_survives_a_change_of_the_system_clock(
    tmpdir_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The boot time Linux reports (``btime``) is the clock now less the time since boot: setting the clock
    moves it, and with it every process's start time since the epoch."""
    readiness = WorkerReadiness(workers=1, server_pid=os.getpid())
    readiness.mark_ready()
    booted = psutil.boot_time()
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: booted + 1.0)  # the clock set a second on
    assert sweep() == []
    assert readiness.all_ready()


def test_threads_of_one_worker_publishing_at_once_never_tear_its_state(tmpdir_env: Path) -> None:
    """Two threads of a worker publish its state 300 times each at once (the residency thread's unload beside a
    request's cold start): no publish fails, and a reader only ever finds a whole state, one of the two."""
    readiness = WorkerReadiness(workers=1, server_pid=os.getpid())
    states = [{"generation": n, "models": {"m": {str(v): {"status": "ready"} for v in range(50)}}} for n in (1, 2)]
    failures: list[BaseException] = []
    seen: list[int] = []

    def publish(state: dict) -> None:
        try:
            for _ in range(300):
                readiness.publish(state)
        except BaseException as exc:  # any failure is the finding
            failures.append(exc)

    threads = [threading.Thread(target=publish, args=(state,)) for state in states]
    published, torn = readiness.directory / f"{os.getpid()}.json", 0
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        try:  # read as another worker does, but a torn file counted rather than skipped
            seen.append(json.loads(published.read_text())["generation"])
        except FileNotFoundError:  # before the first publish
            pass
        except ValueError:
            torn += 1
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert torn == 0 and set(seen) <= {1, 2} and readiness.states()[os.getpid()] in states
