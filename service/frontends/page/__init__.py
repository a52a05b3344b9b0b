"""The page at ``/`` (try the models in a browser) and the API reference at ``/docs``.

Both load nothing from outside the service: the page is plain HTML, CSS and JavaScript
shipped in this package, and Swagger UI's files are the ones BentoML ships (BentoML's own
index page and FastAPI's ``/docs`` pull scripts from CDNs and an analytics tag). A
``Content-Security-Policy`` makes the browser hold the pages to that.
"""

from __future__ import annotations

from pathlib import Path

from bentoml._internal import server as bentoml_server
from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
SWAGGER_ASSETS = Path(bentoml_server.__file__).parent / "static_content"

_SAME_ORIGIN = (
    "default-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'none'"
)
# blob: shows the images a person chose; Swagger UI draws some icons from data: URLs and
# sets inline styles.
PAGE_POLICY = f"{_SAME_ORIGIN}; img-src 'self' blob: data:; style-src 'self'"
DOCS_POLICY = f"{_SAME_ORIGIN}; img-src 'self' data:; style-src 'self' 'unsafe-inline'"

router = APIRouter(include_in_schema=False)


def _html(name: str, policy: str) -> FileResponse:
    return FileResponse(STATIC / name, headers={"Content-Security-Policy": policy, "Cache-Control": "no-cache"})


@router.get("/")
async def index() -> FileResponse:
    return _html("index.html", PAGE_POLICY)


@router.get("/docs")
async def docs() -> FileResponse:
    return _html("docs.html", DOCS_POLICY)


def add_page(app: FastAPI) -> None:
    """The page's routes and its static files (``/page/...``, ``/docs/assets/...``)."""
    app.include_router(router)
    app.mount("/page", StaticFiles(directory=STATIC), name="page")
    app.mount("/docs/assets", StaticFiles(directory=SWAGGER_ASSETS), name="docs-assets")
