"""Synthetic video of real faces: heads cut from real photos, moved across a textured background.

What the /stream tests, the browser test (as Chromium's fake camera) and the stream benchmark play: the faces are
real (shared photos), only their motion is made up, and it is known, so a tracker's ids can be checked against it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np


def head_patch(photo: np.ndarray, box: Sequence[float], face_width: int = 110) -> np.ndarray:
    """A square cut around a face box (2.2 face widths across, so hair, chin and some background come with
    it), scaled so that the face is about `face_width` pixels wide."""
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy, width = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1
    side = 2.2 * width
    h, w = photo.shape[:2]
    left, top = round(cx - side / 2), round(cy - side / 2)
    padded = cv2.copyMakeBorder(photo, h, h, w, w, cv2.BORDER_REFLECT)
    crop = padded[top + h : top + h + int(side), left + w : left + w + int(side)]
    target = max(8, round(2.2 * face_width))
    return cv2.resize(crop, (target, target), interpolation=cv2.INTER_AREA)


def background(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    """A smooth, slightly textured room-like background (no faces in it)."""
    rng = np.random.default_rng(seed)
    noise = cv2.resize(rng.integers(60, 200, (6, 8, 3), dtype=np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)
    return cv2.GaussianBlur(noise, (0, 0), 9)


def paste(frame: np.ndarray, patch: np.ndarray, x: int, y: int) -> None:
    """Put `patch` with its top-left corner at (x, y), clipped to the frame."""
    h, w = frame.shape[:2]
    ph, pw = patch.shape[:2]
    fx1, fy1, fx2, fy2 = max(x, 0), max(y, 0), min(x + pw, w), min(y + ph, h)
    if fx1 < fx2 and fy1 < fy2:
        frame[fy1:fy2, fx1:fx2] = patch[fy1 - y : fy2 - y, fx1 - x : fx2 - x]


def positions(index: int, count: int, frame: int, frames: int, width: int, height: int, side: int) -> tuple[int, int]:
    """Where head `index` of `count` is on `frame`: each head sways along its own strip, a full back-and-forth
    over `frames` frames (about 200 px), with a little vertical bob."""
    strip = width / count
    phase = 2 * math.pi * frame / max(frames, 1)
    centre_x = strip * (index + 0.5) + min(100.0, strip / 2 - side / 2) * math.sin(phase + index * math.pi)
    centre_y = height / 2 + 20 * math.sin(2 * phase)
    return round(centre_x - side / 2), round(centre_y - side / 2)


def moving_heads(
    patches: Sequence[np.ndarray], frames: int, width: int = 640, height: int = 480
) -> Iterator[tuple[np.ndarray, list[tuple[int, int]]]]:
    """`frames` BGR frames and, for each, every head's top-left corner (in `patches` order)."""
    base = background(width, height)
    for t in range(frames):
        frame = base.copy()
        corners = []
        for i, patch in enumerate(patches):
            x, y = positions(i, len(patches), t, frames, width, height, patch.shape[1])
            paste(frame, patch, x, y)
            corners.append((x, y))
        yield frame, corners


def jpeg(frame: np.ndarray, quality: int = 85) -> bytes:
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()


def write_y4m(path: Path, frames: Sequence[np.ndarray], fps: int = 15) -> Path:
    """A raw YUV4MPEG2 file (4:2:0), what Chromium's --use-file-for-fake-video-capture plays in a loop."""
    h, w = frames[0].shape[:2]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            f.write(b"FRAME\n")
            f.write(cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).tobytes())
    return path
