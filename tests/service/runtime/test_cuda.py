"""Finding CUDA: the libraries preloaded from NVIDIA's wheels, the reason a session that wanted CUDA did not get
it (a library made to be missing here), and the CUDA provider's options from the settings."""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.runtime import cuda, sizing
from service.runtime.session import ModelLoadError, load_model
from service.settings import Settings
from service.store.layout import ModelStore


def _provider_loads() -> bool:
    return "CUDA provider cannot load" not in cuda.unavailable_reason()


needs_no_cuda = pytest.mark.skipif(_provider_loads(), reason="CUDA's libraries load here; tests -m gpu cover it")


PLAIN = "int plain(void) { return 1; }\n"  # a library that loads and needs nothing


def _compile(tmp_path: Path, library: Path, source: str, *link: str) -> Path:
    """``source`` built as the shared library ``library`` (its soname: its file name), linked with ``link``."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "a C compiler (make test-tools installs gcc)"
    (tmp_path / f"{library.name}.c").write_text(source)
    library.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([compiler, "-shared", "-fPIC", f"-Wl,-soname,{library.name}", "-o", str(library),
                    str(tmp_path / f"{library.name}.c"), *link], check=True)  # fmt: skip
    return library


def _library_needing(tmp_path: Path, missing: str) -> Path:
    """A shared library that needs the library named ``missing`` (its soname), which is then taken away."""
    dependency = _compile(tmp_path, tmp_path / missing, "int dep(void) { return 1; }\n")
    library = _compile(tmp_path, tmp_path / "libneeds.so", "int dep(void);\nint uses(void) { return dep(); }\n",
                       f"-L{tmp_path}", f"-l:{missing}")  # fmt: skip
    dependency.unlink()
    return library


def test_the_reason_names_the_library_that_is_missing(tmp_path: Path) -> None:
    reason = cuda.unavailable_reason(_library_needing(tmp_path, "libcublasLtmadeup.so.13"))
    assert "libcublasLtmadeup.so.13: cannot open shared object file" in reason
    assert "requirements/gpu.txt" in reason  # and what would fix it


@pytest.mark.skipif(ctypes.util.find_library("cuda") is not None, reason="the NVIDIA driver's library is here")
def test_a_missing_driver_library_is_blamed_on_the_driver_not_the_wheels(tmp_path: Path) -> None:
    reason = cuda.unavailable_reason(_library_needing(tmp_path, "libcuda.so.1"))
    assert "libcuda.so.1: cannot open shared object file" in reason
    assert "install the NVIDIA driver" in reason and "requirements/gpu.txt" not in reason


def test_a_missing_cudnn_is_named_where_the_provider_itself_loads(tmp_path: Path) -> None:
    """cuDNN is opened by the provider when a session starts, not by the loader: it is looked for by itself."""
    loadable = _compile(tmp_path, tmp_path / "libplain.so", PLAIN)  # a provider library that loads
    reason = cuda.unavailable_reason(loadable, cudnn="libcudnnmadeup.so.9")
    assert "cuDNN 9 cannot load (libcudnnmadeup.so.9: cannot open shared object file" in reason
    assert "CUDA provider cannot load" not in reason


def test_the_reason_for_a_provider_library_that_is_not_there(tmp_path: Path) -> None:
    reason = cuda.unavailable_reason(tmp_path / "libonnxruntime_providers_cuda.so")
    assert "libonnxruntime_providers_cuda.so" in reason and "cannot open shared object file" in reason


def test_a_provider_library_that_needs_its_host_library_is_not_reported_missing(tmp_path: Path) -> None:
    """ONNX Runtime's CUDA provider library takes symbols from ``libonnxruntime_providers_shared.so``, which ONNX
    Runtime loads globally before it: asked alone, the loader refuses the provider ("undefined symbol"), and a GPU
    machine with every library in place read as one without CUDA."""
    folder = tmp_path / "capi"
    _compile(tmp_path, folder / cuda.SHARED_LIBRARY, "int cnn_test_provider_host(void) { return 1; }\n")
    provider = _compile(
        tmp_path,
        folder / "libprovider.so",
        "int cnn_test_provider_host(void);\nint uses(void) { return cnn_test_provider_host(); }\n",
    )
    cudnn = _compile(tmp_path, tmp_path / "libcudnnstandin.so.9", PLAIN)
    reason = cuda.unavailable_reason(provider, cudnn=str(cudnn))
    assert "CUDA provider cannot load" not in reason and "undefined symbol" not in reason
    assert "cuDNN" not in reason


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """NVML answering as a given driver and GPUs would (this machine has neither): ``driver(version, cuda, names,
    capabilities)`` (one GPU, or a list of each), or ``missing=`` the queries an older driver lacks. The real answer
    is asked again afterwards."""

    def answer(version: str, runs: int, names: str | list[str], capabilities: tuple[int, int] | list[tuple[int, int]],
               missing: tuple[str, ...] = (), shutdown_fails: bool = False) -> None:  # fmt: skip
        names = [names] if isinstance(names, str) else names
        capabilities = capabilities if isinstance(capabilities, list) else [capabilities]

        def lacking(*_: object) -> None:
            raise RuntimeError("NVMLError_FunctionNotFound")

        fake = types.SimpleNamespace(
            nvmlInit=lambda: None,
            nvmlShutdown=lambda: None,
            nvmlDeviceGetCount=lambda: len(names),
            nvmlSystemGetDriverVersion=lambda: version,
            nvmlSystemGetCudaDriverVersion=lambda: runs,
            nvmlDeviceGetHandleByIndex=lambda index: index,
            nvmlDeviceGetName=lambda device: names[device].encode(),  # older bindings answer bytes
            nvmlDeviceGetCudaComputeCapability=lambda device: capabilities[device],
        )
        for query in missing:
            setattr(fake, query, lacking)
        if shutdown_fails:  # another library shut NVML down once too often
            fake.nvmlShutdown = lacking
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        cuda._nvml.cache_clear()

    yield answer
    cuda._nvml.cache_clear()
    cuda._said_unusable.cache_clear()


@pytest.mark.skipif(cuda.CUDA_MAJOR != "13", reason="these figures are CUDA 13's (onnxruntime-gpu 1.31)")
def test_a_driver_too_old_for_cuda_13_is_named_with_the_release_that_runs_it(driver: Callable[..., None]) -> None:
    driver("550.54.15", 12040, "NVIDIA A100-SXM4-80GB", (8, 0))
    reason = cuda.unavailable_reason()
    assert "the NVIDIA driver 550.54.15 runs CUDA 12.4 at most" in reason
    assert "built for CUDA 13: install NVIDIA's driver 580 or newer" in reason
    assert "reports no GPU" not in reason and "compute capability" not in reason  # an A100 runs CUDA 13
    assert cuda.gpu_count() == 1


@pytest.mark.skipif(cuda.CUDA_MAJOR != "13", reason="these figures are CUDA 13's (onnxruntime-gpu 1.31)")
def test_a_gpu_cuda_13_dropped_is_named_with_its_compute_capability(driver: Callable[..., None]) -> None:
    driver("580.65.06", 13000, "Tesla V100-SXM2-16GB", (7, 0))
    reason = cuda.unavailable_reason()
    assert "Tesla V100-SXM2-16GB has compute capability 7.0" in reason and "7.5 or newer" in reason
    assert "NVIDIA driver" not in reason  # 580 runs CUDA 13


def test_a_shutdown_that_fails_changes_nothing_asked(driver: Callable[..., None]) -> None:
    driver("580.159.03", 13000, "NVIDIA H200", (9, 0), shutdown_fails=True)
    assert cuda.gpu_count() == 1 and cuda.unusable_gpu() == "" and cuda.wanted_providers("auto")[0] == cuda.CUDA


def test_a_host_mixing_generations_is_judged_by_its_newest_gpu(driver: Callable[..., None]) -> None:
    """NVML's order is not CUDA's: a V100 listed first beside an A100 does not make the host one CUDA 13 cannot run;
    two V100s do."""
    driver("580.65.06", 13000, ["Tesla V100-SXM2-16GB", "NVIDIA A100-SXM4-80GB"], [(7, 0), (8, 0)])
    assert cuda.unusable_gpu() == "" and cuda.wanted_providers("auto")[0] == cuda.CUDA
    driver("580.65.06", 13000, ["Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB"], [(7, 0), (7, 0)])
    assert "the newest of its 2 GPUs, Tesla V100-SXM2-16GB, has compute capability 7.0" in cuda.unusable_gpu()


def test_a_driver_and_gpu_that_run_cuda_13_are_not_blamed(driver: Callable[..., None]) -> None:
    driver("580.159.03", 13000, "NVIDIA H200", (9, 0))
    assert cuda.driver_problems(cuda._nvml()) == []
    assert cuda._nvml().name == "NVIDIA H200"  # bytes from NVML read as text


def test_a_driver_lacking_the_newer_queries_still_counts_its_gpu(driver: Callable[..., None]) -> None:
    """Only the driver's answers that say why CUDA would not run are lost: the GPU is still there for PROVIDERS=auto."""
    driver("470.82.01", 11040, "Tesla T4", (7, 5), missing=("nvmlSystemGetCudaDriverVersion",))
    assert cuda.gpu_count() == 1 and cuda.driver_problems(cuda._nvml()) == []
    assert cuda.wanted_providers("auto")[0] == cuda.CUDA


def test_auto_serves_a_gpu_cuda_13_cannot_run_on_the_cpu_and_says_so_once(
    driver: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    """A V100's sessions could take CUDA and fail at their first run (no kernels for it): PROVIDERS=auto asks for the
    CPU alone there, as on a machine without a GPU, and says why once."""
    driver("580.65.06", 13000, "Tesla V100-SXM2-16GB", (7, 0))
    cuda._said_unusable.cache_clear()
    with caplog.at_level("WARNING", logger=cuda.__name__):
        assert cuda.providers_for(Settings(providers="auto"), "fp32") == [cuda.CPU]
        assert not cuda.wants_cuda(Settings(providers="auto"))  # the CPU's sizing and topology, too
    said = [r.getMessage() for r in caplog.records if "PROVIDERS=auto serves on the CPU" in r.getMessage()]
    assert len(said) == 1 and "Tesla V100-SXM2-16GB has compute capability 7.0" in said[0]
    assert cuda.providers_for(Settings(providers="cuda"), "fp32")[0][0] == cuda.CUDA  # asked for: tried, and told


def test_providers_cuda_fails_a_model_on_a_gpu_cuda_13_cannot_run(
    driver: Callable[..., None], model_store: ModelStore
) -> None:
    driver("550.54.15", 12040, "NVIDIA A100-SXM4-80GB", (8, 0))
    stored = model_store.latest("lenet5")
    assert stored is not None
    with pytest.raises(ModelLoadError, match=r"PROVIDERS=cuda, but CUDA cannot run on this machine: the NVIDIA "
                                             r"driver 550\.54\.15 runs CUDA 12\.4 at most"):  # fmt: skip
        load_model(model_store, stored, Settings(providers="cuda"))


def test_preload_finds_nvidia_wheels_on_the_python_path(tmp_path: Path) -> None:
    """onnxruntime-gpu installed apart from NVIDIA's CUDA wheels (an image's PyTorch brought them): ONNX Runtime's
    own preload looks only beside itself, the service's finds them on sys.path. Stand-in libraries with the wheels'
    names, in a fresh process (a library's name, once loaded, would stand for the real one in this one)."""
    cu = tmp_path / "site" / "nvidia" / f"cu{cuda.CUDA_MAJOR}" / "lib"
    names = [f"libcublasLt.so.{cuda.CUDA_MAJOR}", f"libcublas.so.{cuda.CUDA_MAJOR}", "libcurand.so.10",
             f"libcudart.so.{cuda.CUDA_MAJOR}"]  # fmt: skip
    for name in names:
        _compile(tmp_path, cu / name, PLAIN)
    cudnn = tmp_path / "site" / "nvidia" / "cudnn" / "lib"
    _compile(tmp_path, cudnn / cuda.CUDNN_LIBRARY, PLAIN)
    script = (f"import sys; sys.path.append({str(tmp_path / 'site')!r})\n"
              "from service.runtime import cuda\n"
              "print(cuda.wheel_directories()); lines = cuda.preload()\n"
              "print('|'.join(lines)); print(open('/proc/self/maps').read())\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[3], capture_output=True,
                          text=True, check=True)  # fmt: skip
    directories, complaints, maps = done.stdout.split("\n", 2)
    assert str(cu) in directories and str(cudnn) in directories
    for path in [*(cu / name for name in names), cudnn / cuda.CUDNN_LIBRARY]:
        assert str(path) in maps, f"{path} was not loaded"
    assert "libcublasLt" not in complaints  # found, so not complained of


@needs_no_cuda
def test_preload_keeps_its_complaints_out_of_stdout_and_returns_them(capsys: pytest.CaptureFixture[str]) -> None:
    """Without CUDA's libraries, ONNX Runtime's preload prints what it could not load: that goes to the log (and
    back to the caller), never to the server's stdout."""
    cuda.preload.cache_clear()
    lines = cuda.preload()
    assert capsys.readouterr().out == ""
    assert any("libcublasLt.so.13" in line for line in lines)


@needs_no_cuda
def test_providers_cuda_fails_a_model_with_the_missing_library(model_store: ModelStore) -> None:
    stored = model_store.latest("lenet5")
    assert stored is not None
    with pytest.raises(ModelLoadError) as raised:
        load_model(model_store, stored, Settings(providers="cuda"))
    message = str(raised.value)
    assert "PROVIDERS=cuda, but the CUDA execution provider did not take the session" in message
    assert ".so" in message and "cannot open shared object file" in message and "requirements/gpu.txt" in message
    if cuda.gpu_count() == 0:  # this machine: no driver either, said first
        assert "the NVIDIA driver reports no GPU" in message.split("ONNX Runtime's CUDA provider")[0]


def test_auto_without_a_gpu_asks_for_the_cpu_alone_and_preloads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "gpu_count", lambda: 0)
    monkeypatch.setattr(cuda, "preload", lambda: pytest.fail("preloaded CUDA on a machine without a GPU"))
    assert cuda.providers_for(Settings(providers="auto"), "fp32") == [cuda.CPU]
    assert cuda.providers_for(Settings(providers="cpu"), "fp16") == [cuda.CPU]


@pytest.mark.parametrize(
    ("env", "precision", "expected"),
    [
        ({}, "fp32", {"cudnn_conv_algo_search": "HEURISTIC", "prefer_nhwc": "0", "use_tf32": "1"}),
        ({}, "fp16", {"cudnn_conv_algo_search": "HEURISTIC", "prefer_nhwc": "1", "use_tf32": "1"}),
        ({"cuda_prefer_nhwc": "on", "cuda_tf32": False, "cuda_conv_algo_search": "EXHAUSTIVE"}, "fp32",
         {"cudnn_conv_algo_search": "EXHAUSTIVE", "prefer_nhwc": "1", "use_tf32": "0"}),
        ({"cuda_prefer_nhwc": "off"}, "fp16", {"cudnn_conv_algo_search": "HEURISTIC", "prefer_nhwc": "0",
                                                "use_tf32": "1"}),
    ],
)  # fmt: skip
def test_cuda_options_follow_the_settings_and_the_precision(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, object], precision: str, expected: dict[str, str]
) -> None:
    monkeypatch.setattr(cuda, "preload", lambda: ())
    providers = cuda.providers_for(Settings(providers="cuda", **env), precision)  # type: ignore[arg-type]
    assert providers == [(cuda.CUDA, expected), cuda.CPU]


@pytest.mark.parametrize(
    ("on_cuda", "env", "inline"),
    [(True, {}, 0), (True, {"INLINE_DECODE_BYTES": "20000"}, 20000), (False, {}, 16384)],
)
def test_on_cuda_images_decode_off_the_event_loop_unless_set(
    monkeypatch: pytest.MonkeyPatch, on_cuda: bool, env: dict[str, str], inline: int
) -> None:
    """Where the models run on CUDA the event loop is the worker's limit: INLINE_DECODE_BYTES goes to 0, unless the
    environment set it; on the CPU it stays where it is fastest there."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sizing, "wants_cuda", lambda settings: on_cuda)
    assert sizing.sized(Settings(workers=1)).inline_decode_bytes == inline
