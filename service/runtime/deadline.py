"""How long the request being served may still take, for waits that should end before it does.

A front end that bounds its requests' time (``REQUEST_TIMEOUT_S``, or a gRPC client's deadline
where sooner) sets :data:`request_deadline` for the request's task; the runtime reads it through
:func:`time_left` (a cold start answers 503 with ``Retry-After`` before the request itself
would time out with 504). A front end that cuts requests off also installs how a cancellation
counts (:func:`install_cut_off`), which the runtime reads through :func:`cut_off` where one
arrives (a canary's window counts a 504 as the side's error). The runtime sets nothing here,
and nothing here knows the front ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextvars import ContextVar

# the event loop's time at which the current request is cut off; None: no bound
request_deadline: ContextVar[float | None] = ContextVar("request_deadline", default=None)


def _never() -> str | None:
    return None


_cut_off: list[Callable[[], str | None]] = [_never]


def install_cut_off(reader: Callable[[], str | None]) -> None:
    """``reader()`` says, in the current request's task, how its cancellation counts: ``"5xx"`` where the service's
    time limit cut it off with its body in (answered 504), ``"4xx"`` where its body was still arriving (408), None
    where it was not cut off (a client gone away)."""
    _cut_off[0] = reader


def cut_off() -> str | None:
    """How the current request's cancellation counts (see :func:`install_cut_off`); None where nothing cuts."""
    return _cut_off[0]()


def time_left() -> float | None:
    """Seconds the current request has left (never negative), or None where it has no deadline."""
    deadline = request_deadline.get()
    if deadline is None:
        return None
    return max(deadline - asyncio.get_running_loop().time(), 0.0)
