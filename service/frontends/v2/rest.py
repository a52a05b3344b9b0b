"""The Open Inference Protocol over HTTP (``/v2/...``), with the binary tensor data extension.

A request body is JSON, or JSON followed by raw tensor bytes when the
``Inference-Header-Content-Length`` header gives the JSON's length (what tritonclient's
HTTP client sends by default). Answers use the same framing when an output asks for
``binary_data``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic_core import PydanticSerializationError, from_json, to_json

from ...errors import InvalidInput, ModelNotFound, ServiceError
from ...runtime.canary import answering_canary
from ..body import read_body
from ..params import whole_number
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

HEADER_LENGTH = "Inference-Header-Content-Length"

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])


def _handler(request: Request) -> OipHandler:
    handler: OipHandler | None = getattr(request.app.state, "oip", None)
    if handler is None:
        raise ServiceError("The service is starting: no model repository yet")
    return handler


def parse_infer_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], list[Tensor]]:
    """The JSON header and the input tensors of an infer request body."""
    json_length = len(body)
    if header_length is not None:
        length = whole_number(header_length)
        if length is None or length > len(body):
            raise InvalidInput(f"{HEADER_LENGTH} {header_length!r} does not fit a body of {len(body)} bytes")
        json_length = length
    header = _loads(body[:json_length], "The inference request")
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InvalidInput('The inference request needs an "inputs" list')
    binary, offset, tensors = body[json_length:], 0, []
    for item in header["inputs"]:
        if not isinstance(item, dict) or not {"name", "datatype", "shape"} <= item.keys():
            raise InvalidInput('Each input needs "name", "datatype" and an integer "shape"')
        name, datatype = str(item["name"]), str(item["datatype"])
        shape = parse_shape(name, item["shape"])
        size = _object(item.get("parameters"), f"Input {name!r}: its parameters").get("binary_data_size")
        if size is not None and "data" in item:
            raise InvalidInput(f'Input {name!r} has both "data" and a binary_data_size parameter: give one of them')
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"Input {name!r}: binary_data_size must be a whole number of bytes, got {size!r}")
            if offset + size > len(binary):
                raise InvalidInput(f"Input {name!r}: binary_data_size {size} runs past the {len(binary)} bytes sent")
            tensors.append(tensor_from_raw(name, datatype, shape, binary[offset : offset + size]))
            offset += size
        elif "data" in item:
            if not isinstance(item["data"], list):
                raise InvalidInput(f'Input {name!r}: "data" must be a list of values, flat or nested')
            tensors.append(tensor_from_values(name, datatype, shape, item["data"]))
        else:
            raise InvalidInput(f'Input {name!r} has neither "data" nor a binary_data_size parameter')
    if offset < len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes follow the last input's binary data: each input's "
                           "binary_data_size must count all of its bytes")  # fmt: skip
    return header, tensors


def parse_cost(body: bytes, header_length: str | None) -> int:
    """The bytes of ``body`` that :func:`parse_infer_request` reads value by value: its JSON, and binary data
    only where an input is BYTES (elements walked one by one); binary numbers are taken as they lie."""
    json_length = len(body)
    if header_length is not None:
        json_length = min(whole_number(header_length) or 0, len(body))  # a wrong one is refused by the parse
    return len(body) if body.find(b'"BYTES"', 0, json_length) != -1 else json_length  # no copy of the body


def _dumps(body: dict[str, Any]) -> bytes:
    """``body`` as JSON: by pydantic-core's writer (64 ResNet answers' logits and probabilities, 2.5 MiB, in 10 ms
    on the event loop where json.dumps took 70; the same values, small ones written 0.00007 rather than 7e-05,
    NaN as before), and where it cannot (a request ``id`` with a lone surrogate, which JSON escapes and UTF-8
    cannot carry), by the standard library's, which escapes it back."""
    try:
        return to_json(body, inf_nan_mode="constants")
    except PydanticSerializationError:
        return json.dumps(body).encode()


def _loads(text: bytes, what: str) -> Any:
    """``text`` parsed: by pydantic-core's parser (jiter: 54 ms for a 10.5 MiB body of tensor values where the
    standard library's takes 121, each holding the GIL throughout), and where that refuses it, by the standard
    library's, which accepts what it always did (a lone surrogate, nesting deeper than jiter's 200 levels) and
    words what it does not."""
    try:
        return from_json(text)
    except ValueError:
        pass
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's 4,300 digits
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput(f"{what} nests JSON too deeply") from None


def _object(value: Any, what: str) -> dict[str, Any]:
    """An optional JSON object of a request (``parameters``): absent is empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, e.g. {{}}; got {type(value).__name__}")
    return value


def _flag(parameters: dict[str, Any], key: str, default: bool, what: str) -> bool:
    """A boolean parameter: JSON true or false (a string such as "false" would read as true)."""
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"{what}: {key} must be true or false, got {value!r}")
    return value


def requested_outputs(header: dict[str, Any]) -> tuple[list[RequestedOutput], bool]:
    parameters = _object(header.get("parameters"), "The request's parameters")
    default_binary = _flag(parameters, "binary_data_output", False, "The request's parameters")
    items = header.get("outputs")
    if items is not None and not isinstance(items, list):
        raise InvalidInput('"outputs" must be a list of objects, e.g. [{"name": "probabilities"}]')
    outputs = []
    for item in items or []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f'Each output must be an object with a "name", e.g. {{"name": "probabilities"}}; '
                               f"got {item!r}"[:300])  # fmt: skip
        what = f"Output {item['name']!r}"
        parameters = _object(item.get("parameters"), f"{what}: its parameters")
        count = parameters.get("classification", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise InvalidInput(f"{what}: classification must be a non-negative integer")
        _flag(parameters, "binary_data", default_binary, what)
        outputs.append(RequestedOutput(item["name"], count, parameters))
    return outputs, default_binary


def encode_response(entry_name: str, version: str, request_id: Any, outputs: list[Tensor],
                    requested: list[RequestedOutput], default_binary: bool,
                    canary: str | None = None) -> Response:  # fmt: skip
    binary_wanted = {r.name: bool(r.parameters.get("binary_data", default_binary)) for r in requested}
    described, blobs = [], []
    for tensor in outputs:
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary_wanted.get(tensor.name, default_binary):
            blob = (
                serialize_bytes(list(tensor.data.ravel()))
                if tensor.datatype == "BYTES"
                else np.ascontiguousarray(tensor.data).tobytes()
            )
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif tensor.datatype == "BYTES":
            item["data"] = [b.decode("utf-8", "replace") for b in tensor.data.ravel()]
        else:
            item["data"] = tensor.data.ravel().tolist()
        described.append(item)
    body: dict[str, Any] = {"model_name": entry_name, "model_version": version, "outputs": described}
    if request_id:
        body["id"] = request_id
    if canary is not None:  # the response's parameters: a CANARY's candidate answered instead of the model
        body["parameters"] = {"canary": canary}
    header = _dumps(body)
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(blobs), media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(header))}
    )


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


@router.get("/health/live", summary="Server liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


# The protocol answers readiness with 200, or a 4xx when not ready (400, as Triton does).
NOT_READY = 400


@router.get("/health/ready", summary="Server readiness: 200 once every model is loaded and warm, or failed")
async def ready(request: Request) -> JSONResponse:
    is_ready = _handler(request).classifier.ready
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else NOT_READY)


@router.get("/models/{name}", summary="Model metadata")
@router.get("/models/{name}/versions/{version}", summary="Model metadata for a version")
async def metadata(request: Request, name: str, version: str = "") -> dict[str, Any]:
    return await _handler(request).metadata(name, version)


@router.get("/models/{name}/ready", summary="Model readiness")
@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness for a version")
async def model_ready(request: Request, name: str, version: str = "") -> JSONResponse:
    handler = _handler(request)
    if name not in (names := handler.classifier.names()):
        raise ModelNotFound(name, names)
    handler.resolve(name, version)  # a version that is no positive integer: the 400 says so, not only "not ready"
    is_ready = handler.model_ready(name, version)
    return JSONResponse({"name": name, "ready": is_ready}, status_code=200 if is_ready else NOT_READY)


async def infer(request: Request) -> Response:
    """``POST /v2/models/{name}[/versions/{version}]/infer`` (also answered by the fast path)."""
    handler = _handler(request)
    name, version = request.path_params["name"], request.path_params.get("version", "")
    with handler.track("http") as record, await handler.lease(name, version, routed=True) as entry:
        record.model, record.version = entry.name, str(entry.version)
        request.scope["request_record"] = record
        body = await read_body(request, handler.settings.max_body_bytes)
        length = request.headers.get(HEADER_LENGTH)
        header, inputs = await handler.parse(parse_cost(body, length), parse_infer_request, body, length)
        requested, default_binary = requested_outputs(header)
        outputs = await handler.infer(entry, inputs, requested, record)
        canary = answering_canary()
    response = encode_response(entry.name, str(entry.version), header.get("id"), outputs, requested, default_binary,
                               canary)  # fmt: skip
    if record.cache:
        response.headers["X-Cache"] = record.cache
    return response


@router.post("/models/{name}/infer", summary="Inference (JSON or binary tensor data)")
@router.post("/models/{name}/versions/{version}/infer", summary="Inference on a version")
async def infer_route(request: Request, name: str, version: str = "") -> Response:
    return await infer(request)


async def _json_object(request: Request) -> dict[str, Any]:
    """A repository call's body: empty, or a JSON object."""
    body = await read_body(request, 1 << 20, "a repository call's, fixed")
    if not body.strip():
        return {}
    data = _loads(body, "The request body")
    if not isinstance(data, dict):
        raise InvalidInput("The request body must be a JSON object")
    return data


def _parameters(data: dict[str, Any]) -> dict[str, Any]:
    return _object(data.get("parameters"), '"parameters"')


@router.post("/repository/index", tags=["Model repository"], summary="The store's models and their versions' states")
async def repository_index(request: Request) -> JSONResponse:
    data = await _json_object(request)
    ready_only = _flag(data, "ready", False, "The repository index request")
    return JSONResponse(_handler(request).manager.index(ready_only=ready_only))


@router.post("/repository/models/{name}/load", tags=["Model repository"], summary="Load a model of the store")
async def repository_load(request: Request, name: str) -> JSONResponse:
    handler = _handler(request)
    await handler.manager.load(name, _parameters(await _json_object(request)))
    return JSONResponse({})


@router.post("/repository/models/{name}/unload", tags=["Model repository"], summary="Unload a model (drained first)")
async def repository_unload(request: Request, name: str) -> JSONResponse:
    handler = _handler(request)
    await handler.manager.unload(name, _parameters(await _json_object(request)))
    return JSONResponse({})


@router.get("/repository/canaries", tags=["Model repository"], summary="Every CANARY: state, fraction, figures")
async def repository_canaries(request: Request) -> JSONResponse:
    return JSONResponse(_handler(request).manager.canary_list())


@router.post(
    "/repository/canaries/{primary}", tags=["Model repository"],
    summary='Change a canary: {"fraction": 0..1} and/or {"state": "running" | "paused" | "ended" | "promoted" | '
    '"rolled_back"}',
)  # fmt: skip
async def repository_canary(request: Request, primary: str) -> JSONResponse:
    handler = _handler(request)
    return JSONResponse(await handler.manager.canary_change(primary, await _json_object(request)))
