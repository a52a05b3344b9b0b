"""Files that repeat what another file says, checked so they cannot drift apart."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from .helpers import ROOT


def test_bento_requirements_are_the_serving_dependencies() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    serve = (ROOT / "requirements" / "serve.txt").read_text().splitlines()
    pinned = [line for line in serve if line and not line.startswith("#")]
    assert pinned == pyproject["project"]["dependencies"]
    assert not any(line.startswith("torch") for line in pinned)  # serving needs no torch


def test_gpu_requirements_are_the_serving_ones_with_cuda_from_nvidia_wheels() -> None:
    """requirements/gpu.txt (the GPU bento) pins what serve.txt pins, onnxruntime-gpu with its CUDA and cuDNN
    extras, and those extras' NVIDIA wheels."""

    def pins(name: str) -> list[str]:
        lines = (ROOT / "requirements" / name).read_text().splitlines()
        return [line for line in lines if line and not line.startswith("#")]

    gpu, serve = pins("gpu.txt"), pins("serve.txt")
    wheels = [line for line in gpu if line.startswith("nvidia-") and not line.startswith("nvidia-ml-py")]
    ours = [line.replace("onnxruntime-gpu[cuda,cudnn]==", "onnxruntime-gpu==") for line in gpu if line not in wheels]
    assert ours == serve
    nvidia = {line.split("==")[0] for line in wheels}
    assert {"nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-cuda-runtime"} <= nvidia
    assert all("==" in line for line in gpu)


def test_generated_grpc_modules_match_the_proto(tmp_path: Path) -> None:
    """`make proto` output is checked in; regenerating it must change nothing."""
    package = Path("service", "frontends", "v2", "protocol")
    proto = str(package / "grpc_predict_v2.proto")
    (tmp_path / package).mkdir(parents=True)
    shutil.copy(ROOT / proto, tmp_path / proto)
    outputs = ["--python_out=.", "--pyi_out=.", "--grpc_python_out=."]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", *outputs, proto], cwd=tmp_path, check=True)
    for name in ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py"):
        generated = (tmp_path / package / name).read_text()
        assert generated == (ROOT / package / name).read_text(), f"{name} is stale: run make proto"


def test_no_test_module_imports_another() -> None:
    """What tests share lives in helper modules (tests/helpers.py, tests/service/browser.py, ...), so that a test
    module can be moved, renamed or run alone."""
    import grimp

    graph = grimp.build_graph("tests", cache_dir=None)
    test_modules = {m for m in graph.modules if m.rsplit(".", 1)[-1].startswith("test_")}
    assert len(test_modules) > 50  # the graph saw the suite
    importers = {
        (importer, imported)
        for imported in test_modules
        for importer in graph.find_modules_that_directly_import(imported)
        if importer != imported
    }
    assert not importers, f"test modules imported by other modules: {sorted(importers)}"
