"""`python -m benchmarks --quick` runs end to end, so the benchmark code cannot rot (structure, not speed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from service.store.layout import ModelStore

from ..helpers import ROOT

pytestmark = pytest.mark.integration


def test_quick_benchmark_writes_table_json_and_plot(model_store: ModelStore, tmp_path: Path) -> None:
    store = tmp_path / "store"
    for name in ("lenet5", "resnet18"):
        shutil.copytree(model_store.model_dir(name), store / name)
    out = tmp_path / "results"
    command = [sys.executable, "-m", "benchmarks", "--quick", "--models", "lenet5,resnet18", "--store", str(store),
               "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    results = json.loads((out / "latest.json").read_text())
    assert results["quick"] is True and results["machine"]["cores"] >= 1 and results["machine"]["commit"]
    paths = {(r["model"], r["path"]) for r in results["runs"]}
    for model in ("lenet5", "resnet18"):
        assert {(model, p) for p in ("ceiling", "http", "grpc-bytes", "grpc-images", "noop")} <= paths
    assert ("resnet18", "baseline") in paths
    for run in results["runs"]:
        assert run["errors"] == 0 and run["requests"] > 0 and run["images_per_s"] > 0
        assert run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
    names = {r["name"] for r in results["ratios"]}
    assert "lenet5 HTTP /classify / no-op (requests/s)" in names and "resnet18 HTTP / ceiling" in names
    table = (out / "latest.md").read_text()
    assert "| model | path | concurrency | images/s |" in table and "| ratio | value | target | met |" in table
    assert Image.open(out / "latest.png").size[0] > 0
