"""Reading a request body with a size limit, before anything parses it."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request

from ..errors import PayloadTooLarge


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"Request body of {int(declared):,} bytes exceeds the limit of {limit:,} (MAX_BODY_BYTES)"
        )
    chunks, size = [], 0
    stream: AsyncIterator[bytes] = request.stream()
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit:,} bytes (MAX_BODY_BYTES)")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's form parser reads the cached body
    return body
