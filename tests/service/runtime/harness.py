"""What the in-process runtime tests share: sizes and the fixtures' types (the fixtures are in ../conftest.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from service.frontends.v2.handler import OipHandler
from service.runtime.classifier import Classifier
from service.runtime.repository import Repository
from service.server import Runtime
from service.store.layout import ModelStore

MiB = 2**20
StoreFactory = Callable[..., ModelStore]
RuntimeFactory = Callable[..., Runtime]


class Served(NamedTuple):
    """The ``served_lenet5`` fixture: a runtime with LeNet-5 ready, the request path and the protocol handler."""

    repository: Repository
    classifier: Classifier
    oip: OipHandler


async def signalled(event: threading.Event, seconds: float = 30.0) -> None:
    """Yield to the event loop until a thread sets ``event``, at most ``seconds``: a test that never gets there fails
    instead of hanging."""
    deadline = time.monotonic() + seconds
    while not event.is_set():
        assert time.monotonic() < deadline, f"not signalled within {seconds:g} s"
        await asyncio.sleep(0.01)
