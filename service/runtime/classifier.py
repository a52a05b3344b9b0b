"""The request path shared by every front end: decode, batch, infer, rank."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .batching import Outputs
from .gradcam import GradCam
from .occlusion import Occlusion, fill_pixel
from .preprocess import preprocess
from .quality import Verdict, verdicts
from .repository import ModelEntry, Repository
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


@dataclass
class Explained:
    """One image's explanation: the pixels the network saw, its probabilities, the class explained, the map."""

    pixels: np.ndarray  # uint8 [H, W, C]
    probabilities: np.ndarray  # [classes]
    index: int
    heat: np.ndarray  # [rows, columns] in [0, 1]
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # LeNet-5: what C1, S2, C3 and S4 see


class Classifier:
    """The request path, shared by every front end: decode, batch, infer, rank."""

    def __init__(self, repository: Repository, decoders: ThreadPoolExecutor) -> None:
        self.repository = repository
        self.settings = repository.settings
        self.metrics = repository.metrics
        self.tracing = repository.tracing
        self.decoders = decoders
        pairs = self.settings.shadow_pairs()
        self.shadow = Shadow(pairs, repository, self.metrics, self.settings.shadow_queue) if pairs else None

    @contextlib.contextmanager
    def stage(self, entry: ModelEntry, name: str) -> Iterator[None]:
        """Time a stage run inline into ``cnn_stage_seconds`` (and a span when tracing)."""
        started = time.perf_counter()
        with self.tracing.stage(SPANS[name]):
            yield
        labels = {"model": entry.name, "version": str(entry.version)}
        self.metrics.observe_stage(labels, name, time.perf_counter() - started)

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
                # a small image decodes faster than two thread hops take (a 64x64 PNG: ~0.1 ms)
                return np.stack([decode(data) for data in files])
            with entry.batcher.expect():  # a batch forming meanwhile waits for these images
                arrays = await asyncio.gather(*(loop.run_in_executor(self.decoders, decode, d) for d in files))
            return np.stack(arrays)

    async def infer(self, entry: ModelEntry, images: np.ndarray) -> Outputs:
        """``images`` through the model's batcher: (logits, probabilities[, distance]) of these images.

        Where the model is a ``SHADOW`` primary, the images are then offered to its candidate,
        which runs them later, off this request's path.
        """
        assert entry.batcher is not None
        if self.shadow is None:
            return await entry.batcher.infer(images, self.tracing.current())
        started = time.perf_counter()
        outputs = await entry.batcher.infer(images, self.tracing.current())
        self.shadow.offer(entry, images, outputs[1], time.perf_counter() - started)
        return outputs

    async def classify(
        self, entry: ModelEntry, files: list[bytes], k: int, min_confidence: float | None = None
    ) -> Classified:
        """Each image's ``k`` best classes, and whether it is typical and confident (``quality.verdicts``)
        by ``min_confidence``, else by the model's abstain threshold."""
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
        return Classified([Answer(p, v) for p, v in zip(ranked, judged, strict=True)], least)

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
            step = entry.batcher.max_batch_size
            for image in images:
                copies = occlusion.images(image, fill)
                parts = [await entry.batcher.infer(copies[i : i + step], self.tracing.current(), False)
                         for i in range(0, len(copies), step)]  # fmt: skip
                row = np.concatenate([part[1] for part in parts])
                chosen = int(np.argmax(row[0])) if index is None else index
                explained.append(Explained(image, row[0], chosen, occlusion.heat(row, chosen, size)))
        return explained, {"layer": "input", "patch": occlusion.patch, "stride": occlusion.stride}
