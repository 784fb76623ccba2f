"""Accuracy of the default recognizer through the served path: RetinaFace detector -> five landmarks -> ArcFace
template alignment -> MobileFaceNet (npm TFLite, exported) with its metadata flip setting -> cosine.

Figures are recorded with the `figures` fixture and printed at the end of the run. Embeddings are computed once per data set (module-scoped fixtures).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from evaluate.pairs import central  # LFW photos are centred on their subject
from evaluate.verification import (
    accuracy_at,
    best_threshold,
    leave_one_fold_out,
    read_lfw_pairs,
    read_pairs_csv,
    roc_auc,
    summarise,
)
from export import mobilefacenet as mfn
from service.pipeline import Pipeline, largest

THRESHOLD_TOLERANCE = 0.02
TIMED_FACES = 100  # crops timed one by one for the mirror-averaging cost (a figure, never asserted)  # re-measured best-accuracy threshold vs the pinned one (cosine units)


@pytest.fixture(scope="module")
def pipeline(models_dir: Path) -> Pipeline:
    from service.detector import RetinaFaceDetector
    from service.embedder import Embedder

    paths = [models_dir / "retinaface_mnet025.onnx", models_dir / mfn.DEFAULT_FILE_NAME]
    for path in paths:
        if not path.is_file():
            pytest.skip(f"{path} is absent: run `make models`")
    embedder = Embedder(paths[1])  # flip follows the file's face.embedder.flip
    assert embedder.flip is mfn.FLIP
    return Pipeline(RetinaFaceDetector(paths[0]), embedder)


@dataclass
class Embedded:
    """One embedding per image (None when no face was found), with mirror averaging on and off."""

    with_flip: dict[Path, np.ndarray | None]
    without_flip: dict[Path, np.ndarray | None]
    seconds: float  # detect + align + embed both ways, all images
    ms_per_face_flip: float  # the embedder alone, one face per call (as /verify), mean over TIMED_FACES crops
    ms_per_face_plain: float

    @property
    def served(self) -> dict[Path, np.ndarray | None]:
        return self.with_flip if mfn.FLIP else self.without_flip


def embed_images(pipeline: Pipeline, paths, choose) -> Embedded:
    """Embed the chosen face of every image twice, with and without mirror averaging, timing the embedder."""
    embedder = pipeline.embedder
    start = time.perf_counter()
    crops, owners = [], []
    for path in sorted(set(paths)):
        image = cv2.imread(str(path))
        assert image is not None, f"cannot read {path}"
        face = choose(pipeline.detect(image), image.shape)
        if face is not None:
            crops.append(pipeline.align(image, [face])[0])
            owners.append(path)
    embedded = {}
    for flip in (False, True):
        rows = embedder.embed(np.stack(crops), flip=flip) if crops else []
        embedded[flip] = dict.fromkeys(set(paths)) | dict(zip(owners, rows))
    seconds = time.perf_counter() - start
    # The cost per face, as /verify pays it (one face per call), on a sample of the crops.
    timing = {}
    for flip in (False, True):
        started = time.perf_counter()
        for crop in crops[:TIMED_FACES]:
            embedder.embed(crop[None], flip=flip)
        timing[flip] = 1000 * (time.perf_counter() - started) / max(1, len(crops[:TIMED_FACES]))
    return Embedded(embedded[True], embedded[False], seconds, timing[True], timing[False])


def pair_scores(pairs, embeddings) -> np.ndarray:
    scores = []
    for pair in pairs:
        a, b = embeddings[pair.a], embeddings[pair.b]
        scores.append(np.nan if a is None or b is None else float(np.dot(a, b)))
    return np.asarray(scores)


# ---------------------------------------------------------------------------------------------------------------
# ../shared/data/faces/pairs: 300 pairs (38 same-person) over 25 portrait photos


@pytest.fixture(scope="module")
def photo_pairs(pipeline: Pipeline, faces_dir: Path):
    pairs = read_pairs_csv(faces_dir / "pairs" / "pairs.csv")
    paths = [p.a for p in pairs] + [p.b for p in pairs]
    embedded = embed_images(pipeline, paths, lambda faces, shape: largest(faces))
    return pairs, pair_scores(pairs, embedded.served), embedded


def test_photo_pairs_accuracy(photo_pairs, pipeline: Pipeline, figures):
    pairs, scores, embedded = photo_pairs
    labels = np.array([p.same for p in pairs])
    threshold = pipeline.embedder.threshold
    assert threshold == pytest.approx(mfn.THRESHOLD)
    report = summarise(scores, labels, threshold=threshold)
    figures(f"faces/pairs, served pipeline (largest face), {len(embedded.served)} photos in {embedded.seconds:.1f} s:\n  "
            + "\n  ".join(report.lines()))
    assert report.missing == 0
    assert report.auc >= 0.999
    assert report.accuracy_at_threshold >= 0.99


# ---------------------------------------------------------------------------------------------------------------
# ../shared/data/lfw-dev: 3,000 LFW View-2 pairs in 5 folds


# The full 3,000 pairs embed 3,890 images: measured 100 s on this 2-core machine when idle and 248 s under load
# from parallel runs, over the suite's budget, so the default run takes a deterministic subset (1,474 images,
# 52 s under the same load): in each of the 5 folds the
# first SUBSET_PER_HALF same-person and the first SUBSET_PER_HALF different-person pairs (1,000 pairs). The full
# set (what THRESHOLD_RULE names) runs with `-m slow`.
SUBSET_PER_HALF = 100


@dataclass
class LfwScores:
    scores: np.ndarray  # the served setting (the file's flip)
    labels: np.ndarray
    folds: np.ndarray
    other: np.ndarray  # the other flip setting, same crops
    embedded: Embedded
    label: str


def lfw_scores(pipeline: Pipeline, pairs, label: str) -> LfwScores:
    paths = [p.a for p in pairs] + [p.b for p in pairs]
    embedded = embed_images(pipeline, paths, central)
    other = embedded.without_flip if mfn.FLIP else embedded.with_flip
    return LfwScores(
        scores=pair_scores(pairs, embedded.served),
        labels=np.array([p.same for p in pairs]),
        folds=np.array([p.fold for p in pairs]),
        other=pair_scores(pairs, other),
        embedded=embedded,
        label=label,
    )


def subset(pairs, per_half: int):
    """The first `per_half` same and different pairs of every fold (pairs.txt order: deterministic)."""
    kept, seen = [], {}
    for pair in pairs:
        key = (pair.fold, pair.same)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= per_half:
            kept.append(pair)
    return kept


@pytest.fixture(scope="module")
def lfw_pairs(lfw_dir: Path):
    pairs = read_lfw_pairs(lfw_dir / "pairs.txt")
    assert len(pairs) == 3000 and sum(p.same for p in pairs) == 1500
    assert sorted({p.fold for p in pairs}) == [0, 1, 2, 3, 4]
    return pairs


@pytest.fixture(scope="module")
def lfw_subset(pipeline: Pipeline, lfw_pairs):
    return lfw_scores(pipeline, subset(lfw_pairs, SUBSET_PER_HALF), f"subset of {10 * SUBSET_PER_HALF} pairs")


@pytest.fixture(scope="module")
def lfw_full(pipeline: Pipeline, lfw_pairs):
    return lfw_scores(pipeline, lfw_pairs, "all 3000 pairs")


def check_lfw_accuracy(lfw: LfwScores, threshold: float, figures) -> None:
    report = summarise(lfw.scores, lfw.labels, folds=lfw.folds, threshold=threshold)
    figures(f"lfw-dev {lfw.label}, served pipeline (face nearest the centre), {len(lfw.embedded.served)} images "
            f"in {lfw.embedded.seconds:.1f} s:\n  " + "\n  ".join(report.lines()))
    lofo = report.folds.mean
    assert lofo >= 0.99
    assert abs(report.accuracy_at_threshold - lofo) <= 0.005
    assert report.auc >= 0.998


def mirror_averaging(lfw: LfwScores, figures) -> tuple[float, float]:
    """Leave-one-fold-out accuracy with mirror averaging on and off (same crops), printed with its cost."""
    on, off = (lfw.scores, lfw.other) if mfn.FLIP else (lfw.other, lfw.scores)
    lofo_on = leave_one_fold_out(on, lfw.labels, lfw.folds).mean
    lofo_off = leave_one_fold_out(off, lfw.labels, lfw.folds).mean
    e = lfw.embedded
    figures(f"mirror averaging on lfw-dev {lfw.label}: leave-one-fold-out {100 * lofo_on:.2f} % on vs "
            f"{100 * lofo_off:.2f} % off ({100 * (lofo_on - lofo_off):+.2f} points), AUC {roc_auc(on, lfw.labels):.5f} "
            f"vs {roc_auc(off, lfw.labels):.5f}; embedder {e.ms_per_face_flip:.1f} ms vs {e.ms_per_face_plain:.1f} ms "
            f"per face ({e.ms_per_face_flip - e.ms_per_face_plain:+.1f} ms), batch 1; file's setting: flip={mfn.FLIP}")
    return lofo_on, lofo_off


def test_lfw_subset_accuracy(lfw_subset: LfwScores, pipeline: Pipeline, figures):
    assert len(lfw_subset.scores) == 10 * SUBSET_PER_HALF
    check_lfw_accuracy(lfw_subset, pipeline.embedder.threshold, figures)
    # A cheap guard on the pinned threshold (the rule itself is checked on all pairs under -m slow).
    t_best, _ = best_threshold(lfw_subset.scores, lfw_subset.labels)
    assert abs(t_best - mfn.THRESHOLD) <= THRESHOLD_TOLERANCE


def test_lfw_subset_mirror_averaging_is_measured(lfw_subset: LfwScores, figures):
    lofo_on, lofo_off = mirror_averaging(lfw_subset, figures)
    # Both settings are real, working recognisers on these pairs; which is better is decided on all 3,000
    # pairs (the slow test below), since on a third of them the difference is within a pair or two.
    assert min(lofo_on, lofo_off) >= 0.985


@pytest.mark.slow
def test_lfw_full_accuracy(lfw_full: LfwScores, pipeline: Pipeline, figures):
    check_lfw_accuracy(lfw_full, pipeline.embedder.threshold, figures)


@pytest.mark.slow
def test_mirror_averaging_default_follows_its_measurement(lfw_full: LfwScores, figures):
    """The file says flip=on only because it measured better on all of lfw-dev; that must still hold."""
    lofo_on, lofo_off = mirror_averaging(lfw_full, figures)
    assert mfn.FLIP == (lofo_on > lofo_off)


@pytest.mark.slow
def test_pinned_threshold_still_follows_its_rule(lfw_full: LfwScores, figures):
    scores, labels, folds = lfw_full.scores, lfw_full.labels, lfw_full.folds
    t_best, acc_best = best_threshold(scores, labels)
    per_fold = leave_one_fold_out(scores, labels, folds)
    at_pinned = accuracy_at(scores, labels, mfn.THRESHOLD)
    figures(f"re-measured best-accuracy threshold {t_best:.4f} ({100 * acc_best:.2f} %), pinned {mfn.THRESHOLD} "
            f"({100 * at_pinned:.2f} %, pinned figure {100 * mfn.LFW_DEV_ACCURACY:.2f} %); "
            f"fold picks " + "/".join(f"{t:.4f}" for t in per_fold.thresholds)
            + f"; AUC {roc_auc(scores, labels):.5f}")
    assert abs(t_best - mfn.THRESHOLD) <= THRESHOLD_TOLERANCE
    assert all(abs(t - mfn.THRESHOLD) <= THRESHOLD_TOLERANCE for t in per_fold.thresholds)
    # The pinned figures in export/mobilefacenet.py are what the data gives today (one pair = 0.033 points).
    assert at_pinned == pytest.approx(mfn.LFW_DEV_ACCURACY, abs=0.002)
    assert per_fold.mean == pytest.approx(mfn.LFW_DEV_LOFO_ACCURACY, abs=0.002)


# ---------------------------------------------------------------------------------------------------------------
# Open-set identification on lfw-dev (every photo: the embeddings of the full pairs run above)


@pytest.fixture(scope="module")
def lfw_people(lfw_full: LfwScores):
    """All lfw-dev photos with a face: (embeddings, person labels), in path order."""
    served = {p: e for p, e in lfw_full.embedded.served.items() if e is not None}
    paths = sorted(served)
    names = sorted({p.parent.name for p in paths})
    code = {n: i for i, n in enumerate(names)}
    return np.stack([served[p] for p in paths]), np.array([code[p.parent.name] for p in paths])


@pytest.mark.slow
def test_pinned_far_table_still_follows_its_rule(lfw_people, figures):
    from evaluate.identification import build_far_table, impostor_histogram
    from export.mobilefacenet_far_table import FAR_TABLE
    from service.decision import FarTable

    x, labels = lfw_people
    assert len(x) == 3890  # every photo has a face
    edges, counts, pairs = impostor_histogram(x, labels)
    measured = build_far_table(edges, counts, pairs, rule="re-measured")
    pinned = FarTable.from_json(FAR_TABLE)
    assert measured.impostor_pairs == pinned.impostor_pairs
    # Every pinned point up to where it was counted: the same rate today, within a few pairs of rounding noise.
    worst = 0.0
    for t, far in zip(pinned.thresholds, pinned.far):
        # Where both tables counted: each starts one step before its FAR falls under 0.2, which a few pairs'
        # difference can move by a step; below its first point a table answers 1 (it knows nothing there).
        if measured.thresholds[0] <= t <= pinned.measured_to:
            again = measured.far_at(t)
            worst = max(worst, abs(again - far) * pairs)
            assert abs(again - far) <= max(0.02 * far, 5 / pairs), (t, far, again)
    assert abs(measured.measured_to - pinned.measured_to) <= 0.011
    figures(f"FAR table re-measured on {pairs:,} lfw-dev impostor pairs: largest difference from the pinned "
            f"table {worst:.1f} pairs; measured down to FAR {measured.smallest_measured_far:.2g} at "
            f"t = {measured.measured_to:.2f}")


@pytest.mark.slow
@pytest.mark.parametrize("per_person", [1, 3])
def test_fpir_policy_holds_its_target_on_the_largest_lfw_dev_gallery(lfw_people, pipeline, per_person, figures):
    """The issue's bar: at lfw-dev's largest open-set gallery, the default policy's measured FPIR is within a
    factor of two of the target (1 %). One photo per person, and up to three (identity templates)."""
    from evaluate.identification import fnir_at, fpir_at, open_set_split, rank1, run_search
    from service.decision import IdentifyPolicy

    x, labels = lfw_people
    counts = np.bincount(labels)
    n = int((counts >= 2).sum())
    split = open_set_split(labels, n, np.random.default_rng(0), per_person=per_person)
    outcome = run_search(x @ x.T, x, labels, split, template="mean")
    decision = IdentifyPolicy(pipeline.embedder.far_table, 0.01, pipeline.embedder.threshold).decide(n)
    measured = fpir_at(outcome, decision.threshold)
    figures(f"lfw-dev open set, {n} identities ({per_person} photo(s) each at most), {len(outcome.mated_score)} "
            f"mated and {len(outcome.nonmated_top)} non-mated searches: threshold {decision.threshold:.4f}, "
            f"FPIR {measured:.4f} (target 0.01), FNIR {fnir_at(outcome, decision.threshold):.3f}, "
            f"rank-1 {rank1(outcome):.3f}")
    assert 0.005 <= measured <= 0.02
    assert rank1(outcome) >= 0.97
