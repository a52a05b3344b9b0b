"""The GPU as NVML sees it: its name and memory, and samples of how busy it is.

Busy is NVML's "percent of time over the past sample period during which one or more kernels was executing"; its
mean over a served run says whether the GPU or something before it (decoding, the HTTP stack, the load generator)
was the limit. Where NVML has no device (a machine without the driver), there is no figure, only the reason: never
a guess.
"""

from __future__ import annotations

from typing import Any

from service.runtime.cuda import nvml_text


class Nvml:
    """NVML on GPU 0, or the reason there is none (``reason``)."""

    def __init__(self) -> None:
        self.handle: Any = None
        self.count = 0
        self.reason: str | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.count = int(pynvml.nvmlDeviceGetCount())
            if self.count == 0:
                self.reason = "NVML reports no GPU"
            else:
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as exc:  # no library, no driver, no device: NVML raises its own error types
            self.reason = f"NVML unavailable: {type(exc).__name__}: {exc}"

    def describe(self) -> dict[str, Any]:
        """GPU 0's name, memory and driver; ``available: False`` with the reason where there is none."""
        if self.handle is None:
            return {"available": False, "reason": self.reason}
        import pynvml

        try:
            memory = pynvml.nvmlDeviceGetMemoryInfo(self.handle)
            return {
                "available": True, "name": nvml_text(pynvml.nvmlDeviceGetName(self.handle)), "count": self.count,
                "memory_total_mib": round(memory.total / 2**20),
                "driver": nvml_text(pynvml.nvmlSystemGetDriverVersion()),
                "cuda_driver": pynvml.nvmlSystemGetCudaDriverVersion_v2(),
            }  # fmt: skip
        except Exception as exc:  # a device NVML cannot describe is one a reader should know of
            return {"available": False, "reason": f"NVML cannot describe GPU 0: {type(exc).__name__}: {exc}"}

    def sample(self) -> tuple[int, int]:
        """GPU 0's % busy and memory used (bytes) now; raises where NVML cannot tell."""
        import pynvml

        if self.handle is None:
            raise RuntimeError(self.reason)
        busy = int(pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
        return busy, int(pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
