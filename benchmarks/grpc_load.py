"""gRPC (Open Inference Protocol) load: ``image_bytes`` files or preprocessed uint8 ``images``, raw contents."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import grpc
import numpy as np

from service.frontends.v2.protocol import grpc_predict_v2_pb2 as pb
from service.frontends.v2.protocol import grpc_predict_v2_pb2_grpc as pb_grpc

from .load import check_loopback, drive


def bytes_request(model: str, files: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", len(files)) + files)
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 5
    return request


def pixels_request(model: str, pixels: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="images", datatype="UINT8", shape=list(pixels.shape))
    request.raw_input_contents.append(np.ascontiguousarray(pixels).tobytes())
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 5
    return request


async def grpc_run(target: str, requests_pool: Sequence[pb.ModelInferRequest], concurrency: int, requests: int,
                   seconds: float, timeout: float = 120.0) -> tuple[list[float], int, float]:  # fmt: skip
    check_loopback(target)
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def call(i: int) -> bool:
            try:
                await stub.ModelInfer(requests_pool[i % len(requests_pool)], timeout=timeout)
            except grpc.aio.AioRpcError:
                return False
            return True

        return await drive(call, concurrency, requests, seconds)
