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
- ``MAX_CONNECTIONS``: connections one worker holds; one more is answered **503** with
  ``Retry-After`` and closed at once, before it can send anything, while the connections
  already held keep being served.

The timers cost nothing on the common path: a head that arrives in one chunk (every normal
request) arms none. The class is installed as uvicorn's ``auto`` protocol by :func:`install`,
because BentoML builds uvicorn's ``Config`` itself and takes no protocol class.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .. import metrics

logger = logging.getLogger(__name__)

BODY_RATE_WINDOW_S = 5.0


class Limits:
    """The limits every connection of this worker enforces (set once by :func:`install`)."""

    max_header_bytes = 16 * 1024
    header_timeout_s = 10.0
    min_body_bytes_per_s = 1024
    max_connections = 1024


def _response(status: bytes, message: str, retry_after: int | None = None) -> bytes:
    body = json.dumps({"error": message}).encode()
    extra = b"retry-after: %d\r\n" % retry_after if retry_after is not None else b""
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % len(body)
        + extra + b"connection: close\r\n\r\n" + body
    )  # fmt: skip


class _HeadTooLarge(Exception):
    pass


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with bounded request heads, head and body deadlines and a connection cap."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes: int | None = 0  # bytes of the head so far; None between heads
        self._deadline: asyncio.TimerHandle | None = None
        self._body_bytes = 0
        self._body_seen = 0
        self._chunk = 0  # the size of the chunk being parsed
        self._head_too_large = False
        self._in_body = False  # between a head and the end of its message (even once answered)

    # the connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > Limits.max_connections:
            metrics.connection_refused("connections")
            self._refuse(
                b"503 Service Unavailable",
                f"this worker holds its MAX_CONNECTIONS={Limits.max_connections} connections; retry",
                retry_after=1,
            )
            return
        self._arm(Limits.header_timeout_s, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._chunk = len(data)
        super().data_received(data)
        if self._head_bytes is not None and self.parser is not None and not self.transport.is_closing():
            self._head_bytes += len(data)  # a head still unfinished after this chunk
            if self._head_bytes > Limits.max_header_bytes:
                self._too_large()
            elif self._deadline is None:
                self._arm(Limits.header_timeout_s, self._head_late)
        elif self._deadline is None and self._body_unfinished() and Limits.min_body_bytes_per_s:
            self._body_seen = self._body_bytes
            self._arm(BODY_RATE_WINDOW_S, self._body_check)  # a body that spans chunks

    # the parser's callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        # a whole head in a chunk larger than the limit (a body in the same chunk, say) is measured
        limit = Limits.max_header_bytes
        if (self._head_bytes or 0) + self._chunk > limit and self._head_size() > limit:
            self._head_too_large = True
            raise _HeadTooLarge  # httptools stops parsing; uvicorn answers 400 through send_400_response
        self._head_bytes = None
        self._in_body = True
        self._disarm()
        super().on_headers_complete()
        self._body_bytes = self._body_seen = 0

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._too_large()
        else:
            super().send_400_response(msg)

    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) + 16

    def _too_large(self) -> None:
        metrics.connection_refused("header_bytes")
        self._refuse(
            b"431 Request Header Fields Too Large",
            f"the request line and headers exceed MAX_HEADER_BYTES={Limits.max_header_bytes} bytes",
        )

    # the deadlines
    def _arm(self, delay: float, callback: Any) -> None:
        self._deadline = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_late(self) -> None:
        self._deadline = None
        if self._head_bytes is not None and not self.transport.is_closing():
            metrics.connection_refused("header_timeout")
            limit = Limits.header_timeout_s
            self._refuse(b"408 Request Timeout", f"the request head did not arrive within HEADER_TIMEOUT_S={limit}")

    def _body_unfinished(self) -> bool:
        return self._in_body and not self.transport.is_closing()

    def _body_check(self) -> None:
        self._deadline = None
        if not self._body_unfinished():
            return
        arrived, self._body_seen = self._body_bytes - self._body_seen, self._body_bytes
        if self.flow.read_paused or arrived >= Limits.min_body_bytes_per_s * BODY_RATE_WINDOW_S:
            self._arm(BODY_RATE_WINDOW_S, self._body_check)
            return
        metrics.connection_refused("body_rate")
        if self.cycle is None or self.cycle.response_started:  # answered, or answering: only close
            self.transport.close()
            return
        self._refuse(
            b"408 Request Timeout",
            f"the body arrived at {arrived / BODY_RATE_WINDOW_S:.0f} bytes/s, "
            f"below MIN_BODY_BYTES_PER_S={Limits.min_body_bytes_per_s}",
        )

    def _refuse(self, status: bytes, message: str, retry_after: int | None = None) -> None:
        self._disarm()
        self.transport.write(_response(status, message, retry_after))
        self.transport.close()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # an app still reading the body ends at its next receive
            self.cycle.message_event.set()


def install(max_header_bytes: int, header_timeout_s: float, min_body_bytes_per_s: int, max_connections: int) -> None:
    """Make :class:`BoundedHttpToolsProtocol` what uvicorn's ``http="auto"`` (BentoML's choice) builds."""
    from uvicorn import config

    Limits.max_header_bytes = max_header_bytes
    Limits.header_timeout_s = header_timeout_s
    Limits.min_body_bytes_per_s = min_body_bytes_per_s
    Limits.max_connections = max_connections
    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:BoundedHttpToolsProtocol"
