"""The connection protocol's count of held request bodies, driven byte by byte where a server's socket reads
cannot be made to split a pipeline as the case needs (the served cases are in ``e2e/test_hostile_load.py``)."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from service.frontends import protocol

from ...helpers import wait_until_async


class Transport(asyncio.Transport):
    """What the protocol writes, and the protocol that holds the connection (an upgrade hands it on)."""

    def __init__(self) -> None:
        super().__init__()
        self.written, self.closing, self.protocol = bytearray(), False, None

    def write(self, data: Any) -> None:
        self.written += data

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 3000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol


async def slow_http_no_websocket(scope: Any, receive: Any, send: Any) -> None:
    """Answers each request after reading it, in 0.1 s; refuses every websocket handshake."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await asyncio.sleep(0.1)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_a_request_queued_when_a_websocket_upgrade_takes_the_connection_is_let_go() -> None:
    """Pipelined: a request, a second with 1 MB of body (queued behind the first, counted), then an upgrade that
    hands the connection to the websocket protocol, which refuses it and closes. The second never starts, and the
    connection's end reaches the websocket protocol, not this one: its count was kept for the worker's life."""

    async def run() -> tuple[int, int, bytes]:
        config = Config(app=slow_http_no_websocket, ws="wsproto", log_level="warning")
        config.load()
        held = protocol._Bodies.held
        http = protocol.BoundedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={},
                                                 _loop=asyncio.get_running_loop())  # fmt: skip
        transport = Transport()
        http.connection_made(transport)
        http.data_received(
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"
            b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"y" * 1_000_000
        )
        counted = protocol._Bodies.held - held  # /a's and /b's, /b queued behind /a (not started: no await yet)
        http.data_received(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        # the first answered (after its 0.1 s), the handshake refused, the connection closing
        await wait_until_async(
            lambda: transport.protocol is not None and transport.closing, 30, "the connection closing"
        )
        assert transport.protocol is not None and transport.closing
        transport.protocol.connection_lost(None)  # the event loop tells the protocol that holds the transport
        await wait_until_async(lambda: protocol._Bodies.held == held, 30, "the queued bodies' count given back")
        return counted, protocol._Bodies.held - held, bytes(transport.written)

    counted, left, written = asyncio.run(run())
    assert written.count(b"HTTP/1.1 200 OK") == 1 and written.count(b"HTTP/1.1 ") == 2, written  # /b never ran
    assert counted == 1_000_001
    assert left == 0
