"""Similarity-transform alignment, checked against hand-computed transforms and an independent least-squares fit."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from export.templates import ARCFACE_TEMPLATE_112
from service.align import align_face, apply_transform, similarity_transform

T = np.array(ARCFACE_TEMPLATE_112)


def test_identity() -> None:
    np.testing.assert_allclose(similarity_transform(T, T), [[1, 0, 0], [0, 1, 0]], atol=1e-12)


def test_recovers_a_hand_written_similarity_exactly() -> None:
    # Scale 2, rotation +90 degrees (x axis -> y axis), then shift (10, 20):
    # (x, y) -> (2 * -y + 10, 2 * x + 20).
    dst = np.stack([-2 * T[:, 1] + 10, 2 * T[:, 0] + 20], axis=1)
    np.testing.assert_allclose(similarity_transform(T, dst), [[0, -2, 10], [2, 0, 20]], atol=1e-9)


def test_recovers_scale_rotation_translation() -> None:
    s, angle, tx, ty = 0.37, np.deg2rad(-23.0), -41.5, 7.25
    c, si = s * np.cos(angle), s * np.sin(angle)
    expected = np.array([[c, -si, tx], [si, c, ty]])
    landmarks = T * 3.1 + [200, 150]  # a face 3x bigger somewhere in a photo
    dst = landmarks @ expected[:, :2].T + expected[:, 2]
    np.testing.assert_allclose(similarity_transform(landmarks, dst), expected, atol=1e-9)


def test_noisy_points_give_the_least_squares_similarity() -> None:
    # Independent check: a similarity is linear in (a, b, tx, ty) with x' = a x - b y + tx, y' = b x + a y + ty;
    # solve that 10x4 system with lstsq and compare.
    rng = np.random.default_rng(7)
    src = T + rng.normal(0, 2.0, T.shape)
    dst = T * 1.5 + rng.normal(0, 2.0, T.shape) + 30
    rows = []
    for x, y in src:
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), dst.reshape(-1), rcond=None)
    np.testing.assert_allclose(similarity_transform(src, dst), [[a, -b, tx], [b, a, ty]], atol=1e-9)


def test_never_returns_a_reflection() -> None:
    mirrored = T * [-1, 1] + [112, 0]  # left-right mirror: only a reflection maps T onto it exactly
    matrix = similarity_transform(T, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_degenerate_and_malformed_points_raise() -> None:
    with pytest.raises(ValueError, match="equal"):
        similarity_transform(np.ones((5, 2)), T)
    with pytest.raises(ValueError):
        similarity_transform(T[:4], T)
    with pytest.raises(ValueError):
        similarity_transform(np.full((5, 2), np.nan), T)


def test_template_landmarks_give_the_top_left_crop_unchanged() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    crop = align_face(image, T, T, (112, 112))
    np.testing.assert_array_equal(crop, image[:112, :112])


def _blobs(shape: tuple[int, int], points: np.ndarray, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.zeros(shape, np.float64)
    for x, y in points:
        image += 255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return np.clip(image, 0, 255).astype(np.uint8)


def test_landmarks_land_on_the_template() -> None:
    # Five bright blobs at rotated and scaled landmark positions in a 400x300 picture; after alignment each
    # blob's centroid must sit on its template point.
    angle, scale = np.deg2rad(25.0), 2.4
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = (T - 56) @ rot.T + [210, 160]
    gray = _blobs((300, 400), landmarks, sigma=2.0 * scale)
    crop = align_face(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), landmarks, T, (112, 112))
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    weights = crop[:, :, 0].astype(np.float64)
    yy, xx = np.mgrid[:112, :112]
    for tx, ty in T:
        near = ((xx - tx) ** 2 + (yy - ty) ** 2) < 6**2
        w = weights * near
        centroid = np.array([(w * xx).sum(), (w * yy).sum()]) / w.sum()
        assert np.linalg.norm(centroid - [tx, ty]) < 0.25


def test_sphereface_template_is_the_arcface_crop_shifted_8_pixels() -> None:
    # The contract: for 112x96 inputs the same points are shifted 8 px left, so the crop is the 112x112 crop
    # without its 8 leftmost and 8 rightmost columns.
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    landmarks = T * 1.3 + [90, 40]
    wide = align_face(image, landmarks, T, (112, 112))
    narrow = align_face(image, landmarks, T - [8, 0], (112, 96))
    assert narrow.shape == (112, 96, 3)
    np.testing.assert_allclose(
        similarity_transform(landmarks, T - [8, 0]),
        similarity_transform(landmarks, T) - [[0, 0, 8], [0, 0, 0]],
        atol=1e-9,
    )
    # warpAffine quantises sub-pixel positions (1/32 px), so the two crops may differ by one grey level.
    assert np.abs(narrow.astype(int) - wide[:, 8:104]).max() <= 1


def test_apply_transform_matches_the_matrix() -> None:
    matrix = np.array([[0.0, -2.0, 10.0], [2.0, 0.0, 20.0]])
    np.testing.assert_allclose(apply_transform(matrix, [[1, 0], [0, 1]]), [[10, 22], [8, 20]])
