"""What a request brings: its image files, its query parameters, and the service it reaches.

Shared by the HTTP front ends (``/classify``, ``/explain``): the same bodies, limits and
400s for all of them.
"""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import QueryParams, UploadFile
from starlette.formparsers import MultiPartException

from ..errors import InvalidInput, PayloadTooLarge, ServiceError, UnsupportedMediaType
from ..runtime.classifier import Classifier
from .body import read_body

RAW_TYPES = ("image/", "application/octet-stream")


async def read_images(request: Request, max_body: int, max_files: int) -> list[bytes]:
    """The encoded images of a raw-body or multipart request, in order."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith(RAW_TYPES):
        return [await read_body(request, max_body)]
    if content_type != "multipart/form-data":
        raise UnsupportedMediaType(
            f"Unsupported Content-Type {content_type or '(none)'!r}: send the image file as the body with "
            "Content-Type image/jpeg, image/png, ... or application/octet-stream, or as multipart/form-data files"
        )
    await read_body(request, max_body)
    try:
        form = await request.form(max_files=max_files + 1, max_fields=max_files + 16)
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise PayloadTooLarge(f"Too many files: at most {max_files} per request (MAX_IMAGES_PER_REQUEST)") from None
        raise InvalidInput(f"Malformed multipart body: {exc.message}") from None
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if not files:
        raise InvalidInput("The multipart form holds no file: send images as file fields, e.g. curl -F image=@cat.jpg")
    if len(files) > max_files:
        raise PayloadTooLarge(f"Too many files: {len(files)}, at most {max_files} per request (MAX_IMAGES_PER_REQUEST)")
    return [await f.read() for f in files]


def classifier(request: Request) -> Classifier:
    found: Classifier | None = getattr(request.app.state, "classifier", None)
    if found is None:
        raise ServiceError("The service is starting: no model repository yet")
    return found


def positive_int(query: QueryParams, name: str, default: int | None, most: int | None = None) -> int | None:
    """Query parameter ``name`` as an integer from 1 (to ``most``), or ``default`` when absent."""
    text = query.get(name)
    if text is None:
        return default
    bounds = f"1 to {most}" if most else "a positive integer"
    digits = text.strip().removeprefix("+")
    if not digits.isdecimal():
        raise InvalidInput(f"Invalid parameter: {name}={text!r} is not an integer; use {bounds}")
    value = int(digits) if len(digits) <= 18 else None
    if value is None or value < 1 or (most is not None and value > most):
        raise InvalidInput(f"Invalid parameter: {name}={text.strip()} is out of range; use {bounds}")
    return value


def probability(query: QueryParams, name: str) -> float | None:
    """Query parameter ``name`` as a probability in [0, 1], or None when absent."""
    text = query.get(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise InvalidInput(f"Invalid parameter: {name}={text.strip()!r} is not a probability; use a number from 0 to 1")
    return value


TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")  # what FastAPI's bool query parameters take


def flag(query: QueryParams, name: str) -> bool:
    text = query.get(name, "false").strip().lower()
    if text not in TRUE + FALSE:
        raise InvalidInput(f"Invalid parameter: {name}={text!r}; use true or false")
    return text in TRUE
