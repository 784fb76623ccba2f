"""The FastAPI application: `create_app(settings)` wires settings, models, gallery, routers and error handling.

- Models and the gallery are loaded once, in the lifespan, into `app.state.runtime` (service.api.runtime).
- Blocking work (decoding, ONNX Runtime, SQLite) runs in bounded thread pools, never on the event loop.
- Every error leaves as `{"error": {"code", "message", "details"}}`: domain errors (service.errors) with their
  own code and status, request validation as 422 `invalid_parameter`, Starlette's 404/405 as `not_found` /
  `method_not_allowed`, anything else as 500 `internal_error` (logged with its traceback, never shown).
"""

from __future__ import annotations

import importlib.metadata
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import faces, gallery, system
from service.api.docs import docs_router
from service.api.runtime import Runtime
from service.api.uploads import body_limit
from service.errors import FaceServiceError, ImageTooLarge
from service.metrics import Metrics, MetricsMiddleware
from service.schemas import ErrorResponse
from service.settings import Settings, redact_url

log = logging.getLogger(__name__)

try:
    VERSION = importlib.metadata.version("facerec")
except importlib.metadata.PackageNotFoundError:  # running from a checkout that was never pip-installed
    VERSION = "0.0.0"

# Requests that carry no image (gallery management, system) need no more than this.
SMALL_BODY_BYTES = 64 * 1024

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "image_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    503: "not_ready",
}

DESCRIPTION = """
Face detection, verification and identification on the CPU (ONNX Runtime).

Images are sent as `multipart/form-data` file parts (`image`; `image1`/`image2` for /verify; `images`, repeated,
for /enroll) or as a JSON body with the same field names holding base64 strings. Options may also be passed
as query parameters. Coordinates are pixels of the uploaded image: boxes `[x1, y1, x2, y2]`, landmarks five
`[x, y]` points (left eye, right eye, nose tip, left and right mouth corners).

Every error is `{"error": {"code": ..., "message": ..., "details": {...}}}` with a stable `code`.
When API keys are configured (FACE_API_KEYS), every endpoint but /health and /ready needs one, as
`X-API-Key: <key>` or `Authorization: Bearer <key>`; so do this document, /docs and /redoc, unless
FACE_PUBLIC_DOCS is set.
"""


def error_response(status: int, code: str, message: str, details: dict | None = None, headers=None):
    return JSONResponse(
        {"error": {"code": code, "message": message, "details": details or {}}},
        status_code=status,
        headers=headers,
    )


async def _domain_error(request: Request, exc: FaceServiceError) -> JSONResponse:
    if exc.status >= 500:
        log.error("%s %s failed: %s (%s)", request.method, request.url.path, exc.message, exc.code)
    return error_response(exc.status, exc.code, exc.message, exc.details, getattr(exc, "headers", None))


def _validation_errors(errors) -> list[dict]:
    out = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        out.append({"field": ".".join(loc) or None, "message": err.get("msg", "invalid"), "type": err.get("type")})
    return out


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = _validation_errors(exc.errors())
    summary = "; ".join(f"{e['field'] or 'request'}: {e['message']}" for e in errors)
    return error_response(422, "invalid_parameter", f"invalid parameter: {summary}", {"errors": errors})


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": _allowed_methods(request)}
    return error_response(exc.status_code, code, str(exc.detail), headers=headers)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette's 405 names only the first route that matched the
    path (GET /identities/{id}), but DELETE lives on another route of the same path, and RFC 9110 asks `Allow`
    for all of them."""
    # Asked route by route through the public `matches` (included routers nest their routes), method by method.
    allowed = [
        method
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in request.app.routes)
    ]
    return ", ".join(allowed)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error")


class BodyLimitMiddleware:
    """Refuse a request body over its path's limit with 413 image_too_large, reading no more than the limit.

    A declared Content-Length over the limit is refused before a byte is read; a chunked body is counted as it
    streams and refused (ImageTooLarge raised into the reader) as soon as it crosses the limit.
    """

    def __init__(self, app: ASGIApp, limits: dict[str, int], default_limit: int) -> None:
        self.app = app
        self.limits = limits
        self.default_limit = default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"].rstrip("/") or "/", self.default_limit)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            error = _too_large(limit)
            response = error_response(error.status, error.code, error.message, error.details)
            response.headers["Connection"] = "close"  # the unread body makes the connection unusable
            await response(scope, receive, send)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit)
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit: int) -> ImageTooLarge:
    return ImageTooLarge(f"request body is larger than {limit} bytes", details={"max_body_bytes": limit})


@asynccontextmanager
async def _lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    runtime = await Runtime.start(settings, app.state.metrics)
    app.state.runtime = runtime
    log.info(
        "ready: detector %s, embedder %s (threshold %.3f), gallery %s",
        settings.detector_path,
        settings.embedder_path,
        runtime.threshold,
        redact_url(settings.gallery_url),
    )
    try:
        yield
    finally:
        app.state.runtime = None
        await runtime.close()


def _describe_an_open_api(app: FastAPI) -> None:
    """Without FACE_API_KEYS nothing asks for a key, so the OpenAPI document must not say it does: clients and
    generated SDKs would send credentials for nothing, and schema-driven tests would expect 401s that never come.
    The key schemes and the 401 answers are dropped from the document FastAPI builds (once; it caches it)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.pop("security", None)
                    operation.get("responses", {}).pop("401", None)
            schema.get("components", {}).pop("securitySchemes", None)
        return app.openapi_schema

    app.openapi = openapi


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Without `settings`, they are read (and validated) from the environment now."""
    settings = settings or Settings()
    app = FastAPI(
        title="facerec",
        version=VERSION,
        description=DESCRIPTION,
        lifespan=_lifespan,
        responses={500: {"description": "Internal error (internal_error)", "model": ErrorResponse}},
        # FastAPI's own docs routes cannot take the API-key dependency; service.api.docs serves them instead.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.runtime = None

    app.include_router(system.router)
    app.include_router(faces.router)
    app.include_router(gallery.router)
    app.include_router(docs_router(app, public=settings.public_docs))
    if not settings.api_keys:
        _describe_an_open_api(app)

    app.add_exception_handler(FaceServiceError, _domain_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)

    one = body_limit(settings.max_image_bytes, 1)
    limits = {
        "/detect": one,
        "/identify": one,
        "/verify": body_limit(settings.max_image_bytes, 2),
        "/enroll": body_limit(settings.max_image_bytes, settings.max_enroll_images),
    }
    # Added last = outermost: metrics see every request, including those the body limit refuses.
    app.add_middleware(BodyLimitMiddleware, limits=limits, default_limit=SMALL_BODY_BYTES)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, static_paths=frozenset(limits))
    return app
