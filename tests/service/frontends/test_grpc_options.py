"""The gRPC server's channel arguments, on a real gRPC server: any setting the service accepts starts it."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from service.frontends.v2.grpc_options import server_options
from service.settings import Settings


@pytest.mark.parametrize(
    ("age", "timeout"),
    [(300.0, 60.0), (float("inf"), 60.0), (30 * 86400.0, 1e12), (0.0001, 0.001), (0.0, 1e12)],
)
def test_every_accepted_age_and_timeout_start_a_grpc_server(age: float, timeout: float) -> None:
    """Channel arguments are C ints of milliseconds: a month, infinity or a microsecond must not raise at start
    (they did: OverflowError, and 0 ms)."""
    options = dict(server_options(Settings(grpc_max_connection_age_s=age, request_timeout_s=timeout)))
    assert ("grpc.max_connection_age_ms" in options) == (age > 0)
    assert all(0 < value < 2**31 for value in options.values())

    async def start() -> None:
        server = grpc.aio.server(options=list(options.items()))
        assert server.add_insecure_port("127.0.0.1:0") > 0
        await server.start()
        await server.stop(grace=None)

    asyncio.run(start())
