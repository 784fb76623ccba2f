"""Structural checks of an image container, made before any decoder sees the bytes.

The header probe (service.images) bounds what a decode may ALLOCATE for pixels; these walks bound everything
else a decoder would trust. Each one reads the container's own framing (PNG chunks, JPEG markers, RIFF chunks,
the BMP headers) in one pass, in time linear in the body and constant memory, and refuses with InvalidImage a
file no encoder writes:

- a length that points past the end of the body (a 44-byte PNG whose chunk declares 4 GB made libpng reserve
  4 GB before failing);
- a PNG chunk whose CRC is wrong, an unknown critical chunk, too many or too large ancillary chunks, no IDAT,
  no IEND;
- a JPEG without a frame header, scan data or end-of-image marker, with more scans than any encoder writes,
  or a progressive scan that repeats a refinement already made. libjpeg only warns about such a "bogus
  progression" and decodes every scan again over the whole image: a 150 KB progressive 4000x4000 JPEG whose
  last scan is repeated thousands of times held a worker for 54 s;
- a RIFF size or WebP chunk size past the end, a WebP with no image chunk;
- a BMP whose pixel array (or palette) is not in the file.

Limits are generous for real files and listed below so the README can quote them.
"""

from __future__ import annotations

import re
import struct
import zlib

from service.errors import InvalidImage

# PNG: real files carry a handful of ancillary chunks (colour profile, text, EXIF, physical size); an encoder
# splits IDAT into many chunks, which are not counted against these caps.
MAX_PNG_ANCILLARY_CHUNKS = 256
MAX_PNG_ANCILLARY_CHUNK_BYTES = 4 * 1024 * 1024
# JPEG: libjpeg writes 10 scans for a progressive colour image (6 for gray), mozjpeg up to about 20.
MAX_JPEG_SCANS = 100
# Header segments (tables, APPn, COM) of a JPEG, and chunks of a WebP container.
MAX_JPEG_SEGMENTS = 1024
MAX_WEBP_CHUNKS = 1024

_PNG_CRITICAL = {b"IHDR", b"PLTE", b"IDAT", b"IEND"}


def check_structure(fmt: str, data: bytes) -> None:
    """Raise InvalidImage when `data` (already identified as `fmt` by its signature) is not well formed."""
    {"png": check_png, "jpeg": check_jpeg, "webp": check_webp, "bmp": check_bmp}[fmt](data)


# --- PNG ----------------------------------------------------------------------------------------------------


def check_png(data: bytes) -> None:
    n = len(data)
    pos = 8
    ancillary = 0
    idat_state = 0  # 0: none yet, 1: in the IDAT run, 2: after it
    first = True
    while True:
        if pos + 8 > n:
            raise InvalidImage("PNG is truncated: it ends before its IEND chunk")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        name = kind.decode("latin-1")
        if not kind.isalpha() or not kind.isascii():
            raise InvalidImage(f"PNG is corrupt: chunk type {kind!r} at byte {pos} is not four letters")
        if length > 2**31 - 1 or pos + 12 + length > n:
            raise InvalidImage(
                f"PNG chunk {name} at byte {pos} declares {length} bytes, but only {max(0, n - pos - 12)} remain"
            )
        body_end = pos + 8 + length
        (crc,) = struct.unpack(">I", data[body_end : body_end + 4])
        if zlib.crc32(data[pos + 4 : body_end]) != crc:
            raise InvalidImage(f"PNG chunk {name} at byte {pos} fails its CRC check (corrupt data)")
        if first and (kind != b"IHDR" or length != 13):
            raise InvalidImage("PNG does not start with a 13-byte IHDR chunk")
        first = False
        if kind == b"IDAT":
            if idat_state == 2:
                raise InvalidImage("PNG is corrupt: its IDAT chunks are not consecutive")
            idat_state = 1
        elif idat_state == 1:
            idat_state = 2
        if kind == b"IEND":
            break
        if kind[0:1].islower():  # ancillary: safe for a decoder to skip, so only its size is at stake
            ancillary += 1
            if ancillary > MAX_PNG_ANCILLARY_CHUNKS:
                raise InvalidImage(f"PNG has more than {MAX_PNG_ANCILLARY_CHUNKS} ancillary chunks")
            if length > MAX_PNG_ANCILLARY_CHUNK_BYTES:
                raise InvalidImage(
                    f"PNG ancillary chunk {name} is {length} bytes, the limit is {MAX_PNG_ANCILLARY_CHUNK_BYTES}"
                )
        elif kind not in _PNG_CRITICAL:
            raise InvalidImage(f"PNG has an unknown critical chunk {name}")
        pos = body_end + 4
    if idat_state == 0:
        raise InvalidImage("PNG has no image data (no IDAT chunk before IEND)")


# --- JPEG ---------------------------------------------------------------------------------------------------

# SOF markers (frame headers); the progressive ones: Huffman C2, C6 and arithmetic CA, CE.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
# The next marker after entropy-coded data: 0xFF, then a byte that is neither a stuffed zero, a restart marker
# (RSTn belongs to the scan) nor another 0xFF (a fill byte: the marker is at the last 0xFF of a run). Written with
# a single 0xFF, not `\xff+`: that form backtracks at every byte of a run of 0xFF (re tries each start position,
# and from each one re-reads the rest of the run), so a 30 KB JPEG whose scan data is a run of 0xFF held a worker
# for 5.6 s, and the time grows with the square of the run; it was also 20 times slower on every real photo
# (1.1 ms against 0.05 ms on the benchmark's 640x480 frame), since re cannot start the search with a plain byte scan.
_MARKER_BYTE = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def next_marker(data: bytes, start: int) -> int | None:
    """Offset of the first marker at or after `start` in entropy-coded data, counting the fill bytes (0xFF) that
    precede it as its own; None when there is none. Linear in the bytes searched, whatever they hold."""
    found = _MARKER_BYTE.search(data, start)
    if found is None:
        return None
    pos = found.start()
    run = data[start:pos]  # a slice and rstrip, not a byte loop: fill runs may be megabytes long in a hostile file
    return pos - (len(run) - len(run.rstrip(b"\xff")))


def check_jpeg(data: bytes) -> None:
    n = len(data)
    pos = 2
    components: list[int] | None = None  # component ids from the frame header
    progressive = False
    coef_bits: dict[int, list[int]] = {}  # progressive: per component, the last Al coded for each coefficient
    coded: set[int] = set()  # sequential: components already coded by a scan
    scans = 0
    segments = 0
    while True:
        if pos >= n:
            raise InvalidImage("JPEG is truncated: it ends without an end-of-image marker")
        if data[pos] != 0xFF:
            raise InvalidImage(f"JPEG is corrupt: expected a marker at byte {pos}")
        while pos < n and data[pos] == 0xFF:  # fill bytes may precede any marker
            pos += 1
        if pos >= n:
            raise InvalidImage("JPEG is truncated: it ends inside a marker")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM and RSTn stand alone
            continue
        if marker == 0xD8:
            raise InvalidImage("JPEG is corrupt: a second start-of-image marker")
        if pos + 2 > n:
            raise InvalidImage("JPEG is truncated inside a segment header")
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        end = pos + length
        if length < 2 or end > n:
            raise InvalidImage(
                f"JPEG segment 0x{marker:02X} at byte {pos - 2} declares {length} bytes, "
                f"but only {n - pos} remain"
            )
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise InvalidImage(f"JPEG has more than {MAX_JPEG_SEGMENTS} segments")
        payload = data[pos + 2 : end]
        if marker in _SOF:
            if components is not None:
                raise InvalidImage("JPEG has more than one frame header (hierarchical JPEG is not supported)")
            if len(payload) < 6 or len(payload) < 6 + 3 * payload[5] or payload[5] == 0:
                raise InvalidImage("JPEG frame header is corrupt")
            components = [payload[6 + 3 * i] for i in range(payload[5])]
            progressive = marker in _PROGRESSIVE
            coef_bits = {c: [-1] * 64 for c in components}
        elif marker == 0xDA:  # SOS: a scan header, then entropy-coded data up to the next marker
            if components is None:
                raise InvalidImage("JPEG has scan data before its frame header")
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise InvalidImage(f"JPEG has more than {MAX_JPEG_SCANS} scans")
            _check_scan(payload, components, progressive, coef_bits, coded, scans)
            found = next_marker(data, end)
            if found is None:
                raise InvalidImage("JPEG is truncated: its scan data has no end-of-image marker after it")
            if found == end:
                raise InvalidImage(f"JPEG scan {scans} has no data")
            pos = found
            continue
        pos = end
    if scans == 0:
        raise InvalidImage("JPEG has no scan data")


def _check_scan(
    header: bytes,
    components: list[int],
    progressive: bool,
    coef_bits: dict[int, list[int]],
    coded: set[int],
    number: int,
) -> None:
    """A scan header must name frame components and, when progressive, advance what is known of each
    coefficient the way ITU T.81 G.1.1.1 allows: a first pass over a band, then refinements one bit at a time."""
    if not header or len(header) != 1 + 2 * header[0] + 3 or not 1 <= header[0] <= 4:
        raise InvalidImage(f"JPEG scan {number} header is corrupt")
    ids = [header[1 + 2 * i] for i in range(header[0])]
    if any(c not in components for c in ids) or len(set(ids)) != len(ids):
        raise InvalidImage(f"JPEG scan {number} names a component its frame does not have")
    ss, se, approx = header[-3], header[-2], header[-1]
    ah, al = approx >> 4, approx & 0x0F
    if not progressive:
        if coded & set(ids):
            raise InvalidImage(f"JPEG scan {number} codes a component a previous scan already coded")
        coded.update(ids)
        return
    bogus = InvalidImage(f"JPEG progressive scan {number} repeats or skips a refinement (bogus progression)")
    if se > 63 or ss > se or (ss == 0 and se != 0) or (ss > 0 and len(ids) != 1) or al > 13 or ah > 13:
        raise bogus
    if ah != 0 and al != ah - 1:
        raise bogus
    for c in ids:
        bits = coef_bits[c]
        if ss > 0 and bits[0] < 0:  # AC before the first DC scan of this component
            raise bogus
        for k in range(ss, se + 1):
            if bits[k] != (-1 if ah == 0 else ah):
                raise bogus
            bits[k] = al


# --- WebP ---------------------------------------------------------------------------------------------------


def check_webp(data: bytes) -> None:
    (riff_size,) = struct.unpack("<I", data[4:8])
    end = riff_size + 8
    if riff_size < 4 or end > len(data):
        raise InvalidImage(f"WebP RIFF header declares {riff_size} bytes, but the file has {len(data) - 8}")
    pos = 12
    chunks = 0
    image_chunk = False
    while pos < end:
        if pos + 8 > end:
            raise InvalidImage("WebP is truncated inside a chunk header")
        fourcc, size = struct.unpack("<4sI", data[pos : pos + 8])
        chunk_end = pos + 8 + size
        if chunk_end > end:
            raise InvalidImage(
                f"WebP chunk {fourcc!r} at byte {pos} declares {size} bytes, but only {end - pos - 8} remain"
            )
        chunks += 1
        if chunks > MAX_WEBP_CHUNKS:
            raise InvalidImage(f"WebP has more than {MAX_WEBP_CHUNKS} chunks")
        if fourcc == b"VP8 ":
            # Frame tag: bit 0 clear on a key frame; bits 5.. the first partition's size, which must fit.
            if size < 10:
                raise InvalidImage("WebP (lossy) image chunk is too short")
            tag = int.from_bytes(data[pos + 8 : pos + 11], "little")
            if tag & 1 or (tag >> 5) > size - 10:
                raise InvalidImage("WebP (lossy) frame header is corrupt")
            image_chunk = True
        elif fourcc == b"VP8L":
            if size < 5:
                raise InvalidImage("WebP (lossless) image chunk is too short")
            image_chunk = True
        elif fourcc == b"ANMF":
            raise InvalidImage("animated WebP is not supported")
        pos = chunk_end + (size & 1)  # chunks are padded to an even size
    if not image_chunk:
        raise InvalidImage("WebP has no image data (no VP8 or VP8L chunk)")


# --- BMP ----------------------------------------------------------------------------------------------------

_BMP_BITS = {1, 4, 8, 16, 24, 32}
# BI_RGB, BI_RLE8, BI_RLE4, BI_BITFIELDS, BI_ALPHABITFIELDS
_BMP_COMPRESSION = {0, 1, 2, 3, 6}


def check_bmp(data: bytes) -> None:
    n = len(data)
    (offset,) = struct.unpack("<I", data[10:14])
    (dib_size,) = struct.unpack("<I", data[14:18])
    if 14 + dib_size > n:
        raise InvalidImage(f"BMP info header declares {dib_size} bytes, but the file ends first")
    if dib_size == 12:
        width, height, planes, bits = struct.unpack("<HHHH", data[18:26])
        compression, colours = 0, 0
    else:
        width, height, planes, bits, compression = struct.unpack("<iiHHI", data[18:34])
        (colours,) = struct.unpack("<I", data[46:50]) if dib_size >= 40 else (0,)
    height = abs(height)
    if planes != 1 or bits not in _BMP_BITS:
        raise InvalidImage(f"BMP header is corrupt ({planes} planes, {bits} bits per pixel)")
    if compression not in _BMP_COMPRESSION:
        raise InvalidImage(f"BMP compression {compression} is not supported")
    if bits <= 8 and colours > (1 << bits):
        raise InvalidImage(f"BMP palette declares {colours} colours for {bits}-bit pixels")
    if not 14 + dib_size <= offset < n:
        raise InvalidImage(f"BMP pixel data offset {offset} is outside the file ({n} bytes)")
    if compression in (0, 3, 6):  # uncompressed rows, each padded to 4 bytes: the size is known exactly
        needed = ((width * bits + 31) // 32) * 4 * height
        if offset + needed > n:
            raise InvalidImage(f"BMP is truncated: its pixel array needs {needed} bytes, {n - offset} are present")
