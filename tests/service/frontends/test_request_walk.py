"""One ``/classify`` request, followed call by call through the service's modules, in-process: it is handed to the
repository once, and comes back to a module it has left at most three times.

The walk follows the calls from one module of the data path (``service.frontends``, ``service.runtime``,
``service.store``, the observers) into another, or into one from outside them (the server, asyncio): each such
call hands the request to a module, a *stay*; a *return* is a stay in a module the request was handed to before
(a callback, or a module asked twice). A call within a module, and a coroutine resumed after an ``await``, hand
the request nowhere. The shared utilities every layer uses (``service.metrics``, ``service.tracing``,
``service.errors``, ``service.settings``) are not rooms of the walk. Measured on the event loop's thread, which
runs the request (and, for a batch of one request, its batch).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import httpx
import numpy as np
import pytest

from service.frontends.app import create_app
from service.frontends.fastpath import FastPathMiddleware
from service.frontends.observe import RequestObserver
from service.server import Server
from service.settings import Settings
from service.store.layout import ModelStore

from ...helpers import encode

ROOMS = ("service.frontends.", "service.runtime.", "service.store.", "service.observers")


def walk(send: Any) -> list[tuple[str, str]]:
    """The modules of the data path that ``send()`` calls into, in order, consecutive calls into one merged:
    (module, the function it was entered by)."""
    seen: dict[int, FrameType] = {}  # held for the walk: a resumed coroutine keeps its frame
    stays: list[tuple[str, str]] = []

    def profile(frame: FrameType, event: str, _: Any) -> None:
        if event != "call" or id(frame) in seen:
            return
        seen[id(frame)] = frame
        module = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back is not None else ""
        if module.startswith(ROOMS) and caller != module and (not stays or stays[-1][0] != module):
            stays.append((module, frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        asyncio.get_event_loop().run_until_complete(send())
    finally:
        sys.setprofile(None)
    return stays


def returns(modules: list[str]) -> int:
    return len(modules) - len(set(modules))


@pytest.fixture(params=["none", "on-demand"])
def served(model_store: ModelStore, request: pytest.FixtureRequest) -> Iterator[Any]:
    """The service's app with its middlewares and its runtime (LeNet-5 loaded; no gRPC), on this thread's loop;
    with every model resident, and on demand (where the residency stands between a request and its lease)."""
    settings = Settings(model_store=model_store.root, models="lenet5", workers=1, warmup_batches=(1,),
                        model_control=request.param, memory_budget="2GiB")  # fmt: skip
    api = create_app()
    server = Server(settings, api)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server.runtime.start()
    try:
        deadline = loop.time() + 60
        while not server.ready and loop.time() < deadline:
            loop.run_until_complete(asyncio.sleep(0.05))
        assert server.ready
        yield RequestObserver(FastPathMiddleware(api, api=api), api=api)
    finally:
        loop.run_until_complete(server.stop())
        loop.close()
        asyncio.set_event_loop(None)


def test_a_classify_request_passes_through_the_repository_once(served: Any) -> None:
    app = served
    image = encode(np.full((32, 32), 200, np.uint8))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://walk")

    async def send() -> None:
        response = await client.post("/classify?model=lenet5", content=image, headers={"Content-Type": "image/png"})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "lenet5"

    asyncio.get_event_loop().run_until_complete(send())  # the first request's one-time imports and caches
    stays = walk(send)
    modules = [module for module, _ in stays]
    print(f"\n{len(stays)} stays in {len(set(modules))} modules, {returns(modules)} returns:")
    print("\n".join(f"  {module} ({function})" for module, function in stays))
    assert "service.runtime.repository" in modules and "service.runtime.batching" in modules  # it saw the path
    assert modules.count("service.runtime.repository") == 1
    assert returns(modules) <= 3
