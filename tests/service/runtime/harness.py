"""What the in-process runtime tests share: sizes and the fixtures' types (the fixtures are in ../conftest.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NamedTuple

from service.frontends.v2.handler import OipHandler
from service.runtime.classifier import Classifier
from service.runtime.repository import Repository
from service.server import Runtime
from service.store.layout import ModelStore

from ...helpers import wait_until_async

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
    await wait_until_async(event.is_set, seconds, "signalled")
