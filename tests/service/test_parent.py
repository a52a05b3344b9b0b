"""A worker whose server died stops, and exits where its shutdown does not end (``service.parent``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).parents[2]

# a worker whose shutdown never ends (it ignores SIGTERM), watching its parent
WORKER = textwrap.dedent("""
    import logging, signal, sys, time
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from service.parent import ParentWatch
    ParentWatch(interval=0.1, grace=1.0).start()
    time.sleep(60)
""")
# its server: starts it, says its pid, waits to be killed
SERVER = textwrap.dedent("""
    import subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stderr=open(sys.argv[2], "w"))
    print(worker.pid, flush=True)
    time.sleep(60)
""")


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_an_orphaned_worker_whose_shutdown_hangs_exits_after_the_grace(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    server = subprocess.Popen([sys.executable, "-c", SERVER, WORKER, str(log)], cwd=ROOT, stdout=subprocess.PIPE)
    assert server.stdout is not None
    worker = int(server.stdout.readline())
    try:
        time.sleep(1.0)  # watching, and still there while its server lives
        assert not gone(worker, 0.1), log.read_text()
        server.kill()
        server.wait()
        assert gone(worker, 10), log.read_text()
        text = log.read_text()
        assert f"is gone: this worker (pid {worker}) stops" in text
        assert "took over 1 s after its server died: exiting now" in text
    finally:
        if not gone(worker, 0):
            psutil.Process(worker).kill()
