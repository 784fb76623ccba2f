"""Face-verification metrics over labelled pairs: pure numpy, no models.

Conventions used throughout:
- a score is a cosine similarity; a pair is predicted "same person" when `score >= threshold`;
- a pair whose photo had no detected face has score NaN; the metrics count it and score it as the lowest
  possible similarity (-1, "different"), so a missed face costs a same-person pair and never hides;
- folds are small integers; leave-one-fold-out picks the threshold on the other folds (best accuracy) and
  tests it on the held-out fold, as LFW's protocol does with ten folds.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MISSING_SCORE = -1.0  # what a pair without a detected face scores: the lowest cosine, "different"


@dataclass(frozen=True)
class Pair:
    a: Path
    b: Path
    same: bool
    fold: int = 0


def read_pairs_csv(path: str | Path) -> list[Pair]:
    """`file_x,file_y,Decision` rows (Decision Yes/No, whitespace stripped); files relative to the csv's folder."""
    path = Path(path)
    pairs = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = {name.strip(): name for name in reader.fieldnames or []}
        if not {"file_x", "file_y", "Decision"} <= set(fields):
            raise ValueError(f"{path}: expected columns file_x,file_y,Decision, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            decision = row[fields["Decision"]].strip().lower()
            if decision not in ("yes", "no"):
                raise ValueError(f"{path}:{line}: Decision must be Yes or No, got {row[fields['Decision']]!r}")
            pairs.append(
                Pair(path.parent / row[fields["file_x"]].strip(), path.parent / row[fields["file_y"]].strip(),
                     decision == "yes")
            )
    return pairs


def read_lfw_pairs(path: str | Path, images_dir: str | Path | None = None) -> list[Pair]:
    """LFW `pairs.txt`: a `folds<TAB>n` header, then per fold n same-person and n different-person lines.

    Same: `Name i j`; different: `Name1 i Name2 j`. Images are `images_dir/Name/Name_000i.jpg`
    (default: `images/` beside pairs.txt). Folds are numbered 0.. in file order.
    """
    path = Path(path)
    images = Path(images_dir) if images_dir is not None else path.parent / "images"
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    try:
        n_folds, per_fold = int(lines[0][0]), int(lines[0][1])
    except (IndexError, ValueError):
        raise ValueError(f"{path}: first line must be '<folds> <pairs per half-fold>'") from None
    body = lines[1:]
    if len(body) != n_folds * 2 * per_fold:
        raise ValueError(f"{path}: header promises {n_folds * 2 * per_fold} pairs, found {len(body)}")

    def image(name: str, number: str) -> Path:
        return images / name / f"{name}_{int(number):04d}.jpg"

    pairs = []
    for k, fields in enumerate(body):
        fold = k // (2 * per_fold)
        if len(fields) == 3:
            pairs.append(Pair(image(fields[0], fields[1]), image(fields[0], fields[2]), True, fold))
        elif len(fields) == 4:
            pairs.append(Pair(image(fields[0], fields[1]), image(fields[2], fields[3]), False, fold))
        else:
            raise ValueError(f"{path}:{k + 2}: expected 3 or 4 fields, got {len(fields)}")
    return pairs


def _clean(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).copy()
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be 1-d and the same length")
    s[np.isnan(s)] = MISSING_SCORE
    return s, y


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve: P(score of a same pair > score of a different pair), ties counting 1/2."""
    s, y = _clean(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both same-person and different-person pairs")
    # Mann-Whitney U with average ranks for ties.
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def accuracy_at(scores, labels, threshold: float) -> float:
    """Fraction of pairs decided correctly with `score >= threshold` meaning same."""
    s, y = _clean(scores, labels)
    return float(np.mean((s >= threshold) == y))


def false_match_rate(scores, labels, threshold: float) -> float:
    """FAR: fraction of different-person pairs accepted at `threshold`."""
    s, y = _clean(scores, labels)
    if not (~y).any():
        raise ValueError("FAR needs different-person pairs")
    return float(np.mean(s[~y] >= threshold))


def best_threshold(scores, labels) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy; the threshold sits midway between two adjacent scores.

    Candidates are the midpoints between consecutive distinct scores, plus one below the lowest and one above
    the highest. When several candidates tie, the middle one (in score order) is returned, so the pick does
    not hug one edge of a flat optimum.
    """
    s, y = _clean(scores, labels)
    values = np.unique(s)
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    # Vectorised accuracy for every candidate: same pairs at/above, different pairs below.
    pos = np.sort(s[y])
    neg = np.sort(s[~y])
    true_accepts = len(pos) - np.searchsorted(pos, candidates, side="left")
    true_rejects = np.searchsorted(neg, candidates, side="left")
    acc = (true_accepts + true_rejects) / len(s)
    best = np.flatnonzero(acc == acc.max())
    pick = best[len(best) // 2]
    return float(candidates[pick]), float(acc[pick])


@dataclass(frozen=True)
class FoldResult:
    thresholds: list[float]  # picked on the other folds, one per held-out fold
    accuracies: list[float]  # on the held-out fold

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))


def leave_one_fold_out(scores, labels, folds) -> FoldResult:
    """For each fold: best-accuracy threshold on all other folds, accuracy on this fold."""
    s, y = _clean(scores, labels)
    f = np.asarray(folds)
    ids = sorted(set(f.tolist()))
    if len(ids) < 2:
        raise ValueError("leave-one-fold-out needs at least two folds")
    thresholds, accuracies = [], []
    for k in ids:
        held = f == k
        t, _ = best_threshold(s[~held], y[~held])
        thresholds.append(t)
        accuracies.append(accuracy_at(s[held], y[held], t))
    return FoldResult(thresholds, accuracies)


def threshold_at_far(scores, labels, far: float) -> float | None:
    """The lowest threshold whose FAR is <= far; None when there are fewer than 1/far different pairs."""
    s, y = _clean(scores, labels)
    neg = np.sort(s[~y])[::-1]
    if len(neg) < round(1 / far):
        return None
    allowed = int(np.floor(far * len(neg) + 1e-9))  # false accepts we may keep
    # Accept only scores strictly above the (allowed+1)-th highest different-pair score.
    return float(np.nextafter(neg[allowed], np.inf))


def tar_at_far(scores, labels, far: float) -> float | None:
    """True accept rate at the threshold where FAR <= far; None when the pair count cannot resolve `far`."""
    t = threshold_at_far(scores, labels, far)
    if t is None:
        return None
    s, y = _clean(scores, labels)
    return float(np.mean(s[y] >= t))


@dataclass(frozen=True)
class VerificationReport:
    pairs: int
    same: int
    missing: int  # pairs with a photo where no face was detected (scored as MISSING_SCORE)
    auc: float
    best_threshold: float
    best_accuracy: float
    threshold: float | None  # the threshold under test (e.g. the model's metadata), if any
    accuracy_at_threshold: float | None
    far_at_threshold: float | None
    tar_at_far: dict[float, float | None]
    folds: FoldResult | None

    def lines(self) -> list[str]:
        out = [
            f"pairs {self.pairs} ({self.same} same), pairs with a missed face {self.missing}",
            f"ROC AUC {self.auc:.5f}; best accuracy {100 * self.best_accuracy:.2f} % at {self.best_threshold:.4f}",
        ]
        if self.folds is not None:
            out.append(f"leave-one-fold-out accuracy {100 * self.folds.mean:.2f} % ± {100 * self.folds.std:.2f} "
                       f"over {len(self.folds.accuracies)} folds (thresholds "
                       + ", ".join(f"{t:.4f}" for t in self.folds.thresholds) + ")")
        if self.threshold is not None:
            out.append(f"at threshold {self.threshold:.4f}: accuracy {100 * self.accuracy_at_threshold:.2f} %, "
                       f"FAR {100 * self.far_at_threshold:.2f} %")
        for far, tar in self.tar_at_far.items():
            out.append(f"TAR at FAR {far:g}: " + ("n/a (too few pairs)" if tar is None else f"{100 * tar:.2f} %"))
        return out


def summarise(scores, labels, folds=None, threshold: float | None = None,
              fars: tuple[float, ...] = (1e-2, 1e-3)) -> VerificationReport:
    """Every figure above in one report."""
    raw = np.asarray(scores, dtype=np.float64)
    s, y = _clean(scores, labels)
    t_best, acc_best = best_threshold(s, y)
    return VerificationReport(
        pairs=len(s),
        same=int(y.sum()),
        missing=int(np.isnan(raw).sum()),
        auc=roc_auc(s, y),
        best_threshold=t_best,
        best_accuracy=acc_best,
        threshold=threshold,
        accuracy_at_threshold=None if threshold is None else accuracy_at(s, y, threshold),
        far_at_threshold=None if threshold is None else false_match_rate(s, y, threshold),
        tar_at_far={far: tar_at_far(s, y, far) for far in fars},
        folds=None if folds is None else leave_one_fold_out(s, y, folds),
    )
