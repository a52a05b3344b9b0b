"""The model versions this process serves, their states, and how a request finds one.

A model may serve several versions at once (its ``version_policy``); each
:class:`ModelEntry` is one version: ``loading`` → ``ready`` → ``draining`` → released, or
``failed``. A request goes to the highest ready version unless it names one, and holds a
lease on that version until it is answered, so a version being unloaded finishes the
requests it holds before its sessions are released. What to load and unload is decided
by :class:`~service.runtime.lifecycle.ModelControl`; this module only does it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..errors import InvalidInput, ModelNotFound, ModelNotReady, ModelUnloaded
from ..memory import resident_bytes
from ..settings import Settings
from ..store import preprocess
from ..store.integrity import Signature
from ..store.layout import ModelStore, StoredVersion, is_valid_name
from .batching import DynamicBatcher
from .entry import ModelEntry
from .gradcam import GradCams
from .hooks import Hooks
from .readiness import WorkerReadiness
from .session import LoadedModel, ModelLoadError, load_model

logger = logging.getLogger(__name__)


def settle_memory(release: bool = False) -> None:
    """Collect, then keep every object alive now out of later full collections (``gc.freeze``).

    A full collection walks every tracked object: with the service's modules, FastAPI's
    models and the loaded sessions that took 85 ms, a stop of every request in flight each
    time the young objects pile up (measured on LeNet-5 under load). Frozen, what was loaded
    is no longer walked. ``release``: unfreeze first, so what an unload let go is found.
    """
    if release:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


class Repository:
    """The table of the versions this worker serves, and who holds them: route, lease, release; load and unload
    when the lifecycle (or the residency, on demand) says so. What watches it subscribes to ``hooks``."""

    def __init__(
        self, settings: Settings, hooks: Hooks | None = None, readiness: WorkerReadiness | None = None
    ) -> None:
        self.settings = settings
        self.hooks = hooks or Hooks()
        self.readiness = readiness
        self.store = ModelStore(settings.model_store)
        self.versions: dict[str, dict[int, ModelEntry]] = {}
        self.gradcams = GradCams(self.store, settings)  # explanation graphs, opened on first use
        self.problems: dict[str, str] = {}  # models asked for that cannot be served at all, and why
        self.generation = 0  # of the declared state (MODEL_CONTROL=explicit) this worker has applied
        self.catalogue = settings.model_control == "on-demand"  # every model of the store is served (on request)
        self._lock = threading.Lock()  # between the event loop's leases and the lifecycle thread
        self._publishing = threading.Lock()  # see publish
        self._loaded = threading.Event()

    # -- what the front ends see ---------------------------------------------------------

    def names(self) -> list[str]:
        """Models with a version in this worker, or a reason why not (on demand: every model of the store); sorted."""
        catalogue = self.store.names() if self.catalogue else []
        return sorted({*self.versions, *self.problems, *catalogue})

    @property
    def ready(self) -> bool:
        """This worker has been through its first load, and so has every other worker."""
        loaded = self._loaded.is_set() and bool(self.names())
        return loaded and (self.readiness is None or self.readiness.all_ready())

    def mark_loaded(self) -> None:
        self._loaded.set()
        if self.readiness is not None and self.names():
            self.readiness.mark_ready()

    @property
    def default_model(self) -> str | None:
        if self.settings.default_model:
            return self.settings.default_model
        ready = [name for name in list(self.versions) if self.serving(name)]  # a copy: the lifecycle thread writes
        if "resnet50" in ready:
            return "resnet50"
        return ready[0] if ready else next(iter(self.names()), None)

    def serving(self, name: str) -> ModelEntry | None:
        """The version a request without a version goes to: the highest ready one."""
        ready = [e for e in list(self.versions.get(name, {}).values()) if e.status == "ready"]
        return max(ready, key=lambda e: e.version, default=None)

    def get(self, name: str | None, version: int | None = None) -> ModelEntry:
        """The ready version for a request; 400/404/503 errors name what would be right."""

        def available() -> str:  # read only for an error: on demand it lists the store
            return ", ".join(self.names()) or "none"

        if name == "":
            raise InvalidInput(f"Empty model name: use one of {available()}, or leave model= out for the default")
        name = name if name is not None else self.default_model
        if not name:
            raise ModelNotFound("", self.names())
        versions = self.versions.get(name)  # a name served is a valid one: checked only when it is not
        if not versions:
            if not is_valid_name(name):
                raise InvalidInput(f"Invalid model name {name!r}: use one of {available()}")
            if name in self.problems:
                raise ModelNotReady(f"Model {name!r} is not available: {self.problems[name]}")
            if self.settings.model_control == "explicit" and self.store.versions(name):
                raise ModelUnloaded(
                    f"Model {name!r} is not loaded: load it with POST /v2/repository/models/{name}/load; "
                    f"loaded: {available()}"
                )
            raise ModelNotFound(name, self.names())
        if version is None:
            entry = self.serving(name) or max(versions.values(), key=lambda e: e.version)
        else:
            entry = versions.get(version)  # type: ignore[assignment]
            if entry is None or entry.status == "draining":
                served = [f"{name} version {v}" for v, e in sorted(versions.items()) if e.status == "ready"]
                raise ModelNotFound(name, served, version)
        if entry.status == "loading":
            raise ModelNotReady(f"Model {name!r} version {entry.version} is still loading; retry in a few seconds")
        if entry.status != "ready" or entry.batcher is None:
            raise ModelNotReady(f"Model {name!r} version {entry.version} is not available: {entry.reason}")
        return entry

    def retire_if_idle(self, name: str) -> list[ModelEntry] | None:
        """Every ready version of ``name`` out of routing at once, if none holds a request; else None."""
        with self._lock:
            entries = [e for e in self.versions.get(name, {}).values() if e.status == "ready"]
            if not entries or any(e.in_flight for e in entries):
                return None
            for entry in entries:
                entry.status, entry.since = "draining", time.time()
        return entries

    def lease(self, name: str | None, version: int | None = None) -> contextlib.AbstractContextManager[ModelEntry]:
        """The version for a request, held (not released by an unload) until the request is answered: taken now,
        given back when the ``with`` block it opens ends."""
        with self._lock:
            entry = self.get(name, version)
            entry.in_flight += 1
        return self._held(entry)

    @contextlib.contextmanager
    def _held(self, entry: ModelEntry) -> Iterator[ModelEntry]:
        try:
            yield entry
        finally:
            with self._lock:
                entry.in_flight -= 1

    # -- what the lifecycle does ---------------------------------------------------------

    def failed(self, name: str, version: int) -> ModelEntry | None:
        entry = self.versions.get(name, {}).get(version)
        return entry if entry is not None and entry.status == "failed" else None

    def load(self, stored: StoredVersion, signature: Signature) -> ModelEntry:
        """Load and warm up one version beside those serving; it takes requests once warm."""
        entry = ModelEntry(stored.name, stored.version, signature=signature)
        with self._lock:
            self.versions.setdefault(stored.name, {})[stored.version] = entry
        self.publish()
        started, before = time.perf_counter(), resident_bytes()
        try:
            model = load_model(self.store, stored, self.settings)
            model.warm_up(self.settings.warmup(model.max_batch_size))
            preprocess.warm_up(model.metadata.input)
        except ModelLoadError as exc:
            return self.fail(entry, str(exc))
        except Exception as exc:  # a failing warm-up run, say: this version is out, the others go on
            logger.exception("%s v%d: warm-up failed", stored.name, stored.version)
            return self.fail(entry, f"{type(exc).__name__}: {exc}")
        entry.batcher, entry.model = self._make_batcher(entry, model), model
        seconds, entry.resident_bytes = time.perf_counter() - started, max(resident_bytes() - before, 0)
        try:
            self.hooks.ready(entry, seconds)
        except Exception as exc:  # a watcher that cannot watch it (a broken baseline, say): not served unwatched
            logger.exception("%s v%d: what watches it could not take it", stored.name, stored.version)
            entry.batcher.shutdown()
            entry.model = entry.batcher = None
            return self.fail(entry, f"{type(exc).__name__}: {exc}")
        with self._lock:
            entry.status, entry.since = "ready", time.time()
        self.hooks.changed(entry, "load", "success", seconds)
        logger.info(
            "%s v%d: ready on %s%s (load %.2fs, warm-up %.2fs, %d instance(s) of %d threads, batches of up to %d%s)",
            model.name, model.version, model.provider,
            f" in the session host (pid {model.session_host})" if model.session_host else "",
            model.load_seconds, model.warmup_seconds,
            model.instances, model.threads, model.max_batch_size,
            f" in shapes {list(model.batch_sizes)}" if model.batch_sizes else "",
        )  # fmt: skip
        self.publish()
        settle_memory()
        return entry

    def fail(self, entry: ModelEntry, reason: str) -> ModelEntry:
        """Record a version that cannot be served; it never replaces one that serves: that one keeps serving what
        was verified at its load, and reports its files' problem instead (:meth:`report_files`)."""
        with self._lock:
            current = self.versions.get(entry.name, {}).get(entry.version)
            if current is not None and current is not entry and current.status in ("ready", "draining"):
                serving = current
            else:
                serving = None
                self.versions.setdefault(entry.name, {})[entry.version] = entry
                entry.status, entry.reason, entry.since = "failed", reason, time.time()
        if serving is not None:
            self.report_files(serving, reason)
            return serving
        self.hooks.changed(entry, "load", "failure", None)
        logger.error("%s v%d: not served: %s", entry.name, entry.version, reason)
        self.publish()
        return entry

    def report_files(self, entry: ModelEntry, problem: str | None) -> None:
        """A served version's files on disk no longer match what it loaded (``problem``), or match again (None)."""
        if entry.files_problem == problem:
            return
        entry.files_problem = problem
        if problem is None:
            logger.info("%s v%d: its files match what it loaded again", entry.name, entry.version)
        else:
            logger.error("%s v%d: its files changed on disk (%s); it keeps serving what it loaded and verified",
                         entry.name, entry.version, problem)  # fmt: skip
        self.publish()

    def unload(self, entry: ModelEntry) -> None:
        """Take the version out of routing, let it finish the requests it holds, then release it."""
        with self._lock:
            entry.status, entry.since = "draining", time.time()
        self.publish()
        started = time.perf_counter()
        deadline = time.monotonic() + self.settings.request_timeout_s
        while entry.in_flight and time.monotonic() < deadline:
            time.sleep(0.005)
        outcome = "success"
        if entry.in_flight:
            outcome = "failure"
            logger.warning("%s v%d: %d requests still running after REQUEST_TIMEOUT_S; cut off",
                           entry.name, entry.version, entry.in_flight)  # fmt: skip
        if entry.batcher is not None:
            try:
                entry.batcher.shutdown()
            except Exception:  # a batcher that does not stop in time: the version is released all the same
                outcome = "failure"
                logger.exception("%s v%d: its batcher did not shut down cleanly", entry.name, entry.version)
        self.forget(entry)
        self.gradcams.release(entry)
        self.hooks.released(entry)
        entry.model = entry.batcher = None
        settle_memory(release=True)  # the sessions' memory goes back now, not at the next collection
        self.hooks.changed(entry, "unload", outcome, time.perf_counter() - started)
        logger.info("%s v%d: unloaded (drained in %.3fs)", entry.name, entry.version, time.perf_counter() - started)

    def forget(self, entry: ModelEntry) -> None:
        with self._lock:
            versions = self.versions.get(entry.name, {})
            if versions.get(entry.version) is entry:
                del versions[entry.version]
            if not versions:
                self.versions.pop(entry.name, None)
        self.publish()

    def state(self) -> dict[str, Any]:
        """What this worker serves, by model and version, and the declared generation it applied."""
        models: dict[str, dict[str, Any]] = {
            name: {str(v): e.state() for v, e in sorted(versions.items())} for name, versions in self.versions.items()
        }
        for name, reason in self.problems.items():
            models.setdefault(name, {})[""] = {"status": "failed", "reason": reason}
        return {"generation": self.generation, "models": models}

    def publish(self) -> None:
        """Tell the other workers (and ``/metrics``) what this worker serves: the state read while no thread changes
        the versions, and read and written under one lock, so that of two threads publishing, the state written
        last is the one read last."""
        if self.readiness is not None:
            with self._publishing:
                with self._lock:  # never held where publish is called
                    state = self.state()
                self.readiness.publish(state)

    def set_problems(self, problems: dict[str, str]) -> None:
        """The models asked for that cannot be served as asked, and why (the lifecycle's last plan); each new one
        logged once."""
        for name, reason in problems.items():
            if self.problems.get(name) != reason:
                logger.error("%s: %s", name, reason)
        self.problems = problems

    def applied(self, generation: int) -> None:
        """This worker has applied the declared state's ``generation``: tell the others."""
        self.generation = generation
        self.publish()

    def _make_batcher(self, entry: ModelEntry, model: LoadedModel) -> DynamicBatcher:
        hooks = self.hooks
        return DynamicBatcher(
            model.name,
            [model.runner(i) for i in range(model.instances)],
            max_batch_size=model.max_batch_size,
            max_delay=self.settings.max_batch_delay_ms / 1000,
            max_queue_images=self.settings.max_queue_images,
            on_batch=functools.partial(hooks.batch, entry),
            on_out_of_memory=lambda size, limit: hooks.out_of_memory(entry, size, limit),
            batch_sizes=model.batch_sizes,
        )

    async def close(self) -> None:
        for versions in list(self.versions.values()):
            for entry in list(versions.values()):
                if entry.batcher is not None:
                    await entry.batcher.close()
        for graph in list(self.gradcams.loaded.values()):
            await graph.batcher.close()
