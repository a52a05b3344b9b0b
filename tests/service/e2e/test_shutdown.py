"""SIGTERM lets the requests in flight finish, then the server exits 0; a server killed outright takes its
workers with it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
from skimage import data

from service.store.layout import ModelStore

from ...helpers import ServiceProcess, encode, gone, metric_samples, workers

pytestmark = pytest.mark.integration


def test_sigterm_drains_in_flight_requests(model_store: ModelStore, tmp_path: Path) -> None:
    process = ServiceProcess(Path(model_store.root), tmp_path / "shutdown.log", MODELS="resnet18").start()
    photo = encode(data.chelsea(), "JPEG")
    files = [("image", (f"{i}.jpg", photo, "image/jpeg")) for i in range(16)]

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(base_url=process.url, timeout=120) as client:
            requests = [asyncio.create_task(client.post("/classify?model=resnet18", files=files)) for _ in range(6)]
            deadline = asyncio.get_running_loop().time() + 30
            while not any(r.done() for r in requests) and asyncio.get_running_loop().time() < deadline:
                text = (await client.get("/metrics")).text  # all six in flight: 96 ResNet-18 images take seconds
                if sum(v for _, v in metric_samples(text, "cnn_requests_in_flight")) >= 6:
                    break
                await asyncio.sleep(0.05)
            assert process.process is not None
            os.kill(process.process.pid, signal.SIGTERM)
            responses = await asyncio.gather(*requests)
            return [r.status_code for r in responses]

    try:
        assert asyncio.run(scenario()) == [200] * 6
        assert process.process is not None
        started = time.monotonic()
        assert process.process.wait(60) == 0
        assert time.monotonic() - started < 60
    finally:
        process.stop()


def test_workers_stop_when_the_server_is_killed_outright(model_store: ModelStore, tmp_path: Path) -> None:
    """A server SIGKILLed (no handler of its own runs) leaves no worker behind, bound to its port and answering."""
    process = ServiceProcess(Path(model_store.root), tmp_path / "killed.log", MODELS="lenet5", WORKERS="2").start()
    started = workers(process)  # each in a session of its own: the server's group is not theirs
    try:
        assert len(started) == 2
        assert process.process is not None
        os.kill(process.process.pid, signal.SIGKILL)
        process.process.wait(10)
        alive = [worker.pid for worker in started if not gone(worker.pid, 30)]
        assert alive == [], f"workers outlived their server: {alive}\n{process.log()}"
        with pytest.raises(httpx.ConnectError):  # nothing holds the port any more
            httpx.get(f"{process.url}/readyz", timeout=2)
        assert process.log().count("is gone: this worker") == 2, process.log()
    finally:
        for worker in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
