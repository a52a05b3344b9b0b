"""What the in-process runtime tests share: sizes and the fixtures' types (the fixtures are in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

from service.server import Runtime
from service.store.layout import ModelStore

MiB = 2**20
StoreFactory = Callable[..., ModelStore]
RuntimeFactory = Callable[..., Runtime]
