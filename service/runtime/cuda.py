"""CUDA for ONNX Runtime: whether a GPU is there, finding CUDA's libraries, and what a session asks for.

``onnxruntime-gpu`` lists the CUDA provider on any machine; the provider works only where the
NVIDIA driver reports a GPU and the dynamic loader finds CUDA 13 and cuDNN 9
(``libcublasLt.so.13``, ``libcudnn.so.9``, ...). They come from a CUDA installation or from
NVIDIA's pip wheels (``requirements/gpu.txt``), which the loader does not search by itself:
:func:`preload` loads them from there, once per worker at its start (before it accepts a
connection or starts a loading thread: ONNX Runtime's preload prints, and its print is caught by
swapping the process's ``sys.stdout``), and :func:`unavailable_reason` names what is still missing
(the driver, or one too old for CUDA 13, a GPU too old for its libraries, a CUDA library, cuDNN), so a model
that wanted CUDA and got the CPU says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import sys
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import onnxruntime as ort
from onnxruntime.capi import build_and_package_info

from ..settings import Settings
from . import cuda_graphs

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# what ONNX Runtime loads to start its CUDA provider; its missing dependencies are CUDA's and cuDNN's libraries
PROVIDER_LIBRARY = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
# which ONNX Runtime loads first, globally: the provider library needs its symbols to load at all
SHARED_LIBRARY = "libonnxruntime_providers_shared.so"
# the CUDA major version onnxruntime-gpu was built for (13 for 1.31): the libraries it needs are named after it
CUDA_MAJOR = (getattr(build_and_package_info, "cuda_version", "") or "13").split(".")[0]
CUDNN_LIBRARY = "libcudnn.so.9"  # opened by the provider when a session starts, not a dependency of its library
DRIVER_LIBRARY = "libcuda.so.1"  # the NVIDIA driver's, never a wheel's
INSTALL_HINT = "install requirements/gpu.txt (onnxruntime-gpu[cuda,cudnn]) or CUDA 13 and cuDNN 9"
DRIVER_HINT = "install the NVIDIA driver (in a container: run it with the NVIDIA Container Toolkit)"
_preloading = threading.Lock()


# what CUDA's major versions need of the driver and the GPU: the driver's newest CUDA (NVML's number, major * 1000
# + minor * 10), its first release, and the oldest compute capability their libraries carry kernels for
NEEDS = {"12": (12_000, "525", (5, 0)), "13": (13_000, "580", (7, 5))}


@dataclass(frozen=True)
class Driver:
    """What the NVIDIA driver reports: its GPUs, its version and the newest CUDA it runs, the newest GPU's name and
    compute capability; ``problem`` where it could not be asked."""

    count: int = 0
    problem: str | None = None
    version: str = ""
    cuda: int = 0  # NVML's number: 12040 for CUDA 12.4
    name: str = ""
    capability: tuple[int, int] = (0, 0)


def nvml_text(value: str | bytes) -> str:
    """An NVML string as text: older bindings answer bytes."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@cache
def _nvml() -> Driver:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no library: no usable GPU
        return Driver(0, f"{type(exc).__name__}: {exc}")
    try:
        count = int(pynvml.nvmlDeviceGetCount())
    except Exception as exc:  # no device
        _shut_down(pynvml)
        return Driver(0, f"{type(exc).__name__}: {exc}")
    try:  # what says why CUDA would not run there: asked apart, so that a query a driver lacks costs only itself
        version, runs = nvml_text(pynvml.nvmlSystemGetDriverVersion()), int(pynvml.nvmlSystemGetCudaDriverVersion())
        if count == 0:
            return Driver(0, None, version, runs)
        # the newest GPU: NVML's order is not CUDA's (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER), so a host that
        # mixes generations is never judged by a GPU its sessions may not run on
        devices = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        capabilities = [pynvml.nvmlDeviceGetCudaComputeCapability(d) for d in devices]
        newest = max(range(count), key=lambda i: tuple(capabilities[i]))
        major, minor = capabilities[newest]
        name = nvml_text(pynvml.nvmlDeviceGetName(devices[newest]))
        return Driver(count, None, version, runs, name, (int(major), int(minor)))
    except Exception as exc:
        logger.debug("NVML: %s GPUs, no more known (%s: %s)", count, type(exc).__name__, exc)
        return Driver(count)
    finally:
        _shut_down(pynvml)


def _shut_down(pynvml: Any) -> None:
    """NVML's shutdown, whose failure (another library shut it down once too often) changes nothing asked."""
    with contextlib.suppress(Exception):
        pynvml.nvmlShutdown()


def gpu_count() -> int:
    """GPUs the NVIDIA driver reports; 0 without a driver (onnxruntime-gpu lists CUDA regardless)."""
    return _nvml().count


def driver_problems(driver: Driver) -> list[str]:
    """What keeps the driver's GPU from running this onnxruntime-gpu's CUDA: no GPU, a driver older than its CUDA
    major version, a GPU older than its libraries' kernels."""
    if driver.count == 0:
        return [f"the NVIDIA driver reports no GPU ({driver.problem or 'no device'})"]
    runs, first, oldest = NEEDS.get(CUDA_MAJOR, (int(CUDA_MAJOR) * 1000, "a newer one", (0, 0)))
    problems = []
    if driver.cuda and driver.cuda < runs:
        problems.append(
            f"the NVIDIA driver {driver.version} runs CUDA {driver.cuda // 1000}.{driver.cuda % 1000 // 10} at most, "
            f"and onnxruntime-gpu {ort.__version__} is built for CUDA {CUDA_MAJOR}: install NVIDIA's driver "
            f"{first} or newer"
        )
    if driver.capability != (0, 0) and driver.capability < oldest:
        which = f"the newest of its {driver.count} GPUs, {driver.name}," if driver.count > 1 else driver.name
        problems.append(
            f"{which} has compute capability {driver.capability[0]}.{driver.capability[1]}, and "
            f"CUDA {CUDA_MAJOR}'s libraries need {oldest[0]}.{oldest[1]} or newer"
        )
    return problems


def unusable_gpu() -> str:
    """Why the GPU the driver reports cannot run this onnxruntime-gpu's CUDA (a driver or a GPU too old); empty where
    it can, or where there is no GPU (what :func:`unavailable_reason` says, with the libraries)."""
    driver = _nvml()
    return "; ".join(driver_problems(driver)) if driver.count > 0 else ""


@cache
def _said_unusable(reason: str) -> None:  # once per process: the providers are asked for at every model's load
    logger.warning("PROVIDERS=auto serves on the CPU: the GPU cannot run CUDA %s here: %s", CUDA_MAJOR, reason)


def wanted_providers(choice: str) -> list[str]:
    if choice == "cpu":
        return [CPU]
    if choice == "cuda":
        return [CUDA, CPU]
    if CUDA in ort.get_available_providers() and gpu_count() > 0:
        if reason := unusable_gpu():  # its sessions could take CUDA and fail at their first run: the CPU instead
            _said_unusable(reason)
            return [CPU]
        return [CUDA, CPU]
    return [CPU]


def wheel_directories() -> tuple[Path | None, Path | None]:
    """Where NVIDIA's CUDA 13 and cuDNN 9 wheels put their libraries (``nvidia/cu13/lib``, ``nvidia/cudnn/lib``):
    beside ONNX Runtime first (where ``onnxruntime.preload_dlls`` looks), then on ``sys.path`` (onnxruntime-gpu
    installed apart from the wheels, as beside an image's PyTorch)."""
    roots = [Path(ort.__file__).parent.parent, *(Path(entry) for entry in sys.path if entry)]
    found: list[Path | None] = []
    for parts, library in ((("nvidia", f"cu{CUDA_MAJOR}", "lib"), f"libcublasLt.so.{CUDA_MAJOR}"),
                           (("nvidia", "cudnn", "lib"), CUDNN_LIBRARY)):  # fmt: skip
        found.append(next((root.joinpath(*parts) for root in roots if root.joinpath(*parts, library).is_file()), None))
    return found[0], found[1]


@cache
def preload() -> tuple[str, ...]:
    """Load CUDA's and cuDNN's libraries from NVIDIA's pip wheels (or the loader's paths), once per process.

    ONNX Runtime's :func:`onnxruntime.preload_dlls` prints what it could not load; its lines are
    returned (and logged) instead, for :func:`unavailable_reason` to be the one word on it.
    """
    printed = io.StringIO()
    libraries, cudnn = wheel_directories()
    with _preloading:  # one at a time: nested redirections could leave sys.stdout swapped for good
        try:
            with contextlib.redirect_stdout(printed):
                for wanted, directory in (("cuda", libraries), ("cudnn", cudnn)):
                    where = None if directory is None else str(directory)  # None: ONNX Runtime's own search
                    ort.preload_dlls(cuda=wanted == "cuda", cudnn=wanted == "cudnn", msvc=False, directory=where)
        except Exception as exc:  # a preload that fails leaves the loader's own paths, which may still work
            print(f"preload_dlls failed: {type(exc).__name__}: {exc}", file=printed)
    lines = tuple(line for line in printed.getvalue().splitlines() if line.strip())
    logger.debug("CUDA preload from %s and %s", libraries or "the loader's paths", cudnn or "the loader's paths")
    for line in lines:
        logger.debug("CUDA preload: %s", line)
    return lines


def unavailable_reason(library: Path = PROVIDER_LIBRARY, cudnn: str = CUDNN_LIBRARY) -> str:
    """Why a session that asked for CUDA did not get it: every problem found, the driver's first."""
    problems = driver_problems(_nvml())
    with contextlib.suppress(OSError):  # what the provider's library takes its host's symbols from (else: "undefined
        ctypes.CDLL(str(library.with_name(SHARED_LIBRARY)), mode=ctypes.RTLD_GLOBAL)  # symbol: Provider_GetHost")
    try:
        ctypes.CDLL(str(library))
    except OSError as exc:
        hint = DRIVER_HINT if DRIVER_LIBRARY in str(exc) else INSTALL_HINT
        problems.append(f"ONNX Runtime's CUDA provider cannot load ({exc}): {hint}")
    else:
        try:
            ctypes.CDLL(cudnn)
        except OSError as exc:
            problems.append(f"cuDNN 9 cannot load ({exc}): {INSTALL_HINT}")
    return "; ".join(problems) or "ONNX Runtime's CUDA provider did not take the session (its log above says why)"


def provider_options(settings: Settings, precision: str, *, graphs: bool = False) -> dict[str, str]:
    """The CUDA provider's options for a graph of ``precision`` (``fp32``, ``fp16``, ``int8``); ``graphs``: a
    classifier's session, which captures CUDA graphs where ``CUDA_GRAPHS`` says so (never an explanation's)."""
    nhwc = settings.cuda_prefer_nhwc == "on" or (settings.cuda_prefer_nhwc == "auto" and precision == "fp16")
    options = {
        "cudnn_conv_algo_search": settings.cuda_conv_algo_search,
        "prefer_nhwc": str(int(nhwc)),
        "use_tf32": str(int(settings.cuda_tf32)),
    }
    if graphs and settings.cuda_graphs == "on":
        options[cuda_graphs.ENABLE_OPTION] = "1"
    return options


def wants_cuda(settings: Settings) -> bool:
    return CUDA in wanted_providers(settings.providers)


Providers = list[str | tuple[str, dict[str, str]]]


def providers_for(settings: Settings, precision: str, *, graphs: bool = False) -> Providers:
    """What a session of a ``precision`` graph asks for: CUDA (with its options) then the CPU, or the CPU alone
    (``PROVIDERS``). The process that opens the session preloads CUDA's libraries (session_host.open_session)."""
    if not wants_cuda(settings):
        return [CPU]
    return [(CUDA, provider_options(settings, precision, graphs=graphs)), CPU]
