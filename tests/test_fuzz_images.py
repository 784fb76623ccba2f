"""A bounded fuzz run over the image front door: sniffing, header probing, structural checks and decoding
(service.images.decode_image), fed mutations of real files -- the shared photos, and the same pixels
re-encoded as progressive JPEG, PNG, WebP and BMP.

Whatever the bytes, the answer is a BGR uint8 image within the pixel limit or one of the typed refusals
(InvalidImage, ImageTooLarge, UnsupportedMediaType); never another exception, a crash, or a slow decode.
`make test` runs a short budget; CI runs a longer one (.ci/run, FACEREC_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import ImageTooLarge, InvalidImage, UnsupportedMediaType
from service.images import decode_image

EXAMPLES = int(os.environ.get("FACEREC_FUZZ_EXAMPLES", "150"))
LIMITS = {"max_bytes": 2 * 1024 * 1024, "max_pixels": 4_000_000}
# One decode of a (mutated) seed of at most 4 MP; generous, for a shared 2-core machine.
SLOW_S = 3.0
REFUSALS = (InvalidImage, ImageTooLarge, UnsupportedMediaType)
ROOT = Path(__file__).resolve().parents[1]
FACES = Path(os.environ.get("FACEREC_SHARED_DATA", ROOT.parent / "shared" / "data")) / "faces"


def _seeds() -> list[bytes]:
    if not FACES.is_dir():
        return []
    paths = sorted(FACES.rglob("*.jpg"))[:6]
    seeds = [p.read_bytes() for p in paths if p.stat().st_size < LIMITS["max_bytes"]]
    image = cv2.imread(str(paths[0]))
    small = cv2.resize(image, (160, 200), interpolation=cv2.INTER_AREA)
    for ext, params in [
        (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        (".jpg", [cv2.IMWRITE_JPEG_RST_INTERVAL, 2]),
        (".png", []),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
        (".bmp", []),
    ]:
        seeds.append(cv2.imencode(ext, small, params)[1].tobytes())
    rgba = cv2.cvtColor(small, cv2.COLOR_BGR2BGRA)
    rgba[::2, :, 3] = 0
    seeds.append(cv2.imencode(".png", rgba)[1].tobytes())
    return seeds


SEEDS = _seeds()
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "int", "truncate", "duplicate", "delete", "insert"]))
        # Most structure lives in the first bytes (headers, tables); bias positions towards them.
        limit = len(data) if draw(st.booleans()) else min(len(data), 2048)
        pos = draw(st.integers(0, max(0, limit - 1)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "int" and len(data) >= pos + 4:
            value = draw(st.sampled_from(INTERESTING))
            data[pos : pos + 4] = struct.pack(draw(st.sampled_from([">I", "<I"])), value)
        elif kind == "truncate":
            del data[max(pos, 1):]
        elif kind == "duplicate":
            size = draw(st.integers(1, 4096))
            data[pos:pos] = data[pos : pos + size] * draw(st.integers(1, 50))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data[: LIMITS["max_bytes"] + 1])


@pytest.mark.skipif(not SEEDS, reason=f"{FACES} is absent (shared test data not available)")
@settings(
    max_examples=EXAMPLES,
    deadline=None,  # timed below, with a margin a shared machine needs
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    derandomize=False,
)
@given(mutated())
def test_decode_image_answers_every_mutation_with_an_image_or_a_typed_refusal(data: bytes) -> None:
    started = time.perf_counter()
    try:
        image = decode_image(data, **LIMITS)
    except REFUSALS:
        pass
    else:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.shape[0] * image.shape[1] <= LIMITS["max_pixels"]
        assert image.flags["C_CONTIGUOUS"]
    assert time.perf_counter() - started < SLOW_S


@pytest.mark.skipif(not SEEDS, reason=f"{FACES} is absent (shared test data not available)")
def test_every_seed_decodes() -> None:
    for seed in SEEDS:
        assert decode_image(seed, **LIMITS).ndim == 3
