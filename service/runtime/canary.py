"""Canaries: a candidate answers a share of a primary's live requests, judged and stepped up or rolled back by itself.

``CANARY=PRIMARY:CANDIDATE:FRACTION`` (the shape of ``SHADOW``). A request for PRIMARY that
names no version is leased to CANDIDATE instead, for that share of requests: the share is
exact over every block of a hundred requests, the positions in it random (a client that
cycles through a few images does not send the same one to the candidate each time). A
request that names a version is never diverted; a candidate that cannot take a request
(not in the store, failed, its queue full) leaves it to the primary, and, but for a full
queue, the canary's ``fallback`` says why until the candidate answers again.

Each worker judges windows of ``CANARY_WINDOW`` of its canary answers
(:mod:`.canary_analysis`); a sample of them (``CANARY_SAMPLE``) also goes through the
primary off the request path, on the shadow's queue, for top-1 agreement. A failing
window rolls the canary back (fraction 0, ``rolled_back``, the reason and figures logged
and in ``GET /models``); a passing one steps the fraction up to the next of
``CANARY_STEPS``, and past the last one the canary is ``promoted``: every request for
PRIMARY that names no version is answered by CANDIDATE, which is already loaded and warm, so
nothing is lost in the switch.

The state (state, fraction, step, the last verdict) lives in one JSON file every worker and
replica shares (``CANARY_STATE``), written under ``flock`` with a revision: a worker's
decision applies only if nobody changed the canary since its window began (otherwise it
takes the other's), and every worker reads the file twice a second. It survives a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import ClientGone, ServiceError
from ..metrics import Metrics
from ..settings import Settings, ShadowPair
from ..store.atomic import replace_text
from .canary_analysis import Thresholds, Window
from .deadline import cut_off
from .entry import ModelEntry
from .shadow import MIN_TOP1_AGREEMENT, Lane, Shadow, agreement_gate

logger = logging.getLogger(__name__)

STATES = ("running", "paused", "rolled_back", "promoted", "ended")
BLOCK = 100  # requests over which a fraction is exact
SYNC_S = 0.5  # how often a worker reads the shared state
HISTORY = 20  # windows kept in /models
COLD_RETRY_S = 10.0  # on demand: after a candidate's background load failed, the primary answers this long
REPEAT_S = 60.0  # a kind of fallback (and the candidate answering again) is logged at most this often


class Leases(Protocol):
    """How a request gets its model's lease: residency's (runtime/residency.py), on demand or not."""

    async def acquire(
        self, name: str | None, version: int | None = None
    ) -> contextlib.AbstractContextManager[ModelEntry]:
        """The version for a request, leased (made resident first, on demand)."""

    def ready(self, name: str, version: int | None) -> bool:
        """Whether :meth:`acquire` would answer without waiting for a load."""

    def load_soon(self, name: str, version: int | None) -> asyncio.Future[int | None] | None:
        """Start that load in the background: the load, or None where none was needed or one is under way."""


# the routed lease of the current request, while it is held: which canary, which side answers, under which state
# (read by the answered hook), and what the response cache tells it (see answered_by_cache)
ROUTE: contextvars.ContextVar[_Routed | None] = contextvars.ContextVar("canary_route", default=None)


def answered_by_cache() -> None:
    """The current request takes its answer from the response cache (stored, or another request's computing now):
    the version runs nothing for it, so it is no evidence of its error rate, whether that answer succeeds or
    fails (errors are never stored: counting hits would dilute them; counting a shared failure would not)."""
    routed = ROUTE.get()
    if routed is not None:
        routed.cached = True


def answering_canary() -> str | None:
    """The canary (``PRIMARY:CANDIDATE``) whose candidate answers the current request, while its lease is held;
    None where the model asked for answers (no canary, or the primary's share)."""
    routed = ROUTE.get()
    return routed.canary.key if routed is not None and routed.side == "candidate" else None


class CanaryRefused(Exception):
    """A change that would route a switched canary's requests to the version that drained (not a ValueError: what
    records a change takes those as a state file it cannot use)."""


class StateFile:
    """``{"canaries": {"PRIMARY:CANDIDATE": {...}}}`` in one JSON file: read freely, changed under an exclusive
    ``flock`` on ``<file>.lock`` and replaced atomically (as the lifecycle's declared state)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ValueError(f"the canary state {self.path} is unreadable: {exc}") from None
        canaries = data.get("canaries") if isinstance(data, dict) else None
        if not isinstance(canaries, dict):
            raise ValueError(f"the canary state {self.path} holds no canaries object")
        return {key: value for key, value in canaries.items() if isinstance(value, dict)}

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        """The canaries, to change in place; written back when the block ends without an error."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            canaries = self.read()
            yield canaries
            replace_text(self.path, json.dumps({"canaries": canaries}, indent=2, sort_keys=True) + "\n")


@dataclass
class Canary:
    """One canary in this worker: what the shared state says, and the window it is judging."""

    pair: ShadowPair
    window: Window
    state: str = "running"
    fraction: float = 0.0
    step: int = 0
    revision: int = 0
    reason: str | None = None
    verdict: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    switched: bool = False  # promoted, and its candidate's version declared alone (MODEL_CONTROL=explicit): see _switch
    lane: Lane | None = None
    gate: float | None = None  # the candidate's export gate, once it answered
    _block: list[bool] = field(default_factory=list)
    _carry: float = 0.0
    _cold_retry_at: float = 0.0  # on demand: not before this (monotonic) is a failed candidate load tried again
    fallback: str | None = None  # in this worker: why the primary answers the candidate's share (None: it doesn't)
    primary_io: tuple[Any, int] | None = None  # the primary's inputs and class count, once it was served
    _said: dict[str, float] = field(default_factory=dict)  # when (monotonic) each kind of line was last logged

    @property
    def key(self) -> str:
        return f"{self.pair.primary}:{self.pair.candidate}"

    @property
    def diverting(self) -> float:
        """The share of requests the candidate answers now."""
        return self.fraction if self.state in ("running", "promoted") else 0.0

    def divert(self) -> bool:
        """Whether this request goes to the candidate: exactly ``fraction`` of every block of requests."""
        fraction = self.diverting
        if fraction >= 1.0:
            return True
        if fraction <= 0.0:
            return False
        block = self._block  # the state's thread may replace it (adopt): this request takes from the one it saw
        if not block:
            self._carry += fraction * BLOCK
            chosen = int(self._carry)
            self._carry -= chosen
            block = [True] * chosen + [False] * (BLOCK - chosen)
            random.shuffle(block)
            self._block = block
        return block.pop()

    def stored(self) -> dict[str, Any]:
        return {"state": self.state, "fraction": self.fraction, "step": self.step, "revision": self.revision,
                "reason": self.reason, "verdict": self.verdict, "history": self.history[-HISTORY:],
                "switched": self.switched, "updated": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip

    def adopt(self, stored: dict[str, Any]) -> None:
        """Take the shared state; the window starts afresh."""
        state, fraction = str(stored.get("state", "running")), float(stored.get("fraction", 0.0))
        if state not in STATES or not 0 <= fraction <= 1:
            raise ValueError(f"canary {self.key}: state {state!r} at fraction {fraction} is not a canary's state")
        self.state, self.fraction = state, fraction
        self.step = int(stored.get("step", 0))
        self.revision = int(stored.get("revision", 0))
        self.reason, self.verdict = stored.get("reason"), stored.get("verdict")
        self.history = list(stored.get("history") or [])
        self.switched = bool(stored.get("switched", False))
        self.window = self.window.next()
        self._block, self._carry = [], 0.0
        if self.diverting <= 0:  # nothing of its share left to fall back
            self.fallback = None


class _Routed(contextlib.AbstractContextManager[ModelEntry]):
    """A lease that says which side of which canary it is, to the answered hook and when it ends."""

    __slots__ = ("cached", "canaries", "canary", "entered", "lease", "revision", "side", "token")

    def __init__(
        self,
        canaries: Canaries,
        canary: Canary,
        side: str,
        lease: contextlib.AbstractContextManager[ModelEntry],
        revision: int,
        entered: ModelEntry | None = None,
    ) -> None:
        self.canaries, self.canary, self.side, self.lease = canaries, canary, side, lease
        self.revision = revision  # the state the request was routed under
        self.entered = entered  # the lease's version, where it was entered already (to look at it first)
        self.token: contextvars.Token[_Routed | None] | None = None
        self.cached = False  # answered by the response cache (answered_by_cache)

    def __enter__(self) -> ModelEntry:
        entry = self.entered if self.entered is not None else self.lease.__enter__()
        self.token = ROUTE.set(self)
        return entry

    def __exit__(self, *exc: Any) -> bool | None:
        with contextlib.suppress(ValueError):  # a token of another context: nothing to restore here
            if self.token is not None:
                ROUTE.reset(self.token)
        try:
            return self.lease.__exit__(*exc)
        finally:
            if exc[0] is None or isinstance(exc[1], Exception):
                # a body that never came whole (the client went, or was too slow) is no evidence either way
                record = not isinstance(exc[1], ClientGone)
                error = exc[0] is not None and not (isinstance(exc[1], ServiceError) and exc[1].status_code < 500)
            else:  # cancelled: a 504 (the time limit, its body in) is this side's error; a client gone, none
                record = error = cut_off() == "5xx"
            if record:
                try:
                    self.canaries.finished(self.canary, self.side, self.revision, error, computed=not self.cached)
                except Exception:  # the canary's bookkeeping never fails a request
                    logger.exception("canary %s: recording a request failed", self.canary.key)


class Canaries:
    """Every ``CANARY`` of this worker: the routing, the windows, the shared state."""

    def __init__(
        self,
        pairs: list[ShadowPair],
        settings: Settings,
        metrics: Metrics,
        shadow: Shadow,
        promote: Callable[[str, int], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.shadow = shadow
        self.steps = settings.canary_step_fractions
        self.promote = promote  # (name, version): the lifecycle serves that version alone (a model's own canary)
        self.file = StateFile(settings.canary_state_path)
        self.canaries = {
            pair.primary.name: Canary(pair, Window(settings.canary_window), fraction=pair.fraction) for pair in pairs
        }
        self.repository = shadow.repository
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._stamp: tuple[int, int, int] | None = None
        for canary in self.canaries.values():
            canary.lane = shadow.add_lane(ShadowPair(canary.pair.candidate, canary.pair.primary, 1.0), self._compared)

    # -- the shared state ---------------------------------------------------------------------

    def start(self) -> None:
        """Take the shared state (created from ``CANARY`` where it has none of these), then follow it. A state file
        that cannot be read leaves the canaries paused (it may say one was rolled back); one that cannot be written
        leaves each worker its own state, in memory."""
        try:
            with self._lock, self.file.locked() as stored:
                for canary in self.canaries.values():
                    found = stored.get(canary.key)
                    if found is not None:
                        canary.adopt(found)
                        logger.info("canary %s: resumed %s at %g (revision %d)", canary.key, canary.state,
                                    canary.fraction, canary.revision)  # fmt: skip
                    else:
                        canary.revision = 1
                        stored[canary.key] = canary.stored()
                        logger.info("canary %s: started at %g; steps %s", canary.key, canary.fraction,
                                    ",".join(map(str, self.steps)) or "none")  # fmt: skip
        except ValueError as exc:  # unreadable, or a value that is not a state: it may hold a rollback
            for canary in self.canaries.values():
                canary.state, canary.fraction, canary.reason = "paused", 0.0, f"paused at start: {exc}"
            logger.error("canary: %s; every canary starts paused (fix or remove the file, then set its state through "
                         "the repository API)", exc)  # fmt: skip
        except OSError as exc:
            logger.error("canary: %s; each worker keeps its canaries' state in memory only (set CANARY_STATE to a "
                         "writable file every worker shares)", exc)  # fmt: skip
        for canary in self.canaries.values():
            self._publish(canary)
        threading.Thread(target=self._follow, name="canary-state", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _follow(self) -> None:
        while not self._stop.wait(SYNC_S):
            try:
                self.sync()
            except Exception:
                logger.exception("canary: reading the shared state failed; trying again")

    def sync(self) -> None:
        """Take what other workers decided (a higher revision in the file)."""
        try:
            found = self.file.path.stat()
        except OSError:
            return
        stamp = (found.st_ino, found.st_mtime_ns, found.st_size)  # each write replaces the file: a new inode
        if stamp == self._stamp:
            return
        self._stamp = stamp
        stored = self.file.read()
        with self._lock:
            for canary in self.canaries.values():
                entry = stored.get(canary.key)
                if entry is not None and int(entry.get("revision", 0)) > canary.revision:
                    canary.adopt(entry)
                    self._publish(canary)

    def change(self, canary: Canary, expected: int | None, **changes: Any) -> bool:
        """Apply ``changes`` if the canary is still at revision ``expected`` (None: whatever it is); False when
        another worker changed it first (its state is taken instead). The window starts afresh either way.

        A change of state also declares what the new state needs served (:meth:`_applied`), under the same lock as
        the shared state, so that two workers' changes and their declarations happen in one order; one that would
        route to a drained version is refused (:class:`CanaryRefused`)."""
        with self._lock:
            if expected is not None and expected != canary.revision:  # this worker took another's change meanwhile
                canary.window = canary.window.next()
                return False
            current = None
            try:  # tried every time, also where it failed before: once fixed or removed, the workers share again
                with self.file.locked() as stored:
                    found = stored.get(canary.key) or canary.stored()
                    if expected is not None and int(found.get("revision", 0)) != expected:
                        canary.adopt(found)
                        self._publish(canary)
                        return False
                    current = self._applied(canary, found, changes)
                    stored[canary.key] = current
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                current = None
                logger.error("canary %s: cannot record the change in %s (%s); applied in this worker only",
                             canary.key, self.file.path, exc)  # fmt: skip
            if current is None:
                current = self._applied(canary, canary.stored(), changes)
            canary.adopt(current)
            self._publish(canary)
            return True

    def _applied(self, canary: Canary, found: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
        """``found`` (the canary's shared state) with ``changes``, its next revision, and what it serves declared:
        a canary of one model's two versions promoted serves the candidate's version alone (:meth:`_switch`), and
        rolled back or ended, whoever does it and from whichever state, the primary's again, since the routing
        alone cannot bring back a version that has drained. Pausing, resuming or diverting less than all of a
        switched canary would route to that drained version: refused."""
        current = {**found, **changes, "revision": int(found.get("revision", 0)) + 1}
        state, switched = current.get("state"), bool(found.get("switched", False))
        diverts_all = state == "promoted" and float(current.get("fraction", 1.0)) >= 1.0
        if switched and not diverts_all and state not in ("rolled_back", "ended"):
            raise CanaryRefused(f"canary {canary.key} is promoted and {canary.pair.candidate} alone is served now "
                                f"(the other version has drained): set state rolled_back or ended to serve "
                                f"{canary.pair.primary} again")  # fmt: skip
        if state == "promoted" and not switched:
            current["switched"] = self._switch(canary)
        elif state in ("rolled_back", "ended") and switched:
            current["switched"] = not self._switch(canary, back=True)
        return current

    def _publish(self, canary: Canary) -> None:
        labels = (str(canary.pair.primary), str(canary.pair.candidate))
        m = self.metrics
        m.child(m.canary_fraction, *labels).set(canary.diverting)
        for side in ("primary", "candidate"):  # at 0 from the start: increase() sees each side's first answer
            m.child(m.canary_requests, *labels, side)
        for state in STATES:
            m.child(m.canary_state, *labels, state).set(1 if state == canary.state else 0)

    # -- the request path ---------------------------------------------------------------------

    def canary_for(self, name: str | None) -> Canary | None:
        """The canary of model ``name`` (a request's, once the default is resolved), if it is a primary."""
        return self.canaries.get(name) if name is not None else None

    async def acquire(self, canary: Canary, leases: Leases) -> contextlib.AbstractContextManager[ModelEntry]:
        """A lease for a request for the canary's primary: the candidate's for its share, else the primary's.

        The candidate answers only if, once its lease is held, the canary has not changed meanwhile (a rollback
        while it loaded on demand), it takes the primary's inputs and classes, and its queue has room for a
        request: otherwise the primary answers, as it would have without the canary. On demand, a candidate that
        is not resident starts loading and the primary answers meanwhile where it is resident itself, unless the
        canary diverts every request (see :meth:`_candidate_ready`).
        """
        pair, revision = canary.pair, canary.revision
        if canary.divert() and self._candidate_ready(canary, leases):
            try:
                lease = await leases.acquire(pair.candidate.name, pair.candidate.version)
            except ServiceError as exc:  # not in the store, failed, not loadable: the primary answers
                self._fall_back(canary, "unavailable", exc.message)
            else:
                entry = lease.__enter__()  # entered once: the _Routed takes it over, or it is given back now
                problem = None if canary.revision == revision and canary.diverting > 0 else "changed"
                problem = problem or self._unfit(canary, entry)
                if problem is None:
                    self._answers_again(canary)
                    return _Routed(self, canary, "candidate", lease, revision, entry)
                lease.__exit__(None, None, None)
        try:
            primary = await leases.acquire(pair.primary.name, pair.primary.version)
        except ServiceError:
            if pair.primary.version is None:
                raise
            primary = await leases.acquire(pair.primary.name, None)  # PRIMARY@V not served: what it would get
        return _Routed(self, canary, "primary", primary, revision)

    def _candidate_ready(self, canary: Canary, leases: Leases) -> bool:
        """Whether a diverted request should take the candidate's lease now: the candidate is warm (its load, if
        it needs one, is quick), or every request goes to it (the primary should answer none, and under a tight
        memory budget only its going idle lets the candidate in), or the primary is not resident either, so
        either lease waits for a load. Otherwise the candidate's load starts in the background, at most once per
        COLD_RETRY_S after one failed, and the primary answers."""
        candidate, primary = canary.pair.candidate, canary.pair.primary
        if canary.diverting >= 1.0 or leases.ready(candidate.name, candidate.version):
            return True
        if not leases.ready(primary.name, primary.version):
            return True
        if time.monotonic() < canary._cold_retry_at:
            return False
        load = leases.load_soon(candidate.name, candidate.version)
        if load is not None:
            logger.info("canary %s: the candidate is loading (on demand); the primary answers until it is resident",
                        canary.key)  # fmt: skip
            load.add_done_callback(lambda done: self._cold_loaded(canary, leases, done))
        return False

    def _cold_loaded(self, canary: Canary, leases: Leases, load: asyncio.Future[int | None]) -> None:
        """A candidate's background load ended: where it did not make the candidate ready (an error, or a version
        that failed to load), say why, and let the primary answer for COLD_RETRY_S before the next try."""
        candidate = canary.pair.candidate
        failed = None if load.cancelled() else load.exception()
        if load.cancelled() or (failed is None and leases.ready(candidate.name, candidate.version)):
            return
        canary._cold_retry_at = time.monotonic() + COLD_RETRY_S
        versions = self.repository.versions.get(candidate.name, {}).values()
        reason = (
            str(getattr(failed, "message", failed))
            if failed is not None
            else "; ".join(f"v{e.version}: {e.reason}" for e in versions if e.status == "failed") or "not resident"
        )
        self._fall_back(canary, "cold", f"the candidate could not be loaded ({reason}); the load is tried again in "
                                        f"{COLD_RETRY_S:g} s", repeat=True)  # fmt: skip

    def _unfit(self, canary: Canary, entry: ModelEntry) -> str | None:
        """Why the candidate's version ``entry`` should not take this request: its queue is full, or it does not take
        the primary's inputs or give its classes (as the primary was served last: on demand it may be evicted since);
        None when it should."""
        batcher = entry.batcher
        room = batcher.max_queue_images - batcher.queued_images if batcher is not None else None
        if room is not None and room < self.settings.max_images_per_request:
            return "queue full"
        primary = self.repository.serving(canary.pair.primary.name)
        if primary is not None and primary.model is not None:
            canary.primary_io = (primary.model.metadata.input, primary.model.metadata.num_classes)
        if canary.primary_io is None or entry.model is None:
            return None
        ours, (inputs, classes) = entry.model.metadata, canary.primary_io
        if ours.input == inputs and ours.num_classes == classes:
            return None
        why = (f"incompatible: {canary.pair.candidate} takes {ours.input.model_dump()} and gives {ours.num_classes} "
               f"classes; {canary.pair.primary} {inputs.model_dump()} and {classes}")  # fmt: skip
        self._fall_back(canary, "incompatible", why, level=logging.ERROR)
        return "incompatible"

    def _fall_back(
        self, canary: Canary, kind: str, why: str, level: int = logging.WARNING, repeat: bool = False
    ) -> None:
        """The candidate cannot answer its share, so the primary does: ``why`` goes in the canary's ``fallback``
        (``GET /models``) until the candidate answers again, and in the log at most once per REPEAT_S for each
        ``kind`` (its text may differ per request), or each time (``repeat``: a failed load, one per COLD_RETRY_S).
        Nothing for a canary that diverts nothing (stopped while the request waited)."""
        if canary.diverting <= 0:
            return
        canary.fallback = why
        if repeat or self._due(canary, kind):
            logger.log(level, "canary %s: the primary answers the candidate's share: %s", canary.key, why)

    def _answers_again(self, canary: Canary) -> None:
        """The candidate took a diverted request: a fallback no longer holds."""
        if canary.fallback is not None:
            canary.fallback = None
            if self._due(canary, "again"):
                logger.info("canary %s: the candidate answers its share again", canary.key)

    @staticmethod
    def _due(canary: Canary, kind: str) -> bool:
        """Whether a line of ``kind`` may be logged now (none for REPEAT_S before), noting that it is."""
        now, last = time.monotonic(), canary._said.get(kind)
        if last is not None and now - last < REPEAT_S:
            return False
        canary._said[kind] = now
        return True

    def answered(self, entry: ModelEntry, images: np.ndarray, probabilities: np.ndarray, seconds: float) -> None:
        """The ``answered`` hook: a routed request's answers into its window; a sample of the candidate's also to
        the primary, off the request path."""
        routed = ROUTE.get()
        if routed is None:
            return
        canary, side, revision = routed.canary, routed.side, routed.revision
        if revision != canary.revision or canary.state != "running":
            return
        canary.window.answered(side, probabilities, seconds)
        if side != "candidate":
            return
        if entry.model is not None:
            canary.gate = agreement_gate(entry.model.metadata)
        if canary.lane is not None and random.random() < self.settings.canary_sample:
            self.shadow.offer_to(canary.lane, images, probabilities, seconds)

    def finished(self, canary: Canary, side: str, revision: int, error: bool, computed: bool = True) -> None:
        """A routed request ended (``error``: a server error); a full window is judged. One the response cache
        answered (not ``computed``) is counted as routed, not as evidence."""
        m = self.metrics
        m.child(m.canary_requests, str(canary.pair.primary), str(canary.pair.candidate), side).inc()
        if revision != canary.revision or canary.state != "running" or not computed:
            return
        window = canary.window  # the state's thread may start a new one meanwhile: then the judgement is stale
        window.finished(side, error)
        if side == "candidate" and window.complete():
            self.judge(canary, window, revision)

    def _compared(self, lane: Lane, count: int, agreed: int) -> None:
        for canary in self.canaries.values():
            if canary.lane is lane and canary.state == "running":
                canary.window.compared += count
                canary.window.agreed += agreed

    # -- the analysis -------------------------------------------------------------------------

    def thresholds(self, gate: float | None) -> Thresholds:
        """The settings' thresholds; agreement: ``CANARY_MIN_AGREEMENT``, else the candidate's export gate."""
        s = self.settings
        agreement = s.canary_min_agreement or gate or MIN_TOP1_AGREEMENT
        return Thresholds(agreement, s.canary_max_error_increase, s.canary_max_latency_ratio,
                          s.canary_latency_slack_ms / 1000, s.canary_max_drift)  # fmt: skip

    def judge(self, canary: Canary, window: Window | None = None, revision: int | None = None) -> None:
        """Judge ``window`` (the canary's current one), collected at ``revision`` (the current one): roll back, step
        up, promote (or, without steps, go on at the same fraction). A decision on a window another worker (or the
        operator) has moved past since is dropped."""
        try:
            self._judge(canary, window, revision)
        except CanaryRefused as exc:  # another worker promoted it meanwhile: its window is moot
            logger.info("canary %s: window dropped: %s", canary.key, exc)

    def _judge(self, canary: Canary, window: Window | None, revision: int | None) -> None:
        window = window or canary.window
        expected = canary.revision if revision is None else revision
        passed, failures, figures = window.judge(self.thresholds(canary.gate))
        figures = {"fraction": canary.fraction, **figures}
        m = self.metrics
        labels = (str(canary.pair.primary), str(canary.pair.candidate))
        outcome = "fail" if not passed else "pass" if window.conclusive else "inconclusive"
        m.child(m.canary_windows, *labels, outcome).inc()
        verdict = {"passed": passed, "failures": failures, "figures": figures,
                   "at": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
        history = [*canary.history, verdict][-HISTORY:]
        if not passed:
            reason = "; ".join(failures)
            if self.change(canary, expected, state="rolled_back", fraction=0.0, reason=reason, verdict=verdict,
                           history=history):  # fmt: skip
                logger.warning("canary %s ROLLED BACK at fraction %g: %s; figures %s", canary.key,
                               figures["fraction"], reason, json.dumps(figures))  # fmt: skip
            return
        higher = [s for s in self.steps if s > canary.fraction]
        if not window.conclusive:  # it passed, but without the agreement sample: no step on that
            verdict["inconclusive"] = f"{window.compared} answers compared, fewer than {window.min_compared}"
            self.change(canary, expected, verdict=verdict, history=history)
            logger.warning("canary %s: window inconclusive at %g: %s (the primary was rarely idle enough to compare); "
                           "the fraction stays; figures %s", canary.key, figures["fraction"], verdict["inconclusive"],
                           json.dumps(figures))  # fmt: skip
        elif higher:
            if self.change(canary, expected, fraction=higher[0], step=canary.step + 1, verdict=verdict,
                           history=history, reason=None):  # fmt: skip
                logger.info("canary %s: window passed at %g; stepping up to %g; figures %s", canary.key,
                            figures["fraction"], higher[0], json.dumps(figures))  # fmt: skip
        elif self.steps:
            if self.change(canary, expected, state="promoted", fraction=1.0, verdict=verdict, history=history,
                           reason=f"passed every step ({','.join(map(str, self.steps))})"):  # fmt: skip
                logger.info("canary %s PROMOTED: %s now answers every request for %s; figures %s", canary.key,
                            canary.pair.candidate, canary.pair.primary.name, json.dumps(figures))  # fmt: skip
        else:
            self.change(canary, expected, verdict=verdict, history=history)
            logger.info("canary %s: window passed at %g (no CANARY_STEPS: the fraction stays); figures %s",
                        canary.key, figures["fraction"], json.dumps(figures))  # fmt: skip

    def _switch(self, canary: Canary, back: bool = False) -> bool:
        """Declare the candidate's version of a canary of one model's two versions alone (``back``: the
        primary's), as the lifecycle's switch does (``MODEL_CONTROL=explicit``; elsewhere the routing is the
        promotion); whether it was declared."""
        primary, candidate = canary.pair.primary, canary.pair.candidate
        chosen = primary if back else candidate
        if self.promote is None or primary.name != candidate.name or chosen.version is None:
            return False
        try:
            if self.promote(chosen.name, chosen.version):
                logger.info("canary %s: %s declared at version %d alone; the other versions drain", canary.key,
                            chosen.name, chosen.version)  # fmt: skip
                return True
        except (OSError, ValueError) as exc:
            logger.error("canary %s: %s, but declaring %s failed (%s); the routing serves it meanwhile", canary.key,
                         "undone" if back else "promoted", chosen, exc)  # fmt: skip
        return False

    # -- what the repository API and /models read ----------------------------------------------

    def describe(self, name: str) -> dict[str, Any] | None:
        canary = self.canaries.get(name)
        if canary is None:
            return None
        return {
            "primary": str(canary.pair.primary), "candidate": str(canary.pair.candidate), "state": canary.state,
            "fraction": canary.diverting, "step": canary.step, "steps": list(self.steps), "revision": canary.revision,
            "reason": canary.reason, "fallback": canary.fallback,
            "window": canary.window.figures() if canary.state == "running" else None,
            "verdict": canary.verdict, "history": canary.history,
        }  # fmt: skip

    def all(self) -> list[dict[str, Any]]:
        return [described for name in self.canaries if (described := self.describe(name))]

    def operate(self, primary: str, state: str | None, fraction: float | None) -> dict[str, Any]:
        """The repository API: set a canary's fraction and/or its state (running, paused, ended, promoted,
        rolled_back); ValueError says what would be right."""
        canary = self.canaries.get(primary)
        if canary is None:
            known = ", ".join(self.canaries) or "none (set CANARY)"
            raise LookupError(f"No canary for {primary!r}; canaries: {known}")
        if state is not None and state not in STATES:
            raise ValueError(f"Unknown canary state {state!r}; use one of {', '.join(STATES)}")
        if fraction is not None and not 0 <= fraction <= 1:
            raise ValueError(f"The fraction must be from 0 to 1, got {fraction}")
        with contextlib.suppress(OSError, ValueError):  # what another worker decided since (within SYNC_S) first
            self.sync()
        changes: dict[str, Any] = {}
        if fraction is not None:
            changes["fraction"] = fraction
        if state is not None:
            changes["state"] = state
            changes["reason"] = f"{state.replace('_', ' ')} through the repository API"
            if state == "promoted":
                changes["fraction"] = 1.0
            elif state in ("rolled_back", "ended"):
                changes["fraction"] = 0.0
            elif state == "running" and canary.state in ("rolled_back", "ended") and fraction is None:
                changes["fraction"], changes["step"] = canary.pair.fraction, 0
        try:
            self.change(canary, None, **changes)
        except CanaryRefused as exc:
            raise ValueError(str(exc)) from None
        logger.info("canary %s: %s through the repository API", canary.key, json.dumps(changes))
        described = self.describe(primary)
        assert described is not None
        return described
