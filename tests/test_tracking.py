"""The face tracker (service/tracking.py), pure numpy: association, birth and death of tracks, when a face is embedded
again, and the identity a track rests on. The same tracker over real video is tested in tests/test_stream.py."""

from __future__ import annotations

import numpy as np
import pytest

from service.tracking import Tracker, iou_matrix, sharpness


def face(x: float, y: float, size: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """A box with its top-left corner at (x, y) and five landmarks inside it, as the detector gives them."""
    box = np.array([x, y, x + size, y + size], np.float32)
    relative = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]], np.float32)
    return box, np.array([x, y], np.float32) + relative * size


def frame(*faces) -> tuple[np.ndarray, np.ndarray]:
    if not faces:
        return np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32)
    return np.stack([b for b, _ in faces]), np.stack([p for _, p in faces])


def test_iou_matrix():
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    assert iou_matrix(a, b) == pytest.approx(np.array([[1.0, 50 / 150, 0.0], [0.0, 0.0, 0.0]]))


def test_two_faces_keep_their_ids_while_they_move_and_a_new_one_gets_a_new_id():
    tracker = Tracker()
    first = tracker.update(0, *frame(face(50, 100), face(400, 100)))
    left, right = first[0].track_id, first[1].track_id
    assert left != right
    for t in range(1, 30):  # 8 px a frame towards each other, listed in the other order
        tracks = tracker.update(t, *frame(face(400 - 8 * t, 100), face(50 + 8 * t, 100)))
        assert [tr.track_id for tr in tracks] == [right, left]
    newcomer = tracker.update(30, *frame(face(50 + 240, 100), face(400 - 240, 100), face(300, 350)))[2]
    assert newcomer.track_id not in (left, right)


def test_a_fast_face_is_followed_by_its_velocity_where_boxes_no_longer_overlap():
    tracker = Tracker(centre_threshold=0.2)
    xs = [20 * t for t in range(5)] + [80 + 60 * t for t in range(1, 8)]  # 20 px a frame, then 60
    ids = {tracker.update(t, *frame(face(x, 100)))[0].track_id for t, x in enumerate(xs)}
    # 60 px a frame on a 100 px face: consecutive boxes overlap with IoU 0.25, under the 0.3 needed, and the centres
    # are 0.6 face widths apart, over the 0.2 allowed; only the position predicted from the velocity matches.
    assert iou_matrix(*(face(0, 0)[0][None], face(60, 0)[0][None]))[0, 0] < 0.3
    assert len(ids) == 1


def test_a_track_survives_a_few_missed_frames_and_ends_after_max_missed():
    tracker = Tracker(max_missed=3)
    track = tracker.update(0, *frame(face(100, 100)))[0]
    for t in (1, 2, 3):
        tracker.update(t, *frame())
    assert tracker.update(4, *frame(face(102, 100)))[0] is track  # back after 3 missed frames
    for t in range(5, 9):
        tracker.update(t, *frame())
    assert tracker.tracks == []
    assert tracker.update(9, *frame(face(102, 100)))[0].track_id != track.track_id


def test_embedding_is_needed_on_a_new_track_every_n_frames_and_for_a_clearly_better_view():
    tracker = Tracker(embed_every=10, grow_ratio=1.3, sharper_ratio=1.5)
    track = tracker.update(0, *frame(face(100, 100)))[0]
    assert tracker.needs_embedding(track, 0, area=10_000, sharp=50)
    tracker.add_embedding(track, np.eye(4, dtype=np.float32)[0], 0, area=10_000, sharp=50)
    assert not tracker.needs_embedding(track, 5, area=11_000, sharp=60)  # about the same view
    assert tracker.needs_embedding(track, 10, area=10_000, sharp=50)  # N frames later
    assert tracker.needs_embedding(track, 5, area=13_000, sharp=50)  # 1.3 x larger
    assert tracker.needs_embedding(track, 5, area=10_000, sharp=75)  # 1.5 x sharper


def test_the_identity_rests_on_the_mean_of_the_last_embeddings():
    tracker = Tracker(history=3)
    track = tracker.update(0, *frame(face(100, 100)))[0]
    assert track.identity_embedding() is None
    vectors = np.eye(4, dtype=np.float32)
    for i, vector in enumerate(vectors):  # four embeddings; the first falls out of the history of 3
        tracker.add_embedding(track, vector, i, area=1.0, sharp=1.0)
    assert len(track.embeddings) == 3
    assert track.identity_embedding() == pytest.approx(np.array([0, 1, 1, 1]) / np.sqrt(3), abs=1e-6)


def test_sharpness_ranks_a_blurred_view_below_the_sharp_one():
    rng = np.random.default_rng(0)
    sharp_image = rng.integers(0, 255, (200, 200), dtype=np.uint8)
    import cv2

    blurred = cv2.GaussianBlur(sharp_image, (0, 0), 3)
    box = np.array([20, 20, 180, 180], np.float32)
    assert sharpness(sharp_image, box) > 10 * sharpness(blurred, box) > 0
    assert sharpness(sharp_image, np.array([-50, -50, 1, 1], np.float32)) == 0.0  # outside the frame
