"""The service's own Prometheus metrics, next to BentoML's built-in ones on ``/metrics``.

Created through ``bentoml.metrics``, which defers to ``prometheus_client`` once BentoML
has configured multiprocess collection, so every worker's samples are exported.
Labels stay low-cardinality: model, version, protocol, outcome.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import bentoml

# 1 ms to 10 s, roughly x2 per bucket: CNN inference on a CPU or a GPU
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        model = ["model", "version"]
        self.batch_size = bentoml.metrics.Histogram(
            name="cnn_batch_size",
            documentation="Images per ONNX Runtime call",
            labelnames=model,
            buckets=BATCH_BUCKETS,
        )
        self.batch_requests = bentoml.metrics.Histogram(
            name="cnn_batch_requests",
            documentation="Requests whose images shared one ONNX Runtime call",
            labelnames=model,
            buckets=BATCH_BUCKETS,
        )
        self.stage_seconds = bentoml.metrics.Histogram(
            name="cnn_stage_seconds",
            documentation="Time per stage: preprocess, queue, inference, postprocess",
            labelnames=[*model, "stage"],
            buckets=LATENCY_BUCKETS,
        )
        self.request_seconds = bentoml.metrics.Histogram(
            name="cnn_request_seconds",
            documentation="End-to-end classification request latency",
            labelnames=[*model, "protocol"],
            buckets=LATENCY_BUCKETS,
        )
        self.requests = bentoml.metrics.Counter(
            name="cnn_requests_total",
            documentation="Classification requests by outcome (2xx, 4xx, 5xx)",
            labelnames=[*model, "protocol", "outcome"],
        )
        self.images = bentoml.metrics.Counter(
            name="cnn_images_total",
            documentation="Images classified successfully",
            labelnames=[*model, "protocol"],
        )

    def observe_stage(self, labels: dict[str, Any], stage: str, seconds: float) -> None:
        self.stage_seconds.labels(**labels, stage=stage).observe(seconds)


@cache
def get_metrics() -> Metrics:
    return Metrics()
