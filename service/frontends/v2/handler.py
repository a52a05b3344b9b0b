"""The Open Inference Protocol (KServe v2) on top of the shared runtime; transport-neutral.

The gRPC servicer and the ``/v2`` HTTP routes decode their wire format into
:class:`Tensor` objects, call :meth:`OipHandler.infer` and encode what it returns, so
both speak exactly the same protocol over the same batchers and sessions as ``/classify``.

Inputs (one per request): ``images``, UINT8 ``[N, H, W, C]`` preprocessed pixels (the
ONNX contract), or ``image_bytes``, BYTES ``[N]`` encoded files decoded as ``/classify``
decodes them. Outputs: ``logits`` and ``probabilities`` (FP32 ``[N, classes]``); with the
``classification`` parameter K an output becomes BYTES ``[N, K]`` of ``"score:index:label"``.
Where the graph has a typicality check, ``distance`` (FP32 ``[N]``) too, when asked for by name;
where the version has an explanation graph, ``gradcam`` (FP32 ``[N, h, w]``: each image's
Grad-CAM map of its top-1 class, ``runtime/gradcam.py``), when asked for by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from ...errors import InvalidInput, PayloadTooLarge, ServiceError
from ...metrics import RequestRecord
from ...runtime.cache import cache_key
from ...runtime.classifier import Classifier, top_k
from ...runtime.entry import ModelEntry
from ...runtime.lifecycle import ModelControl
from ...store.tensors import DISTANCE_NAME, GRADCAM_NAME, INPUT_NAME, OUTPUT_NAMES
from ..params import whole_number
from ..timeout import cut_off
from .management import RepositoryManager

GRADCAM = GRADCAM_NAME  # an output of versions with an explanation graph
IMAGES = INPUT_NAME
IMAGE_BYTES = "image_bytes"
SERVER_NAME = "cnn-serving"
# Request data up to this size is read into tensors on the event loop; more on a decoding thread: JSON tensor
# values parse at about 50 ms a MiB (23 MiB: 0.5 s), and the loop serves every other request of the worker.
INLINE_PARSE_BYTES = 64 * 1024
T = TypeVar("T")
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["classification", "binary_tensor_data"]
PLATFORM = "onnxruntime_onnx"

DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}


@dataclass
class Tensor:
    """A named tensor; BYTES tensors hold a 1-D object array of ``bytes``."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray


@dataclass
class RequestedOutput:
    name: str
    classification: int = 0
    parameters: dict[str, Any] = field(default_factory=dict)


def serialize_bytes(items: list[bytes]) -> bytes:
    """BYTES elements in the protocol's raw form: each one a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def deserialize_bytes(raw: bytes, name: str, most: int | None = None) -> list[bytes]:
    """The elements of ``raw``; past ``most`` of them (the shape's count) it stops at once: a body of millions of
    empty elements is not walked to its end on the event loop."""
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if most is not None and len(items) == most:
            raise InvalidInput(f"Input {name!r}: more than the {most} BYTES elements its shape holds were sent")
        if offset + 4 > len(raw):
            raise InvalidInput(f"Input {name!r}: truncated BYTES element length at offset {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"Input {name!r}: BYTES element of {length} bytes runs past the {len(raw)} sent")
        items.append(bytes(raw[offset : offset + length]))
        offset += length
    return items


def parse_shape(name: str, dims: Any) -> list[int]:
    """An input's ``shape`` as the client sent it (a JSON list, gRPC's int64s), checked: integer dimensions,
    none negative, at least one."""
    if not isinstance(dims, list | tuple) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise InvalidInput(f'Input {name!r}: "shape" must be a list of integers, e.g. [1, 224, 224, 3]; got {dims!r}')
    if any(d < 0 for d in dims):
        raise InvalidInput(f"Input {name!r}: negative dimension in shape {list(dims)}")
    if not dims:
        raise InvalidInput(
            f"Input {name!r}: shape [] is a scalar; an input has a batch dimension, e.g. [1] or [1, 32, 32, 1]"
        )
    return list(dims)


def _elements(shape: list[int]) -> int:
    """How many elements ``shape`` (never empty: see :func:`parse_shape`) holds, in Python's integers (numpy's
    product wraps around at 2**64)."""
    return math.prod(shape)


def _unknown_datatype(name: str, datatype: str) -> InvalidInput:
    return InvalidInput(f"Input {name!r}: unknown datatype {datatype!r}; use one of {', '.join(DTYPES)} or BYTES")


def _reshaped(name: str, array: np.ndarray, shape: list[int]) -> np.ndarray:
    try:
        return array.reshape(shape)
    except (ValueError, OverflowError):  # an empty tensor with a dimension numpy cannot hold
        raise InvalidInput(f"Input {name!r}: shape {shape} has a dimension too large for any tensor") from None


def tensor_from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> Tensor:
    """A tensor from raw little-endian bytes, its size checked against its shape."""
    count = _elements(shape)
    if datatype == "BYTES":
        items = deserialize_bytes(raw, name, most=count)
        if len(items) != count:
            raise InvalidInput(f"Input {name!r}: shape {shape} needs {count} BYTES elements, got {len(items)}")
        return Tensor(name, datatype, shape, np.array(items, dtype=object))
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise _unknown_datatype(name, datatype)
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"Input {name!r}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, got {len(raw)}"
        )
    return Tensor(name, datatype, shape, _reshaped(name, np.frombuffer(raw, dtype=dtype), shape))


VALUES_CHUNK = 65536  # JSON values converted per step: a few ms, after which the event loop may take the GIL


def _as_array(values: Any) -> np.ndarray:
    """``np.asarray(values)``, in steps where ``values`` is a long list: one call over millions of values would
    hold the GIL, and with it the event loop, for tens of milliseconds. Anything the steps cannot give exactly
    as the whole would (another type, ragged rows, too many dimensions) is converted whole, as before, which
    also words what is wrong as it always did."""
    if isinstance(values, list):
        try:
            stepped = _in_steps(values)
        except (ValueError, TypeError, IndexError, OverflowError, RecursionError):
            stepped = None
        if stepped is not None:
            return stepped
    return np.asarray(values)


def _in_steps(values: list[Any]) -> np.ndarray | None:
    """``values`` as one array, at most :data:`VALUES_CHUNK` values a step (whole rows, or a row's own steps where
    one row holds more), or None where it is small or the steps do not agree in numeric type and row shape."""
    first, per_row = (values[0] if values else None), 1
    while isinstance(first, list) and first:
        per_row, first = per_row * len(first), first[0]
    if len(values) * per_row <= VALUES_CHUNK:
        return None
    if per_row > VALUES_CHUNK:  # rows larger than a step (images): each row in steps of its own
        parts = []
        for row in values:
            inner = _in_steps(row) if isinstance(row, list) else None
            parts.append((np.asarray(row) if inner is None else inner)[np.newaxis])
    else:
        rows = VALUES_CHUNK // per_row
        parts = [np.asarray(values[i : i + rows]) for i in range(0, len(values), rows)]
    head = parts[0]
    if head.dtype.kind in "biuf" and all(p.dtype == head.dtype and p.shape[1:] == head.shape[1:] for p in parts):
        return np.concatenate(parts)
    return None


def tensor_from_values(name: str, datatype: str, shape: list[int], values: Any) -> Tensor:
    """A tensor from a flat or nested list (JSON ``data``, gRPC ``contents``)."""
    if datatype == "BYTES":
        try:
            elements = np.asarray(values, dtype=object).ravel()
        except ValueError:  # ragged nesting
            elements = np.array([values], dtype=object)
        if not all(isinstance(v, str | bytes) for v in elements):  # bytes(n) would make n zero bytes
            raise InvalidInput(f"Input {name!r}: BYTES data must be strings; send files as binary data (the "
                               "binary_data_size parameter, or raw_input_contents over gRPC)")  # fmt: skip
        try:
            array = np.array([v.encode() if isinstance(v, str) else v for v in elements], dtype=object)
        except UnicodeEncodeError as exc:  # JSON's "\ud800": a lone surrogate is no UTF-8 text
            raise InvalidInput(f"Input {name!r}: a BYTES string is not valid Unicode text ({exc.reason} at "
                               f"position {exc.start})") from None  # fmt: skip
    else:
        dtype = DTYPES.get(datatype)
        if dtype is None:
            raise _unknown_datatype(name, datatype)
        bounds = np.iinfo(dtype) if dtype.kind in "ui" else None
        try:
            given = _as_array(values)
            if given.dtype.kind in "US" or (given.dtype.kind == "b" and dtype.kind != "b"):  # "1" and true: 1
                raise TypeError("strings or true/false where numbers belong")
            if bounds is not None and given.dtype.kind in "iuf" and given.size:
                if given.dtype.kind == "f" and (not np.isfinite(given).all() or (given != np.round(given)).any()):
                    raise InvalidInput(f"Input {name!r}: {datatype} takes whole numbers, not fractions or NaN")
                if given.min() < bounds.min or given.max() > bounds.max:  # before a cast could wrap them
                    raise OverflowError
            wide = {"f": np.float64, "u": np.uint64}.get(dtype.kind, np.int64)  # UINT64 past int64 is in range
            # huge integers, mixed types (numpy's object arrays) and floats for an integer type (a float64 array
            # rounds 2**60 + 1): converted one by one, which checks each and keeps it exact
            exact = given.dtype.kind == "O" or (bounds is not None and given.dtype.kind == "f")
            array = (np.asarray(values, dtype=wide) if exact else given.astype(wide)).ravel()
        except OverflowError:
            raise InvalidInput(f"Input {name!r}: values out of range for {datatype}") from None
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"Input {name!r}: data is not a list of {datatype} numbers ({exc})") from None
        if bounds is not None and array.size and (array.min() < bounds.min or array.max() > bounds.max):
            raise InvalidInput(f"Input {name!r}: values out of range for {datatype}")
        array = array.astype(dtype)
    count = _elements(shape)
    if array.size != count:
        raise InvalidInput(f"Input {name!r}: shape {shape} needs {count} values, got {array.size}")
    return Tensor(name, datatype, shape, _reshaped(name, array, shape) if datatype != "BYTES" else array)


def model_metadata(entry: ModelEntry, versions: list[int]) -> dict[str, Any]:
    """Triton's model metadata; ``versions`` are those serving, the one described among them."""
    assert entry.model is not None
    meta = entry.model.metadata
    spec, classes = meta.input, meta.num_classes
    # HTTP only (gRPC's ModelMetadataResponse has no field for it): what a variant is and costs
    parameters: dict[str, Any] = {"precision": meta.precision}
    if meta.derived_from is not None:
        parameters |= {"derived_from": meta.derived_from, "accuracy": meta.accuracy, "forced": meta.forced}
    return {
        "name": entry.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": [
            {"name": IMAGES, "datatype": "UINT8", "shape": [-1, spec.size, spec.size, spec.channels]},
            {"name": IMAGE_BYTES, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": name, "datatype": "FP32", "shape": [-1, classes] if name in OUTPUT_NAMES else [-1]}
            for name in entry.model.output_names
        ]
        + (
            [{"name": GRADCAM, "datatype": "FP32", "shape": [-1, *meta.explanation["map_size"]]}]
            if meta.explanation
            else []
        ),
        "parameters": parameters,
    }


class OipHandler:
    """ModelInfer and the metadata calls, for any transport."""

    def __init__(self, classifier: Classifier, control: ModelControl) -> None:
        self.classifier = classifier
        self.settings = classifier.settings
        self.manager = RepositoryManager(control, classifier.shadow, classifier.canaries)

    def resolve(self, name: str, version: str) -> int | None:
        """The version a call names (None: the latest served), refusing one that is no positive integer."""
        if not name:
            raise InvalidInput(f"No model name given; available: {', '.join(self.classifier.names())}")
        if not version:
            return None
        number = whole_number(version)
        if number is None or number < 1:
            raise InvalidInput(f"Model version must be a positive integer, got {version!r}")
        return number

    def entry(self, name: str, version: str = "") -> ModelEntry:
        return self.classifier.entry(name, self.resolve(name, version))

    async def lease(
        self, name: str, version: str = "", routed: bool = False
    ) -> contextlib.AbstractContextManager[ModelEntry]:
        """The version for a call, held until it is answered; ``routed`` (an inference): a ``CANARY``'s candidate
        may answer it (see :meth:`Classifier.acquire`)."""
        return await self.classifier.acquire(name, self.resolve(name, version), routed)

    async def metadata(self, name: str, version: str = "") -> dict[str, Any]:
        """The model's metadata; MODEL_CONTROL=on-demand loads a model of the store to answer, as an inference
        would (a client asks for the metadata first)."""
        with await self.lease(name, version) as entry:
            return model_metadata(entry, self.classifier.served_versions(entry.name))

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.entry(name, version)
        except ServiceError:
            return False
        return True

    async def parse(self, size: int, parse: Callable[..., T], *args: Any) -> T:
        """``parse(*args)``, a request's wire format read into tensors: in place for up to
        :data:`INLINE_PARSE_BYTES` of ``size`` (the hop to a thread would cost more), else on the decoding
        threads, so that a large body holds one of them instead of the event loop."""
        if size <= INLINE_PARSE_BYTES:
            return parse(*args)
        return await asyncio.get_running_loop().run_in_executor(
            self.classifier.decoders, functools.partial(parse, *args)
        )

    async def images(self, entry: ModelEntry, inputs: list[Tensor]) -> np.ndarray:
        assert entry.model is not None
        if len(inputs) != 1 or inputs[0].name not in (IMAGES, IMAGE_BYTES):
            names = [t.name for t in inputs]
            raise InvalidInput(f"Send exactly one input, {IMAGES!r} (UINT8) or {IMAGE_BYTES!r} (BYTES); got {names}")
        tensor = inputs[0]
        if tensor.name == IMAGE_BYTES:
            one_per_row = len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)
            if tensor.datatype != "BYTES" or not one_per_row:
                raise InvalidInput(f"Input {IMAGE_BYTES!r} must be BYTES [N], one file each; got {tensor.shape}")
        else:
            spec = entry.model.metadata.input
            expected = [spec.size, spec.size, spec.channels]
            if tensor.datatype != "UINT8":
                raise InvalidInput(f"Input {IMAGES!r} must be UINT8, got {tensor.datatype}")
            if len(tensor.shape) != 4 or list(tensor.shape[1:]) != expected:
                wanted = ", ".join(map(str, expected))
                raise InvalidInput(f"Input {IMAGES!r} must have shape [N, {wanted}], got {tensor.shape}")
        count = tensor.shape[0]
        if count < 1:
            raise InvalidInput(f"Input {tensor.name!r}: the batch is empty (shape {tensor.shape})")
        if count > self.settings.max_images_per_request:
            raise PayloadTooLarge(
                f"Input {tensor.name!r}: {count} images, at most {self.settings.max_images_per_request} per request "
                "(MAX_IMAGES_PER_REQUEST)"
            )
        if tensor.name == IMAGE_BYTES:
            return await self.classifier.preprocess(entry, [bytes(b) for b in tensor.data.ravel()])
        with self.classifier.stage(entry, "preprocess"):
            return np.ascontiguousarray(tensor.data, dtype=np.uint8)

    def track(self, protocol: str) -> contextlib.AbstractContextManager[RequestRecord]:
        """Count one request from its start, under ``protocol``: one refused before it reached a model (unknown,
        loading, a malformed body) counts too, under ``model=""`` until :meth:`lease` names it; one that
        ``REQUEST_TIMEOUT_S`` cut off, as ``5xx``."""
        return self.classifier.metrics.track_request(protocol, cut_off=cut_off)

    async def infer(
        self, entry: ModelEntry, inputs: list[Tensor], requested: list[RequestedOutput], record: RequestRecord
    ) -> list[Tensor]:
        """Run one request, counted by its caller (``record``, from :meth:`track`, learns its images and, with
        ``RESPONSE_CACHE_MB``, whether the cache answered)."""
        cache = self.classifier.cache
        if cache is None:
            outputs = await self._infer(entry, inputs, requested)
        else:
            compute = functools.partial(self._kept, entry, inputs, requested)
            key = self.cache_key(entry, inputs, requested)
            outputs, hit = await cache.get_or_compute(key, entry, compute)
            record.cache = "hit" if hit else "miss"
        record.images = outputs[0].shape[0]
        return outputs

    async def _kept(self, entry: ModelEntry, inputs: list[Tensor], requested: list[RequestedOutput]) -> list[Tensor]:
        """The outputs as the cache keeps them: arrays of their own, not views of their batch's (which would hold
        the whole batch's memory behind an entry sized by its rows)."""
        outputs = await self._infer(entry, inputs, requested)
        return [Tensor(t.name, t.datatype, t.shape, t.data if t.data.base is None else t.data.copy()) for t in outputs]

    @staticmethod
    def cache_key(entry: ModelEntry, inputs: list[Tensor], requested: list[RequestedOutput]) -> bytes:
        """What changes an answer: each input's name, datatype, shape and bytes, each output asked for and its
        ``classification`` (``binary_data`` changes the encoding only, which is not cached)."""
        parameters: list[Any] = [len(requested), *((r.name, r.classification) for r in requested)]
        blobs: list[Any] = []
        for tensor in inputs:
            parameters.append((tensor.name, tensor.datatype, list(tensor.shape)))
            if tensor.datatype == "BYTES":  # each element length-prefixed by the key
                blobs += [bytes(item) for item in tensor.data.ravel()]
            else:
                blobs.append(np.ascontiguousarray(tensor.data))
        return cache_key("", "oip", entry.name, entry.version, parameters, blobs)

    async def _infer(self, entry: ModelEntry, inputs: list[Tensor], requested: list[RequestedOutput]) -> list[Tensor]:
        assert entry.model is not None and entry.batcher is not None
        names = entry.model.output_names  # and the typicality distance, where the graph has it: asked for by name
        explained = bool(entry.model.metadata.explanation)
        for output in requested:
            if output.name == GRADCAM and explained:
                if output.classification:
                    raise InvalidInput(f"Output {GRADCAM!r} is a map per image: classification applies to "
                                       f"{' and '.join(OUTPUT_NAMES)}")  # fmt: skip
                continue
            if output.name not in names:
                available = (*names, GRADCAM) if explained else names
                raise InvalidInput(f"Unknown output {output.name!r}; the model has {', '.join(available)}")
            if output.classification < 0:
                raise InvalidInput(f"Output {output.name!r}: classification must be a positive count")
            if output.classification and output.name == DISTANCE_NAME:
                raise InvalidInput(f"Output {DISTANCE_NAME!r} is one value per image: classification applies to "
                                   f"{' and '.join(OUTPUT_NAMES)}")  # fmt: skip
        images = await self.images(entry, inputs)
        outputs = await self.classifier.infer(entry, images)
        arrays = dict(zip(names, outputs, strict=True))
        if any(r.name == GRADCAM for r in requested):  # the top-1's map, from the explanation graph
            arrays[GRADCAM] = (await self.classifier.gradcam(entry, images))[1][1]
        with self.classifier.stage(entry, "postprocess"):
            requested = requested or [RequestedOutput(name) for name in OUTPUT_NAMES]
            return [self._output(entry, arrays[r.name], r) for r in requested]

    @staticmethod
    def _output(entry: ModelEntry, values: np.ndarray, requested: RequestedOutput) -> Tensor:
        if not requested.classification:
            return Tensor(requested.name, "FP32", list(values.shape), values)
        assert entry.model is not None
        k = min(requested.classification, values.shape[1])
        rows = [
            [f"{p['score']:.9g}:{p['index']}:{p['label']}".encode() for p in top_k(row, entry.model.labels, k)]
            for row in values
        ]
        return Tensor(requested.name, "BYTES", [len(rows), k], np.array(rows, dtype=object))
