"""A canary's analysis: one window of its answers against the primary's, passed or failed, with the figures.

Four checks, each a setting (``CANARY_*``):

* **errors**: the candidate's share of server errors (5xx, not a client's 4xx; the low end
  of its 99% Wilson interval) may exceed the primary's by at most
  ``CANARY_MAX_ERROR_INCREASE``;
* **latency**: its p50 and p99 (queue and inference, the model's own cost; decoding is the
  same for both) at most ``CANARY_MAX_LATENCY_RATIO`` times the primary's, plus
  ``CANARY_LATENCY_SLACK_MS`` (p50 over 20 answers or more per side, p99 over 100 or more);
  a window fails only where more than half (p50) or 1% (p99) of the candidate's answers
  are slower than that at 99% confidence (the low end of the Wilson interval): in a
  window of 100, two answers slowed by a pause of the host make its p99, not a slower
  candidate, while five do fail it;
* **drift**: the Jensen-Shannon divergence between the two sides' top-1 confidence
  distributions (the bins of ``cnn_confidence``, as drift measures them) at most
  ``CANARY_MAX_DRIFT`` (over 50 images or more per side), or at most what samples of these
  sizes reach by chance 99 times in 100 (a permutation test, :func:`drift_noise`), whichever
  is higher;
* **agreement**: top-1 agreement with the primary on the canary's own requests, run
  through the primary off the request path; a window fails only when agreement is *shown*
  to be below the gate: the upper end of its 99% exact (Clopper-Pearson) interval is. A
  window of 100 answers with three disagreements does not fail a gate of 99%; one of 90%
  does, and one disagreement among ten comparisons does not.

The primary's side is its answers in the same window, under the same load (two models
sharing a CPU slow each other down: at a fraction of 0.5 both sides are slower than
either alone), where it gave at least a quarter of a window of them; otherwise (at a
fraction of 1 it answers nothing) its latest answers, up to :data:`REFERENCE`. A window
that passes without a quarter of its answers compared is inconclusive: it rolls nothing
back and steps nothing up.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..store.quality import CONFIDENCE_BUCKETS, confidence_bins, js_divergence

REFERENCE = 2000  # the primary's latest answers the canary is compared with
Z99 = 2.575829  # each worker judges many windows: one spurious failure rolls a good candidate back
MIN_P50, MIN_P99, MIN_BINS = 20, 100, 50  # answers a percentile, images a confidence distribution, needs per side


def wilson(successes: int, trials: int, z: float = Z99) -> tuple[float, float]:
    """The Wilson score interval of a proportion, (0, 1) with no trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, (centre - spread) / denominator), min(1.0, (centre + spread) / denominator)


@functools.lru_cache(maxsize=256)  # a window's figures are read on every /models call while it fills
def exact_upper(successes: int, trials: int, tail: float = 0.005) -> float:
    """The upper end of the Clopper-Pearson (exact binomial) 99% interval of a proportion: the ``u`` at which
    ``successes`` or fewer of ``trials`` has probability ``tail``. Near 1 with few trials Wilson's end is too
    low (one disagreement in ten would show agreement below 99% for a candidate that agrees 99% of the time in
    one window of ten); the exact end is below a gate for at most ``tail`` of such windows, whatever the count."""
    if trials == 0 or successes >= trials:
        return 1.0
    k, n = successes, trials
    # the shorter of the two tails, its log binomial coefficients once: each bisection step is one vector sum
    upper_tail = n - k < k + 1
    counts = np.arange(k + 1, n + 1) if upper_tail else np.arange(0, k + 1)
    log_choose = math.lgamma(n + 1) - _lgamma(counts + 1) - _lgamma(n - counts + 1)
    low, high = k / n, 1.0
    for _ in range(60):  # bisection: P(X <= k) falls as u rises
        middle = (low + high) / 2
        logs = log_choose + counts * math.log(middle) + (n - counts) * math.log1p(-middle)
        top = logs.max()
        mass = math.exp(top) * float(np.exp(logs - top).sum())
        at_most_k = 1.0 - mass if upper_tail else mass
        if at_most_k > tail:
            low = middle
        else:
            high = middle
    return high


_lgamma = np.vectorize(math.lgamma, otypes=[float])


DRIFT_PERMUTATIONS = 200


def drift_noise(primary: np.ndarray, candidate: np.ndarray, permutations: int = DRIFT_PERMUTATIONS) -> float:
    """The divergence two samples of these sizes reach by chance alone, 99 times in 100: the 99th percentile of
    the divergence between random splits of the two sides' confidence bins pooled (a permutation test). Two
    samples of 50 from one spread-out distribution exceed 0.1 four times in ten."""
    pooled = np.concatenate([primary, candidate])
    rng = np.random.default_rng(0)  # the same window judged twice is judged alike
    buckets = len(CONFIDENCE_BUCKETS)
    found = []
    for _ in range(permutations):
        order = rng.permutation(pooled)
        first, second = order[: len(primary)], order[len(primary) :]
        found.append(js_divergence(np.bincount(first, minlength=buckets), np.bincount(second, minlength=buckets)))
    return float(np.quantile(found, 0.99))


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

    def percentile(self, q: float, least: int = 1) -> float | None:
        """The ``q``-th percentile of the latencies, where there are at least ``least`` of them."""
        return float(np.percentile(np.fromiter(self.seconds, float), q)) if len(self.seconds) >= least else None

    @property
    def errors(self) -> int:
        return sum(self.outcomes)

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
        """Enough answers to judge: a window of them, and a quarter as many compared (or four windows without:
        then judged, but a pass without that evidence is inconclusive, see :meth:`judge`)."""
        answers = self.candidate.requests
        return answers >= self.size and (self.compared >= self.min_compared or answers >= 4 * self.size)

    @property
    def conclusive(self) -> bool:
        """Whether a pass may step the canary up: enough comparisons for agreement to have been shown."""
        return self.compared >= self.min_compared

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

        enough = len(c.bins) >= MIN_BINS and len(p.bins) >= MIN_BINS
        drift = js_divergence(p.histogram(), c.histogram()) if enough else None
        return {
            "requests": dict(self.routed),
            "primary_compared": "this window" if p is self.alongside else f"its latest {len(p.seconds)} answers",
            "answers": c.requests,
            "error_rate": {"candidate": round(c.error_rate(), 4), "primary": round(p.error_rate(), 4)},
            "p50_ms": {"candidate": ms(c.percentile(50, MIN_P50)), "primary": ms(p.percentile(50, MIN_P50))},
            "p99_ms": {"candidate": ms(c.percentile(99, MIN_P99)), "primary": ms(p.percentile(99, MIN_P99))},
            "confidence_drift": None if drift is None else round(drift, 4),
            "compared": self.compared,
            "top1_agreement": round(self.agreed / self.compared, 4) if self.compared else None,
            "agreement_upper_99": round(exact_upper(self.agreed, self.compared), 4) if self.compared else None,
        }

    def judge(self, thresholds: Thresholds) -> tuple[bool, list[str], dict[str, Any]]:
        """(passed, why not, the figures): every check that has the answers it needs, each failing only where the
        window shows it at 99% confidence (errors, agreement) or over enough answers (latency, drift)."""
        t, c, p = thresholds, self.candidate, self.primary
        figures = self.figures()
        failures = []
        errors_low = wilson(c.errors, c.requests)[0] if c.requests else 0.0
        if errors_low > p.error_rate() + t.max_error_increase:
            failures.append(
                f"server errors {c.errors}/{c.requests} ({c.error_rate():.1%}; at least {errors_low:.1%} at 99% "
                f"confidence) against the primary's {p.error_rate():.1%} (at most {t.max_error_increase:.1%} more)"
            )
        for q, least in ((50, MIN_P50), (99, MIN_P99)):
            mine, theirs = c.percentile(q, least), p.percentile(q, least)
            if mine is None or theirs is None:
                continue
            # slower than the primary's percentile allows in more than (100 - q)% of its answers, at 99% confidence:
            # a hiccup or two among 100 answers is the p99 of the window, not a slower candidate
            limit = theirs * t.max_latency_ratio + t.latency_slack_s
            slower = sum(seconds > limit for seconds in c.seconds)
            if wilson(slower, len(c.seconds))[0] > 1 - q / 100:
                failures.append(
                    f"p{q} {mine * 1000:.2f} ms against the primary's {theirs * 1000:.2f} ms (at most "
                    f"{t.max_latency_ratio:g}x + {t.latency_slack_s * 1000:g} ms: {slower} of {len(c.seconds)} "
                    f"answers slower than {limit * 1000:.2f} ms, more than {100 - q}% at 99% confidence)"
                )
        drift = figures["confidence_drift"]
        if drift is not None and drift > t.max_drift:
            noise = drift_noise(np.fromiter(p.bins, int), np.fromiter(c.bins, int))
            figures["confidence_drift_by_chance_99"] = round(noise, 4)
            if drift > noise:
                failures.append(f"confidence drift {drift:.3f} against the primary (at most {t.max_drift:g}, and "
                                f"{noise:.3f} by chance at 99% with these counts)")  # fmt: skip
        upper = exact_upper(self.agreed, self.compared)
        if self.compared and upper < t.min_agreement:
            failures.append(
                f"top-1 agreement {self.agreed}/{self.compared} ({self.agreed / self.compared:.1%}; at most "
                f"{upper:.1%} at 99% confidence) below the gate {t.min_agreement:.0%}"
            )
        return not failures, failures, figures
