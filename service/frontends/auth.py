"""Optional bearer-token access control, for HTTP and gRPC alike.

``API_TOKEN`` guards inference and metadata (``/classify``, ``/explain``, ``/models``, ``/v2``, and
``/noop`` where ``ENABLE_NOOP`` serves it);
``ADMIN_TOKEN`` guards management, the repository API (``/v2/repository``, gRPC
``Repository*``): the inference token is not enough there (403), and the admin token
also opens inference. Without ``ADMIN_TOKEN`` the repository API falls under
``API_TOKEN``. Probes and scrapers stay open: ``/livez``, ``/readyz``, ``/healthz``,
``/metrics``, ``/v2/health/*``, gRPC ``ServerLive``/``ServerReady`` and ``grpc.health.v1.Health``. Tokens are
compared in constant time.
"""

from __future__ import annotations

import enum
import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

PROTECTED_PREFIXES = ("/classify", "/explain", "/models", "/v2", "/noop")  # /noop: ENABLE_NOOP reads any body
OPEN_PREFIXES = ("/v2/health/",)
ADMIN_PREFIXES = ("/v2/repository",)
OPEN_GRPC_METHODS = (
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
)
ADMIN_GRPC_METHODS = tuple(
    f"/inference.GRPCInferenceService/{name}"
    for name in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
)
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="cnn-serving"'}


class Access(enum.Enum):
    GRANTED = 200
    MISSING = 401  # no token, or not one of ours
    FORBIDDEN = 403  # the inference token on a management call


def token_matches(authorization: str | None, token: str) -> bool:
    """True for ``Bearer <token>``; the comparison takes the same time whatever the input."""
    scheme, _, given = (authorization or "").partition(" ")
    return hmac.compare_digest(given.strip().encode(), token.encode()) and scheme.lower() == "bearer"


def check_access(
    authorization: str | None, api_token: str | None, admin_token: str | None, admin: bool, grpc: bool = False
) -> tuple[Access, str]:
    """Whether a call may go on, and the message when not."""
    send = "the metadata 'authorization: Bearer <{}>'" if grpc else "'Authorization: Bearer <{}>'"
    is_admin = admin_token is not None and token_matches(authorization, admin_token)
    if admin and admin_token is not None:
        if is_admin:
            return Access.GRANTED, ""
        if api_token is not None and token_matches(authorization, api_token):
            message = "The inference token (API_TOKEN) cannot manage models: send " + send.format("ADMIN_TOKEN")
            return Access.FORBIDDEN, message
        return Access.MISSING, "Missing or wrong token: the repository API needs " + send.format("ADMIN_TOKEN")
    if api_token is None or is_admin or token_matches(authorization, api_token):
        return Access.GRANTED, ""
    return Access.MISSING, "Missing or wrong token: send " + send.format("API_TOKEN")


def is_protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIXES) and not path.startswith(OPEN_PREFIXES)


class BearerTokenMiddleware:
    """Answers 401 (no or wrong token) or 403 (the inference token on the repository API)."""

    def __init__(self, app: ASGIApp, token: str | None, admin_token: str | None = None) -> None:
        self.app = app
        self.token = token
        self.admin_token = admin_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_protected(scope["path"]):
            headers = dict(scope["headers"])
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            admin = scope["path"].startswith(ADMIN_PREFIXES)
            access, message = check_access(authorization, self.token, self.admin_token, admin)
            if access is not Access.GRANTED:
                headers = CHALLENGE if access is Access.MISSING else {}
                response = JSONResponse({"error": message}, status_code=access.value, headers=headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
