"""``MODEL_CONTROL=on-demand``: the whole store within a memory budget, no request lost.

The store is the catalogue. A request for a model that is not resident waits while it loads
(``COLD_START_TIMEOUT_S``; concurrent requests for it share the one load); a load that would
exceed the worker's share of ``MEMORY_BUDGET`` first evicts the least recently used models that
are neither pinned (``PINNED``) nor answering a request, through the lifecycle's drain. A model
is never evicted under a request: the check and the status change happen under the repository's
lock, which every lease takes. Where nothing can make room, the request gets 503 with the reason
and a ``Retry-After``.

A model's cost is what its load and warm-up added to the worker's resident memory, measured at
each load, but never less than the estimate its export recorded (``memory`` in the metadata, from
the family's measured ratio of resident to graph bytes; else one from the graph's size): resident
growth under-reads a load that reuses memory freed before it (measured here, the same ResNet-18
read 141 MiB in a fresh worker and 214 MiB in a busy one), and a budget must not. Loads
and evictions run one at a time, on one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ModelNotReady
from ..memory import default_budget, parse_size, resident_bytes
from ..store.layout import StoredVersion, is_valid_name

if TYPE_CHECKING:
    from .lifecycle import ModelControl
    from .repository import Repository

logger = logging.getLogger(__name__)

# for a store exported before the metadata recorded its estimate: a fixed part (the arenas) and a proportional one
ESTIMATE_RATIO = 2.0
ESTIMATE_FIXED = 160 * 2**20
BUSY_RETRY_S = 0.05  # how often a load waiting for a busy model to fall idle looks again


class BudgetExhausted(ModelNotReady):
    """The model cannot be made resident now: the budget is held by pinned or busy models."""

    retry_after = 5

    def __init__(self, message: str, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy  # busy models hold some of it: room may come


class ColdStart(ModelNotReady):
    """The model is still loading after ``COLD_START_TIMEOUT_S``; it goes on loading."""

    retry_after = 5


def _release_freed_memory() -> None:
    """glibc keeps freed arenas for reuse; an eviction hands them back to the system (``malloc_trim``)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class Resident:
    cost: int  # bytes counted against the budget: the larger of the measured growth and the estimate
    grown: int  # bytes its load and warm-up added to the worker's resident memory
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)


class Residency:
    def __init__(self, repository: Repository, control: ModelControl, budget: int, how: str) -> None:
        self.repository, self.control = repository, control
        self.settings = repository.settings
        self.metrics = repository.metrics
        self.budget, self.how = budget, how
        self.pinned = set(self.settings.pinned_models())
        self.resident: dict[str, Resident] = {}
        self.measured: dict[str, int] = {}  # the largest growth each model's load measured, kept after its eviction
        self.evicted: set[str] = set()
        self._lock = threading.Lock()  # one load or eviction at a time
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="residency")
        self._loads: dict[str, asyncio.Future[None]] = {}
        self.metrics.memory_budget.set(budget)
        logger.info("on-demand: models may take %.0f MiB in this worker (%s)", budget / 2**20, how)

    @classmethod
    def create(cls, repository: Repository, control: ModelControl) -> Residency:
        """This worker's residency: its share of ``MEMORY_BUDGET`` (or of the derived budget), measured from
        its resident memory now, before any model."""
        settings = repository.settings
        workers = settings.processes
        if settings.memory_budget.strip():
            whole, how = parse_size(settings.memory_budget), f"MEMORY_BUDGET={settings.memory_budget}"
        else:
            whole, how = default_budget(resident_bytes(), workers)
        return cls(repository, control, whole // workers, f"{how}; shared by {workers} workers" if workers > 1 else how)

    # -- what requests call ---------------------------------------------------------------------

    async def ensure(self, name: str | None, version: int | None) -> None:
        """Make ``name`` (at ``version``) resident, loading it if need be; a no-op for what the store lacks."""
        name = name if name is not None else self.repository.default_model
        if name and self._is_resident(name, version):  # in memory: no store read on a resident model's request
            self.touch(name)
            return
        if not name or not is_valid_name(name) or not self.repository.store.versions(name):
            return  # the lease says what is wrong
        future = self._loads.get(name)
        if future is None:
            future = asyncio.get_running_loop().run_in_executor(self._executor, self.load, name, version, "request")
            self._loads[name] = future
            future.add_done_callback(lambda done: self._forget_load(name, done))
        self.metrics.child(self.metrics.cold_waits, name).inc()
        try:
            await asyncio.wait_for(asyncio.shield(future), self.settings.cold_start_timeout_s)
        except TimeoutError:
            raise ColdStart(
                f"Model {name!r} is still loading after COLD_START_TIMEOUT_S={self.settings.cold_start_timeout_s:g} s "
                "(a cold start); it goes on loading: retry shortly"
            ) from None
        self.touch(name)

    def _forget_load(self, name: str, done: asyncio.Future[None]) -> None:
        if self._loads.get(name) is done:
            del self._loads[name]
        if not done.cancelled():
            done.exception()  # retrieved: a load nobody waited for to the end is logged where it failed

    def touch(self, name: str) -> None:
        if (found := self.resident.get(name)) is not None:
            found.last_used = time.monotonic()

    def _is_resident(self, name: str, version: int | None) -> bool:
        if version is None:
            return self.repository.serving(name) is not None
        entry = self.repository.versions.get(name, {}).get(version)
        return entry is not None and entry.status in ("ready", "failed")

    # -- loads and evictions, one at a time -----------------------------------------------------

    def load(self, name: str, version: int | None, reason: str) -> None:
        """Load ``name``'s versions (its policy's, or ``version``), evicting for room first. Where the room is held
        by models answering requests, wait for one to fall idle (up to ``COLD_START_TIMEOUT_S``)."""
        plan = self.control.plan({name: [version] if version else None})
        if name in plan.problems or not plan.versions.get(name):
            return  # the lease answers with the reason (a failed version, a missing one)
        estimates = {stored.version: self.estimate(stored) for stored in plan.versions[name]}
        deadline = time.monotonic() + self.settings.cold_start_timeout_s
        while True:
            with self._lock:
                if self._is_resident(name, version):
                    return
                versions = self.repository.versions.get(name, {})
                wanted = [s for s in plan.versions[name] if s.version not in versions
                          or versions[s.version].status == "failed"]  # fmt: skip
                estimate = sum(estimates[s.version] for s in wanted)
                try:
                    self._make_room(name, max(self.measured.get(name, 0), estimate))
                except BudgetExhausted as exc:
                    if not exc.busy or time.monotonic() >= deadline:
                        self.metrics.child(self.metrics.budget_exhausted, name).inc()
                        raise
                else:
                    return self._admit(name, wanted, estimate, reason)
            time.sleep(BUSY_RETRY_S)

    def _admit(self, name: str, wanted: list[StoredVersion], estimate: int, reason: str) -> None:
        """Load ``wanted`` (room made) and count what it holds: the larger of its measured growth and ``estimate``."""
        loaded = [self.repository.load(stored, self.control.integrity.signature(stored)) for stored in wanted]
        if self.repository.serving(name) is None:
            return  # failed: the lease says why
        grown = sum(entry.resident_bytes for entry in loaded)
        cost = max(grown, estimate, self.measured.get(name, 0)) + self._cost_of(name)
        self.resident[name] = Resident(cost, grown)
        self.measured[name] = max(grown, self.measured.get(name, 0))
        self.evicted.discard(name)
        self.metrics.child(self.metrics.model_loads, name, reason).inc()
        logger.info("%s: resident (%s; its load added %.0f MiB, counted as %.0f; %.0f of %.0f MiB used)", name,
                    reason, grown / 2**20, cost / 2**20, self.used() / 2**20, self.budget / 2**20)  # fmt: skip

    def _cost_of(self, name: str) -> int:
        found = self.resident.get(name)
        return found.cost if found is not None else 0

    @staticmethod
    def estimate(stored: StoredVersion) -> int:
        """What its export recorded it would take, else a guess from its graph's size."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return int(stored.read_metadata()["memory"]["resident_estimate_bytes"])
        with contextlib.suppress(OSError):
            return int(stored.graph.stat().st_size * ESTIMATE_RATIO) + ESTIMATE_FIXED
        return ESTIMATE_FIXED

    def used(self) -> int:
        return sum(r.cost for r in self.resident.values())

    def _make_room(self, name: str, need: int) -> None:
        """Evict least recently used, unpinned, idle models until ``need`` fits; BudgetExhausted where it cannot."""
        how = "as measured at its last load" if name in self.measured else "by its export's estimate"
        if need > self.budget:
            raise BudgetExhausted(
                f"Model {name!r} needs about {need / 2**20:.0f} MiB ({how}) and this worker's share of MEMORY_BUDGET "
                f"is {self.budget / 2**20:.0f} MiB: it cannot be served here; raise MEMORY_BUDGET or use fewer WORKERS"
            )
        victims = sorted((r.last_used, other) for other, r in self.resident.items() if other not in self.pinned)
        busy = []
        for _, victim in victims:
            if self.used() + need <= self.budget:
                return
            if victim == name:
                continue
            if not self.evict(victim, "pressure"):
                busy.append(victim)
        if self.used() + need > self.budget:
            pinned = sorted(self.pinned & set(self.resident))
            raise BudgetExhausted(
                f"Model {name!r} needs about {need / 2**20:.0f} MiB ({how}); {self.used() / 2**20:.0f} of this "
                f"worker's {self.budget / 2**20:.0f} MiB are held by pinned models ({', '.join(pinned) or 'none'}) "
                f"and models answering requests ({', '.join(busy) or 'none'}): retry shortly, or raise MEMORY_BUDGET",
                busy=bool(busy),
            )

    def evict(self, name: str, reason: str) -> bool:
        """Unload every version of ``name`` if none holds a request (else False); its memory goes back."""
        entries = self.repository.retire_if_idle(name)
        if entries is None:
            return False
        for entry in entries:
            self.repository.unload(entry)
        freed = self.resident.pop(name, Resident(0, 0)).cost
        self.evicted.add(name)
        _release_freed_memory()
        self.metrics.child(self.metrics.evictions, name, reason).inc()
        logger.info("%s: evicted (%s), %.0f MiB back", name, reason, freed / 2**20)
        return True

    def evict_idle(self) -> None:
        """``IDLE_UNLOAD_S``: unload what nobody asked for that long (pinned models stay)."""
        limit = self.settings.idle_unload_s
        if not limit:
            return
        with self._lock:
            now = time.monotonic()
            for name, found in list(self.resident.items()):
                if name not in self.pinned and now - found.last_used >= limit:
                    self.evict(name, "idle")

    # -- what /models shows ---------------------------------------------------------------------

    def describe(self, name: str) -> dict[str, Any]:
        found = self.resident.get(name)
        if found is not None:
            state = "resident"
        elif name in self._loads:
            state = "loading"
        elif any(e.status == "failed" for e in self.repository.versions.get(name, {}).values()):
            state = "failed"
        else:
            state = "evicted" if name in self.evicted else "not loaded"
        out: dict[str, Any] = {"state": state, "pinned": name in self.pinned}
        if found is not None:
            out |= {"bytes": found.cost, "measured_bytes": found.grown,
                    "idle_seconds": round(time.monotonic() - found.last_used, 1),
                    "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(found.loaded_at))}  # fmt: skip
        elif name in self.measured:
            out["bytes_when_resident"] = self.measured[name]
        return out

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
