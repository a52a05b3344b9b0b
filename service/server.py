"""The composition root: what a worker runs, built in one place, started together and stopped in reverse.

:func:`build_runtime` builds the runtime bottom-up: the hooks and what watches them
(:mod:`service.observers`), the repository's table, the lifecycle that fills it, the
residency strategy behind a request's lease (always resident, or on demand within a
memory budget), the shadow, the response cache (``RESPONSE_CACHE_MB``), and the
:class:`~service.runtime.classifier.Classifier` the front ends ask. :class:`Server` adds the
front ends (the Open Inference Protocol's handler, the gRPC server beside BentoML's HTTP) and
owns the order: :meth:`Server.running` starts the lifecycle, then gRPC, and stops gRPC, the
shadow, the lifecycle, the residency, the batchers, the decoders and the tracing, in that order.
Nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .frontends.v2.handler import OipHandler
from .metrics import Metrics, exposition, get_metrics, withdraw_gauges
from .observers import attach
from .parent import ParentWatch, server_pid
from .runtime import session_host
from .runtime.cache import ResponseCache
from .runtime.canary import Canaries, answered_by_cache
from .runtime.classifier import Classifier
from .runtime.cuda import preload, wants_cuda
from .runtime.hooks import Hooks
from .runtime.lifecycle import ModelControl
from .runtime.readiness import WorkerReadiness
from .runtime.repository import Repository
from .runtime.residency import AlwaysResident, Residency
from .runtime.shadow import Shadow
from .settings import Settings
from .tracing import Tracing

logger = logging.getLogger(__name__)

SHUTDOWN_MARGIN_S = 30.0  # beyond the request time-out: gRPC's 5-s grace, the runtime's stop


@dataclass
class Runtime:
    """One worker's runtime, as :func:`build_runtime` wires it."""

    settings: Settings
    metrics: Metrics
    tracing: Tracing
    hooks: Hooks
    repository: Repository
    control: ModelControl
    residency: AlwaysResident | Residency
    shadow: Shadow | None
    classifier: Classifier
    decoders: ThreadPoolExecutor
    readiness: WorkerReadiness | None = None
    canaries: Canaries | None = None

    def start(self) -> None:
        """Load in the background (then follow ``MODEL_CONTROL``); ``/readyz`` waits for the first pass. CUDA's
        libraries are preloaded first, where CUDA is wanted (before any connection or loading thread); the
        canaries take their shared state."""
        if wants_cuda(self.settings) and session_host.address() is None:  # else the session host has them
            preload()
        if self.canaries is not None:
            self.canaries.start()
        self.control.start()
        self.residency.start()

    async def stop(self) -> None:
        """Stop what :meth:`start` started and release every model's batchers, in reverse; a step that fails is
        logged and the next ones run all the same."""
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("the canaries", self.canaries.stop if self.canaries is not None else lambda: None),
            ("the shadow", self.shadow.close if self.shadow is not None else lambda: None),
            ("the lifecycle", self.control.stop),
            ("the residency", self.residency.shutdown),
            ("readiness", self.readiness.withdraw if self.readiness is not None else lambda: None),
            ("the batchers", self.repository.close),
            ("the decoders", lambda: self.decoders.shutdown(wait=False)),
            ("tracing", self.tracing.shutdown),
        ]
        for what, step in steps:
            try:
                done = step()
                if inspect.isawaitable(done):
                    await done
            except Exception:
                logger.exception("shutdown: stopping %s failed; going on", what)


def build_runtime(
    settings: Settings,
    metrics: Metrics | None = None,
    readiness: WorkerReadiness | None = None,
    tracing: Tracing | None = None,
) -> Runtime:
    """The runtime of one worker, wired and not started: every part is built before any model loads."""
    metrics = metrics or get_metrics()
    tracing = tracing or Tracing(settings)
    hooks = Hooks()
    attach(hooks, settings, metrics, tracing)  # before the first load: every version's metrics are seeded
    repository = Repository(settings, hooks, readiness)
    control = ModelControl(repository, readiness)
    residency: AlwaysResident | Residency
    if settings.model_control == "on-demand":  # the budget is what this worker holds now, before any model
        residency = Residency.create(repository, control, metrics)
        repository.gradcams.before_load = residency.count_explanation  # an explanation graph takes room too
    else:
        residency = AlwaysResident(repository)
    pairs, canary_pairs = settings.shadow_pairs(), settings.canary_pairs()
    shadow = Shadow(pairs, repository, metrics, settings.shadow_queue) if pairs or canary_pairs else None
    if shadow is not None and pairs:
        hooks.answered.subscribe(shadow.offer)
    canaries = None
    if canary_pairs:  # its agreement sample goes through the shadow's queues
        assert shadow is not None
        canaries = Canaries(canary_pairs, settings, metrics, shadow, control.promote)
        hooks.answered.subscribe(canaries.answered)
    cache = None
    if settings.response_cache_mb > 0:  # each worker its own: several workers, each caches what it answered
        # a request answered from it or beside another is left out of a canary's window
        cache = ResponseCache(int(settings.response_cache_mb * 2**20), metrics, shared=answered_by_cache)
        hooks.ready.subscribe(cache.ready)
        hooks.released.subscribe(cache.released)  # an unloaded version's answers go with it
    decoders = ThreadPoolExecutor(settings.decoder_threads, thread_name_prefix="decode")
    classifier = Classifier(repository, residency, decoders, metrics, tracing, hooks, shadow, canaries, cache)
    return Runtime(
        settings,
        metrics,
        tracing,
        hooks,
        repository,
        control,
        residency,
        shadow,
        classifier,
        decoders,
        readiness,
        canaries,
    )


class Server:
    """A worker: its runtime and the front ends on it (``app``: the FastAPI app BentoML serves)."""

    def __init__(self, settings: Settings, app: Any, *, watch_parent: bool = False) -> None:
        self.settings = settings
        # in a BentoML worker: stop once the server that started it is gone (see service.parent), leaving the
        # shutdown time for requests in flight, gRPC's grace and the runtime's stop
        grace = settings.request_timeout_s + SHUTDOWN_MARGIN_S
        server = server_pid()
        self.readiness = WorkerReadiness(settings.workers, server)
        self.parent_watch = (
            ParentWatch(grace, before_exit=self.readiness.withdraw, server=server) if watch_parent else None
        )
        self.runtime = build_runtime(settings, readiness=self.readiness)
        self.oip = OipHandler(self.runtime.classifier, self.runtime.control)
        app.state.metrics = exposition(lambda: self.readiness.states().values(), server)
        app.state.classifier = self.runtime.classifier
        app.state.oip = self.oip
        app.state.server = self
        self._stopped = False

    @property
    def ready(self) -> bool:
        return self.runtime.repository.ready

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The lifecycle's loads, then gRPC beside HTTP, for as long as the worker runs; stopped in reverse."""
        # imported here: the generated protobuf modules register the package "inference" in the process's
        # default descriptor pool, which only a worker serving gRPC needs (a client library that registers
        # its own copy, like tritonclient's, can then share a process with the runtime)
        from .frontends.v2.grpc_server import start_grpc_server

        self.runtime.start()
        if self.parent_watch is not None:
            self.parent_watch.start()
        grpc = await start_grpc_server(self.oip)
        try:
            yield
        finally:
            await grpc.stop(grace=5)
            await self.stop()

    async def stop(self) -> None:
        """Everything after gRPC, in reverse of its start; once (the app's shutdown or BentoML's, whichever
        comes first)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            await self.runtime.stop()
        finally:
            withdraw_gauges()  # not a death: /metrics counts a worker that left its gauges as one
        if self.parent_watch is not None:
            self.parent_watch.stop()
