"""The gRPC server's limits on calls, on a real gRPC server: the calls it holds at once."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from service.frontends.v2.grpc_limits import CallLimit
from service.metrics import get_metrics


def _grpc_calls_refused() -> float:
    metrics = get_metrics()
    return float(metrics.child(metrics.connections_refused, "grpc_calls")._value.get())


async def _none_held(limit: CallLimit) -> None:
    """The server's side of a call ends a few loop turns after its client saw the answer."""
    for _ in range(300):
        if limit.held == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{limit.held} calls still hold a place")


def test_a_call_past_the_limit_is_refused_counted_and_a_cancelled_call_gives_its_place_back() -> None:
    """GRPC_MAX_CONCURRENT_RPCS=1 on a real gRPC server: while one call is held, the next gets RESOURCE_EXHAUSTED
    naming the setting, and is counted; a held call its client cancels frees its place, so the limit never leaks."""
    limit = CallLimit(1)
    reached: list[bytes] = []

    async def scenario() -> None:
        release = asyncio.Event()

        async def wait(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            reached.append(request)
            await release.wait()
            return b"answered " + request

        server = grpc.aio.server(interceptors=[limit])
        handler = grpc.unary_unary_rpc_method_handler(wait)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Held", {"Wait": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/test.Held/Wait")
                held = call(b"first", timeout=30)
                while not reached:
                    await asyncio.sleep(0.01)
                before = _grpc_calls_refused()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(bytes(1 << 20), timeout=30)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "GRPC_MAX_CONCURRENT_RPCS=1" in (refused.value.details() or "")
                assert _grpc_calls_refused() == before + 1 and reached == [b"first"]
                held.cancel()
                await _none_held(limit)  # the cancelled call's place is free again
                release.set()
                assert await call(b"second", timeout=30) == b"answered second"
            await _none_held(limit)
        finally:
            await server.stop(grace=None)

    asyncio.run(scenario())
