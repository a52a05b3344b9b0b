"""`python -m benchmarks --quick` runs end to end, so the benchmark code cannot rot (structure, not speed)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.store.layout import ModelStore

from ..helpers import ROOT, free_ports, on_fresh_ports

pytestmark = pytest.mark.integration


def quick(model_store: ModelStore, tmp_path: Path, models: str, *args: str) -> dict[str, Any]:
    store = tmp_path / "store"
    for name in ("lenet5", "resnet18"):
        shutil.copytree(model_store.model_dir(name), store / name)
    out = tmp_path / "results"
    command = [sys.executable, "-m", "benchmarks", "--quick", "--models", models, "--store", str(store),
               "--out", str(out), *args]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results: dict[str, Any] = json.loads((out / "latest.json").read_text())
    return results


def test_quick_benchmark_writes_table_json_and_plot(model_store: ModelStore, tmp_path: Path) -> None:
    paths = "ceiling,floor,http,grpc-bytes,grpc-images,noop,explain,scaling,shadow,baseline"
    results = quick(model_store, tmp_path, "lenet5,lenet5_int8,resnet18", "--paths", paths)
    out = tmp_path / "results"
    assert results["quick"] is True and results["machine"]["cores"] >= 1 and results["machine"]["commit"]
    assert results["machine"]["int8"]["machine"] and results["machine"]["clock_ghz"] > 0
    paths = {(r["model"], r["path"]) for r in results["runs"]}
    for model in ("lenet5", "lenet5_int8", "resnet18"):
        assert {(model, p) for p in ("ceiling", "floor", "http", "grpc-bytes", "grpc-images", "noop")} <= paths
    # the process layouts: quick tries them on the first model only
    layouts = {"http-instances2", "http-workers1", "http-workers2"}
    assert {(m, p) for m, p in paths if p in layouts} == {("lenet5", p) for p in layouts}
    assert ("resnet18", "ceiling+decode") in paths and ("lenet5", "ceiling+decode") not in paths
    # LeNet-5 shadowed by its INT8 variant (in the store), at both fractions; no other model has one
    assert {("lenet5", "http-shadow1"), ("lenet5", "http-shadow0.1")} <= paths
    assert not any(p.startswith("http-shadow") for m, p in paths if m != "lenet5")
    # explanations, both methods, for the FP32 models (a variant is explained by its parent's graph)
    assert {(m, f"explain-{method}") for m in ("lenet5", "resnet18") for method in ("gradcam", "occlusion")} <= paths
    assert not any(p.startswith("explain") for m, p in paths if m == "lenet5_int8")
    # every HTTP row against the stack floor with the same files
    assert all(r["vs_floor"] > 0 for r in results["runs"] if r["path"] in ("http", "noop", "baseline"))
    # and the price of an image: the server's own CPU time per image, measured on its processes
    assert all(r["server_cpu_ms"] > 0 for r in results["runs"] if r["path"] not in ("ceiling", "ceiling+decode"))
    assert ("resnet18", "baseline") in paths and ("lenet5_int8", "baseline") not in paths
    # the variant was exported into the store by the benchmark, from the FP32 LeNet-5
    variant = json.loads((tmp_path / "store" / "lenet5_int8" / "1" / "metadata.json").read_text())
    assert variant["precision"] == "int8" and variant["derived_from"]["model"] == "lenet5"
    for run in results["runs"]:
        assert run["errors"] == 0 and run["requests"] > 0 and run["images_per_s"] > 0
        assert run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
    names = {r["name"] for r in results["ratios"]}
    assert "lenet5 HTTP /classify / no-op (requests/s)" in names and "/noop / stack floor at concurrency 4" in names
    assert "resnet18 HTTP / in-process ceiling at concurrency 4" in names
    assert "lenet5 HTTP with a shadow of 1 / without at concurrency 4" in names
    assert "resnet18 /explain occlusion / /classify images per second at concurrency 1" in names
    assert "resnet18 /explain gradcam / /classify images per second at concurrency 4" in names
    costs = {r["name"]: r["value"] for r in results["ratios"] if "quality bookkeeping" in r["name"]}
    assert set(costs) == {f"{m}: answers' quality bookkeeping, microseconds per image ({c} classes)"
                          for m, c in (("lenet5", 10), ("lenet5_int8", 10), ("resnet18", 1000))}  # fmt: skip
    assert all(0 < v < 10_000 for v in costs.values())
    assert any(n.startswith("lenet5_int8 / lenet5 in-process at batch 8") for n in names)
    assert any(n.startswith("lenet5_int8 in-process batch 8 / physical INT8 limit") for n in names)
    table = (out / "latest.md").read_text()
    assert "| model | path | concurrency | images/s |" in table and "| ratio | value | target | met |" in table
    # the INT8 recipes the variant's export timed, from its metadata
    assert "INT8 recipes of `lenet5_int8`" in table and "| u8s8 |" in table
    assert set(results["int8_recipes"]["lenet5_int8"]["candidates"][0]["images_per_s"]) == {"1", "8"}
    assert Image.open(out / "latest.png").size[0] > 0


@pytest.mark.slow
def test_the_peers_serve_the_same_graph_and_answer_alike(model_store: ModelStore, tmp_path: Path) -> None:
    """MLServer and LitServe from the peers' venv (`make peers`): started, checked against /classify, loaded."""
    results = quick(model_store, tmp_path, "lenet5", "--paths", "http,peers")
    runs = {(r["path"], r["concurrency"]): r for r in results["runs"]}
    for peer in ("mlserver", "litserve"):
        for concurrency in (1, 4):
            run = runs[(peer, concurrency)]
            assert run["errors"] == 0 and run["requests"] > 0
    names = {r["name"] for r in results["ratios"]}
    assert {"lenet5 HTTP / mlserver at concurrency 1", "lenet5 HTTP / litserve at concurrency 1"} <= names


@pytest.mark.slow
def test_a_peer_port_taken_meanwhile_is_told_apart_and_tried_again(model_store: ModelStore, tmp_path: Path) -> None:
    """A port picked free can be bound by someone else before the peer binds it (CI saw MLServer's
    metrics port go so): that failure is ``PortTaken``, and the start is tried again on fresh ports."""
    from benchmarks.peers.launch import Peer, PortTaken, start_mlserver

    version = model_store.latest("lenet5")
    assert version is not None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        http, grpc = free_ports(2)
        with pytest.raises(PortTaken, match=r"(?i)address already in use"):
            start_mlserver(version.directory, (http, grpc, taken.getsockname()[1]), tmp_path / "first")

        attempts: list[tuple[int, ...]] = []

        def start() -> Peer:
            ports = free_ports(3) if attempts else (*free_ports(2), taken.getsockname()[1])
            attempts.append(ports)
            return start_mlserver(version.directory, ports, tmp_path / f"attempt-{len(attempts)}")

        peer = on_fresh_ports(start)
        try:
            assert len(attempts) == 2 and peer.process.poll() is None
        finally:
            peer.stop()
