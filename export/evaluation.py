"""Accuracy with labels, measured on a graph as the service runs it: top-1, top-5, per class, confusion.

The figures a fine-tuned model (``export/finetune.py``) and its INT8 variant carry in their metadata as
``evaluation``, and that ``/models`` shows: measured by ONNX Runtime on the exported graph and the held-out
images decoded as the service decodes them, so that they are what ``/classify`` scores on those files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .baseline import probabilities_of
from .calibration import ImageSet


class AccuracyRefused(ValueError):
    """The model scores below the floor asked for; the message carries the figures."""


def figures(probabilities: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Top-1/top-5 accuracy (fractions), each class's top-1 accuracy and the confusion matrix (rows: the true
    class, columns: the answer)."""
    answers = probabilities.argmax(axis=1)
    k = min(5, len(classes))
    top_k = np.argsort(-probabilities, axis=1)[:, :k]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (labels, answers), 1)
    counts = confusion.sum(axis=1)
    return {
        "images": len(labels),
        "top1": round(float((answers == labels).mean()), 4),
        f"top{k}": round(float((top_k == labels[:, None]).any(axis=1).mean()), 4),
        "per_class": {
            name: {"images": int(n), "top1": round(float(confusion[i, i] / n), 4) if n else None}
            for i, (name, n) in enumerate(zip(classes, counts, strict=True))
        },
        "confusion": confusion.tolist(),
        # what always answering the largest class scores: a model no better than that has learnt nothing
        "majority_class_top1": round(float(counts.max() / counts.sum()), 4),
    }


def measure(graph: Path, images: ImageSet, classes: list[str]) -> dict[str, Any]:
    """:func:`figures` for ``graph`` on labelled ``images``, with what they were measured on."""
    assert images.labels is not None
    found = figures(probabilities_of(graph, images.images), images.labels, classes)
    return {**found, "measured_on": images.source, "measured_sha256": images.sha256, "by": "ONNX Runtime"}


def gate(found: dict[str, Any], floor: float | None, force: bool, name: str) -> dict[str, Any]:
    """``found`` with its floor and verdict; :class:`AccuracyRefused` below the floor unless ``force``. The
    default floor is the majority class's share."""
    if floor is None:  # the largest class's share: a model must beat it, not match it
        floor = found["majority_class_top1"]
        passed = found["top1"] > floor
    else:
        passed = found["top1"] >= floor
    worst = sorted((v["top1"], k) for k, v in found["per_class"].items() if v["top1"] is not None)[:3]
    summary = (f"held-out top-1 {100 * found['top1']:.2f}% on {found['images']} images (floor {100 * floor:.2f}%; "
               f"weakest classes: {', '.join(f'{k} {100 * v:.0f}%' for v, k in worst)})")  # fmt: skip
    if not passed and not force:
        raise AccuracyRefused(
            f"{name} refused: {summary}. Train longer (--epochs), unfreeze more (--unfreeze last|all), add images "
            "to the weak classes, or write it anyway with --force"
        )
    return {**found, "min_top1": floor, "passed": passed, "forced": not passed, "summary": summary}
