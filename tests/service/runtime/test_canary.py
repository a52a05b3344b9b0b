"""CANARY in-process: the split, the analysis, the shared state, and the routing on real LeNet-5 graphs."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from service.errors import ModelNotFound
from service.metrics import get_metrics
from service.runtime import deadline
from service.runtime.canary import COLD_RETRY_S, Canaries, Canary, _Routed
from service.runtime.canary_analysis import REFERENCE, Thresholds, Window, exact_upper, wilson
from service.runtime.residency import Residency
from service.runtime.shadow import Shadow
from service.settings import Settings, shadow_pair
from service.store.quality import CONFIDENCE_BUCKETS

from ..pictures import held_out_drawings
from .harness import RuntimeFactory, StoreFactory

THRESHOLDS = Thresholds(
    min_agreement=0.99, max_error_increase=0.01, max_latency_ratio=1.5, latency_slack_s=0.002, max_drift=0.1
)


def confident(rows: int, top: float = 0.995, classes: int = 10, seed: int = 0) -> np.ndarray:
    """Probabilities whose top-1 is ``top``, the rest spread evenly, the class drawn at random."""
    rng = np.random.default_rng(seed)
    p = np.full((rows, classes), (1 - top) / (classes - 1))
    p[np.arange(rows), rng.integers(0, classes, rows)] = top
    return p


def filled(window: Window, candidate_top: float, candidate_s: float, agreed: int, errors: int = 0) -> Window:
    for i in range(window.size):
        window.answered("primary", confident(1, seed=i), 0.004)
        window.finished("primary", False)
        window.answered("candidate", confident(1, candidate_top, seed=i), candidate_s)
        window.finished("candidate", i < errors)
    window.compared, window.agreed = window.size, agreed
    return window


def test_the_wilson_interval_separates_a_few_disagreements_from_a_bad_candidate() -> None:
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(97, 100)[1] > 0.99  # three disagreements in 100 do not show agreement below 99%
    assert wilson(100, 100)[1] == pytest.approx(1.0)
    assert wilson(90, 100)[1] < 0.99
    assert wilson(10, 100)[1] < 0.25
    assert wilson(3, 100)[0] < 0.01 < wilson(10, 100)[0]  # the low end (errors): 3% may be 1%, 10% is not


@pytest.mark.parametrize("trials", [1, 3, 5, 10, 25, 100, 400])
def test_agreement_fails_a_candidate_that_meets_the_gate_at_most_once_in_200_windows_however_few_compared(
    trials: int,
) -> None:
    """A candidate that agrees with its primary 99% of the time: over every count of agreements a window of
    ``trials`` comparisons can hold, the chance that its exact bound falls below a 99% gate is at most 0.5%
    (Wilson's bound failed such a candidate in 9.6% of windows of ten); one that agrees 90% of the time is still
    caught in a window of 100."""
    chance = sum(math.comb(trials, k) * 0.99**k * 0.01 ** (trials - k) for k in range(trials + 1)
                 if exact_upper(k, trials) < 0.99)  # fmt: skip
    assert chance <= 0.005
    assert exact_upper(trials, trials) == 1.0 and exact_upper(0, 0) == 1.0
    assert exact_upper(90, 100) < 0.99 and exact_upper(97, 100) > 0.99


def test_drift_fails_only_past_what_chance_gives_samples_of_that_size() -> None:
    """Two windows of 50 answers drawn from one spread-out distribution of confidences drift apart by chance (over
    0.1 about four times in ten); such windows pass, while a candidate whose confidences moved fails."""
    spread = np.full(len(CONFIDENCE_BUCKETS), 1 / len(CONFIDENCE_BUCKETS))
    rng = np.random.default_rng(7)
    failed = 0
    for _ in range(20):
        window = Window(50)
        for side in ("primary", "candidate"):
            for bucket in rng.choice(len(CONFIDENCE_BUCKETS), size=50, p=spread):
                window.answered(side, _top1_in(bucket), 0.004)
                window.finished(side, False)
        window.compared, window.agreed = 50, 50
        passed, failures, _ = window.judge(THRESHOLDS)
        failed += not passed
    assert failed <= 1
    moved = Window(50)
    for i in range(50):
        moved.answered("primary", _top1_in(len(CONFIDENCE_BUCKETS) - 1 - i % 3), 0.004)
        moved.finished("primary", False)
        moved.answered("candidate", _top1_in(i % 3), 0.004)
        moved.finished("candidate", False)
    moved.compared, moved.agreed = 50, 50
    passed, failures, figures = moved.judge(THRESHOLDS)
    assert not passed and failures[0].startswith("confidence drift") and "by chance at 99%" in failures[0]
    assert figures["confidence_drift"] > figures["confidence_drift_by_chance_99"]


def _top1_in(bucket: int) -> np.ndarray:
    """One answer of ten classes whose top-1 probability falls in confidence bucket ``bucket``."""
    edges = [0.0, *CONFIDENCE_BUCKETS]
    top = min(0.999, max(0.1 + 1e-3, (edges[bucket] + edges[bucket + 1]) / 2))
    row = np.full((1, 10), (1 - top) / 9, dtype=np.float32)
    row[0, 0] = top
    return row


def test_a_few_server_errors_or_a_few_answers_do_not_fail_a_window() -> None:
    """Two errors in 100 are not shown to be above the primary's 0% + 1% at 99% confidence; latency and drift are
    not judged on fewer answers than they need."""
    passed, failures, _ = filled(Window(100), 0.995, 0.004, agreed=100, errors=2).judge(THRESHOLDS)
    assert passed, failures
    small = filled(Window(10), 0.15, 0.030, agreed=10)  # slow and unsure, but only 10 answers
    passed, failures, figures = small.judge(THRESHOLDS)
    assert passed and figures["confidence_drift"] is None and figures["p99_ms"]["candidate"] is None


def test_a_faithful_window_passes() -> None:
    passed, failures, figures = filled(Window(100), 0.995, 0.004, agreed=99).judge(THRESHOLDS)
    assert passed, failures
    assert figures["answers"] == 100 and figures["top1_agreement"] == 0.99
    assert figures["confidence_drift"] == pytest.approx(0.0, abs=1e-6)
    assert figures["p50_ms"] == {"candidate": 4.0, "primary": 4.0}


@pytest.mark.parametrize(
    ("candidate_top", "seconds", "agreed", "errors", "failing"),
    [
        (0.15, 0.004, 99, 0, "confidence drift"),  # a network with random weights: unsure of everything
        (0.995, 0.004, 80, 0, "top-1 agreement 80/100"),
        (0.995, 0.020, 100, 0, "p50 20.00 ms"),
        (0.995, 0.004, 100, 5, "server errors 5/100"),
    ],
)
def test_each_check_fails_a_window_and_says_why(
    candidate_top: float, seconds: float, agreed: int, errors: int, failing: str
) -> None:
    passed, failures, _ = filled(Window(100), candidate_top, seconds, agreed, errors).judge(THRESHOLDS)
    assert not passed
    assert any(failure.startswith(failing) for failure in failures), failures


@pytest.mark.parametrize(("slow", "fails"), [(2, False), (5, True), (100, True)])
def test_latency_fails_a_window_only_where_enough_answers_are_slower(slow: int, fails: bool) -> None:
    """The primary's p99 is 4 ms, so the limit is 1.5 x 4 + 2 = 8 ms. Two answers of 100 at 12 ms, a pause of the host,
    are the window's p99 but do not show the candidate slower; five (more than 1% at 99% confidence) do, and all of
    them fail p50 as well."""
    window = filled(Window(100), 0.995, 0.004, agreed=100)
    window.candidate.seconds.clear()
    for i in range(100):
        window.candidate.seconds.append(0.012 if i < slow else 0.004)
    passed, failures, figures = window.judge(THRESHOLDS)
    assert figures["p99_ms"]["candidate"] == 12.0
    assert passed is not fails, failures
    if fails:
        assert failures[-1].startswith("p99 12.00 ms against the primary's 4.00 ms")
        assert f"{slow} of 100 answers slower than 8.00 ms" in failures[-1]
        assert any(failure.startswith("p50") for failure in failures) is (slow == 100)


def test_a_window_waits_for_its_agreement_sample_then_judges_without_it() -> None:
    window = Window(20)
    for _ in range(20):
        window.candidate.finished(False)
    assert not window.complete()  # 20 answers, none compared yet
    window.compared = window.min_compared
    assert window.complete()
    late = Window(20)
    for _ in range(80):
        late.candidate.finished(False)
    assert late.complete()  # four windows of answers and still no comparison: judged on the rest


def test_the_primary_is_compared_under_the_same_load_where_it_answered_in_the_window() -> None:
    """A window where the primary answered enough compares with those answers; the next one, where it answers nothing
    (a fraction of 1), with its latest answers."""
    window = filled(Window(40), 0.995, 0.004, agreed=40)
    assert window.figures()["primary_compared"] == "this window"
    following = window.next()
    assert following.candidate.requests == 0 and following.compared == 0 and following.routed["primary"] == 0
    for _ in range(40):
        following.answered("candidate", confident(1), 0.009)  # slower than the primary in the window before
        following.finished("candidate", False)
    assert following.figures()["primary_compared"] == "its latest 40 answers"
    assert following.reference.seconds.maxlen == REFERENCE
    passed, failures, _ = following.judge(THRESHOLDS)
    assert not passed and failures[0].startswith("p50 9.00 ms against the primary's 4.00 ms")


@pytest.mark.parametrize(("fraction", "requests", "expected"), [(0.1, 1000, 100), (0.5, 200, 100), (0.05, 400, 20)])
def test_the_split_is_exact_over_blocks_and_random_within_them(fraction: float, requests: int, expected: int) -> None:
    canary = Canary(shadow_pair(f"a:b:{fraction}"), Window(10), fraction=fraction)
    chosen = [i for i in range(requests) if canary.divert()]
    assert len(chosen) == expected
    assert len({i % round(1 / fraction) for i in chosen}) > 1  # not every n-th request


def test_paused_ended_and_rolled_back_canaries_divert_nothing_and_a_promoted_one_everything() -> None:
    canary = Canary(shadow_pair("a:b:0.5"), Window(10), fraction=0.5)
    for state, diverted in (("paused", 0), ("ended", 0), ("rolled_back", 0), ("promoted", 100)):
        canary.state = state
        canary.fraction = 1.0 if state == "promoted" else 0.5
        assert sum(canary.divert() for _ in range(100)) == diverted, state


def canaries(tmp_path: Path, **overrides: object) -> Canaries:
    options: dict[str, object] = {"model_store": tmp_path, "canary": "lenet5:lenet5_int8:0.1",
                                  "canary_steps": "0.1,0.5,1.0", "canary_window": 10} | overrides  # fmt: skip
    settings = Settings(**options)  # type: ignore[arg-type]
    return Canaries(settings.canary_pairs(), settings, get_metrics(), Shadow([], None, get_metrics(), 4))  # type: ignore[arg-type]


def test_workers_share_one_state_and_the_first_decision_wins(tmp_path: Path) -> None:
    """Two workers on one state file: a passing window steps the fraction up for both; a decision judged on a window
    the other worker had already moved past is dropped, and its maker takes the other's state."""
    first, second = canaries(tmp_path), canaries(tmp_path)
    first.start()
    second.start()
    try:
        a, b = first.canaries["lenet5"], second.canaries["lenet5"]
        assert a.revision == b.revision == 1 and a.fraction == b.fraction == 0.1
        filled(a.window, 0.995, 0.004, agreed=10)
        first.judge(a)
        assert (a.state, a.fraction, a.step, a.revision) == ("running", 0.5, 1, 2)
        filled(b.window, 0.15, 0.004, agreed=1)  # judged at revision 1: stale
        second.judge(b)
        assert (b.state, b.fraction, b.revision) == ("running", 0.5, 2)  # the first's state, not a rollback
        stored = json.loads((tmp_path / ".canary.json").read_text())["canaries"]["lenet5:lenet5_int8"]
        assert (stored["state"], stored["fraction"], stored["revision"]) == ("running", 0.5, 2)
        filled(b.window, 0.15, 0.004, agreed=1)
        second.judge(b)  # a failing window at the current revision rolls back, for every worker
        assert (b.state, b.fraction) == ("rolled_back", 0.0)
        assert "top-1 agreement 1/10" in (b.reason or "") and b.history[-1]["passed"] is False
        first.sync()
        assert (a.state, a.fraction, a.reason) == ("rolled_back", 0.0, b.reason)
    finally:
        first.stop()
        second.stop()


def test_steps_then_promotion_and_a_restart_resumes_where_it_was(tmp_path: Path) -> None:
    worker = canaries(tmp_path)
    worker.start()
    canary = worker.canaries["lenet5"]
    for fraction in (0.5, 1.0):
        filled(canary.window, 0.995, 0.004, agreed=10)
        worker.judge(canary)
        assert (canary.state, canary.fraction) == ("running", fraction)
    filled(canary.window, 0.995, 0.004, agreed=10)
    worker.judge(canary)
    assert (canary.state, canary.fraction, canary.diverting) == ("promoted", 1.0, 1.0)
    assert [v["figures"]["fraction"] for v in canary.history] == [0.1, 0.5, 1.0]
    worker.stop()
    restarted = canaries(tmp_path)
    restarted.start()
    again = restarted.canaries["lenet5"]
    assert (again.state, again.fraction, again.revision) == ("promoted", 1.0, canary.revision)
    restarted.stop()


def test_the_operator_pauses_changes_and_ends_a_canary(tmp_path: Path) -> None:
    worker = canaries(tmp_path)
    worker.start()
    try:
        assert worker.operate("lenet5", "paused", None)["fraction"] == 0.0
        assert worker.operate("lenet5", "running", 0.3)["fraction"] == 0.3
        ended = worker.operate("lenet5", "ended", None)
        assert (ended["state"], ended["fraction"]) == ("ended", 0.0)
        with pytest.raises(LookupError, match="No canary for 'resnet50'; canaries: lenet5"):
            worker.operate("resnet50", "paused", None)
        with pytest.raises(ValueError, match="Unknown canary state 'paws'"):
            worker.operate("lenet5", "paws", None)
    finally:
        worker.stop()


def test_a_canary_without_a_writable_state_file_runs_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    worker = canaries(tmp_path, canary_state=blocker / "canary.json")  # a file where a folder should be
    worker.start()
    try:
        canary = worker.canaries["lenet5"]
        filled(canary.window, 0.995, 0.004, agreed=10)
        worker.judge(canary)
        assert (canary.state, canary.fraction) == ("running", 0.5)
    finally:
        worker.stop()


def test_routing_on_real_graphs(
    make_store: StoreFactory, make_runtime: RuntimeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A canary at 1.0 answers every request for the primary that names no version, and says so; a request naming a
    version never goes to it; a candidate that is not served leaves its requests to the primary, and the canary's
    fallback and the log say so (once) until the candidate answers again."""
    runtime = make_runtime(
        make_store(lenet5=[1, 2], twin=[1]),
        canary="lenet5:twin:1.0",
        canary_state=tmp_path / "c.json",
        default_model="lenet5",
    )
    assert runtime.canaries is not None
    runtime.canaries.start()
    runtime.control.reconcile()
    classifier = runtime.classifier
    files, _ = held_out_drawings(3)

    async def main() -> list[tuple[str, int, str | None]]:
        answers = []
        for name, version in (("lenet5", None), (None, None), ("lenet5", 2), ("twin", None)):
            c = await classifier.classify(name, version, files, k=1)
            answers.append((c.model, c.version, c.canary))
        return answers

    try:
        with_default = asyncio.run(main())
    finally:
        runtime.canaries.stop()
    assert with_default == [("twin", 1, "lenet5:twin"), ("twin", 1, "lenet5:twin"), ("lenet5", 2, None),
                            ("twin", 1, None)]  # fmt: skip
    assert runtime.canaries.canaries["lenet5"].window.routed["candidate"] == 2

    canary = runtime.canaries.canaries["lenet5"]
    assert canary.fallback is None
    runtime.repository.unload(runtime.repository.serving("twin"))  # the candidate gone: the primary answers

    async def fallback() -> tuple[str, str | None]:
        c = await classifier.classify("lenet5", None, files, k=1)
        return c.model, c.canary

    with caplog.at_level("INFO", logger="service.runtime.canary"):
        assert asyncio.run(fallback()) == ("lenet5", None)  # version 2, the one it serves
        assert asyncio.run(fallback()) == ("lenet5", None)
        said = [r for r in caplog.records if "the primary answers the candidate's share" in r.getMessage()]
        assert [r.levelname for r in said] == ["WARNING"] and "'twin'" in said[0].getMessage()
        described = runtime.canaries.describe("lenet5")
        assert described is not None and (described["state"], described["fraction"]) == ("running", 1.0)
        assert "'twin'" in described["fallback"] and described["fallback"] in said[0].getMessage()
        assert described["reason"] is None  # the shared state's own reason is untouched

        runtime.control.reconcile()  # the candidate served again: it answers, and the fallback goes
        assert asyncio.run(fallback()) == ("twin", "lenet5:twin")
    assert canary.fallback is None and "canary lenet5:twin: the candidate answers its share again" in caplog.text
    with pytest.raises(ModelNotFound):
        asyncio.run(classifier.classify("ghost", None, files, k=1))


def test_on_demand_the_candidate_is_loaded_by_the_first_request_it_answers(
    make_store: StoreFactory, make_runtime: RuntimeFactory, tmp_path: Path
) -> None:
    runtime = make_runtime(make_store(lenet5=[1], twin=[1]), model_control="on-demand", memory_budget="1GiB",
                           canary="lenet5:twin:1.0", canary_state=tmp_path / "c.json")  # fmt: skip
    assert runtime.canaries is not None
    runtime.start()  # the canaries take their state; on demand, nothing loads yet
    files, _ = held_out_drawings(2)

    async def main() -> tuple[str, str | None]:
        c = await runtime.classifier.classify("lenet5", None, files, k=1)
        return c.model, c.canary

    try:
        assert runtime.repository.serving("twin") is None  # nothing resident before a request
        assert asyncio.run(main()) == ("twin", "lenet5:twin")
        assert runtime.repository.serving("twin") is not None and runtime.repository.serving("lenet5") is None
    finally:
        runtime.canaries.stop()


class ColdCandidate:
    """On demand, ``lenet5`` resident and its canary ``twin`` not: the candidate's loads are counted, and held back
    until :attr:`gate` is set; with ``always``, the canary diverts every request whatever its fraction."""

    def __init__(self, make_store: StoreFactory, make_runtime: RuntimeFactory, tmp_path: Path, fraction: float,
                 always: bool = False) -> None:  # fmt: skip
        store = make_store(lenet5=[1], twin=[1])
        self.store = store
        self.runtime = make_runtime(store, model_control="on-demand", memory_budget="1GiB",
                                    canary=f"lenet5:twin:{fraction}", canary_state=tmp_path / "c.json")  # fmt: skip
        assert self.runtime.canaries is not None
        residency = self.runtime.residency
        assert isinstance(residency, Residency)
        self.residency, self.gate, self.loads = residency, threading.Event(), [0]
        load = residency.load

        def counted(name: str, version: int | None, reason: str) -> int | None:
            if name == "twin":
                self.loads[0] += 1
                self.gate.wait(30)
            return load(name, version, reason)

        residency.load = counted  # type: ignore[method-assign]
        self.runtime.start()
        if always:
            self.runtime.canaries.canaries["lenet5"].divert = lambda: True  # type: ignore[method-assign]
        self.files, _ = held_out_drawings(2)

    async def classify(self) -> tuple[str, str | None]:
        answer = await self.runtime.classifier.classify("lenet5", None, self.files, k=1)
        return answer.model, answer.canary

    def twin_resident(self) -> bool:
        return self.runtime.repository.serving("twin") is not None

    def stop(self) -> None:
        self.gate.set()
        assert self.runtime.canaries is not None
        self.runtime.canaries.stop()


def test_on_demand_a_cold_candidate_loads_in_the_background_while_the_resident_primary_answers(
    make_store: StoreFactory, make_runtime: RuntimeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The primary resident, the candidate not (a diverted request, fraction 0.5): the request is answered by the
    primary while the candidate's load is still held back, not after it; once loaded, the candidate answers."""
    cold = ColdCandidate(make_store, make_runtime, tmp_path, 0.5, always=True)

    async def main() -> list[tuple[str, str | None, bool]]:
        await cold.residency.ensure("lenet5", None)
        answered = [(*await cold.classify(), cold.twin_resident())]
        cold.gate.set()
        for _ in range(300):
            if cold.twin_resident():
                break
            await asyncio.sleep(0.1)
        return [*answered, (*await cold.classify(), cold.twin_resident())]

    try:
        with caplog.at_level("INFO", logger="service.runtime.canary"):
            assert asyncio.run(main()) == [("lenet5", None, False), ("twin", "lenet5:twin", True)]
    finally:
        cold.stop()
    assert "the candidate is loading (on demand); the primary answers until it is resident" in caplog.text
    assert cold.loads == [1]


def test_on_demand_a_canary_diverting_every_request_waits_for_its_candidate(
    make_store: StoreFactory, make_runtime: RuntimeFactory, tmp_path: Path
) -> None:
    """At fraction 1 the primary should answer nothing (and under a tight budget only its going idle would let the
    candidate in): the first request waits for the candidate's load and the candidate answers it."""
    cold = ColdCandidate(make_store, make_runtime, tmp_path, 1.0)
    cold.gate.set()

    async def main() -> tuple[str, str | None]:
        await cold.residency.ensure("lenet5", None)
        return await cold.classify()

    try:
        assert asyncio.run(main()) == ("twin", "lenet5:twin")
    finally:
        cold.stop()


def test_on_demand_a_candidate_that_cannot_load_is_tried_again_after_a_pause_and_the_log_says_why(
    make_store: StoreFactory, make_runtime: RuntimeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A candidate whose graph is damaged: its background load fails once, the log says why, and the next diverted
    requests, answered by the primary, start no other load within COLD_RETRY_S."""
    cold = ColdCandidate(make_store, make_runtime, tmp_path, 0.5, always=True)
    graph = cold.store.model_dir("twin") / "1" / "model.onnx"
    graph.write_bytes(b"not an ONNX graph")
    cold.gate.set()

    async def main() -> list[tuple[str, str | None]]:
        await cold.residency.ensure("lenet5", None)
        answers = [await cold.classify()]
        for _ in range(300):
            if "could not be loaded" in caplog.text:
                break
            await asyncio.sleep(0.05)
        return answers + [await cold.classify() for _ in range(3)]

    try:
        with caplog.at_level("INFO", logger="service.runtime.canary"):
            assert asyncio.run(main()) == [("lenet5", None)] * 4
    finally:
        cold.stop()
    assert cold.loads == [1]
    failed = [r.getMessage() for r in caplog.records if "could not be loaded" in r.getMessage()]
    assert len(failed) == 1 and "model.onnx" in failed[0] and f"tried again in {COLD_RETRY_S:g} s" in failed[0]


def test_a_pass_without_the_agreement_sample_steps_nothing_up(tmp_path: Path) -> None:
    worker = canaries(tmp_path)
    worker.start()
    try:
        canary = worker.canaries["lenet5"]
        window = filled(canary.window, 0.995, 0.004, agreed=0)
        window.compared = 0  # the primary was never idle enough to compare
        for _ in range(30):
            window.finished("candidate", False)
        assert window.complete() and not window.conclusive
        worker.judge(canary, window, canary.revision)
        assert (canary.state, canary.fraction, canary.step) == ("running", 0.1, 0)
        assert "inconclusive" in canary.history[-1]
    finally:
        worker.stop()


def test_an_unreadable_state_file_starts_the_canaries_paused(tmp_path: Path) -> None:
    (tmp_path / ".canary.json").write_text('{"canaries": {"lenet5:lenet5_int8": {"state": "gone", "fraction": 7}}}')
    worker = canaries(tmp_path)
    worker.start()
    try:
        canary = worker.canaries["lenet5"]
        assert (canary.state, canary.diverting) == ("paused", 0.0)
        assert "is not a canary's state" in (canary.reason or "")
        # the operator removes the file and sets the state: this worker records it there again, and others take it
        (tmp_path / ".canary.json").unlink()
        worker.operate("lenet5", "running", 0.5)
        stored = json.loads((tmp_path / ".canary.json").read_text())["canaries"]["lenet5:lenet5_int8"]
        assert (stored["state"], stored["fraction"]) == ("running", 0.5)
        other = canaries(tmp_path)
        other.start()
        other.stop()
        assert (other.canaries["lenet5"].state, other.canaries["lenet5"].fraction) == ("running", 0.5)
    finally:
        worker.stop()


def test_the_primary_answers_when_the_candidate_is_full_or_its_pinned_version_is_not_served(
    make_store: StoreFactory, make_runtime: RuntimeFactory, tmp_path: Path
) -> None:
    """A candidate whose queue has no room for a request leaves it to the primary (no 503 because of the canary);
    a PRIMARY@VERSION that is not served leaves the primary's share to the version a request would get."""
    runtime = make_runtime(make_store(lenet5=[1, 2], twin=[1]), canary="lenet5@1:twin:1.0",
                           canary_state=tmp_path / "c.json", max_queue_images=8, max_images_per_request=4)  # fmt: skip
    assert runtime.canaries is not None
    runtime.canaries.start()
    runtime.control.reconcile()  # lenet5 serves version 2 only (its policy: the latest)
    twin = runtime.repository.serving("twin")
    assert twin is not None and twin.batcher is not None
    files, _ = held_out_drawings(1)

    async def main() -> tuple[str, int, str | None]:
        c = await runtime.classifier.classify("lenet5", None, files, k=1)
        return c.model, c.version, c.canary

    try:
        assert asyncio.run(main()) == ("twin", 1, "lenet5@1:twin")
        twin.batcher._queued_images = 8  # full: no room for another request's images
        assert asyncio.run(main()) == ("lenet5", 2, None)
    finally:
        twin.batcher._queued_images = 0
        runtime.canaries.stop()


def test_answers_the_response_cache_gives_are_routed_but_no_evidence_for_the_window(
    make_store: StoreFactory, make_runtime: RuntimeFactory, tmp_path: Path
) -> None:
    """With RESPONSE_CACHE_MB, the same image sent five times to a canary diverting everything: the first is
    computed by the candidate, the next four come from the cache. All five are routed to the candidate; only the
    first is in the window (hits ran nothing, and errors are never cached: they would dilute its error rate)."""
    runtime = make_runtime(make_store(lenet5=[1], twin=[1]), canary="lenet5:twin:1.0", canary_state=tmp_path / "c.json",
                           response_cache_mb=8)  # fmt: skip
    assert runtime.canaries is not None
    runtime.canaries.start()
    runtime.control.reconcile()
    files, _ = held_out_drawings(1)

    async def main() -> list[str | None]:
        return [(await runtime.classifier.classify("lenet5", None, files, k=1)).canary for _ in range(5)]

    try:
        assert asyncio.run(main()) == ["lenet5:twin"] * 5
        (canary,) = runtime.canaries.canaries.values()
        assert canary.window.routed["candidate"] == 1 and canary.window.candidate.requests == 1
    finally:
        runtime.canaries.stop()


def test_a_promoted_canary_of_one_models_versions_is_declared_and_the_old_version_drains(
    make_store: StoreFactory, make_runtime: RuntimeFactory, tmp_path: Path
) -> None:
    """MODEL_CONTROL=explicit: lenet5 serves versions 1 and 2, v2 the canary of v1; once promoted, the declared state
    names v2 alone, and the next pass drains v1 (the promotion outlives a restart as the lifecycle's own state);
    rolled back through the API, v1 is declared alone again and serves."""
    runtime = make_runtime(make_store(lenet5=[1, 2], policy="all: { }"), model_control="explicit",
                           canary="lenet5@1:lenet5@2:0.5", canary_steps="1.0", canary_window=10,
                           canary_state=tmp_path / "c.json",
                           model_control_state=tmp_path / "declared.json")  # fmt: skip
    assert runtime.canaries is not None and runtime.control.declared is not None
    runtime.canaries.start()
    runtime.control.reconcile()
    assert sorted(runtime.repository.versions["lenet5"]) == [1, 2]
    canary = runtime.canaries.canaries["lenet5"]
    try:
        for _ in range(2):  # 0.5, then 1.0: promoted
            filled(canary.window, 0.995, 0.004, agreed=10)
            runtime.canaries.judge(canary)
    finally:
        runtime.canaries.stop()
    assert canary.state == "promoted"
    declared = runtime.control.declared.read()
    assert declared is not None and declared["models"] == {"lenet5": [2]}
    runtime.control.reconcile()
    served = {v: e.status for v, e in runtime.repository.versions["lenet5"].items()}
    assert served.get(2) == "ready" and served.get(1) in (None, "draining")
    # paused, or sent a fraction, it would route to v1, which has drained (and a rollback from there would not
    # have declared v1 again): refused, naming what would be right
    for state, fraction in (("paused", None), ("running", None), (None, 0.5)):
        with pytest.raises(ValueError, match="set state rolled_back or ended"):
            runtime.canaries.operate("lenet5", state, fraction)
    shared = json.loads((tmp_path / "c.json").read_text())["canaries"]["lenet5@1:lenet5@2"]
    assert shared["state"] == "promoted" and shared["switched"] is True  # what another worker reads
    # rolled back through the API: the routing alone cannot bring back a version that drained; it is declared again
    assert runtime.canaries.operate("lenet5", "rolled_back", None)["state"] == "rolled_back"
    declared = runtime.control.declared.read()
    assert declared is not None and declared["models"] == {"lenet5": [1]}
    assert json.loads((tmp_path / "c.json").read_text())["canaries"]["lenet5@1:lenet5@2"]["switched"] is False
    runtime.control.reconcile()
    served = {v: e.status for v, e in runtime.repository.versions["lenet5"].items()}
    assert served.get(1) == "ready" and served.get(2) in (None, "draining")


def test_a_fallback_is_logged_once_a_minute_whatever_its_text_and_a_stopped_canary_has_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A candidate that gives up waiting for its load says so with each request's own figures: one warning for all
    of them within REPEAT_S, /models showing the latest. Once the canary is ended, a request that fell back while
    it waited leaves nothing behind, and nothing of it reaches the shared state."""
    worker = canaries(tmp_path)
    worker.start()
    canary = worker.canaries["lenet5"]
    try:
        with caplog.at_level("INFO", logger="service.runtime.canary"):
            for wait in (0.5, 0.25, 0.125):
                worker._fall_back(canary, "unavailable", f"lenet5_int8 is loading; gave up after {wait} s")
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warned) == 1 and "after 0.5 s" in warned[0], warned
        described = worker.describe("lenet5")
        assert described is not None and described["fallback"] == "lenet5_int8 is loading; gave up after 0.125 s"

        worker.operate("lenet5", "ended", None)
        assert canary.fallback is None
        worker._fall_back(canary, "unavailable", "lenet5_int8 is loading; gave up after 1 s")  # a request that waited
        assert canary.fallback is None
        stored = json.loads((tmp_path / ".canary.json").read_text())["canaries"]["lenet5:lenet5_int8"]
        assert "loading" not in json.dumps(stored)
    finally:
        worker.stop()


def test_on_demand_an_incompatible_candidate_stays_out_while_the_primary_is_evicted(
    make_store: StoreFactory, make_runtime: RuntimeFactory, tmp_path: Path
) -> None:
    """A candidate that normalises its inputs otherwise than the primary never answers for it: neither while the
    primary is resident nor once it has been evicted (it was compared only with a resident primary before)."""
    store = make_store(lenet5=[1], twin=[1])
    metadata_path = store.model_dir("twin") / "1" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["input"]["mean"] = [0.25]
    metadata_path.write_text(json.dumps(metadata))
    runtime = make_runtime(store, model_control="on-demand", memory_budget="1GiB", canary="lenet5:twin:1.0",
                           canary_state=tmp_path / "c.json")  # fmt: skip
    assert runtime.canaries is not None and isinstance(runtime.residency, Residency)
    residency = runtime.residency
    runtime.start()
    files, _ = held_out_drawings(1)

    async def main() -> list[tuple[str, str | None]]:
        answers = []
        for primary_resident in (True, False):
            if primary_resident:
                await residency.ensure("lenet5", None)
            else:
                assert residency.evict("lenet5", "test") and runtime.repository.serving("lenet5") is None
            await residency.ensure("twin", None)
            c = await runtime.classifier.classify("lenet5", None, files, k=1)
            answers.append((c.model, c.canary))
        return answers

    try:
        assert asyncio.run(main()) == [("lenet5", None), ("lenet5", None)]
    finally:
        runtime.canaries.stop()
    assert (runtime.canaries.canaries["lenet5"].fallback or "").startswith("incompatible: twin takes")


@pytest.mark.parametrize(("cut_off", "counted"), [("5xx", True), ("4xx", False), (None, False)])
def test_a_request_the_time_limit_cuts_off_counts_as_the_sides_error_and_a_client_gone_as_none(
    make_store: StoreFactory, make_runtime: RuntimeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    cut_off: str | None, counted: bool,
) -> None:  # fmt: skip
    """A candidate's request cancelled where REQUEST_TIMEOUT_S cut it off with its body in (a 504) is a server
    error in its window, as the request counters count it: a candidate too slow to answer in time was promoted on
    its fast answers alone. Cancelled while its body was still arriving (408), or with its client gone, it is no
    evidence either way."""
    monkeypatch.setattr(deadline, "_cut_off", [lambda: cut_off])  # as the HTTP front end installs its reader
    runtime = make_runtime(make_store(lenet5=[1], twin=[1]), canary="lenet5:twin:1.0", canary_state=tmp_path / "c.json")
    assert runtime.canaries is not None
    runtime.canaries.start()
    runtime.control.reconcile()
    (canary,) = runtime.canaries.canaries.values()
    files, _ = held_out_drawings(1)

    routed = threading.Event()
    enter = _Routed.__enter__
    monkeypatch.setattr(_Routed, "__enter__", lambda lease: (routed.set(), enter(lease))[1])

    async def main() -> None:
        await runtime.classifier.classify("lenet5", None, files, k=1)  # one answered: no error
        routed.clear()
        task = asyncio.create_task(runtime.classifier.classify("lenet5", None, files, k=1))
        deadline = asyncio.get_running_loop().time() + 30  # until it is routed, then on its way to its batch
        while not routed.is_set() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0)
        assert routed.is_set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
        side = canary.window.candidate
        assert (side.requests, side.errors) == ((2, 1) if counted else (1, 0))
    finally:
        runtime.canaries.stop()
