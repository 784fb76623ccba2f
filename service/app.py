"""The FastAPI application: `create_app(settings)` wires settings, models, gallery, routers and error handling.

- Models and the gallery are loaded once, in the lifespan, into `app.state.runtime` (service.api.runtime).
- Blocking work (decoding, ONNX Runtime, SQLite) runs in bounded thread pools, never on the event loop.
- Every error leaves as `{"error": {"code", "message", "details"}}`: domain errors (service.errors) with their
  own code and status, request validation as 422 `invalid_parameter`, Starlette's 404/405 as `not_found` /
  `method_not_allowed`, anything else as 500 `internal_error` (logged with its traceback, never shown).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import traceback
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission import Busy, PixelBudget
from service.api import demo, faces, gallery, stream, system
from service.api.docs import ASSETS_URL as DOCS_ASSETS_URL
from service.api.docs import docs_assets, docs_router
from service.api.runtime import Runtime
from service.api.schemas import ErrorResponse
from service.api.uploads import CANDIDATE_BYTES, body_limit, is_json
from service.errors import FaceServiceError, ImageTooLarge, JsonBodyTooLarge, RequestTimeout
from service.metrics import Metrics, MetricsMiddleware
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


def _drop_locals(exc: BaseException) -> None:
    """Clear the finished frames of an answered error's traceback. They hold the request's locals -- its bodies
    and decoded images, hundreds of MB for a large /enroll -- and the exception can sit in a reference cycle
    until the cyclic collector runs: measured, an /enroll refused after reading ten 20 MiB images kept 200 MB
    until the next such request, which then needed its own on top."""
    traceback.clear_frames(exc.__traceback__)


async def _domain_error(request: Request, exc: FaceServiceError) -> JSONResponse:
    _drop_locals(exc)
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
    _drop_locals(exc)
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
    if "GET" in allowed and "HEAD" not in allowed:  # HeadMiddleware answers HEAD wherever GET is
        allowed.insert(allowed.index("GET") + 1, "HEAD")
    return ", ".join(allowed)


async def _client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
    """The client closed the connection before sending its whole body: nothing went wrong here, and nobody is
    left to answer. Logged at info; the status, 499 (nginx's "client closed request"), is what /metrics counts.
    """
    _drop_locals(exc)
    log.info("%s %s: the client disconnected before its request body was complete", request.method,
             request.url.path)
    return error_response(499, "client_closed_request", "the client closed the connection")


class HeadMiddleware:
    """HEAD is answered wherever GET is (RFC 9110 asks it of every GET resource; load balancers and uptime
    checkers send it): the request runs as GET and the response keeps its headers but sends no body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        scope["method"] = "GET"  # in place: the router records the route in this scope, which metrics read
        try:
            await self.app(scope, receive, send_headers_only)
        finally:
            scope["method"] = "HEAD"


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error")


class BodyLimitMiddleware:
    """Refuse a request body over its path's limit with 413 image_too_large, reading no more than the limit;
    and hold image requests' bodies against a budget of bytes in flight before reading them.

    A declared Content-Length over the limit is refused before a byte is read; a chunked body is counted as it
    streams and refused (ImageTooLarge raised into the reader) as soon as it crosses the limit.

    The pixel budget (service/admission.py) bounds decoded images, but a body is read, parsed and base64-decoded
    before any header can be probed: ten 20 MiB base64 images in one JSON /enroll took 0.8 GB, kept, and two at
    once twice that. So an image request first reserves its declared Content-Length (its path's whole limit when
    chunked) from `budget`, waiting first come, first served, or 503 `busy` after the queue timeout.

    A JSON body is parsed whole, in memory, at about twice its size, so image paths take at most `json_limit` of
    it (413 `json_body_too_large`, which names multipart/form-data, whose parts spool to disk): that same /enroll
    as JSON raised the peak RSS by 535 MiB and took 11 s to be refused; now it is refused before it is read.
    """

    def __init__(
        self,
        app: ASGIApp,
        limits: dict[str, int],
        default_limit: int,
        budget: PixelBudget | None = None,
        body_timeout_s: float = 60.0,
        json_limit: int | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.default_limit = default_limit
        self.json_limit = json_limit
        self.budget = budget
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].rstrip("/") or "/"
        limit = self.limits.get(path, self.default_limit)
        too_large = _too_large
        content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
        if path in self.limits and self.json_limit is not None and self.json_limit < limit and is_json(
            content_type.decode("latin-1")
        ):
            limit, too_large = self.json_limit, _json_too_large
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            error = too_large(limit)
            response = error_response(error.status, error.code, error.message, error.details)
            response.headers["Connection"] = "close"  # the unread body makes the connection unusable
            await response(scope, receive, send)
            return
        if self.budget is None or path not in self.limits:
            await self._limited(scope, receive, send, limit, too_large)
            return
        size = int(declared) if declared is not None and declared.isdigit() else limit
        admitted = False
        try:
            async with self.budget.reserve(size):
                admitted = True
                await self._limited(scope, receive, send, limit, too_large)
        except Busy as busy:
            if admitted:  # not ours: the app's own (handled inside it, so not expected here)
                raise
            response = error_response(busy.status, busy.code, busy.message, busy.details, busy.headers)
            response.headers["Connection"] = "close"
            await response(scope, receive, send)

    async def _limited(
        self, scope: Scope, receive: Receive, send: Send, limit: int, too_large: Callable[[int], ImageTooLarge]
    ) -> None:
        received = 0
        body_done = False
        cut_off = False  # the body was refused part-way: the rest of it is never read
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def limited_receive() -> Message:
            nonlocal received, body_done, cut_off
            if body_done:  # later receives wait for a disconnect, which may take any time
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except (TimeoutError, asyncio.TimeoutError):
                cut_off = True
                raise RequestTimeout(
                    f"the request body did not arrive within {self.body_timeout_s:g} s",
                    details={"received_bytes": received},
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    cut_off = True
                    raise too_large(limit)
            return message

        async def closing_send(message: Message) -> None:
            # After a body refused part-way, the connection cannot carry another request, and uvicorn would keep
            # it (and go on reading the body it will never use) until its keep-alive timeout: close it instead.
            if cut_off and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, limited_receive, closing_send)


def _too_large(limit: int) -> ImageTooLarge:
    return ImageTooLarge(f"request body is larger than {limit} bytes", details={"max_body_bytes": limit})


def _json_too_large(limit: int) -> ImageTooLarge:
    return JsonBodyTooLarge(
        f"a JSON body is limited to {limit} bytes, since base64 images in JSON are parsed in memory; send large "
        "or many images as multipart/form-data file parts, which go to disk as they arrive",
        details={"max_body_bytes": limit, "use": "multipart/form-data"},
    )


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
        # No 307 from /detect/ to /detect: Starlette builds that Location from the Host header, so any client
        # could make the server redirect to a host of its choosing. A trailing slash is a 404 like any typo.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.runtime = None
    app.state.streams_open = 0

    app.include_router(system.router)
    app.include_router(faces.router)
    app.include_router(gallery.router)
    app.include_router(stream.router)
    app.include_router(docs_router(app, public=settings.public_docs))
    # Swagger UI's and ReDoc's scripts: the same public bytes for everyone (service.api.docs).
    app.mount(DOCS_ASSETS_URL, docs_assets(), name="docs-assets")
    # The live demo page and its script and stylesheet (service.api.demo): public, like the docs' assets.
    app.include_router(demo.router)
    app.mount(demo.ASSETS_URL, demo.demo_assets(), name="demo-assets")
    if not settings.api_keys:
        _describe_an_open_api(app)

    app.add_exception_handler(FaceServiceError, _domain_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unhandled)

    one = body_limit(settings.max_image_bytes, 1)
    limits = {
        "/detect": one,
        # Client-held candidates come on top of the image: CANDIDATE_BYTES each holds a base64 embedding of up
        # to 512 dimensions with its id (a JSON list of numbers is about three times larger).
        "/identify": one + settings.max_candidates * CANDIDATE_BYTES,
        "/verify": body_limit(settings.max_image_bytes, 2),
        "/enroll": body_limit(settings.max_image_bytes, settings.max_enroll_images),
        "/embed": body_limit(settings.max_image_bytes, settings.max_enroll_images),
    }
    # Added last = outermost: metrics see every request, including those the body limit refuses.
    # (`or`: Settings.model_construct(), which skips validators, leaves the default unset)
    body_bytes = settings.max_body_bytes_in_flight or 6 * settings.max_image_bytes
    app.state.body_budget = PixelBudget(body_bytes, settings.queue_timeout_s)
    app.add_middleware(HeadMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        limits=limits,
        default_limit=SMALL_BODY_BYTES,
        budget=app.state.body_budget,
        body_timeout_s=settings.body_timeout_s,
        json_limit=settings.max_json_body_bytes,
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, static_paths=frozenset(limits))
    return app
