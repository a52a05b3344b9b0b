"""One process that holds the ONNX Runtime sessions of every worker (``SESSION_HOST=shared``).

Why: a GPU runs one CUDA context at a time. With ``WORKERS=4`` each worker opened its own sessions,
so four contexts time-sliced one H200 and served ResNet-50 FP16 at 437 images/s against one
worker's 875. One worker, though, parses HTTP in one Python thread: served LeNet-5, where the
network costs nothing, it answered 1,672 requests/s on that machine's 16 cores, so one process
cannot bring the GPU the thousands of images a second it classifies. The host is Triton's shape:
one process owns the device and each model's instances (sessions, run concurrently, each from
its own thread), and every worker process (HTTP, gRPC, decoding, batching) sends it uint8
batches. A worker and the host share two memory files per session (``memfd``, passed over the
host's Unix socket, so nothing is named on disk and ``/dev/shm``'s size does not matter): the
worker copies a batch in once, and reads the answers out once.

Topology: the server's first process (BentoML's arbiter, where :mod:`service.service` is imported
before any worker starts) starts the host with :func:`start` and hands its address and key to the
workers in their environment (:data:`ADDRESS_ENV`, :data:`KEY_ENV`). A worker's load opens its
sessions through :func:`open_session`, which connects there where an address is set (a
:class:`RemoteSession`, with ``InferenceSession``'s ``run``, ``get_inputs``, ``get_outputs`` and
``get_providers``), else opens an ``InferenceSession`` in the worker. Every worker's instance
``i`` of a version is the host's one session ``i`` of that graph, opened by the first worker to
load it and closed when the last one lets it go. If the host dies, every worker has lost its
sessions: the server stops (an orchestrator restarts it) rather than answer 500s.

Run as ``python -m service.runtime.session_host ADDRESS`` (the key in :data:`KEY_ENV`), it serves
until its ``stdin`` closes: the server closes it after its workers have stopped, and a server killed
outright closes it too.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import mmap
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing import connection as connections
from multiprocessing.connection import Client, Connection, Listener, answer_challenge, deliver_challenge
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from ..errors import ModelNotReady
from ..settings import Settings
from ..store import sessions
from . import cuda_graphs
from .cuda import CPU, CUDA, Providers, preload, unavailable_reason, wants_cuda

logger = logging.getLogger("service.runtime.session_host")  # not __main__ where it runs as the host

ADDRESS_ENV = "CNN_SESSION_HOST"  # the host's Unix socket, set for the workers by start()
KEY_ENV = "CNN_SESSION_HOST_KEY"  # its authentication key (hex)
PID_ENV = "CNN_SESSION_HOST_PID"  # its pid: a worker kills a host that gives no answer (see RemoteSession)
READY_LINE = "session host listening"
START_TIMEOUT_S = 120.0


MIN_ANSWER_WITHIN_S = 120.0


class SessionHostGone(ModelNotReady):
    """The host holding this worker's sessions no longer answers (the server stops where the host died): 503, safe
    to send again."""

    retry_after = 1


class SessionHostStuck(SessionHostGone):
    """The host gave no answer in time and was killed: nothing is opened again on it (the server stops)."""


class NodeArg(NamedTuple):
    """What ``InferenceSession.get_inputs()`` gives per tensor, as the host describes it."""

    name: str
    type: str
    shape: list[Any]


@dataclass(frozen=True)
class OpenSpec:
    """One session a worker asks the host for: the graph, its instance, how ORT runs it."""

    graph: str
    instance: int
    providers: Providers
    threads: int
    inter_op_threads: int = 1
    spinning: bool = False
    cpu_arena: bool = True
    # the graph file as the worker loaded (and verified) it: inode, modification time, size; read as the spec is made
    file: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.file is None:
            object.__setattr__(self, "file", file_identity(self.graph))

    def key(self) -> tuple[Any, ...]:
        """What makes two workers' requests the same session: the same file (not a new one at that path), the same
        instance, the same options."""
        providers = tuple(p if isinstance(p, str) else (p[0], tuple(sorted(p[1].items()))) for p in self.providers)
        return (self.graph, self.file, self.instance, providers, self.threads, self.inter_op_threads, self.spinning,
                self.cpu_arena)  # fmt: skip


def file_identity(path: str) -> tuple[int, int, int]:
    status = os.stat(path)
    return status.st_ino, status.st_mtime_ns, status.st_size


def shares_sessions(settings: Settings) -> bool:
    """``SESSION_HOST``: ``shared``; ``auto`` where the models run on CUDA and more than one worker serves."""
    if settings.session_host == "auto":
        return settings.processes > 1 and wants_cuda(settings)
    return settings.session_host == "shared"


def address() -> tuple[str, bytes] | None:
    """The host this worker's sessions live in (from :func:`start`, through the environment), or None."""
    where, key = os.environ.get(ADDRESS_ENV), os.environ.get(KEY_ENV)
    return (where, bytes.fromhex(key)) if where and key else None


def open_session(graph: Path, options: ort.SessionOptions, providers: Providers, instance: int = 0) -> Any:
    """A session of ``graph``: the host's instance ``instance`` where the sessions are shared, else this process's
    own (CUDA's libraries preloaded first where CUDA is asked for)."""
    found = address()
    if found is None:
        return inference_session(str(graph), options, providers)
    spinning = options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    spec = OpenSpec(str(graph.resolve()), instance, providers, options.intra_op_num_threads,
                    options.inter_op_num_threads, spinning, options.enable_cpu_mem_arena)  # fmt: skip
    return RemoteSession(spec, *found, answer_within=answer_within(Settings()))


def answer_within(settings: Settings) -> float:
    """How long a worker waits for the host's answer (a run, an open, the handshake) before it takes the host for
    stuck: four request timeouts, two minutes at least. Longer than any batch a request could still use."""
    return max(4 * settings.request_timeout_s, MIN_ANSWER_WITHIN_S)


def inference_session(graph: str, options: ort.SessionOptions, providers: Providers) -> Any:
    """ONNX Runtime's session, in the process that runs it: CUDA's libraries preloaded first where CUDA is asked for
    (once per process), and no silent fallback (ONNX Runtime would move a session whose CUDA run failed to the CPU
    for good, printing it to stdout only, under the other threads that run it; the batch fails instead). Where the
    CUDA provider took it with CUDA graphs asked for (``CUDA_GRAPHS``), a :class:`cuda_graphs.CapturedSession`; a
    CUDA session without them where ``CUDA_GRAPHS=on``, a :class:`cuda_graphs.GatedSession`."""
    if providers[0] != CPU:
        preload()
    with cuda_graphs.GATE.shared():  # the weights' copies to the device must not meet a capture
        session = ort.InferenceSession(graph, options, providers=providers)
    session.disable_fallback()
    if session.get_providers()[0] != CUDA:
        return session
    device = cuda_graphs.wanted(providers)
    if device is not None:
        return cuda_graphs.CapturedSession(session, "cuda", device)
    if Settings().cuda_graphs == "on":  # this process captures graphs: no run of another session meets a capture
        return cuda_graphs.GatedSession(session)
    return session


def cuda_unavailable(session: Any) -> str:
    """Why ``session`` did not get CUDA, from the process that asked for it."""
    return session.cuda_unavailable if isinstance(session, RemoteSession) else unavailable_reason()


# -- the worker's side -------------------------------------------------------------------------


class _Buffer:
    """Memory shared with the host: an anonymous file (``memfd``) mapped here, its descriptor sent there."""

    def __init__(self, size: int) -> None:
        self.size = max(size, mmap.PAGESIZE)
        try:
            self.fd: int | None = os.memfd_create("cnn-session", os.MFD_CLOEXEC)
        except OSError as exc:
            raise MemoryError(f"no memory file for a batch of {self.size} bytes: {exc}") from None
        try:
            os.ftruncate(self.fd, self.size)
            self.map = mmap.mmap(self.fd, self.size)  # which keeps a descriptor of its own
        except OSError as exc:  # out of memory, or of descriptors: the batcher shrinks its batches and answers 503
            self.sent()
            raise MemoryError(f"no shared memory for a batch of {self.size} bytes: {exc}") from None

    def sent(self) -> None:
        """The host has its own descriptor now: this one is not needed (one fewer open file per buffer)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        self.sent()
        with contextlib.suppress(BufferError):  # a view still held: the mapping goes with the last one
            self.map.close()


def _grown(size: int) -> int:
    return 1 << max(size - 1, 1).bit_length()


def _layout(arrays: Sequence[np.ndarray]) -> tuple[list[tuple[str, tuple[int, ...], int]], int]:
    """Where each array goes in one buffer (dtype, shape, offset: 64-byte aligned), and the bytes it takes."""
    places, offset = [], 0
    for array in arrays:
        places.append((array.dtype.str, array.shape, offset))
        offset += -(-array.nbytes // 64) * 64
    return places, offset


def _views(buffer: mmap.mmap, places: Sequence[tuple[str, tuple[int, ...], int]]) -> list[np.ndarray]:
    return [np.frombuffer(buffer, dtype, math.prod(shape), offset).reshape(shape) for dtype, shape, offset in places]


class RemoteSession:
    """A session held by the host, as this worker runs it: one connection, two shared buffers, one run at a time.

    A connection that breaks while the host lives on (the host could not take a buffer, say) is opened again once
    by the next run; where that fails too, the run raises :class:`SessionHostGone` (503). A host that gives no
    answer within ``answer_within`` seconds (stopped, or stuck in a library) is killed: its exit stops the server,
    as any end of the host does, rather than leave every instance waiting on it for ever."""

    def __init__(self, spec: OpenSpec, where: str, key: bytes, answer_within: float = MIN_ANSWER_WITHIN_S) -> None:
        self.spec, self._where, self._key, self._lock = spec, where, key, threading.Lock()
        self._answer_within = answer_within
        self._state: list[Any] = [None, []]  # what the finalizer closes: the connection, [inputs, outputs] or []
        self._state[0], reply = self._connect()
        _, self._providers, inputs, outputs, self.cuda_unavailable, self.host_pid = reply
        self._input_args = [NodeArg(*i) for i in inputs]
        self._output_args = [NodeArg(*o) for o in outputs]
        self._finalizer = weakref.finalize(self, RemoteSession._release, self._state)

    def _connect(self) -> tuple[Connection, tuple[Any, ...]]:
        """A new connection with the session open on it (and no buffers yet), and the host's "opened" reply."""
        try:
            # multiprocessing's Client, with the wait for the handshake bounded
            connection = connections.SocketClient(self._where)  # type: ignore[attr-defined]
        except (OSError, EOFError) as exc:
            raise SessionHostGone(f"cannot reach the session host: {exc}") from None
        try:
            self._answered(connection, "the handshake", None)
            answer_challenge(connection, self._key)
            deliver_challenge(connection, self._key)
        except (OSError, EOFError) as exc:
            connection.close()
            raise SessionHostGone(f"cannot reach the session host: {exc}") from None
        except BaseException:
            connection.close()
            raise
        try:
            reply = self._ask(("open", self.spec), connection=connection)
            if reply[0] != "opened":
                raise RuntimeError(reply[1])
        except BaseException:
            connection.close()
            raise
        return connection, reply

    @staticmethod
    def _release(state: list[Any]) -> None:
        if state[0] is not None:
            state[0].close()  # the host lets its session go with the last connection to it
            state[0] = None
        for buffer in state[1]:
            buffer.close()
        state[1].clear()

    def close(self) -> None:
        """Let the session go now (else it goes with the last reference); a run after this raises."""
        with self._lock:
            self._finalizer()

    def get_inputs(self) -> list[NodeArg]:
        return self._input_args

    def get_outputs(self) -> list[NodeArg]:
        return self._output_args

    def get_providers(self) -> list[str]:
        return list(self._providers)

    def _ask(self, message: tuple[Any, ...], *handles: int, connection: Connection | None = None) -> tuple[Any, ...]:
        connection = connection or self._state[0]
        if connection is None:
            raise SessionHostGone("this session was closed")
        try:
            connection.send(message)
            for handle in handles:
                send_handle(connection, handle, 0)
            self._answered(connection, repr(message[0]), connection if connection is self._state[0] else None)
            reply: tuple[Any, ...] = connection.recv()
        except (OSError, EOFError) as exc:
            raise SessionHostGone(f"the session host stopped answering ({type(exc).__name__}: {exc})") from None
        return reply

    def _answered(self, connection: Connection, what: str, held: Connection | None) -> None:
        """Return once the host's answer to ``what`` is there; a host silent for ``answer_within`` seconds is taken
        for stuck: killed (the server stops with it), and the connection (``held``: this session's) dropped."""
        if connection.poll(self._answer_within):
            return
        pid = getattr(self, "host_pid", None) or int(os.environ.get(PID_ENV) or 0)  # before the first open's reply
        logger.error("the session host%s gave no answer to %s within %.0f s: it is stopped as stuck, and the server "
                     "with it", f" (pid {pid})" if pid else "", what, self._answer_within)  # fmt: skip
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if held is not None:
            RemoteSession._release(self._state)  # a late answer must not be read as the next run's
        raise SessionHostStuck(f"the session host gave no answer within {self._answer_within:.0f} s")

    def _room(self, inputs: int, outputs: int) -> tuple[_Buffer, _Buffer]:
        """Buffers that hold ``inputs`` and ``outputs`` bytes: new ones (powers of two) sent to the host where these
        are too small."""
        held: list[_Buffer] = self._state[1]
        have = (held[0].size, held[1].size) if held else (0, 0)
        if have[0] < inputs or have[1] < outputs:
            sizes = (_grown(max(inputs, have[0])), _grown(max(outputs, have[1])))
            fresh = [_Buffer(sizes[0])]
            try:
                fresh.append(_Buffer(sizes[1]))
                # the sizes the files have (a page at least), which this side's checks read: the host maps as much
                reply = self._ask(("buffers", *(b.size for b in fresh)), *[b.fd for b in fresh if b.fd is not None])
                if reply[0] != "ok":  # not from this host (it ends a connection whose buffers fail): start again
                    raise SessionHostGone(f"the session host could not take the buffers: {reply[1:]}")
            except BaseException:
                for buffer in fresh:
                    buffer.close()
                raise
            for buffer in held:
                buffer.close()
            for buffer in fresh:
                buffer.sent()
            held[:] = fresh
        return held[0], held[1]

    def _reopen(self) -> None:
        """After a broken connection: open the session on a new one first (so that where this worker was its only
        user the host keeps it open), then drop the old one and its buffers."""
        if not self._finalizer.alive:
            raise SessionHostGone("this session was closed")
        connection, _ = self._connect()
        RemoteSession._release(self._state)
        self._state[0] = connection
        logger.warning("%s instance %d: its connection to the session host broke; opened again",
                       self.spec.graph, self.spec.instance)  # fmt: skip

    def run(self, output_names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``InferenceSession.run``: the feeds copied into the shared buffer, the outputs copied out of it."""
        with self._lock:
            try:
                return self._run(output_names, feeds)
            except SessionHostStuck:
                raise
            except SessionHostGone:
                try:
                    self._reopen()  # a host that is gone fails this too (SessionHostGone), and the server stops
                except RuntimeError as exc:  # the host could not open it again: its graph changed, say
                    RemoteSession._release(self._state)  # the broken connection: the next run tries afresh
                    logger.error("%s instance %d: the session could not be opened again in the session host: %s",
                                 self.spec.graph, self.spec.instance, exc)  # fmt: skip
                    why = str(exc).replace(self.spec.graph, "its graph")  # the client is not told the server's paths
                    raise ModelNotReady(f"instance {self.spec.instance} of this version could not be opened again in "
                                        f"the session host: {why}") from None  # fmt: skip
                return self._run(output_names, feeds)

    def _run(self, output_names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names, arrays = list(feeds), [np.ascontiguousarray(a) for a in feeds.values()]
        places, size = _layout(arrays)
        inputs, outputs = self._room(size, self._state[1][1].size if self._state[1] else size)
        for view, array in zip(_views(inputs.map, places), arrays, strict=True):
            view[...] = array
        reply = self._ask(("run", list(output_names), list(zip(names, places, strict=True))))
        if reply[0] == "error":  # ONNX Runtime's message (an out-of-memory is read from it), or a MemoryError
            raise (MemoryError if reply[2] else RuntimeError)(reply[1])
        if reply[0] == "inline":  # the answers did not fit: the next run has room for them
            self._room(size, reply[2])
            return list(reply[1])
        return [view.copy() for view in _views(outputs.map, reply[1])]


# -- the host's side ---------------------------------------------------------------------------


@dataclass
class _Held:
    """One shared session: opened by its first user while the others wait on ``opened``."""

    session: ort.InferenceSession | None = None
    users: int = 0
    runs: int = 0
    failure: str | None = None
    opened: threading.Event = field(default_factory=threading.Event)


@dataclass
class SessionHost:
    """The sessions every worker shares, by :meth:`OpenSpec.key`, each kept while a worker holds it."""

    sessions: dict[tuple[Any, ...], _Held] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self, spec: OpenSpec) -> tuple[tuple[Any, ...], _Held]:
        """The session for ``spec``: opened here by the first to ask (outside the lock), shared by the others (who
        wait for that open, and fail with it)."""
        key = spec.key()
        with self._lock:
            held = self.sessions.get(key)
            opener = held is None
            if held is None:
                held = self.sessions[key] = _Held()
            held.users += 1
        if opener:
            try:
                if file_identity(spec.graph) != spec.file:  # reopened (a broken connection) after a change
                    raise RuntimeError(f"{spec.graph} is no longer the file this worker loaded and verified (replaced "
                                       "or changed since): the version must be loaded again")  # fmt: skip
                options = sessions.session_options(spec.threads, spec.inter_op_threads, spinning=spec.spinning,
                                                   cpu_arena=spec.cpu_arena)  # fmt: skip
                session = inference_session(spec.graph, options, spec.providers)
                provider = session.get_providers()[0]
                held.session = session
                logger.info("session host: opened %s instance %d on %s", spec.graph, spec.instance, provider)
            except BaseException as exc:
                held.failure = f"{type(exc).__name__}: {exc}"
                with self._lock:  # the next to ask tries again
                    if self.sessions.get(key) is held:
                        del self.sessions[key]
                if not isinstance(exc, Exception):
                    raise
            finally:
                held.opened.set()  # whatever happened: no one waits for it for ever
        held.opened.wait()
        if held.session is None:
            self.release(key, held)
            raise RuntimeError(held.failure)
        return key, held

    def release(self, key: tuple[Any, ...], held: _Held) -> None:
        """One user fewer; the last one closes the session (this one, not a newer one opened under the same key)."""
        closing = None
        with self._lock:
            held.users -= 1
            if held.users == 0 and self.sessions.get(key) is held:
                del self.sessions[key]
                if held.session is not None:
                    logger.info("session host: closed %s instance %d after %d runs", key[0], key[2], held.runs)
                closing, held.session = held.session, None
        del closing  # freed outside the lock (a wrapped CUDA session's device memory inside cuda_graphs' gate)

    def stats(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"graph": key[0], "instance": key[2], "users": held.users, "runs": held.runs}  # see OpenSpec.key
                    for key, held in self.sessions.items() if held.session is not None]  # fmt: skip

    def serve(self, listener: Listener, authkey: bytes) -> None:
        """Each connection in its own thread, the handshake included: a client that stalls in it holds up no other."""
        while True:
            try:
                connection = listener.accept()  # a Listener without a key: the thread checks it
            except OSError as exc:  # out of file descriptors, say: the connections held go on, a new one waits
                logger.error("session host: cannot accept a connection (%s); trying again in 1 s", exc)
                time.sleep(1.0)
                continue
            try:
                threading.Thread(target=self.client, args=(connection, authkey), name="session-client",
                                 daemon=True).start()  # fmt: skip
            except RuntimeError as exc:  # no thread to be had: that worker finds the connection closed
                logger.error("session host: cannot serve a connection (%s)", exc)
                connection.close()

    def client(self, connection: Connection, authkey: bytes) -> None:
        """One worker's session, until it closes its connection (or dies). A request that fails is answered with
        the failure; the connection closes only where it cannot go on."""
        opened: tuple[tuple[Any, ...], _Held] | None = None
        maps: list[mmap.mmap] = []
        try:
            try:
                deliver_challenge(connection, authkey)
                answer_challenge(connection, authkey)
            except (OSError, EOFError, AuthenticationError) as exc:
                logger.warning("session host: refused a connection: %s", exc)
                return
            while True:
                try:
                    message = connection.recv()
                except (EOFError, OSError):
                    return
                if message[0] == "buffers":  # the descriptors follow the message
                    try:
                        maps = self._map(connection, message[1:], maps)
                    except Exception as exc:  # a descriptor left unread would be read as the next message
                        logger.warning("session host: cannot map a worker's buffers (%s); its connection ends", exc)
                        return
                    reply: tuple[Any, ...] = ("ok",)
                else:
                    try:
                        if message[0] == "stats":
                            reply = ("stats", self.stats())
                        elif message[0] == "open" and opened is None:
                            opened = self.acquire(message[1])
                            reply = self._describe(message[1], opened[1])
                        elif message[0] == "run" and opened is not None and len(maps) == 2:
                            reply = self._run(opened[1], maps, message[1], message[2])
                        else:
                            reply = ("error", f"the session host cannot do {message[0]!r} now", False)
                    except Exception as exc:  # the worker gets the reason (a load failure, say)
                        failed = "failed" if message[0] == "open" else "error"
                        reply = (failed, f"{type(exc).__name__}: {exc}", False)
                try:
                    connection.send(reply)
                except (OSError, ValueError) as exc:  # the worker is gone, or the answer cannot be sent
                    logger.warning("session host: a connection ended: %s", exc)
                    return
        finally:
            connection.close()
            for buffer in maps:
                with contextlib.suppress(BufferError):
                    buffer.close()
            if opened is not None:
                self.release(*opened)

    @staticmethod
    def _map(connection: Connection, sizes: Sequence[int], old: list[mmap.mmap]) -> list[mmap.mmap]:
        """The worker's two new buffers, mapped (each descriptor closed once mapped: the mapping keeps its own)."""
        fds = []
        try:
            for _ in sizes:
                fds.append(recv_handle(connection))
            maps = [mmap.mmap(fd, size) for fd, size in zip(fds, sizes, strict=True)]
        finally:
            for fd in fds:
                os.close(fd)
        for buffer in old:
            with contextlib.suppress(BufferError):
                buffer.close()
        return maps

    @staticmethod
    def _describe(spec: OpenSpec, held: _Held) -> tuple[Any, ...]:
        session = held.session
        assert session is not None
        provider = session.get_providers()[0]
        reason = unavailable_reason() if spec.providers[0] != CPU and provider != CUDA else ""
        inputs, outputs = ([(a.name, a.type, list(a.shape)) for a in args]
                           for args in (session.get_inputs(), session.get_outputs()))  # fmt: skip
        return ("opened", session.get_providers(), inputs, outputs, reason, os.getpid())

    @staticmethod
    def _run(held: _Held, maps: list[mmap.mmap], names: list[str], feeds: list[tuple[str, Any]]) -> tuple[Any, ...]:
        assert held.session is not None
        try:
            arrays = _views(maps[0], [place for _, place in feeds])
            outputs = held.session.run(names, {name: array for (name, _), array in zip(feeds, arrays, strict=True)})
        except Exception as exc:  # the worker's batcher sees the message (an out-of-memory is read from it)
            return ("error", f"{type(exc).__name__}: {exc}", isinstance(exc, MemoryError))
        held.runs += 1  # read for the log and the stats only
        places, size = _layout(outputs)
        if size > len(maps[1]):
            return ("inline", outputs, size)
        for view, output in zip(_views(maps[1], places), outputs, strict=True):
            view[...] = output
        return ("ran", places)


def host_stats(where: str, key: bytes) -> list[dict[str, Any]]:
    """The sessions the host holds now, with how many connections use each and the runs each made."""
    with contextlib.closing(Client(where, "AF_UNIX", authkey=key)) as connection:
        connection.send(("stats",))
        reply: tuple[Any, ...] = connection.recv()
    return list(reply[1])


# -- starting it -------------------------------------------------------------------------------


@dataclass
class HostProcess:
    """The host, as the process that started it sees it: closing its ``stdin`` is what stops it."""

    process: subprocess.Popen[bytes]
    address: str
    key: bytes
    stopping: bool = False

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping = True
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        _remove(self.address)


def _remove(where: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(where)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(where))


def start(*, stop_server_on_exit: bool = True) -> HostProcess:
    """Start the host (it reads the server's settings from the environment, as the workers do), wait until it
    listens, and give its address and key to the processes started after this one (the workers) through the
    environment. Where the host later exits before the server stops, the server stops with it (``SIGTERM`` to this
    process: its workers' sessions were all there).

    The host runs in a session of its own and ignores SIGINT and SIGTERM: a Ctrl-C or a stop sent to the whole
    group (or cgroup) reaches the server, whose workers drain their requests through the host before it stops
    the host by closing the host's ``stdin`` (which a server killed outright closes too)."""
    key = os.urandom(32)
    where = os.path.join(tempfile.mkdtemp(prefix="cnn-sessions-"), "host.sock")
    environment = {**os.environ, KEY_ENV: key.hex()}
    environment.pop(ADDRESS_ENV, None)
    process = subprocess.Popen(
        [sys.executable, "-m", __name__, where],
        cwd=Path(__file__).resolve().parents[2],
        env=environment,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    host = HostProcess(process, where, key)
    assert process.stdout is not None
    ready, deadline = b"", time.monotonic() + START_TIMEOUT_S
    while READY_LINE.encode() not in ready:
        if process.poll() is not None or time.monotonic() > deadline:
            sys.stderr.write(ready.decode(errors="replace"))
            host.stop()
            raise RuntimeError(f"the session host did not start (exit code {process.returncode}); its log says why")
        if select.select([process.stdout], [], [], 0.1)[0]:
            ready += os.read(process.stdout.fileno(), 4096)
    process.stdout.close()
    printed = ready.decode(errors="replace").replace(f"{READY_LINE}\n", "")
    if printed.strip():  # what it printed before (a library's own output): into the server's log
        sys.stderr.write(printed)
    os.environ[ADDRESS_ENV], os.environ[KEY_ENV], os.environ[PID_ENV] = where, key.hex(), str(process.pid)
    atexit.register(host.stop)
    if stop_server_on_exit:
        threading.Thread(target=_stop_server_with, args=(host,), name="session-host-watch", daemon=True).start()
    logger.info("SESSION_HOST=shared: the session host (pid %d) holds every worker's sessions", process.pid)
    return host


def forget() -> None:
    """This process starts no host: its workers must not use one whose address they inherited."""
    for name in (ADDRESS_ENV, KEY_ENV, PID_ENV):
        os.environ.pop(name, None)


def _stop_server_with(host: HostProcess) -> None:
    code = host.process.wait()
    if not host.stopping:
        logger.error("the session host (pid %d) exited with code %s: every worker's sessions were there, so the "
                     "server stops", host.process.pid, code)  # fmt: skip
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def hosted() -> Iterator[HostProcess]:
    """A host for this process's own sessions (tests, benchmarks): started, then stopped, the environment restored."""
    before = {name: os.environ.get(name) for name in (ADDRESS_ENV, KEY_ENV, PID_ENV)}
    host = start(stop_server_on_exit=False)
    try:
        yield host
    finally:
        host.stop()
        atexit.unregister(host.stop)
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _until_stdin_closes(where: str) -> None:
    while os.read(sys.stdin.fileno(), 4096):
        pass
    _remove(where)
    os._exit(0)  # the server closed it (or is gone, even killed outright): so is every client


def main(argv: Sequence[str]) -> int:
    where = argv[0]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)s] [%(name)s] %(message)s")
    for stop in (signal.SIGINT, signal.SIGTERM):  # the server stops the host, after its workers (see start)
        signal.signal(stop, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # three descriptors per worker's session: the default 1,024 runs out at about 340
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    threading.Thread(target=_until_stdin_closes, args=(where,), name="stdin-watch", daemon=True).start()
    if wants_cuda(Settings()):  # the server's settings, from the environment it passed on
        preload()  # before any session: CUDA's libraries from NVIDIA's wheels
    host = SessionHost()
    listener = Listener(where, "AF_UNIX")
    os.chmod(where, 0o600)
    sys.stdout.write(f"{READY_LINE}\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # the reader has what it waited for
    host.serve(listener, bytes.fromhex(os.environ[KEY_ENV]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
