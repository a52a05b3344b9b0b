"""Dynamic batching: concurrent requests for one model share one ONNX Runtime call.

One batcher per loaded model version, feeding its instances: ``INSTANCES`` sessions of
the model (Triton's ``instance_group``), each running one call at a time. While every
instance is busy, requests queue; when one is free, the queue is drained into its next
call, up to ``max_batch_size`` images. So batches grow with the load by themselves.
Requests announce themselves (:meth:`DynamicBatcher.expect`) when they start decoding;
the batcher waits up to ``max_delay`` for company only while such a request is on its
way, so a lone request never waits. Requests for different models never meet in one
call. Past ``max_queue_images`` waiting images a request is refused with 503 at once
rather than left to time out: load shedding (and with 413 where it alone holds more).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DeviceOutOfMemory, Overloaded, PayloadTooLarge, ServiceError, Stranded

logger = logging.getLogger(__name__)

Outputs = tuple[np.ndarray, ...]  # logits, probabilities[, distance]: row per image
# a graph's inputs, a row per image: the images alone, or with more (an explanation graph's class per image)
Inputs = np.ndarray | tuple[np.ndarray, ...]
RunFn = Callable[[Any], Outputs]


def count_rows(inputs: Inputs) -> int:
    return int((inputs[0] if isinstance(inputs, tuple) else inputs).shape[0])


def take(inputs: Inputs, part: slice) -> Inputs:
    return tuple(array[part] for array in inputs) if isinstance(inputs, tuple) else inputs[part]


def joined(parts: list[Inputs], rows: int | None = None) -> Inputs:
    """The parts one after the other, in one array (each, for a graph of several inputs) of ``rows`` rows: the
    parts' own, or more, the rest zeros (a batch padded to a shape the session has run before)."""
    if isinstance(parts[0], tuple):
        return tuple(_stacked(list(arrays), rows) for arrays in zip(*parts, strict=True))
    return _stacked(parts, rows)  # type: ignore[arg-type]


def _stacked(arrays: list[np.ndarray], rows: int | None) -> np.ndarray:
    filled = sum(int(array.shape[0]) for array in arrays)
    if rows is None or rows == filled:
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    out = np.zeros((rows, *arrays[0].shape[1:]), dtype=arrays[0].dtype)
    np.concatenate(arrays, out=out[:filled])
    return out


@dataclass
class BatchStats:
    """What one session call did, for the metrics and the traces (times are ``perf_counter``'s)."""

    size: int
    enqueued: list[float]  # per request
    started: float
    finished: float
    contexts: list[Any]  # per request: what the caller passed to :meth:`DynamicBatcher.infer`
    probabilities: np.ndarray | None = None  # the batch's, row per image
    distances: np.ndarray | None = None  # the batch's, where the graph has a typicality check
    shape: int = 0  # the rows the session ran: ``size``, or more where the batch was padded to a shape
    # derived here, on the batcher's thread, so that what observes the batch reads figures
    requests: int = field(init=False)
    queue_seconds: list[float] = field(init=False)  # per request
    inference_seconds: float = field(init=False)

    def __post_init__(self) -> None:
        self.requests = len(self.enqueued)
        self.queue_seconds = [self.started - enqueued for enqueued in self.enqueued]
        self.inference_seconds = self.finished - self.started


@dataclass
class _Pending:
    images: Inputs
    future: asyncio.Future[Outputs]
    context: Any = None
    observe: bool = True  # its answers count in the quality metrics (an explanation's occluded copies do not)
    enqueued: float = field(default_factory=time.perf_counter)
    # a chunk of a request over the batch limit, or a piece of one split after an out-of-memory batch: all its
    # request's chunks or pieces (itself among them)
    pieces: list[_Pending] = field(default_factory=list, repr=False, compare=False)
    queued: bool = False  # its images count among the batcher's queued ones (MAX_QUEUE_IMAGES)

    @property
    def size(self) -> int:
        return count_rows(self.images)


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        runs: list[RunFn],
        *,
        max_batch_size: int,
        max_delay: float,
        max_queue_images: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_out_of_memory: Callable[[int, int], None] | None = None,
        batch_sizes: tuple[int, ...] | None = None,
    ) -> None:
        self.name = name
        self._runs = runs
        self.max_batch_size = max_batch_size
        self.batch_sizes = batch_sizes  # the shapes a batch is padded up to; None: run it as it is
        self.max_delay = max_delay
        self.max_queue_images = max_queue_images
        self._on_batch = on_batch
        self._on_out_of_memory = on_out_of_memory  # (the failed batch's size, the new largest batch)
        self._queue: deque[_Pending] = deque()
        self._queued_images = 0
        self._expected = 0  # requests decoding now, that will submit soon
        self._arrival = asyncio.Event()  # set on every submission and every announced request's end
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._free: list[int] = list(range(len(runs)))  # instances not running a batch
        self._released: asyncio.Event | None = None
        self._running: dict[asyncio.Task[None], list[_Pending]] = {}  # batches being run, by their task
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the worker's, once a request came
        self._executor = ThreadPoolExecutor(max_workers=len(runs), thread_name_prefix=f"infer-{name}")

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @contextlib.contextmanager
    def expect(self) -> Iterator[None]:
        """Announce a request that is preprocessing, so a batch forming now waits for it."""
        self._expected += 1
        try:
            yield
        finally:
            self._expected -= 1
            self._arrival.set()

    async def infer(self, images: Inputs, context: Any = None, observe: bool = True) -> Outputs:
        """Run ``images`` [N, H, W, C] in the next batches; returns this request's rows only.

        ``context`` (the request's trace context, say) comes back in the batch's :class:`BatchStats`;
        with ``observe=False`` its rows are left out of the batch's ``probabilities`` and ``distances``.
        """
        if self._closed:
            raise self._stranded()
        count = count_rows(images)
        chunks = [take(images, slice(i, i + self.max_batch_size)) for i in range(0, count, self.max_batch_size)]
        if count > self.max_queue_images:  # no retry could ever be queued: not a 503
            raise PayloadTooLarge(
                f"Model {self.name!r} queues at most {self.max_queue_images} images (MAX_QUEUE_IMAGES) and this "
                f"request has {count}: send at most {self.max_queue_images} per request"
            )
        if self._queued_images + count > self.max_queue_images:
            raise Overloaded(
                f"Model {self.name!r} has {self._queued_images} images waiting (limit {self.max_queue_images}); "
                "retry shortly"
            )
        submitted = [self._submit(chunk, context, observe) for chunk in chunks]
        if len(submitted) > 1:  # one request's chunks: a batch that fails one cancels the others at once
            for pending in submitted:
                pending.pieces = submitted
        try:
            results = await asyncio.gather(*(pending.future for pending in submitted))
        except BaseException:  # a chunk failed (or the client went): the request fails whole, its others never run
            for pending in submitted:
                pending.future.cancel()
            raise
        if len(results) == 1:
            return results[0]
        return tuple(np.concatenate(parts) for parts in zip(*results, strict=True))

    def _submit(self, images: Inputs, context: Any, observe: bool = True) -> _Pending:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._arrival = asyncio.Event()  # events bind to the loop that first waits on them
            self._released = asyncio.Event()
            self._worker = loop.create_task(self._serve(), name=f"batcher-{self.name}")
            self._loop = loop
        pending = _Pending(images, loop.create_future(), context, observe)
        self._queue.append(pending)
        self._count_queued(pending)
        assert self._wakeup is not None
        self._wakeup.set()
        self._arrival.set()
        return pending

    def _count_queued(self, pending: _Pending) -> None:
        """Count ``pending``'s images as queued until a batch takes it, or it ends where it waits (its client gone,
        its request failed): a request cancelled in the queue gives its share of MAX_QUEUE_IMAGES back at once."""
        pending.queued = True
        self._queued_images += pending.size
        pending.future.add_done_callback(lambda _: self._uncount_queued(pending))

    def _uncount_queued(self, pending: _Pending) -> None:
        if pending.queued:
            pending.queued = False
            self._queued_images -= pending.size

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        size = 0
        while self._queue and (not batch or size + self._queue[0].size <= self.max_batch_size):
            pending = self._queue.popleft()
            self._uncount_queued(pending)
            if pending.future.done():  # the client went away while queued (or its request failed)
                continue
            if pending.size > self.max_batch_size:  # queued before an out-of-memory batch lowered the limit
                self._split(pending)
                continue
            batch.append(pending)
            size += pending.size
        return batch

    def _split(self, pending: _Pending) -> None:
        """Put ``pending`` back at the head of the queue as pieces within :attr:`max_batch_size`, its answer their
        rows joined: no batch larger than the device just refused, and no shape that was not warmed."""
        loop, limit = pending.future.get_loop(), self.max_batch_size
        pieces = [
            _Pending(take(pending.images, slice(i, i + limit)), loop.create_future(), pending.context,
                     pending.observe, pending.enqueued)
            for i in range(0, pending.size, limit)
        ]  # fmt: skip
        for piece in pieces:
            piece.pieces = pieces
            self._count_queued(piece)
        self._queue.extendleft(reversed(pieces))
        answers = asyncio.gather(*(piece.future for piece in pieces))

        def answered(done: asyncio.Future[list[Outputs]]) -> None:
            failure = asyncio.CancelledError() if done.cancelled() else done.exception()  # read: never left unread
            if failure is not None:  # a piece failed (or the client went away): the others need not run
                for piece in pieces:
                    piece.future.cancel()
            if pending.future.done():
                return
            if failure is not None:
                pending.future.set_exception(failure)
            else:
                pending.future.set_result(tuple(np.concatenate(parts) for parts in zip(*done.result(), strict=True)))

        def abandoned(future: asyncio.Future[Outputs]) -> None:
            if future.cancelled():  # the client went away: its pieces are skipped where still queued
                answers.cancel()

        answers.add_done_callback(answered)
        pending.future.add_done_callback(abandoned)

    async def _serve(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                held = [await self._instance()]  # the instance, until the batch that runs on it lets it go
                try:
                    await self._wait_for_company(loop)
                except BaseException:  # cancelled holding it (the batcher closed, its event loop ended)
                    self._let_go(held)
                    raise
                batch = self._take_batch()
                if not batch:
                    self._let_go(held)
                    continue
                # its shape chosen now, under the limit it was taken under (a failure may lower it before it starts)
                shape = self.shape_for(sum(p.size for p in batch))
                task = loop.create_task(self._run_batch(loop, batch, held, shape))
                self._running[task] = batch
                task.add_done_callback(functools.partial(self._finished, held))

    def _finished(self, held: list[int], task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._let_go(held)  # a batch cancelled before its first step (its event loop ending) never ran its finally

    def _let_go(self, held: list[int]) -> None:
        """Free the instance in ``held``, once: where the batch ends, else where its task does."""
        if held:
            self._free.append(held.pop())
            assert self._released is not None
            self._released.set()

    async def _instance(self) -> int:
        """A free instance, waiting for a running batch to end where none is."""
        assert self._released is not None
        while not self._free:
            self._released.clear()
            await self._released.wait()
        return self._free.pop(0)

    async def _wait_for_company(self, loop: asyncio.AbstractEventLoop) -> None:
        """While announced requests are still decoding, wait for them, at most ``max_delay``."""
        deadline = loop.time() + self.max_delay
        while self._expected > 0 and self._queued_images < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrival.clear()
            try:  # not wait_for: on Python 3.11 it swallows a cancel that comes as the event is set
                async with asyncio.timeout(remaining):
                    await self._arrival.wait()
            except TimeoutError:
                return

    async def _run_batch(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], held: list[int], shape: int
    ) -> None:
        started = time.perf_counter()
        size = sum(p.size for p in batch)
        try:
            images = joined([p.images for p in batch], shape)
            outputs = await loop.run_in_executor(self._executor, self._runs[held[0]], images)
            if shape != size:  # the padding's rows, answered by nobody
                outputs = tuple(output[:size] for output in outputs)
        except Exception as exc:
            if out_of_memory(exc):
                exc = self._shrink(size, shape, exc)
            elif isinstance(exc, ServiceError):  # says what went wrong and what the client gets (the session host)
                logger.warning("%s: a batch of %d failed: %s", self.name, size, exc)
            else:
                logger.exception("%s: inference failed for a batch of %d", self.name, size)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
                for piece in pending.pieces:  # the request fails whole: its other pieces are not taken into a batch
                    if not piece.future.done():  # (the request's own callback would cancel them one turn too late,
                        piece.future.cancel()  # after the instance freed here may have taken the next one)
            return
        finally:
            self._let_go(held)  # before the answers: the next batch can start meanwhile
        finished = time.perf_counter()
        offset = 0
        for pending in batch:
            rows = slice(offset, offset + pending.size)
            offset += pending.size
            if not pending.future.done():
                pending.future.set_result(tuple(output[rows] for output in outputs))
        if self._on_batch is not None:
            enqueued, contexts = [p.enqueued for p in batch], [p.context for p in batch]
            observed = _observed(batch, outputs)
            self._on_batch(BatchStats(size, enqueued, started, finished, contexts, *observed, shape=shape))

    def shape_for(self, size: int) -> int:
        """The rows a batch of ``size`` images runs as: the smallest of :attr:`batch_sizes` that holds it (within
        ``max_batch_size``, which an out-of-memory batch lowers), else ``size`` itself."""
        if self.batch_sizes is None:
            return size
        return min((shape for shape in self.batch_sizes if size <= shape <= self.max_batch_size), default=size)

    def _shrink(self, size: int, shape: int, exc: BaseException) -> DeviceOutOfMemory:
        """A batch of ``size`` images, run as ``shape`` rows, the device had no memory for: the largest batch goes
        to half of what ran, and down to a batch shape where there are shapes (one already warmed)."""
        before = self.max_batch_size
        ran = f"{size}" if shape == size else f"{size} (run as {shape})"
        if shape > before:  # taken before another batch's failure lowered the limit: nothing new is known
            return self._out_of_memory(ran)
        limit = max(1, min(before, shape) // 2)
        if self.batch_sizes is not None:
            limit = max((s for s in self.batch_sizes if s <= limit), default=limit)
        self.max_batch_size = limit
        what = next(iter(str(exc).splitlines()), "") or type(exc).__name__
        logger.warning(
            "%s: out of memory for a batch of %s (%s); largest batch %d -> %d, its requests get 503",
            self.name, ran, what[-300:], before, self.max_batch_size,
        )  # fmt: skip
        if self._on_out_of_memory is not None:  # a Hook: an observer's failure is contained there
            self._on_out_of_memory(size, self.max_batch_size)
        return self._out_of_memory(ran)

    def _out_of_memory(self, ran: str) -> DeviceOutOfMemory:
        return DeviceOutOfMemory(
            f"Model {self.name!r}: the device ran out of memory for a batch of {ran} images; batches are now "
            f"at most {self.max_batch_size}; send the request again"
        )

    def shutdown(self, timeout: float = 10.0) -> None:
        """:meth:`close` from another thread (the model lifecycle's), once no request is left."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            self._closed = True  # a request that still comes is Stranded (503, send again), not a 500
            self._executor.shutdown(wait=False)
            return
        asyncio.run_coroutine_threadsafe(self.close(), loop).result(timeout)

    async def close(self) -> None:
        """Stop: every request still waiting, queued or in a running batch, fails with :class:`Stranded` (safe to
        send again) at once; a session call under way finishes in its thread, and nothing waits for it."""
        self._closed = True
        stranded = [*self._queue, *(pending for batch in self._running.values() for pending in batch)]
        for pending in self._queue:
            self._uncount_queued(pending)
        self._queue.clear()
        for pending in stranded:
            if not pending.future.done():
                pending.future.set_exception(self._stranded())
        loop = asyncio.get_running_loop()  # a task of a loop since ended (a test's asyncio.run) is done already
        tasks = [t for t in (*self._running, self._worker) if t is not None and not t.done() and t.get_loop() is loop]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)  # never blocks the event loop on a running call

    def _stranded(self) -> Stranded:
        return Stranded(f"Model {self.name!r}: this version was unloaded while the request waited; send it again")


# what ONNX Runtime's CPU and CUDA providers say when an allocation fails (BFCArena, CUDA, cuDNN, cuBLAS)
_OUT_OF_MEMORY = ("failed to allocate memory", "out of memory", "alloc_failed", "cudaerrormemoryallocation")


def out_of_memory(exc: BaseException) -> bool:
    """Whether an inference error is the device (or the host) running out of memory."""
    if isinstance(exc, MemoryError):
        return True
    message = str(exc).lower()
    return any(marker in message for marker in _OUT_OF_MEMORY)


def _observed(batch: list[_Pending], outputs: Outputs) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The batch's probabilities and distances, of the rows whose requests are observed."""
    distances = outputs[2] if len(outputs) > 2 else None
    if all(pending.observe for pending in batch):
        return outputs[1], distances
    keep = np.concatenate([np.full(pending.size, pending.observe) for pending in batch])
    if not keep.any():
        return None, None
    return outputs[1][keep], None if distances is None else distances[keep]
