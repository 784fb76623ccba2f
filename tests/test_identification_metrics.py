"""Open-set identification metrics and the FPIR decision policy, checked by hand on small cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluate.identification import (
    SearchScores,
    build_far_table,
    det_curve,
    fnir_at,
    fnir_at_fpir,
    fpir_at,
    identity_scores,
    impostor_histogram,
    open_set_split,
    rank1,
    run_search,
    search_outcomes,
    threshold_at_fpir,
)
from service.decision import Decision, FarTable, FarTableError, IdentifyPolicy, far_for_fpir, fpir


def outcome(mated, rank1_flags, strangers, identities=3) -> SearchScores:
    mated = np.asarray(mated, float)
    strangers = np.asarray(strangers, float)
    return SearchScores(mated, np.asarray(rank1_flags, bool), np.ones_like(mated), strangers,
                        np.ones_like(strangers), identities)


def test_search_outcomes_by_hand():
    # Three identities (labels 10, 20, 30); probes: a mate of 10 ranked first, a mate of 20 beaten by 30,
    # and two strangers (label 99).
    scores = np.array([
        [0.9, 0.2, 0.1],   # label 10: mate first, margin 0.7
        [0.1, 0.5, 0.6],   # label 20: mate 0.5, 30 ranks first
        [0.3, 0.4, 0.35],  # stranger: top 0.4, margin 0.05
        [0.1, 0.0, 0.2],   # stranger: top 0.2
    ])
    out = search_outcomes(scores, np.array([10, 20, 30]), np.array([10, 20, 99, 99]))
    assert out.mated_score.tolist() == [0.9, 0.5]
    assert out.mated_rank1.tolist() == [True, False]
    assert out.nonmated_top.tolist() == [0.4, 0.2]
    assert out.nonmated_margin == pytest.approx([0.05, 0.1])
    assert out.mated_margin == pytest.approx([0.7, 0.1])
    assert rank1(out) == 0.5
    assert fpir_at(out, 0.3) == 0.5 and fpir_at(out, 0.41) == 0.0 and fpir_at(out, 0.2) == 1.0
    # FNIR counts the wrong rank-1 as a miss whatever the threshold.
    assert fnir_at(out, 0.0) == 0.5 and fnir_at(out, 0.95) == 1.0
    # A margin of 0.08 drops the first stranger (margin 0.05) and keeps the second (0.1).
    assert fpir_at(out, 0.0, margin=0.08) == 0.5


def test_a_tie_for_first_is_not_a_rank1_hit():
    out = search_outcomes(np.array([[0.5, 0.5]]), np.array([1, 2]), np.array([1]))
    assert out.mated_rank1.tolist() == [False]


def test_threshold_at_fpir_and_fnir_at_fpir():
    out = outcome(mated=[0.9, 0.8, 0.7, 0.6, 0.5], rank1_flags=[1, 1, 1, 1, 0],
                  strangers=[0.75, 0.55, 0.4, 0.3, 0.2, 0.1, 0.1, 0.0, -0.1, -0.2])
    # FPIR <= 0.1 allows one stranger of ten: the threshold sits just above the second-highest, 0.55.
    t = threshold_at_fpir(out, 0.1)
    assert 0.55 < t < 0.5500001 and fpir_at(out, t) == pytest.approx(0.1)
    fnir, t2 = fnir_at_fpir(out, 0.1)
    assert t2 == t and fnir == pytest.approx(0.2)  # 0.9 to 0.6 found; 0.5 is not ranked first
    # FPIR 0 needs a threshold above every stranger: only 0.9 and 0.8 are found.
    t0 = threshold_at_fpir(out, 0.0)
    assert t0 > 0.75 and fpir_at(out, t0) == 0.0 and fnir_at(out, t0) == pytest.approx(0.6)


def test_det_curve_matches_pointwise_rates():
    rng = np.random.default_rng(0)
    out = outcome(rng.uniform(0.3, 1, 50), rng.uniform(size=50) < 0.9, rng.uniform(-0.2, 0.6, 80))
    f, n, t = det_curve(out)
    assert (np.diff(f) >= 0).all() and (np.diff(n) <= 0).all()  # thresholds fall: FPIR rises, FNIR falls
    for k in range(0, len(t), 17):
        assert f[k] == pytest.approx(fpir_at(out, t[k])) and n[k] == pytest.approx(fnir_at(out, t[k]))


def test_identity_templates():
    # Identity 1 has two faces, identity 2 one; the probe is closer to face b than to their mean.
    a, b, c = np.eye(3)
    gallery = np.stack([a, b, c])
    labels = np.array([1, 1, 2])
    probe = np.array([[0.0, 1.0, 0.0]])
    sims = probe @ gallery.T
    best, ids = identity_scores(sims, labels, "best")
    assert ids.tolist() == [1, 2] and best.tolist() == [[1.0, 0.0]]
    mean, _ = identity_scores(sims, labels, "mean", probe, gallery)
    assert mean[0] == pytest.approx([1 / math.sqrt(2), 0.0])
    both, _ = identity_scores(sims, labels, "both", probe, gallery)
    assert both.tolist() == [[1.0, 0.0]]


def test_open_set_split_keeps_people_apart():
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 4])
    split = open_set_split(labels, 2, np.random.default_rng(1), per_person=2)
    enrolled = set(split.enrolled.tolist())
    assert len(enrolled) == 2 and enrolled <= {0, 1, 3}  # only people with two or more photos
    assert set(labels[split.gallery]) == enrolled
    assert not set(split.gallery) & set(split.probes)
    for person in enrolled:  # at least one photo of each enrolled person is left as a mated probe
        assert (labels[split.probes] == person).sum() >= 1
    assert sorted(np.r_[split.gallery, split.probes].tolist()) == list(range(len(labels)))
    with pytest.raises(ValueError):
        open_set_split(labels, 4, np.random.default_rng(0))


def test_run_search_end_to_end_and_cohort_normalisation():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(30, 16))
    labels = np.repeat(np.arange(30), 3)
    x = centres[labels] + 0.3 * rng.normal(size=(90, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    split = open_set_split(labels, 10, rng, exclude=np.arange(60, 90))
    out = run_search(sim, x, labels, split)
    assert out.identities == 10 and len(out.mated_score) == 20 and len(out.nonmated_top) == 30 * 3 - 30 - 30
    assert rank1(out) == 1.0  # well separated clusters
    normed = run_search(sim, x, labels, split, cohort=np.arange(60, 90))
    assert normed.mated_rank1.tolist() == out.mated_rank1.tolist()  # T-norm is monotone per probe
    assert not np.allclose(normed.mated_score, out.mated_score)


def test_impostor_histogram_counts_every_cross_person_pair():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 12, size=50)
    edges, counts, pairs = impostor_histogram(x, labels, block=7)
    i, j = np.triu_indices(50, 1)
    different = labels[i] != labels[j]
    assert pairs == different.sum() == counts.sum()
    scores = (x[i] @ x.T)[np.arange(len(i)), j][different]
    for t in (-0.5, 0.0, 0.3, 0.7):
        k = int(np.searchsorted(edges, t - 1e-12))
        assert counts[k:].sum() == (scores >= edges[k] - 1e-9).sum()


def synthetic_table() -> FarTable:
    # log FAR falls by one decade every 0.1 of threshold: FAR(t) = 10^(-10 t).
    t = np.round(np.arange(0.0, 0.61, 0.05), 6)
    return FarTable(t, 10.0 ** (-10 * t), measured_to=0.5, impostor_pairs=10**7, rule="synthetic",
                    extrapolation="exact")


def test_far_table_interpolation_and_inverse():
    table = synthetic_table()
    assert table.far_at(0.25) == pytest.approx(10**-2.5)  # log-linear between points
    assert table.far_at(0.8) == pytest.approx(1e-8)  # the last slope continued
    assert table.far_at(-0.5) == 1.0
    for far in (0.5, 1e-2, 3e-4, 1e-6, 1e-9):
        assert table.far_at(table.threshold_for(far)) == pytest.approx(far)
    assert table.smallest_measured_far == pytest.approx(1e-5)
    assert FarTable.from_json(table.to_json()).far_at(0.33) == pytest.approx(table.far_at(0.33), rel=1e-4)


@pytest.mark.parametrize("bad", [
    {"thresholds": [0.1, 0.1], "far": [0.1, 0.01], "measured_to": 0.1, "impostor_pairs": 5},
    {"thresholds": [0.1, 0.2], "far": [0.01, 0.1], "measured_to": 0.1, "impostor_pairs": 5},
    {"thresholds": [0.1, 0.2], "far": [0.1, 0.0], "measured_to": 0.1, "impostor_pairs": 5},
    {"thresholds": [0.1, 0.2], "far": [0.1, 0.01], "measured_to": 0.5, "impostor_pairs": 5},
    {"thresholds": [0.1], "far": [0.1], "measured_to": 0.1, "impostor_pairs": 5},
    {"thresholds": [0.1, 0.2], "far": [0.1, 0.01]},
    "[1, 2]",
    # Found by an attacker's review: wrong types, absurd sizes, near-equal thresholds, hostile JSON.
    {"thresholds": ["0.1", "0.2"], "far": [0.1, 0.01], "measured_to": 0.1, "impostor_pairs": 5},
    {"thresholds": [0.1, 0.2], "far": [0.1, 0.01], "measured_to": 0.1, "impostor_pairs": True},
    {"thresholds": [0.1, 0.2], "far": [0.1, 0.01], "measured_to": 0.1, "impostor_pairs": 10**400},
    {"thresholds": [0.5, 0.5 + 1e-16], "far": [0.5, 1e-10], "measured_to": 0.5, "impostor_pairs": 5},
    {"thresholds": list(np.linspace(0, 1, 10_001)), "far": list(np.linspace(1, 1e-9, 10_001)), "measured_to": 0.5,
     "impostor_pairs": 5},
    '{"thresholds": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"impostor_pairs": ' + "9" * 5000 + "}",
    '{"thresholds": [0.1, 0.2], "far": [0.1, 0.01], "measured_to": 0.1, "impostor_pairs": 1e999}',
])
def test_bad_far_tables_are_refused(bad):
    with pytest.raises(FarTableError):
        FarTable.from_json(bad)


def test_fpir_formula():
    assert fpir(0.0027, 774) == pytest.approx(1 - (1 - 0.0027) ** 774)  # the 88 %
    assert fpir(0.0027, 774) == pytest.approx(0.876, abs=0.001)
    assert fpir(1e-12, 10**6) == pytest.approx(1e-6, rel=1e-6)  # no cancellation at tiny rates
    assert fpir(0.1, 0) == 0.0
    assert far_for_fpir(0.01, 1) == pytest.approx(0.01)
    assert fpir(far_for_fpir(0.01, 10**6), 10**6) == pytest.approx(0.01)


def test_policy_threshold_grows_with_the_gallery_and_keeps_the_target():
    table = synthetic_table()
    policy = IdentifyPolicy(table, target_fpir=0.01, verify_threshold=0.2)
    sizes = [0, 1, 10, 1000, 10**5, 10**7]
    decisions = [policy.decide(n) for n in sizes]
    thresholds = [d.threshold for d in decisions]
    assert thresholds == sorted(thresholds)
    # Tiny galleries stay at the 1:1 threshold (FAR 1e-2 there): one identity already meets the target exactly,
    # an empty gallery names nobody.
    assert decisions[0].threshold == 0.2 and decisions[0].expected_fpir == 0.0
    assert decisions[1].threshold == 0.2 and decisions[1].expected_fpir == pytest.approx(0.01)
    assert decisions[2].threshold == pytest.approx(0.3, abs=1e-3)  # 10 identities: FAR 1e-3
    for d in decisions[2:]:
        assert d.policy == "fpir" and d.target_fpir == 0.01
        assert d.expected_fpir == pytest.approx(0.01, rel=1e-6)
    # 10^3 identities need FAR 1e-5, the last measured point; 10^5 need 1e-7, beyond it.
    assert decisions[3].threshold == pytest.approx(0.5, abs=1e-3) and not decisions[3].extrapolated
    assert decisions[4].extrapolated
    # An explicit threshold wins and still reports its expected FPIR.
    d = policy.decide(1000, threshold=0.3)
    assert d == Decision(0.3, "request", 1000, None, pytest.approx(fpir(1e-3, 1000)), False)


def test_policy_without_a_table_or_with_a_fixed_threshold():
    no_table = IdentifyPolicy(None, 0.01, verify_threshold=0.41)
    d = no_table.decide(5000)
    assert (d.threshold, d.policy, d.expected_fpir) == (0.41, "model", None)
    fixed = IdentifyPolicy(synthetic_table(), 0.01, 0.41, fixed_threshold=0.6)
    d = fixed.decide(5000)
    assert (d.threshold, d.policy) == (0.6, "settings") and d.expected_fpir == pytest.approx(fpir(1e-6, 5000))
    with pytest.raises(ValueError):
        IdentifyPolicy(None, 0.0, 0.4)


def test_build_far_table_from_a_histogram():
    rng = np.random.default_rng(4)
    scores = rng.normal(0.0, 0.1, size=2_000_000)
    edges = np.linspace(-1, 1, 2001)
    counts, _ = np.histogram(scores, bins=edges)
    table = build_far_table(edges, counts, len(scores), rule="gaussian")
    assert table.far[0] > 0.2 >= table.far[1]
    assert table.measured_to <= 0.5  # ~10 of 2M scores above 5 sigma... and no further
    measured = table.thresholds <= table.measured_to
    for t, f in zip(table.thresholds[measured], table.far[measured]):
        assert f == pytest.approx((scores >= t - 1e-9).mean(), rel=1e-6, abs=1e-9)
    assert table.extrapolation and table.thresholds[-1] > table.measured_to
    assert (np.diff(table.far) <= 0).all()
