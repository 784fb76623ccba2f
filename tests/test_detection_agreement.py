"""The served ONNX detector agrees with the PyTorch model it was exported from, on real photos."""

from __future__ import annotations

import numpy as np
import pytest

from evaluate import detection


def test_match_boxes_is_one_to_one_and_greedy_by_iou():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 9]], dtype=np.float32)
    b = np.array([[0, 0, 10, 9], [50, 50, 60, 60]], dtype=np.float32)
    # a[1] == b[0] exactly (IoU 1) wins over a[0]-b[0] (0.9); b[1] matches nothing.
    assert detection.match_boxes(a, b) == [(1, 0, 1.0)]
    assert detection.iou_matrix(a[:1], b[:1])[0, 0] == pytest.approx(0.9)


@pytest.fixture(scope="module")
def detector_and_reference(models_dir):
    pytest.importorskip("torch")
    from service.detector import RetinaFaceDetector

    detector = RetinaFaceDetector(models_dir / "retinaface_mnet025.onnx")
    return detector, detection.reference_for(detector, detection.default_torch_model())


def _photos(faces_dir):
    return sorted((faces_dir / "groups").glob("*.jpg")) + [
        faces_dir / "pairs" / name for name in ("img1.jpg", "img20.jpg", "img33.jpg")
    ]


def test_onnx_detector_agrees_with_pytorch_on_real_photos(detector_and_reference, faces_dir, figures):
    detector, reference = detector_and_reference
    result = detection.agreement(detector, reference, _photos(faces_dir), faces_dir)
    figures("\n".join(detection.report_lines(result)))
    s = result["summary"]
    assert s["onnx_faces"] >= 9  # couple 2 + selfie 6 + mirror 1 at least, plus the portraits
    assert s["onnx_only"] == 0 and s["torch_only"] == 0
    assert s["min_iou"] > 0.999
    assert s["max_landmark_error_px"] < 0.05
    assert s["max_score_diff"] < 1e-4


def test_a_decoding_regression_shows_up_as_a_number(detector_and_reference, faces_dir):
    # The same served model with a wrong box variance (0.25 instead of 0.2): boxes come out the wrong size.
    detector, reference = detector_and_reference
    original = detector.variance
    try:
        detector.variance = (original[0], 0.25)
        result = detection.agreement(detector, reference, [faces_dir / "groups" / "couple.jpg"], faces_dir)
    finally:
        detector.variance = original
    s = result["summary"]
    assert s["matched"] < s["torch_faces"] or s["min_iou"] < 0.95
