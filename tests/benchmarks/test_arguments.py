"""``python -m benchmarks`` refuses what it cannot measure at once, with what it takes: before any export (minutes)
or run, not as a traceback at the end of one."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks.finetune import main as finetune_main


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
        finetune_main(["--models", "lenet5", "--unfreeze", "head,sideways", "--out", str(tmp_path / "out")])
    assert exited.value.code == 2
    assert "argument --unfreeze: 'sideways': choose among head, last, all" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
