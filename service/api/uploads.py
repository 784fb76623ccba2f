"""Reading images and options out of a request: multipart uploads or a JSON body with base64 images.

Every image endpoint accepts both on the same path:
- `multipart/form-data`: image fields are file parts, options are text fields (`metadata` as a JSON string);
- `application/json`: image fields are base64 strings (a `data:image/...;base64,` prefix is allowed, and
  `images` is a list of them), options are JSON values.
Options may also come as query parameters; a body field wins over a query parameter of the same name.
URLs are never fetched.

The size of a whole request body is bounded before it is read (service.app.BodyLimitMiddleware, with limits
from `body_limit`, and FACE_MAX_JSON_BODY_BYTES for JSON), so an oversized upload costs the server a header check,
not the upload.

What each encoding holds in memory: a JSON body is parsed whole (about twice its size, hence its own, smaller
cap), and its decoded images stay in memory until the response. Multipart file parts are spooled by Starlette
(in memory up to 1 MiB, on disk beyond) and stay there: an image's bytes are read when a handler probes or decodes
it, and dropped after, so an /enroll of ten 20 MiB images holds one of them at a time, not 200 MiB. The spooled
files are closed when the handler's `async with read_request(...)` block ends.

Why JSON is capped rather than parsed as a stream: with ijson 3.6, measured, the C backend changes what the text
means (a lone-surrogate escape becomes "?", which would slip past the 422 on such metadata) and took 4.7 s for one
27 MB base64 string; the Python backend keeps the meaning but took 0.8 s for that string at 64 KiB reads, where
json.loads takes 0.03 s. Multipart already streams, so large uploads have a way in that costs no memory.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, Generic, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ImageTooLarge, InvalidImage, InvalidParameter, UnsupportedMediaType

Options = TypeVar("Options", bound=BaseModel)

# Text fields are options and small JSON; 64 KiB leaves room for metadata (itself capped at 16 KiB).
MAX_TEXT_FIELD_BYTES = 64 * 1024
# One client-held /identify candidate: a base64 embedding of up to 512 float32 (2,732 characters), its id and
# JSON punctuation.
CANDIDATE_BYTES = 4096
# Multipart framing, text fields and headers on top of the images themselves.
BODY_OVERHEAD_BYTES = 256 * 1024


@dataclass(frozen=True)
class ImageUpload:
    """One uploaded image, still encoded, with enough of a name to point at it in an error: its bytes (a JSON
    image), or the spooled file that holds them (a multipart part), read again on each `data`."""

    field: str
    index: int
    filename: str | None
    source: bytes | BinaryIO

    @property
    def data(self) -> bytes:
        if isinstance(self.source, bytes):
            return self.source
        self.source.seek(0)
        return self.source.read()

    def describe(self) -> dict[str, Any]:
        where: dict[str, Any] = {"field": self.field, "image_index": self.index}
        if self.filename:
            where["filename"] = self.filename
        return where


@dataclass(frozen=True)
class ParsedRequest(Generic[Options]):
    images: dict[str, list[ImageUpload]]
    options: Options

    def one(self, field: str) -> ImageUpload | None:
        found = self.images.get(field) or []
        return found[0] if found else None


def base64_limit(max_bytes: int) -> int:
    """Characters of base64 that can encode at most `max_bytes` bytes."""
    return 4 * math.ceil(max_bytes / 3)


def body_limit(max_image_bytes: int, images: int) -> int:
    """Largest request body for `images` images: base64 in JSON is 4/3 of the bytes, multipart less."""
    return images * base64_limit(max_image_bytes) + BODY_OVERHEAD_BYTES


def _decode_base64(text: Any, field: str, index: int, max_bytes: int) -> ImageUpload:
    if not isinstance(text, str):
        raise InvalidParameter(
            f"{field} must be a base64 string", details={"field": field, "image_index": index}
        )
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise InvalidImage(f"{field} is a data URL without base64", details={"field": field})
    text = "".join(text.split())  # tolerate line-wrapped base64
    if len(text) > base64_limit(max_bytes):
        raise ImageTooLarge(
            f"{field} is larger than {max_bytes} bytes",
            details={"field": field, "image_index": index, "max_bytes": max_bytes},
        )
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(
            f"{field} is not valid base64", details={"field": field, "image_index": index}
        ) from None
    return ImageUpload(field, index, None, data)


def _spooled_upload(upload: UploadFile, field: str, index: int, max_bytes: int) -> ImageUpload:
    """The part's spooled file, not its bytes: they are read when the image is looked at (one at a time)."""
    size = upload.size if upload.size is not None else upload.file.seek(0, os.SEEK_END)
    if size > max_bytes:
        raise ImageTooLarge(
            f"{field} is larger than {max_bytes} bytes",
            details={"field": field, "image_index": index, "filename": upload.filename, "max_bytes": max_bytes},
        )
    return ImageUpload(field, index, upload.filename, upload.file)


async def _read_json(request: Request) -> Any:
    """The JSON body, parsed from a buffer this function owns and drops. Request.json() would keep the raw
    bytes and the parsed document referenced by the request until its response is sent, through inference:
    for a 270 MB /enroll body that is twice its size held for seconds, on top of the decoded images."""
    buffer = bytearray()
    async for chunk in request.stream():
        buffer += chunk
    try:
        text = buffer.decode("utf-8")
        del buffer[:]  # one copy at a time: the bytes go before the parse makes its objects
        # Off the event loop: a 32 MiB body parses for a good part of a second, and every other request
        # (health checks included) would wait for it.
        return await asyncio.to_thread(json.loads, text)
    except RecursionError:
        # The C parser recurses once per level: `[[[[...` a few thousand deep exhausts the stack limit.
        raise InvalidParameter("the JSON body is nested too deeply") from None
    except ValueError as exc:
        # JSONDecodeError and UnicodeDecodeError are ValueErrors, and so is the refusal to convert an
        # integer of more than sys.get_int_max_str_digits() digits (a quadratic-time guard of Python's).
        raise InvalidParameter(f"the JSON body does not parse: {exc}") from None


def is_json(content_type: str) -> bool:
    """`application/json` or a `+json` type, parameters (`; charset=utf-8`) and case aside."""
    media_type = content_type.split(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


@asynccontextmanager
async def read_request(
    request: Request,
    options_model: type[Options],
    *,
    images: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
    list_field: str | None = None,
    max_images: int = 1,
    max_image_bytes: int,
    repeatable: tuple[str, ...] = (),
) -> AsyncIterator[ParsedRequest[Options]]:
    """Parse the body (multipart or JSON) and query into images and validated options, for the `async with`
    block (multipart images are read from their spooled files until it ends).

    `images` names single-image fields, `list_field` one field that may repeat (up to `max_images`),
    `required` those that must be present. A text option given twice (form fields, query parameters) is 422,
    except those in `repeatable`, whose values are collected into a list. Options are validated against
    `options_model`; failures raise RequestValidationError, which the app maps to 422 invalid_parameter.
    """
    image_fields = set(images) | ({list_field} if list_field else set())
    found: dict[str, list[ImageUpload]] = {}
    raw: dict[str, Any] = {}

    def option(key: str, value: Any) -> None:
        # A repeated option would otherwise keep only its last value: an embedding silently dropped.
        if key in repeatable:
            raw.setdefault(key, []).append(value)
        elif key in raw:
            raise InvalidParameter(f"{key} given more than once", details={"field": key})
        else:
            raw[key] = value

    for key, value in request.query_params.multi_items():
        option(key, value)
    from_query = set(raw)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()

    form = None
    try:
        if content_type == "multipart/form-data":
            form = await _read_form(request, max_files=max_images + len(images) + 1)
            for key, value in form.multi_items():
                if key in image_fields:
                    if not isinstance(value, UploadFile):
                        raise InvalidParameter(
                            f"{key} must be a file part (send base64 only in a JSON body)", details={"field": key}
                        )
                    index = len(found.get(key, []))
                    if key != list_field and index >= 1:
                        raise InvalidParameter(f"{key} given more than once", details={"field": key})
                    found.setdefault(key, []).append(_spooled_upload(value, key, index, max_image_bytes))
                elif isinstance(value, UploadFile):
                    raise InvalidParameter(f"unexpected file field {key!r}", details={"field": key})
                else:
                    if key in from_query:  # a body field wins over a query parameter of the same name
                        from_query.discard(key)
                        del raw[key]
                    option(key, value)
        elif is_json(content_type):
            _read_json_fields(await _read_json(request), image_fields, list_field, max_images, max_image_bytes,
                              found, raw)
        elif image_fields or request.headers.get("content-length", "0") not in ("", "0"):
            raise UnsupportedMediaType(
                f"send multipart/form-data or application/json, not {content_type or 'no content type'}",
                details={"content_type": content_type or None},
            )

        for key in required:
            if not found.get(key):
                raise InvalidParameter(f"{key} is required", details={"field": key})
        if list_field and len(found.get(list_field, [])) > max_images:
            raise InvalidParameter(
                f"at most {max_images} images per request",
                details={"field": list_field, "max_images": max_images},
            )
        try:
            if _small(raw):  # the usual few scalar options: a thread hop would cost more than validating them
                options = options_model.model_validate(raw)
            else:  # off the event loop: a long candidate list takes a while to validate
                options = await asyncio.to_thread(options_model.model_validate, raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None
        yield ParsedRequest(found, options)
    finally:
        if form is not None:
            await form.close()  # spooled temporary files go now, not at garbage collection


def _small(raw: dict[str, Any]) -> bool:
    """Options that validate in microseconds: a few scalars, no lists or objects, no long strings."""
    return len(raw) <= 32 and all(
        value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 4096)
        for value in raw.values()
    )


async def _read_form(request: Request, max_files: int) -> FormData:
    try:
        return await request.form(max_files=max_files, max_fields=32, max_part_size=MAX_TEXT_FIELD_BYTES)
    except StarletteHTTPException as exc:  # Starlette's MultiPartException, surfaced as a 400
        raise InvalidParameter(f"malformed multipart body: {exc.detail}") from None


def _read_json_fields(
    body: Any,
    image_fields: set[str],
    list_field: str | None,
    max_images: int,
    max_image_bytes: int,
    found: dict[str, list[ImageUpload]],
    raw: dict[str, Any],
) -> None:
    """Sort a parsed JSON body into decoded images (`found`) and options (`raw`)."""
    if not isinstance(body, dict):
        raise InvalidParameter("the JSON body must be an object")
    for key in list(body):
        value = body.pop(key)  # each base64 string is dropped as soon as it is decoded
        if key in image_fields:
            items = value if key == list_field and isinstance(value, list) else [value]
            del value
            if len(items) > max_images:  # refuse before decoding any of them
                raise InvalidParameter(
                    f"at most {max_images} images per request", details={"field": key, "max_images": max_images}
                )
            decoded = []
            for i in range(len(items)):
                decoded.append(_decode_base64(items[i], key, i, max_image_bytes))
                items[i] = None
            found[key] = decoded
        else:
            raw[key] = value


def openapi_body(
    options_model: type[BaseModel],
    *,
    images: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
    list_field: str | None = None,
    exactly_one_of: tuple[str, ...] = (),
    description: str = "",
) -> dict[str, Any]:
    """`openapi_extra` documenting the two body encodings read_request accepts, built from the options model.

    The handlers read the body themselves (to accept both encodings on one path), so FastAPI cannot infer
    this part of the schema; it is derived here from the same pydantic model that validates the options.
    """
    schema = options_model.model_json_schema()
    options = schema.get("properties", {})
    needed = [*required, *schema.get("required", [])]
    # A form field is text: options that are JSON objects (metadata, quality_minimums) or lists of them
    # (candidates) travel as their JSON.
    json_text = {"metadata", "quality_minimums", "candidates"}
    form_options = {
        name: ({"type": "string", "description": prop.get("description", "") + " (as a JSON string)."}
               if name in json_text else prop)
        for name, prop in options.items()
    }

    def image_props(encoding: dict[str, str]) -> dict[str, Any]:
        props: dict[str, Any] = {name: {**encoding} for name in images}
        if list_field:
            props[list_field] = {"type": "array", "items": {**encoding}, "minItems": 1}
        return props

    # What the handlers refuse, the document says: an empty image, a field it does not name (options models
    # forbid extras), both or neither of two alternatives (/verify: image2 or identity_id).
    binary = {"type": "string", "format": "binary", "minLength": 1,
              "description": "An image file (JPEG, PNG, WebP, BMP)."}
    base64_ = {"type": "string", "format": "byte", "minLength": 4,
               "description": "Base64 of an image file (data: URL allowed)."}

    def body_schema(properties: dict[str, Any]) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "object", "properties": properties, "required": needed, "additionalProperties": False,
        }
        if exactly_one_of:
            schema["oneOf"] = [{"required": [name]} for name in exactly_one_of]
        return schema

    content: dict[str, Any] = {
        "multipart/form-data": {"schema": body_schema({**image_props(binary), **form_options})},
        "application/json": {"schema": body_schema({**image_props(base64_), **options})},
    }
    if "$defs" in schema:  # nested models (Candidate in /identify's candidates): inlined where they are used
        content = _inline_refs(content, schema["$defs"])
    body: dict[str, Any] = {"required": True, "content": content}
    if description:
        body["description"] = description
    return {"requestBody": body}


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """Replace pydantic's `{"$ref": "#/$defs/Name"}` with the definition itself. Left as references they point at
    a `$defs` the OpenAPI document does not have at its root (it keeps definitions under components/schemas),
    which ReDoc refuses outright ("Invalid reference token: $defs", a blank /redoc). The models nest one level
    and never recursively, so inlining terminates."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {key: _inline_refs(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline_refs(value, defs) for value in node]
    return node
