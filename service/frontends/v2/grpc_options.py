"""The gRPC server's limits: its channel arguments (message size, connection age and keepalive) from the
settings, and the calls it holds at once (:class:`CallLimit`).

Apart from the server (which imports the generated messages) so that they can be tried on a server of their own
in a process that has another copy of those messages registered (tritonclient's, in the tests).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from ... import metrics
from ...settings import Settings

# Connections: an idle one is pinged after a minute and closed when 20 s pass without the answer (a peer gone
# without a FIN: a crashed client, a NAT that dropped it), and a client may ping every 10 s, with or without calls
# in flight, where gRPC's default (5 minutes) answers such a client's pings with GOAWAY "too_many_pings"
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments: message size, connection age and keepalive, from ``settings``."""
    options = [
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", settings.max_body_bytes),
        *KEEPALIVE_OPTIONS,
    ]
    if settings.grpc_max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", _milliseconds(settings.grpc_max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", _milliseconds(settings.request_timeout_s)),
        ]
    return options


def _milliseconds(seconds: float) -> int:
    """A duration as a channel argument takes it: whole milliseconds, at least 1, at most a C int (24.8 days;
    more raises at the server's start)."""
    return max(1, min(round(min(seconds, 2**31) * 1000), 2**31 - 1))


def refusal(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler that answers ``code`` at once, without reading the call's message (it takes the request as a
    stream it never reads): a refused call costs no copy of its up to ``MAX_BODY_BYTES``."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    return grpc.stream_unary_rpc_method_handler(refuse)


class CallLimit(grpc.aio.ServerInterceptor):
    """``GRPC_MAX_CONCURRENT_RPCS``: a call past it gets ``RESOURCE_EXHAUSTED`` before its message is read, and is
    counted (``cnn_connections_refused_total{reason="grpc_calls"}``), where gRPC's own limit answered unseen.

    A call holds its place from here until the task that runs it ends (answered, failed, cancelled by its client or
    by the server's stop: a task's done callbacks run whatever ends it), as gRPC's own limit counts it. The first
    interceptor: a refused call is not authenticated either."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._refusal = refusal(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"This worker holds GRPC_MAX_CONCURRENT_RPCS={limit} calls already; send it again (it changed nothing)",
        )

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if self.held >= self.limit:
            metrics.connection_refused("grpc_calls")
            return self._refusal
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - grpc.aio runs every call in a task of its own
            return await continuation(details)
        self.held += 1
        task.add_done_callback(self._release)
        return await continuation(details)

    def _release(self, task: asyncio.Task[Any]) -> None:
        self.held -= 1
