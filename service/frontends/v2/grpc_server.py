"""``inference.GRPCInferenceService`` (the Open Inference Protocol over gRPC) on ``GRPC_PORT``, with gRPC's standard
health service (``grpc.health.v1.Health``) beside it.

It runs in each BentoML worker's event loop, next to the HTTP app, over the same
repository, batchers and metrics. Every worker binds the same port with SO_REUSEPORT, so
the kernel spreads connections across workers as it does for HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from ...errors import (
    DeviceOutOfMemory,
    InvalidInput,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    ModelUnloaded,
    Overloaded,
    PayloadTooLarge,
    RepositoryError,
    ServiceError,
)
from ...runtime.canary import answering_canary
from ...tracing import carrier
from ..auth import ADMIN_GRPC_METHODS, OPEN_GRPC_METHODS, Access, check_access
from .grpc_limits import CallLimit, refusal
from .grpc_options import server_options
from .handler import (
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    OipHandler,
    RequestedOutput,
    Tensor,
    parse_shape,
    serialize_bytes,
    tensor_from_raw,
    tensor_from_values,
)
from .protocol import grpc_predict_v2_pb2 as pb
from .protocol import grpc_predict_v2_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

STATUS = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelUnloaded: grpc.StatusCode.NOT_FOUND,
    RepositoryError: grpc.StatusCode.FAILED_PRECONDITION,
    ModelLoadFailed: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.UNAVAILABLE,
    DeviceOutOfMemory: grpc.StatusCode.UNAVAILABLE,  # gRPC's code for "safe to retry", as HTTP's 503
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# Which repeated field of InferTensorContents carries each datatype
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# The numpy type of each numeric field's values (the proto's own type: every value fits exactly)
FIELD_DTYPE = {
    "bool_contents": np.bool_,
    "uint_contents": np.uint32,
    "uint64_contents": np.uint64,
    "int_contents": np.int32,
    "int64_contents": np.int64,
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}
CONTENTS_CHUNK = 65536  # values read per step: about 3 ms, after which the event loop may take the GIL


def _parameter(value: pb.InferParameter) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def requested_output(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> RequestedOutput:
    """An output asked for; its ``classification`` parameter an integer (int64_param or uint64_param)."""
    if "classification" not in output.parameters:
        return RequestedOutput(output.name)
    parameter = output.parameters["classification"]
    if parameter.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param"):
        raise InvalidInput(f"Output {output.name!r}: classification must be an integer parameter (int64_param), "
                           f"the number of classes to answer; got {str(parameter).strip() or 'none'}")  # fmt: skip
    return RequestedOutput(output.name, _parameter(parameter))


def decode_inputs(request: pb.ModelInferRequest) -> list[Tensor]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents entries")
    tensors = []
    for i, tensor in enumerate(request.inputs):
        shape = parse_shape(tensor.name, list(tensor.shape))
        if raw and tensor.HasField("contents"):  # as HTTP refuses data beside binary_data_size
            raise InvalidInput(f"Input {tensor.name!r} has contents while the request has raw_input_contents: "
                               "send its values in one of the two")  # fmt: skip
        if raw:
            tensors.append(tensor_from_raw(tensor.name, tensor.datatype, shape, raw[i]))
        else:
            field = CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise InvalidInput(f"Input {tensor.name!r}: unsupported datatype {tensor.datatype!r}")
            tensors.append(tensor_from_values(tensor.name, tensor.datatype, shape, _contents(tensor.contents, field)))
    return tensors


def _contents(contents: pb.InferTensorContents, field: str) -> Any:
    """A typed field's values: BYTES as a list; numbers as an array of the field's type, read a chunk at a time,
    since one call over millions of values (about 100 ms for 2.4 million) would hold the GIL, and with it the
    event loop, throughout."""
    values = getattr(contents, field)
    if field not in FIELD_DTYPE:
        return list(values)
    dtype = FIELD_DTYPE[field]
    if len(values) <= CONTENTS_CHUNK:
        return np.array(values, dtype=dtype)
    return np.concatenate(
        [np.array(values[i : i + CONTENTS_CHUNK], dtype=dtype) for i in range(0, len(values), CONTENTS_CHUNK)]
    )


def parse_cost(request: pb.ModelInferRequest) -> int:
    """About how many bytes of a request :func:`decode_inputs` reads value by value: 4 a value of typed
    contents, and the raw contents of BYTES inputs (elements walked one by one); raw numbers are taken as they
    lie. Without ``ByteSize()``, which walks the whole message."""
    raw = request.raw_input_contents
    size = sum(len(raw[i]) for i, tensor in enumerate(request.inputs) if tensor.datatype == "BYTES" and i < len(raw))
    for tensor in request.inputs:
        field = CONTENTS_FIELD.get(tensor.datatype)
        if field is not None:
            size += 4 * len(getattr(tensor.contents, field))
    return size


def encode_outputs(response: pb.ModelInferResponse, outputs: list[Tensor]) -> None:
    """Outputs as raw_output_contents, the form the protocol recommends and tritonclient reads."""
    for tensor in outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if tensor.datatype == "BYTES":
            response.raw_output_contents.append(serialize_bytes(list(tensor.data.ravel())))
        else:
            response.raw_output_contents.append(np.ascontiguousarray(tensor.data).tobytes())


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, handler: OipHandler) -> None:
        self.handler = handler

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, ServiceError):
            code = next((c for t, c in STATUS.items() if isinstance(exc, t)), grpc.StatusCode.INTERNAL)
            await context.abort(code, exc.message)
        logger.exception("gRPC call failed", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"Internal error ({type(exc).__name__}); see the service logs")

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.handler.classifier.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:  # no name, or a version that is no positive integer: INVALID_ARGUMENT saying so (HTTP's 400), not "no"
            self.handler.resolve(request.name, request.version)
        except ServiceError as exc:
            await self._abort(context, exc)
        return pb.ModelReadyResponse(ready=self.handler.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        try:
            metadata = await self.handler.metadata(request.name, request.version)
        except Exception as exc:
            await self._abort(context, exc)
            raise  # pragma: no cover - abort raises
        response = pb.ModelMetadataResponse(
            name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"]
        )
        for kind in ("inputs", "outputs"):
            for tensor in metadata[kind]:
                getattr(response, kind).add(**tensor)
        return response

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        tracing = self.handler.classifier.tracing
        metadata = carrier(context.invocation_metadata() or ()) if tracing.enabled else {}
        with tracing.request("ModelInfer", metadata, {"rpc.system": "grpc", "model": request.model_name}):
            return await self._infer(request, context)

    async def _infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        try:
            with (
                self.handler.track("grpc") as record,
                await self.handler.lease(request.model_name, request.model_version, routed=True) as entry,
            ):
                record.model, record.version = entry.name, str(entry.version)
                requested = [requested_output(o) for o in request.outputs]
                inputs = await self.handler.parse(parse_cost(request), decode_inputs, request)
                outputs = await self.handler.infer(entry, inputs, requested, record)
                canary = answering_canary()
        except Exception as exc:
            await self._abort(context, exc)
            raise  # pragma: no cover - abort raises
        if record.cache:  # HTTP's X-Cache header, in the trailing metadata (sent with the status: no extra frame)
            context.set_trailing_metadata((("x-cache", record.cache),))
        response = pb.ModelInferResponse(model_name=entry.name, model_version=str(entry.version), id=request.id)
        if canary is not None:  # a CANARY's candidate answered instead of the model asked for
            response.parameters["canary"].string_param = canary
        encode_outputs(response, outputs)
        return response

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        try:
            rows = self.handler.manager.index(ready_only=request.ready)
        except Exception as exc:
            await self._abort(context, exc)
            raise  # pragma: no cover - abort raises
        response = pb.RepositoryIndexResponse()
        for row in rows:
            response.models.add(**row)
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        await self._manage(context, self.handler.manager.load, request)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self._manage(context, self.handler.manager.unload, request)
        return pb.RepositoryModelUnloadResponse()

    async def _manage(self, context: Any, action: Any, request: Any) -> None:
        """A load or unload: the model's name and the request's parameters, errors as gRPC statuses."""
        try:
            parameters = {key: _parameter(value) for key, value in request.parameters.items()}
            await action(request.model_name, parameters)
        except Exception as exc:
            await self._abort(context, exc)
            raise  # pragma: no cover - abort raises


GRPC_STATUS = {Access.MISSING: grpc.StatusCode.UNAUTHENTICATED, Access.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED}


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """``API_TOKEN`` for inference and metadata, ``ADMIN_TOKEN`` for the repository calls; health stays open."""

    def __init__(self, api_token: str | None, admin_token: str | None) -> None:
        self.api_token = api_token
        self.admin_token = admin_token

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if details.method in OPEN_GRPC_METHODS:
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        authorization = metadata.get("authorization")
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        admin = details.method in ADMIN_GRPC_METHODS
        access, message = check_access(authorization, self.api_token, self.admin_token, admin, grpc=True)
        if access is Access.GRANTED:
            return await continuation(details)

        return refusal(GRPC_STATUS[access], message)  # its message never read


@dataclass(frozen=True)
class _Malformed:
    """What a request's bytes became where they are no message of its type (the deserializer may not raise: grpcio
    would answer UNKNOWN and log a traceback)."""

    kind: str
    error: str


def _reader(message: Any) -> Callable[[bytes], Any]:
    def read(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return _Malformed(message.__name__, str(exc))

    return read


def _refusing_malformed(behaviour: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"The request is no valid {request.kind} message: {request.error}"
            )
        return await behaviour(request, context)

    return call


def servicer_handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The service's methods, as the generated ``add_..._to_server`` registers them, but with a request that does
    not parse answered INVALID_ARGUMENT."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            _refusing_malformed(getattr(servicer, method.name)),
            request_deserializer=_reader(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in service.methods
    }
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


# grpc.health.v1's service names: readiness (/readyz, ServerReady) under "" (the server as a whole, what a probe or
# a balancer asks by default, and what Triton answers with readiness) and the inference service's name; liveness
# (/livez) under its own
READY_SERVICES = ("", "inference.GRPCInferenceService")
LIVE_SERVICE = "liveness"


def health_handlers(ready: Callable[[], bool]) -> grpc.GenericRpcHandler:
    """gRPC's standard health service, which Kubernetes' ``grpc`` probes, ``grpc_health_probe`` and meshes ask:
    ``Check`` of ``""`` or ``inference.GRPCInferenceService`` is ``SERVING`` once ``ready()`` (``/readyz``: every
    requested model loaded and warm in every worker), else ``NOT_SERVING``; of ``liveness``, ``SERVING`` while this
    worker answers (``/livez``); of any other service ``NOT_FOUND``, naming these. ``Watch`` (a stream of changes) is
    not served: ``UNIMPLEMENTED`` at once, its message unread, as Triton answers it."""
    statuses = health_pb2.HealthCheckResponse.ServingStatus

    async def check(request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        if request.service in READY_SERVICES:
            return health_pb2.HealthCheckResponse(status=statuses.SERVING if ready() else statuses.NOT_SERVING)
        if request.service == LIVE_SERVICE:
            return health_pb2.HealthCheckResponse(status=statuses.SERVING)
        await context.abort(
            grpc.StatusCode.NOT_FOUND,
            f"No health for service {request.service[:200]!r}: ask '' or {READY_SERVICES[1]!r} (every model loaded and "
            f"warm, as /readyz) or {LIVE_SERVICE!r} (the worker answers, as /livez)",
        )

    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            _refusing_malformed(check),
            request_deserializer=_reader(health_pb2.HealthCheckRequest),
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
        "Watch": refusal(grpc.StatusCode.UNIMPLEMENTED, "Watch is not served: ask Check"),
    }
    return grpc.method_handlers_generic_handler("grpc.health.v1.Health", handlers)


async def start_grpc_server(handler: OipHandler) -> grpc.aio.Server:
    """The Open Inference Protocol on ``GRPC_PORT``, beside HTTP in this worker, with its limits from the
    handler's settings."""
    settings = handler.settings
    token = settings.api_token.get_secret_value() if settings.api_token else None
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token else None
    interceptors: list[grpc.aio.ServerInterceptor] = [
        CallLimit(
            settings.grpc_max_concurrent_rpcs,
            settings.request_timeout_s,
            health=OPEN_GRPC_METHODS,
            health_timeout_s=settings.header_timeout_s,
        )
    ]
    if token or admin_token:
        interceptors.append(TokenInterceptor(token, admin_token))
    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
    server.add_generic_rpc_handlers(
        (servicer_handlers(InferenceServicer(handler)), health_handlers(lambda: handler.classifier.ready))
    )
    address = f"{settings.http_host}:{settings.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"gRPC cannot bind {address}")
    await server.start()
    logger.info("gRPC (Open Inference Protocol) listening on %s", address)
    return server
