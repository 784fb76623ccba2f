"""decode_image on real photos re-encoded at test time, and on hostile bytes (bombs, truncation, other formats)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from service import images
from service.errors import ImageTooLarge, InvalidImage, UnsupportedMediaType
from service.images import decode_image, probe_image

LIMITS = {"max_bytes": 20 * 1024 * 1024, "max_pixels": 40_000_000}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photo_bytes(faces_dir: Path) -> bytes:
    """A real colour photo (1382x1868 JPEG)."""
    return (faces_dir / "pairs" / "img1.jpg").read_bytes()


@pytest.fixture(scope="module")
def photo(photo_bytes: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(photo_bytes, np.uint8), cv2.IMREAD_COLOR)
    # A smaller copy keeps the PNG/WebP encodes fast; it is still a real photo.
    return cv2.resize(image, (image.shape[1] // 4, image.shape[0] // 4), interpolation=cv2.INTER_AREA)


def encode(ext: str, image: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, image, params or [])
    assert ok
    return buf.tobytes()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_png(pixels: np.ndarray, color_type: int, bit_depth: int = 8) -> bytes:
    """A minimal PNG writer (filter 0 on every row) for layouts OpenCV cannot write, e.g. gray + alpha."""
    h, w = pixels.shape[:2]
    rows = pixels.reshape(h, -1)
    if bit_depth == 16:
        rows = rows.astype(">u2").view(np.uint8).reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw, 9))
        + png_chunk(b"IEND", b"")
    )


def exif_app1(orientation: int) -> bytes:
    """An APP1 segment holding a big-endian TIFF IFD0 with one entry: Orientation (0x0112), SHORT."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def with_segment(jpeg: bytes, segment: bytes) -> bytes:
    return jpeg[:2] + segment + jpeg[2:]


# --- accepted formats ----------------------------------------------------------------------------------------


def test_jpeg_photo_decodes_to_bgr_like_opencv(photo_bytes: bytes) -> None:
    image = decode_image(photo_bytes, **LIMITS)
    reference = cv2.imdecode(np.frombuffer(photo_bytes, np.uint8), cv2.IMREAD_COLOR)
    assert image.dtype == np.uint8 and image.shape == (1868, 1382, 3)
    assert image.flags.c_contiguous
    np.testing.assert_array_equal(image, reference)
    assert probe_image(photo_bytes) == images.ImageHeader("jpeg", 1382, 1868, False, 3)


def test_grayscale_jpeg_photo_becomes_three_equal_channels(faces_dir: Path) -> None:
    # Some of the shared photos are grayscale; re-encode one as a true 1-channel JPEG.
    gray = cv2.imread(str(faces_dir / "pairs" / "img1.jpg"), cv2.IMREAD_GRAYSCALE)
    image = decode_image(encode(".jpg", gray), **LIMITS)
    assert image.shape == (*gray.shape, 3)
    assert (image[:, :, 0] == image[:, :, 1]).all() and (image[:, :, 1] == image[:, :, 2]).all()
    assert np.abs(image[:, :, 0].astype(int) - gray).mean() < 2.0  # JPEG round trip


@pytest.mark.parametrize(
    "ext, params, exact",
    [
        (".png", [], True),
        (".bmp", [], True),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], True),  # > 100 selects lossless
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 85], False),
    ],
)
def test_png_bmp_webp_photo_round_trip(photo: np.ndarray, ext: str, params: list[int], exact: bool) -> None:
    data = encode(ext, photo, params)
    image = decode_image(data, **LIMITS)
    header = probe_image(data)
    assert (header.width, header.height, header.has_alpha) == (photo.shape[1], photo.shape[0], False)
    assert image.shape == photo.shape and image.dtype == np.uint8
    if exact:
        np.testing.assert_array_equal(image, photo)
    else:
        assert np.abs(image.astype(int) - photo).mean() < 4.0


def test_grayscale_png(photo: np.ndarray) -> None:
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    image = decode_image(encode(".png", gray), **LIMITS)
    np.testing.assert_array_equal(image, cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_png_is_scaled_to_8_bits(photo: np.ndarray, channels: int) -> None:
    src = photo if channels == 3 else cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    wide = src.astype(np.uint16) * 257  # 8-bit v is 16-bit v * 65535 / 255
    image = decode_image(encode(".png", wide), **LIMITS)
    expected = src if channels == 3 else cv2.cvtColor(src, cv2.COLOR_GRAY2BGR)
    np.testing.assert_array_equal(image, expected)


def _alpha_ramp(shape: tuple[int, int]) -> np.ndarray:
    """Alpha 0 on the left third, 255 on the right third, 128 in the middle."""
    h, w = shape
    alpha = np.full((h, w), 128, np.uint8)
    alpha[:, : w // 3] = 0
    alpha[:, 2 * w // 3 :] = 255
    return alpha


def _check_composited_on_white(image: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> None:
    h, w = alpha.shape
    assert image.shape == (h, w, 3)
    assert (image[:, : w // 3] == 255).all()  # transparent: white, not the hidden colour
    np.testing.assert_array_equal(image[:, 2 * w // 3 :], color[:, 2 * w // 3 :])  # opaque: unchanged
    middle = slice(w // 3, 2 * w // 3)
    expected = color[:, middle].astype(np.float64) * 128 / 255 + 255 * 127 / 255
    assert np.abs(image[:, middle] - expected).max() <= 1.0


@pytest.mark.parametrize("ext, params", [(".png", []), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])])
def test_alpha_is_composited_over_white(photo: np.ndarray, ext: str, params: list[int]) -> None:
    alpha = _alpha_ramp(photo.shape[:2])
    data = encode(ext, np.dstack([photo, alpha]), params)
    assert probe_image(data).has_alpha
    _check_composited_on_white(decode_image(data, **LIMITS), photo, alpha)


def test_gray_alpha_png(photo: np.ndarray) -> None:
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    alpha = _alpha_ramp(gray.shape)
    data = write_png(np.dstack([gray, alpha]), color_type=4)
    assert probe_image(data).has_alpha
    _check_composited_on_white(decode_image(data, **LIMITS), cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), alpha)


def test_16_bit_rgba_png(photo: np.ndarray) -> None:
    alpha = np.full(photo.shape[:2], 255, np.uint8)
    rgba16 = np.dstack([photo[:, :, ::-1], alpha]).astype(np.uint16) * 257
    image = decode_image(write_png(rgba16, color_type=6, bit_depth=16), **LIMITS)
    np.testing.assert_array_equal(image, photo)


MEASURE_DECODE = """
import re, sys
from service.images import decode_image

def peak_rss() -> int:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec from the process that spawned this
    # one, so under a large pytest process it would start above anything measured here.
    with open("/proc/self/status") as f:
        return int(re.search(r"^VmHWM:\\s+(\\d+) kB", f.read(), re.MULTILINE).group(1)) * 1024

data = open(sys.argv[1], "rb").read()
decode_image(open(sys.argv[2], "rb").read(), max_bytes=1 << 30, max_pixels=10**9)  # codecs loaded, warmed up
before = peak_rss()
image = decode_image(data, max_bytes=1 << 30, max_pixels=10**9)
print(peak_rss() - before, int(image[0, 0, 0]), int(image[0, 255, 0]))
"""


@pytest.mark.parametrize("bit_depth", [8, 16])
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from Linux's /proc")
def test_alpha_compositing_memory_is_bounded(tmp_path: Path, photo_bytes: bytes, bit_depth: int) -> None:
    """A large RGBA PNG compresses to almost nothing but must be composited: whole-image float32 arithmetic
    took ~42 bytes per pixel (1.7 GB for 40 MP at 8 bits, 2 GB at 16, against a 1 GiB container). OpenCV's
    own decode needs about twice the decoded RGBA array; compositing must add nothing to that peak."""
    h, w = 2000, 4000  # 8 MP: big enough to measure, cheap enough to build
    rgba = np.empty((h, w, 4), np.uint8)
    rgba[:] = (40, 90, 160, 0)
    rgba[:, :, 3] = (np.arange(w) % 256).astype(np.uint8)  # every alpha level: real compositing work
    if bit_depth == 16:
        rgba = rgba.astype(np.uint16) * 257
    (tmp_path / "big.png").write_bytes(encode(".png", rgba))
    (tmp_path / "warm.jpg").write_bytes(photo_bytes)
    decoded_bytes = rgba.nbytes
    del rgba
    child = subprocess.run(
        [sys.executable, "-c", MEASURE_DECODE, str(tmp_path / "big.png"), str(tmp_path / "warm.jpg")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    peak, transparent, opaque = map(int, child.stdout.split())
    assert (transparent, opaque) == (255, 40)  # alpha 0: white; alpha 255: the colour (blue channel)
    message = f"decoding added {peak / 2**20:.0f} MiB for a {decoded_bytes / 2**20:.0f} MiB array"
    assert peak < 2.5 * decoded_bytes, message


@pytest.mark.parametrize(
    "orientation, rotate",
    [
        (1, lambda a: a),
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),  # "rotate 90 CW to display"
        (8, lambda a: np.rot90(a, 1)),
    ],
)
def test_exif_orientation_is_applied(photo: np.ndarray, orientation: int, rotate) -> None:
    plain = encode(".jpg", photo)
    tagged = with_segment(plain, exif_app1(orientation))
    upright = decode_image(tagged, **LIMITS)
    np.testing.assert_array_equal(upright, rotate(decode_image(plain, **LIMITS)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_opencv(photo: np.ndarray, orientation: int) -> None:
    # JPEGs are decoded by libjpeg-turbo (simplejpeg), which leaves orientation to us: all eight EXIF values,
    # mirrored ones included, must come out as OpenCV's IMREAD_COLOR turns them.
    tagged = with_segment(encode(".jpg", photo), exif_app1(orientation))
    expected = cv2.imdecode(np.frombuffer(tagged, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decode_image(tagged, **LIMITS), expected)


def test_half_a_jpeg_with_an_end_marker_appended_is_refused(photo_bytes: bytes) -> None:
    # Its framing is intact (every segment, a scan with data, an EOI): only the entropy decoder can tell that
    # the scan stops early. OpenCV decodes it with a grey lower half; we refuse it.
    half = photo_bytes[: len(photo_bytes) // 2] + b"\xff\xd9"
    with pytest.raises(InvalidImage, match="premature end of data"):
        decode_image(half, **LIMITS)


# --- refused input -------------------------------------------------------------------------------------------


def _decoder_must_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a decoder was called on input that should be refused from its header")

    monkeypatch.setattr(images.cv2, "imdecode", refuse)
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", refuse)


def test_png_decompression_bomb_is_refused_from_its_header(monkeypatch: pytest.MonkeyPatch) -> None:
    # A real bomb: 30000x30000 1-bit gray, all zero; ~110 KB of zlib that inflates to 112 MB of rows (and
    # to 2.7 GB as the BGR image OpenCV would allocate).
    side = 30000
    rows = (b"\x00" + bytes(side // 8)) * side
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows, 9))
    bomb += png_chunk(b"IEND", b"")
    assert len(bomb) < 200_000
    _decoder_must_not_run(monkeypatch)
    with pytest.raises(ImageTooLarge) as err:
        decode_image(bomb, **LIMITS)
    assert err.value.details["width"] == side and err.value.details["height"] == side
    assert err.value.status == 413 and err.value.code == "image_too_large"


def _patch_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    sof = jpeg.index(b"\xff\xc0")  # OpenCV writes baseline JPEGs
    return jpeg[: sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9 :]


def test_jpeg_bomb_is_refused_from_its_header(photo: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = _patch_jpeg_size(encode(".jpg", photo), 30000, 30000)
    assert probe_image(bomb).pixels == 900_000_000
    _decoder_must_not_run(monkeypatch)
    with pytest.raises(ImageTooLarge):
        decode_image(bomb, **LIMITS)


def test_webp_and_bmp_bombs_are_refused_from_their_headers(
    photo: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    lossy = bytearray(encode(".webp", photo, [cv2.IMWRITE_WEBP_QUALITY, 80]))
    assert lossy[12:16] == b"VP8 "
    lossy[26:30] = struct.pack("<HH", 16383, 16383)  # the largest a VP8 frame can declare
    bmp = bytearray(encode(".bmp", photo))
    bmp[18:26] = struct.pack("<ii", 30000, -30000)  # negative height: top-down rows
    _decoder_must_not_run(monkeypatch)
    for data in (bytes(lossy), bytes(bmp)):
        with pytest.raises(ImageTooLarge):
            decode_image(data, **LIMITS)


def test_pixel_limit_is_inclusive_and_enforced(photo: np.ndarray) -> None:
    data = encode(".png", photo)
    pixels = photo.shape[0] * photo.shape[1]
    assert decode_image(data, max_bytes=len(data), max_pixels=pixels).shape == photo.shape
    with pytest.raises(ImageTooLarge):
        decode_image(data, max_bytes=len(data), max_pixels=pixels - 1)


def test_too_many_bytes(photo_bytes: bytes) -> None:
    with pytest.raises(ImageTooLarge) as err:
        decode_image(photo_bytes, max_bytes=len(photo_bytes) - 1, max_pixels=10**9)
    assert err.value.details["bytes"] == len(photo_bytes)


@pytest.mark.parametrize("keep", [0.5, 0.9, -2])
def test_truncated_jpeg_is_refused_not_half_decoded(
    photo_bytes: bytes, keep: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Refused by our end-of-image check, before OpenCV (some OpenCV builds half-decode with only a warning).
    cut = photo_bytes[: int(len(photo_bytes) * keep)] if keep > 0 else photo_bytes[:keep]
    _decoder_must_not_run(monkeypatch)
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(cut, **LIMITS)


def test_truncated_jpeg_with_exif_thumbnail_is_still_refused(photo: np.ndarray) -> None:
    # An EXIF thumbnail is a whole JPEG (ending in FF D9) inside APP1, before the main scan: its end marker must
    # not make a truncated main image look complete.
    thumbnail = encode(".jpg", cv2.resize(photo, (32, 24)))
    payload = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + b"\x00\x00" + thumbnail
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    data = with_segment(encode(".jpg", photo), app1)
    assert decode_image(data, **LIMITS).shape == photo.shape
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) * 2 // 3], **LIMITS)


@pytest.mark.parametrize("ext", [".png", ".webp", ".bmp"])
@pytest.mark.parametrize("keep", [0.6, 40])
def test_truncated_png_webp_bmp_are_refused(photo: np.ndarray, ext: str, keep: float) -> None:
    data = encode(ext, photo)
    cut = data[: int(len(data) * keep)] if keep < 1 else data[: int(keep)]
    with pytest.raises(InvalidImage):
        decode_image(cut, **LIMITS)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        b"Hello, this is a plain text file, not a picture.\n" * 20,
        b'{"image": "not really"}',
        b"\xff\xd8\xff",  # a JPEG signature and nothing else
        b"\x89PNG\r\n\x1a\n",  # a PNG signature and nothing else
    ],
    ids=["empty", "random", "text", "json", "jpeg-signature-only", "png-signature-only"],
)
def test_not_an_image(data: bytes) -> None:
    with pytest.raises(InvalidImage) as err:
        decode_image(data, **LIMITS)
    assert err.value.status == 400 and err.value.code == "invalid_image"


GIF_1X1 = (  # a complete 1x1 GIF: header, palette, graphic control extension, image block, trailer
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00"
    b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)


@pytest.mark.parametrize(
    "data, name",
    [
        (GIF_1X1, "gif"),
        (b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "pdf"),
        (b"\x00\x00\x00\x1cftypheic\x00\x00\x00\x00mif1heic", "isobmff"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "svg"),
    ],
)
def test_known_other_formats_are_unsupported(data: bytes, name: str) -> None:
    with pytest.raises(UnsupportedMediaType) as err:
        decode_image(data, **LIMITS)
    assert err.value.status == 415 and err.value.details["format"] == name


def test_tiff_written_by_opencv_is_unsupported(photo: np.ndarray) -> None:
    with pytest.raises(UnsupportedMediaType):
        decode_image(encode(".tiff", photo), **LIMITS)


def test_palette_png_with_transparent_entry() -> None:
    # Colour type 3 (palette) with a tRNS chunk making entry 0 fully transparent: alpha from a chunk, not
    # from the colour type.
    index = np.zeros((4, 6), np.uint8)
    index[:, 3:] = 1
    raw = b"".join(b"\x00" + row.tobytes() for row in index)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 6, 4, 8, 3, 0, 0, 0))
        + png_chunk(b"PLTE", bytes([255, 0, 0, 0, 0, 255]))  # entry 0 red, entry 1 blue (RGB)
        + png_chunk(b"tRNS", bytes([0]))
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )
    assert probe_image(data).has_alpha
    image = decode_image(data, **LIMITS)
    assert (image[:, :3] == 255).all()  # transparent red -> white
    assert (image[:, 3:] == [255, 0, 0]).all()  # opaque blue, in BGR
