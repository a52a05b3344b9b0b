"""The points where what watches the runtime attaches, so that the runtime does not know who watches.

The repository and the classifier call these at fixed moments: a version ready or released,
a load or unload done, a batch run, a device out of memory, a request answered. The metrics,
the answers' drift and the batch spans (:mod:`service.observers`) and the shadow subscribe
in the composition root (:mod:`service.server`), as MLServer's registry lets batching and
metrics attach to a model's load and unload without the registry importing them. A
subscriber runs where the hook is called: ``ready``, ``released`` and ``changed`` on the
thread that loads or unloads (the lifecycle's, the residency's); ``batch``, ``out_of_memory``
and ``answered`` on the worker's event loop, so they must be quick. A subscriber that raises
in ``ready`` fails the version's load; in any other hook it is logged and the others still run:
what watches a request never fails it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, ParamSpec

if TYPE_CHECKING:
    import numpy as np

    from .batching import BatchStats
    from .entry import ModelEntry

logger = logging.getLogger(__name__)

P = ParamSpec("P")


class Hook(Generic[P]):
    """A list of subscribers, called in the order they subscribed; one that raises is logged, and the others still
    run, unless the hook is ``vetoable`` (its caller then fails with the error)."""

    def __init__(self, vetoable: bool = False) -> None:
        self.subscribers: list[Callable[P, None]] = []  # read where calling none is worth skipping work for
        self.vetoable = vetoable

    def subscribe(self, subscriber: Callable[P, None]) -> Callable[P, None]:
        self.subscribers.append(subscriber)
        return subscriber

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> None:
        for subscriber in self.subscribers:
            if self.vetoable:
                subscriber(*args, **kwargs)
                continue
            try:
                subscriber(*args, **kwargs)
            except Exception:
                logger.exception("%s failed; what it watched goes on", getattr(subscriber, "__qualname__", subscriber))


@dataclass(frozen=True)
class Hooks:
    # a version loaded and warmed up, about to take requests (seconds its load and warm-up took)
    ready: Hook[[ModelEntry, float]] = field(default_factory=lambda: Hook(vetoable=True))
    # a version released: its sessions are gone
    released: Hook[[ModelEntry]] = field(default_factory=Hook)
    # a load or an unload ended: (entry, "load" | "unload", "success" | "failure", seconds or None)
    changed: Hook[[ModelEntry, str, str, float | None]] = field(default_factory=Hook)
    # a version's batch ran (on the event loop, once its results are handed out)
    batch: Hook[[ModelEntry, BatchStats]] = field(default_factory=Hook)
    # the device had no memory for a batch: (entry, the batch's size, the new largest batch)
    out_of_memory: Hook[[ModelEntry, int, int]] = field(default_factory=Hook)
    # a request's images answered (on the event loop): (entry, images, probabilities, seconds of inference)
    answered: Hook[[ModelEntry, np.ndarray, np.ndarray, float]] = field(default_factory=Hook)
