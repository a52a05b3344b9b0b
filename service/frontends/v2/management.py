"""The Open Inference Protocol's repository extension, as Triton serves it: index, load, unload.

Transport-neutral, like :mod:`.handler`: ``/v2/repository/...`` and gRPC's ``Repository*``
calls decode their wire format and call :class:`RepositoryManager`.

A load names a model *in the store* and nothing else: Triton's ``config`` and ``file:``
parameters (a configuration or a graph sent with the request) are refused, and the name
must be a plain store name, so no request ever picks what is read from disk (TorchServe's
CVE-2023-43654 came from loading what a request pointed at). Load and unload change the
declared state (:class:`~service.runtime.lifecycle.DeclaredState`) and return once every
worker has applied it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from ...errors import CanaryNotFound, InvalidInput, ModelLoadFailed, ModelNotFound, ModelNotReady, RepositoryError
from ...runtime.canary import Canaries
from ...runtime.lifecycle import ModelControl
from ...runtime.shadow import Shadow
from ...store.layout import is_valid_name

logger = logging.getLogger(__name__)

# Triton's index states
READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"
STATES = {"ready": READY, "loading": LOADING, "draining": UNAVAILABLE, "failed": UNAVAILABLE}
UNLOAD_PARAMETERS = {"unload_dependents"}  # tritonclient sends it; a CNN has no dependents


class RepositoryManager:
    def __init__(self, control: ModelControl, shadow: Shadow | None = None, canaries: Canaries | None = None) -> None:
        self.control = control
        self.settings = control.settings
        self.shadow = shadow
        self.canaries = canaries

    # -- canaries (any MODEL_CONTROL) ----------------------------------------------------------

    def canary_list(self) -> list[dict[str, Any]]:
        """Every ``CANARY`` as this worker sees it."""
        return self.canaries.all() if self.canaries is not None else []

    async def canary_change(self, primary: str, body: dict[str, Any]) -> dict[str, Any]:
        """Change a canary's ``fraction`` and/or ``state``; every worker follows within a second."""
        if self.canaries is None:
            raise CanaryNotFound(f"No canary for {primary!r}: the service runs with no CANARY")
        unknown = sorted(set(body) - {"fraction", "state"})
        fraction, state = body.get("fraction"), body.get("state")
        if unknown or (fraction is None and state is None):
            extra = f"; unknown fields {unknown}" if unknown else ""
            raise InvalidInput(
                'Send {"fraction": 0..1} and/or {"state": "running" | "paused" | "ended" | "promoted" | "rolled_back"}'
                + extra
            )
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, int | float)):
            raise InvalidInput(f'"fraction" must be a number from 0 to 1, got {fraction!r}')
        if state is not None and not isinstance(state, str):
            raise InvalidInput(f'"state" must be a string, got {state!r}')
        try:
            return await asyncio.to_thread(self.canaries.operate, primary, state, fraction)
        except LookupError as exc:
            raise CanaryNotFound(str(exc.args[0])) from None
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None

    def require_explicit(self) -> None:
        if self.settings.model_control != "explicit":
            raise RepositoryError(
                f"The repository API is off: MODEL_CONTROL is {self.settings.model_control!r}. "
                "Start the service with MODEL_CONTROL=explicit to load and unload models through it"
                + (" (poll mode follows the store by itself)" if self.settings.model_control == "poll" else "")
            )

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Every model in the store with each version this worker holds (Triton's ``ModelIndex``)."""
        self.require_explicit()
        rows = []
        for name in self.control.catalogue():
            entries = self.control.entries(name)
            if not entries and not ready_only:
                rows.append({"name": name, "version": "", "state": UNAVAILABLE, "reason": "unloaded"})
            for entry in entries:
                state = STATES[entry.status]
                if not ready_only or state == READY:
                    reason = entry.reason or ("draining" if entry.status == "draining" else "")
                    rows.append({"name": name, "version": str(entry.version), "state": state, "reason": reason})
        return rows

    def _checked_name(self, name: str) -> str:
        if not is_valid_name(name):
            raise InvalidInput(
                f"Invalid model name {name!r}: a load names a model in the store (lower-case letters, digits, "
                "'_', '-', '.'), never a path"
            )
        if not self.control.in_store(name):
            raise ModelNotFound(name, self.control.catalogue())
        return name

    async def load(self, name: str, parameters: dict[str, Any]) -> None:
        """Serve ``name`` at the versions its policy selects now; returns once every worker serves them."""
        self.require_explicit()
        if parameters:  # Triton's "config" and "file:<path>" among them
            raise InvalidInput(
                f"Load parameters {sorted(parameters)} refused: this service loads only what the model store holds "
                "under the model's name, never a configuration or files sent with the request"
            )
        name = self._checked_name(name)
        try:
            versions = await asyncio.to_thread(self.control.resolve, name)
        except ValueError as exc:
            raise ModelLoadFailed(f"Failed to load {name!r}: {exc}") from None
        declared = self.control.declared
        assert declared is not None
        before = ((await asyncio.to_thread(declared.read)) or {}).get("models", {}).get(name)
        try:
            await self._change(name, versions)
        except ModelLoadFailed:  # what a restart would come back to: what served before
            await self._change(name, before, wait=False)
            raise
        self._log_shadow("load", name)

    async def unload(self, name: str, parameters: dict[str, Any]) -> None:
        """Stop serving ``name``; returns once every worker has drained and released it."""
        self.require_explicit()
        unknown = sorted(set(parameters) - UNLOAD_PARAMETERS)
        if unknown:
            raise InvalidInput(f"Unknown unload parameters {unknown}; accepted: {sorted(UNLOAD_PARAMETERS)}")
        await self._change(self._checked_name(name), None)
        self._log_shadow("unload", name)

    def _log_shadow(self, action: str, name: str) -> None:
        """A promotion's evidence in the log: the live figures of every SHADOW pair of ``name``, as this worker
        measured them, next to the change they justified."""
        for figures in self.shadow.involving(name) if self.shadow is not None else []:
            logger.info("repository API: %s of %r; shadow %s -> %s: %s; figures %s", action, name,
                        figures["primary"], figures["candidate"], figures["verdict"], json.dumps(figures))  # fmt: skip

    async def _change(self, name: str, versions: list[int] | None, wait: bool = True) -> None:
        assert self.control.declared is not None
        try:
            generation = await asyncio.to_thread(self.control.declared.declare, name, versions)
        except (OSError, ValueError) as exc:
            raise RepositoryError(
                f"Cannot record the change in {self.control.declared.path}: {exc}; point MODEL_CONTROL_STATE at a "
                "writable file every worker and replica shares"
            ) from None
        self.control.wake()
        if not wait:
            return
        timeout = self.settings.request_timeout_s
        failure = await asyncio.to_thread(self.control.wait, generation, name, versions, timeout)
        if failure is None:
            return
        if "failed to load" in failure:
            raise ModelLoadFailed(f"Failed to load {name!r}: {failure}")
        raise ModelNotReady(f"{'Load' if versions else 'Unload'} of {name!r}: {failure}")
