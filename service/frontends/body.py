"""Reading a request body with a size limit, before anything parses it, and the image files it holds."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request

from ..errors import ClientGone, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from .protocol import REFUSED_WITH


async def read_body(request: Request, limit: int, limit_name: str = "MAX_BODY_BYTES") -> bytes:
    """The whole body, refused past ``limit`` bytes (``limit_name`` says which limit: the setting, where one), and
    refused where it is content-coded (gzip, ...): it would be read as it came, as a broken image or JSON."""
    headers = request.headers  # `in` first: a missing header costs `get` a KeyError, and this runs per request
    coding = headers["content-encoding"].strip().lower() if "content-encoding" in headers else ""
    if coding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {coding!r} is not supported: send the body as it is (images "
                                   "are compressed already)")  # fmt: skip
    declared = headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body of {int(declared):,} bytes exceeds the limit of {limit:,} ({limit_name})")
    chunks, size = [], 0
    stream: AsyncIterator[bytes] = request.stream()
    try:
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"Request body exceeds the limit of {limit:,} bytes ({limit_name})")
            chunks.append(chunk)
    except ClientDisconnect:  # ours, so that the request's counters and a canary read it as the client's doing
        raise ClientGone(request.scope.get(REFUSED_WITH, 499)) from None
    body = b"".join(chunks)
    request._body = body  # Starlette's form parser reads the cached body
    return body


RAW_TYPES = ("image/", "application/octet-stream")


def _framing_problem(content_type: str, body: bytes) -> str | None:
    """Why a multipart body the parser read no part from is malformed, where it can be told (the parser reads an
    empty boundary, or a body without its closing one, as an empty form)."""
    params = (part.strip().partition("=") for part in content_type.split(";")[1:])
    boundary = next((value.strip().strip('"') for key, _, value in params if key.strip().lower() == "boundary"), "")
    if not boundary:
        return "Malformed multipart body: its Content-Type names an empty boundary"
    if f"--{boundary}--".encode("latin-1", "replace") not in body:
        return f"Malformed multipart body: it does not end with the closing boundary --{boundary[:70]}--"
    return None


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
    body = await read_body(request, max_body)
    try:
        form = await request.form(max_files=max_files + 1, max_fields=max_files + 16)
    except (MultiPartException, HTTPException) as exc:  # Starlette raises its parser's error as a 400 in an app
        message = exc.message if isinstance(exc, MultiPartException) else str(exc.detail)
        if "Too many files" in message:
            raise PayloadTooLarge(f"Too many files: at most {max_files} per request (MAX_IMAGES_PER_REQUEST)") from None
        raise InvalidInput(f"Malformed multipart body: {message}; send files as multipart/form-data with the "
                           "boundary its Content-Type names, e.g. curl -F image=@cat.jpg") from None  # fmt: skip
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if not files:
        problem = _framing_problem(request.headers.get("content-type", ""), body) or "The multipart form holds no file"
        raise InvalidInput(f"{problem}: send images as file fields, e.g. curl -F image=@cat.jpg")
    if len(files) > max_files:
        raise PayloadTooLarge(f"Too many files: {len(files)}, at most {max_files} per request (MAX_IMAGES_PER_REQUEST)")
    return [await f.read() for f in files]
