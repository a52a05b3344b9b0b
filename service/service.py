"""The BentoML service: ``bentoml serve service.service:CNNClassifier`` (``make serve``).

BentoML provides the server, its workers, ``/livez`` and ``/readyz``; the mounted FastAPI
app (``service.frontends.app``) provides the API and ``/metrics``; each worker's
:class:`~service.server.Server` (the composition root) builds the runtime and the front ends
on it, and starts and stops them. BentoML's decorator needs the worker count, the port and
the app when this module is imported: that much (and the two server patches that must be
in place before BentoML starts the server) is all that happens here at import.

BentoML's per-request observability is off: its request metrics duplicated ours
(``cnn_*``), its access log wrote a line per request, and its OpenTelemetry middleware
recorded spans for every request and every ``receive``/``send`` even when nothing exported
them; together they were over half of a worker's CPU on small requests (``make profile``).
Ours replace them, off by default where they cost anything (``ACCESS_LOG``, ``TRACING``).
BentoML gives no setting to remove its OpenTelemetry middleware: every URL is excluded
from it, so it returns at its first check.
"""

from __future__ import annotations

import logging
import os

import bentoml
from bentoml._internal.context import server_context

from . import parent
from .frontends.app import create_app
from .frontends.auth import BearerTokenMiddleware
from .frontends.fastpath import FastPathMiddleware, JsonNotFound
from .frontends.observe import RequestObserver
from .frontends.protocol import install as install_http_limits
from .frontends.timeout import install as install_request_timeout
from .runtime import readiness, session_host
from .runtime.lifecycle import unknown_in_settings
from .runtime.session_host import shares_sessions
from .runtime.sizing import sized
from .server import Server
from .settings import get_settings
from .store.layout import ModelStore

logger = logging.getLogger(__name__)

# BentoML's configuration of the server around the app (see the module's docstring)
BENTOML_METRICS = {"enabled": False}
BENTOML_LOGGING = {"access": {"enabled": False}}
BENTOML_TRACING = {"excluded_urls": ".*"}


def _configure_logging() -> None:
    """BentoML configures its own loggers only; give ours the same destination and format."""
    package = logging.getLogger("service")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False


_configure_logging()
install_request_timeout()  # BentoML's timeout middleware kept every request's timer for the whole timeout
settings = sized(get_settings())
if server_context.worker_index is None:  # BentoML's first process, before it starts a worker (not in a worker)
    parent.announce()  # its workers stop if it dies
    readiness.sweep()  # what servers killed outright left behind
    for line in unknown_in_settings(settings, ModelStore(settings.model_store)):
        logger.warning("%s", line)
    if shares_sessions(settings):
        session_host.start()
    else:
        session_host.forget()  # an address inherited from elsewhere is not this server's
install_http_limits(settings)  # uvicorn's protocol with bounded heads, deadlines and a connection cap
# the worker processes BentoML starts inherit this environment, and so agree on the count
os.environ["WORKERS"] = str(settings.workers)
app = create_app(settings.enable_noop, settings.max_top_k)


@bentoml.service(
    name="cnn_classifier",
    workers=settings.workers,
    traffic={"timeout": settings.request_timeout_s},
    http={"port": settings.http_port, "host": settings.http_host},
    metrics=BENTOML_METRICS,
    logging=BENTOML_LOGGING,
    tracing=BENTOML_TRACING,
)
@bentoml.asgi_app(app, path="/")
class CNNClassifier:
    """Image classification with the classic CNNs on ONNX Runtime, batched per model."""

    def __init__(self) -> None:
        # built here, in the worker; the app's lifespan starts it (loads, gRPC) and stops it in reverse
        self.server = Server(settings, app, watch_parent=True)

    def __is_ready__(self) -> bool:
        return self.server.ready

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        await self.server.stop()  # where the app's lifespan has not already


def middlewares() -> list[tuple[type, dict[str, object]]]:
    """Ours, outermost first, inside BentoML's timeout: every request's ID, count, log line and span;
    the tokens; the inference routes answered without FastAPI's layers; BentoML's plain-text 404 as JSON."""
    found: list[tuple[type, dict[str, object]]] = [(RequestObserver, {"api": app})]
    if settings.api_token or settings.admin_token:
        tokens = {"token": settings.api_token, "admin_token": settings.admin_token}
        found.append((BearerTokenMiddleware, {k: v.get_secret_value() if v else None for k, v in tokens.items()}))
    return [*found, (FastPathMiddleware, {"api": app}), (JsonNotFound, {})]  # the last: off the fast path


for _middleware, _options in middlewares():
    CNNClassifier.add_asgi_middleware(_middleware, **_options)  # type: ignore[attr-defined]  # a bentoml.Service
