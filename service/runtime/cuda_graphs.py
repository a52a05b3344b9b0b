"""CUDA graphs (``CUDA_GRAPHS=on``): a session whose runs replay one captured CUDA graph per batch shape.

ONNX Runtime's CUDA provider launches each node's kernels one by one from the CPU; with ``enable_cuda_graph`` it
records a run's launches once and replays them in one call. A replay reads and writes the device addresses that
were bound at its capture, so each shape keeps its own buffers: the input and every output, allocated on the
device once, bound through IOBinding, and one graph (``gpu_graph_id``) per shape. A run copies its batch into the
shape's input buffer, replays, and copies the outputs out: the batch crosses to the device once and the answers
back once. The batch shapes (``BATCH_SIZES``) keep the set of graphs small; every one is captured during the
warm-up, before ``/readyz`` says ready.

:class:`CapturedSession` wraps an ``InferenceSession`` with ``InferenceSession.run``'s signature, in the process
that runs it (a worker, or the session host), so nothing above it knows. Runs of one session are serialised: a
shape's buffers are shared by every run of that shape, and a capture must not meet another run on its stream.
On a session that runs on the CPU (``device="cpu"``) it binds the same fixed buffers without graphs: the code the
GPU runs, testable without one.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

GRAPH_ID = "gpu_graph_id"  # ONNX Runtime's run option naming the graph a run captures or replays; -1: none
ENABLE_OPTION = "enable_cuda_graph"  # the CUDA provider's option
# regular runs ONNX Runtime needs before it captures (its memory allocated), plus the capture: all during the
# warm-up (it needs one regular run today; a spare one costs a warm-up call, not a request)
RUNS_TO_CAPTURE = 3
MAX_GRAPHS = 64  # shapes beyond this run without a graph: a graph and its buffers per shape must stay few


@dataclass
class _Shape:
    """One batch shape's fixed buffers, its binding and the run options naming its graph."""

    feed: str
    input: ort.OrtValue
    outputs: list[ort.OrtValue]
    binding: Any  # ort.IOBinding
    options: ort.RunOptions


def run_options(graph: int) -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry(GRAPH_ID, str(graph))
    return options


class CapturedSession:
    """``session`` with each shape's runs on fixed buffers, replaying a CUDA graph per shape on ``cuda``."""

    def __init__(self, session: ort.InferenceSession, device: str = "cuda", device_id: int = 0) -> None:
        self.session, self.device, self.device_id = session, device, device_id
        self._lock = threading.Lock()
        self._shapes: dict[tuple[Any, ...], _Shape] = {}
        self._uncaptured = run_options(-1)

    def __getattr__(self, name: str) -> Any:  # get_inputs, get_outputs, get_providers, ...: the session's
        return getattr(self.session, name)

    @property
    def graphs(self) -> int:
        """Shapes captured so far."""
        return len(self._shapes)

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any],
            run_options: ort.RunOptions | None = None) -> list[np.ndarray]:  # fmt: skip
        """``InferenceSession.run``: the outputs as new arrays (never views of the shape's buffers)."""
        names = list(output_names) if output_names else [o.name for o in self.session.get_outputs()]
        if len(feeds) != 1 or run_options is not None:  # not a batch of one input: as ONNX Runtime runs it
            return list(self.session.run(names, dict(feeds), run_options or self._uncaptured))
        ((feed, value),) = feeds.items()
        array = np.ascontiguousarray(value)
        key = (feed, array.shape, array.dtype.str, tuple(names))
        with self._lock:
            shape = self._shapes.get(key)
            if shape is None:
                if len(self._shapes) >= MAX_GRAPHS:
                    return list(self.session.run(names, {feed: array}, self._uncaptured))
                shape = self._shapes[key] = self._capture(feed, array, names)
            return self._replay(shape, array)

    def _capture(self, feed: str, array: np.ndarray, names: list[str]) -> _Shape:
        """Allocate the shape's buffers on the device (the outputs' shapes from one run without a graph), bind them,
        and run until ONNX Runtime has captured the shape's graph (the caller's run replays it)."""
        found = self.session.run(names, {feed: array}, self._uncaptured)
        made = ort.OrtValue.ortvalue_from_shape_and_type
        shape = _Shape(
            feed=feed,
            input=made(array.shape, array.dtype.type, self.device, self.device_id),
            outputs=[made(out.shape, out.dtype.type, self.device, self.device_id) for out in found],
            binding=self.session.io_binding(),
            options=run_options(len(self._shapes)),
        )
        shape.binding.bind_ortvalue_input(feed, shape.input)
        for name, value in zip(names, shape.outputs, strict=True):
            shape.binding.bind_ortvalue_output(name, value)
        for _ in range(RUNS_TO_CAPTURE - 1):  # the last is the caller's
            self._replay(shape, array)
        return shape

    def _replay(self, shape: _Shape, array: np.ndarray) -> list[np.ndarray]:
        shape.input.update_inplace(array)
        shape.binding.synchronize_inputs()  # the copy to the device is complete before the graph reads it
        self.session.run_with_iobinding(shape.binding, shape.options)
        answers = [value.numpy() for value in shape.outputs]  # from the device: copies
        # a CPU buffer's array may share its memory, and the shape's next run rewrites it
        return [np.array(a, copy=True) for a in answers] if self.device == "cpu" else answers


def wanted(providers: Sequence[Any]) -> int | None:
    """The device whose CUDA provider a session's provider list asks for CUDA graphs; None where it asks for none."""
    first = providers[0] if providers else None
    if isinstance(first, tuple) and first[1].get(ENABLE_OPTION) == "1":
        return int(first[1].get("device_id", 0))
    return None
