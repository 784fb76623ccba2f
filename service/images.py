"""Uploaded bytes -> a BGR uint8 image, refusing what we must not decode.

Order of checks, cheapest first, so hostile input costs almost nothing:
1. byte count (`max_bytes`) -> ImageTooLarge;
2. magic bytes -> JPEG, PNG, WebP or BMP; a recognised other format (GIF, TIFF, PDF, HEIC, ...) ->
   UnsupportedMediaType; anything else -> InvalidImage;
3. width and height read from the format's HEADER by the small parsers below (a few fixed offsets each, no
   decompression) -> more than `max_pixels` is ImageTooLarge, before a single pixel is decoded. A 40 KB PNG can
   declare 30000 x 30000 pixels (2.7 GB of BGR), which is why this comes before OpenCV;
4. structure (service.image_structure): the container's framing is walked in one pass -- PNG chunk lengths and
   CRCs, JPEG segments, scans and their progression, RIFF chunk sizes, the BMP pixel array -- so that no length
   points past the body and no decoder is asked to do more work than the pixels justify. A truncated file is
   refused (InvalidImage) instead of decoded into a picture whose missing part is flat grey;
5. OpenCV decodes; a failure is InvalidImage, and the decoded size must match the header's.

Colour handling (all return 3-channel BGR uint8):
- EXIF orientation is applied (OpenCV's IMREAD_COLOR does it for JPEG), so a phone photo is upright;
- grayscale is replicated to three channels; 16-bit samples are scaled to 8 bits;
- alpha is COMPOSITED over white, not dropped: pixels with alpha 0 often hold arbitrary colour (black, or what
  an editor erased), and dropping alpha would show the detector that hidden content instead of the picture the
  user sees (a browser shows transparency over a white page).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg

from service.errors import ImageTooLarge, InvalidImage, UnsupportedMediaType
from service.image_structure import check_structure

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("jpeg", "png", "webp", "bmp")

# Signatures of formats we recognise but do not accept (HTTP 415 tells the client to convert, not to retry).
_UNSUPPORTED_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"GIF87a", "gif"),
    (0, b"GIF89a", "gif"),
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
    (0, b"%PDF-", "pdf"),
    (0, b"8BPS", "psd"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
    (0, b"\xffO\xffQ", "jpeg2000"),
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jpegxl"),
    (0, b"\xff\n", "jpegxl"),
    (0, b"qoif", "qoi"),
    (0, b"v/1\x01", "openexr"),
    (0, b"#?RADIANCE", "hdr"),
    (0, b"PK\x03\x04", "zip"),
    (0, b"\x1f\x8b", "gzip"),
    (0, b"\x00\x00\x01\x00", "ico"),
    (4, b"ftyp", "isobmff"),  # HEIC, AVIF, MP4, MOV
)


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, read without decoding pixels."""

    format: str  # one of SUPPORTED_FORMATS
    width: int
    height: int
    has_alpha: bool
    jpeg_components: int = 0  # a JPEG frame's colour components (1 gray, 3 YCbCr, 4 CMYK/YCCK)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode JPEG/PNG/WebP/BMP bytes to an upright BGR uint8 array (H, W, 3); see the module doc for errors."""
    data = bytes(data)  # a memoryview or bytearray would not support the searches below
    if len(data) > max_bytes:
        raise ImageTooLarge(
            f"image is {len(data)} bytes, the limit is {max_bytes}",
            details={"bytes": len(data), "max_bytes": max_bytes},
        )
    header = probe_image(data)
    if header.pixels > max_pixels:
        raise ImageTooLarge(
            f"image is {header.width}x{header.height} = {header.pixels} pixels, the limit is {max_pixels}",
            details={"width": header.width, "height": header.height, "max_pixels": max_pixels},
        )
    check_structure(header.format, data)  # lengths, CRCs, scans: what the decoder below would trust

    if header.format == "jpeg" and header.jpeg_components != 4:
        image = _decode_jpeg(data)
        _check_decoded_size(image, header)
        return image

    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        if header.has_alpha:
            # IMREAD_UNCHANGED keeps alpha (and 16 bits); orientation tags are a JPEG matter, JPEG has no alpha.
            image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
            if image is not None:
                image = _to_bgr8(image)
        else:
            # IMREAD_COLOR: 3-channel 8-bit BGR, grayscale replicated, EXIF orientation applied.
            image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise InvalidImage(f"{header.format} data cannot be decoded: {exc.err}") from None
    if image is None:
        raise InvalidImage(f"{header.format} data cannot be decoded (corrupt or truncated)")
    _check_decoded_size(image, header)
    return np.ascontiguousarray(image)


def _check_decoded_size(image: np.ndarray, header: ImageHeader) -> None:
    h, w = image.shape[:2]
    if {h, w} != {header.height, header.width} or h * w != header.pixels:
        # The size limit above is only as good as the header; a decoder that disagrees with it is not trusted.
        raise InvalidImage(
            f"decoded {w}x{h} pixels, but the {header.format} header says {header.width}x{header.height}"
        )


def _decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG -> upright BGR with libjpeg-turbo (simplejpeg) in strict mode: what libjpeg only WARNS about -- the
    entropy-coded data ends early ("premature end of data segment"), a bogus progression -- is an error here.
    That is the only way to refuse the first half of a JPEG with an end-of-image marker appended: its framing
    is intact, and OpenCV decodes it into a picture whose lower half is flat grey. It is also faster than
    cv2.imdecode (0.68 of its time on a 20 MP JPEG, 0.95 on a 2.6 MP photo), with identical pixels
    (BENCHMARKS.md, "JPEG decoding"). CMYK JPEGs (4 components), which libjpeg-turbo cannot convert to BGR, stay
    with OpenCV."""
    try:
        image = simplejpeg.decode_jpeg(data, colorspace="BGR", strict=True)
    except ValueError as exc:
        raise InvalidImage(f"jpeg data cannot be decoded: {exc}") from None
    return _upright(image, exif_orientation(data))


# EXIF orientation -> how to turn the stored pixels upright (what cv2.IMREAD_COLOR does for a JPEG).
_ORIENT = {
    2: lambda a: cv2.flip(a, 1),
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    4: lambda a: cv2.flip(a, 0),
    5: lambda a: cv2.transpose(a),
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.flip(cv2.transpose(a), -1),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


def _upright(image: np.ndarray, orientation: int) -> np.ndarray:
    turn = _ORIENT.get(orientation)
    return np.ascontiguousarray(image if turn is None else turn(image))


def exif_orientation(data: bytes) -> int:
    """The EXIF Orientation tag (1..8) of a JPEG's APP1 segment, 1 when absent or unreadable."""
    try:
        for marker, start, end in _jpeg_segments(data):
            if marker == 0xE1 and data[start : start + 6] == b"Exif\x00\x00":
                return _tiff_orientation(data[start + 6 : end])
    except InvalidImage:
        pass
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for i in range(min(count, 512)):
        entry = tiff[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
        if len(entry) < 12:
            break
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag == 0x0112 and kind == 3:  # Orientation, SHORT: the value sits in the first 2 bytes of 4
            (orientation,) = struct.unpack(order + "H", entry[8:10])
            return orientation if 1 <= orientation <= 8 else 1
    return 1


def probe_image(data: bytes) -> ImageHeader:
    """Identify the format and read width, height and alpha from the header only."""
    if not data:
        raise InvalidImage("empty body: no image bytes")
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_header(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_header(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_header(data)
    if data[:2] == b"BM":
        return _bmp_header(data)
    for offset, signature, name in _UNSUPPORTED_SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            raise _unsupported(name)
    if data[:4] == b"RIFF":
        raise _unsupported("riff")  # WAV, AVI
    head = data[:512].lstrip().lower()
    if head.startswith((b"<?xml", b"<svg")) and b"<svg" in head:
        raise _unsupported("svg")
    raise InvalidImage("not an image: the bytes match none of JPEG, PNG, WebP, BMP")


def _unsupported(name: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"{name} is not a supported image format; send JPEG, PNG, WebP or BMP",
        details={"format": name, "supported": list(SUPPORTED_FORMATS)},
    )


def _checked(fmt: str, width: int, height: int, has_alpha: bool = False) -> ImageHeader:
    if width <= 0 or height <= 0:
        raise InvalidImage(f"{fmt} header declares an empty image ({width}x{height})")
    return ImageHeader(fmt, width, height, has_alpha)


def _png_header(data: bytes) -> ImageHeader:
    # Signature (8) then the IHDR chunk: length (4), "IHDR", width (4), height (4), bit depth, colour type, ...
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise InvalidImage("PNG is truncated or has no IHDR header")
    width, height, _bit_depth, color_type = struct.unpack(">IIBB", data[16:26])
    # Colour types 4 and 6 carry alpha; a tRNS chunk (before IDAT) adds it to palette/gray/RGB images.
    has_alpha = color_type in (4, 6) or _png_has_chunk_before_idat(data, b"tRNS")
    return _checked("png", width, height, has_alpha)


def _png_has_chunk_before_idat(data: bytes, wanted: bytes) -> bool:
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == wanted:
            return True
        if kind in (b"IDAT", b"IEND"):
            return False
        pos += 12 + length  # length, type, data, CRC
    return False


# SOF markers that carry the frame size: baseline, extended, progressive, lossless; Huffman and arithmetic.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_segments(data: bytes):
    """Yield (marker, payload_start, payload_end) for each header segment up to and including the first SOS."""
    pos = 2
    n = len(data)
    while pos < n:
        if data[pos] != 0xFF:
            raise InvalidImage("JPEG header is corrupt (expected a marker)")
        while pos < n and data[pos] == 0xFF:  # markers may be preceded by fill bytes 0xFF
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM and RSTn stand alone
            continue
        if marker == 0xD9:
            raise InvalidImage("JPEG ends before any image data")
        if pos + 2 > n:
            break
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2:
            raise InvalidImage("JPEG header is corrupt (segment length < 2)")
        yield marker, pos + 2, pos + length
        if marker == 0xDA:
            return
        pos += length
    raise InvalidImage("JPEG is truncated inside its header")


def _jpeg_header(data: bytes) -> ImageHeader:
    for marker, start, end in _jpeg_segments(data):
        if marker in _JPEG_SOF:
            if end > len(data) or end - start < 6:
                raise InvalidImage("JPEG is truncated inside its frame header")
            _precision, height, width, components = struct.unpack(">BHHB", data[start : start + 6])
            if height == 0:
                # Height given later by a DNL marker: legal but so rare that no decoder we use handles it.
                raise InvalidImage("JPEG frame header declares height 0 (DNL marker), not supported")
            header = _checked("jpeg", width, height)
            return ImageHeader("jpeg", header.width, header.height, False, components)
        if marker == 0xDA:
            break
    raise InvalidImage("JPEG has no frame header (SOF) before its scan data")


def _webp_header(data: bytes) -> ImageHeader:
    # RIFF container: "RIFF" size "WEBP", then the first chunk: fourcc (4), size (4), payload.
    if len(data) < 30:
        raise InvalidImage("WebP is truncated inside its header")
    fourcc = data[12:16]
    payload = data[20:]
    if fourcc == b"VP8 ":  # lossy: 3-byte frame tag, start code 9d 01 2a, then 14-bit width and height
        if payload[3:6] != b"\x9d\x01\x2a":
            raise InvalidImage("WebP (lossy) frame header is corrupt")
        width, height = struct.unpack("<HH", payload[6:10])
        return _checked("webp", width & 0x3FFF, height & 0x3FFF)
    if fourcc == b"VP8L":  # lossless: signature 0x2f, then 14 bits width-1, 14 bits height-1, 1 bit alpha
        if payload[0] != 0x2F:
            raise InvalidImage("WebP (lossless) header is corrupt")
        (bits,) = struct.unpack("<I", payload[1:5])
        width = (bits & 0x3FFF) + 1
        height = ((bits >> 14) & 0x3FFF) + 1
        return _checked("webp", width, height, bool((bits >> 28) & 1))
    if fourcc == b"VP8X":  # extended: flags byte, 3 reserved, 24-bit canvas width-1 and height-1
        flags = payload[0]
        if flags & 0x02:
            raise _unsupported("animated webp")
        width = int.from_bytes(payload[4:7], "little") + 1
        height = int.from_bytes(payload[7:10], "little") + 1
        return _checked("webp", width, height, bool(flags & 0x10))
    raise InvalidImage(f"WebP has an unknown first chunk {fourcc!r}")


def _bmp_header(data: bytes) -> ImageHeader:
    # File header (14 bytes), then a DIB header whose first 4 bytes give its size.
    if len(data) < 26:
        raise InvalidImage("BMP is truncated inside its header")
    (dib_size,) = struct.unpack("<I", data[14:18])
    if dib_size == 12:  # OS/2 BITMAPCOREHEADER: unsigned 16-bit width and height
        width, height = struct.unpack("<HH", data[18:22])
    elif dib_size >= 40:  # BITMAPINFOHEADER and later: signed 32-bit; negative height means top-down rows
        width, height = struct.unpack("<ii", data[18:26])
        height = abs(height)
    else:
        raise InvalidImage(f"BMP has an unknown DIB header size {dib_size}")
    return _checked("bmp", width, height)


# Pixels converted per step. Whole-image arithmetic needs its temporaries at full size: the float32
# compositing this replaces took ~1.7 GB for a 40 MP RGBA PNG of 160 KB (~2 GB at 16 bits), past the 1 GiB
# container limit. Per block, the temporaries are a few MB whatever the image size; only the output is full.
_BLOCK_PIXELS = 1 << 18


def _to_bgr8(image: np.ndarray) -> np.ndarray:
    """An IMREAD_UNCHANGED result (gray, gray+alpha, BGR, BGRA; 8 or 16 bits) -> BGR uint8, alpha composited."""
    if image.dtype not in (np.uint8, np.uint16):
        raise InvalidImage(f"unsupported sample type {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    height, width, channels = image.shape
    if channels not in (1, 2, 3, 4):
        raise InvalidImage(f"unsupported channel count {channels}")
    if image.dtype == np.uint8 and channels == 3:
        return image
    if image.dtype == np.uint8 and channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    out = np.empty((height, width, 3), np.uint8)
    pixels = np.ascontiguousarray(image).reshape(height * width, channels)  # imdecode's array: no copy
    result = out.reshape(height * width, 3)
    for start in range(0, height * width, _BLOCK_PIXELS):
        block = pixels[start : start + _BLOCK_PIXELS]
        if block.dtype == np.uint16:
            block = ((block.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(x * 255 / 65535)
        color = block[:, :3] if channels >= 3 else block[:, :1]  # gray (n, 1) broadcasts to BGR below
        if channels in (2, 4):
            color = _over_white(color, block[:, -1:])
        result[start : start + len(block)] = color
    return out


def _over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """round((c * a + 255 * (255 - a)) / 255) for uint8 colour (n, k) and alpha (n, 1), exactly, in uint16.

    c * a + 255 * (255 - a) = 65025 - a * (255 - c), at most 65025, so with the +127 of rounding it fits in 16
    bits; x / 255 never ends in exactly .5 (255 is odd), so (x + 127) // 255 is round-to-nearest."""
    inverse = np.subtract(255, color, dtype=np.uint16)
    inverse *= alpha
    np.subtract(65025 + 127, inverse, out=inverse)
    inverse //= 255
    return inverse.astype(np.uint8)
