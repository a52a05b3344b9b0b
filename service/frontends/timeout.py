"""``REQUEST_TIMEOUT_S`` for HTTP: BentoML's timeout middleware, without what it leaves behind.

BentoML 1.4.39's ``TimeoutMiddleware`` runs each request in a task of its own and arms a
timer (``loop.call_later``) that is never cancelled: every request leaves a timer and a
future alive for the whole timeout. At 5,000 requests/s and 60 s that is 300,000 of each,
and Python's full garbage collections, which walk them all, stopped the worker for 130 to
300 ms every few seconds, longer as the load went on (measured with a closed-loop client on
``/noop``). This one has the same contract (a request that has not started its answer
within the timeout is cancelled and gets 504 with a JSON error; once the answer has
started, it is not cut), but for a body still arriving at the timeout, which is the client's
slowness: 408, and the connection closed. It runs the request in the caller's task, and
disarms its timer when the answer starts or the request ends.

BentoML has no setting for its middleware; :func:`install` puts this class where BentoML
looks for its own (``tests/service/e2e/test_http_stack.py`` fails if an upgrade moves it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..runtime.deadline import install_cut_off, request_deadline
from .protocol import has_body


class Expiring(Protocol):
    """What cuts a request at its time limit (``asyncio.Timeout``, or a gRPC call's timer): whether it has."""

    def expired(self) -> bool: ...


@dataclass
class _Limit:
    deadline: Expiring
    body_arrived: bool  # the request's body whole (or none to come): a cut before it is the client's slowness


# the current request's time limit, for :func:`cut_off`
_limit: ContextVar[_Limit | None] = ContextVar("request_time_limit", default=None)


def cut_off() -> str | None:
    """How the current request counts where ``REQUEST_TIMEOUT_S`` cut it off, read where a cancellation arrives
    (which is otherwise a client gone away: None): ``4xx`` while its body was still arriving (answered 408),
    else ``5xx`` (answered 504)."""
    limit = _limit.get()
    if limit is None or not limit.deadline.expired():
        return None
    return "5xx" if limit.body_arrived else "4xx"


@contextlib.contextmanager
def limited(deadline: Expiring, until: float) -> Iterator[None]:
    """``REQUEST_TIMEOUT_S`` as the runtime's waits and :func:`cut_off` read it, for a request that is not HTTP's:
    a gRPC call whose message has arrived, which ``deadline`` cuts; the runtime's waits end by ``until`` (the loop's
    time: the limit's, or the client's deadline where sooner). A cut counts as ``5xx``."""
    token = request_deadline.set(until)
    limit = _limit.set(_Limit(deadline, body_arrived=True))
    try:
        yield
    finally:
        request_deadline.reset(token)
        _limit.reset(limit)


class RequestTimeout:
    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        answering = False
        deadline = asyncio.timeout(self.timeout)
        state = _Limit(deadline, body_arrived=not has_body(scope.get("headers", ())))

        async def receive_and_note() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                state.body_arrived = True
            return message

        async def send_and_disarm(message: Message) -> None:
            nonlocal answering
            if not answering:
                answering = True
                deadline.reschedule(None)  # an answer under way is not cut
            await send(message)

        # the runtime's waits (a cold start) end before this one does, with an answer of their own
        token = request_deadline.set(asyncio.get_running_loop().time() + self.timeout)
        limit = _limit.set(state)
        try:
            async with deadline:
                await self.app(scope, receive_and_note if not state.body_arrived else receive, send_and_disarm)
        except TimeoutError:
            if answering or not deadline.expired():  # not ours: an error of the app's
                raise
            # answered here, outside the middleware that stamps every answer with its request's id: stamped here
            headers = {"X-Request-ID": scope["request_id"]} if "request_id" in scope else {}
            if not state.body_arrived:  # the client's slowness, and the rest of its body unread: the connection ends
                error = f"The request's body did not arrive within {self.timeout} seconds (REQUEST_TIMEOUT_S)"
                response = JSONResponse({"error": error}, status_code=408, headers={**headers, "Connection": "close"})
            else:
                error = f"Not able to process the request in {self.timeout} seconds (REQUEST_TIMEOUT_S)"
                response = JSONResponse({"error": error}, status_code=504, headers=headers)
            await response(scope, receive, send)
        finally:
            request_deadline.reset(token)
            _limit.reset(limit)


def install() -> None:
    """Make BentoML build this middleware where it would build its own (it imports the name at build time)."""
    from bentoml._internal.server.http import traffic

    traffic.TimeoutMiddleware = RequestTimeout  # type: ignore[misc, assignment]
    install_cut_off(cut_off)  # for the runtime's own counts (a canary's window)
