"""What every answer already knows about itself: how sure the model was, and whether to trust it.

The softmax is computed for every image anyway; from it, per image, the **top-1
probability** and the **normalised entropy** (the prediction's entropy over ``log(classes)``:
0 when one class has everything, 1 when every class is as likely). Both go to histograms per
model and version (``cnn_prediction_confidence``, ``cnn_prediction_entropy``), counted once
per image served whatever the front end. An image is **confident** when its top-1
probability reaches the model's abstain threshold (``abstain.threshold`` in its metadata,
derived by the export from held-out data) or the client's ``min_confidence``, and the image
is not atypical: where the export fitted a typicality check, the graph computes each image's
feature distance, and over the metadata's threshold the image is unlike the training images.
:func:`verdicts` decides both for every front end; :func:`typical` also counts
``cnn_atypical_images_total``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# top-1 probability: finer where a trained classifier's answers gather (near 1)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
ENTROPY_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def confidence_and_entropy(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``probabilities`` (N x classes): the top-1 probability and the normalised entropy."""
    top1 = probabilities.max(axis=1)
    classes = probabilities.shape[1]
    if classes < 2:
        return top1, np.zeros_like(top1)
    p = np.clip(probabilities, 1e-12, 1.0)
    entropy = -(probabilities * np.log(p)).sum(axis=1) / np.log(classes)
    return top1, np.clip(entropy, 0.0, 1.0)


def typical(distances: np.ndarray, threshold: float) -> np.ndarray:
    """Per image, whether its feature distance is within the typicality threshold (compared in float64, as the
    distance and the threshold are written in JSON)."""
    return np.asarray(distances, dtype=np.float64) <= threshold


@dataclass(frozen=True)
class Verdict:
    """Whether to trust one answer; None where the check does not apply (an answer then leaves it out)."""

    typical: bool | None = None
    confident: bool | None = None


def verdicts(
    top1: Sequence[float], distances: np.ndarray | None, min_confidence: float | None, threshold: float | None
) -> list[Verdict]:
    """Each image's verdict from its top-1 probability and its feature distance (None: the graph has none).

    ``typical`` where there is a distance and a typicality ``threshold``; ``confident`` where there is a
    ``min_confidence`` or a distance: the top-1 reaches ``min_confidence`` (if any) and the image is not atypical.
    """
    judged = typical(distances, threshold).tolist() if distances is not None and threshold is not None else None
    marks: list[bool | None] = judged if judged is not None else [None] * len(top1)
    if min_confidence is None and distances is None:
        return [Verdict(mark) for mark in marks]
    return [
        Verdict(mark, (min_confidence is None or score >= min_confidence) and mark is not False)
        for score, mark in zip(top1, marks, strict=True)
    ]


def confidence_bins(probabilities: np.ndarray) -> np.ndarray:
    """Per row, the index of the confidence bucket its top-1 probability falls in."""
    bins = np.searchsorted(np.array(CONFIDENCE_BUCKETS), probabilities.max(axis=1), side="left")
    return bins.clip(0, len(CONFIDENCE_BUCKETS) - 1)


def distributions(probabilities: np.ndarray) -> dict[str, list[float]]:
    """The share of images per confidence bin and per top-1 class: what a baseline records, what drift compares.

    Confidence bins are the histogram's buckets as intervals: [0, 0.1], (0.1, 0.2], ... (0.999, 1].
    """
    confidence = np.bincount(confidence_bins(probabilities), minlength=len(CONFIDENCE_BUCKETS)) / len(probabilities)
    classes = np.bincount(probabilities.argmax(axis=1), minlength=probabilities.shape[1]) / len(probabilities)
    return {"confidence": [round(float(x), 6) for x in confidence], "classes": [round(float(x), 6) for x in classes]}


def js_divergence(p: np.ndarray, q: np.ndarray, smoothing: float = 1e-4) -> float:
    """Jensen-Shannon divergence (base 2: 0 same, 1 disjoint) of two distributions over the same bins."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)  # counts or shares alike
    p = (p / p.sum() + smoothing) / (1 + smoothing * len(p))
    q = (q / q.sum() + smoothing) / (1 + smoothing * len(q))
    m = (p + q) / 2
    return float(0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q * np.log2(q / m)))


class Drift:
    """One version's answers against its baseline, over a sliding window of the latest ones (one worker's).

    The baseline is the export's (``baseline`` in the metadata), else learned from this
    version's first ``learn`` answers, else there is none and nothing is measured. Once the
    window is full, every tenth of a window the Jensen-Shannon divergence of the window's
    confidence bins and of its top-1 class mix against the baseline's is recomputed.
    """

    def __init__(self, baseline: dict | None, classes: int, window: int, learn: int) -> None:
        self.window = window
        self.learn = learn
        self.every = max(1, window // 10)
        self._confidence = np.zeros(window, dtype=np.int16)  # bin per answer, a ring
        self._classes = np.zeros(window, dtype=np.int32)
        self._seen = 0  # answers since the window started (or the baseline was learned)
        self._learning: list[np.ndarray] = []
        self.classes = classes
        self.base: dict[str, np.ndarray] | None = None
        self.source = "none"
        if baseline is not None and len(baseline.get("classes", ())) == classes:
            self.base = {kind: np.asarray(baseline[kind], dtype=np.float64) for kind in ("confidence", "classes")}
            self.source = f"export: {baseline.get('source', 'held-out images')} ({baseline.get('count', '?')} images)"
        elif learn > 0:
            self.source = f"learning from the first {learn} answers"
        self.values: dict[str, float] = {}  # kind -> divergence, once measured

    @property
    def filled(self) -> int:
        return min(self._seen, self.window)

    def add(self, probabilities: np.ndarray) -> bool:
        """Count a batch's answers; True when the divergences were just recomputed."""
        if self.base is None:
            if self.learn <= 0:
                return False
            self._learning.append(probabilities)
            learned = sum(len(p) for p in self._learning)
            if learned >= self.learn:
                rows = np.concatenate(self._learning)[: self.learn]
                self.base = {k: np.asarray(v, dtype=np.float64) for k, v in distributions(rows).items()}
                self.source, self._learning = f"learned from this version's first {self.learn} answers", []
            return False
        bins = confidence_bins(probabilities)
        top = probabilities.argmax(axis=1)
        before = self._seen
        for start in range(0, len(bins), self.window):  # a batch larger than the window keeps its last rows
            chunk = slice(start, start + self.window)
            at = (self._seen + np.arange(len(bins[chunk]))) % self.window
            self._confidence[at], self._classes[at] = bins[chunk], top[chunk]
            self._seen += len(bins[chunk])
        if self._seen < self.window or before // self.every == self._seen // self.every:
            return False
        self.values = {
            "confidence": js_divergence(np.bincount(self._confidence, minlength=len(CONFIDENCE_BUCKETS)),
                                        self.base["confidence"]),
            "classes": js_divergence(np.bincount(self._classes, minlength=self.classes), self.base["classes"]),
        }  # fmt: skip
        return True

    def describe(self) -> dict[str, object]:
        return {"baseline": self.source, "window": self.window, "answers_in_window": self.filled,
                "drift": {k: round(v, 4) for k, v in self.values.items()}}  # fmt: skip
