"""A worker stops once the server process that started it is gone.

BentoML starts each worker in a session of its own. A server killed outright (SIGKILL, the
kernel's OOM killer) used to leave its workers behind: still bound to the port, still answering
with what they had loaded (``/readyz`` said 200), their models' memory, and a GPU's, held until
someone found and killed them. Each worker now watches its parent. The server's first process
writes its pid into the workers' environment (:data:`SERVER_PID_ENV`, before it starts any), so a
worker whose server died while it was still starting knows it too. Once the worker's parent is
no longer that process, the worker sends itself SIGTERM and stops as on any shutdown: requests
in flight are answered (with ``SESSION_HOST=shared`` they fail, 503: the session host went with
the server), the runtime stops in reverse. Where that shutdown has not ended after ``grace``
seconds, the worker runs ``before_exit`` (the worker withdraws its readiness marker) and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

SERVER_PID_ENV = "CNN_SERVER_PID"  # the server's first process, set for its workers by announce()
INTERVAL_S = 1.0  # how often a worker looks at its parent


def announce() -> None:
    """In the server's first process, before it starts a worker: its workers' parent is this process."""
    os.environ[SERVER_PID_ENV] = str(os.getpid())


def server_pid() -> int:
    """The server this worker belongs to: the one that announced itself, else this process's parent."""
    announced = os.environ.get(SERVER_PID_ENV, "")
    return int(announced) if announced.isdigit() else os.getppid()


class ParentWatch:
    """Watch this process's parent from a daemon thread; SIGTERM this process once it is not the server."""

    def __init__(
        self,
        grace: float,
        interval: float = INTERVAL_S,
        before_exit: Callable[[], None] | None = None,
        server: int | None = None,
    ) -> None:
        self.server = server if server is not None else server_pid()  # the caller's reading, where it has one
        self.grace = grace  # how long the shutdown may take before the worker exits
        self.interval = interval
        self.before_exit = before_exit  # what the forced exit still does (the shutdown it skips would have)
        self._stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._watch, name="parent-watch", daemon=True).start()

    def stop(self) -> None:
        """The worker is stopping (for whatever reason): no more watching, and no forced exit."""
        self._stopped.set()

    def _watch(self) -> None:
        while os.getppid() == self.server:
            if self._stopped.wait(self.interval):
                return
        logger.error(
            "the server process (pid %d) is gone: this worker (pid %d) stops rather than serve on unmanaged",
            self.server, os.getpid(),
        )  # fmt: skip
        os.kill(os.getpid(), signal.SIGTERM)
        if not self._stopped.wait(self.grace):
            logger.error("the worker's shutdown took over %.0f s after its server died: exiting now", self.grace)
            if self.before_exit is not None:
                with contextlib.suppress(Exception):  # the exit happens whatever this does
                    self.before_exit()
            os._exit(1)
