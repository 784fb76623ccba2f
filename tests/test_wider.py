"""WIDER FACE evaluation on a tiny hand-made annotation set whose AP is computed by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from evaluate import wider

# Two images. a: faces G1 (0,0,10,10) and G2 (20,0,10,10); b: G3 (0,0,10,10) and G4 (50,50,10,10), where G4 is
# flagged invalid (8th column) and is left out of the "split" keep list below.
GT_TXT = """\
ev/a.jpg
2
0 0 10 10 0 0 0 0 0 0
20 0 10 10 0 0 0 0 0 0
ev/b.jpg
2
0 0 10 10 0 0 0 0 0 0
50 50 10 10 0 0 0 1 0 0
ev/empty.jpg
0
0 0 0 0 0 0 0 0 0 0
"""

# P1 hits G1 (score 0.9), P2 is a false positive (0.8), P3 hits G4 (0.7), P4 hits G3 (0.6); G2 is missed.
PREDICTIONS = {
    "ev/a": np.array([[0, 0, 10, 10, 0.9], [100, 100, 10, 10, 0.8]]),
    "ev/b": np.array([[50, 50, 10, 10, 0.7], [0, 0, 10, 10, 0.6]]),
}


@pytest.fixture
def gt(tmp_path):
    path = tmp_path / "wider_face_val_bbx_gt.txt"
    path.write_text(GT_TXT)
    return wider.read_ground_truth(path)


def test_reads_ground_truth(gt):
    assert sorted(gt) == ["ev/a", "ev/b", "ev/empty"]
    np.testing.assert_array_equal(gt["ev/a"].boxes, [[0, 0, 10, 10], [20, 0, 10, 10]])
    assert gt["ev/b"].invalid.tolist() == [False, True]
    assert gt["ev/empty"].boxes.shape == (0, 4)


def test_ap_with_an_ignored_box_matches_hand_computation(gt):
    # Keep G1, G2, G3 (3 faces). Normalised scores: P1 1, P2 2/3, P3 1/3, P4 0. P3 matches the ignored G4, so
    # it is neither a true nor a false positive. Curve (recall, precision): (1/3, 1) after P1, (1/3, 1/2) after
    # P2, unchanged after P3, (2/3, 2/3) after P4. Envelope: 1 up to recall 1/3, then 2/3 up to 2/3.
    # AP = 1/3 * 1 + 1/3 * 2/3 = 5/9.
    keep = {"ev/a": np.array([0, 1]), "ev/b": np.array([0])}
    ap, curve = wider.average_precision(PREDICTIONS, gt, keep)
    assert ap == pytest.approx(5 / 9, abs=1e-9)
    assert curve.shape == (wider.THRESHOLDS, 2)
    assert curve[0].tolist() == pytest.approx([1.0, 1 / 3])  # top threshold: only P1
    assert curve[-1].tolist() == pytest.approx([2 / 3, 2 / 3])  # threshold 0: every prediction


def test_ap_keeping_every_box_matches_hand_computation(gt):
    # All four boxes kept (invalid ignored only in the txt-only `all` setting, so pass an explicit list here).
    # (1/4, 1), (1/4, 1/2), (2/4, 2/3), (3/4, 3/4): envelope 1, 3/4, 3/4 -> AP = 1/4 + 1/4*3/4 + 1/4*3/4 = 5/8.
    keep = {"ev/a": np.array([0, 1]), "ev/b": np.array([0, 1])}
    ap, _ = wider.average_precision(PREDICTIONS, gt, keep)
    assert ap == pytest.approx(5 / 8, abs=1e-9)


def test_all_setting_ignores_invalid_boxes(gt):
    # Without split files, G4 (invalid) is ignored: the same figures as the explicit keep list of 3 faces.
    assert wider.evaluate(PREDICTIONS, gt) == {"all": pytest.approx(5 / 9, abs=1e-9)}


def test_perfect_and_empty_predictions(gt):
    perfect = {"ev/a": np.array([[0, 0, 10, 10, 0.9], [20, 0, 10, 10, 0.8]]),
               "ev/b": np.array([[0, 0, 10, 10, 0.7]])}
    assert wider.evaluate(perfect, gt)["all"] == pytest.approx(1.0)
    assert wider.evaluate({}, gt)["all"] == 0.0


def test_iou_below_half_is_a_miss(gt):
    # A box shifted by 5 px on a 10 px face: IoU (inclusive pixels) = 6*11 / (2*121 - 66) = 0.375 < 0.5.
    shifted = {"ev/a": np.array([[5, 0, 10, 10, 0.9]])}
    assert wider.evaluate(shifted, gt)["all"] == 0.0


def test_predictions_round_trip(tmp_path):
    for key, boxes in PREDICTIONS.items():
        wider.write_predictions(tmp_path, key, boxes)
    back = wider.read_predictions(tmp_path)
    assert sorted(back) == sorted(PREDICTIONS)
    for key, boxes in PREDICTIONS.items():
        np.testing.assert_allclose(back[key], boxes, atol=1e-3)


def test_official_split_mat_files(tmp_path, gt):
    scipy_io = pytest.importorskip("scipy.io")

    def cell(items):
        out = np.empty((len(items), 1), dtype=object)
        for i, item in enumerate(items):
            out[i, 0] = item
        return out

    # eval_tools layout: event_list {event}, file_list {{names}}, gt_list {{1-based kept indices}}.
    scipy_io.savemat(tmp_path / "wider_face_val.mat", {
        "event_list": cell(["ev"]),
        "file_list": cell([cell(["a", "b", "empty"])]),
    })
    lists = {"easy": [[1], [1], []], "medium": [[1, 2], [1], []], "hard": [[1, 2], [1, 2], []]}
    for setting, kept in lists.items():
        scipy_io.savemat(tmp_path / f"wider_{setting}_val.mat", {
            "gt_list": cell([cell([np.array(k, dtype=np.float64).reshape(-1, 1) for k in kept])]),
        })
    splits = wider.read_split_mats(tmp_path)
    assert splits["medium"]["ev/a"].tolist() == [0, 1]
    result = wider.evaluate(PREDICTIONS, gt, splits)
    # easy keeps G1, G3: P1 TP, P2 FP, P3 ignored, P4 TP -> (1/2, 1), (1/2, 1/2), (1, 2/3): AP = 1/2 + 1/2*2/3.
    assert result["easy"] == pytest.approx(1 / 2 + 1 / 3, abs=1e-9)
    assert result["medium"] == pytest.approx(5 / 9, abs=1e-9)
    assert result["hard"] == pytest.approx(5 / 8, abs=1e-9)
