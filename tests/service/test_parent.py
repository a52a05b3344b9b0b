"""A worker whose server died stops, and exits where its shutdown does not end (``service.parent``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from ..helpers import gone, wait_until

ROOT = Path(__file__).parents[2]

# a worker whose shutdown never ends (it ignores SIGTERM), watching its parent once it has started
WORKER = textwrap.dedent("""
    import logging, signal, sys, time
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(float(sys.argv[1]))  # its start-up
    from service.parent import ParentWatch
    ParentWatch(grace=1.0, interval=0.1, before_exit=lambda: logging.info("before exit")).start()
    logging.info("watching")
    time.sleep(60)
""")
# its server: announces itself as the real one does, starts it, says the worker's pid
SERVER = textwrap.dedent("""
    import subprocess, sys, time
    from service.parent import announce
    announce()
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stderr=open(sys.argv[3], "w"))
    print(worker.pid, flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("startup", [0.0, 2.0], ids=["server-dies-while-it-serves", "server-dies-while-it-starts"])
def test_an_orphaned_worker_whose_shutdown_hangs_exits_after_the_grace(tmp_path: Path, startup: float) -> None:
    log = tmp_path / "worker.log"
    server = subprocess.Popen([sys.executable, "-c", SERVER, WORKER, str(startup), str(log)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert server.stdout is not None
    worker = int(server.stdout.readline())
    try:
        if not startup:  # it watches, and stays while its server lives
            wait_until(lambda: "watching" in log.read_text(), 30, "the worker watching its parent")
            assert not gone(worker, 0.5), log.read_text()
        server.kill()  # with a start-up, before the worker watches: it must still learn its server died
        server.wait()
        assert gone(worker, 15 + startup), log.read_text()
        text = log.read_text()
        assert f"is gone: this worker (pid {worker}) stops" in text
        assert "took over 1 s after its server died: exiting now" in text
        assert text.index("exiting now") < text.index("before exit")  # what the skipped shutdown would have done
    finally:
        if not gone(worker, 0):
            psutil.Process(worker).kill()
