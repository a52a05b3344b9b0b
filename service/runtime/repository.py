"""The models this process serves: which to load, their state, and how a request finds one."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Literal

from ..errors import InvalidInput, ModelNotFound, ModelNotReady
from ..metrics import Metrics
from ..settings import Settings
from ..store.layout import ModelStore, StoredVersion, is_valid_name
from .batching import BatchStats, DynamicBatcher
from .readiness import WorkerReadiness
from .session import LoadedModel, ModelLoadError, load_model

logger = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed"]


@dataclass
class ModelEntry:
    name: str
    version: int | None
    status: Status = "loading"
    reason: str | None = None
    model: LoadedModel | None = None
    batcher: DynamicBatcher | None = None
    stored: StoredVersion | None = None


class Repository:
    """Loads every requested model in a background thread; ready once each is warm or failed."""

    def __init__(self, settings: Settings, metrics: Metrics, readiness: WorkerReadiness | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.readiness = readiness
        self.store = ModelStore(settings.model_store)
        self.entries: dict[str, ModelEntry] = {}
        self._loaded = threading.Event()
        self._discover()

    def _discover(self) -> None:
        requested = self.settings.requested_models() or dict.fromkeys(self.store.names())
        if not requested:
            logger.error(
                "The model store %s holds no model: run `make export` (or `python -m export lenet5 --out %s`)",
                self.store.root.resolve(),
                self.store.root,
            )
        for name, version in requested.items():
            entry = ModelEntry(name, version)
            self.entries[name] = entry
            if not is_valid_name(name):
                entry.status, entry.reason = "failed", f"invalid model name {name!r}"
                continue
            versions = {v.version: v for v in self.store.versions(name)}
            wanted = version if version is not None else max(versions, default=None)
            if wanted is None or wanted not in versions:
                what = f"version {version} of {name!r}" if version else f"{name!r}"
                entry.status = "failed"
                entry.reason = f"{what} is not in the model store {self.store.root} (run `make export`)"
            else:
                entry.version, entry.stored = wanted, versions[wanted]
            self.metrics.model_ready.labels(model=name, version=str(entry.version or "")).set(0)

    def start(self) -> None:
        threading.Thread(target=self._load_all, name="model-loader", daemon=True).start()

    def _load_all(self) -> None:
        for entry in self.entries.values():
            if entry.stored is not None:
                self._load(entry, entry.stored)
        self._loaded.set()
        if self.readiness is not None and self.entries:
            self.readiness.mark_ready()

    def _load(self, entry: ModelEntry, stored: StoredVersion) -> None:
        try:
            model = load_model(self.store, stored, self.settings)
            model.warm_up(self.settings.warmup)
        except ModelLoadError as exc:
            entry.status, entry.reason = "failed", str(exc)
            logger.error("%s v%d: not served: %s", stored.name, stored.version, exc)
            return
        except Exception as exc:  # a failing warm-up run, say: that model is out, the others go on
            entry.status, entry.reason = "failed", f"{type(exc).__name__}: {exc}"
            logger.exception("%s v%d: not served", stored.name, stored.version)
            return
        entry.batcher = self._make_batcher(model)
        entry.model, entry.status = model, "ready"
        labels = {"model": model.name, "version": str(model.version)}
        self.metrics.model_ready.labels(**labels).set(1)
        self.metrics.model_info.labels(**labels, provider=model.provider).set(1)
        self.metrics.model_load_seconds.labels(**labels, phase="load").set(model.load_seconds)
        self.metrics.model_load_seconds.labels(**labels, phase="warmup").set(model.warmup_seconds)
        for protocol in ("http", "grpc"):  # at 0 from the start: an alert's rate() then sees the first shed request
            self.metrics.shed.labels(model=model.name, protocol=protocol)
        logger.info(
            "%s v%d: ready on %s (load %.2fs, warm-up %.2fs, %d instance(s) of %d threads)",
            model.name,
            model.version,
            model.provider,
            model.load_seconds,
            model.warmup_seconds,
            model.instances,
            model.threads,
        )

    def _make_batcher(self, model: LoadedModel) -> DynamicBatcher:
        labels = {"model": model.name, "version": str(model.version)}

        def on_batch(stats: BatchStats) -> None:
            self.metrics.batch_size.labels(**labels).observe(stats.size)
            self.metrics.batch_requests.labels(**labels).observe(stats.requests)
            self.metrics.observe_stage(labels, "inference", stats.inference_seconds)
            for seconds in stats.queue_seconds:
                self.metrics.observe_stage(labels, "queue", seconds)

        return DynamicBatcher(
            model.name,
            [model.runner(i) for i in range(model.instances)],
            max_batch_size=self.settings.max_batch_size,
            max_delay=self.settings.max_batch_delay_ms / 1000,
            max_queue_images=self.settings.max_queue_images,
            on_batch=on_batch,
        )

    @property
    def ready(self) -> bool:
        """This worker has loaded (or failed) every model, and so has every other worker."""
        loaded = self._loaded.is_set() and bool(self.entries)
        return loaded and (self.readiness is None or self.readiness.all_ready())

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    @property
    def default_model(self) -> str | None:
        if self.settings.default_model:
            return self.settings.default_model
        ready = [name for name, e in self.entries.items() if e.status == "ready"]
        if "resnet50" in ready:
            return "resnet50"
        return ready[0] if ready else next(iter(self.entries), None)

    def get(self, name: str | None, version: int | None = None) -> ModelEntry:
        """The ready entry for a request; 400/404/503 errors name what would be right."""
        available = ", ".join(sorted(self.entries)) or "none"
        if name == "":
            raise InvalidInput(f"Empty model name: use one of {available}, or leave model= out for the default")
        name = name if name is not None else self.default_model
        if not name:
            raise ModelNotFound("", sorted(self.entries))
        if not is_valid_name(name):
            raise InvalidInput(f"Invalid model name {name!r}: use one of {available}")
        entry = self.entries.get(name)
        if entry is None:
            raise ModelNotFound(name, sorted(self.entries))
        if version is not None and version != entry.version:
            raise ModelNotFound(name, [f"{name} version {entry.version}"], version)
        if entry.status == "loading":
            raise ModelNotReady(f"Model {name!r} is still loading; retry when /readyz answers 200")
        if entry.status == "failed" or entry.batcher is None:
            raise ModelNotReady(f"Model {name!r} is not available: {entry.reason}")
        return entry

    async def close(self) -> None:
        for entry in self.entries.values():
            if entry.batcher is not None:
                await entry.batcher.close()
