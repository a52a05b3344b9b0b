"""`python -m benchmarks.on_demand` runs end to end on three networks and short workloads (structure, not speed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.store.layout import ModelStore

from ..helpers import ROOT

pytestmark = pytest.mark.integration


def test_the_on_demand_benchmark_reports_cold_starts_and_both_budgets(model_store: ModelStore, tmp_path: Path) -> None:
    store = tmp_path / "store"
    for name in ("lenet5", "resnet18", "googlenet"):
        shutil.copytree(model_store.model_dir(name), store / name)
    command = [sys.executable, "-m", "benchmarks.on_demand", "--store", str(store), "--models",
               "lenet5,resnet18,googlenet", "--seconds", "3", "--repeats", "1", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads((tmp_path / "on_demand.json").read_text())
    assert set(found["cold_starts"]) == {"resnet18", "googlenet"}
    assert all(f["samples"] >= 1 and f["p50_s"] > 0 for f in found["cold_starts"].values())
    budgets = [row["budget"] for row in found["workloads"]]
    assert budgets == ["700MiB", "1400MiB", "every model loaded"]
    assert all(row["failed"] == 0 and row["requests"] > 0 for row in found["workloads"])
    assert found["workloads"][-1]["hit_ratio"] == 1.0 and "flags" in result.stdout
