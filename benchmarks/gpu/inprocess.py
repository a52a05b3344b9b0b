"""What the hardware gives without the service: ONNX Runtime on the exported graph, PyTorch, and JPEG decoding.

    python -m benchmarks.gpu.inprocess ceiling --store DIR --model resnet50_fp16 --providers cuda \\
        --options '{"cudnn_conv_algo_search": "HEURISTIC", "prefer_nhwc": "1"}' --batches 1,8 --seconds 1
    python -m benchmarks.gpu.inprocess anchor --batches 256,64 --seconds 1

Each prints its result as a JSON line (the ceiling, one after each batch size: the last is the answer, and a
ceiling killed part-way leaves the sizes it timed). The ceiling and the anchor run in a subprocess each: the
benchmark's own process never creates a CUDA context (its memory would be missing from the servers measured next),
PyTorch's CUDA libraries never meet ONNX Runtime's in one process, and a provider that crashes fails one stage
rather than the benchmark.

The ceiling times the graph at each batch size two ways: ``session.run`` on a numpy array (what the service does:
the input crosses to the device and the outputs back on every call) and IOBinding (the input copied to the device
once beforehand, the outputs left there: the graph alone); at the service's batch shapes a third, the service's
``CUDA_GRAPHS=on`` session (each shape's CUDA graph replayed on its fixed buffers, the batch copied in and the
answers out on every call; on the CPU the same buffers without a graph). The anchor is torchvision's ResNet-50 in FP16,
channels_last, under ``torch.inference_mode()``, fed the same uint8 NHWC pixels already on the GPU and doing the
cast and normalisation the ONNX graph does inside: what ONNX Runtime's FP16 graph is held against.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.runtime.cuda import CPU, CUDA
from service.store.metadata import InputMeta

# a ceiling's words where CUDA's provider refused the graph: the benchmark skips the served stages on them
NOT_TAKEN = "did not take the session"
# what ImageNet networks take (the export's metadata for resnet50): the decode rate's target
IMAGENET = InputMeta(size=224, channels=3, resize=256, crop=224, mean=[0.485, 0.456, 0.406],
                     std=[0.229, 0.224, 0.225])  # fmt: skip


def row(path: str, batch: int, latencies: list[float], seconds: float, first: float | None) -> dict[str, Any]:
    """One timed batch size: images/s over every call, latency percentiles, and the first call's time (a new
    shape's set-up: allocation, and on CUDA with an exhaustive search, the convolution algorithms' trials), or
    ``None`` where the shape had run already on this session (its first call would not be a new shape's)."""
    from ..load import summarise

    found = summarise(path, "", batch, latencies, 0, seconds, batch)
    return {"path": path, "batch": batch, "calls": found.requests, "images_per_s": found.images_per_s,
            "p50_ms": found.p50_ms, "p99_ms": found.p99_ms,
            "first_call_ms": None if first is None else round(first * 1000, 2)}  # fmt: skip


def first_then_timed(call: Callable[[], object], seconds: float) -> tuple[float, list[float], float]:
    """The first call's time, then ``call`` repeated for ``seconds`` (after one more untimed call)."""
    from ..run import timed_runs

    started = time.perf_counter()
    call()
    first = time.perf_counter() - started
    call()
    latencies, total = timed_runs(call, seconds)
    return first, latencies, total


def ceiling(store_dir: Path, model: str, providers: str, options: dict[str, str], batches: Sequence[int],
            seconds: float, graph_batches: Sequence[int] = ()) -> dict[str, Any]:  # fmt: skip
    """ONNX Runtime on ``model``'s latest graph with the service's session options and ``options`` for CUDA; at
    ``graph_batches``, the service's CUDA_GRAPHS=on path as well (:func:`graphed`)."""
    import onnxruntime as ort

    from service.runtime.cuda import preload, unavailable_reason
    from service.runtime.session import session_options
    from service.settings import Settings
    from service.store.layout import ModelStore
    from service.store.metadata import ModelMetadata
    from service.store.tensors import INPUT_NAME

    version = ModelStore(store_dir).latest(model)
    if version is None:
        raise RuntimeError(f"{model} is not in the store {store_dir}")
    spec = ModelMetadata.model_validate(version.read_metadata()).input
    if providers == "cuda" and CUDA not in ort.get_available_providers():
        raise RuntimeError(f"onnxruntime {ort.__version__} ({ort.__file__}) has no {CUDA} "
                           f"(it has {ort.get_available_providers()}): onnxruntime-gpu is needed")  # fmt: skip
    complaints: tuple[str, ...] = ()
    if providers == "cuda":
        complaints = preload()  # CUDA's and cuDNN's libraries from NVIDIA's wheels, as the service loads them
    wanted: list[Any] = [(CUDA, {"device_id": "0", **options}), CPU] if providers == "cuda" else [CPU]
    options_used = session_options(Settings())
    session = ort.InferenceSession(str(version.graph), options_used, providers=wanted)
    session.disable_fallback()  # as the service's: a failed CUDA run is an error, not a CPU figure
    taken = session.get_providers()
    if providers == "cuda" and taken[0] != CUDA:
        said = f"; the preload said: {' | '.join(complaints)}" if complaints else ""
        raise RuntimeError(f"{CUDA} {NOT_TAKEN} (it runs on {taken}): {unavailable_reason()}{said}")
    device = "cuda" if taken[0] == CUDA else "cpu"
    outputs = [o.name for o in session.get_outputs()]
    runs: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    found = {"model": model, "precision": version.read_metadata().get("precision", "fp32"),
             "providers_requested": [p if isinstance(p, str) else p[0] for p in wanted], "providers_taken": taken,
             "provider_options_requested": options,
             "provider_options": session.get_provider_options().get(taken[0], {}),
             "intra_op_threads": options_used.intra_op_num_threads, "onnxruntime": ort.__version__,
             "input": [spec.size, spec.size, spec.channels], "runs": runs, "errors": errors,
             "cuda_graph_error": None}  # fmt: skip
    graphs = Graphed(lambda: graphed(session, str(version.graph), options_used, wanted, device))
    rng = np.random.default_rng(0)
    for batch in batches:
        images = rng.integers(0, 256, (batch, spec.size, spec.size, spec.channels), dtype=np.uint8)
        try:
            first, latencies, total = first_then_timed(lambda: session.run(None, {INPUT_NAME: images}), seconds)  # noqa: B023
            runs.append(row("numpy", batch, latencies, total, first))
            binding = session.io_binding()
            binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(images, device, 0))
            for name in outputs:
                binding.bind_output(name, device)

            def bound() -> None:
                session.run_with_iobinding(binding)  # noqa: B023
                binding.synchronize_outputs()  # noqa: B023

            _, latencies, total = first_then_timed(bound, seconds)
            runs.append(row("iobinding", batch, latencies, total, None))  # the numpy path ran this shape first
        except Exception as exc:  # out of GPU memory at the largest batch, say: the smaller ones' figures stay
            errors.append({"batch": batch, "error": f"{type(exc).__name__}: {exc}"[:1000]})
            print(f"{model} batch {batch}: {errors[-1]['error']}", file=sys.stderr, flush=True)  # noqa: T201
            continue
        numpy_rate, bound_rate = runs[-2]["images_per_s"], runs[-1]["images_per_s"]
        message = f"{model} batch {batch}: {numpy_rate:.0f} images/s (numpy), {bound_rate:.0f} (IOBinding)"
        if batch in graph_batches and (captured := graphs.session(found)) is not None:
            try:
                first, latencies, total = first_then_timed(lambda: captured.run(None, {INPUT_NAME: images}), seconds)  # noqa: B023
            except Exception as exc:  # its capture failed: the other paths' figures stand
                found["cuda_graph_error"] = f"batch {batch}: {type(exc).__name__}: {exc}"[:1000]
                graphs.failed = True
            else:
                runs.append(row(graph_path(device), batch, latencies, total, first))
                message += f", {runs[-1]['images_per_s']:.0f} ({graph_path(device)})"
        print(message, file=sys.stderr, flush=True)  # noqa: T201
        print(json.dumps(found), flush=True)  # noqa: T201  # so far: a run killed part-way keeps these sizes
    if not runs:
        raise RuntimeError(f"no batch size ran: {errors[0]['error'] if errors else 'none asked for'}")
    return found


def graph_path(device: str) -> str:
    """The row of the CUDA_GRAPHS=on path: its graphs on CUDA; on the CPU (the dry run) the same buffers, no graph."""
    return "cuda-graph" if device == "cuda" else "fixed-buffers"


def graphed(session: Any, graph: str, options: Any, providers: list[Any], device: str) -> Any:
    """The service's CUDA_GRAPHS=on session (service.runtime.cuda_graphs): on CUDA a second session of the graph with
    ``enable_cuda_graph``, opened as the service opens it; on the CPU ``session`` itself on fixed buffers."""
    from service.runtime.cuda_graphs import ENABLE_OPTION, CapturedSession
    from service.runtime.session_host import inference_session

    if device != "cuda":
        return CapturedSession(session, "cpu")
    return inference_session(graph, options, [(CUDA, {**providers[0][1], ENABLE_OPTION: "1"}), CPU])


class Graphed:
    """The CUDA_GRAPHS=on session, opened at its first batch; a session that cannot be opened is said once."""

    def __init__(self, opener: Callable[[], Any]) -> None:
        self._opener, self._session, self.failed = opener, None, False

    def session(self, found: dict[str, Any]) -> Any:
        if self._session is None and not self.failed:
            try:
                self._session = self._opener()
            except Exception as exc:  # ONNX Runtime refused the graphs (a node off CUDA, say)
                found["cuda_graph_error"] = f"{type(exc).__name__}: {exc}"[:1000]
                self.failed = True
        return None if self.failed else self._session


def anchor(batches: Sequence[int], seconds: float) -> dict[str, Any]:
    """torchvision's ResNet-50 (random weights) in FP16 on the GPU: images/s per batch size, or ``None`` with why."""
    try:
        import torch
        import torchvision
    except Exception as exc:  # missing, or its CUDA libraries fail to load
        return {"images_per_s": None, "reason": f"torch and torchvision cannot be imported: {exc}"}
    if not torch.cuda.is_available():
        return {"images_per_s": None, "reason": f"torch {torch.__version__} sees no CUDA device"}
    torch.backends.cudnn.benchmark = True  # PyTorch at its best: cuDNN's algorithms timed for each shape
    model = torchvision.models.resnet50().eval().half().cuda().to(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET.mean, device="cuda", dtype=torch.half).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET.std, device="cuda", dtype=torch.half).view(1, 3, 1, 1) * 255
    runs = []
    for batch in batches:
        pixels = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device="cuda")

        def step() -> None:
            with torch.inference_mode():  # NHWC in memory, NCHW in shape: channels_last, as the model's weights
                model(pixels.permute(0, 3, 1, 2).half().sub_(mean).div_(std))  # noqa: B023
            torch.cuda.synchronize()

        for _ in range(2):  # cuDNN's trials for this shape
            step()
        first, latencies, total = first_then_timed(step, seconds)
        runs.append(row("torch-fp16", batch, latencies, total, first))
    return {"images_per_s": {str(r["batch"]): r["images_per_s"] for r in runs}, "reason": None, "runs": runs,
            "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "device": torch.cuda.get_device_name(0),
            "setup": "resnet50(), eval, FP16, channels_last, inference_mode, cudnn.benchmark; uint8 NHWC input on "
                     "the GPU, cast and normalised in the timed step"}  # fmt: skip


def decode_rate(files: Sequence[bytes], seconds: float, spec: InputMeta = IMAGENET) -> dict[str, Any]:
    """The service's preprocessing (decode, resize, centre crop) on one thread: images/s a core can feed."""
    from service.store.preprocess import preprocess

    from ..run import timed_runs

    turn = iter(range(10**12))
    latencies, total = timed_runs(lambda: preprocess(files[next(turn) % len(files)], spec, max_pixels=10**9), seconds)
    return {"images_per_s_per_core": round(len(latencies) / total, 1), "images": len(latencies),
            "p50_ms": round(float(np.median(latencies)) * 1000, 3), "file_bytes": [len(f) for f in files],
            "to": [spec.size, spec.size, spec.channels], "resize": spec.resize}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.inprocess", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("ceiling")
    one.add_argument("--store", type=Path, required=True)
    one.add_argument("--model", required=True)
    one.add_argument("--providers", choices=("cuda", "cpu"), required=True)
    one.add_argument("--options", default="{}", help="CUDA provider options, a JSON object")
    one.add_argument("--graph-batches", default="", help="comma-separated: the CUDA_GRAPHS=on path at these too")
    two = commands.add_parser("anchor")
    for command in (one, two):
        command.add_argument("--batches", required=True, help="comma-separated")
        command.add_argument("--seconds", type=float, required=True, help="per batch size (and path)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    try:
        if args.command == "ceiling":
            graph_batches = [int(b) for b in args.graph_batches.split(",") if b]
            found = ceiling(args.store, args.model, args.providers, json.loads(args.options), batches, args.seconds,
                            graph_batches)  # fmt: skip
        else:
            found = anchor(batches, args.seconds)
    except Exception as exc:  # the caller records the stage as failed, with this
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))  # noqa: T201
        return 1
    print(json.dumps(found))  # noqa: T201
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the answer is out: no interpreter teardown, where CUDA's libraries can crash at exit
