"""Model control: which versions each worker serves, and how that changes without losing a request.

``MODEL_CONTROL`` (after Triton's modes):

* ``none``: one pass at start: every model of ``MODELS`` (or of the store), the versions
  its ``config.pbtxt``'s ``version_policy`` selects.
* ``poll``: the same pass every ``POLL_INTERVAL_S``, so versions that appear in the store
  are loaded and those that leave it are unloaded.
* ``explicit``: the models and versions in the declared state file
  (``MODEL_CONTROL_STATE``), which only the repository API's load and unload change.
* ``on-demand``: ``PINNED`` and ``MODELS`` at start; then any model of the store, loaded by
  the first request that names it and evicted within ``MEMORY_BUDGET``
  (:mod:`~service.runtime.residency`); every ``IDLE_UNLOAD_S``, what nobody used that long.

Every pass loads what is missing beside what serves (a new version takes requests once
warm), then drains what is no longer wanted, and only once a wanted version of that
model serves: a version that fails never replaces one that works. Each worker runs its
own pass on the same inputs (the store, the state file), so all workers, and all
replicas mounting that store, converge on the same versions; a restarted worker comes
back to the declared state, not the start-up one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..settings import Settings
from ..store.atomic import replace_text
from ..store.integrity import IntegrityChecker, Verdict
from ..store.layout import CONFIG_FILE, ModelStore, StoredVersion, is_valid_name
from ..store.policy import read_version_policy
from .entry import ModelEntry
from .readiness import WorkerReadiness
from .repository import Repository

logger = logging.getLogger(__name__)

EXPLICIT_WATCH_S = 0.5  # how often explicit mode looks at the state file: a load waits for every worker


def unknown_in_settings(settings: Settings, store: ModelStore) -> list[str]:
    """What the settings name that the store lacks (a typo, or a model not exported yet), and PINNED where nothing
    reads it: one line each, for the log at start (otherwise each is silent, or only a failed model in /models).
    It raises nothing: what it cannot read, it says, and the server starts as it would without it."""
    lines = []
    try:
        listed = [(name, version or None) for name, version in settings.listed_models().items()]  # 0: the policy's
    except ValueError as exc:  # the workers' passes fail on it too, and say so
        listed = []
        lines.append(f"{exc}: MODELS cannot be read")
    pairs = {"SHADOW": settings.shadow_pairs(), "CANARY": settings.canary_pairs()}
    named: dict[str, list[tuple[str, int | None]]] = {
        "MODELS": listed,
        "DEFAULT_MODEL": [(settings.default_model, None)] if settings.default_model else [],
        "PINNED": [(name, None) for name in settings.pinned_models()],
        "INSTANCES": [(name, None) for name in settings.instance_counts() if name],  # "": a bare N
        **{key: [(side.name, side.version) for pair in found for side in (pair.primary, pair.candidate)]
           for key, found in pairs.items()},
    }  # fmt: skip
    held: dict[str, set[int]] = {}
    try:
        for name in {name for models in named.values() for name, _ in models}:  # the models named, not the store
            held[name] = {stored.version for stored in store.versions(name)} if is_valid_name(name) else set()
        missing = {
            setting: sorted({name if not held[name] else f"{name}{':' if setting == 'MODELS' else '@'}{version}"
                             for name, version in models
                             if not held[name] or (version is not None and version not in held[name])})
            for setting, models in named.items()
        }  # fmt: skip
        holds = (", ".join(store.names()) or "nothing") if any(missing.values()) else ""
    except (OSError, ValueError) as exc:
        return [*lines, f"the model store {store.root} cannot be read to check the settings' models: {exc}"]
    lines += [
        f"{setting} names {', '.join(names)}, which the model store {store.root} does not hold (it holds {holds}): "
        "correct the setting, or export the model (`make export`)"
        for setting, names in missing.items()
        if names
    ]
    if settings.pinned_models() and settings.model_control != "on-demand":
        lines.append(f"PINNED applies with MODEL_CONTROL=on-demand only (here {settings.model_control}): ignored")
    served = {name for name, _ in listed} | {name for key in pairs for name, _ in named[key]}  # requested_models()
    default = settings.default_model
    if default and listed and settings.model_control in ("none", "poll") and default not in served:
        lines.append(f"DEFAULT_MODEL {default} is not among the models MODELS serves ({', '.join(sorted(served))}): "
                     "a request that names no model gets 404; add it to MODELS")  # fmt: skip
    return lines


class DeclaredState:
    """Explicit mode's declared models, ``{"generation": N, "models": {name: [versions]}}``, in one JSON file.

    Writers take an exclusive ``flock`` on ``<file>.lock`` for the read-modify-write and
    replace the file atomically; readers never lock. ``generation`` grows with each
    change, so a caller can wait until every worker has applied its own.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ValueError(f"the declared state {self.path} is unreadable: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise ValueError(f"the declared state {self.path} holds no models object")
        return data

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write(self, data: dict[str, Any]) -> None:
        replace_text(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def initialize(self, models: dict[str, list[int]]) -> dict[str, Any]:
        """The declared state; the start-up models become it where there is none yet."""
        with self._locked():
            data = self.read()
            if data is None:
                data = {"generation": 1, "models": models}
                self._write(data)
                logger.info("declared state %s created from the start-up models", self.path)
            return data

    def declare(self, name: str, versions: list[int] | None) -> int:
        """Declare ``name`` served at ``versions`` (None: unloaded); returns the new generation."""
        with self._locked():
            data = self.read() or {"generation": 0, "models": {}}
            if versions is None:
                data["models"].pop(name, None)
            else:
                data["models"][name] = versions
            data["generation"] = int(data.get("generation", 0)) + 1
            self._write(data)
            return int(data["generation"])


@dataclass
class Plan:
    """What one pass wants: versions per model, and why the models it cannot serve are out; ``unreadable``: those
    whose ``config.pbtxt`` cannot be read, which keep serving what they serve (an edit's typo takes nothing down)."""

    versions: dict[str, list[StoredVersion]]
    problems: dict[str, str]
    unreadable: set[str] = field(default_factory=set)


class _ConfigUnreadable(ValueError):
    """A model's ``config.pbtxt`` says something this service (and Triton) cannot act on."""


def management_warning(settings: Settings) -> str | None:
    """Who may load and unload models under MODEL_CONTROL=explicit without an ADMIN_TOKEN, where that is more than
    the operator (the repository API then falls under API_TOKEN, or under nothing)."""
    if settings.model_control != "explicit" or settings.admin_token:
        return None
    who = "every client holding API_TOKEN" if settings.api_token else "anyone who reaches the port"
    return f"MODEL_CONTROL=explicit with no ADMIN_TOKEN: {who} can load and unload models"


class ModelControl:
    def __init__(self, repository: Repository, readiness: WorkerReadiness | None = None) -> None:
        self.repository = repository
        self.settings = repository.settings
        self.store = repository.store
        self.readiness = readiness
        self.mode = self.settings.model_control
        # poll: a version whose files do not match stays "incomplete" (a copy in progress) for one interval
        self.integrity = IntegrityChecker(settle=self.settings.poll_interval_s if self.mode == "poll" else 0.0)
        self.declared = DeclaredState(self.settings.control_state_path) if self.mode == "explicit" else None
        self._initial: dict[str, list[int]] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._incomplete: set[tuple[str, int]] = set()
        self._warned_empty = False

    def start(self) -> None:
        """Load in the background, then follow ``MODEL_CONTROL`` (on demand the residency loads instead)."""
        if self.mode == "on-demand":
            return
        if (warning := management_warning(self.settings)) is not None:
            logger.warning("%s", warning)
        threading.Thread(target=self._run, name="model-control", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        """Run the next pass now (a repository call changed the declared state)."""
        self._wake.set()

    def _run(self) -> None:
        self._pass()
        self.repository.mark_loaded()
        if self.mode == "none":
            return
        interval = self.settings.poll_interval_s if self.mode == "poll" else EXPLICIT_WATCH_S
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if not self._stop.is_set():
                self._pass()

    def _pass(self) -> None:
        try:
            self.reconcile()
        except Exception:  # the next pass tries again; serving goes on with what is loaded
            logger.exception("model control: the pass failed")

    # -- what is wanted ------------------------------------------------------------------

    def targets(self) -> tuple[dict[str, list[int] | None], int]:
        """Models to serve with their pinned versions (None: the policy chooses), and the declared generation."""
        requested = self.settings.requested_models()
        start_up: dict[str, list[int] | None] = (
            {name: [v] if v else None for name, v in requested.items()}
            if requested
            else dict.fromkeys(self.store.names())
        )
        if self.declared is None:
            return start_up, 0
        try:
            data = self.declared.read() or self.declared.initialize(self.resolve_all(start_up))
        except (OSError, ValueError) as exc:  # keep serving; the repository API reports the same error
            if self._initial is None:
                logger.error("model control: %s; serving the start-up models", exc)
                self._initial = self.resolve_all(start_up)
            return {name: list(versions) for name, versions in self._initial.items()}, 0
        return {name: list(versions) for name, versions in data["models"].items()}, int(data.get("generation", 0))

    def resolve_all(self, targets: dict[str, list[int] | None]) -> dict[str, list[int]]:
        plan = self.plan(targets)
        return {name: [s.version for s in versions] for name, versions in plan.versions.items()}

    def resolve(self, name: str) -> list[int]:
        """The versions a load of ``name`` serves now (its policy over its complete versions); ValueError why none."""
        plan = self.plan({name: None})
        if name in plan.problems:
            raise ValueError(plan.problems[name])
        versions = [s.version for s in plan.versions[name]]
        if not versions:
            failed = [e for e in self.repository.versions.get(name, {}).values() if e.status == "failed"]
            reasons = "; ".join(f"version {e.version}: {e.reason}" for e in failed) or "no complete version"
            raise ValueError(f"no version of {name!r} can be loaded: {reasons}")
        return versions

    def plan(self, targets: dict[str, list[int] | None]) -> Plan:
        plan = Plan({}, {})
        for name, pinned in targets.items():
            try:
                plan.versions[name] = self._versions(name, pinned)
            except ValueError as exc:
                plan.problems[name] = str(exc)
                if isinstance(exc, _ConfigUnreadable):
                    plan.unreadable.add(name)
        return plan

    def _versions(self, name: str, pinned: list[int] | None) -> list[StoredVersion]:
        if not is_valid_name(name):
            raise ValueError(f"invalid model name {name!r}")
        stored = {s.version: s for s in self.store.versions(name)}
        missing = [v for v in pinned or [] if v not in stored]
        if not stored or missing:
            what = f"version {', '.join(map(str, missing))} of {name!r}" if missing else repr(name)
            raise ValueError(f"{what} is not in the model store {self.store.root} (run `make export`)")
        try:
            policy = read_version_policy(self.store.model_dir(name) / CONFIG_FILE)
        except ValueError as exc:
            raise _ConfigUnreadable(f"{CONFIG_FILE}: {exc}") from None
        loadable = [v for v in (pinned or sorted(stored)) if self._loadable(stored[v])]
        chosen = loadable if pinned else policy.select(loadable)
        return [stored[v] for v in chosen]

    def _loadable(self, stored: StoredVersion) -> bool:
        """Complete, and not a version that already failed from these very files. A version that serves stays
        wanted whatever happens to its files: it runs what was verified at its load, and reports their problem."""
        verdict = self.integrity.check(stored)
        key = (stored.name, stored.version)
        serving = self.repository.versions.get(stored.name, {}).get(stored.version)
        if serving is not None and serving.status == "ready":
            self.repository.report_files(serving, None if verdict.state == "complete" else verdict.reason)
            return True
        if verdict.state == "incomplete":
            if key not in self._incomplete:
                logger.info("%s v%d: not loaded yet: %s", stored.name, stored.version, verdict.reason)
                self._incomplete.add(key)
            return False
        self._incomplete.discard(key)
        failed = self.repository.failed(stored.name, stored.version)
        if failed is not None and failed.signature == verdict.signature:
            return False
        if verdict.state == "corrupt":
            self._record_corrupt(stored, verdict)
            return False
        return True

    def _record_corrupt(self, stored: StoredVersion, verdict: Verdict) -> None:
        entry = ModelEntry(stored.name, stored.version, signature=verdict.signature)
        self.repository.fail(entry, verdict.reason)

    # -- making it so --------------------------------------------------------------------

    def reconcile(self) -> None:
        targets, generation = self.targets()
        if not targets and not self._warned_empty:
            self._warned_empty = True
            logger.error(
                "The model store %s holds no model: run `make export` (or `python -m export lenet5 --out %s`)",
                self.store.root.resolve(), self.store.root,
            )  # fmt: skip
        plan = self.plan(targets)
        repository = self.repository
        serving = {name for name, entries in list(repository.versions.items())
                   if any(e.status in ("ready", "draining") for e in list(entries.values()))}  # fmt: skip
        repository.set_problems({
            name: f"{why} (the versions serving go on)" if name in plan.unreadable and name in serving else why
            for name, why in plan.problems.items()
        })  # fmt: skip
        for name, versions in plan.versions.items():
            for stored in versions:
                current = repository.versions.get(name, {}).get(stored.version)
                if current is None or current.status == "failed":
                    repository.load(stored, self.integrity.signature(stored))
        for name in list(repository.versions):
            wanted = name in plan.versions or name in plan.unreadable
            self._retire(name, {s.version for s in plan.versions.get(name, [])}, wanted)
        repository.applied(generation)

    def _retire(self, name: str, wanted: set[int], model_wanted: bool) -> None:
        """Drain the versions of ``name`` no longer wanted, once a wanted one serves (or the model is gone)."""
        entries = list(self.repository.versions.get(name, {}).values())
        replacement = any(e.status == "ready" and e.version in wanted for e in entries)
        for entry in entries:
            if entry.version in wanted:
                continue
            if entry.status == "failed":
                stored = StoredVersion(name, entry.version, self.store.model_dir(name) / str(entry.version))
                gone = not stored.directory.is_dir() or self.integrity.signature(stored) != entry.signature
                if not model_wanted or gone:
                    self.repository.forget(entry)
            elif entry.status == "ready" and (replacement or not model_wanted):
                self.repository.unload(entry)

    def promote(self, name: str, version: int) -> bool:
        """Serve ``name`` at ``version`` alone from now on (a canary of one model's versions promoted): declared, so
        every worker switches as a repository load does, the other versions drained once it serves (it already
        does), and a restart comes back to it. Only ``MODEL_CONTROL=explicit`` declares what is served: elsewhere
        the version policy does, and this returns False."""
        if self.declared is None:
            return False
        generation = self.declared.declare(name, [version])
        self.wake()
        logger.info("model control: %s declared at version %d alone (generation %d)", name, version, generation)
        return True

    # -- what the repository API reads -----------------------------------------------------

    def catalogue(self) -> list[str]:
        """The models of the store, loaded or not."""
        return self.store.names()

    def in_store(self, name: str) -> bool:
        return bool(self.store.versions(name))

    def entries(self, name: str) -> list[ModelEntry]:
        """The versions of ``name`` this worker holds, in any state, lowest first."""
        return sorted(list(self.repository.versions.get(name, {}).values()), key=lambda e: e.version)

    # -- what repository calls wait for --------------------------------------------------

    def worker_states(self) -> list[dict[str, Any]]:
        if self.readiness is None:
            return [self.repository.state()]
        return list(self.readiness.states().values())

    def converged(self, generation: int, name: str, versions: list[int] | None) -> tuple[bool, str | None]:
        """(every worker applied ``generation`` and serves ``name`` at ``versions`` (None: not at all), failure)."""
        states = self.worker_states()
        if len(states) < self.settings.workers:
            return False, None
        for state in states:
            if int(state.get("generation", 0)) < generation:
                return False, None
            served = state.get("models", {}).get(name, {})
            if versions is None:
                if any(s.get("status") != "failed" for s in served.values()):
                    return False, None
                continue
            for version in versions:
                status = served.get(str(version), {})
                if status.get("status") == "failed":
                    return False, f"version {version} failed to load: {status.get('reason')}"
                if status.get("status") != "ready":
                    return False, None
        return True, None

    def wait(self, generation: int, name: str, versions: list[int] | None, timeout: float) -> str | None:
        """Block until :meth:`converged`; the failure, or a timeout message, else None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, failure = self.converged(generation, name, versions)
            if failure or done:
                return failure
            time.sleep(0.05)
        return f"not every worker has applied the change after {timeout:.0f} s; GET /models shows where it stands"
