"""Face alignment: map five detected landmarks onto an embedder's template with a similarity transform.

A similarity (rotation, uniform scale, translation; 4 degrees of freedom) keeps the face's proportions, which
is what the recognisers were trained on. We solve it in closed form with Umeyama's least-squares method
(the estimator behind skimage's SimilarityTransform, which produced the ArcFace training crops), rather than
with cv2.estimateAffinePartial2D: that function's default is RANSAC (random, and with only five points every
point matters), and its LMEDS mode keeps the best minimal subset instead of using all five points.
Umeyama is deterministic and uses every landmark, which is what we want: with five points there are no
"outliers" to reject, only noise to average.

The template comes from the embedder's metadata (`face.embedder.template`); the exporter's copy of the
standard ones is export/templates.py.
"""

from __future__ import annotations

import cv2
import numpy as np


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The (2, 3) similarity matrix M minimising sum ||M @ [src_i, 1] - dst_i||^2 (Umeyama 1991).

    src, dst: (K, 2) point sets, K >= 2, in (x, y). Returns float64 [[s*cos, -s*sin, tx], [s*sin, s*cos, ty]].
    Degenerate input (all source points equal) raises ValueError.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"expected two (K, 2) point sets with K >= 2, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("points must be finite")

    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_c = src - src_mean
    dst_c = dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12:
        raise ValueError("source points are all equal: no transform is defined")

    # Cross-covariance and its SVD give the best rotation; the sign fix d excludes reflections.
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_var
    translation = dst_mean - scale * rotation @ src_mean

    matrix = np.empty((2, 3), dtype=np.float64)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = translation
    return matrix


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (K, 2) points through a (2, 3) affine matrix."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def align_face(
    image: np.ndarray,
    landmarks: np.ndarray,
    template: np.ndarray,
    size: tuple[int, int],
) -> np.ndarray:
    """Warp `image` so that `landmarks` (5, 2, image pixels) land on `template` (5, 2, crop pixels).

    size: the crop's (height, width), e.g. (112, 112). Returns a uint8 crop (height, width, 3) in the image's
    channel order. Pixels outside the image are black, as in the ArcFace training crops.
    """
    height, width = int(size[0]), int(size[1])
    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    template = np.asarray(template, dtype=np.float64).reshape(-1, 2)
    if landmarks.shape != template.shape:
        raise ValueError(f"landmarks {landmarks.shape} and template {template.shape} differ in shape")
    matrix = similarity_transform(landmarks, template)
    return cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
