"""Domain errors, raised below the HTTP layer and mapped to one JSON error shape in one handler.

Each error carries a stable machine-readable `code` (clients switch on it) and the HTTP status it maps to.
"""

from __future__ import annotations

from typing import ClassVar


class FaceServiceError(Exception):
    code = "error"
    status = 400

    def __init__(self, message: str, *, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidImage(FaceServiceError):
    """Bytes that are not a decodable image (random bytes, truncated files)."""
    code = "invalid_image"
    status = 400


class UnsupportedMediaType(FaceServiceError):
    """A recognisable file that is not an image format we accept."""
    code = "unsupported_media_type"
    status = 415


class ImageTooLarge(FaceServiceError):
    """Too many bytes, or too many pixels (decompression bombs), refused before decoding."""
    code = "image_too_large"
    status = 413


class JsonBodyTooLarge(ImageTooLarge):
    """A JSON body over FACE_MAX_JSON_BODY_BYTES: the same images fit as multipart/form-data, which streams them to
    disk, while base64 in JSON is parsed whole in memory. A code of its own, since the remedy is another encoding."""
    code = "json_body_too_large"
    status = 413


class RequestTimeout(FaceServiceError):
    """The client did not send its whole body within FACE_BODY_TIMEOUT_S."""
    code = "request_timeout"
    status = 408


class NoFace(FaceServiceError):
    code = "no_face"
    status = 422


class TooManyFaces(FaceServiceError):
    code = "too_many_faces"
    status = 422


class PoorFace(FaceServiceError):
    """An enrolment face below one of the quality minimums (service/quality.py, FACE_ENROLL_* settings): stored,
    it would match strangers or miss the person. Each subclass names the signal."""
    status = 422


class SmallFace(PoorFace):
    code = "small_face"


class ExtremePose(PoorFace):
    code = "extreme_pose"


class LowSharpness(PoorFace):
    code = "low_sharpness"


class LowBrightness(PoorFace):
    code = "low_brightness"


class HighBrightness(PoorFace):
    code = "high_brightness"


class LowQuality(PoorFace):
    code = "low_quality"


class InvalidParameter(FaceServiceError):
    code = "invalid_parameter"
    status = 422


class NotFound(FaceServiceError):
    code = "not_found"
    status = 404


class Conflict(FaceServiceError):
    code = "conflict"
    status = 409


class ModelError(FaceServiceError):
    """A model file is missing, unreadable, or its metadata breaks docs/model-contract.md."""
    code = "model_error"
    status = 500


class ModelMismatch(FaceServiceError):
    """Embeddings made by another model: they are never compared with the loaded embedder's."""
    code = "model_mismatch"
    status = 409


class Unavailable(FaceServiceError):
    """The gallery's database cannot be reached right now (PostgreSQL down, restarting, or too slow to answer
    within FACE_GALLERY_TIMEOUT_S). Nothing was changed; the same request can be retried."""
    code = "not_ready"
    status = 503
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}
