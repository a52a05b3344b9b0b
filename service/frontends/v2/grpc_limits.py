"""The gRPC server's limits on calls: how many one worker holds at once (``GRPC_MAX_CONCURRENT_RPCS``, health
calls apart), how long each may take (``REQUEST_TIMEOUT_S``, a health call ``HEADER_TIMEOUT_S``, its message's
arrival included), and how a refused one is answered.

Apart from the server (which imports the generated messages), as :mod:`.grpc_options` is, so that they can be tried
on a server of their own in a process that has another copy of those messages registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from ... import metrics
from ..timeout import limited

# Places for health calls (``ServerLive``, ``ServerReady``, ``grpc.health.v1.Health``) beside
# GRPC_MAX_CONCURRENT_RPCS: each is answered at once, so a few are plenty, and a bound keeps calls that send headers
# and no message from holding without end
HEALTH_PLACES = 32


@dataclass(frozen=True)
class _Limit:
    """How long a call may take, and the setting that says so (named in the status of a call cut by it)."""

    seconds: float
    setting: str


def refusal(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler that answers ``code`` at once, without reading the call's message (it takes the request as a
    stream it never reads): a refused call costs no copy of its up to ``MAX_BODY_BYTES``."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    return grpc.stream_unary_rpc_method_handler(refuse)


class CallLimit(grpc.aio.ServerInterceptor):
    """``GRPC_MAX_CONCURRENT_RPCS`` and ``REQUEST_TIMEOUT_S`` for this worker's gRPC calls; the first interceptor,
    so a refused call is not authenticated either.

    A call past the limit gets ``RESOURCE_EXHAUSTED`` before its message is read, and is counted
    (``cnn_connections_refused_total{reason="grpc_calls"}``), where gRPC's own limit answered unseen. A call holds its
    place from here until the task that runs it ends (answered, failed, cancelled by its client or by the server's
    stop: a task's done callbacks run whatever ends it), as gRPC's own limit counts it.

    Each call then has ``timeout_s`` from here, as an HTTP request has from its head: a message that has not arrived
    by then gets ``DEADLINE_EXCEEDED`` (counted as ``reason="grpc_message_timeout"``: a client that sends headers and
    no message held its place until its connection's age ended it), and a call not answered by then is cancelled and
    gets ``DEADLINE_EXCEEDED`` (a ``ModelInfer`` counted as a ``5xx``, as HTTP's 504). gRPC's own deadline, the
    client's, is the client's to set and may be later or never.

    The ``health`` methods have places of their own (:data:`HEALTH_PLACES`), as HTTP's probes answer whatever the
    load: a worker busy with ``limit`` calls is still live and ready, and a client or balancer that asks it so must
    not read a refusal as "down" and send its load elsewhere, where it overflows next. Where those are all held, a
    health call takes a spare place of the others, so filling them costs what filling the others did before they
    had their own; and each has ``health_timeout_s`` (``HEADER_TIMEOUT_S``, as an HTTP probe's head has), so a place
    held by a call that sends no message is soon free again."""

    def __init__(
        self, limit: int, timeout_s: float, health: Iterable[str] = (), health_timeout_s: float | None = None
    ) -> None:
        self.limit = limit
        self._call_limit = _Limit(timeout_s, "REQUEST_TIMEOUT_S")
        self._health_limit = (
            self._call_limit
            if health_timeout_s is None or health_timeout_s >= timeout_s
            else _Limit(health_timeout_s, "HEADER_TIMEOUT_S")
        )
        self.health = frozenset(health)
        self.held = self.health_held = 0  # calls in the limit's places, health calls in their own
        self._refusal = refusal(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"This worker holds GRPC_MAX_CONCURRENT_RPCS={limit} calls already; send it again (it changed nothing)",
        )

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        health = details.method in self.health
        own = health and self.health_held < HEALTH_PLACES  # a health call in a place of the health calls'
        if not own and self.held >= self.limit:
            metrics.connection_refused("grpc_calls")
            return self._refusal
        task = asyncio.current_task()
        assert task is not None  # grpc.aio runs every call in a task of its own
        if own:
            self.health_held += 1
        else:
            self.held += 1
        task.add_done_callback(functools.partial(self._release, own))
        limit = self._health_limit if health else self._call_limit
        until = asyncio.get_running_loop().time() + limit.seconds
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler  # no such method, or a refusal (answered at once)
        if not inspect.iscoroutinefunction(handler.unary_unary):  # pragma: no cover - every method here is async
            return handler
        return self._timed(handler, until, limit)

    def _release(self, own: bool, task: asyncio.Task[Any]) -> None:
        if own:
            self.health_held -= 1
        else:
            self.held -= 1

    def _timed(self, handler: grpc.RpcMethodHandler, until: float, limit: _Limit) -> grpc.RpcMethodHandler:
        """``handler``'s unary call, with its message read here (the request taken as a stream of one) so that the
        wait for it is bounded too, and its answer by ``until``: one timer per call."""
        behaviour = handler.unary_unary

        async def call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            task = asyncio.current_task()
            assert task is not None
            timed = _Timed(task, context, limit)
            timed.timer = asyncio.get_running_loop().call_at(until, self._expire, timed)
            try:
                request = await context.read()  # where the timer cut first, this raises its abort
                if timed.aborting is not None:  # cut as the message came: the cut's status goes, nothing else
                    await timed.aborting
                    raise asyncio.CancelledError
                if request is grpc.aio.EOF:  # the client went (or half-closed with no message): as gRPC's unary
                    raise asyncio.CancelledError
                timed.arrived = True
                left = context.time_remaining()  # the client's deadline, if it set one and it is sooner
                ends = until if left is None else min(until, asyncio.get_running_loop().time() + left)
                with limited(timed, ends):
                    return await behaviour(request, context)
            except asyncio.CancelledError:
                if not timed.cut or not timed.arrived or context.done():  # the client's cancel, the server's stop
                    raise
                task.uncancel()
            finally:
                timed.timer.cancel()
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"Not able to process the call in {limit.seconds:g} seconds ({limit.setting})",
            )

        return grpc.stream_unary_rpc_method_handler(
            call, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )

    def _expire(self, timed: _Timed) -> None:
        """The call's limit (``REQUEST_TIMEOUT_S``, a health call's ``HEADER_TIMEOUT_S``) has passed: a call at work
        is cancelled (its answer is the abort that ``call`` then sends). A call whose message has not arrived gets its
        status from outside its task, whose read is never cancelled (gRPC would still complete it, into memory the
        cancel freed); the read then fails with it."""
        if timed.context.done():  # its status is on its way (an error's): the call ends with it
            return
        timed.cut = True
        if timed.arrived:
            timed.task.cancel()
            return
        metrics.connection_refused("grpc_message_timeout")
        details = f"The call's message did not arrive within {timed.limit.seconds:g} seconds ({timed.limit.setting})"
        timed.aborting = asyncio.ensure_future(_abort(timed.context, grpc.StatusCode.DEADLINE_EXCEEDED, details))


class _Timed:
    """One call's time limit: its task, its context, the limit, its timer; whether its message arrived and the
    limit cut it (:meth:`expired`, as ``asyncio.Timeout`` says it, for :func:`..timeout.cut_off`)."""

    __slots__ = ("aborting", "arrived", "context", "cut", "limit", "task", "timer")

    def __init__(self, task: asyncio.Task[Any], context: grpc.aio.ServicerContext, limit: _Limit) -> None:
        self.task, self.context, self.limit = task, context, limit
        self.arrived = self.cut = False
        self.timer: asyncio.TimerHandle | None = None
        self.aborting: asyncio.Future[None] | None = None  # the status of a call cut before its message came

    def expired(self) -> bool:
        return self.cut


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    with contextlib.suppress(Exception):  # abort raises once its status is sent (or the call has ended)
        await context.abort(code, details)
