"""The BentoML service: ``bentoml serve service.service:CNNClassifier`` (``make serve``).

BentoML provides the server, its workers, ``/livez``, ``/readyz``, ``/metrics`` and the
OpenAPI page; the mounted FastAPI app (``service.frontends.app``) provides the API; the
:class:`~service.runtime.repository.Repository` owns the ONNX Runtime sessions and batchers.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import bentoml

from .frontends.app import create_app
from .frontends.v2.handler import OipHandler
from .metrics import ModelStateCollector, get_metrics, process_metrics_text, render
from .runtime.classifier import Classifier
from .runtime.lifecycle import ModelControl
from .runtime.readiness import WorkerReadiness
from .runtime.repository import Repository
from .settings import get_settings

logger = logging.getLogger(__name__)


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
settings = get_settings()
app = create_app(
    settings.api_token.get_secret_value() if settings.api_token else None,
    settings.enable_noop,
    settings.admin_token.get_secret_value() if settings.admin_token else None,
)


@bentoml.service(
    name="cnn_classifier",
    workers=settings.workers,
    traffic={"timeout": settings.request_timeout_s},
    http={"port": settings.http_port, "host": settings.http_host},
)
@bentoml.asgi_app(app, path="/")
class CNNClassifier:
    """Image classification with the classic CNNs on ONNX Runtime, batched per model."""

    def __init__(self) -> None:
        self.readiness = WorkerReadiness(settings.workers)
        self.repository = Repository(settings, get_metrics(), self.readiness)
        self.control = ModelControl(self.repository, self.readiness)
        self.decoders = ThreadPoolExecutor(settings.decoder_threads, thread_name_prefix="decode")
        self.model_metrics = render(ModelStateCollector(lambda: self.readiness.states().values()))
        app.state.classifier = Classifier(self.repository, self.decoders)
        app.state.oip = OipHandler(app.state.classifier, self.control)
        self.control.start()  # loads and warms up in the background (then follows MODEL_CONTROL); /readyz waits

    def __is_ready__(self) -> bool:
        return self.repository.ready

    def __metrics__(self, content: str) -> str:
        """BentoML's and our metrics, CPU and memory of the whole server process tree, every worker's models."""
        return content + process_metrics_text()() + self.model_metrics()

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        self.control.stop()
        self.readiness.withdraw()
        await self.repository.close()
        self.decoders.shutdown(wait=False)
