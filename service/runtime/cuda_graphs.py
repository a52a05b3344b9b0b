"""CUDA graphs (``CUDA_GRAPHS=on``): a session whose runs replay one captured CUDA graph per batch shape.

ONNX Runtime's CUDA provider launches each node's kernels one by one from the CPU; with ``enable_cuda_graph`` it
records a run's launches once and replays them in one call. A replay reads and writes the device addresses that
were bound at its capture, so each shape keeps its own buffers: the input and every output, allocated on the
device once, bound through IOBinding, and one graph (``gpu_graph_id``) per shape. A run copies its batch into the
shape's input buffer, replays, and copies the outputs out: the batch crosses to the device once and the answers
back once. The batch shapes (``BATCH_SIZES``) keep the set of graphs small; every one is captured during the
warm-up, before ``/readyz`` says ready.

Three facts of ONNX Runtime's CUDA provider (1.31, read from its source) shape the code:

- its graphs, and the regular runs it counts before capturing one, belong to the *thread* that ran them (its
  per-thread context): a session's runs all go through one thread of its own, or every (thread, shape) pair
  would capture again, on live requests;
- a capture records in CUDA's global mode: another thread's allocation or synchronous copy during it invalidates
  the capture and fails both. :data:`GATE` lets one capture (with its buffers' allocation) run alone: this
  process's CUDA runs share it (:class:`GatedSession` for sessions without graphs), and so do a session's opening
  and its end: a wrapped session's last reference may go anywhere (a worker's unload, an eviction, the batch that
  finished last), so what holds its device memory is freed inside the gate, at once where no capture runs, else on
  a thread of its own (:class:`_Release`); the warm-up is the only time a capture happens;
- a run of a new graph id makes its own regular runs (two), the capture and a replay, in one ``Run``; the copy into
  the input buffer (``update_inplace``) has finished when it returns, and a replay synchronises its stream before
  it returns, so the outputs are complete when read.

:class:`CapturedSession` wraps an ``InferenceSession`` with ``InferenceSession.run``'s signature, in the process
that runs it (a worker, or the session host), so nothing above it knows. On a session that runs on the CPU
(``device="cpu"``) it binds the same fixed buffers without graphs: the code the GPU runs, testable without one.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

GRAPH_ID = "gpu_graph_id"  # ONNX Runtime's run option naming the graph a run captures or replays; -1: none
ENABLE_OPTION = "enable_cuda_graph"  # the CUDA provider's option
MAX_GRAPHS = 64  # shapes beyond this run without a graph: a graph and its buffers per shape must stay few


class Gate:
    """Many runs at once (:meth:`shared`), or one capture alone (:meth:`exclusive`); a waiting capture goes before
    runs that come after it, so steady traffic cannot hold a warm-up off."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())  # not reentrant: see try_shared
        self._running = 0
        self._capturing = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._capturing and not self._waiting)
            self._running += 1
        try:
            yield
        finally:
            self.leave_shared()

    def try_shared(self) -> bool:
        """Enter as :meth:`shared` does where that needs no wait, and say so; else False. Never blocks, not even on
        the gate's own lock, which a finaliser's thread may hold (it then fails to take it)."""
        if not self._changed.acquire(blocking=False):
            return False
        try:
            if self._capturing or self._waiting:
                return False
            self._running += 1
            return True
        finally:
            self._changed.release()

    def leave_shared(self) -> None:
        with self._changed:
            self._running -= 1
            self._changed.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._changed:
            self._waiting += 1
            try:
                self._changed.wait_for(lambda: not self._capturing and not self._running)
            finally:
                self._waiting -= 1
            self._capturing = True
        try:
            yield
        finally:
            with self._changed:
                self._capturing = False
                self._changed.notify_all()


GATE = Gate()  # this process's graph sessions: a capture runs alone


class _Release:
    """Frees a wrapped session and its device buffers while :data:`GATE` is shared: freeing device memory during a
    capture fails it, and the last reference may go on any thread, one that holds the gate included. Where no
    capture runs or waits, at once (as an unwrapped session is freed: a load after an unload finds the memory back);
    else on a thread of its own, with no wait where the reference went (``SimpleQueue.put`` is safe in
    ``__del__``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = 0
        self._doomed: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()

    def start(self) -> None:
        """The thread, once per process (a child forked after it started has none: it starts its own)."""
        with self._lock:
            if self._pid != os.getpid():
                doomed: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
                threading.Thread(target=self._free, args=(doomed,), name="cuda-graphs-release", daemon=True).start()
                self._pid, self._doomed = os.getpid(), doomed

    def drop(self, held: list[Any]) -> None:
        """Free what ``held`` holds (its items' last references, emptied here or by the thread)."""
        if GATE.try_shared():
            try:
                held.clear()
            finally:
                GATE.leave_shared()
        else:
            self._doomed.put(held)

    @staticmethod
    def _free(doomed: queue.SimpleQueue[list[Any]]) -> None:
        while True:
            held = doomed.get()
            with GATE.shared():
                held.clear()  # the last references: their device memory goes while no capture runs


RELEASE = _Release()


@dataclass
class _Shape:
    """One batch shape's fixed buffers, its binding and the run options naming its graph."""

    input: ort.OrtValue
    outputs: list[ort.OrtValue]
    binding: Any  # ort.IOBinding
    options: ort.RunOptions


def run_options(graph: int) -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry(GRAPH_ID, str(graph))
    return options


class CapturedSession:
    """``session`` with each shape's runs on fixed buffers, replaying a CUDA graph per shape on ``cuda``; every run
    on the session's own thread (``cuda-graphs_0``)."""

    def __init__(self, session: ort.InferenceSession, device: str = "cuda", device_id: int = 0) -> None:
        RELEASE.start()
        self.session, self.device, self.device_id = session, device, device_id
        self._shapes: dict[tuple[Any, ...], _Shape] = {}
        self._next_graph = 0
        self._uncaptured = run_options(-1)
        # one thread, whose end comes with this object's (an executor's idle thread ends when it is collected)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cuda-graphs")

    def __del__(self) -> None:  # the session and its shapes' buffers, freed inside the gate
        state = vars(self)
        RELEASE.drop([state.pop("session", None), state.pop("_shapes", None)])

    def __getattr__(self, name: str) -> Any:  # get_inputs, get_outputs, get_providers, ...: the session's
        if name == "session":  # gone (released, or never set): no recursion through this method
            raise AttributeError(name)
        return getattr(self.session, name)

    @property
    def graphs(self) -> int:
        """Shapes captured so far."""
        return len(self._shapes)

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any],
            run_options: ort.RunOptions | None = None) -> list[np.ndarray]:  # fmt: skip
        """``InferenceSession.run``, on the session's thread: the outputs as new arrays (never views of the shape's
        buffers)."""
        names = list(output_names) if output_names else [o.name for o in self.session.get_outputs()]
        return self._thread.submit(self._run, names, dict(feeds), run_options).result()

    def _run(self, names: list[str], feeds: dict[str, Any], run_options: ort.RunOptions | None) -> list[np.ndarray]:
        if len(feeds) != 1 or run_options is not None:  # not a batch of one input: as ONNX Runtime runs it
            with GATE.shared():
                return list(self.session.run(names, feeds, run_options or self._uncaptured))
        ((feed, value),) = feeds.items()
        array = np.ascontiguousarray(value)
        key = (feed, array.shape, array.dtype.str, tuple(names))
        shape = self._shapes.get(key)
        if shape is not None:
            with GATE.shared():
                return self._replay(shape, array)
        if self._next_graph >= MAX_GRAPHS:
            with GATE.shared():
                return list(self.session.run(names, {feed: array}, self._uncaptured))
        with GATE.shared():  # the outputs' shapes and types, from a run without a graph
            found = self.session.run(names, {feed: array}, self._uncaptured)
        with GATE.exclusive():  # its buffers' allocation, and the run that captures its graph, alone
            shape = self._bound(feed, array, names, found)
            answers = self._replay(shape, array)
        self._shapes[key] = shape
        return answers

    def _bound(self, feed: str, array: np.ndarray, names: list[str], found: Sequence[np.ndarray]) -> _Shape:
        """A new shape's buffers on the device, bound, and its graph's id."""
        made = ort.OrtValue.ortvalue_from_shape_and_type
        shape = _Shape(
            input=made(array.shape, array.dtype.type, self.device, self.device_id),
            outputs=[made(out.shape, out.dtype.type, self.device, self.device_id) for out in found],
            binding=self.session.io_binding(),
            options=run_options(self._next_graph),
        )
        self._next_graph += 1  # never used again, even where its capture failed: ONNX Runtime may hold a graph for it
        shape.binding.bind_ortvalue_input(feed, shape.input)
        for name, value in zip(names, shape.outputs, strict=True):
            shape.binding.bind_ortvalue_output(name, value)
        return shape

    def _replay(self, shape: _Shape, array: np.ndarray) -> list[np.ndarray]:
        shape.input.update_inplace(array)  # a synchronous copy: on the device when it returns
        self.session.run_with_iobinding(shape.binding, shape.options)
        answers = [value.numpy() for value in shape.outputs]  # from the device: copies
        # a CPU buffer's array may share its memory, and the shape's next run rewrites it
        return [np.array(a, copy=True) for a in answers] if self.device == "cpu" else answers


class GatedSession:
    """A CUDA session without graphs (an explanation's) in a process that captures them: its runs share
    :data:`GATE`, so that none meets a capture."""

    def __init__(self, session: ort.InferenceSession) -> None:
        RELEASE.start()
        self.session = session

    def __del__(self) -> None:  # the session, freed inside the gate
        RELEASE.drop([vars(self).pop("session", None)])

    def __getattr__(self, name: str) -> Any:
        if name == "session":  # gone (released, or never set): no recursion through this method
            raise AttributeError(name)
        return getattr(self.session, name)

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any],
            run_options: ort.RunOptions | None = None) -> list[np.ndarray]:  # fmt: skip
        with GATE.shared():
            return list(self.session.run(output_names, feeds, run_options))


def wanted(providers: Sequence[Any]) -> int | None:
    """The device whose CUDA provider a session's provider list asks for CUDA graphs; None where it asks for none."""
    first = providers[0] if providers else None
    if isinstance(first, tuple) and first[1].get(ENABLE_OPTION) == "1":
        return int(first[1].get("device_id", 0))
    return None
