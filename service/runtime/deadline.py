"""How long the request being served may still take, for waits that should end before it does.

A front end that bounds its requests' time (HTTP's ``REQUEST_TIMEOUT_S``, a gRPC client's
deadline) sets :data:`request_deadline` for the request's task; the runtime reads it through
:func:`time_left` (a cold start answers 503 with ``Retry-After`` before the request itself
would time out with 504). The runtime sets nothing here, and nothing here knows the front ends.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar

# the event loop's time at which the current request is cut off; None: no bound
request_deadline: ContextVar[float | None] = ContextVar("request_deadline", default=None)


def time_left() -> float | None:
    """Seconds the current request has left (never negative), or None where it has no deadline."""
    deadline = request_deadline.get()
    if deadline is None:
        return None
    return max(deadline - asyncio.get_running_loop().time(), 0.0)
