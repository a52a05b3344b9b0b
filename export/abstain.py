"""The abstain threshold of a model: the top-1 probability below which its answers are not to be trusted.

Derived from labelled held-out images run through the exported graph itself: sorted from
the most confident answer down, the threshold is the top-1 probability of the last image
of the longest such run whose accuracy is still at least ``target`` (99% by default). Above
it the model was right at least that often on images it never trained on; below it, a
client should ask a person, or another model. Only where labelled held-out images exist
(LeNet-5's digits); the service also takes a client's own ``min_confidence``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TARGET_ACCURACY = 0.99


def threshold(top1: np.ndarray, correct: np.ndarray, target: float = TARGET_ACCURACY) -> dict[str, Any]:
    """The threshold for ``target`` accuracy, from each held-out image's top-1 probability and rightness."""
    if len(top1) == 0:
        raise ValueError("no held-out images to derive an abstain threshold from")
    order = np.argsort(-top1, kind="stable")
    running = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    reached = np.nonzero(running >= target)[0]
    if len(reached) == 0:  # not even the surest answer reaches the target: trust none
        return {"threshold": 1.0, "target_accuracy": target, "accuracy_above": None, "coverage": 0.0,
                "held_out": len(top1), "accuracy": round(float(correct.mean()), 4)}  # fmt: skip
    kept = int(reached[-1]) + 1
    return {
        "threshold": round(float(top1[order[kept - 1]]), 6),
        "target_accuracy": target,
        "accuracy_above": round(float(running[kept - 1]), 4),
        "coverage": round(kept / len(top1), 4),
        "held_out": len(top1),
        "accuracy": round(float(correct.mean()), 4),
    }
