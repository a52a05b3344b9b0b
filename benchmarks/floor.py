"""The stack floor: a bare Starlette no-op on uvicorn with httptools and uvloop, one process.

``python -m uvicorn benchmarks.floor:app --loop uvloop --http httptools``: reads the body and
answers a fixed JSON, as the service's ``/noop`` does, with nothing else around it. What no
Python HTTP service on this stack can beat on this machine; every HTTP row of the benchmark
is also given as a fraction of it.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def noop(request: Request) -> Response:
    body = await request.body()
    return Response(b'{"model":"noop","version":"0","bytes":%d}' % len(body), media_type="application/json")


app = Starlette(routes=[Route("/noop", noop, methods=["POST"])])
