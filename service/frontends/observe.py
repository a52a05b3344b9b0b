"""What every HTTP request leaves behind: its ID, its count, an access-log line, its span.

The first of the service's ASGI middlewares (BentoML calls it inside its own timeout):

- ``X-Request-ID`` on every answer: the client's, when it sent a sane one (printable
  ASCII, at most 128 characters), else a new one;
- ``cnn_http_requests_total{route, code}``: the route's template (``/classify``,
  ``/v2/models/{name}/infer``, ...; ``unmatched`` for paths no route serves), never the path
  itself, so a client cannot make series;
- ``ACCESS_LOG=json``: one JSON line per request on standard output (time, request ID,
  method, route, path, model, version, status, images, seconds, and with ``RESPONSE_CACHE_MB``
  whether the response cache answered);
- ``TRACING=otlp``: the request's span, which continues the caller's ``traceparent``.

Off, the log and the span cost nothing; the ID and the count cost a few microseconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..tracing import carrier
from .fastpath import FastRoutes
from .timeout import cut_off

REQUEST_ID = b"x-request-id"
UNMATCHED = "unmatched"


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-ID`` if it is printable ASCII of at most 128 characters, else a new one."""
    for key, value in headers:
        if key == REQUEST_ID:
            if 0 < len(value) <= 128 and all(32 < byte < 127 for byte in value):
                return value.decode("ascii")
            break
    return os.urandom(16).hex()


def route_of(scope: Scope) -> str:
    """The template of the route that served ``scope`` (set by the fast routes or the routers)."""
    template = scope.get("route_template")
    if template is None:
        template = getattr(scope.get("route"), "path", None) or UNMATCHED
    return str(template)


class RoutesAsked:
    """The template of the route a request would have reached, for an answer given before any routing (a token
    refused, 401 or 403): the fast routes', else those of the app's OpenAPI schema (read once, when first asked)."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.schema: FastRoutes | None = None

    def __call__(self, scope: Scope) -> str:
        fast: FastRoutes | None = getattr(self.api.state, "fast_routes", None)
        found = fast.match(scope["method"], scope["path"]) if fast is not None else None
        if found is None:
            if self.schema is None:
                try:
                    paths = self.api.openapi().get("paths", {})
                except Exception:  # a schema that cannot be built: its routes' refusals are counted unmatched
                    paths = {}
                self.schema = FastRoutes([(m.upper(), t, _unanswered) for t, ops in paths.items() for m in ops])
            found = self.schema.match(scope["method"], scope["path"])
        return found[0] if found is not None else UNMATCHED


async def _unanswered(request: Any) -> Any:  # a schema route's stand-in: only its template is read
    raise NotImplementedError


def access_logger() -> logging.Logger:
    """``service.access``: each record is one JSON line, alone, on standard output."""
    log = logging.getLogger("service.access")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


class RequestObserver:
    """See the module's docstring; ``api`` is the service's FastAPI app, whose state holds the runtime."""

    def __init__(self, app: ASGIApp, api: Any) -> None:
        self.app = app
        self.api = api
        self.routes_asked = RoutesAsked(api)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        classifier = getattr(self.api.state, "classifier", None)
        if scope["type"] != "http" or classifier is None:
            await self.app(scope, receive, send)
            return
        settings = classifier.settings
        started = time.perf_counter()
        identifier = request_id(scope["headers"])
        scope["request_id"] = identifier
        header = (b"x-request-id", identifier.encode("ascii"))
        status = 500  # what the client gets if the app sends nothing

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            attributes = {"request.id": identifier, "http.request.method": scope["method"]}
            with classifier.tracing.request(scope["method"], carrier(scope["headers"]), attributes) as span:
                await self.app(scope, receive, send_with_id)
                if span is not None:  # named by its route's template once the routing found it
                    span.update_name(f"{scope['method']} {route_of(scope)}")
                    span.set_attribute("http.response.status_code", status)
        except asyncio.CancelledError:  # the request timeout (frontends/timeout.py) cut it, and answers itself
            status = 408 if cut_off() == "4xx" else 504  # 408: its body was still arriving
            raise
        finally:
            route = route_of(scope)
            if route == UNMATCHED and status in (401, 403):  # refused before routing: counted under its route
                route = self.routes_asked(scope)
            self._count(classifier.metrics, route, status)
            if settings.access_log == "json":
                self._log(scope, identifier, route, status, time.perf_counter() - started)

    @staticmethod
    def _count(metrics: Any, route: str, status: int) -> None:
        metrics.child(metrics.http_requests, route, str(status)).inc()

    @staticmethod
    def _log(scope: Scope, identifier: str, route: str, status: int, seconds: float) -> None:
        record = scope.get("request_record")  # what the handler learned: model, version, images
        line = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": identifier,
            "method": scope["method"],
            "route": route,
            "path": scope["path"],
            "model": getattr(record, "model", None) or None,
            "version": getattr(record, "version", None) or None,
            "status": status,
            "images": getattr(record, "images", 0),
            "seconds": round(seconds, 6),
            "cache": getattr(record, "cache", None),  # RESPONSE_CACHE_MB: "hit" or "miss"; else null
        }
        access_logger().info(json.dumps(line, separators=(",", ":")))
