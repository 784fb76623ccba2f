"""Structural checks (service/image_structure.py): real files pass, each kind of broken framing is refused with
a message naming what is wrong, and the decoder never sees what is refused."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from service import image_structure, images
from service.errors import InvalidImage
from service.image_structure import check_structure
from service.images import decode_image, probe_image

LIMITS = {"max_bytes": 20 * 1024 * 1024, "max_pixels": 40_000_000}


@pytest.fixture(scope="module")
def photo(faces_dir: Path) -> np.ndarray:
    image = cv2.imread(str(faces_dir / "pairs" / "img1.jpg"))
    return cv2.resize(image, (image.shape[1] // 4, image.shape[0] // 4), interpolation=cv2.INTER_AREA)


def encode(ext: str, image: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, image, params or [])
    assert ok
    return buf.tobytes()


def png_chunk(kind: bytes, payload: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + payload) if crc is None else crc
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_parts(data: bytes) -> list[tuple[bytes, bytes]]:
    pos, parts = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        parts.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return parts


def png_from(parts: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(k, p) for k, p in parts)


def jpeg_markers(data: bytes) -> list[int]:
    """Offsets of every SOS marker (FF DA) outside entropy-coded data, found by walking the segments."""
    found, pos = [], 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker == 0xDA:
            found.append(pos)
            pos = image_structure.next_marker(data, pos + 2 + length)
            continue
        pos += 2 + length
    return found


def refused(data: bytes, match: str) -> None:
    with pytest.raises(InvalidImage, match=match):
        decode_image(data, **LIMITS)


@pytest.fixture
def no_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a decoder was called on input the structural checks should refuse")

    monkeypatch.setattr(images.cv2, "imdecode", refuse)
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", refuse)


# --- real files pass ----------------------------------------------------------------------------------------


def test_every_shared_photo_passes(faces_dir: Path) -> None:
    paths = sorted(faces_dir.rglob("*.jpg"))
    assert len(paths) >= 10
    for path in paths:
        data = path.read_bytes()
        check_structure(probe_image(data).format, data)


@pytest.mark.parametrize(
    "ext,params",
    [
        (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        (".jpg", [cv2.IMWRITE_JPEG_RST_INTERVAL, 4]),
        (".png", []),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),  # lossless
        (".bmp", []),
    ],
)
def test_encoder_output_passes(photo: np.ndarray, ext: str, params: list[int]) -> None:
    data = encode(ext, photo, params)
    assert decode_image(data, **LIMITS).shape == photo.shape
    gray = encode(ext, cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY), params)
    assert decode_image(gray, **LIMITS).shape == photo.shape


# --- PNG ----------------------------------------------------------------------------------------------------


def test_44_byte_png_declaring_a_4gb_chunk_is_refused(no_decoder) -> None:
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100, 100, 8, 2, 0, 0, 0))
    bomb = b"\x89PNG\r\n\x1a\n" + ihdr + struct.pack(">I", 0xFFFFFFF0) + b"IDAT" + b"\x00\x00\x00"
    assert len(bomb) == 44
    refused(bomb, "PNG chunk IDAT at byte 33 declares 4294967280 bytes, but only 0 remain")


def test_png_crc_mismatch_is_refused(photo: np.ndarray, no_decoder) -> None:
    data = bytearray(encode(".png", photo))
    data[60] ^= 0x01  # inside the first IDAT
    refused(bytes(data), "fails its CRC check")


def test_png_without_idat_or_iend_is_refused(photo: np.ndarray, no_decoder) -> None:
    parts = png_parts(encode(".png", photo))
    refused(png_from([p for p in parts if p[0] != b"IDAT"]), "no image data")
    refused(png_from([p for p in parts if p[0] != b"IEND"]), "ends before its IEND")


def test_png_ancillary_chunks_are_capped(photo: np.ndarray, no_decoder) -> None:
    parts = png_parts(encode(".png", photo))
    many = [parts[0]] + [(b"tEXt", b"k\x00v")] * (image_structure.MAX_PNG_ANCILLARY_CHUNKS + 1) + parts[1:]
    refused(png_from(many), "more than 256 ancillary chunks")
    big = [parts[0], (b"zTXt", bytes(image_structure.MAX_PNG_ANCILLARY_CHUNK_BYTES + 1))] + parts[1:]
    refused(png_from(big), "ancillary chunk zTXt is 4194305 bytes")
    refused(png_from([parts[0], (b"QQQQ", b"x")] + parts[1:]), "unknown critical chunk QQQQ")


def test_png_with_split_idat_runs_is_refused(photo: np.ndarray, no_decoder) -> None:
    parts = png_parts(encode(".png", photo))
    ihdr, idat, iend = parts[0], [p for p in parts if p[0] == b"IDAT"], parts[-1]
    half = len(idat[0][1]) // 2
    split = [ihdr, (b"IDAT", idat[0][1][:half]), (b"tEXt", b"a\x00b"), (b"IDAT", idat[0][1][half:]), iend]
    refused(png_from(split), "not consecutive")


# --- JPEG ---------------------------------------------------------------------------------------------------


def repeat_last_scan(progressive: bytes, times: int) -> bytes:
    last = jpeg_markers(progressive)[-1]
    eoi = progressive.rindex(b"\xff\xd9")
    return progressive[:eoi] + progressive[last:eoi] * times + progressive[eoi:]


def test_progressive_jpeg_with_its_last_scan_repeated_is_refused(photo: np.ndarray, no_decoder) -> None:
    data = encode(".jpg", photo, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert len(jpeg_markers(data)) == 10  # what libjpeg writes for colour
    refused(repeat_last_scan(data, 1), "progressive scan 11 repeats or skips a refinement")
    refused(repeat_last_scan(data, 200), "progressive scan 11 repeats")


def test_baseline_jpeg_with_a_repeated_scan_is_refused(photo: np.ndarray, no_decoder) -> None:
    refused(repeat_last_scan(encode(".jpg", photo), 1), "scan 2 codes a component a previous scan already coded")


def test_jpeg_scan_count_is_capped(photo: np.ndarray, no_decoder, monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(".jpg", photo, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    monkeypatch.setattr(image_structure, "MAX_JPEG_SCANS", 9)
    refused(data, "more than 9 scans")


def test_jpeg_segment_past_the_end_is_refused(photo: np.ndarray, no_decoder) -> None:
    data = encode(".jpg", photo)
    sos = jpeg_markers(data)[0]  # after the frame header, so the header probe reads the size first
    comment = b"\xff\xfe" + struct.pack(">H", 60000) + b"a comment that stops here"
    refused(data[:sos] + comment, f"segment 0xFE at byte {sos} declares 60000 bytes")


def test_jpeg_scan_without_data_is_refused(photo: np.ndarray, no_decoder) -> None:
    data = encode(".jpg", photo)
    sos = jpeg_markers(data)[0]
    (length,) = struct.unpack(">H", data[sos + 2 : sos + 4])
    refused(data[: sos + 2 + length] + b"\xff\xd9", "scan 1 has no data")
    refused(data[:sos] + b"\xff\xd9", "no scan data")


@pytest.mark.parametrize(
    "data, start, expected",
    [
        (b"\x12\x34\xff\xd9", 0, 2),  # the end-of-image marker
        (b"\x12\xff\x00\x34\xff\xd9", 0, 4),  # a stuffed zero is data
        (b"\x12\xff\xd3\x34\xff\xc4", 0, 4),  # so is a restart marker; a table segment is not
        (b"\x12\xff\xff\xff\xd9", 0, 1),  # fill bytes belong to the marker they precede
        (b"\xff\x00\xff\xff\xd9", 0, 2),  # a stuffed 0xFF is not a fill byte
        (b"\xff\xff\xd9", 1, 1),  # nor is a 0xFF before `start`
        (b"\x12\xff\x00\xff\xd7\xff", 0, None),  # no marker (a last lone 0xFF is not one)
    ],
)
def test_next_marker_after_scan_data(data: bytes, start: int, expected: int | None) -> None:
    assert image_structure.next_marker(data, start) == expected


def test_truncated_jpeg_without_end_marker_is_refused(photo: np.ndarray, no_decoder) -> None:
    data = encode(".jpg", photo)
    refused(data[: len(data) // 2], "truncated")


# --- WebP and BMP -------------------------------------------------------------------------------------------


def test_webp_riff_and_chunk_sizes_are_checked(photo: np.ndarray, no_decoder) -> None:
    data = bytearray(encode(".webp", photo, [cv2.IMWRITE_WEBP_QUALITY, 80]))
    riff = bytearray(data)
    riff[4:8] = struct.pack("<I", len(data))  # 8 more than the file holds
    refused(bytes(riff), "RIFF header declares")
    chunk = bytearray(data)
    chunk[16:20] = struct.pack("<I", len(data))
    refused(bytes(chunk), "WebP chunk b'VP8 ' at byte 12 declares")


def test_bmp_pixel_array_must_be_in_the_file(photo: np.ndarray, no_decoder) -> None:
    data = encode(".bmp", photo)
    refused(data[: len(data) - 1], "BMP is truncated: its pixel array needs")
    bad = bytearray(data)
    bad[10:14] = struct.pack("<I", len(data) + 10)
    refused(bytes(bad), "pixel data offset")
    bits = bytearray(data)
    bits[28:30] = struct.pack("<H", 7)
    refused(bytes(bits), "7 bits per pixel")
