"""Optional bearer-token access control (``API_TOKEN``), for HTTP and gRPC alike.

Probes and scrapers stay open: ``/livez``, ``/readyz``, ``/healthz``, ``/metrics``,
``/v2/health/*`` and gRPC ``ServerLive``/``ServerReady``. Tokens are compared in
constant time.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

PROTECTED_PREFIXES = ("/classify", "/models", "/v2")
OPEN_PREFIXES = ("/v2/health/",)
OPEN_GRPC_METHODS = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady")
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="cnn-serving"'}


def token_matches(authorization: str | None, token: str) -> bool:
    """True for ``Bearer <token>``; the comparison takes the same time whatever the input."""
    scheme, _, given = (authorization or "").partition(" ")
    return hmac.compare_digest(given.strip().encode(), token.encode()) and scheme.lower() == "bearer"


def is_protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIXES) and not path.startswith(OPEN_PREFIXES)


class BearerTokenMiddleware:
    """Answers 401 to requests for protected paths without the right token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_protected(scope["path"]):
            headers = dict(scope["headers"])
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            if not token_matches(authorization, self.token):
                message = "Missing or wrong token: send 'Authorization: Bearer <API_TOKEN>'"
                response = JSONResponse({"error": message}, status_code=401, headers=CHALLENGE)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
