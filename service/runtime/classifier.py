"""The runtime as every front end sees it: lease a model, classify, explain, describe.

The front ends (HTTP, the Open Inference Protocol over REST and gRPC, the page) hold a
:class:`Classifier` and ask it; they do not read the repository's table, the residency or
the store. The request path: the residency strategy leases a version (on demand: once it
is resident), then decode, batch, infer, rank; what watches answers subscribes to the
``answered`` hook (the shadow).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..metrics import Metrics, RequestRecord
from ..settings import Settings
from ..store.layout import is_valid_name
from ..store.metadata import ModelMetadata
from ..store.preprocess import DecodeOffTheLoop, preprocess
from ..store.quality import Verdict, verdicts
from ..tracing import Tracing
from .batching import Outputs
from .cache import ResponseCache, cache_key
from .canary import Canaries, Leases, answering_canary
from .entry import ModelEntry
from .gradcam import GradCam
from .hooks import Hooks
from .occlusion import Occlusion, fill_pixel
from .repository import Repository
from .shadow import Shadow

# the metrics' stage names, and the spans' (TRACING=otlp)
SPANS = {"preprocess": "decode", "postprocess": "postprocess", "explain": "explain"}


def top_k(probabilities: np.ndarray, labels: list[str], k: int) -> list[dict[str, Any]]:
    """The k best classes of one row, best first."""
    k = min(k, probabilities.shape[0])
    best = np.argpartition(-probabilities, k - 1)[:k]
    best = best[np.argsort(-probabilities[best], kind="stable")]
    return [{"label": labels[i], "index": int(i), "score": float(probabilities[i])} for i in best]


@dataclass
class Answer:
    """One image's answer: its best classes, best first, and whether to trust them."""

    predictions: list[dict[str, Any]]
    verdict: Verdict


@dataclass
class Classified:
    """A request's answers, in order, and the threshold ``confident`` was judged by: the request's
    ``min_confidence``, else the model's abstain threshold, else none."""

    answers: list[Answer]
    min_confidence: float | None
    model: str  # the version that answered
    version: int
    canary: str | None = None  # the canary (PRIMARY:CANDIDATE) whose candidate answered instead of the primary


@dataclass
class Explained:
    """One image's explanation: the pixels the network saw, its probabilities, the class explained, the map."""

    pixels: np.ndarray  # uint8 [H, W, C]
    probabilities: np.ndarray  # [classes]
    index: int
    heat: np.ndarray  # [rows, columns] in [0, 1]
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # LeNet-5: what C1, S2, C3 and S4 see


class LeaseStrategy(Leases, Protocol):
    """How a request's model is made resident before its lease (:mod:`.residency`'s strategies)."""

    def describe(self, name: str) -> dict[str, Any] | None: ...


class Stage:
    """A stage run inline, timed into ``cnn_stage_seconds`` when it ends without an error (and a span when
    tracing). A class rather than a generator: entering it does not hand the request to ``contextlib``."""

    __slots__ = ("classifier", "entry", "name", "span", "started")

    def __init__(self, classifier: Classifier, entry: ModelEntry, name: str) -> None:
        self.classifier, self.entry, self.name = classifier, entry, name
        self.span = classifier.tracing.stage(SPANS[name])
        self.started = 0.0

    def __enter__(self) -> None:
        self.started = time.perf_counter()
        self.span.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.span.__exit__(*exc)
        if exc[0] is None:
            labels = {"model": self.entry.name, "version": str(self.entry.version)}
            self.classifier.metrics.observe_stage(labels, self.name, time.perf_counter() - self.started)


class Classifier:
    """The runtime as the front ends see it: :meth:`acquire` a version, :meth:`classify` or :meth:`explain`
    images with it, :meth:`describe` a model."""

    def __init__(
        self,
        repository: Repository,
        residency: LeaseStrategy,
        decoders: ThreadPoolExecutor,
        metrics: Metrics,
        tracing: Tracing,
        hooks: Hooks | None = None,
        shadow: Shadow | None = None,
        canaries: Canaries | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.repository = repository
        self.residency = residency
        self.settings: Settings = repository.settings
        self.metrics = metrics
        self.tracing = tracing
        self.hooks = hooks or repository.hooks
        self.decoders = decoders
        self.shadow = shadow
        self.canaries = canaries
        self.cache = cache  # RESPONSE_CACHE_MB: /classify's and the Open Inference Protocol's answers

    # -- what the front ends ask -----------------------------------------------------------

    async def acquire(
        self, name: str | None, version: int | None = None, routed: bool = False
    ) -> contextlib.AbstractContextManager[ModelEntry]:
        """The version for a request (the highest served unless ``version``), held until the ``with`` block it
        opens ends; on demand, loaded first. ``routed`` (an inference): a ``CANARY``'s candidate may answer a
        request for its primary that names no version. 400/404/503 errors say what would be right."""
        if routed and self.canaries is not None and version is None:
            canary = self.canaries.canary_for(name or self.repository.default_model)
            if canary is not None:
                return await self.canaries.acquire(canary, self.residency)
        return await self.residency.acquire(name, version)

    def entry(self, name: str | None, version: int | None = None) -> ModelEntry:
        """The version a request would get now, without holding it (readiness checks)."""
        return self.repository.get(name, version)

    def names(self) -> list[str]:
        return self.repository.names()

    @property
    def default_model(self) -> str | None:
        return self.repository.default_model

    @property
    def ready(self) -> bool:
        return self.repository.ready

    def served_versions(self, name: str) -> list[int]:
        """The versions of ``name`` that take requests now."""
        return sorted(v for v, e in list(self.repository.versions.get(name, {}).items()) if e.status == "ready")

    def explanation_graph(self, entry: ModelEntry) -> tuple[Path, dict[str, Any]] | None:
        """Where ``entry``'s explanation graph is and what its metadata says of it; None without one."""
        return self.repository.gradcams.graph_of(entry)

    def describe(self, name: str, per_class: bool = False) -> dict[str, Any]:
        """The model as a request without a version sees it, and every version this worker holds; with
        ``per_class``, its held-out accuracy per class and its confusion matrix too (``/models``)."""
        repository = self.repository
        entries = sorted(list(repository.versions.get(name, {}).values()), key=lambda e: e.version)
        entry = repository.serving(name) or (entries[-1] if entries else None)
        residency = self.residency.describe(name)
        status = entry.status if entry is not None else (residency["state"] if residency else "failed")
        info: dict[str, Any] = {
            "name": name,
            "version": entry.version if entry is not None else None,
            "versions": [v.version for v in repository.store.versions(name)] if is_valid_name(name) else [],
            "status": status,
            "reason": repository.problems.get(name) or (entry.reason if entry is not None else None),
            "served": [
                {"version": e.version, "status": e.status, "reason": e.reason, "in_flight": e.in_flight,
                 "since": datetime.fromtimestamp(e.since, UTC).isoformat(timespec="seconds"),
                 "files_problem": e.files_problem}
                for e in entries
            ],
        }  # fmt: skip
        if entry is not None and entry.model is not None:
            meta = entry.model.metadata
            info |= {
                "provider": entry.model.provider,
                "session_host": entry.model.session_host,
                "input": meta.input.model_dump(),
                "num_classes": meta.num_classes,
                "num_params": meta.num_params,
                "flops_per_image": meta.flops_per_image,
                "weights": meta.weights,
                "architecture": meta.architecture,
                "verification": meta.verification,
                "explanation": meta.explanation,
                "precision": meta.precision,
                "derived_from": meta.derived_from,
                "accuracy": meta.accuracy,
                "evaluation": _evaluation(getattr(meta, "evaluation", None), per_class),
                "forced": meta.forced,
                "load_seconds": round(entry.model.load_seconds, 3),
                "warmup_seconds": round(entry.model.warmup_seconds, 3),
                "max_batch_size": entry.batcher.max_batch_size if entry.batcher is not None else None,
                "batch_sizes": _shapes(entry),
                "cuda_graphs": entry.model.cuda_graphs,
                "quality": {
                    "abstain_threshold": meta.abstain_threshold,
                    "typicality_threshold": meta.typicality_threshold,
                    **(entry.drift.describe() if entry.drift else {}),
                },
            }
        if residency is not None:
            info["residency"] = residency
            if entry is None:  # not resident: what its latest version is, from the store
                info |= self._stored(name)
        if self.shadow is not None and (lanes := self.shadow.describe(name)):
            info["shadow"] = lanes
        if self.canaries is not None and (canary := self.canaries.describe(name)):
            info["canary"] = canary
        return info

    def _stored(self, name: str) -> dict[str, Any]:
        latest = self.repository.store.latest(name)
        try:
            meta = ModelMetadata.model_validate(latest.read_metadata()) if latest is not None else None
        except (OSError, ValueError):  # a broken version says so when a request loads it
            return {}
        if meta is None:
            return {}
        return {"input": meta.input.model_dump(), "num_classes": meta.num_classes, "num_params": meta.num_params,
                "architecture": meta.architecture, "weights": meta.weights, "precision": meta.precision}  # fmt: skip

    # -- the request path ------------------------------------------------------------------

    def stage(self, entry: ModelEntry, name: str) -> Stage:
        """Time a stage run inline into ``cnn_stage_seconds`` (and a span when tracing)."""
        return Stage(self, entry, name)

    async def preprocess(self, entry: ModelEntry, files: list[bytes]) -> np.ndarray:
        assert entry.model is not None
        spec, settings = entry.model.metadata.input, self.settings
        loop = asyncio.get_running_loop()
        decode = functools.partial(
            preprocess, spec=spec, max_pixels=settings.max_image_pixels, draft=settings.jpeg_draft
        )
        assert entry.batcher is not None
        with self.stage(entry, "preprocess"):
            if sum(len(data) for data in files) <= settings.inline_decode_bytes:
                # a small image decodes faster than two thread hops take (a 64x64 PNG: ~0.1 ms), unless a small file
                # holds a large one
                with contextlib.suppress(DecodeOffTheLoop):
                    return np.stack([decode(data, inline=True) for data in files])
            with entry.batcher.expect():  # a batch forming meanwhile waits for these images
                arrays = await asyncio.gather(*(loop.run_in_executor(self.decoders, decode, d) for d in files))
            return np.stack(arrays)

    async def infer(self, entry: ModelEntry, images: np.ndarray) -> Outputs:
        """``images`` through the model's batcher: (logits, probabilities[, distance]) of these images.

        What subscribes to the ``answered`` hook then gets them (the shadow offers them to a ``SHADOW``
        candidate, which runs them later, off this request's path).
        """
        assert entry.batcher is not None
        answered = self.hooks.answered
        if not answered.subscribers:
            return await entry.batcher.infer(images, self.tracing.current())
        started = time.perf_counter()
        outputs = await entry.batcher.infer(images, self.tracing.current())
        answered(entry, images, outputs[1], time.perf_counter() - started)
        return outputs

    async def classify(
        self,
        name: str | None,
        version: int | None,
        files: list[bytes] | Callable[[], Awaitable[list[bytes]]],
        k: int,
        min_confidence: float | None = None,
        record: RequestRecord | None = None,
    ) -> Classified:
        """``files`` (the encoded images, or how to read them) classified by model ``name`` (None: the default) at
        ``version`` (None: the one it serves), leased for as long as it takes. ``record`` (the request's metrics)
        learns who answers as soon as the lease is taken, and a reader is called after it: a request is refused
        for its model before its body is read, and an error in its body counts against the version it named.
        With ``RESPONSE_CACHE_MB``, an answer the cache holds is the answer (``record.cache`` says "hit"); a
        ``CANARY``'s candidate may answer (``Classified.canary`` says which canary)."""
        with await self.acquire(name, version, routed=True) as entry:
            if record is not None:
                record.model, record.version = entry.name, str(entry.version)
            images = files if isinstance(files, list) else await files()
            if self.cache is None:
                classified = await self.answer(entry, images, k, min_confidence)
            else:  # after the lease: a cached answer is never served for a version that is gone
                key = cache_key("", "classify", entry.name, entry.version, (k, min_confidence), images)
                compute = functools.partial(self.answer, entry, images, k, min_confidence)
                classified, hit = await self.cache.get_or_compute(key, entry, compute)
                if record is not None:
                    record.cache = "hit" if hit else "miss"
            if (canary := answering_canary()) is not None:  # a copy: the cache's answer is shared
                classified = dataclasses.replace(classified, canary=canary)
        if record is not None:
            record.images = len(classified.answers)
        return classified

    async def answer(
        self, entry: ModelEntry, files: list[bytes], k: int, min_confidence: float | None = None
    ) -> Classified:
        """Each image's ``k`` best classes by the leased ``entry``, and whether it is typical and confident
        (``quality.verdicts``) by ``min_confidence``, else by the model's abstain threshold."""
        assert entry.model is not None
        meta = entry.model.metadata
        images = await self.preprocess(entry, files)
        outputs = await self.infer(entry, images)
        least = min_confidence if min_confidence is not None else meta.abstain_threshold
        with self.stage(entry, "postprocess"):
            ranked = [top_k(row, entry.model.labels, k) for row in outputs[1]]
            distances = outputs[2] if len(outputs) > 2 else None
            # predictions[0] is the top-1 at any k
            judged = verdicts([p[0]["score"] for p in ranked], distances, least, meta.typicality_threshold)
        answers = [Answer(p, v) for p, v in zip(ranked, judged, strict=True)]
        return Classified(answers, least, entry.name, entry.version)

    async def gradcam(self, entry: ModelEntry, images: np.ndarray, index: int | None = None) -> tuple[GradCam, Outputs]:
        """``images`` through the version's explanation graph (opened at first use), for class ``index`` or
        each image's top-1: (probabilities, maps, feature maps...). No answers: not in the quality metrics."""
        graph = await self.repository.gradcams.get(entry)
        classes = np.full(len(images), -1 if index is None else index, dtype=np.int64)
        return graph, await graph.batcher.infer((images, classes), self.tracing.current(), observe=False)

    async def explain(
        self, entry: ModelEntry, files: list[bytes], index: int | None, method: str, occlusion: Occlusion
    ) -> tuple[list[Explained], dict[str, Any]]:
        """Each image's map for class ``index`` (its top-1 where None), and what the answer says of how.

        ``gradcam``: all images through the version's explanation graph (``runtime.gradcam``) at
        once. ``occlusion``: image after image, each with its occluded copies sent to the model's own
        batcher a batch's worth at a time, so that live requests interleave with them and a few
        concurrent explanations do not fill its queue. Neither counts in the quality metrics nor
        as shadow traffic.
        """
        assert entry.model is not None and entry.batcher is not None
        images = await self.preprocess(entry, files)
        if method == "gradcam":
            with self.stage(entry, "explain"):
                graph, (probabilities, maps, *seen) = await self.gradcam(entry, images, index)
            chosen = probabilities.argmax(1) if index is None else np.full(len(images), index)
            explained = [
                Explained(images[i], probabilities[i], int(chosen[i]), maps[i],
                          {name: layer[i] for name, layer in zip(graph.feature_maps, seen, strict=True)})
                for i in range(len(images))
            ]  # fmt: skip
            how: dict[str, Any] = {"layer": graph.layer}
            if graph.explained_by is not None:  # a variant: its FP32 parent's graph
                how["explained_by"] = graph.explained_by
            return explained, how
        fill, size = fill_pixel(entry.model.metadata.input), entry.model.metadata.input.size
        explained = []
        with self.stage(entry, "explain"):
            step = min(entry.batcher.max_batch_size, entry.batcher.max_queue_images)  # a part the queue can hold
            for image in images:
                copies = occlusion.images(image, fill)
                parts = [await entry.batcher.infer(copies[i : i + step], self.tracing.current(), False)
                         for i in range(0, len(copies), step)]  # fmt: skip
                row = np.concatenate([part[1] for part in parts])
                chosen = int(np.argmax(row[0])) if index is None else index
                explained.append(Explained(image, row[0], chosen, occlusion.heat(row, chosen, size)))
        return explained, {"layer": "input", "patch": occlusion.patch, "stride": occlusion.stride}


def _evaluation(found: dict[str, Any] | None, per_class: bool) -> dict[str, Any] | None:
    """A fine-tuned model's held-out accuracy; per class and the confusion matrix only when asked (a thousand
    classes make a large answer)."""
    if not found:
        return None
    return found if per_class else {k: v for k, v in found.items() if k not in ("per_class", "confusion")}


def _shapes(entry: ModelEntry) -> list[int] | None:
    """The batch shapes a version runs now: those within its largest batch (which an out-of-memory batch lowers)."""
    if entry.model is None or entry.model.batch_sizes is None:
        return None
    limit = entry.batcher.max_batch_size if entry.batcher is not None else max(entry.model.batch_sizes)
    return [size for size in entry.model.batch_sizes if size <= limit]
