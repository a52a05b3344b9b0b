"""Requests for lenet5 at a fixed concurrency over /classify, OIP REST and gRPC, each answer recorded with who gave
it and when it was sent: the canary tests' witness, and ``benchmarks.canary``'s load."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from export.pipeline import ExportOptions, export_model
from export.precision import VariantOptions, export_variant
from service.store.layout import ModelStore

from ..helpers import ServiceProcess

CONCURRENCY = 8


def candidates(lenet5: Path, root: Path) -> Path:
    """A store at ``root``: the trained LeNet-5 at ``lenet5`` (its model folder), its INT8 variant (a faithful
    candidate) and a LeNet-5 with random weights as lenet5_rand (a bad one)."""
    shutil.copytree(lenet5, root / "lenet5")
    store = ModelStore(root)
    export_variant("lenet5", store, VariantOptions("int8", recipe="u8s8"))
    export_model("lenet5", store, ExportOptions(weights="random", as_name="lenet5_rand", progress=False))
    return root


async def one(
    client: httpx.AsyncClient, channel: grpc.aio.Channel, i: int, image: bytes
) -> tuple[str, str, str | None]:
    """Request ``i`` for lenet5, over gRPC (every tenth from the 5th), OIP REST (every tenth from the 9th) or
    /classify: (the model that answered, its version, the canary the answer says gave it: ``canary`` in the
    /classify body, the ``canary`` parameter of an Open Inference Protocol response; None where it names none)."""
    if i % 10 == 5:
        request = pb.ModelInferRequest(model_name="lenet5")
        request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(len(image).to_bytes(4, "little") + image)
        response = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
        marker = response.parameters["canary"].string_param if "canary" in response.parameters else None
        return response.model_name, response.model_version, marker
    if i % 10 == 9:
        header = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": len(image) + 4}}]}).encode()  # fmt: skip
        reply = await client.post("/v2/models/lenet5/infer", content=header + len(image).to_bytes(4, "little") + image,
                                  headers={"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
        assert reply.status_code == 200, reply.text
        size = int(reply.headers.get("Inference-Header-Content-Length", len(reply.content)))
        body = json.loads(reply.content[:size])
        return body["model_name"], body["model_version"], (body.get("parameters") or {}).get("canary")
    reply = await client.post("/classify", params={"model": "lenet5"}, content=image,
                              headers={"Content-Type": "image/png"})  # fmt: skip
    assert reply.status_code == 200, reply.text
    body = reply.json()
    return body["model"], body["version"], body.get("canary")


async def load(
    service: ServiceProcess, images: list[bytes], count: int, watch: bool = False, concurrency: int = CONCURRENCY
) -> list[dict[str, Any]]:
    """``count`` requests at CONCURRENCY; each answer with when it was sent. ``watch``: also when /models first
    said the canary was rolled back (a record with ``rolled_back_at``)."""
    answers: list[dict[str, Any]] = []
    rolled_back_at: list[float] = []
    queue = iter(range(count))
    async with (
        httpx.AsyncClient(base_url=service.url, timeout=60) as client,
        grpc.aio.insecure_channel(service.grpc_target) as channel,
    ):

        async def worker() -> None:
            for i in queue:
                sent = time.monotonic()
                model, version, canary = await one(client, channel, i, images[i % len(images)])
                answers.append({"i": i, "sent": sent, "model": model, "version": version, "canary": canary})

        async def watcher() -> None:
            while not rolled_back_at:
                models = (await client.get("/models")).json()["models"]
                if next(m for m in models if m["name"] == "lenet5")["canary"]["state"] == "rolled_back":
                    rolled_back_at.append(time.monotonic())
                await asyncio.sleep(0.05)

        watching = asyncio.get_running_loop().create_task(watcher()) if watch else None
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        if watching is not None:
            await asyncio.wait_for(watching, 10)
    return answers + [{"rolled_back_at": at} for at in rolled_back_at]


def canary_of(service: ServiceProcess) -> dict[str, Any]:
    models = httpx.get(f"{service.url}/models", timeout=10).json()["models"]
    return next(m for m in models if m["name"] == "lenet5")["canary"]
