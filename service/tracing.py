"""Optional tracing (``TRACING=otlp``): OpenTelemetry spans for each request and its stages.

A request's span (``POST /classify``, ``ModelInfer``, ...) continues the caller's W3C
``traceparent`` (HTTP header or gRPC metadata) and holds one child span per stage:
``decode``, ``queue``, ``infer`` and ``postprocess``. One ONNX Runtime call serves a whole
batch, so its ``infer`` span is recorded once, as a child of the batch's first request, and
linked to every request of the batch (``batch.size``, ``batch.requests`` as attributes);
each request's ``queue`` span ends where its batch began. Spans go to ``OTLP_ENDPOINT``
(OTLP over HTTP) from a background thread; ``TRACE_SAMPLE_RATIO`` samples new traces, a
caller's sampled flag wins.

Off (the default), nothing of OpenTelemetry is imported or called on the request path:
every method returns a shared no-op.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

from .settings import Settings

logger = logging.getLogger(__name__)

_NOTHING = contextlib.nullcontext()


class Tracing:
    def __init__(self, settings: Settings, service_name: str = "cnn-serving") -> None:
        self.enabled = settings.tracing == "otlp"
        self._provider: Any = None
        if not self.enabled:
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.propagators.textmap import DefaultGetter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        sampler = ParentBased(TraceIdRatioBased(settings.trace_sample_ratio))
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}), sampler=sampler)
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
        self._tracer = self._provider.get_tracer("service")
        self._propagator = TraceContextTextMapPropagator()
        self._getter = DefaultGetter()
        # perf_counter (the batcher's clock) to the epoch nanoseconds spans are stamped in
        self._offset_ns = time.time_ns() - time.perf_counter_ns()
        logger.info("tracing: OTLP to %s, sampling %.0f%% of new traces", settings.otlp_endpoint,
                    100 * settings.trace_sample_ratio)  # fmt: skip

    def request(
        self, name: str, carrier: dict[str, str], attributes: dict[str, Any] | None = None
    ) -> contextlib.AbstractContextManager[Any]:
        """The request's span, current for the code inside; continues ``carrier``'s ``traceparent``."""
        if not self.enabled:
            return _NOTHING
        from opentelemetry.trace import SpanKind

        parent = self._propagator.extract(carrier, getter=self._getter)
        return self._tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)

    def stage(self, name: str) -> contextlib.AbstractContextManager[Any]:
        """A child span of the current one, for a stage run inline (decode, postprocess)."""
        return self._tracer.start_as_current_span(name) if self.enabled else _NOTHING

    def current(self) -> Any:
        """The current span's context, kept by the batcher for the batch's spans; None when off."""
        if not self.enabled:
            return None
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        return context if context.is_valid else None

    def batch(self, contexts: list[Any], enqueued: list[float], started: float, finished: float,
              attributes: dict[str, Any]) -> None:  # fmt: skip
        """Each request's ``queue`` span, and the batch's ``infer`` span linked to every request.

        ``contexts`` and ``enqueued`` (perf_counter) are per request, ``started`` and
        ``finished`` the ONNX Runtime call's.
        """
        traced = [c for c in contexts if c is not None]
        if not self.enabled or not traced:
            return
        from opentelemetry import trace
        from opentelemetry.trace import Link

        start = self._ns(started)
        for context, queued in zip(contexts, enqueued, strict=True):
            if context is not None:
                parent = trace.set_span_in_context(trace.NonRecordingSpan(context))
                self._tracer.start_span("queue", context=parent, start_time=self._ns(queued)).end(start)
        parent = trace.set_span_in_context(trace.NonRecordingSpan(traced[0]))
        span = self._tracer.start_span(
            "infer", context=parent, start_time=start, links=[Link(c) for c in traced],
            attributes={**attributes, "batch.requests": len(contexts)},
        )  # fmt: skip
        span.end(self._ns(finished))

    def _ns(self, perf_counter: float) -> int:
        return int(perf_counter * 1e9) + self._offset_ns

    def shutdown(self) -> None:
        """Send what is buffered."""
        if self._provider is not None:
            self._provider.shutdown()


def carrier(headers: Iterable[tuple[bytes, bytes]] | Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """The propagation headers of a request (``traceparent``, ``tracestate``) as a dict of strings."""
    found: dict[str, str] = {}
    for key, value in headers:
        name = key.decode("latin-1").lower() if isinstance(key, bytes) else key.lower()
        if name in ("traceparent", "tracestate"):
            found[name] = value.decode("latin-1") if isinstance(value, bytes) else value
    return found
