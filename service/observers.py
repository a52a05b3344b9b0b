"""What watches the runtime, attached to its hooks: the metrics of loads and batches, the answers' drift, and the
batch spans (``TRACING``).

The runtime calls its :class:`~service.runtime.hooks.Hooks` and knows nothing of these; the
composition root (:mod:`service.server`) attaches them once, before the first load.
"""

from __future__ import annotations

from .metrics import DRIFT_RELEASED, Metrics
from .runtime.batching import BatchStats
from .runtime.entry import ModelEntry
from .runtime.hooks import Hooks
from .settings import Settings
from .store.quality import Drift, typical
from .tracing import Tracing


def attach(hooks: Hooks, settings: Settings, metrics: Metrics, tracing: Tracing) -> None:
    """Subscribe the metrics, the drift and the batch spans to ``hooks``."""

    @hooks.ready.subscribe
    def ready(entry: ModelEntry, seconds: float) -> None:
        assert entry.model is not None
        meta = entry.model.metadata
        entry.drift = Drift(meta.baseline, meta.num_classes, settings.drift_window, settings.baseline_requests)
        labels = (entry.name, str(entry.version))
        metrics.child(metrics.resident_bytes, *labels).set(entry.resident_bytes)
        metrics.child(metrics.cold_start, entry.name).observe(seconds)
        metrics.seed_version(*labels)

    @hooks.released.subscribe
    def released(entry: ModelEntry) -> None:
        labels = (entry.name, str(entry.version))
        if entry.drift is not None and entry.drift.values:  # a multiprocess gauge cannot be removed: below any drift
            for kind in entry.drift.values:  # (not NaN: merged as the largest over workers, a NaN read first would
                metrics.child(metrics.drift, *labels, kind).set(DRIFT_RELEASED)  # hide another worker's drift)
            metrics.child(metrics.drift_window, *labels).set(0)
        metrics.child(metrics.resident_bytes, *labels).set(0)

    @hooks.changed.subscribe
    def changed(entry: ModelEntry, action: str, outcome: str, seconds: float | None) -> None:
        metrics.model_changes.labels(model=entry.name, action=action, outcome=outcome).inc()
        if seconds is not None:
            metrics.switch_seconds.labels(model=entry.name, phase=action).observe(seconds)

    @hooks.batch.subscribe
    def batch(entry: ModelEntry, stats: BatchStats) -> None:
        labels = {"model": entry.name, "version": str(entry.version)}
        metrics.child(metrics.batch_size, *labels.values()).observe(stats.size)
        metrics.child(metrics.batch_requests, *labels.values()).observe(stats.requests)
        if stats.shape > stats.size:
            metrics.child(metrics.batch_padding, *labels.values()).inc(stats.shape - stats.size)
        metrics.observe_stage(labels, "inference", stats.inference_seconds)
        for seconds in stats.queue_seconds:
            metrics.observe_stage(labels, "queue", seconds)
        model, drift = entry.model, entry.drift
        typical_below = model.metadata.typicality_threshold if model is not None else None
        if stats.distances is not None and typical_below is not None:
            atypical = int((~typical(stats.distances, typical_below)).sum())
            if atypical:
                metrics.child(metrics.atypical, *labels.values()).inc(atypical)
        if stats.probabilities is not None:
            metrics.observe_predictions(labels["model"], labels["version"], stats.probabilities)
            if drift is not None and drift.add(stats.probabilities):
                for kind, value in drift.values.items():
                    metrics.child(metrics.drift, *labels.values(), kind).set(value)
                metrics.child(metrics.drift_window, *labels.values()).set(drift.filled)
        traced = {"model": entry.name, "model.version": entry.version, "batch.size": stats.size}
        tracing.batch(stats.contexts, stats.enqueued, stats.started, stats.finished, traced)

    @hooks.out_of_memory.subscribe
    def out_of_memory(entry: ModelEntry, size: int, limit: int) -> None:
        metrics.child(metrics.device_oom, entry.name, str(entry.version)).inc()
