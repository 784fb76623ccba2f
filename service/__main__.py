"""`python -m service`: serve the API with uvicorn on HOST:PORT (settings from the environment, see README)."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.gallery import GallerySetupError, check_gallery
from service.http_protocol import guarded_protocol
from service.settings import Settings

# Blocks of this size and more get their own memory mapping, returned to the OS when freed.
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
# Free memory at the top of a heap is handed back to the OS only beyond this much.
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024


def return_large_blocks_to_the_os() -> None:
    """Fix glibc malloc's mmap threshold, and keep a working set's worth of freed memory in the heaps.

    The mmap threshold: by default it rises (up to 32 MiB) each time a large block is freed; from then on request
    bodies and images come from the heap, and the heap keeps them after the request. Measured on a real server:
    RSS 158 -> 335 MB after one 267 MB JSON /enroll and still 300 MB later; with the fixed threshold it went back
    to 159 MB.

    The trim threshold: fixing the mmap threshold also fixes the trim threshold at its default, 128 KiB, so each
    inference thread's heap gave back the pages of every request's images and blobs when the request ended, and
    the next request faulted them in again: measured, about 1,770 page faults per /detect of a 640x480 JPEG and
    3,540 per /verify. With 64 MiB: none (2 per request), /verify p50 a few ms lower, RSS about 17 MB higher.
    Blocks of 4 MiB and more still come and go as mappings. MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in
    the environment still win."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): their allocators behave differently, nothing to set
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        libc.mallopt(m_trim_threshold, TRIM_THRESHOLD_BYTES)


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:  # a readable refusal, not a traceback, for a bad environment
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    return_large_blocks_to_the_os()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:  # an unreachable database or one without pgvector is a configuration error too: say so, exit 2
        check_gallery(settings.gallery_url, timeout_s=settings.gallery_timeout_s)
    except GallerySetupError as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    # One process per SQLite gallery: it owns the file and its in-memory search matrix (a second process would
    # not see the first one's enrolments); a PostgreSQL gallery takes any number of replicas. Concurrency comes
    # from FACE_INFERENCE_WORKERS threads, since ONNX Runtime and OpenCV release the GIL while they compute.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Bodies are bounded by BodyLimitMiddleware; keep-alive connections idle out quickly.
        timeout_keep_alive=5,
        # h11 with a header timeout and JSON answers to malformed framing (service/http_protocol.py).
        http=guarded_protocol(settings.header_timeout_s),
        # WebSocket /stream: a frame larger than its limit (and some slack for the app's own clear error) is
        # refused by the protocol with close code 1009 before it is read whole.
        ws_max_size=settings.stream_max_frame_bytes + 64 * 1024,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
