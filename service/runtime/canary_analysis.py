"""A canary's analysis: one window of its answers against the primary's, passed or failed, with the figures.

Four checks, each a setting (``CANARY_*``):

* **errors**: the candidate's share of server errors (5xx, not a client's 4xx) may exceed
  the primary's by at most ``CANARY_MAX_ERROR_INCREASE``;
* **latency**: its p50 and p99 (queue and inference, the model's own cost; decoding is the
  same for both) at most ``CANARY_MAX_LATENCY_RATIO`` times the primary's, plus
  ``CANARY_LATENCY_SLACK_MS``;
* **drift**: the Jensen-Shannon divergence between the two sides' top-1 confidence
  distributions (the bins of ``cnn_confidence``, as drift measures them) at most
  ``CANARY_MAX_DRIFT``;
* **agreement**: top-1 agreement with the primary on the canary's own requests, run
  through the primary off the request path; a window fails only when agreement is *shown*
  to be below the gate: the upper end of its 95% Wilson interval is. A window of 100
  answers with one or two disagreements does not fail a gate of 99%; one of 80% does.

The primary's side is its answers in the same window, under the same load (two models
sharing a CPU slow each other down: at a fraction of 0.5 both sides are slower than
either alone), where it gave at least a quarter of a window of them; otherwise (at a
fraction of 1 it answers nothing) its latest answers, up to :data:`REFERENCE`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..store.quality import CONFIDENCE_BUCKETS, confidence_bins, js_divergence

REFERENCE = 2000  # the primary's latest answers the canary is compared with
Z95 = 1.959964


def wilson_upper(successes: int, trials: int, z: float = Z95) -> float:
    """The upper end of the Wilson score interval of a proportion (1.0 with no trials)."""
    if trials == 0:
        return 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return min(1.0, (centre + spread) / denominator)


@dataclass
class Side:
    """One side's answers: their latencies, their top-1 confidence bins, and how many requests failed."""

    limit: int | None = None
    seconds: deque[float] = field(init=False)
    bins: deque[int] = field(init=False)
    outcomes: deque[bool] = field(init=False)  # True: a server error

    def __post_init__(self) -> None:
        self.seconds = deque(maxlen=self.limit)
        self.bins = deque(maxlen=self.limit)
        self.outcomes = deque(maxlen=self.limit)

    def answered(self, probabilities: np.ndarray, seconds: float) -> None:
        self.seconds.append(seconds)
        self.bins.extend(confidence_bins(probabilities).tolist())

    def finished(self, error: bool) -> None:
        self.outcomes.append(error)

    @property
    def requests(self) -> int:
        return len(self.outcomes)

    def error_rate(self) -> float:
        return sum(self.outcomes) / len(self.outcomes) if self.outcomes else 0.0

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(np.fromiter(self.seconds, float), q)) if self.seconds else None

    def histogram(self) -> np.ndarray:
        return np.bincount(np.fromiter(self.bins, int), minlength=len(CONFIDENCE_BUCKETS))


@dataclass(frozen=True)
class Thresholds:
    min_agreement: float
    max_error_increase: float
    max_latency_ratio: float
    latency_slack_s: float
    max_drift: float


@dataclass
class Window:
    """The answers of one analysis window: the candidate's own, the primary's latest, the comparisons."""

    size: int
    candidate: Side = field(default_factory=Side)
    reference: Side = field(default_factory=lambda: Side(REFERENCE))  # the primary's latest answers
    alongside: Side = field(default_factory=Side)  # the primary's answers in this window
    compared: int = 0
    agreed: int = 0
    routed: dict[str, int] = field(default_factory=lambda: {"primary": 0, "candidate": 0})

    @property
    def min_compared(self) -> int:
        return max(10, self.size // 4)

    def complete(self) -> bool:
        """Enough answers to judge: a window of them, and a quarter as many compared (or four windows without)."""
        answers = self.candidate.requests
        return answers >= self.size and (self.compared >= self.min_compared or answers >= 4 * self.size)

    def answered(self, side: str, probabilities: np.ndarray, seconds: float) -> None:
        for record in (self.candidate,) if side == "candidate" else (self.reference, self.alongside):
            record.answered(probabilities, seconds)

    def finished(self, side: str, error: bool) -> None:
        self.routed[side] += 1
        for record in (self.candidate,) if side == "candidate" else (self.reference, self.alongside):
            record.finished(error)

    @property
    def primary(self) -> Side:
        """What the candidate is compared with: the primary's answers in this window, else its latest."""
        return self.alongside if len(self.alongside.seconds) >= self.min_compared else self.reference

    def next(self) -> Window:
        """The following window: the candidate starts afresh, the primary's reference goes on."""
        return Window(self.size, reference=self.reference)

    def figures(self) -> dict[str, Any]:
        c, p = self.candidate, self.primary

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 3)

        drift = js_divergence(p.histogram(), c.histogram()) if c.bins and p.bins else None
        return {
            "requests": dict(self.routed),
            "primary_compared": "this window" if p is self.alongside else f"its latest {len(p.seconds)} answers",
            "answers": c.requests,
            "error_rate": {"candidate": round(c.error_rate(), 4), "primary": round(p.error_rate(), 4)},
            "p50_ms": {"candidate": ms(c.percentile(50)), "primary": ms(p.percentile(50))},
            "p99_ms": {"candidate": ms(c.percentile(99)), "primary": ms(p.percentile(99))},
            "confidence_drift": None if drift is None else round(drift, 4),
            "compared": self.compared,
            "top1_agreement": round(self.agreed / self.compared, 4) if self.compared else None,
            "agreement_upper_95": round(wilson_upper(self.agreed, self.compared), 4) if self.compared else None,
        }

    def judge(self, thresholds: Thresholds) -> tuple[bool, list[str], dict[str, Any]]:
        """(passed, why not, the figures): every check that has what it needs."""
        t, c, p = thresholds, self.candidate, self.primary
        figures = self.figures()
        failures = []
        if c.error_rate() > p.error_rate() + t.max_error_increase:
            failures.append(
                f"server errors {c.error_rate():.1%} against the primary's {p.error_rate():.1%} "
                f"(at most {t.max_error_increase:.1%} more)"
            )
        for q in (50, 99):
            mine, theirs = c.percentile(q), p.percentile(q)
            if mine is not None and theirs is not None and mine > theirs * t.max_latency_ratio + t.latency_slack_s:
                failures.append(
                    f"p{q} {mine * 1000:.2f} ms against the primary's {theirs * 1000:.2f} ms (at most "
                    f"{t.max_latency_ratio:g}x + {t.latency_slack_s * 1000:g} ms)"
                )
        drift = figures["confidence_drift"]
        if drift is not None and drift > t.max_drift:
            failures.append(f"confidence drift {drift:.3f} against the primary (at most {t.max_drift:g})")
        if self.compared >= self.min_compared and wilson_upper(self.agreed, self.compared) < t.min_agreement:
            failures.append(
                f"top-1 agreement {self.agreed}/{self.compared} ({self.agreed / self.compared:.1%}; at most "
                f"{wilson_upper(self.agreed, self.compared):.1%} at 95% confidence) below the gate "
                f"{t.min_agreement:.0%}"
            )
        return not failures, failures, figures
