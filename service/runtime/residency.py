"""``MODEL_CONTROL=on-demand``: the whole store within a memory budget, no request lost.

The store is the catalogue. A request for a model that is not resident waits while it loads
(``COLD_START_TIMEOUT_S``; concurrent requests for it share the one load); a load that would
exceed the worker's share of ``MEMORY_BUDGET`` first evicts the least recently used models that
are neither pinned (``PINNED``) nor answering a request, through the lifecycle's drain. A model
is never evicted under a request: the check and the status change happen under the repository's
lock, which every lease takes. Where nothing can make room, the request gets 503 with the reason
and a ``Retry-After``.

A version's cost is the estimate its export recorded (``memory`` in the metadata, from the
family's measured ratio of resident to graph bytes, after a warm-up in a fresh process), plus
its explanation graph's once a Grad-CAM opens it. What each load adds to the worker's resident
memory is measured and shown, but not what the budget counts where the export recorded an
estimate: growth under-reads a load that reuses memory freed before it (the same ResNet-18 read
141 MiB in a fresh worker and 214 MiB in a busy one) and over-reads one beside a decode or
another graph's load, and a budget that kept the largest reading refused models for good. A
version exported before the estimate was recorded counts the larger of a guess from its graph's
size and its own load's growth. Loads and evictions run one at a time, on one thread; each is
planned before anything is evicted, and a model is held for the requests waiting for it from
before its load until they have leased it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelNotReady
from ..memory import default_budget, parse_size, resident_bytes
from ..store.layout import StoredVersion, is_valid_name
from .deadline import time_left

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..settings import Settings
    from ..store.layout import ModelStore
    from .entry import ModelEntry
    from .lifecycle import ModelControl
    from .repository import Repository

logger = logging.getLogger(__name__)

# for a store exported before the metadata recorded its estimate: a fixed part (the arenas) and a proportional one
ESTIMATE_RATIO = 2.0
ESTIMATE_FIXED = 160 * 2**20
BUSY_RETRY_S = 0.05  # how often a load waiting for a busy model to fall idle looks again
DEADLINE_MARGIN_S = 1.0  # a cold start gives up this much (at most a tenth of what is left) before the request's end


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
    cost: int  # bytes counted against the budget: its versions' estimates, and its explanation graphs'
    grown: int  # bytes its loads and warm-ups added to the worker's resident memory, as measured
    default: int | None = None  # the version requests without one are leased (its policy's highest), once loaded
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Estimate:
    bytes: int
    recorded: bool  # by the export; else guessed from the graph's size


class AlwaysResident:
    """``MODEL_CONTROL=none|poll|explicit``: what the lifecycle loaded is what there is; a request leases it."""

    def __init__(self, repository: Repository) -> None:
        self.repository = repository

    async def acquire(
        self, name: str | None, version: int | None = None
    ) -> contextlib.AbstractContextManager[ModelEntry]:
        """The version for a request, leased (see :meth:`Repository.lease`)."""
        return self.repository.lease(name, version)

    def ready(self, name: str, version: int | None) -> bool:
        """Always: a lease is answered at once, with the version or the reason why not."""
        return True

    def load_soon(self, name: str, version: int | None) -> asyncio.Future[int | None] | None:
        """Nothing to start: the lifecycle loads what there is."""
        return None

    def describe(self, name: str) -> dict[str, Any] | None:
        return None

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def _whole_budget(settings: Settings, workers: int) -> tuple[int, str]:
    """The memory every worker's models share, and where it comes from: ``MEMORY_BUDGET``, else derived from the
    machine's (or the cgroup's) memory and this process's resident size."""
    if settings.memory_budget.strip():
        return parse_size(settings.memory_budget), f"MEMORY_BUDGET={settings.memory_budget}"
    return default_budget(resident_bytes(), workers)


class Residency:
    """``MODEL_CONTROL=on-demand``: the strategy behind a request's lease that makes its model resident first."""

    def __init__(self, repository: Repository, control: ModelControl, metrics: Metrics, budget: int, how: str) -> None:
        self.repository, self.control = repository, control
        self.settings = repository.settings
        self.metrics = metrics
        self.budget, self.how = budget, how
        self.pinned = set(self.settings.pinned_models())
        self.resident: dict[str, Resident] = {}
        self.measured: dict[str, int] = {}  # what each model's last load added, kept after its eviction (/models)
        self.evicted: set[str] = set()
        self._lock = threading.Lock()  # one load or eviction at a time
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="residency")
        self._loads: dict[tuple[str, int | None], asyncio.Future[int | None]] = {}
        self._holds: Counter[str] = Counter()  # requests waiting for a model, from before its load to their lease
        self._holds_lock = threading.Lock()
        self._stop = threading.Event()
        self.metrics.memory_budget.set(budget)
        for name in repository.store.names():  # the models requests may load
            self.metrics.seed_model(name)
        logger.info("on-demand: models may take %.0f MiB in this worker (%s)", budget / 2**20, how)

    @classmethod
    def create(cls, repository: Repository, control: ModelControl, metrics: Metrics) -> Residency:
        """This worker's residency: its share of ``MEMORY_BUDGET`` (or of the derived budget), measured from
        its resident memory now, before any model."""
        workers = repository.settings.processes
        whole, how = _whole_budget(repository.settings, workers)
        shared = f"{how}; shared by {workers} workers" if workers > 1 else how
        return cls(repository, control, metrics, whole // workers, shared)

    @classmethod
    def impossible(cls, settings: Settings, store: ModelStore, workers: int) -> str | None:
        """Why ``MODEL_CONTROL=on-demand`` cannot serve this store with these settings, before any worker starts
        (every request would get 503 for ever), with what would do; None where it can. The budget is measured
        from this process, lighter than a worker, so only what cannot work anyway is refused."""
        if settings.model_control != "on-demand":
            return None
        whole, how = _whole_budget(settings, workers)
        share = whole // max(workers, 1)
        estimates = {
            name: cls.estimate(latest).bytes for name in store.names() if (latest := store.latest(name)) is not None
        }
        if not estimates:
            return None
        mib = 2**20
        smallest = min(estimates, key=estimates.__getitem__)
        pinned = [name for name in settings.pinned_models() if name in estimates]
        if share < estimates[smallest]:
            return (f"MODEL_CONTROL=on-demand: each of {workers} worker(s) may give models {share / mib:.0f} MiB "
                    f"({how}), less than the smallest model of the store, {smallest} "
                    f"({estimates[smallest] / mib:.0f} MiB): raise MEMORY_BUDGET (or the memory limit) to at least "
                    f"{estimates[smallest] * workers / mib:.0f} MiB for the models, or use fewer WORKERS")  # fmt: skip
        if (need := sum(estimates[name] for name in pinned)) > share:
            return (f"PINNED models {', '.join(pinned)} take {need / mib:.0f} MiB, more than each worker's "
                    f"{share / mib:.0f} MiB for models ({how}): pin fewer, or raise MEMORY_BUDGET (or the memory "
                    f"limit) to at least {need * workers / mib:.0f} MiB for the models")  # fmt: skip
        return None

    # -- what requests call ---------------------------------------------------------------------

    async def acquire(
        self, name: str | None, version: int | None = None
    ) -> contextlib.AbstractContextManager[ModelEntry]:
        """The version for a request, leased once its model is resident (loaded now, or the reason why not).

        The model is held from before its load until the lease is taken, so no other load can evict it in
        between; a request without a version is leased the version the model's policy serves.
        """
        wanted = name if name is not None else self.repository.default_model
        if not wanted:
            return self.repository.lease(name, version)
        with self.holding(wanted):
            return self.repository.lease(wanted, await self.ensure(wanted, version))

    @contextlib.contextmanager
    def holding(self, name: str) -> Iterator[None]:
        """Keep ``name`` from eviction while a request waits for it (its load, then its lease)."""
        with self._holds_lock:
            self._holds[name] += 1
        try:
            yield
        finally:
            with self._holds_lock:
                self._holds[name] -= 1
                if not self._holds[name]:
                    del self._holds[name]

    def held(self, name: str) -> bool:
        with self._holds_lock:
            return self._holds[name] > 0

    async def ensure(self, name: str, version: int | None) -> int | None:
        """Make ``name`` (at ``version``, else its policy's versions) resident, loading it if need be; the version
        to lease (None: what the store lacks, for the lease to say)."""
        found = self._resident_version(name, version)
        if found is not None:  # in memory: no store read on a resident model's request
            self.touch(name)
            return found
        if not self._loadable(name, version):
            return version  # the lease says what is wrong
        future = self._load_soon(name, version)
        self.metrics.child(self.metrics.cold_waits, name).inc()
        wait = self.settings.cold_start_timeout_s
        left = time_left()
        if left is not None:  # answer 503 with Retry-After before the request's own time-out answers 504
            wait = min(wait, max(left - min(DEADLINE_MARGIN_S, left / 10), 0.0))
        try:  # not wait_for: on Python 3.11 it swallows a cancel (the client gone) that comes as the load ends
            async with asyncio.timeout(wait):
                chosen = await asyncio.shield(future)
        except TimeoutError:
            raise ColdStart(
                f"Model {name!r} is still loading after {wait:.3g} s (a cold start; COLD_START_TIMEOUT_S="
                f"{self.settings.cold_start_timeout_s:g}, or what the request's time-out left); it goes on loading: "
                "retry shortly"
            ) from None
        self.touch(name)
        return chosen

    def ready(self, name: str, version: int | None) -> bool:
        """Whether a lease of ``name`` (at ``version``; None: its policy's) would be answered without waiting for a
        load: it is resident, or the store has nothing to load (the lease says why)."""
        return self._resident_version(name, version) is not None or not self._loadable(name, version)

    def load_soon(self, name: str, version: int | None) -> asyncio.Future[int | None] | None:
        """Start the load a request for ``name`` would start, in the background, so that a caller with somewhere
        else to go need not wait for it: the load, or None where it is under way already or not needed."""
        if self._under_way((name, version)) is not None or self.ready(name, version):
            return None
        return self._load_soon(name, version)

    def _loadable(self, name: str, version: int | None) -> bool:
        """Whether the store has ``name`` (at ``version``, where one is named) for a load to try."""
        if not is_valid_name(name) or not (stored := self.repository.store.versions(name)):
            return False
        return version is None or any(s.version == version for s in stored)

    def _load_soon(self, name: str, version: int | None) -> asyncio.Future[int | None]:
        """The load of ``name`` at ``version`` under way, or a new one on the loads' thread."""
        key = (name, version)
        future = self._under_way(key)
        if future is None:
            future = asyncio.get_running_loop().run_in_executor(self._executor, self.load, name, version, "request")
            self._loads[key] = future
            future.add_done_callback(lambda done: self._forget_load(key, done))
        return future

    def _under_way(self, key: tuple[str, int | None]) -> asyncio.Future[int | None] | None:
        """The load of ``key`` under way on this event loop (one begun on a loop since closed, a test's asyncio.run,
        is never answered: this loop begins its own)."""
        future = self._loads.get(key)
        return future if future is not None and future.get_loop() is asyncio.get_running_loop() else None

    def _forget_load(self, key: tuple[str, int | None], done: asyncio.Future[int | None]) -> None:
        if self._loads.get(key) is done:
            del self._loads[key]
        if not done.cancelled():
            done.exception()  # retrieved: a load nobody waited for to the end is logged where it failed

    def touch(self, name: str) -> None:
        if (found := self.resident.get(name)) is not None:
            found.last_used = time.monotonic()

    def _resident_version(self, name: str, version: int | None) -> int | None:
        """The version to lease if ``name`` (at ``version``; None: its policy's) is resident now, else None."""
        versions = self.repository.versions.get(name, {})
        if version is None:
            found = self.resident.get(name)
            entry = versions.get(found.default) if found is not None and found.default is not None else None
            return entry.version if entry is not None and entry.status == "ready" else None
        entry = versions.get(version)
        return version if entry is not None and entry.status in ("ready", "failed") else None

    # -- loads and evictions, one at a time -----------------------------------------------------

    def load(self, name: str, version: int | None, reason: str) -> int | None:
        """Load ``name``'s versions (its policy's, or ``version``), evicting for room first; the version to lease.
        Where the room is held by models answering or awaiting requests, wait for it (``COLD_START_TIMEOUT_S``)."""
        plan = self.control.plan({name: [version] if version else None})
        if name in plan.problems:  # a bad config.pbtxt, say: the request is told, not sent to a 404
            raise ModelNotReady(f"Model {name!r} cannot be loaded: {plan.problems[name]}")
        if not plan.versions.get(name):
            return version  # the lease answers with the reason (a failed version)
        estimates = {stored.version: self.estimate(stored) for stored in plan.versions[name]}
        deadline = time.monotonic() + self.settings.cold_start_timeout_s
        while True:
            with self._lock:
                found = self._resident_version(name, version)
                if found is not None:
                    return found
                if self._stop.is_set():  # queued, or waiting for room, as the worker began to stop: what it loaded
                    raise ModelNotReady(f"Model {name!r} is not loaded: the server is stopping")  # would outlive it
                versions = self.repository.versions.get(name, {})
                wanted = [s for s in plan.versions[name] if s.version not in versions
                          or versions[s.version].status == "failed"]  # fmt: skip
                try:
                    self._make_room(name, sum(estimates[s.version].bytes for s in wanted))
                except BudgetExhausted as exc:
                    if not exc.busy or time.monotonic() >= deadline:
                        self.metrics.child(self.metrics.budget_exhausted, name).inc()
                        raise
                else:
                    policy = [s.version for s in plan.versions[name]] if version is None else None
                    return self._admit(name, wanted, estimates, reason, policy, version)
            time.sleep(BUSY_RETRY_S)

    def _admit(self, name: str, wanted: list[StoredVersion], estimates: dict[int, Estimate], reason: str,
               policy: list[int] | None, version: int | None) -> int | None:  # fmt: skip
        """Load ``wanted`` (room made) and count the versions that became ready; the version to lease (for a
        request without one, the highest ready version of the model's policy)."""
        loaded = [self.repository.load(stored, self.control.integrity.signature(stored)) for stored in wanted]
        ready = [entry for entry in loaded if entry.status == "ready"]
        grown = sum(entry.resident_bytes for entry in ready)
        cost = sum(self._cost(estimates[entry.version], entry.resident_bytes) for entry in ready)
        found = self.resident.get(name)
        if found is None and not ready:
            return version  # failed: the lease says why
        if found is None:
            found = self.resident[name] = Resident(0, 0)
        found.cost, found.grown = found.cost + cost, found.grown + grown
        served = self.repository.versions.get(name, {})
        if policy is not None:
            found.default = max((v for v in policy if v in served and served[v].status == "ready"), default=None)
        if ready:
            self.measured[name] = grown
            self.evicted.discard(name)
            self.metrics.child(self.metrics.model_loads, name, reason).inc()
            logger.info("%s: resident (%s; its load added %.0f MiB, counted as %.0f; %.0f of %.0f MiB used)", name,
                        reason, grown / 2**20, cost / 2**20, self.used() / 2**20, self.budget / 2**20)  # fmt: skip
        return found.default if version is None else version

    @staticmethod
    def _cost(estimate: Estimate, grown: int) -> int:
        """What a ready version counts: its export's estimate; a guess's, or its load's growth if larger."""
        return estimate.bytes if estimate.recorded else max(estimate.bytes, grown)

    def _cost_of(self, name: str) -> int:
        found = self.resident.get(name)
        return found.cost if found is not None else 0

    @staticmethod
    def estimate(stored: StoredVersion) -> Estimate:
        """What its export recorded it would take, else a guess from its graph's size."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return Estimate(int(stored.read_metadata()["memory"]["resident_estimate_bytes"]), recorded=True)
        with contextlib.suppress(OSError):
            return Estimate(int(stored.graph.stat().st_size * ESTIMATE_RATIO) + ESTIMATE_FIXED, recorded=False)
        return Estimate(ESTIMATE_FIXED, recorded=False)

    def count_explanation(self, entry: ModelEntry, graph: Path) -> Callable[[], None] | None:
        """Before a version's explanation graph opens (it holds the network again): room for it, counted with the
        model's cost (released with it). The estimate: the version's, scaled by the two graphs' sizes. Returns
        what takes the count back where the graph then fails to open."""
        assert entry.model is not None
        model = entry.model.stored
        try:
            extra = int(self.estimate(model).bytes * graph.stat().st_size / max(model.graph.stat().st_size, 1))
        except OSError:
            return None
        with self._lock:
            self._make_room(entry.name, extra)
            found = self.resident.get(entry.name)
            if found is None:
                return None
            found.cost += extra
            logger.info("%s: explanation graph counted as %.0f MiB (%.0f of %.0f MiB used)", entry.name,
                        extra / 2**20, self.used() / 2**20, self.budget / 2**20)  # fmt: skip

        def uncount() -> None:
            with self._lock:
                if self.resident.get(entry.name) is found:  # not since evicted and loaded again
                    found.cost -= extra

        return uncount

    def used(self) -> int:
        return sum(r.cost for r in self.resident.values())

    def _busy(self, name: str) -> bool:
        """Answering or awaiting requests: not to be evicted now (room may come once it is idle)."""
        return self.held(name) or any(e.in_flight for e in self.repository.versions.get(name, {}).values())

    def _make_room(self, name: str, need: int) -> None:
        """Evict least recently used, unpinned, idle models until ``need`` more bytes fit; BudgetExhausted, with
        nothing evicted, where they cannot (planned first: evicting what cannot make room only costs a reload)."""
        if self._cost_of(name) + need > self.budget:
            raise BudgetExhausted(
                f"Model {name!r} needs about {(self._cost_of(name) + need) / 2**20:.0f} MiB (by its export's "
                f"estimate) and this worker's share of MEMORY_BUDGET is {self.budget / 2**20:.0f} MiB: it cannot be "
                "served here; raise MEMORY_BUDGET or use fewer WORKERS"
            )
        if self.used() + need <= self.budget:
            return
        others = [other for _, other in sorted((r.last_used, o) for o, r in self.resident.items())
                  if other != name and other not in self.pinned]  # fmt: skip
        busy = [other for other in others if self._busy(other)]
        idle = [other for other in others if other not in busy]
        if self.used() - sum(self.resident[other].cost for other in idle) + need > self.budget:
            pinned = sorted(self.pinned & set(self.resident))
            raise BudgetExhausted(
                f"Model {name!r} needs about {need / 2**20:.0f} MiB (by its export's estimate); "
                f"{self.used() / 2**20:.0f} of this worker's {self.budget / 2**20:.0f} MiB are held by pinned models "
                f"({', '.join(pinned) or 'none'}) and models answering requests ({', '.join(busy) or 'none'}): "
                "retry shortly, or raise MEMORY_BUDGET",
                busy=bool(busy),
            )
        for victim in idle:
            if self.used() + need <= self.budget:
                return
            self.evict(victim, "pressure")
        if self.used() + need > self.budget:  # one fell busy since the plan: the caller waits and plans again
            raise BudgetExhausted(f"Model {name!r}: the models to make room with are answering requests", busy=True)

    def evict(self, name: str, reason: str) -> bool:
        """Unload every version of ``name`` if none holds or awaits a request (else False); its memory goes back,
        and its cost leaves the budget even where an unload goes wrong."""
        with self._holds_lock:  # a request that holds it before this leases it; one that holds it after finds it gone
            entries = None if self._holds[name] else self.repository.retire_if_idle(name)
        if entries is None:
            return False
        try:
            for entry in entries:
                try:
                    self.repository.unload(entry)
                except Exception:  # released as far as it goes; the next version and the budget go on
                    logger.exception("%s v%d: the unload failed", entry.name, entry.version)
        finally:
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
        elif any(key[0] == name for key in self._loads):
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

    # -- its own thread ------------------------------------------------------------------------

    def start(self) -> None:
        """In the background: the pinned and warm models, then the idle sweep; everything else loads when a
        request asks."""
        threading.Thread(target=self._run, name="residency", daemon=True).start()

    def _run(self) -> None:
        warm = {**dict.fromkeys(self.settings.pinned_models()), **self.settings.requested_models()}
        for name, version in warm.items():
            if self._stop.is_set():  # the worker stops: no more loads nothing would close
                return
            try:
                self.load(name, version, "start")
            except Exception as exc:  # serving goes on; a request for it tries again and says why
                logger.error("on-demand: %s could not be loaded at start: %s", name, exc)
        self.repository.mark_loaded()
        limit = self.settings.idle_unload_s
        interval = max(1.0, min(limit / 4, 30.0)) if limit else None
        while interval is not None and not self._stop.wait(interval):
            try:
                self.evict_idle()
            except Exception:  # the next sweep tries again; this thread must outlive any one eviction
                logger.exception("on-demand: the idle sweep failed")

    def shutdown(self) -> None:
        self._stop.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
