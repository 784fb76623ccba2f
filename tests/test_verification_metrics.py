"""evaluate/verification.py on tiny score arrays whose figures are worked out by hand in the comments."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from evaluate.verification import (
    MISSING_SCORE,
    accuracy_at,
    best_threshold,
    false_match_rate,
    leave_one_fold_out,
    read_lfw_pairs,
    read_pairs_csv,
    roc_auc,
    summarise,
    tar_at_far,
    threshold_at_far,
)

# Same pairs score 0.9, 0.8, 0.3; different pairs 0.6, 0.2, 0.1.
SCORES = [0.9, 0.8, 0.3, 0.6, 0.2, 0.1]
LABELS = [True, True, True, False, False, False]


def test_roc_auc_counts_ordered_pairs():
    # 0.9 and 0.8 beat all three different scores (3 + 3), 0.3 beats 0.2 and 0.1 (2): 8 of 9 orderings.
    assert roc_auc(SCORES, LABELS) == pytest.approx(8 / 9)
    assert roc_auc([0.9, 0.1], [True, False]) == 1.0
    assert roc_auc([0.1, 0.9], [True, False]) == 0.0


def test_roc_auc_ties_count_half_and_missing_faces_score_lowest():
    assert roc_auc([0.5, 0.5], [True, False]) == pytest.approx(0.5)
    # same: 0.5, 0.5; different: 0.5, 0.2 -> (0.5 + 1) * 2 / 4
    assert roc_auc([0.5, 0.5, 0.5, 0.2], [True, True, False, False]) == pytest.approx(0.75)
    # A missed face (NaN) is scored MISSING_SCORE = -1: a same pair with NaN ranks below every different pair.
    assert MISSING_SCORE == -1.0
    assert roc_auc([math.nan, 0.2], [True, False]) == 0.0
    assert roc_auc([0.9, math.nan], [True, False]) == 1.0


def test_roc_auc_rejects_one_class_and_bad_shapes():
    with pytest.raises(ValueError, match="both"):
        roc_auc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="same length"):
        roc_auc([0.1, 0.2, 0.3], [True, False])


def test_accuracy_at_is_inclusive():
    # At 0.6 (score >= t is "same"): 0.9, 0.8 right; 0.3 wrong; 0.6 wrong (accepted); 0.2, 0.1 right -> 4/6.
    assert accuracy_at(SCORES, LABELS, 0.6) == pytest.approx(4 / 6)
    assert accuracy_at(SCORES, LABELS, 0.25) == pytest.approx(5 / 6)
    assert accuracy_at(SCORES, LABELS, 0.95) == pytest.approx(3 / 6)
    assert accuracy_at([math.nan], [False], -1.0) == 0.0  # NaN -> -1 >= -1 accepts it


def test_false_match_rate():
    assert false_match_rate(SCORES, LABELS, 0.6) == pytest.approx(1 / 3)
    assert false_match_rate(SCORES, LABELS, 0.2) == pytest.approx(2 / 3)
    assert false_match_rate(SCORES, LABELS, 0.61) == 0.0
    with pytest.raises(ValueError):
        false_match_rate([0.3], [True], 0.5)


def test_best_threshold_midpoints_and_middle_of_ties():
    # Candidates: below 0.1, 0.15, 0.25, 0.45, 0.7, 0.85, above 0.9 with accuracies 3,4,5,4,5,4,3 (/6).
    # 5/6 is reached at 0.25 and 0.7; the middle of the two best (index len // 2 = 1) is 0.7.
    t, acc = best_threshold(SCORES, LABELS)
    assert t == pytest.approx(0.7)
    assert acc == pytest.approx(5 / 6)
    assert accuracy_at(SCORES, LABELS, t) == pytest.approx(acc)


def test_best_threshold_separable_and_extremes():
    t, acc = best_threshold([0.9, 0.7, 0.3, 0.1], [True, True, False, False])
    assert (t, acc) == (pytest.approx(0.5), 1.0)
    # All same pairs: best is to accept everything (the candidate below the lowest score).
    t, acc = best_threshold([0.4, 0.6], [True, True])
    assert acc == 1.0 and t < 0.4
    t, acc = best_threshold([0.4, 0.6], [False, False])
    assert acc == 1.0 and t > 0.6


def test_leave_one_fold_out_by_hand():
    # fold 0: same 0.9, 0.7; different 0.3, 0.1.  fold 1: same 0.8, 0.4; different 0.5, 0.2.
    scores = [0.9, 0.7, 0.3, 0.1, 0.8, 0.4, 0.5, 0.2]
    labels = [True, True, False, False, True, True, False, False]
    folds = [0, 0, 0, 0, 1, 1, 1, 1]
    result = leave_one_fold_out(scores, labels, folds)
    # Held-out fold 0: fold 1 ties at 3/4 for 0.3 and 0.65 -> picks 0.65; fold 0 at 0.65 is all right.
    # Held-out fold 1: fold 0 is separable at 0.5; fold 1 at 0.5 gets 0.8 and 0.2 right, 0.4 and 0.5 wrong.
    assert result.thresholds == [pytest.approx(0.65), pytest.approx(0.5)]
    assert result.accuracies == [pytest.approx(1.0), pytest.approx(0.5)]
    assert result.mean == pytest.approx(0.75)
    assert result.std == pytest.approx(0.25)
    with pytest.raises(ValueError, match="two folds"):
        leave_one_fold_out(scores, labels, [0] * 8)


def test_threshold_and_tar_at_far():
    # same 0.9, 0.55, 0.4; different 0.6, 0.5, 0.2, 0.1
    scores = [0.9, 0.55, 0.4, 0.6, 0.5, 0.2, 0.1]
    labels = [True, True, True, False, False, False, False]
    # FAR 0.25 of 4 different pairs allows 1 false accept: threshold just above the 2nd highest (0.5).
    t = threshold_at_far(scores, labels, 0.25)
    assert 0.5 < t < 0.5 + 1e-12
    assert false_match_rate(scores, labels, t) == 0.25
    assert tar_at_far(scores, labels, 0.25) == pytest.approx(2 / 3)  # 0.9 and 0.55
    # FAR 0.5 allows 2: threshold just above 0.2, all three same pairs accepted.
    assert tar_at_far(scores, labels, 0.5) == 1.0
    # FAR 0.1 needs at least 10 different pairs to be resolved: 4 are not enough.
    assert threshold_at_far(scores, labels, 0.1) is None
    assert tar_at_far(scores, labels, 0.1) is None


def test_summarise_collects_the_same_figures():
    folds = [0, 0, 0, 1, 1, 1]
    report = summarise([0.9, math.nan, 0.3, 0.6, 0.2, 0.1], LABELS, folds=folds, threshold=0.25, fars=(0.5, 0.01))
    assert report.pairs == 6 and report.same == 3 and report.missing == 1
    # NaN -> -1: same -1, 0.3, 0.9; different 0.1, 0.2, 0.6 -> 0.9 beats 3, 0.3 beats 2, -1 beats 0: 5/9
    assert report.auc == pytest.approx(5 / 9)
    assert report.accuracy_at_threshold == pytest.approx(4 / 6)
    assert report.far_at_threshold == pytest.approx(1 / 3)
    assert report.tar_at_far[0.01] is None
    assert report.folds is not None and len(report.folds.accuracies) == 2
    text = "\n".join(report.lines())
    assert "pairs 6 (3 same), pairs with a missed face 1" in text
    assert "n/a (too few pairs)" in text


def test_read_pairs_csv_strips_whitespace(tmp_path: Path):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(" file_x , file_y ,Decision \n a.jpg ,b.jpg, Yes \nc.jpg,  d.jpg ,no\n")
    pairs = read_pairs_csv(csv_path)
    assert [(p.a, p.b, p.same, p.fold) for p in pairs] == [
        (tmp_path / "a.jpg", tmp_path / "b.jpg", True, 0),
        (tmp_path / "c.jpg", tmp_path / "d.jpg", False, 0),
    ]


def test_read_pairs_csv_errors_name_the_problem(tmp_path: Path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file_x,file_y,Decision\na.jpg,b.jpg,Maybe\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: Decision must be Yes or No, got 'Maybe'"):
        read_pairs_csv(bad)
    cols = tmp_path / "cols.csv"
    cols.write_text("left,right,same\na.jpg,b.jpg,Yes\n")
    with pytest.raises(ValueError, match="expected columns file_x,file_y,Decision"):
        read_pairs_csv(cols)


def test_read_lfw_pairs(tmp_path: Path):
    txt = tmp_path / "pairs.txt"
    txt.write_text("2\t1\nAlice\t1\t2\nBob\t1\tCarol_Ann\t12\n\nDan 3 4\nEve 1 Frank 2\n")
    pairs = read_lfw_pairs(txt)
    images = tmp_path / "images"
    assert [(p.a, p.b, p.same, p.fold) for p in pairs] == [
        (images / "Alice/Alice_0001.jpg", images / "Alice/Alice_0002.jpg", True, 0),
        (images / "Bob/Bob_0001.jpg", images / "Carol_Ann/Carol_Ann_0012.jpg", False, 0),
        (images / "Dan/Dan_0003.jpg", images / "Dan/Dan_0004.jpg", True, 1),
        (images / "Eve/Eve_0001.jpg", images / "Frank/Frank_0002.jpg", False, 1),
    ]
    other = read_lfw_pairs(txt, images_dir=tmp_path / "elsewhere")
    assert other[0].a == tmp_path / "elsewhere/Alice/Alice_0001.jpg"


def test_read_lfw_pairs_errors(tmp_path: Path):
    short = tmp_path / "short.txt"
    short.write_text("2\t1\nAlice 1 2\n")
    with pytest.raises(ValueError, match="promises 4 pairs, found 1"):
        read_lfw_pairs(short)
    header = tmp_path / "header.txt"
    header.write_text("ten\nAlice 1 2\n")
    with pytest.raises(ValueError, match="first line"):
        read_lfw_pairs(header)
    fields = tmp_path / "fields.txt"
    fields.write_text("1 1\nAlice 1\nBob 1 Carol 2\n")
    with pytest.raises(ValueError, match=r"fields.txt:2: expected 3 or 4 fields, got 2"):
        read_lfw_pairs(fields)


def test_scores_are_not_modified_in_place():
    s = np.array([0.9, np.nan, 0.2])
    roc_auc(s, [True, True, False])
    assert np.isnan(s[1])
