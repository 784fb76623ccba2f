"""The service's configuration: one pydantic-settings class, read from the environment and checked at start-up.

Every setting is an environment variable with the prefix `FACE_` (`FACE_MODELS_DIR`, `FACE_API_KEYS`, ...),
except `HOST` and `PORT`, which are read bare because that is what container platforms set. Nothing reads the
environment at import time: `Settings()` is built by `create_app()` (or passed in by a test).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.template_index import IndexOptions

MB = 1024 * 1024


# Enrolment quality minimums (service/quality.py), from lfw-dev's 2,375 same-person photos (`python -m evaluate
# quality`, measured 2026-12-01): its 1st percentile of each signal (99th for the angles), rounded outwards: face
# size 32.1 px, |yaw| 43.5 deg, |pitch| 32.6 deg, sharpness 41.0, quality 0.568. Brightness is looser than its
# percentiles (77.1 and 180.7): well-lit portraits in ../shared/data/faces reach 191 (a pale face in bright light
# is not overexposed), so the ceiling sits halfway from there to white, and the floor as far below lfw-dev's
# darkest 1 %.
ENROLL_DEFAULTS = {
    "face_size": 30.0, "max_yaw": 45.0, "max_pitch": 35.0, "sharpness": 40.0, "brightness": 60.0,
    "max_brightness": 220.0, "quality": 0.55,
}


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask a container or taskset gives it, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def sqlite_url(path: Path) -> str:
    """sqlite:///relative/path or sqlite:////absolute/path, the spelling SQLAlchemy made familiar."""
    return f"sqlite:///{path}"


def redact_url(url: str) -> str:
    """The URL with its password replaced, for logs."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)


def gallery_store(url: str) -> tuple[str, str]:
    """("sqlite", file path) or ("postgresql", libpq URL); ValueError for anything else."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"{url!r} is not a URL: use sqlite:///path/to/gallery.db or postgresql://host/db")
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise ValueError(
                f"{url!r}: a SQLite URL is sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        return "sqlite", rest[1:]
    if scheme in ("postgresql", "postgres"):
        return "postgresql", url
    raise ValueError(f"unsupported gallery store {scheme!r}: use sqlite:// or postgresql://")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FACE_", extra="ignore", populate_by_name=True, validate_default=True
    )

    # --- models -------------------------------------------------------------------------------------
    models_dir: Path = Field(Path("artifacts/models"), description="Folder holding the ONNX models.")
    detector_model: str = Field(
        "retinaface_mnet025.onnx", description="Detector file, relative to models_dir (or an absolute path)."
    )
    embedder_model: str = Field(
        "mobilefacenet_192.onnx", description="Embedder file, relative to models_dir (or an absolute path)."
    )
    embed_flip: bool | None = Field(
        None,
        description="Average each embedding with that of the mirrored crop. Unset: what the embedder's "
        "metadata (face.embedder.flip) recommends.",
    )

    # --- enrolment quality (service/quality.py) ---------------------------------------------------
    # Defaults measured on ../shared/data/lfw-dev (ENROLL_DEFAULTS above): each refuses about 1 % of its faces on
    # that signal alone, so ordinary photos pass. README "Face quality" has the figures.
    enroll_min_face_size: float = Field(
        ENROLL_DEFAULTS["face_size"], ge=0, description="Least inter-ocular distance (pixels) of an enrolment face."
    )
    enroll_max_yaw: float = Field(
        ENROLL_DEFAULTS["max_yaw"], ge=0, le=180, description="Most head turn (degrees, either way) of an enrolment face."
    )
    enroll_max_pitch: float = Field(
        ENROLL_DEFAULTS["max_pitch"], ge=0, le=180, description="Most head tilt (degrees, up or down) of an enrolment face."
    )
    enroll_min_sharpness: float = Field(
        ENROLL_DEFAULTS["sharpness"], ge=0, description="Least sharpness (variance of the Laplacian) of an enrolment face."
    )
    enroll_min_brightness: float = Field(
        ENROLL_DEFAULTS["brightness"], ge=0, le=255, description="Least mean grey level of an enrolment face."
    )
    enroll_max_brightness: float = Field(
        ENROLL_DEFAULTS["max_brightness"], ge=0, le=255, description="Most mean grey level of an enrolment face."
    )
    enroll_min_quality: float = Field(
        ENROLL_DEFAULTS["quality"], ge=0, le=1, description="Least overall quality score (0-1) of an enrolment face."
    )

    # --- decisions ----------------------------------------------------------------------------------
    match_threshold: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="Cosine similarity at or above which two faces are the same person. Unset: the "
        "embedder's own face.embedder.threshold (start-up fails if it has none).",
    )
    identify_fpir: float = Field(
        0.01,
        gt=0.0,
        lt=1.0,
        description="Target false-positive identification rate of /identify: the chance that a stranger is "
        "named as someone. The threshold rises with the number of enrolled identities to keep it, from the "
        "embedder's FAR table (face.embedder.far_table); never below the 1:1 threshold.",
    )
    identify_threshold: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="A fixed /identify threshold instead of the FPIR policy (the chance of naming a stranger "
        "then grows with the gallery).",
    )
    detection_score_threshold: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Default minimum face probability. Unset: the detector's face.detector.score_threshold.",
    )
    max_faces: int = Field(100, ge=1, description="Most faces one image is analysed for (highest scores first).")

    # --- input limits -------------------------------------------------------------------------------
    max_image_bytes: int = Field(20 * MB, ge=1024, description="Largest accepted encoded image, in bytes.")
    max_image_pixels: int = Field(
        40_000_000, ge=64 * 64, description="Largest accepted decoded image (width x height): bomb guard."
    )
    max_enroll_images: int = Field(
        10, ge=1, le=100, description="Most images one /enroll or /embed request carries."
    )
    max_candidates: int = Field(
        10_000, ge=1, le=100_000, description="Most client-held candidates one /identify request may search."
    )
    max_pixels_in_flight: int | None = Field(
        None,
        ge=64 * 64,
        description="Decoded pixels all requests together may hold at once; more wait their turn (service/"
        "admission.py). Default: 2 x max_image_pixels, so that a /verify of two largest images still runs.",
    )
    max_body_bytes_in_flight: int | None = Field(
        None,
        ge=64 * 1024,
        description="Request-body bytes (images still encoded: base64 or multipart) all image requests together "
        "may hold at once, reserved from Content-Length before the body is read; more wait their turn like "
        "pixels do. Default: 6 x max_image_bytes. One request larger than this still runs, alone.",
    )
    max_json_body_bytes: int | None = Field(
        None,
        ge=64 * 1024,
        description="Largest JSON body (base64 images) an image endpoint reads; larger is 413 `json_body_too_large`, "
        "which says to send multipart/form-data. A JSON body is parsed whole, in memory, at about twice its size; "
        "multipart streams its images to temporary files. Default: 32 MiB, or one largest image as base64 if more.",
    )
    queue_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Longest wait for that budget before a 503 `busy` answer, in seconds."
    )

    # --- gallery ------------------------------------------------------------------------------------
    gallery_url: str | None = Field(
        None,
        description="Where enrolled identities live: sqlite:///relative/path.db, sqlite:////absolute/path.db or "
        "postgresql://user:password@host:port/database (PostgreSQL with pgvector, shared by any number of "
        "replicas). Unset: the SQLite file FACE_GALLERY_PATH.",
    )
    gallery_path: Path = Field(
        Path("data/gallery.db"), description="SQLite file of enrolled identities (when FACE_GALLERY_URL is unset)."
    )
    gallery_timeout_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="PostgreSQL gallery: longest wait for a database connection or statement before a 503 "
        "`not_ready` answer, in seconds.",
    )
    gallery_ef_search: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="PostgreSQL gallery: hnsw.ef_search, the candidates each search explores in the HNSW index "
        "(at least top_k). More finds more of what exact search finds, and takes longer. Unset: the service's "
        "measured default (service/pg_gallery.py EF_SEARCH; BENCHMARKS.md).",
    )
    gallery_index: bool = Field(
        True,
        description="SQLite gallery: search large galleries through an approximate-nearest-neighbour index (faiss "
        "IVF, persisted in <gallery file>.index/, built in the background; candidates re-ranked exactly, so a "
        "found identity's similarity is exact search's). false: always exact search.",
    )
    gallery_index_min_identities: int = Field(
        IndexOptions.min_identities,
        ge=1,
        description="SQLite gallery: searchable identities from which the index is built and used; below it, exact "
        "search (as fast there; BENCHMARKS.md).",
    )
    gallery_index_nprobe: int | None = Field(
        IndexOptions.nprobe,
        ge=1,
        le=65536,
        description="SQLite gallery index: cells scanned per query. More finds more of what exact search finds, "
        "and takes longer. Unset: about 8 sqrt(cells), at most 768 (256 of the 1,024 cells of a 100,000-identity "
        "index, 768 at 3M identities and beyond; BENCHMARKS.md).",
    )
    gallery_index_candidates: int = Field(
        IndexOptions.candidates,
        ge=1,
        le=100_000,
        description="SQLite gallery index: identities taken from the index per query and re-ranked exactly.",
    )

    # --- compute ------------------------------------------------------------------------------------
    # Unset thread counts are sized to the CPUs this process may use: FACE_INFERENCE_WORKERS requests run
    # at once, each ORT call on FACE_INTRA_OP_THREADS threads, so that together they fill the cores without
    # oversubscribing them (measured on 2 cores: 2 workers x 1 thread answer /verify in ~40 ms, 1 worker x 2
    # threads in ~75 ms, since the two images of a /verify then run in parallel).
    inference_workers: int | None = Field(
        None, ge=1, le=64, description="Requests whose decode + inference run at once (default: min(4, CPUs))."
    )
    intra_op_threads: int | None = Field(
        None, ge=0, le=256, description="ONNX Runtime threads per call (0 = ORT's; default: CPUs / workers)."
    )
    inter_op_threads: int = Field(1, ge=0, le=256, description="ONNX Runtime threads across operators.")

    # --- security -----------------------------------------------------------------------------------
    # NoDecode: the value is a comma-separated list, not the JSON pydantic-settings expects for lists.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys; empty means the API is open. Sent as X-API-Key or "
        "Authorization: Bearer.",
    )
    public_docs: bool = Field(
        False,
        description="Serve /docs, /redoc and /openapi.json without an API key (Swagger's Authorize button "
        "needs that).",
    )

    # --- video streams (WebSocket /stream) ----------------------------------------------------------
    stream_max_streams: int = Field(
        8, ge=0, le=1000, description="Most /stream connections open at once; more are closed with 4429."
    )
    stream_max_frame_bytes: int = Field(
        4 * MB, ge=1024, le=64 * MB, description="Largest encoded frame a stream takes, in bytes."
    )
    stream_max_frame_pixels: int = Field(
        3840 * 2160, ge=64 * 64, description="Largest decoded frame a stream takes (width x height)."
    )
    stream_max_fps: float = Field(
        60.0, gt=0, le=1000, description="Frames per second a stream may send (one second of burst allowed); "
        "frames beyond are dropped unread and counted as rate_limited."
    )
    stream_idle_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="A stream that sends nothing for this long is closed (4408)."
    )
    stream_frames_in_flight: int = Field(
        1, ge=1, le=16, description="Frames of one stream decoded and searched for faces at once while it is the "
        "only stream open (more streams: one each). 2 lets one stream use two idle cores; on a busy machine it "
        "only doubles each frame's time."
    )
    stream_full_detection_every: int = Field(
        5, ge=1, le=1000, description="While every face in view is at least 96 px at the detector's working size "
        "and embedded, a stream's frames "
        "are searched for faces at half the detector's working size (a quarter of the cost), except every Nth, "
        "searched at full size so that a small face coming into view is found within N frames. 1: every frame at "
        "full size."
    )
    stream_embed_every: int = Field(
        15, ge=1, le=10_000, description="A tracked face is embedded again after this many processed frames "
        "(sooner when it is clearly larger or sharper than when last embedded)."
    )

    # --- server -------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", validation_alias=AliasChoices("HOST", "host"))
    port: int = Field(8000, ge=1, le=65535, validation_alias=AliasChoices("PORT", "port"))
    log_level: str = Field("info", description="Python log level: debug, info, warning, error.")
    header_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="Time a connection gets to send complete request headers (408 after)."
    )
    body_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="Time a request gets to send its whole body once its headers are in "
        "(408 `request_timeout` after): a client trickling bytes cannot hold a connection, or bytes in flight."
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            value = value.split(",")
        keys = [k.strip() for k in value or [] if k and k.strip()]
        for key in keys:
            if len(key) < 16:
                raise ValueError("every API key must be at least 16 characters long")
        return keys

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError(f"unknown log level {value!r}")
        return value

    @field_validator("gallery_url")
    @classmethod
    def _known_store(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        try:
            gallery_store(value)
        except ValueError as exc:
            raise ValueError(f"FACE_GALLERY_URL: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_gallery(self) -> Settings:
        """FACE_GALLERY_PATH is the older spelling of a SQLite FACE_GALLERY_URL; both at once must agree."""
        if self.gallery_url is None:
            self.gallery_url = sqlite_url(self.gallery_path)
        elif "gallery_path" in self.model_fields_set:
            store, where = gallery_store(self.gallery_url)
            if store != "sqlite" or Path(where) != self.gallery_path:
                raise ValueError("FACE_GALLERY_URL and FACE_GALLERY_PATH name different galleries: set only one")
        return self

    @model_validator(mode="after")
    def _size_pixel_budget(self) -> Settings:
        if self.max_pixels_in_flight is None:
            self.max_pixels_in_flight = 2 * self.max_image_pixels
        if self.max_body_bytes_in_flight is None:
            self.max_body_bytes_in_flight = 6 * self.max_image_bytes
        if self.max_json_body_bytes is None:
            # One largest image always fits: its base64 (4/3 of it) and room for the options, as
            # service.api.uploads.body_limit counts them.
            one_image = 4 * -(-self.max_image_bytes // 3) + 256 * 1024
            self.max_json_body_bytes = max(32 * MB, one_image)
        return self

    @model_validator(mode="after")
    def _size_thread_pools(self) -> Settings:
        cpus = available_cpus()
        if self.inference_workers is None:
            self.inference_workers = min(4, cpus)
        if self.intra_op_threads is None:
            self.intra_op_threads = max(1, cpus // self.inference_workers)
        return self

    @model_validator(mode="after")
    def _models_exist(self) -> Settings:
        for path in (self.detector_path, self.embedder_path):
            if not path.is_file():
                raise ValueError(f"model file {path} does not exist (run `make models` or set FACE_MODELS_DIR)")
        return self

    @property
    def enroll_minimums(self):  # service.quality.Minimums (imported here: it brings OpenCV)
        from service.quality import Minimums

        return Minimums(
            face_size=self.enroll_min_face_size, max_yaw=self.enroll_max_yaw, max_pitch=self.enroll_max_pitch,
            sharpness=self.enroll_min_sharpness, brightness=self.enroll_min_brightness,
            max_brightness=self.enroll_max_brightness, quality=self.enroll_min_quality,
        )

    @property
    def gallery_index_options(self) -> IndexOptions:
        return IndexOptions(enabled=self.gallery_index, min_identities=self.gallery_index_min_identities,
                            nprobe=self.gallery_index_nprobe, candidates=self.gallery_index_candidates)

    @property
    def detector_path(self) -> Path:
        return self.models_dir / self.detector_model

    @property
    def embedder_path(self) -> Path:
        return self.models_dir / self.embedder_model
