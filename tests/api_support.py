"""Shared by the API tests: an app over the real default models, driven through real HTTP semantics.

`api_client` starts the app's lifespan (models load once per test module) and returns FastAPI's TestClient,
which speaks HTTP to the ASGI app through httpx. Helpers read the shared photos and make awkward inputs.
"""

from __future__ import annotations

import contextlib
import csv
import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

with warnings.catch_warnings():
    # Starlette 1.x nudges towards the httpx2 package; httpx is what the project pins and it works the same.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

API_KEY = "test-key-0123456789abcdef"


def built_model(models_dir: Path, name: str) -> Path:
    """models_dir / name, or skip (like the models_dir fixture does for a missing folder) when it is not built."""
    path = models_dir / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: run `make models`")
    return path


def require_default_models(models_dir: Path) -> None:
    for name in Settings.model_fields["detector_model"].default, Settings.model_fields["embedder_model"].default:
        built_model(models_dir, name)


@contextlib.contextmanager
def api_client(models_dir: Path, gallery_dir: Path, **overrides) -> Iterator[TestClient]:
    require_default_models(models_dir)
    if "gallery_url" not in overrides:  # e.g. a PostgreSQL gallery instead of a SQLite file in gallery_dir
        overrides["gallery_path"] = gallery_dir / "gallery.db"
    settings = Settings(models_dir=models_dir, **overrides)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def photo(faces_dir: Path, name: str) -> bytes:
    """A shared photo's bytes: `pairs/img1.jpg`, `groups/couple.jpg`, ..."""
    return (faces_dir / name).read_bytes()


def labelled_pairs(faces_dir: Path) -> list[tuple[str, str, bool]]:
    with open(faces_dir / "pairs" / "pairs.csv", newline="") as f:
        return [
            (row["file_x"].strip(), row["file_y"].strip(), row["Decision"].strip() == "Yes")
            for row in csv.DictReader(f)
        ]


def no_face_jpeg(faces_dir: Path) -> bytes:
    """A real photo region without a face: the bottom strip of couple.jpg (clothes and background)."""
    image = cv2.imread(str(faces_dir / "groups" / "couple.jpg"))
    strip = image[-240:, :640]
    ok, data = cv2.imencode(".jpg", strip)
    assert ok
    return data.tobytes()


def resized_jpeg(data: bytes, width: int, height: int) -> bytes:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    ok, out = cv2.imencode(".jpg", cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA))
    assert ok
    return out.tobytes()


def png_bomb(width: int = 10_000, height: int = 10_000) -> bytes:
    """A valid grayscale PNG of width x height black pixels: ~100 KB that would decode to width*height bytes."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def error_code(response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    return body["error"]["code"]
