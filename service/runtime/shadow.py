"""Shadow traffic: a candidate answers a share of a primary's requests off the request path, compared live.

``SHADOW=PRIMARY:CANDIDATE:FRACTION`` (see ``settings.shadow_pair``). Once the primary has
answered, the request's already-decoded images are offered here (that fraction of the
requests); they wait in a bounded queue per pair (``SHADOW_QUEUE``: when full they are
dropped and counted, never waited for), and a task of the worker's event loop runs them
through the candidate's batcher only while neither model has live images queued: lower
priority than live batches, and nothing on the primary's path waits for it or can fail
because of it. Each image's answers are compared: top-1 agreement, top-5 overlap, largest
probability difference, and each side's latency, as ``cnn_shadow_*`` metrics and in
``GET /models``, with a verdict against the same agreement threshold as the export's
accuracy gate.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ServiceError
from ..metrics import Metrics, ShadowSkip
from ..settings import ShadowPair, ShadowTarget
from ..store.metadata import ModelMetadata
from .entry import ModelEntry
from .repository import Repository

logger = logging.getLogger(__name__)

MIN_TOP1_AGREEMENT = 0.99  # the export's gate (python -m export --min-agreement), unless the candidate records its own
IDLE_POLL_S = 0.002


@dataclass
class _Job:
    images: np.ndarray
    probabilities: np.ndarray  # the primary's
    seconds: float  # the primary's inference, queue included


@dataclass
class Lane:
    """One pair's queue, task and tallies (in this worker)."""

    pair: ShadowPair
    queue: asyncio.Queue[_Job]
    task: asyncio.Task[None] | None = None
    images: int = 0
    top1_agreements: int = 0
    top5_overlap: float = 0.0
    max_abs_diff: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    primary_seconds: float = 0.0
    candidate_seconds: float = 0.0
    threshold: float = MIN_TOP1_AGREEMENT
    listener: Callable[[Lane, int, int], None] | None = None  # told (images, top-1 agreements) of each comparison

    def describe(self) -> dict[str, Any]:
        agreement = self.top1_agreements / self.images if self.images else None
        if agreement is None:
            verdict = "no live images compared yet"
        else:
            agrees = "agrees" if agreement >= self.threshold else "does not agree"
            verdict = (f"the candidate {agrees} on {self.images} live images: top-1 agreement {agreement:.2%} "
                       f"(the gate: {self.threshold:.0%})")  # fmt: skip
        return {
            "primary": str(self.pair.primary), "candidate": str(self.pair.candidate), "fraction": self.pair.fraction,
            "images": self.images, "top1_agreement": agreement,
            "top5_overlap": self.top5_overlap / self.images if self.images else None,
            "max_abs_diff_probabilities": self.max_abs_diff, "dropped": self.skipped.get("dropped", 0),
            "skipped": {reason: n for reason, n in self.skipped.items() if reason != "dropped"},
            "mean_seconds": {"primary": self.primary_seconds / self.images if self.images else None,
                             "candidate": self.candidate_seconds / self.images if self.images else None},
            "agrees": None if agreement is None else agreement >= self.threshold, "verdict": verdict,
        }  # fmt: skip


def agreement_gate(meta: ModelMetadata) -> float | None:
    """The top-1 agreement a variant's export had to reach (``--min-agreement``), where it records one."""
    gate = (meta.accuracy or {}).get("thresholds", {}).get("min_top1_agreement")
    return float(gate) if gate is not None else None


def _matches(target: ShadowTarget, entry: ModelEntry) -> bool:
    return target.name == entry.name and (target.version is None or target.version == entry.version)


def top5_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, the share of a's five best classes that are among b's five best."""
    k = min(5, a.shape[1])
    best_a, best_b = np.argpartition(-a, k - 1, axis=1)[:, :k], np.argpartition(-b, k - 1, axis=1)[:, :k]
    return np.array([len(set(x) & set(y)) / k for x, y in zip(best_a.tolist(), best_b.tolist(), strict=True)])


class Shadow:
    def __init__(self, pairs: list[ShadowPair], repository: Repository, metrics: Metrics, queue_size: int) -> None:
        self.repository = repository
        self.metrics = metrics
        self.queue_size = queue_size
        self.lanes = [Lane(pair, asyncio.Queue(queue_size)) for pair in pairs]
        self.private: list[Lane] = []  # fed by offer_to only (a canary's agreement sample)
        for lane in self.lanes:
            metrics.seed_shadow(*self._labels(lane))

    def add_lane(self, pair: ShadowPair, listener: Callable[[Lane, int, int], None]) -> Lane:
        """A lane fed only through :meth:`offer_to`, that tells ``listener`` what each comparison found."""
        lane = Lane(pair, asyncio.Queue(self.queue_size), listener=listener)
        self.private.append(lane)
        return lane

    def offer(self, entry: ModelEntry, images: np.ndarray, probabilities: np.ndarray, seconds: float) -> None:
        """After the primary answered (on the event loop): queue the images for every pair it is the primary of."""
        for lane in self.lanes:
            if not _matches(lane.pair.primary, entry) or random.random() >= lane.pair.fraction:
                continue
            self.offer_to(lane, images, probabilities, seconds)

    def offer_to(self, lane: Lane, images: np.ndarray, probabilities: np.ndarray, seconds: float) -> None:
        """Queue ``images`` (answered by the lane's primary) for its candidate; dropped and counted when full."""
        if lane.queue.full():
            self._skip(lane, "dropped", len(images))
            return
        lane.queue.put_nowait(_Job(images, probabilities, seconds))
        if lane.task is None or lane.task.done():
            lane.task = asyncio.get_running_loop().create_task(self._serve(lane))

    def describe(self, name: str) -> list[dict[str, Any]]:
        return [lane.describe() for lane in self.lanes if lane.pair.primary.name == name]

    def involving(self, name: str) -> list[dict[str, Any]]:
        """The figures of every pair ``name`` is the primary or the candidate of."""
        return [lane.describe() for lane in self.lanes if name in (lane.pair.primary.name, lane.pair.candidate.name)]

    async def close(self) -> None:
        for lane in self.lanes + self.private:
            if lane.task is not None:
                lane.task.cancel()

    def _labels(self, lane: Lane) -> tuple[str, str]:
        return str(lane.pair.primary), str(lane.pair.candidate)

    def _skip(self, lane: Lane, reason: ShadowSkip, images: int) -> None:
        """Images not shadowed, and why: in /models and in ``cnn_shadow_skipped_images_total``."""
        lane.skipped[reason] = lane.skipped.get(reason, 0) + images
        self.metrics.child(self.metrics.shadow_skipped, *self._labels(lane), reason).inc(images)

    def _entries(self, pair: ShadowPair) -> list[ModelEntry]:
        """The versions the pair's two sides would be served by now (those that are)."""
        candidate = pair.candidate
        found = [
            self.repository.versions.get(candidate.name, {}).get(candidate.version)
            if candidate.version is not None
            else self.repository.serving(candidate.name),
            self.repository.serving(pair.primary.name),
        ]
        return [entry for entry in found if entry is not None]

    async def _idle(self, *entries: ModelEntry) -> None:
        """Until no live images wait for either model: shadow work goes after live work."""
        while any(e.batcher is not None and e.batcher.queued_images > 0 for e in entries):
            await asyncio.sleep(IDLE_POLL_S)

    async def _serve(self, lane: Lane) -> None:
        while not lane.queue.empty():
            job = lane.queue.get_nowait()
            try:
                await self._compare(lane, job)
            except ServiceError as exc:  # the candidate is not served (yet), or its queue is full
                self._skip(lane, "unavailable" if exc.status_code in (404, 503) else "refused", len(job.images))
            except Exception:
                logger.exception("shadow %s: the candidate failed", lane.pair)
                self._skip(lane, "error", len(job.images))

    async def _compare(self, lane: Lane, job: _Job) -> None:
        pair = lane.pair
        # wait for both models to fall idle before taking the candidate's lease: a lease held while waiting would keep
        # the candidate busy under load, so that nothing could evict, unload or drain it
        await self._idle(*self._entries(pair))
        with self.repository.lease(pair.candidate.name, pair.candidate.version) as candidate:
            assert candidate.model is not None and candidate.batcher is not None
            meta = candidate.model.metadata
            if meta.num_classes != job.probabilities.shape[1] or job.images.shape[1:] != (
                meta.input.size,
                meta.input.size,
                meta.input.channels,
            ):
                self._skip(lane, "incompatible", len(job.images))
                return
            gate = agreement_gate(meta)
            lane.threshold = gate if gate is not None else MIN_TOP1_AGREEMENT
            started = time.perf_counter()
            theirs = (await candidate.batcher.infer(job.images))[1]
            seconds = time.perf_counter() - started
        ours = job.probabilities
        agree = int((ours.argmax(axis=1) == theirs.argmax(axis=1)).sum())
        overlap = float(top5_overlap(ours, theirs).sum())
        diff = float(np.abs(ours - theirs).max(axis=1).max())
        count = len(job.images)
        lane.images += count
        lane.top1_agreements += agree
        lane.top5_overlap += overlap
        lane.max_abs_diff = max(lane.max_abs_diff, diff)
        lane.primary_seconds += job.seconds * count
        lane.candidate_seconds += seconds * count
        if lane.listener is not None:
            lane.listener(lane, count, agree)
        labels = self._labels(lane)
        m = self.metrics
        m.child(m.shadow_images, *labels).inc(count)
        m.child(m.shadow_top1_agreements, *labels).inc(agree)
        m.child(m.shadow_top5_overlap, *labels).inc(overlap)
        for row in np.abs(ours - theirs).max(axis=1).tolist():
            m.child(m.shadow_abs_diff, *labels).observe(row)
        m.child(m.shadow_seconds, *labels, "primary").observe(job.seconds)
        m.child(m.shadow_seconds, *labels, "candidate").observe(seconds)
