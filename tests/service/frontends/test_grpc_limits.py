"""The gRPC server's limits on calls, on a real gRPC server: the calls it holds at once, and how long each may take
(its message's arrival included)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from service.frontends import timeout
from service.frontends.v2.grpc_limits import HEALTH_PLACES, CallLimit
from service.metrics import get_metrics
from service.runtime.deadline import time_left

from ...helpers import wait_until_async

Behaviour = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


def _refused(reason: str) -> float:
    metrics = get_metrics()
    return float(metrics.child(metrics.connections_refused, reason)._value.get())


async def _none_held(limit: CallLimit) -> None:
    """The server's side of a call ends a few loop turns after its client saw the answer."""
    await wait_until_async(
        lambda: limit.held == limit.health_held == 0,
        30,
        f"the calls' places given back ({limit.held} held, {limit.health_held} health)",
    )


@contextlib.asynccontextmanager
async def _serving(limit: CallLimit, behaviour: Behaviour) -> AsyncIterator[grpc.aio.Channel]:
    """A gRPC server with ``limit`` and two unary methods that run ``behaviour``, ``/test.Held/Wait`` and
    ``/test.Held/Live``, and a channel to it."""
    server = grpc.aio.server(interceptors=[limit])
    handler = grpc.unary_unary_rpc_method_handler(behaviour)
    methods = {"Wait": handler, "Live": handler}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Held", methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(grace=None)


def test_a_call_past_the_limit_is_refused_counted_and_a_cancelled_call_gives_its_place_back() -> None:
    """GRPC_MAX_CONCURRENT_RPCS=1 on a real gRPC server: while one call is held, the next gets RESOURCE_EXHAUSTED
    naming the setting, and is counted; a held call its client cancels frees its place, so the limit never leaks."""
    limit = CallLimit(1, timeout_s=60)
    reached: list[bytes] = []

    async def scenario() -> None:
        release = asyncio.Event()

        async def wait(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            reached.append(request)
            await release.wait()
            return b"answered " + request

        async with _serving(limit, wait) as channel:
            call = channel.unary_unary("/test.Held/Wait")
            held = call(b"first", timeout=30)
            while not reached:
                await asyncio.sleep(0.01)
            before = _refused("grpc_calls")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(bytes(1 << 20), timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "GRPC_MAX_CONCURRENT_RPCS=1" in (refused.value.details() or "")
            assert _refused("grpc_calls") == before + 1 and reached == [b"first"]
            held.cancel()
            await _none_held(limit)  # the cancelled call's place is free again
            release.set()
            assert await call(b"second", timeout=30) == b"answered second"
            await _none_held(limit)

    asyncio.run(scenario())


def test_health_calls_are_answered_while_the_limit_is_full_and_past_their_own_places_take_spare_ones() -> None:
    """GRPC_MAX_CONCURRENT_RPCS=2 with one call held: a health call is answered in a place of its own (the held
    call's kind of place untouched), as HTTP's probes answer a busy worker. With every health place held (calls that
    send no message yet), the next health call takes the limit's spare place; past that, health calls and others
    alike are refused, so calls that need no token cannot pile up, and filling the health places alone blocks no
    probe."""
    limit = CallLimit(2, timeout_s=60, health=("/test.Held/Live",))
    seen: list[tuple[bytes, int, int]] = []

    async def scenario() -> None:
        release = asyncio.Event()

        async def wait(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            seen.append((request, limit.held, limit.health_held))
            if request == b"work":
                await release.wait()
            return b"answered " + request

        async with _serving(limit, wait) as channel:
            work, live = channel.unary_unary("/test.Held/Wait"), channel.unary_unary("/test.Held/Live")
            held = asyncio.ensure_future(work(b"work", timeout=30))
            while not seen:
                await asyncio.sleep(0.01)
            assert await live(b"probe", timeout=30) == b"answered probe"
            assert seen[-1] == (b"probe", 1, 1)  # in a health place, the work's place alone in the limit's
            await wait_until_async(lambda: limit.health_held == 0, 30, "the probe's place given back")

            silent = asyncio.Event()

            async def nothing() -> AsyncIterator[bytes]:  # a health call's headers, and no message yet
                await silent.wait()
                yield b"later"

            def waiting() -> asyncio.Future[bytes]:
                return asyncio.ensure_future(channel.stream_unary("/test.Held/Live")(nothing(), timeout=30))

            holding = [waiting() for _ in range(HEALTH_PLACES)]
            await wait_until_async(lambda: limit.health_held == HEALTH_PLACES, 30, "every health place held")
            assert await live(b"spare", timeout=30) == b"answered spare"
            assert seen[-1] == (b"spare", 2, HEALTH_PLACES)  # in the limit's spare place
            await wait_until_async(lambda: limit.held == 1, 30, "the spare place given back")
            holding.append(waiting())  # holds that spare place: the limit's are all held now
            await wait_until_async(lambda: limit.held == 2, 30, "the spare place held")
            before = _refused("grpc_calls")
            for call in (live, work):
                with pytest.raises(grpc.aio.AioRpcError) as past:
                    await call(b"past", timeout=30)
                assert past.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert past.value.details() == (
                    "This worker holds GRPC_MAX_CONCURRENT_RPCS=2 calls already; send it again (it changed nothing)"
                )
            assert _refused("grpc_calls") == before + 2
            silent.set()
            assert await asyncio.gather(*holding) == [b"answered later"] * (HEALTH_PLACES + 1)
            release.set()
            assert await held == b"answered work"
            assert await live(b"probe", timeout=30) == b"answered probe"
            await _none_held(limit)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("method", "timeouts", "setting"),
    [("/test.Held/Wait", (0.5, 60), "REQUEST_TIMEOUT_S"), ("/test.Held/Live", (60, 0.5), "HEADER_TIMEOUT_S")],
)
def test_a_call_whose_message_never_arrives_ends_at_the_timeout_and_frees_its_place(
    method: str, timeouts: tuple[float, float], setting: str
) -> None:
    """A client that sends a call's headers and no message (a request stream it never writes to) held a place until
    its connection's age ended it: now DEADLINE_EXCEEDED at REQUEST_TIMEOUT_S, counted, and the place is free. A
    health call has HEADER_TIMEOUT_S, as an HTTP probe's head has, and its message is named so."""
    call_timeout, health_timeout = timeouts
    limit = CallLimit(2, timeout_s=call_timeout, health=("/test.Held/Live",), health_timeout_s=health_timeout)
    reached: list[bytes] = []

    async def scenario() -> None:
        async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            reached.append(request)
            return b"answered " + request

        async with _serving(limit, answer) as channel:
            silent = asyncio.Event()

            async def nothing() -> AsyncIterator[bytes]:  # the headers go; the message never does
                await silent.wait()
                yield b"too late"

            before = _refused("grpc_message_timeout")
            started = asyncio.get_running_loop().time()
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await channel.stream_unary(method)(nothing(), timeout=30)
            waited = asyncio.get_running_loop().time() - started
            assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, cut.value
            assert cut.value.details() == f"The call's message did not arrive within 0.5 seconds ({setting})"
            assert 0.4 < waited < 10 and _refused("grpc_message_timeout") == before + 1 and not reached
            await _none_held(limit)
            silent.set()
            assert await channel.unary_unary(method)(b"next", timeout=30) == b"answered next"

    asyncio.run(scenario())


def test_a_call_not_answered_in_time_is_cancelled_and_counts_as_the_servers() -> None:
    """A call whose work outlasts REQUEST_TIMEOUT_S: its work is cancelled, where the runtime reads the cut as a
    5xx (as HTTP's 504), and the client gets DEADLINE_EXCEEDED naming the setting. A call in time sees the deadline
    the runtime's waits end by, or its client's where sooner."""
    limit = CallLimit(2, timeout_s=2)  # the quick call's margin on a busy machine
    seen: dict[str, object] = {}

    async def scenario() -> None:
        async def work(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            seen["left"] = time_left()
            if request == b"quick":
                return b"done"
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen["cut"] = timeout.cut_off()
                raise
            return b"never"

        async with _serving(limit, work) as channel:
            call = channel.unary_unary("/test.Held/Wait")
            assert await call(b"quick", timeout=30) == b"done"
            assert isinstance(seen["left"], float) and 0 < seen["left"] <= 2
            assert await call(b"quick", timeout=1) == b"done"  # the client's deadline, where sooner
            assert isinstance(seen["left"], float) and 0 < seen["left"] < 1.5  # gRPC rounds its timeout up a little
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await call(b"slow", timeout=30)
            assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, cut.value
            assert cut.value.details() == "Not able to process the call in 2 seconds (REQUEST_TIMEOUT_S)"
            assert seen["cut"] == "5xx"
            await _none_held(limit)

    asyncio.run(scenario())
