"""The HTTP/1.1 connection: uvicorn's httptools protocol with the limits h11 had and httptools lacks.

uvicorn's ``HttpToolsProtocol`` hands every byte of a request head to httptools, which keeps an
unfinished header in memory however long it grows, and waits for a head however slowly it
arrives. :class:`BoundedHttpToolsProtocol` keeps its parsing (and its speed) and adds, per
connection:

- ``MAX_HEADER_BYTES``: the request line and headers together; past it, **431** naming the
  limit, and the connection is closed. The count is taken after each chunk the socket gives
  (uvloop reads up to 256 KiB), so no head is buffered beyond the limit plus one chunk.
- ``HEADER_TIMEOUT_S``: a head (or a new connection's first byte) must arrive within it;
  otherwise **408** and close (slowloris). Idle keep-alive connections are closed by uvicorn's
  keep-alive timeout (5 s, BentoML's default).
- ``MIN_BODY_BYTES_PER_S``: once a body has started, each window of ``BODY_RATE_WINDOW_S``
  must bring that rate, unless the server itself stopped reading (flow control); otherwise
  **408** and close.
- ``MAX_BODY_BYTES``: the app refuses a larger body as it reads it; a body that arrives faster
  than the app reads goes past it here first: the same **413**, and close.
- ``MAX_CONNECTIONS``: connections one worker holds; one more is answered **503** with
  ``Retry-After`` and closed, while the connections already held keep being served. Up to
  ``OVER_LIMIT_PENDING`` of them at a time get ``OVER_LIMIT_HEAD_S`` to send a head first, and a
  probe's or scraper's (``PROBE_PATHS``) is answered, then the connection closed (within
  ``OVER_LIMIT_PROBE_S`` whatever the reader does): a worker at its limit is busy, not dead, and
  neither the kubelet (which would restart it, dropping every connection, or take it out of the
  endpoints, as it would every pod of a service busy at once) nor Prometheus should read it as gone.
  Any other request past the limit, and every connection past the pending ones, gets the 503 at once.
- ``MAX_BODY_BYTES_IN_FLIGHT``: the request bodies one worker holds, each from its head (its declared
  ``Content-Length``; a chunked body as it arrives) until its request's handling ends; a request that would
  pass it while others hold bodies is answered **503** with ``Retry-After`` at its head, and closed.

The common path stays cheap: each connection arms one timer (its first head's deadline), and
after that a head or body that arrives in one chunk (every normal request) arms none. The
class is installed as uvicorn's ``auto`` protocol by :func:`install`, because BentoML builds
uvicorn's ``Config`` itself and takes no protocol class.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .. import metrics
from ..settings import Settings

# set in a request's scope where the connection refused it in the middle of its body (408, 413): the app then sees
# a client gone (ClientDisconnect), and the access log and metrics count the refusal the client got
REFUSED_WITH = "cnn.refused_with"

logger = logging.getLogger(__name__)

BODY_RATE_WINDOW_S = 5.0
OVER_LIMIT_HEAD_S = 1.0  # how long a connection past MAX_CONNECTIONS may take to show it is a probe's
OVER_LIMIT_PENDING = 16  # connections past MAX_CONNECTIONS given that time at once; the others refused at once
OVER_LIMIT_PROBE_S = 10.0  # a probe's connection past MAX_CONNECTIONS is aborted after this, answered or not
PROBE_PATHS = frozenset({b"/livez", b"/readyz", b"/healthz", b"/metrics"})


class Limits:
    """The limits every connection of this worker enforces (set once by :func:`install`)."""

    max_header_bytes = 16 * 1024
    header_timeout_s = 10.0
    min_body_bytes_per_s = 1024
    max_connections = 1024
    max_body_bytes = 20 * 1024 * 1024
    max_body_bytes_in_flight = 128 * 1024 * 1024


class _Bodies:
    """The request body bytes this worker's connections hold (see :meth:`BoundedHttpToolsProtocol._hold`)."""

    held = 0


HELD, CHUNKED = "cnn_body_held", "cnn_body_chunked"  # on a request's cycle: its bytes in _Bodies.held; counted as read


def _let_go(cycle: Any) -> None:
    _Bodies.held -= getattr(cycle, HELD, 0)
    setattr(cycle, HELD, 0)


async def _run_and_let_go(cycle: Any, app: Any) -> None:
    try:
        await type(cycle).run_asgi(cycle, app)
    finally:
        _let_go(cycle)


def has_body(headers: Any) -> bool:
    """Whether a request with these (lower-cased) headers has a body."""
    for name, value in headers:
        if (name == b"content-length" and value.strip() not in (b"0", b"")) or name == b"transfer-encoding":
            return True
    return False


def _response(status: bytes, message: str, retry_after: int | None = None) -> bytes:
    body = json.dumps({"error": message}).encode()
    extra = b"retry-after: %d\r\n" % retry_after if retry_after is not None else b""
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % len(body)
        + extra + b"connection: close\r\n\r\n" + body
    )  # fmt: skip


_past_limit: set[BoundedHttpToolsProtocol] = set()  # this worker's connections past MAX_CONNECTIONS, still open


class _Refused(Exception):
    """Raised in a parser callback to stop parsing: uvicorn then calls send_400_response, which answers."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with bounded request heads, head and body deadlines and a connection cap.

    Per request it adds one check after each chunk and one before each head is handed to the
    app; the bookkeeping of heads and bodies that span chunks (:meth:`_watch`) runs only for them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chunk = 0  # the size of the chunk being parsed
        self._head_scope: Any = None  # the scope of the unfinished head being counted
        self._head_bytes = 0  # its bytes in the chunks before this one
        self._head_too_large = False
        self._deadline: asyncio.TimerHandle | None = None
        self._watching_body = False  # whether the deadline is the body's (else the head's)
        self._body_bytes = 0  # body bytes since the last check
        self._message_bytes = 0  # bytes since the body's watch began: a body with trailers is bounded too
        self._over_limit: asyncio.TimerHandle | None = None  # past MAX_CONNECTIONS: its deadline (see _past_limit)
        self._busy = False  # a request refused at its head (MAX_CONNECTIONS, bodies): answered 503, the rest ignored
        self._holding = 0  # a body counted at its head, until its cycle is made (see _start_asgi_task)
        self._chunked = False  # whether that head's body has no length: counted as it arrives

    # the connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > Limits.max_connections:
            if len(_past_limit) >= OVER_LIMIT_PENDING:
                self._refuse_busy()
                return
            _past_limit.add(self)
            self._over_limit = self.loop.call_later(min(OVER_LIMIT_HEAD_S, Limits.header_timeout_s), self._refuse_busy)
            return
        self._arm(Limits.header_timeout_s, self._head_late, body=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        for cycle, _ in self.pipeline:  # queued, never to start: their bodies go now (a started one's with its task)
            _let_go(cycle)
        if self._over_limit is not None:
            self._over_limit.cancel()
            _past_limit.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._chunk = len(data)
        answered = self.cycle
        super().data_received(data)
        if self._deadline is not None:
            self._watch(data)
            return
        scope, cycle = self.scope, self.cycle
        if scope is None or "method" not in scope:
            self._watch(data)  # a head that goes on in the next chunks
        elif cycle is not None and cycle.more_body and not cycle.response_complete:
            self._watch(data)  # a body that does
        elif cycle is answered and cycle is not None and cycle.response_complete:
            self._watch(data)  # bytes that began no request (CRLFs between requests): idle all the same

    def on_headers_complete(self) -> None:
        self._chunked = False  # set by _hold, for this head's body (on_body)
        before = self._head_bytes if self._head_scope is self.scope else 0
        if before + self._chunk > Limits.max_header_bytes and self._head_size() > Limits.max_header_bytes:
            self._head_too_large = True
            raise _Refused  # answered 431 by send_400_response
        if self._over_limit is not None:
            self._over_limit.cancel()
            if self._busy or self.url.partition(b"?")[0] not in PROBE_PATHS:
                self._busy = True  # answered here, not by raising: uvicorn would log every refusal as invalid HTTP
                self._refuse_busy()
                return
            self._over_limit = self.loop.call_later(OVER_LIMIT_PROBE_S, self._abort)  # a reader that never reads
        upgrade = self.parser.should_upgrade() and self._should_upgrade()  # no cycle: the websocket protocol's
        if not upgrade and not self._hold():
            return
        try:
            super().on_headers_complete()  # makes the cycle, and starts it (_start_asgi_task) or queues it
            attrs = self.cycle.__dict__ if self.cycle is not None else {}
            if HELD not in attrs:  # queued behind the request being answered (one started has them)
                attrs[HELD], attrs[CHUNKED] = self._holding, self._chunked
        except BaseException:  # no cycle holds its count (a URL httptools cannot parse: uvicorn answers 400)
            _Bodies.held -= self._holding
            raise
        finally:
            self._holding = 0
        if self._over_limit is not None and self.cycle is not None:
            self.cycle.keep_alive = False  # a probe's answer, then the connection is closed
        if self.expect_100_continue and self.cycle is not None and has_body(self.headers):
            self._close_if_answered_first(self.cycle)

    @staticmethod
    def _close_if_answered_first(cycle: Any) -> None:
        """``Expect: 100-continue``, answered before its body was asked for (a 400 on a parameter, say): the
        connection closes after the answer. Kept open, the body the client may send all the same was read as the
        next request's head, or that head as this body's rest, and the connection hung."""
        send = cycle.send

        async def send_and_close(message: Any) -> None:
            if message["type"] == "http.response.start" and cycle.waiting_for_100_continue:
                cycle.keep_alive = False
            await send(message)

        cycle.send = send_and_close  # what run_asgi hands the app

    def on_body(self, body: bytes) -> None:
        if not self._busy:  # a refused request's body: no cycle reads it
            cycle = self.cycle
            if self._chunked and cycle is not None and not cycle.response_complete:  # its bytes counted as they come
                attrs = cycle.__dict__
                attrs[HELD] = attrs.get(HELD, 0) + len(body)
                _Bodies.held += len(body)
            super().on_body(body)

    # the bodies in memory
    def _hold(self) -> bool:
        """Count this request's declared body into the worker's (a body over MAX_BODY_BYTES is refused before it
        is read: not counted), until its handling ends (:meth:`_start_asgi_task`); refuse it where that would pass
        MAX_BODY_BYTES_IN_FLIGHT and others hold some. Each body is held, and copied as it is parsed and decoded,
        until then: without a bound, 32 uploads of 19 MB at once grew a worker by 1.7 GB (MAX_CONNECTIONS allows
        1,024). The declared length counts from the head: a slow client holds its share as it sends (for up to
        REQUEST_TIMEOUT_S, at MIN_BODY_BYTES_PER_S at least)."""
        if self._busy or self.transport.is_closing():  # refused already: the rest of its bytes start nothing
            self._busy = True
            return False
        declared, coded = None, False  # one pass: the head's headers are read for every request
        for name, value in self.headers:
            if name == b"content-length" and declared is None:
                declared = value.strip()  # "5000 " is a length to llhttp, and must be one here
            elif name == b"transfer-encoding":
                coded = True
        self._chunked = declared is None and coded
        size = int(declared) if declared is not None and declared.isdigit() else 0
        if size == 0 or size > Limits.max_body_bytes:
            return True
        answering = self.cycle is not None and not self.cycle.response_complete  # pipelined: it waits its turn
        if _Bodies.held and _Bodies.held + size > Limits.max_body_bytes_in_flight and not answering:
            self._busy = True  # its body ignored as it arrives
            metrics.connection_refused("body_memory")
            limit = Limits.max_body_bytes_in_flight
            self._refuse(b"503 Service Unavailable", f"this worker holds {_Bodies.held:,} bytes of request bodies, and "
                         f"this one's {size:,} would pass MAX_BODY_BYTES_IN_FLIGHT={limit}; retry", 1)  # fmt: skip
            return False
        self._holding = size
        _Bodies.held += size
        return True

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """The request's handling, with its body's count let go as it ends (answered, failed or cut off: a client
        gone does not end it, and the body is held until it does)."""
        attrs = cycle.__dict__  # looked up, not getattr's miss (an exception): this runs for every request
        if HELD not in attrs:  # its head was parsed just now (else: it was queued, and marked then)
            attrs[HELD], attrs[CHUNKED] = self._holding, self._chunked
            self._holding = 0
        if not attrs[HELD] and not attrs.get(CHUNKED):
            super()._start_asgi_task(cycle, app)  # nothing to let go
            return
        cycle.run_asgi = functools.partial(_run_and_let_go, cycle)  # what uvicorn's task runs, for this task only:
        try:
            super()._start_asgi_task(cycle, app)
        finally:  # kept, it would tie the cycle to itself, to be freed by the garbage collector, not as it ends
            del cycle.run_asgi

    def handle_websocket_upgrade(self) -> None:
        for cycle, _ in self.pipeline:  # queued before it, never to start here: the transport is the websocket's,
            _let_go(cycle)  # and so is its connection_lost
        super().handle_websocket_upgrade()

    def on_message_complete(self) -> None:
        if not self._busy:
            super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._too_large()
        else:  # uvicorn's own is plain text; errors of this API are JSON
            self._refuse(b"400 Bad Request", f"{msg.rstrip('.')}: the request line or a header is not valid HTTP/1.1")

    # heads and bodies that span chunks
    def _watch(self, data: bytes) -> None:
        if self.transport.is_closing():
            self._disarm()
            return
        scope, cycle = self.scope, self.cycle
        if scope is None or "method" not in scope:  # a head still unfinished after this chunk
            if scope is not self._head_scope:  # that began in this chunk (after another request's bytes, maybe)
                self._head_scope, self._head_bytes = scope, self._head_size()
                self._disarm()  # its deadline counts from now
            else:
                self._head_bytes += len(data)
            if self._head_bytes > Limits.max_header_bytes:
                self._too_large()
            elif self._deadline is None or self._watching_body:
                self._disarm()
                self._arm(Limits.header_timeout_s, self._head_late, body=False)
            return
        if cycle is not None and cycle.more_body:  # a body still arriving (or one answered before its end)
            if self._deadline is None or not self._watching_body:
                self._disarm()
                self._body_bytes, self._message_bytes = 0, 0
                self._arm(BODY_RATE_WINDOW_S, self._body_check, body=True)
            else:
                self._body_bytes += len(data)
                self._message_bytes += len(data)
                if self._message_bytes > Limits.max_body_bytes + Limits.max_header_bytes:  # chunk framing, trailers
                    self._body_too_large()
            return
        if cycle is not None and cycle.response_complete and not self.pipeline:  # bytes, but no new request
            if self._deadline is None or self._watching_body:
                self._disarm()
                self._arm(Limits.header_timeout_s, self._head_late, body=False)
            return
        self._disarm()

    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) + 16

    def _abort(self) -> None:
        self.transport.abort()  # also one closing, its answer stuck in a buffer its reader never empties

    def _refuse_busy(self) -> None:
        if self.transport.is_closing():
            return
        metrics.connection_refused("connections")
        limit = Limits.max_connections
        self._refuse(b"503 Service Unavailable", f"this worker holds its MAX_CONNECTIONS={limit} connections; retry", 1)

    def _too_large(self) -> None:
        metrics.connection_refused("header_bytes")
        self._refuse(
            b"431 Request Header Fields Too Large",
            f"the request line and headers exceed MAX_HEADER_BYTES={Limits.max_header_bytes} bytes",
        )

    def _body_too_large(self) -> None:
        """More body than MAX_BODY_BYTES (and room for chunk framing and trailers) before the app refused it (its
        reading is paused while it works): the 413 the app would give, or only the close where it answered."""
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()
            return
        metrics.connection_refused("body_bytes")
        limit = Limits.max_body_bytes
        self._refuse(b"413 Content Too Large", f"Request body exceeds the limit of {limit:,} bytes (MAX_BODY_BYTES)")

    # the deadlines
    def _arm(self, delay: float, callback: Any, body: bool) -> None:
        self._deadline, self._watching_body = self.loop.call_later(delay, callback), body

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        scope, cycle = self.scope, self.cycle
        if self.flow.read_paused or self.pipeline or (cycle is not None and not cycle.response_complete):
            # an earlier request is still being answered: the rest of this head waits for the server, not the client
            self._arm(Limits.header_timeout_s, self._head_late, body=False)
            return
        metrics.connection_refused("header_timeout")
        if scope is not None and "method" in scope:  # no request begun: bytes between requests, then nothing
            self.transport.close()
            return
        limit = Limits.header_timeout_s
        self._refuse(b"408 Request Timeout", f"the request head did not arrive within HEADER_TIMEOUT_S={limit}")

    def _body_check(self) -> None:
        """Every BODY_RATE_WINDOW_S while a body arrives. A body the app answered before reading it all
        (a 413, say) stays "arriving" for uvicorn: a client that then sends nothing is closed, uncounted."""
        self._deadline = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body:
            return
        arrived, self._body_bytes = self._body_bytes, 0
        minimum = Limits.min_body_bytes_per_s * BODY_RATE_WINDOW_S
        if arrived >= minimum or self.flow.read_paused or cycle.waiting_for_100_continue:
            self._arm(BODY_RATE_WINDOW_S, self._body_check, body=True)  # or the server is not reading yet
            return
        if cycle.response_started:  # answered, or answering: only close
            if not (cycle.response_complete and arrived == 0):
                metrics.connection_refused("body_rate")
            self.transport.close()
            return
        metrics.connection_refused("body_rate")
        rate = arrived / BODY_RATE_WINDOW_S
        self._refuse(
            b"408 Request Timeout",
            f"the body arrived at {rate:.0f} bytes/s, below MIN_BODY_BYTES_PER_S={Limits.min_body_bytes_per_s}",
        )

    def _refuse(self, status: bytes, message: str, retry_after: int | None = None) -> None:
        self._disarm()
        self.transport.write(_response(status, message, retry_after))
        self.transport.close()
        if self.cycle is not None and not self.cycle.response_complete:
            scope: dict[str, Any] = self.cycle.scope  # type: ignore[assignment]  # uvicorn's TypedDict, an ASGI dict
            scope[REFUSED_WITH] = int(status[:3])  # what the client got, for the access log and metrics
            self.cycle.disconnected = True  # an app still reading the body ends at its next receive
            self.cycle.message_event.set()


def install(settings: Settings) -> None:
    """Make :class:`BoundedHttpToolsProtocol`, with ``settings``' limits, what uvicorn's ``http="auto"``
    (BentoML's choice) builds."""
    from uvicorn import config

    Limits.max_header_bytes = settings.max_header_bytes
    Limits.header_timeout_s = settings.header_timeout_s
    Limits.min_body_bytes_per_s = settings.min_body_bytes_per_s
    Limits.max_connections = settings.max_connections
    Limits.max_body_bytes = settings.max_body_bytes
    Limits.max_body_bytes_in_flight = settings.max_body_bytes_in_flight
    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:BoundedHttpToolsProtocol"
