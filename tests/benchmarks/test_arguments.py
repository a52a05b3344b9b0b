"""``python -m benchmarks`` refuses what it cannot measure at once, with what it takes: before any export (minutes)
or run, not as a traceback at the end of one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import finetune
from benchmarks.__main__ import main

from ..helpers import ROOT


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--concurrency", "abc"], "argument --concurrency: 'abc' is not comma-separated whole numbers"),
        (["--concurrency", "1,,4"], "argument --concurrency: '1,,4' is not comma-separated whole numbers"),
        (["--concurrency", "0"], "argument --concurrency: '0': every level is 1 request in flight or more"),
        (["--seconds", "0"], "argument --seconds: '0' is not a number of seconds above 0"),
        (["--seconds", "nan"], "argument --seconds: 'nan' is not a number of seconds above 0"),
        (["--paths", "cieling,http"], "argument --paths: 'cieling': choose among ceiling,floor,http,"),
        (["--env", "WORKERS"], "argument --env: 'WORKERS' is not KEY=VALUE"),
        (["--models", "nosuch,lenet5"], "--models nosuch,lenet5: unknown nosuch; choose among alexnet,"),
        (["--models", ","], "--models ,: name at least one model"),
    ],
)
def test_what_cannot_be_measured_is_refused_before_any_work(
    tmp_path: Path, argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"), *argv])
    assert exited.value.code == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()  # nothing exported, nothing written


def test_the_fine_tuning_benchmark_refuses_a_part_it_cannot_unfreeze(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any word but all or last trained the head alone, reported under that word."""
    with pytest.raises(SystemExit) as exited:
        finetune.main(["--models", "lenet5", "--unfreeze", "head,sideways", "--out", str(tmp_path / "out")])
    assert exited.value.code == 2
    assert "argument --unfreeze: 'sideways': choose among head, last, all" in capsys.readouterr().err
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
    """They exported the models named before it, then failed on it with a traceback. (A process each: these
    modules import the test helpers' gRPC clients, whose protocol module the test session has loaded already.)"""
    argv = ["--models", "lenet5,nosuch", "--out", str(tmp_path / "out")]
    argv += [] if benchmark == "finetune" else ["--store", str(tmp_path / "store")]
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{benchmark}", *argv], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and f"--models lenet5,nosuch: {says}" in result.stderr, result.stderr
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()
