"""One version of a model in a worker: its state, what serves it, and the requests that hold it.

The row of :class:`~service.runtime.repository.Repository`'s table; what the lifecycle, the
residency, the request path and the front ends pass around.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from ..store.integrity import Signature
from ..store.quality import Drift
from .batching import DynamicBatcher
from .session import LoadedModel

Status = Literal["loading", "ready", "draining", "failed"]


@dataclass(eq=False)
class ModelEntry:
    """One version of a model in this worker."""

    name: str
    version: int
    status: Status = "loading"
    reason: str | None = None
    model: LoadedModel | None = None
    batcher: DynamicBatcher | None = None
    signature: Signature = ()  # the files it was loaded (or failed) from
    drift: Drift | None = None  # its answers against their baseline
    in_flight: int = 0  # requests holding a lease
    resident_bytes: int = 0  # what its load and warm-up added to the worker's resident memory
    since: float = field(default_factory=time.time)
    files_problem: str | None = None  # a served version whose files changed on disk since its load, and how

    def state(self) -> dict[str, Any]:
        """What the worker publishes about this version (``/metrics``, repository calls)."""
        state: dict[str, Any] = {"status": self.status, "reason": self.reason, "since": self.since}
        if self.status == "ready":
            state["files_problem"] = self.files_problem
        if self.model is not None:
            state |= {
                "provider": self.model.provider,
                "load_seconds": self.model.load_seconds,
                "warmup_seconds": self.model.warmup_seconds,
            }
        return state
