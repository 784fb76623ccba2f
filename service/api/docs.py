"""The OpenAPI document and its viewers (/openapi.json, /docs, /redoc): behind the API key unless told not to.

FastAPI serves these from routes of its own that take no dependencies, so with FACE_API_KEYS set they would
describe every endpoint, parameter and error to anyone. They are served here instead, as ordinary routes
that `require_api_key` guards like the rest of the API. FACE_PUBLIC_DOCS=true leaves them open: a browser
sends no key when it loads /docs and the document it fetches, so Swagger's "Authorize" button needs that.

FastAPI's pages load Swagger UI and ReDoc from a CDN: on a machine without internet they are blank. Their
scripts, stylesheet and icon come instead from the fastapi-offline wheel (PyPI), served under /docs/assets; they
are the same public files for everyone, so they need no key (the pages and the document do).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.staticfiles import StaticFiles

from service.security import require_api_key

OPENAPI_URL = "/openapi.json"
DOCS_URL = "/docs"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
REDOC_URL = "/redoc"
ASSETS_URL = "/docs/assets"


def docs_assets() -> StaticFiles:
    """swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and favicon.png, from the installed wheel."""
    return StaticFiles(directory=Path(str(files("fastapi_offline") / "static")))


def docs_router(app: FastAPI, *, public: bool) -> APIRouter:
    """Routes equivalent to FastAPI's own docs routes (same URLs, same root_path handling), for an app built
    with `openapi_url=None, docs_url=None, redoc_url=None`."""
    router = APIRouter(include_in_schema=False, dependencies=[] if public else [Depends(require_api_key)])

    def prefixed(request: Request, url: str) -> str:
        return request.scope.get("root_path", "").rstrip("/") + url

    @router.get(OPENAPI_URL)
    async def openapi(request: Request) -> JSONResponse:
        schema = app.openapi()
        root_path = request.scope.get("root_path", "").rstrip("/")
        servers = schema.get("servers", [])
        if root_path and app.root_path_in_servers and root_path not in {s.get("url") for s in servers}:
            schema = {**schema, "servers": [{"url": root_path}, *servers]}
        return JSONResponse(schema)

    @router.get(DOCS_URL)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=prefixed(request, OPENAPI_URL),
            title=f"{app.title} - Swagger UI",
            swagger_js_url=prefixed(request, f"{ASSETS_URL}/swagger-ui-bundle.js"),
            swagger_css_url=prefixed(request, f"{ASSETS_URL}/swagger-ui.css"),
            swagger_favicon_url=prefixed(request, f"{ASSETS_URL}/favicon.png"),
            oauth2_redirect_url=prefixed(request, OAUTH2_REDIRECT_URL),
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @router.get(OAUTH2_REDIRECT_URL)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get(REDOC_URL)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=prefixed(request, OPENAPI_URL),
            title=f"{app.title} - ReDoc",
            redoc_js_url=prefixed(request, f"{ASSETS_URL}/redoc.standalone.js"),
            redoc_favicon_url=prefixed(request, f"{ASSETS_URL}/favicon.png"),
            with_google_fonts=False,
        )

    return router
