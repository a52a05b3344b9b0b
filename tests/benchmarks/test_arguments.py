"""The benchmarks refuse what they cannot measure at once, with what they take: before any export (minutes) or run,
not as a traceback at the end of one.

Each runs in a process of its own: ``python -m benchmarks`` imports the service's gRPC protocol module, whose
``inference.*`` messages would clash with Triton's client's (the same package name) in the test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import ROOT


def run(module: str, tmp_path: Path, *argv: str, store: bool = True) -> subprocess.CompletedProcess[str]:
    where = ["--out", str(tmp_path / "out")] + (["--store", str(tmp_path / "store")] if store else [])
    return subprocess.run([sys.executable, "-m", module, *where, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--concurrency", "abc"], "argument --concurrency: 'abc' is not comma-separated whole numbers"),
        (["--concurrency", "1,,4"], "argument --concurrency: '1,,4' is not comma-separated whole numbers"),
        (["--concurrency", "0"], "argument --concurrency: '0': every number is 1 or more"),
        (["--seconds", "0"], "argument --seconds: '0' is not a number of seconds above 0"),
        (["--seconds", "nan"], "argument --seconds: 'nan' is not a number of seconds above 0"),
        (["--paths", "cieling,http"], "argument --paths: 'cieling': choose among ceiling,floor,http,"),
        (["--env", "WORKERS"], "argument --env: 'WORKERS' is not KEY=VALUE"),
        (["--models", "nosuch,lenet5"], "--models nosuch,lenet5: unknown nosuch; choose among alexnet,"),
        (["--models", ","], "--models ,: name at least one model"),
    ],
)
def test_what_cannot_be_measured_is_refused_before_any_work(tmp_path: Path, argv: list[str], says: str) -> None:
    result = run("benchmarks", tmp_path, *argv)
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()  # nothing exported, nothing written


def test_the_fine_tuning_benchmark_refuses_a_part_it_cannot_unfreeze(tmp_path: Path) -> None:
    """Any word but all or last trained the head alone, reported under that word."""
    result = run("benchmarks.finetune", tmp_path, "--models", "lenet5", "--unfreeze", "head,sideways", store=False)
    assert result.returncode == 2
    assert "argument --unfreeze: 'sideways': choose among head, last, all" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("benchmark", "says"),
    [
        ("cache", "unknown nosuch; choose among alexnet, googlenet, lenet5, resnet101,"),
        ("finetune", "unknown nosuch; choose among alexnet, googlenet, lenet5, resnet101,"),
        ("on_demand", "unknown nosuch; choose among alexnet, googlenet, lenet5, resnet18, resnet50"),
    ],
)
def test_each_benchmark_refuses_a_model_it_does_not_know_before_exporting_anything(
    tmp_path: Path, benchmark: str, says: str
) -> None:
    """They exported the models named before it, then failed on it with a traceback."""
    result = run(f"benchmarks.{benchmark}", tmp_path, "--models", "lenet5,nosuch", store=benchmark != "finetune")
    assert result.returncode == 2 and f"--models lenet5,nosuch: {says}" in result.stderr, result.stderr
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()
