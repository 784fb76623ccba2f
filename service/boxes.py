"""Box maths for RetinaFace-style detectors, as pure numpy functions: anchor priors, decoding, NMS.

Each in one place, shared by the service's detector (service/detector.py) and whatever else decodes the same
outputs. Why decoding stays outside the ONNX graph is measured in detector.py's docstring.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np


def prior_boxes(
    height: int, width: int, min_sizes: Sequence[Sequence[int]], steps: Sequence[int]
) -> np.ndarray:
    """Anchor boxes `[P, 4]` float32 as (centre x, centre y, width, height) in input pixels, read-only.

    Same order as the network's outputs: level by level (one per step), cells row-major over a
    `ceil(height/step) x ceil(width/step)` grid, then one prior per min size in that cell. Centres sit at
    `(col + 0.5) * step, (row + 0.5) * step`; sizes are square, `min_size` pixels. Cached per argument set.
    (biubug6 builds the same boxes divided by the image size; in pixels they decode straight into pixels.)
    """
    return _prior_boxes(
        int(height), int(width), tuple(tuple(int(s) for s in sizes) for sizes in min_sizes), tuple(map(int, steps))
    )


@functools.lru_cache(maxsize=64)
def _prior_boxes(height: int, width: int, min_sizes: tuple, steps: tuple) -> np.ndarray:
    if len(min_sizes) != len(steps):
        raise ValueError(f"{len(min_sizes)} min_sizes groups for {len(steps)} steps")
    levels = []
    for sizes, step in zip(min_sizes, steps):
        rows, cols = -(-height // step), -(-width // step)  # ceil division, as the strided convs round up
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * step, (np.arange(cols) + 0.5) * step, indexing="ij")
        centres = np.stack([cx.ravel(), cy.ravel()], axis=1)  # [cells, 2], row-major
        n = len(sizes)
        level = np.empty((len(centres), n, 4), dtype=np.float32)
        level[:, :, :2] = centres[:, None, :]
        level[:, :, 2:] = np.asarray(sizes, dtype=np.float32)[None, :, None]
        levels.append(level.reshape(-1, 4))
    priors = np.concatenate(levels, axis=0) if levels else np.zeros((0, 4), np.float32)
    priors.setflags(write=False)  # shared by every call at this size
    return priors


def decode_boxes(loc: np.ndarray, priors: np.ndarray, variance: Sequence[float]) -> np.ndarray:
    """Raw offsets `[P, 4]` (cx, cy, log w, log h) -> corner boxes `[P, 4]` (x1, y1, x2, y2) in prior units.

    centre = prior centre + offset * variance[0] * prior size; size = prior size * exp(offset * variance[1]).
    """
    centre = priors[:, :2] + loc[:, :2] * variance[0] * priors[:, 2:]
    size = priors[:, 2:] * np.exp(loc[:, 2:] * variance[1])
    return np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32, copy=False)


def decode_landmarks(landmarks: np.ndarray, priors: np.ndarray, variance: Sequence[float]) -> np.ndarray:
    """Raw offsets `[P, 10]` -> points `[P, 5, 2]` (x, y): prior centre + offset * variance[0] * prior size."""
    offsets = landmarks.reshape(-1, 5, 2)
    points = priors[:, None, :2] + offsets * variance[0] * priors[:, None, 2:]
    return points.astype(np.float32, copy=False)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices of the kept boxes, highest score first.

    boxes `[N, 4]` (x1, y1, x2, y2), scores `[N]`. A box is dropped when its IoU with a higher-scored kept box
    exceeds `iou_threshold`. Areas are continuous (x2 - x1), not biubug6's pixel-inclusive (+1). The loop runs
    once per *kept* box, each step vectorised over the remaining candidates.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    order = np.argsort(-np.asarray(scores), kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        w = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        inter = w * h
        iou = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)
