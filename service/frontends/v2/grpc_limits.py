"""The gRPC server's limits on calls: how many one worker holds at once (``GRPC_MAX_CONCURRENT_RPCS``), and how
a refused one is answered.

Apart from the server (which imports the generated messages), as :mod:`.grpc_options` is, so that they can be tried
on a server of their own in a process that has another copy of those messages registered.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from ... import metrics


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
