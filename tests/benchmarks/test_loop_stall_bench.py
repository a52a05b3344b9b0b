"""`python -m benchmarks.loop_stall` runs end to end: every phase probed, the large requests refused as the
benchmark expects (each sender raises on any other answer), the machine named (structure, not speed)."""

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


def test_the_loop_stall_benchmark_probes_every_phase(model_store: ModelStore, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(model_store.model_dir("lenet5"), store / "lenet5")
    command = [sys.executable, "-m", "benchmarks.loop_stall", "--store", str(store), "--images", "2",
               "--seconds", "1", "--senders", "1", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads((tmp_path / "loop_stall.json").read_text())
    assert list(found["phases"]) == ["quiet", "http_json", "grpc_contents"]
    assert all(phase["probes"] > 1 and phase["p50_ms"] > 0 for phase in found["phases"].values())
    assert found["phases"]["quiet"]["large_requests"] == 0
    assert found["phases"]["http_json"]["large_requests"] > 0 and found["phases"]["grpc_contents"]["large_requests"] > 0
    assert found["json_mib"] > 0.5 and "flags" in result.stdout
