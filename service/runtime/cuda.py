"""CUDA for ONNX Runtime: whether a GPU is there, and which providers a session asks for."""

from __future__ import annotations

from functools import cache

import onnxruntime as ort

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@cache
def gpu_count() -> int:
    """GPUs the NVIDIA driver reports; 0 without a driver (onnxruntime-gpu lists CUDA regardless)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library, no device: all mean no usable GPU
        return 0


def wanted_providers(choice: str) -> list[str]:
    if choice == "cpu":
        return [CPU]
    if choice == "cuda" or (CUDA in ort.get_available_providers() and gpu_count() > 0):
        return [CUDA, CPU]
    return [CPU]
