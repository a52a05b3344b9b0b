"""What a partial benchmark run is judged by: the levels it measured, and no target judged on a side not measured."""

from __future__ import annotations

from benchmarks.load import RunResult
from benchmarks.targets import ratios

MACHINE = {"cores": 2, "clock_ghz": 2.6, "int8": {"vnni": []}}


def run(path: str, model: str, concurrency: int, images_per_s: float) -> RunResult:
    return RunResult(path, model, concurrency, requests=100, images=100, errors=0, seconds=100 / images_per_s,
                     images_per_s=images_per_s, p50_ms=1.0, p95_ms=2.0, p99_ms=3.0)  # fmt: skip


def by_name(runs: list[RunResult]) -> dict[str, dict]:
    return {r["name"]: r for r in ratios(runs, {}, MACHINE)}


def test_a_run_at_64_alone_is_judged_at_64_without_the_targets_set_at_16() -> None:
    runs = [run(path, "resnet50", 64, ips) for path, ips in (("http", 22.0), ("mlserver", 20.0), ("grpc-bytes", 23.0))]
    runs += [run("ceiling", "resnet50", 8, 25.0), run("noop", "lenet5", 64, 9000.0), run("floor", "lenet5", 64, 1e4)]
    judged = by_name(runs)
    assert judged["resnet50 HTTP / mlserver at concurrency 64"]["value"] == 1.1
    at_64 = [name for name in judged if "concurrency 64" in name]
    assert len(at_64) == 5, judged  # peers, ceiling, gRPC / HTTP, /noop, /noop / floor
    assert [judged[name]["target"] for name in at_64] == [None] * 5


def test_a_run_at_1_alone_is_judged_by_the_targets_set_at_1() -> None:
    judged = by_name([run("http", "lenet5", 1, 900.0), run("mlserver", "lenet5", 1, 350.0)])
    assert judged["lenet5 HTTP / mlserver at concurrency 1"] == {
        "name": "lenet5 HTTP / mlserver at concurrency 1", "value": 2.571, "target": 3.0, "met": False}  # fmt: skip


def test_a_quick_run_stands_in_for_16_with_its_highest_level_below() -> None:
    runs = [run("http", "lenet5", 1, 900.0), run("http", "lenet5", 4, 2400.0), run("mlserver", "lenet5", 4, 1000.0)]
    judged = by_name(runs)
    assert judged["lenet5 HTTP / mlserver at concurrency 4"] == {
        "name": "lenet5 HTTP / mlserver at concurrency 4", "value": 2.4, "target": 2.0, "met": True}  # fmt: skip


def test_the_nearer_level_to_16_is_judged_the_lower_of_two_as_near() -> None:
    runs = [run(p, "resnet50", c, 20.0 + c) for p in ("http", "mlserver") for c in (8, 24)]
    assert "resnet50 HTTP / mlserver at concurrency 8" in by_name(runs)
    assert "resnet50 HTTP / mlserver at concurrency 24" not in by_name(runs)


def test_a_side_not_measured_judges_nothing() -> None:
    judged = by_name([run("ceiling", "resnet50", 8, 25.0), run("mlserver", "resnet50", 16, 22.0)])
    assert not [name for name in judged if "HTTP /" in name], judged
    assert not [r for r in judged.values() if r["met"] is False]
