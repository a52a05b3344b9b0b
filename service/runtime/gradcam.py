"""Grad-CAM from a model's explanation graph, loaded on the first explanation asked of it.

The export writes ``explain.onnx`` beside each FP32 graph and verifies it against PyTorch's
autograd (``export/explanation.py``); an INT8 or FP16 variant is explained by its FP32
parent's (the metadata's ``explanation.from``), and every answer says so. The graph holds the
whole network again (a VGG's weights twice), so it is opened only when a model is first
asked for a Grad-CAM, once per version and worker however many requests ask at once, and
released with the version. Its requests share batches with each other through a batcher of
their own; the images go in with one class index each (negative: the top-1).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidInput, ModelNotReady, Stranded
from ..store.tensors import CLASSES_NAME, INPUT_NAME
from ..store.tensors import EXPLANATION_OUTPUT_NAMES as OUTPUT_NAMES
from .batching import DynamicBatcher
from .cuda import providers_for
from .session import session_options
from .session_host import open_session

if TYPE_CHECKING:
    from ..settings import Settings
    from ..store.layout import ModelStore
    from .entry import ModelEntry

logger = logging.getLogger(__name__)


@dataclass
class GradCam:
    """One version's explanation graph and its batcher."""

    path: Path
    layer: str
    explained_by: dict[str, Any] | None  # the FP32 parent, for a variant
    batcher: DynamicBatcher
    load_seconds: float
    feature_maps: tuple[str, ...] = ()  # LeNet-5's graph also outputs what each layer sees (C1, S2, C3, S4)


@dataclass
class GradCams:
    """The loaded explanation graphs of a worker, by (model, version), loaded once each."""

    store: ModelStore
    settings: Settings
    loaded: dict[tuple[str, int], GradCam] = field(default_factory=dict)
    _loading: dict[tuple[str, int], asyncio.Future[GradCam]] = field(default_factory=dict)  # loads under way
    _guard: threading.Lock = field(default_factory=threading.Lock)  # the two dicts, against release's thread
    # called (in a worker thread) before a graph opens: MODEL_CONTROL=on-demand makes room for it and counts it,
    # and returns what takes the count back should the graph fail to open
    before_load: Callable[[ModelEntry, Path], Callable[[], None] | None] | None = None

    def graph_of(self, entry: ModelEntry) -> tuple[Path, dict[str, Any]] | None:
        """Where ``entry``'s explanation graph is and what its metadata says of it; None without one."""
        assert entry.model is not None
        info = entry.model.metadata.explanation
        if not info:
            return None
        parent = info.get("from")
        store = self.store
        directory = (
            store.model_dir(parent["model"]) / str(parent["version"]) if parent else entry.model.stored.directory
        )
        path = directory / str(info["file"])
        return (path, info) if path.is_file() else None

    async def get(self, entry: ModelEntry) -> GradCam:
        """The version's loaded graph, loading it now (one load however many ask)."""
        key = (entry.name, entry.version)
        if key in self.loaded:
            return self.loaded[key]
        found = self.graph_of(entry)
        if found is None:
            raise InvalidInput(
                f"{entry.name} v{entry.version} has no explanation graph (exported before explanations, or its "
                "explain.onnx is missing): use method=occlusion, which explains any model through its own graph"
            )
        with self._guard:
            loading = self._loading.get(key)
            # the first to ask begins the load, the others wait for it; one cancelled before it began (its event loop
            # ended: a test's asyncio.run) never took its own entry back
            if loading is None or loading.cancelled() or loading.get_loop() is not asyncio.get_running_loop():
                loading = self._loading[key] = asyncio.ensure_future(self._load_and_keep(key, entry, *found))
        return await asyncio.shield(loading)  # a requester that goes away leaves the load to those after it

    async def _load_and_keep(
        self, key: tuple[str, int], entry: ModelEntry, path: Path, info: dict[str, Any]
    ) -> GradCam:
        """The load every requester of ``key`` awaits: its graph kept before any of them resumes, unless its version
        was released meanwhile (then closed, and they get Stranded); after a failure the next request tries again."""
        this = asyncio.current_task()
        try:
            graph = await asyncio.to_thread(self._load, entry, path, info)
        except BaseException:
            with self._guard:
                if self._loading.get(key) is this:
                    del self._loading[key]
            raise
        with self._guard:  # release() runs on the lifecycle's or the residency's thread
            current = self._loading.get(key) is this
            if current:
                del self._loading[key]
                self.loaded[key] = graph
        if not current:
            graph.batcher.shutdown()
            raise Stranded(f"{entry.name} v{entry.version} was unloaded while its explanation graph loaded; send "
                           "the request again")  # fmt: skip
        return graph

    def _load(self, entry: ModelEntry, path: Path, info: dict[str, Any]) -> GradCam:
        uncount = self.before_load(entry, path) if self.before_load is not None else None
        try:
            return self._open(entry, path, info)
        except BaseException:
            if uncount is not None:
                uncount()
            raise

    def _open(self, entry: ModelEntry, path: Path, info: dict[str, Any]) -> GradCam:
        settings = self.settings
        started = time.perf_counter()
        try:  # the server's files, not the request, are wrong: 503 with the reason, as a model that fails to load
            session = open_session(path, session_options(settings), providers_for(settings, "fp32"))
        except Exception as exc:  # ORT raises its own types
            raise ModelNotReady(f"Cannot load the explanation graph {path}: {exc}") from None

        names = [output.name for output in session.get_outputs()]
        if names[:2] != list(OUTPUT_NAMES):
            raise ModelNotReady(f"{path} is no explanation graph: its outputs are {names}, not {OUTPUT_NAMES} first")

        def run(inputs: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
            return tuple(session.run(names, {INPUT_NAME: inputs[0], CLASSES_NAME: inputs[1]}))

        assert entry.model is not None  # graph_of found its explanation graph in its metadata
        limit = entry.model.max_batch_size
        batcher = DynamicBatcher(
            f"{entry.name}-explain",
            [run],
            max_batch_size=limit,
            max_delay=settings.max_batch_delay_ms / 1000,
            max_queue_images=settings.max_queue_images,
            batch_sizes=settings.batch_shapes(session.get_providers()[0], limit),  # few shapes, if not warmed
        )
        seconds = time.perf_counter() - started
        logger.info("%s v%d: explanation graph %s loaded in %.2fs", entry.name, entry.version, path, seconds)
        return GradCam(path, str(info["layer"]), info.get("from"), batcher, seconds, tuple(names[2:]))

    def release(self, entry: ModelEntry) -> None:
        """Drop the version's graph, if loaded (its requests have drained with the version's)."""
        key = (entry.name, entry.version)
        with self._guard:
            found = self.loaded.pop(key, None)
            self._loading.pop(key, None)
        if found is not None:
            try:
                found.batcher.shutdown()
            except Exception:  # released all the same: its session goes with the reference
                logger.exception("%s v%d: the explanation graph's batcher did not shut down cleanly", *key)
