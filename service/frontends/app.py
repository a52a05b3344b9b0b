"""The HTTP API: ``POST /classify`` and ``GET /models``, mounted into the BentoML service.

A mounted ASGI app rather than a ``@bentoml.api`` because the body is the image file
itself (``image/jpeg``, ...) or a multipart form, which BentoML's JSON-first APIs reject.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ClientGone, ServiceError, validation_problems
from ..runtime.classifier import Answer
from ..settings import Settings
from .body import read_body, read_images
from .explain import explain
from .fastpath import FastRoutes, client_gone, error_response, internal_error, nothing_at
from .page import add_page
from .params import MODELS, classifier, classify_params, explain_params
from .schemas import ERROR_RESPONSES, ClassifyResponse, ExplainResponse, Limits, ModelInfo, ModelList
from .timeout import cut_off
from .v2.rest import infer as v2_infer
from .v2.rest import router as v2_router

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOP_K: int = Settings.model_fields["max_top_k"].default

# the Open Inference Protocol's inference routes (v2.rest), answered by the fast path too
V2_INFER = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
CLASSIFY_BODY = {
    "required": True,
    "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"image": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                "description": "One or more image files, under any field name",
            }
        },
    },
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, f"Invalid parameter: {validation_problems(exc.errors(), skip=1)}")

    @app.exception_handler(ClientDisconnect)
    @app.exception_handler(ClientGone)
    async def disconnected(request: Request, _: Exception) -> Response:
        return client_gone(request.scope)

    @app.exception_handler(Exception)
    async def unhandled_error(_: Request, exc: Exception) -> JSONResponse:
        return internal_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = nothing_at(request.url.path)
        elif exc.status_code == 405 and exc.headers and exc.headers.get("Allow"):
            method = "HEAD" if request.scope.get(HEAD_AS_GET) else request.method
            message = f"{method} is not allowed on {request.url.path}: use {exc.headers['Allow']}"
        response = error_response(exc.status_code, message)
        response.headers.update(exc.headers or {})  # a 405's Allow
        return response


async def classify(request: Request) -> Response:
    """``POST /classify``: the image files of the body, each ranked by the model (see the route's docs)."""
    service = classifier(request)
    settings = service.settings
    query = classify_params(settings.max_top_k).parse(request.query_params)
    # inside the record, so that every error counts, and against the version the lease names (the body is read
    # once it is taken: a partial, not a lambda, so that the request is not handed back to this module)
    files = functools.partial(read_images, request, settings.max_body_bytes, settings.max_images_per_request)
    with service.metrics.track_request("http", cut_off=cut_off) as record:
        request.scope["request_record"] = record
        classified = await service.classify(
            query["model"], query["version"], files, query["top_k"], query["min_confidence"], record
        )
    body = {"model": classified.model, "version": str(classified.version),
            "min_confidence": classified.min_confidence,
            "results": [rendered(answer) for answer in classified.answers]}  # fmt: skip
    if classified.canary is not None:
        body["canary"] = classified.canary
    return JSONResponse(body, headers={"X-Cache": record.cache} if record.cache else None)


def rendered(answer: Answer) -> dict[str, Any]:
    """One image's result in ``/classify``'s body: ``typical`` and ``confident`` only where they apply."""
    result: dict[str, Any] = {"predictions": answer.predictions}
    if answer.verdict.typical is not None:
        result["typical"] = answer.verdict.typical
    if answer.verdict.confident is not None:
        result["confident"] = answer.verdict.confident
    return result


async def noop(request: Request) -> Response:
    """``POST /noop`` (``ENABLE_NOOP``): the HTTP stack's own ceiling."""
    body = await read_body(request, classifier(request).settings.max_body_bytes)
    return JSONResponse({"model": "noop", "version": "0", "bytes": len(body)})


async def metrics(request: Request) -> Response:
    """``GET /metrics``: every worker's samples (prometheus_client reads their files: off the event loop)."""
    render = getattr(request.app.state, "metrics", None)
    if render is None:
        raise ServiceError("The service is starting: no metrics yet")
    text = await asyncio.get_running_loop().run_in_executor(None, render)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The worker's runtime and gRPC, for as long as the app runs (``app.state.server``, the composition root the
    BentoML service built); without one (the app alone): HTTP only."""
    server = getattr(app.state, "server", None)
    if server is None:
        yield
        return
    async with server.running():
        yield


def create_app(enable_noop: bool = False, max_top_k: int = DEFAULT_MAX_TOP_K) -> FastAPI:
    """The HTTP API; its inference routes are also served by :mod:`.fastpath` (``app.state.fast_routes``).

    ``max_top_k`` (``MAX_TOP_K``) is only documented here: the handlers hold requests to the settings' own.
    """
    app = FastAPI(
        title="CNN classification",
        description="Classify images with LeNet-5, AlexNet, VGG, GoogLeNet and ResNet on ONNX Runtime. "
        "Try them in a browser at `/`; with `API_TOKEN` set, send `Authorization: Bearer <token>`. "
        "Every answer carries an `X-Request-ID` (yours, if you send one).",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load Swagger UI and ReDoc from CDNs; ours are in .page
        redoc_url=None,
    )
    install_error_handlers(app)
    add_page(app)
    app.include_router(v2_router)
    fast = [("POST", "/classify", classify)] + [("POST", path, v2_infer) for path in V2_INFER]
    if enable_noop:
        fast.append(("POST", "/noop", noop))
    app.state.fast_routes = FastRoutes(fast)

    @app.post(
        "/classify",
        tags=["Classification"],
        response_model=ClassifyResponse,
        responses=ERROR_RESPONSES,
        openapi_extra={"requestBody": CLASSIFY_BODY, **classify_params(max_top_k).openapi()},
        summary="Classify one or more images",
    )
    async def classify_route(request: Request) -> Response:
        """The body is the image file itself (`Content-Type: image/jpeg`, `image/png`, ...,
        or `application/octet-stream`), or `multipart/form-data` with one or more files."""
        return await classify(request)

    @app.post(
        "/explain",
        tags=["Classification"],
        response_model=ExplainResponse,
        responses=ERROR_RESPONSES,
        openapi_extra={"requestBody": CLASSIFY_BODY, **explain_params(max_top_k).openapi()},
        summary="Where the network looked: a Grad-CAM or occlusion map per image",
    )
    async def explain_route(request: Request) -> Response:
        """The same bodies as `/classify`. With `Accept: image/png` and one image, the answer is the overlay PNG."""
        return await explain(request)

    if enable_noop:
        app.post("/noop", summary="Benchmarking: read the body, answer a fixed JSON (ENABLE_NOOP)")(noop)

    app.get("/metrics", tags=["Operations"], summary="Prometheus metrics (open, like /livez and /readyz)")(metrics)

    @app.get(
        "/models",
        tags=["Classification"],
        response_model=ModelList,
        openapi_extra=MODELS.openapi(),
        summary="Every model, its state and its metadata",
    )
    async def models(request: Request) -> ModelList:
        """``?per_class=true`` adds each fine-tuned model's held-out accuracy per class and confusion matrix."""
        runtime = classifier(request)
        per_class = MODELS.parse(request.query_params)["per_class"]
        settings = runtime.settings
        limits = Limits(
            max_body_bytes=settings.max_body_bytes,
            max_images_per_request=settings.max_images_per_request,
            max_top_k=settings.max_top_k,
        )
        models = [ModelInfo(**runtime.describe(name, per_class)) for name in runtime.names()]
        return ModelList(default_model=runtime.default_model, models=models, limits=limits)

    app.add_middleware(HeadAsGet)
    return app


HEAD_AS_GET = "cnn.head_as_get"


class HeadAsGet:
    """HEAD on every GET route, as HTTP has it (RFC 9110 9.3.2; a monitor's probe often sends it): FastAPI's routes
    answer only the methods they declare, so HEAD /models was a 405. The app sees a GET (marked, for a 405's
    message) and uvicorn, whose own scope still says HEAD, sends the head alone."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        inner = {**scope, "method": "GET", HEAD_AS_GET: True}
        try:
            await self.app(inner, receive, send)
        finally:  # what the routing learned, for the metrics, the access log and the trace (outside: this scope)
            for key in ("route", "endpoint", "path_params", "route_template"):
                if key in inner:
                    scope[key] = inner[key]
