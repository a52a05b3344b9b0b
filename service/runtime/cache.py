"""``RESPONSE_CACHE_MB``: answers kept by what was asked, so that the same question costs no decode and no inference.

A key is a BLAKE2b hash over length-prefixed parts: the tenant, the front end's kind
(``classify`` or ``oip``: they answer in different shapes), the model, its version, every
parameter that changes the answer and the images' bytes. There is one ``API_TOKEN`` today,
so the tenant is the empty string; when tenants are added, the tenant goes into the key, and
an entry is then never shared across tenants (one tenant's hit would otherwise tell it what
another asked).

One :class:`ResponseCache` per worker owns the budget and the recency order (an
``OrderedDict``, least recently used first, evicted until a new answer fits). Identical
requests in flight at the same moment are computed once: the first computes, the others
await its future (shielded: a waiter that goes away cancels nothing). A computation that
fails stores nothing and its waiters get the same error; one that is cancelled (its client
went away) hands the work to a waiter. When a version is released (the ``released`` hook, on
the thread that unloads), :meth:`ResponseCache.released` drops its entries: a cached answer
never outlives its version. The table is guarded by a lock for that reason; the in-flight
futures live on the worker's event loop only.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import sys
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from ..metrics import Metrics

if TYPE_CHECKING:
    from .entry import ModelEntry

T = TypeVar("T")
Version = tuple[str, int]  # (model, version)


def cache_key(
    tenant: str, kind: str, model: str, version: int, parameters: Iterable[Any], blobs: Iterable[Any]
) -> bytes:
    """The hash of a request's answer-changing parts, each length-prefixed so that no two part lists collide.

    ``parameters`` are written as their ``repr`` (None, 5, 0.5, "FP32", [1, 28, 28, 1]); ``blobs`` are bytes or
    C-contiguous arrays, hashed as their buffers (no copy).
    """
    digest = hashlib.blake2b(digest_size=20)
    for text in (tenant, kind, model, str(version), *(repr(p) for p in parameters)):
        part = text.encode()
        digest.update(struct.pack("<Q", len(part)))
        digest.update(part)
    for blob in blobs:
        view = memoryview(blob).cast("B")
        digest.update(struct.pack("<Q", view.nbytes))
        digest.update(view)
    return digest.digest()


def footprint(value: Any) -> int:
    """Roughly the bytes ``value`` holds: containers, dataclasses and arrays (their elements too, for objects)."""
    if isinstance(value, np.ndarray):
        inner = sum(footprint(item) for item in value.flat) if value.dtype == object else 0
        return sys.getsizeof(value) + value.nbytes + inner
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        return size + sum(footprint(k) + footprint(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return size + sum(footprint(item) for item in value)
    if is_dataclass(value) and not isinstance(value, type):
        return size + sum(footprint(getattr(value, f.name)) for f in fields(value))
    return size


@dataclass
class Stored(Generic[T]):
    value: T
    version: Version
    size: int


class Abandoned(Exception):
    """The request computing an answer was cancelled: a waiter computes it instead."""


class ResponseCache:
    """Answers by key within ``max_bytes``, least recently used evicted first; see the module's docstring."""

    def __init__(self, max_bytes: int, metrics: Metrics, shared: Callable[[], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.shared = shared  # see get_or_compute
        self.bytes = 0
        self._entries: OrderedDict[bytes, Stored[Any]] = OrderedDict()
        self._by_version: dict[Version, set[bytes]] = {}
        self._released: dict[Version, int] = {}  # how often each version was released: a late answer is not kept
        self._pending: dict[bytes, asyncio.Future[Any]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    async def get_or_compute(
        self,
        key: bytes,
        entry: ModelEntry,
        compute: Callable[[], Awaitable[T]],
    ) -> tuple[T, bool]:
        """The answer stored under ``key``, else the one computing now, else ``compute()``'s (then stored):
        with True where this request computed nothing (a hit). The cache's ``shared`` is called where this request takes
        another's outcome, stored or computed meanwhile, its answer or its error (not where that request went away
        and this one computed after all): what judges a version's requests leaves both out alike."""
        version, shared = (entry.name, entry.version), self.shared
        while True:
            found = self._get(key)
            if found is not None:
                self._count(self.metrics.cache_hits, version)
                if shared is not None:
                    shared()
                return found.value, True
            pending = self._pending.get(key)
            if pending is None:
                break
            try:
                value = await asyncio.shield(pending)
            except Abandoned:  # its request went away: this one may compute it itself, and counts then
                continue
            except Exception:  # its error, this request's too (not this request's own cancellation)
                if shared is not None:
                    shared()
                raise
            if shared is not None:
                shared()
            self._count(self.metrics.cache_hits, version)
            return value, True
        self._count(self.metrics.cache_misses, version)
        return await self._compute(key, version, compute), False

    async def _compute(self, key: bytes, version: Version, compute: Callable[[], Awaitable[T]]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        released = self._released.get(version, 0)
        try:
            value = await compute()
        except BaseException as exc:
            future.set_exception(Abandoned() if isinstance(exc, asyncio.CancelledError) else exc)
            future.exception()  # retrieved: no "never retrieved" warning where nobody waited
            raise
        finally:
            del self._pending[key]
        future.set_result(value)
        self._put(key, Stored(value, version, footprint(value)), released)
        return value

    def _get(self, key: bytes) -> Stored[Any] | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def _put(self, key: bytes, stored: Stored[Any], released: int) -> None:
        if stored.size > self.max_bytes:  # larger than the whole cache: answered, not kept
            return
        evicted: list[Stored[Any]] = []
        with self._lock:
            if self._released.get(stored.version, 0) != released:  # its version went while it was computed
                return
            while self._entries and self.bytes + stored.size > self.max_bytes:
                old_key, old = self._entries.popitem(last=False)
                self._forget(old_key, old)
                evicted.append(old)
            self._entries[key] = stored
            self._by_version.setdefault(stored.version, set()).add(key)
            self.bytes += stored.size
            self._gauges()
        for old in evicted:
            self._count(self.metrics.cache_evictions, old.version)

    def _forget(self, key: bytes, stored: Stored[Any]) -> None:
        """Unlink an entry popped from the table (under the lock)."""
        self.bytes -= stored.size
        keys = self._by_version.get(stored.version)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_version[stored.version]

    def ready(self, entry: ModelEntry, seconds: float) -> None:
        """The ``ready`` hook: the version's counters at 0, so that a hit ratio has data from its load on."""
        for counter in (self.metrics.cache_hits, self.metrics.cache_misses, self.metrics.cache_evictions):
            self._count(counter, (entry.name, entry.version))

    def released(self, entry: ModelEntry) -> None:
        """The ``released`` hook: drop the version's entries (any thread)."""
        self.drop(entry.name, entry.version)

    def drop(self, model: str, version: int) -> int:
        """Drop every entry of ``model`` at ``version``, and keep none of its answers computing now; how many."""
        key = (model, version)
        with self._lock:
            self._released[key] = self._released.get(key, 0) + 1
            keys = self._by_version.pop(key, set())
            for found in keys:
                self.bytes -= self._entries.pop(found).size
            self._gauges()
        return len(keys)

    def _count(self, counter: Any, version: Version) -> None:
        self.metrics.child(counter, version[0], str(version[1])).inc()

    def _gauges(self) -> None:
        """The table's size now (under the lock, so that two threads cannot publish in the wrong order)."""
        self.metrics.cache_bytes.set(self.bytes)
        self.metrics.cache_entries.set(len(self._entries))
