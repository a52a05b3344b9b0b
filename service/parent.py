"""A worker stops once the server process that started it is gone.

BentoML starts each worker in a session of its own. A server killed outright (SIGKILL, the
kernel's OOM killer) used to leave its workers behind: still bound to the port, still answering
with what they had loaded (``/readyz`` said 200), their models' memory, and a GPU's, held until
someone found and killed them. Each worker now watches its parent. Once it has been re-parented
(its server died), it sends itself SIGTERM and stops as on any shutdown: requests in flight are
answered, the runtime stops in reverse. Where that shutdown does not end within
:data:`GRACE_S`, the worker exits. The session host already goes with its server (its stdin
closes).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

logger = logging.getLogger(__name__)

INTERVAL_S = 1.0  # how often a worker looks at its parent
GRACE_S = 60.0  # how long its shutdown may take, once it is orphaned, before it exits


class ParentWatch:
    """Watch this process's parent from a daemon thread; SIGTERM this process once it changes."""

    def __init__(self, interval: float = INTERVAL_S, grace: float = GRACE_S) -> None:
        self.parent = os.getppid()  # the server's process, while it lives
        self.interval = interval
        self.grace = grace
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="parent-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """The worker is stopping (for whatever reason): no more watching, and no forced exit."""
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(self.interval):
            if os.getppid() != self.parent:
                break
        else:
            return
        logger.error(
            "the server process (pid %d) is gone: this worker (pid %d) stops rather than serve on unmanaged",
            self.parent, os.getpid(),
        )  # fmt: skip
        os.kill(os.getpid(), signal.SIGTERM)
        if not self._stopped.wait(self.grace):
            logger.error("the worker's shutdown took over %.0f s after its server died: exiting now", self.grace)
            logging.shutdown()
            os._exit(1)
