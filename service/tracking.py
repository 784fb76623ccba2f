"""Face tracks across the frames of a video stream, in numpy: which detection of this frame is which face of the
last ones, when a face is worth embedding again, and who a track is (smoothed over its last embeddings).

Association is greedy on a cost of 1 - IoU plus the distance between landmark centres (in face widths), each
track's position first moved on by its last velocity: a face walking across the frame still overlaps where it
is predicted to be. A pair is allowed when the IoU is high enough or the centres are close enough; faces of a
video are few (tens at most), so greedy matching on the sorted costs is as good as the Hungarian method here and
needs no scipy. Why not a library: BENCHMARKS.md ("Video streams", "Tracker") measured norfair against this one:
both kept every id and cost far below a detection, but norfair pins numpy < 2, which the service's OpenCV refuses.

A track is born on its first detection and dies after `max_missed` processed frames without one. It is embedded
when it is born and then only when needed (`needs_embedding`): every `embed_every` frames, or sooner when the
face is clearly larger or sharper than when it was last embedded (a better view of the same person). Its
identity rests on the mean of its last `history` embeddings, so that one blurred frame does not flip a name.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import numpy as np


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in `a` (N, 4) with every box in `b` (M, 4), boxes x1, y1, x2, y2: (N, M)."""
    a = a[:, None, :]
    b = b[None, :, :]
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    area_a = np.clip(a[..., 2] - a[..., 0], 0, None) * np.clip(a[..., 3] - a[..., 1], 0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def sharpness(gray: np.ndarray, box: np.ndarray, side: int = 64) -> float:
    """Variance of the Laplacian of the face's box, sampled to about `side` pixels across (so that the figure
    compares views of one face at different sizes): higher is sharper. `gray` is (H, W) uint8."""
    h, w = gray.shape[:2]
    x1, y1, x2, y2 = (round(float(v)) for v in box)
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if x2 - x1 < 4 or y2 - y1 < 4:
        return 0.0
    step = max(1, (x2 - x1) // side)
    crop = gray[y1:y2:step, x1:x2:step].astype(np.float32)
    if crop.shape[0] < 3 or crop.shape[1] < 3:
        return 0.0
    lap = (
        crop[:-2, 1:-1] + crop[2:, 1:-1] + crop[1:-1, :-2] + crop[1:-1, 2:] - 4.0 * crop[1:-1, 1:-1]
    )
    return float(lap.var())


@dataclass
class Track:
    track_id: int
    box: np.ndarray  # (4,) latest matched box
    centre: np.ndarray  # (2,) mean of the latest landmarks
    born: int  # frame number of the first detection
    seen: int  # frame number of the latest detection
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2, np.float32))  # pixels per frame
    hits: int = 1
    embeddings: deque = field(default_factory=lambda: deque(maxlen=5))
    embedded_frame: int | None = None
    embedded_area: float = 0.0
    embedded_sharpness: float = 0.0
    # Set by whoever searches the gallery with identity_embedding(): the answer, and the embeddings it rested on.
    identity: Any = None
    identity_embeddings: int = 0
    searched_at: float = float("-inf")

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    def identity_embedding(self) -> np.ndarray | None:
        """The unit mean of the last embeddings: what the track's identity is decided on."""
        if not self.embeddings:
            return None
        mean = np.mean(np.stack(self.embeddings), axis=0)
        return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


class Tracker:
    """Tracks of one stream; not thread-safe (a stream processes its frames one at a time)."""

    def __init__(
        self,
        *,
        iou_threshold: float = 0.3,
        centre_threshold: float = 0.5,
        max_missed: int = 15,
        embed_every: int = 15,
        grow_ratio: float = 1.3,
        sharper_ratio: float = 1.5,
        history: int = 5,
    ):
        self.iou_threshold = iou_threshold
        self.centre_threshold = centre_threshold
        self.max_missed = max_missed
        self.embed_every = embed_every
        self.grow_ratio = grow_ratio
        self.sharper_ratio = sharper_ratio
        self.history = history
        self.tracks: list[Track] = []
        self._ids = count(1)

    def update(self, frame: int, boxes: np.ndarray, landmarks: np.ndarray) -> list[Track]:
        """This frame's detections (boxes (N, 4), landmarks (N, 5, 2)) -> the track of each, in their order.
        Unmatched detections start tracks; tracks unseen for more than `max_missed` frames end."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        centres = np.asarray(landmarks, np.float32).reshape(-1, 5, 2).mean(axis=1)
        assigned: list[Track | None] = [None] * len(boxes)
        if self.tracks and len(boxes):
            gap = np.array([frame - t.seen for t in self.tracks], np.float32)[:, None]
            shift = np.stack([t.velocity for t in self.tracks]) * gap  # (T, 2): where each track should be now
            predicted = np.stack([t.box for t in self.tracks]) + np.concatenate([shift, shift], axis=1)
            overlap = iou_matrix(predicted, boxes)
            widths = np.maximum(np.array([t.width for t in self.tracks], np.float32), 1.0)[:, None]
            expected = np.stack([t.centre for t in self.tracks]) + shift
            distance = np.linalg.norm(expected[:, None, :] - centres[None, :, :], axis=2) / widths
            cost = (1.0 - overlap) + distance
            allowed = (overlap >= self.iou_threshold) | (distance <= self.centre_threshold)
            used_tracks: set[int] = set()
            for flat in np.argsort(np.where(allowed, cost, np.inf), axis=None):
                ti, di = divmod(int(flat), len(boxes))
                if not allowed[ti, di]:
                    break  # the rest are disallowed too: they sort last
                if ti in used_tracks or assigned[di] is not None:
                    continue
                used_tracks.add(ti)
                assigned[di] = self._follow(self.tracks[ti], frame, boxes[di], centres[di])
        for di, track in enumerate(assigned):
            if track is None:
                track = Track(
                    next(self._ids), boxes[di].copy(), centres[di].copy(), born=frame, seen=frame,
                    embeddings=deque(maxlen=self.history),
                )
                self.tracks.append(track)
                assigned[di] = track
        self.tracks = [t for t in self.tracks if frame - t.seen <= self.max_missed]
        return assigned  # type: ignore[return-value]

    def _follow(self, track: Track, frame: int, box: np.ndarray, centre: np.ndarray) -> Track:
        gap = max(frame - track.seen, 1)
        moved = (centre - track.centre) / gap
        # Smoothed, so that one jittery detection does not throw the prediction off.
        track.velocity = (0.5 * track.velocity + 0.5 * moved).astype(np.float32)
        track.box, track.centre, track.seen = box.copy(), centre.copy(), frame
        track.hits += 1
        return track

    def needs_embedding(self, track: Track, frame: int, area: float, sharp: float) -> bool:
        """Embed now? On a new track, every `embed_every` frames, or when the face is clearly larger or sharper
        than at its last embedding."""
        if track.embedded_frame is None:
            return True
        if frame - track.embedded_frame >= self.embed_every:
            return True
        if area >= self.grow_ratio * track.embedded_area:
            return True
        return sharp >= self.sharper_ratio * track.embedded_sharpness > 0

    @staticmethod
    def add_embedding(track: Track, embedding: np.ndarray, frame: int, area: float, sharp: float) -> None:
        track.embeddings.append(np.asarray(embedding, np.float32))
        track.embedded_frame, track.embedded_area, track.embedded_sharpness = frame, area, sharp
