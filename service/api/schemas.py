"""Pydantic models for every request option and every response: the OpenAPI document is built from these.

Coordinates are pixels of the image as decoded (see service/images.py for EXIF orientation),
x to the right and y down; a box is [x1, y1, x2, y2]; landmarks are five [x, y] points in the order left eye,
right eye (viewer's side), nose tip, left mouth corner, right mouth corner.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, field_validator

from service.gallery import (
    IDENTITY_ID_PATTERN,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    SQLITE_MAX_INTEGER,
    json_depth_exceeds,
    text_problem,
)

IdentityId = Annotated[
    str,
    StringConstraints(pattern=IDENTITY_ID_PATTERN.pattern),
    Field(
        description="Client-chosen identity key: 1-128 characters of letters, digits, '_', '.', '-', "
        "starting with a letter or digit.",
        examples=["alice.smith"],
    ),
]


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
ModelSha256 = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9a-f]{64}$"),
    Field(description="The model id of the embedder that made the embedding(s), as /embed and /models report it."),
]
# An embedding a client sends back: what /embed returned, in either of its formats. Its size, finiteness and unit
# length are checked against the loaded embedder (service.vectors.parse_embedding): 422 when wrong.
# Bounds checked while parsing, before anything else: a request cannot make the server validate millions of
# numbers only to refuse them. 4,096 dimensions is more than any face embedder has (ArcFace's are 512).
MAX_EMBEDDING_SIZE = 4096
MAX_CANDIDATES = 100_000
EmbeddingIn = Annotated[
    # Strict: true/false and "1" are not numbers here (lax parsing would turn them into 1.0).
    Annotated[list[Annotated[float, Strict()]], Field(max_length=MAX_EMBEDDING_SIZE)]
    | Annotated[str, Field(max_length=4 * math.ceil(4 * MAX_EMBEDDING_SIZE / 3) + 64 * 1024)],
    Field(
        description="An L2-normalised embedding: a JSON list of numbers, or base64 of its little-endian float32 "
        "bytes (what /embed returns with format=base64). In a multipart form, a JSON list as text or base64."
    ),
]


def _json_text(value: Any, what: str) -> Any:
    """Multipart form fields are text: a list or object sent there arrives as its JSON. Every failure is a
    ValueError (pydantic's 422)."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            raise ValueError(f"{what} is not valid JSON") from None
    return value


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. no_face, invalid_image, not_found.")
    message: str = Field(description="What went wrong, for humans.")
    details: dict[str, Any] = Field(default_factory=dict, description="Structured context, e.g. which image.")


class ErrorResponse(BaseModel):
    error: ErrorBody


# --------------------------------------------------------------------------------------------------
# Request options (multipart form fields, JSON body fields, or query parameters)
# --------------------------------------------------------------------------------------------------
class _Options(BaseModel):
    # Unknown fields are refused: a typo (`topk`) must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid")


class DetectionOptions(_Options):
    min_score: float | None = Field(
        None, gt=0.0, le=1.0, description="Minimum face probability; default: FACE_DETECTION_SCORE_THRESHOLD, else the detector's own."
    )
    min_face_size: float = Field(
        0, ge=0, le=100_000, description="Drop faces whose box is smaller than this (pixels, shorter side)."
    )


class DetectOptions(DetectionOptions):
    max_faces: int | None = Field(
        None,
        ge=1,
        description="Return at most this many faces (best scores first); never more than the server's "
        "FACE_MAX_FACES (100 unless configured), whatever is asked.",
    )
    quality: bool = Field(False, description="Add each face's quality signals and score (`quality`).")


class VerifyOptions(DetectionOptions):
    identity_id: IdentityId | None = Field(
        None, description="Compare image1 with this enrolled identity instead of with image2."
    )
    embedding2: EmbeddingIn | None = Field(
        None,
        description="Compare image1 with this embedding (kept by the client, from /embed) instead of with image2; "
        "needs model_sha256. Nothing is stored.",
    )
    model_sha256: ModelSha256 | None = Field(
        None, description="With embedding2: the model id /embed reported; another model's embedding is 409."
    )
    face1: int | None = Field(
        None, ge=0, description="Index of the face to use in image1, in /detect order; default: the largest."
    )
    face2: int | None = Field(
        None, ge=0, description="Index of the face to use in image2, in /detect order; default: the largest."
    )
    threshold: float | None = Field(
        None, ge=-1.0, le=1.0, description="Override the match threshold (cosine similarity)."
    )


class QualityMinimums(BaseModel):
    """Minimums for one enrolment in place of the server's (FACE_ENROLL_*); those not given keep their setting."""

    model_config = ConfigDict(extra="forbid")
    face_size: float | None = Field(None, ge=0, description="Least inter-ocular distance, pixels.")
    max_yaw: float | None = Field(None, ge=0, le=180, description="Most head turn, degrees.")
    max_pitch: float | None = Field(None, ge=0, le=180, description="Most head tilt, degrees.")
    sharpness: float | None = Field(None, ge=0, description="Least sharpness.")
    brightness: float | None = Field(None, ge=0, le=255, description="Least mean grey level.")
    max_brightness: float | None = Field(None, ge=0, le=255, description="Most mean grey level.")
    quality: float | None = Field(None, ge=0, le=1, description="Least quality score.")


class Candidate(BaseModel):
    """An identity the client holds, to search instead of the gallery."""

    model_config = ConfigDict(extra="forbid")
    id: IdentityId
    embedding: EmbeddingIn
    display_name: str | None = Field(None, max_length=256)


class IdentifyOptions(DetectOptions):
    top_k: int = Field(5, ge=1, le=100, description="Most identities returned per face.")
    threshold: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="Override the threshold the FPIR policy would choose for this gallery (cosine similarity).",
    )
    candidates: list[Candidate] | None = Field(
        None,
        min_length=1,
        max_length=MAX_CANDIDATES,
        description="Search these client-held identities (one embedding each, from /embed) instead of the "
        "gallery; needs model_sha256. The threshold follows their number like the gallery's. Nothing is stored. "
        "At most FACE_MAX_CANDIDATES.",
    )
    model_sha256: ModelSha256 | None = Field(None, description="With candidates: the model id /embed reported.")

    @field_validator("candidates", mode="before")
    @classmethod
    def _candidates_text(cls, value):
        return _json_text(value, "candidates")


class EnrollOptions(DetectionOptions):
    identity_id: IdentityId
    embeddings: list[EmbeddingIn] | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="Enrol these embeddings (from /embed, or exported from another instance of the same model) "
        "instead of images; needs model_sha256.",
    )
    model_sha256: ModelSha256 | None = Field(None, description="With embeddings: the model id that made them.")
    display_name: str | None = Field(None, max_length=256, description="Human-readable name.")
    metadata: dict[str, Any] | None = Field(
        None,
        description=f"Free-form JSON object stored with the identity (at most {MAX_METADATA_BYTES} bytes as "
        f"compact JSON, {MAX_METADATA_DEPTH} levels deep)",
    )
    check_quality: bool = Field(
        True,
        description="Refuse faces below the quality minimums (FACE_ENROLL_MIN_*, FACE_ENROLL_MAX_*). false: "
        "enrol them anyway, e.g. when the photo is the best there is; their signals are stored with the face.",
    )
    quality_minimums: QualityMinimums | None = Field(
        None,
        description="Other minimums for this enrolment only, e.g. {\"face_size\": 20} for a small face that is the "
        "best photo there is (a JSON object; a JSON string in multipart); those not given keep their setting.",
    )

    @field_validator("quality_minimums", mode="before")
    @classmethod
    def _minimums_text(cls, value):
        return _json_text(value, "quality_minimums")
    multiple_faces: Literal["reject", "largest"] = Field(
        "reject",
        description="What to do with an image holding several faces: `reject` it (default: enrolling a "
        "bystander would poison the identity) or enrol its `largest` face.",
    )

    @field_validator("embeddings", mode="before")
    @classmethod
    def _embeddings_text(cls, value):
        # A JSON body sends a list of embeddings. Form fields and query parameters send text, one field each
        # (repeatable): base64, one embedding as a JSON list, or several as a JSON list of lists or of strings.
        if not isinstance(value, (list, str)):
            return value
        out = []
        for item in [value] if isinstance(value, str) else value:
            if isinstance(item, str):
                parsed = _json_text(item, "embeddings")
                if isinstance(parsed, list) and parsed and all(isinstance(x, (list, str)) for x in parsed):
                    out.extend(parsed)
                    continue
                item = parsed
            out.append(item)
        return out

    @field_validator("display_name")
    @classmethod
    def _servable_name(cls, value):
        if value is not None and (problem := text_problem(value)):
            raise ValueError(f"display_name holds {problem}")
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _parse_json(cls, value):
        # Every failure here must be a ValueError, which pydantic turns into a 422; anything else (the
        # RecursionError of `[[[[...`) would escape validation as a 500.
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                value = json.loads(value)
            except RecursionError:
                raise ValueError("metadata is nested too deeply") from None
            except ValueError as exc:  # JSONDecodeError, or an integer of more digits than Python converts
                raise ValueError(f"metadata is not valid JSON: {getattr(exc, 'msg', exc)}") from None
        if value is None:
            return None
        if not isinstance(value, dict):
            # ValueError, not TypeError: pydantic turns only ValueError/AssertionError into a 422.
            raise ValueError("metadata must be a JSON object")  # noqa: TRY004
        # Depth first: the size check below encodes the value, recursively.
        if json_depth_exceeds(value, MAX_METADATA_DEPTH):
            raise ValueError(f"metadata nests deeper than {MAX_METADATA_DEPTH} levels")
        if problem := text_problem(value):  # keys too: stored, it would break every read of the identity
            raise ValueError(f"metadata holds {problem}")
        # The gallery's own encoding (compact, no NaN), so that what passes here is what it stores.
        try:
            text = json.dumps(value, allow_nan=False, separators=(",", ":"))
        except ValueError:  # a JSON body may carry NaN or Infinity, which Python's parser accepts
            raise ValueError("metadata holds NaN or Infinity, which are not JSON") from None
        if len(text.encode()) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata must stay within {MAX_METADATA_BYTES} bytes of JSON")
        return value


class PageOptions(_Options):
    offset: int = Field(0, ge=0, le=SQLITE_MAX_INTEGER, description="Items to skip.")
    limit: int = Field(50, ge=1, le=1000, description="Most items returned.")


# --------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------
Point = Annotated[list[float], Field(min_length=2, max_length=2)]


class ImageInfo(BaseModel):
    width: int
    height: int


class QualityOut(BaseModel):
    """How usable a face is for recognition (service/quality.py; README "Face quality")."""

    quality: float = Field(description="0..1: the cosine similarity two photos of this quality are expected to "
                           "reach for the same person; near or below the match threshold, the person may be missed.")
    face_size: float = Field(description="Inter-ocular distance in image pixels.")
    detector_score: float
    yaw: float | None = Field(description="Head turn in degrees, positive towards the viewer's left; 0 is frontal.")
    pitch: float | None = Field(description="Head tilt in degrees, positive looking down.")
    roll: float | None = Field(description="In-plane lean in degrees, positive clockwise.")
    sharpness: float = Field(description="Variance of the Laplacian of the aligned face (grey levels squared).")
    brightness: float = Field(description="Mean grey level of the aligned face, 0..255.")
    contrast: float = Field(description="Standard deviation of the aligned face's grey levels.")
    embedding_norm: float = Field(description="Length of the face's embedding before normalisation: longer for "
                                  "more recognisable faces (margin-trained embedders).")


class FaceOut(BaseModel):
    box: list[float] = Field(
        min_length=4,
        max_length=4,
        description="[x1, y1, x2, y2] in image pixels; a face cut by the image edge may reach past it.",
    )
    score: float = Field(description="Face probability from the detector, 0..1.")
    landmarks: list[Point] = Field(min_length=5, max_length=5, description="Five [x, y] points in image pixels.")
    quality: QualityOut | None = Field(None, description="With `quality=true`: signals and score.")


def face_out(face) -> FaceOut:
    """A pipeline Face (numpy arrays) as its public shape; pixels to 0.01 px, scores to 1e-5."""
    return FaceOut(
        box=[round(float(v), 2) for v in face.box],
        score=round(float(face.score), 5),
        landmarks=[[round(float(x), 2), round(float(y), 2)] for x, y in face.landmarks],
        quality=None if face.quality is None else QualityOut(**face.quality.as_dict()),
    )


class DetectResponse(BaseModel):
    image: ImageInfo
    faces: list[FaceOut] = Field(description="Faces, best score first.")


class EmbedOptions(DetectOptions):
    faces: Literal["largest", "all"] = Field(
        "largest", description="Embed each image's `largest` face (the subject of a portrait), or `all` its faces."
    )
    format: Literal["json", "base64"] = Field(
        "json", description="Embeddings as JSON lists of numbers, or as base64 of little-endian float32."
    )


class EmbeddedFace(FaceOut):
    embedding: list[float] | str = Field(
        description="The L2-normalised embedding (embedding_size values), as `format` says."
    )


class EmbeddedImage(BaseModel):
    index: int = Field(description="Which uploaded image (0-based, in `images` order).")
    filename: str | None = None
    image: ImageInfo
    faces: list[EmbeddedFace] = Field(description="Embedded faces, best score first; empty when none was found.")


class EmbedResponse(BaseModel):
    model_sha256: str = Field(
        description="The embedder's model id: what the gallery tags faces with, and what embedding2, "
        "candidates and embeddings must come with. Embeddings of different models are not comparable."
    )
    embedding_size: int
    format: Literal["json", "base64"]
    threshold: float = Field(description="The 1:1 match threshold (cosine similarity) of this service.")
    flip: bool = Field(description="Whether each embedding averages the face and its mirror image.")
    images: list[EmbeddedImage]


class VerifiedFace(FaceOut):
    index: int = Field(description="Index of this face among the image's faces, in /detect order.")
    faces_found: int = Field(description="How many faces the image holds.")


class VerifyResponse(BaseModel):
    match: bool = Field(description="similarity >= threshold.")
    similarity: float = Field(description="Cosine similarity of the two embeddings, -1..1.")
    threshold: float
    face1: VerifiedFace
    face2: VerifiedFace | None = Field(None, description="The face used from image2 (absent with identity_id).")
    identity_id: str | None = Field(None, description="The identity compared against (with identity_id).")


class IdentityMatch(BaseModel):
    identity_id: str
    similarity: float = Field(
        description="Cosine similarity to the identity's template (the normalised mean of its faces)."
    )
    faces: int = Field(description="How many enrolled faces the template averages.")
    display_name: str | None = None


class IdentifiedFace(FaceOut):
    matches: list[IdentityMatch] = Field(
        description="Enrolled identities at or above the threshold, best first; empty: nobody we know."
    )


class IdentifyDecision(BaseModel):
    """How this answer decided who is known: a search compares the face with every enrolled identity, so the
    chance of naming a stranger grows with their number, and the threshold grows with it."""

    threshold: float = Field(description="The cosine similarity a match needed.")
    policy: Literal["fpir", "model", "settings", "request"] = Field(
        description="fpir: set for this gallery size and the target FPIR (FACE_IDENTIFY_FPIR); model: the 1:1 "
        "threshold, the embedder has no FAR table; settings: FACE_IDENTIFY_THRESHOLD; request: the `threshold` "
        "option."
    )
    gallery_identities: int = Field(
        description="Identities searched (those with a face of the loaded embedder, or the candidates sent)."
    )
    searched: Literal["gallery", "candidates"] = Field(
        "gallery", description="What was searched: the enrolled gallery, or the `candidates` the request sent."
    )
    target_fpir: float | None = Field(None, description="The FPIR the policy aims at (policy fpir only).")
    expected_fpir: float | None = Field(
        None,
        description="Predicted chance that a stranger's face is named as someone at this threshold and gallery "
        "size, from the embedder's FAR table; null without a table. Below the target when the 1:1 threshold, "
        "the floor, is the higher one.",
    )
    extrapolated: bool = Field(
        False, description="The prediction rests on the FAR table's fitted tail, beyond the rates it measured."
    )


class IdentifyResponse(BaseModel):
    image: ImageInfo
    threshold: float = Field(description="The threshold used (the same as decision.threshold).")
    decision: IdentifyDecision
    faces: list[IdentifiedFace]


class EnrolledFace(BaseModel):
    face_id: str
    image_index: int | None = Field(None, description="Which uploaded image (0-based) the face came from.")
    embedding_index: int | None = Field(None, description="Which sent embedding (0-based) the face is.")
    filename: str | None = None
    box: list[float] | None = Field(None, min_length=4, max_length=4, description="Absent for an embedding.")
    score: float | None = None
    quality: QualityOut | None = Field(None, description="The face's quality signals (absent for an embedding).")


class EnrollResponse(BaseModel):
    identity_id: str
    display_name: str | None = None
    faces: list[EnrolledFace] = Field(description="The faces stored by this request.")
    face_ids: list[str] = Field(description="Ids of the faces stored by this request.")
    face_count: int = Field(description="Faces the identity now holds (this request's and earlier ones).")


class StoredFace(BaseModel):
    face_id: str
    created_at: datetime
    model_sha256: str = Field(
        description="Id of the embedder that made this face's embedding: the sha256 of its graph (the ONNX file "
        "without its metadata), so a new FAR table or threshold in the file keeps faces comparable."
    )
    current_model: bool = Field(description="Made by the loaded embedder (false: kept, never matched).")
    source: dict[str, Any] | None = Field(None, description="Where the face came from (file name, box).")


class IdentitySummary(BaseModel):
    identity_id: str
    display_name: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    face_count: int = Field(description="Faces matched with the loaded embedder.")
    foreign_face_count: int = Field(0, description="Faces from other embedders, excluded from matching.")
    created_at: datetime


class IdentityDetail(IdentitySummary):
    faces: list[StoredFace]


class IdentityPage(BaseModel):
    items: list[IdentitySummary]
    total: int
    offset: int
    limit: int


class Deleted(BaseModel):
    deleted: bool = True
    identity_id: str
    face_id: str | None = None
    faces_deleted: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    detector: str
    embedder: str
    gallery_faces: int


class ModelInfo(BaseModel):
    file: str
    sha256: str
    kind: str
    arch: str | None = None
    input_size: list[int] | None = None
    metadata: dict[str, str] = Field(description="The model's ONNX metadata_props, as stored.")


class FarTableInfo(BaseModel):
    impostor_pairs: int = Field(description="Different-person comparisons the rates were counted on.")
    measured_to: float = Field(description="Highest threshold whose FAR was counted; above it the tail is fitted.")
    smallest_measured_far: float
    points: int
    rule: str = Field(description="How the table was measured: data, pipeline, counting rule.")
    extrapolation: str = Field(description="How the points beyond measured_to were made.")


class IdentifyPolicyInfo(BaseModel):
    policy: Literal["fpir", "model", "settings"] = Field(
        description="fpir: threshold set by gallery size and target FPIR; model: the 1:1 threshold (no FAR "
        "table); settings: FACE_IDENTIFY_THRESHOLD."
    )
    target_fpir: float | None = None
    fixed_threshold: float | None = None
    floor_threshold: float = Field(description="The 1:1 threshold; the policy never goes below it.")
    far_table: FarTableInfo | None = Field(None, description="Provenance of the embedder's FAR(t) table.")
    warning: str | None = Field(None, description="Set when /identify cannot hold an FPIR (no FAR table).")
    current: IdentifyDecision = Field(description="The decision an /identify would take on the gallery as it is.")


class EmbedderInfo(ModelInfo):
    model_id: str = Field(
        description="What the gallery tags this embedder's faces with: the sha256 of the file without its metadata."
    )
    embedding_size: int
    threshold: float = Field(description="1:1 match threshold in force (FACE_MATCH_THRESHOLD or the model's).")
    threshold_source: Literal["settings", "model"]
    flip: bool
    identify: IdentifyPolicyInfo


class GalleryInfo(BaseModel):
    identities: int
    faces: int = Field(description="Faces made by the loaded embedder: the ones matched against.")
    foreign_faces: int = Field(
        description="Faces made by other embedders: kept but excluded from matching (re-enrol to use them)."
    )


class ModelsResponse(BaseModel):
    detector: ModelInfo
    embedder: EmbedderInfo
    gallery: GalleryInfo


_ERROR_MEANINGS = {
    400: "Not a decodable image (invalid_image).",
    401: "Missing or wrong API key (unauthorized).",
    404: "No such identity or face (not_found).",
    409: "The identity has nothing to compare with (conflict, model_mismatch).",
    413: "Image or request body too large, or too many pixels (image_too_large); a JSON body over its cap "
    "(json_body_too_large: send the images as multipart/form-data).",
    415: "Not a supported image format or body type (unsupported_media_type).",
    422: "Bad parameter (invalid_parameter), no face (no_face), too many faces (too_many_faces), or an enrolment "
    "face below a quality minimum (small_face, extreme_pose, low_sharpness, low_brightness, high_brightness, "
    "low_quality).",
    503: "Models or gallery not loaded (not_ready).",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error statuses an endpoint can return, all in one shape."""
    return {s: {"model": ErrorResponse, "description": _ERROR_MEANINGS[s]} for s in statuses}


# --------------------------------------------------------------------------------------------------
# Video streams (WebSocket /stream): options from the query string, one answer per processed frame
# --------------------------------------------------------------------------------------------------
class StreamOptions(DetectionOptions):
    identify: bool = Field(True, description="Search the gallery for each track; false: detection and tracking only.")
    top_k: int = Field(5, ge=1, le=100, description="Most identities returned per track.")
    threshold: float | None = Field(
        None, ge=-1.0, le=1.0, description="Override the threshold the FPIR policy would choose (cosine similarity)."
    )
    max_faces: int | None = Field(
        None,
        ge=1,
        description="Track at most this many faces per frame (best scores); never more than the server's "
        "FACE_MAX_FACES (100 unless configured).",
    )
    embed_every: int | None = Field(
        None, ge=1, le=10_000, description="Embed a tracked face again after this many processed frames (sooner "
        "when it is clearly larger or sharper); default FACE_STREAM_EMBED_EVERY."
    )


class TrackIdentity(BaseModel):
    """Who a track is: the gallery searched with the mean of its last embeddings."""

    embeddings: int = Field(description="How many of the track's embeddings the decision rests on.")
    threshold: float = Field(description="The threshold the search used.")
    matches: list[IdentityMatch] = Field(description="As /identify's: best first; empty: nobody we know.")


class StreamFace(FaceOut):
    track_id: int = Field(description="The same while the face stays in view.")
    embedded: bool = Field(description="The face was embedded on this frame (a new track, or a re-embedding).")
    identity: TrackIdentity | None = Field(
        None, description="Null before the track's first search, or with identify=false."
    )


class StreamFrame(BaseModel):
    type: Literal["frame"] = "frame"
    frame: int = Field(description="Which received message this answers (1-based, in arrival order).")
    image: ImageInfo
    detector_side: int = Field(
        description="The longer side, in pixels, this frame was searched for faces at: the detector's working size "
        "(or the frame's own, if smaller), or half of it for a coarse frame (while every face in view is large and "
        "embedded; see FACE_STREAM_FULL_DETECTION_EVERY)."
    )
    faces: list[StreamFace]
    dropped: int = Field(description="Frames dropped so far: replaced by a newer one while the stream was busy.")
    rate_limited: int = Field(description="Frames dropped so far for exceeding FACE_STREAM_MAX_FPS.")
    queued_ms: float = Field(description="From the frame's arrival to the start of its processing.")
    process_ms: float = Field(description="Decoding, detection, tracking, embedding and search of this frame.")
