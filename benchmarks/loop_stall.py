"""What a large typed-tensor request costs the other requests of its worker.

    python -m benchmarks.loop_stall [--store DIR] [--images 16] [--seconds 10] [--senders 2] [--out DIR]

One worker serves LeNet-5. A probe sends one 32 x 32 PNG to ``POST /classify`` after another and records each
round trip: first with nothing else running, then while ``--senders`` threads send ``--images`` 224-px UINT8
images as typed values, over HTTP as a JSON ``data`` list (``/v2/models/lenet5/infer``, about 3.7 bytes a
value) and over gRPC as ``uint_contents``. Their shape is not LeNet-5's, so each is read whole and then refused
with 400 / INVALID_ARGUMENT: what they cost is the reading alone, no inference. Prints the probe's p50, p99 and
largest round trip per phase with the CPU and its flags, and writes ``loop_stall.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

from export.pipeline import ExportOptions, export_model
from service.frontends.v2.protocol import grpc_predict_v2_pb2 as pb
from service.frontends.v2.protocol import grpc_predict_v2_pb2_grpc as pb_grpc
from service.store.layout import ModelStore
from tests.helpers import ServiceProcess, encode, running

from .host import machine, record

MODEL = "lenet5"


def json_body(images: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (images, 224, 224, 3), dtype=np.uint8)
    tensor = {"name": "images", "datatype": "UINT8", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def grpc_request(images: int) -> pb.ModelInferRequest:
    pixels = np.random.default_rng(0).integers(0, 256, (images, 224, 224, 3), dtype=np.uint8)
    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=list(pixels.shape))
    tensor.contents.uint_contents.extend(pixels.ravel().tolist())
    return request


def http_sender(service: ServiceProcess, body: bytes) -> Callable[[threading.Event], int]:
    def send(stop: threading.Event) -> int:
        sent = 0
        with httpx.Client(base_url=service.url, timeout=120) as client:
            while not stop.is_set():
                answer = client.post(f"/v2/models/{MODEL}/infer", content=body,
                                     headers={"content-type": "application/json"})  # fmt: skip
                if answer.status_code != 400:
                    raise AssertionError(f"expected 400 for a shape LeNet-5 does not take: {answer.text[:300]}")
                sent += 1
        return sent

    return send


def grpc_sender(service: ServiceProcess, request: pb.ModelInferRequest) -> Callable[[threading.Event], int]:
    def send(stop: threading.Event) -> int:
        sent = 0
        options = [("grpc.max_send_message_length", 64 << 20)]
        with grpc.insecure_channel(service.grpc_target, options=options) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.ModelInfer(request, timeout=120)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        raise
                sent += 1
        return sent

    return send


def probe(service: ServiceProcess, seconds: float) -> list[float]:
    digit = encode(np.full((32, 32), 255, dtype=np.uint8))
    rounds = []
    with httpx.Client(base_url=service.url, timeout=60) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            answer = client.post("/classify", params={"model": MODEL}, content=digit,
                                 headers={"content-type": "image/png"})  # fmt: skip
            rounds.append(time.perf_counter() - started)
            answer.raise_for_status()
    return rounds


def phase(service: ServiceProcess, seconds: float, senders: int, send: Callable[[threading.Event], int] | None,
          ) -> dict[str, Any]:  # fmt: skip
    stop, sent, failed = threading.Event(), [], []

    def sender() -> None:
        assert send is not None
        try:
            sent.append(send(stop))
        except Exception as exc:  # an answer other than the refusal expected: the figures would mean nothing
            failed.append(exc)

    threads = [] if send is None else [threading.Thread(target=sender) for _ in range(senders)]
    for thread in threads:
        thread.start()
    time.sleep(1.0 if threads else 0)  # the senders under way
    try:
        rounds = probe(service, seconds)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    if failed:
        raise failed[0]
    cuts = statistics.quantiles(rounds, n=100, method="inclusive")
    return {"probes": len(rounds), "p50_ms": round(statistics.median(rounds) * 1e3, 2),
            "p99_ms": round(cuts[98] * 1e3, 2), "max_ms": round(max(rounds) * 1e3, 2),
            "large_requests": sum(sent)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loop_stall", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("benchmarks/.store"))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    store = ModelStore(args.store)
    if store.latest(MODEL) is None:
        export_model(MODEL, store, ExportOptions(weights="random", progress=False))
    body, request = json_body(args.images), grpc_request(args.images)
    found: dict[str, Any] = {"machine": machine(), "images": args.images, "senders": args.senders,
                             "json_mib": round(len(body) / 2**20, 1),
                             "grpc_mib": round(request.ByteSize() / 2**20, 1), "phases": {}}  # fmt: skip
    log = Path(tempfile.mkdtemp(prefix="loop-stall-")) / "service.log"
    with running(Path(store.root), log, MODELS=MODEL, WORKERS="1") as service:
        for name, send in (("quiet", None), ("http_json", http_sender(service, body)),
                           ("grpc_contents", grpc_sender(service, request))):  # fmt: skip
            row = found["phases"][name] = phase(service, args.seconds, args.senders, send)
            print(f"{name:14} probe p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "  # noqa: T201
                  f"max {row['max_ms']:7.2f} ms  ({row['probes']} probes, {row['large_requests']} large)")  # fmt: skip
    print(f"large requests: {args.images} images, JSON {found['json_mib']} MiB, gRPC {found['grpc_mib']} MiB")  # noqa: T201
    record(found, args.out, "loop_stall.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
