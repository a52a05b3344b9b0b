"""`python -m benchmarks.finetune` runs end to end on a tiny folder (structure, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..helpers import ROOT


def test_the_fine_tuning_benchmark_times_each_network_and_unfreeze(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.finetune", "--models", "lenet5,resnet18", "--unfreeze", "head,all",
               "--images", "16", "--size", "32", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads((tmp_path / "finetune.json").read_text())
    runs = {(r["model"], r["unfreeze"]): r for r in found["runs"]}
    assert set(runs) == {(m, u) for m in ("lenet5", "resnet18") for u in ("head", "all")}
    assert all(r["seconds_per_epoch"] > 0 and r["train_images"] == 8 for r in runs.values())  # 16 - 4 - 4 held back
    assert "flags" in result.stdout and found["machine"]["cores"] >= 1
