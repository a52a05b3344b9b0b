"""The inference routes, answered without the web framework's layers.

``POST /classify``, ``POST /v2/models/{name}[/versions/{version}]/infer`` (and ``/noop``)
are also FastAPI routes, which document them in the OpenAPI schema; but a request that
goes through BentoML's router, ``PassiveMount``'s second match and FastAPI's middlewares,
router and parameter validation pays ~0.2 ms of Python before the handler runs, more than
LeNet-5 takes to decode and infer. This middleware (the last of the service's, inside
:mod:`.observe` and the token check) matches these few routes itself and calls the same
handlers, with the same errors; everything else goes on to BentoML and FastAPI.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ClientGone, ServiceError
from .protocol import REFUSED_WITH

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


def error_response(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def nothing_at(path: str) -> str:
    return f"Nothing at {path}: the API reference is at /docs"


class JsonNotFound:
    """BentoML's router answers a path that no route serves with a plain-text ``404 Not Found`` before the app sees
    it (its mount passes on what the app's routes do not match), and a method its own routes (``/livez``,
    ``/readyz``, ...) do not take with a plain-text ``405``; those answers become the API's JSON errors."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def send_json(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] in (404, 405):
                headers = dict(message.get("headers", ()))
                if headers.get(b"content-type", b"").startswith(b"text/plain"):
                    replaced = True
                    allow = headers.get(b"allow", b"").decode("latin-1")
                    if message["status"] == 404 or not allow:
                        answer = error_response(message["status"], nothing_at(scope["path"]))
                    else:
                        method, path = scope["method"], scope["path"]
                        answer = error_response(405, f"{method} is not allowed on {path}: use {allow}")
                        answer.headers["Allow"] = allow
                    await answer(scope, receive, send)
                    return
            if not replaced:
                await send(message)

        await self.app(scope, receive, send_json)


def client_gone(scope: Scope) -> Response:
    """The answer to a request whose body stopped arriving: nobody reads it, but the access log and
    ``cnn_http_requests_total`` say what happened: the connection's own refusal (408, 413), or, where the client
    went away, 499 as nginx says ("client closed request"), not a 500."""
    return Response(status_code=scope.get(REFUSED_WITH, 499))


def internal_error(exc: Exception) -> JSONResponse:
    logger.exception("Unhandled error", exc_info=exc)
    return error_response(500, f"Internal error ({type(exc).__name__}); the service logs say more")


class FastRoutes:
    """Routes of ``(method, template, handler)``; templates are literal paths with ``{name}`` segments."""

    def __init__(self, routes: Sequence[tuple[str, str, Handler]]) -> None:
        self.exact: dict[tuple[str, str], tuple[str, Handler]] = {}
        self.patterns: list[tuple[str, re.Pattern[str], str, Handler]] = []
        for method, template, handler in routes:
            if "{" not in template:
                self.exact[(method, template)] = (template, handler)
            else:
                pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
                self.patterns.append((method, re.compile(pattern + "$"), template, handler))

    def match(self, method: str, path: str) -> tuple[str, Handler, dict[str, str]] | None:
        found = self.exact.get((method, path))
        if found is not None:
            return found[0], found[1], {}
        for wanted, pattern, template, handler in self.patterns:
            if method == wanted and (matched := pattern.match(path)):
                return template, handler, matched.groupdict()
        return None


class FastPathMiddleware:
    """Answers ``api.state.fast_routes`` itself; ``api`` is the service's FastAPI app."""

    def __init__(self, app: ASGIApp, api: Any) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        routes: FastRoutes | None = getattr(self.api.state, "fast_routes", None)
        found = routes.match(scope["method"], scope["path"]) if routes and scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        template, handler, path_params = found
        scope["route_template"], scope["path_params"], scope["app"] = template, path_params, self.api
        request = Request(scope, receive, send)
        try:
            response = await handler(request)
        except (ClientDisconnect, ClientGone):
            response = client_gone(scope)
        except ServiceError as exc:
            response = error_response(exc.status_code, exc.message, exc.retry_after)
        except HTTPException as exc:  # Starlette's own, e.g. from a malformed multipart form
            response = error_response(exc.status_code, str(exc.detail))
        except Exception as exc:
            response = internal_error(exc)
        await response(scope, receive, send)
