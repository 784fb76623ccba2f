"""Open-set identification metrics (1:N with strangers): pure numpy, no models.

Terms, as in NIST's FRVT 1:N reports (NISTIR 8271):
- a *mated* search is a probe of someone enrolled; a *non-mated* search is a probe of a stranger;
- FPIR(t): the fraction of non-mated searches that return any identity at or above threshold t (a stranger named);
- FNIR(t): the fraction of mated searches whose mate is not returned at rank 1 with a score at or above t
  (missed, or someone else ranked first);
- rank-1: the fraction of mated searches whose mate ranks first, whatever the score (closed-set accuracy);
- FNIR at FPIR x: FNIR at the lowest threshold whose measured FPIR is at most x.

Per-comparison FAR(t) over all different-person pairs, and its prediction of FPIR at a gallery size, live here
too; the prediction formula itself is the service's (service/decision.py), so evaluation and serving agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.decision import FarTable

# Score histogram resolution for FAR counting: thresholds are multiples of this, counts exact at each one.
FAR_STEP = 0.001
# A FAR is "measured" where at least this many impostor scores reach the threshold (relative error ~ 1/sqrt).
MIN_FAR_COUNT = 10


@dataclass
class SearchScores:
    """The outcome of a set of searches, reduced to what the metrics need."""

    mated_score: np.ndarray  # (M,) similarity of each mated probe to its own identity
    mated_rank1: np.ndarray  # (M,) bool: the mate's score is strictly the highest of all identities
    mated_margin: np.ndarray  # (M,) top score minus the second best identity's (where the mate is first)
    nonmated_top: np.ndarray  # (S,) highest similarity of each stranger probe to any identity
    nonmated_margin: np.ndarray  # (S,) top minus second best
    identities: int  # gallery size N


def identity_scores(probe_gallery: np.ndarray, gallery_labels: np.ndarray, template: str = "best",
                    probe_emb: np.ndarray | None = None, gallery_emb: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(probes, identities) similarities and the identity label of each column.

    template: `best` (the best-matching enrolled face of each identity: what the gallery does), `mean` (cosine
    to the normalised mean of the identity's faces) or `both` (the larger of the two).
    probe_gallery: (P, F) cosine similarities of probes to gallery faces; mean/both also need the embeddings.
    """
    ids, column = np.unique(gallery_labels, return_inverse=True)
    best = np.full((probe_gallery.shape[0], len(ids)), -np.inf, dtype=np.float64)
    np.maximum.at(best.T, column, probe_gallery.T.astype(np.float64))
    if template == "best":
        return best, ids
    if probe_emb is None or gallery_emb is None:
        raise ValueError("mean and both templates need the embeddings")
    sums = np.zeros((len(ids), gallery_emb.shape[1]), dtype=np.float64)
    np.add.at(sums, column, gallery_emb.astype(np.float64))
    means = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    mean = probe_emb.astype(np.float64) @ means.T
    if template == "mean":
        return mean, ids
    if template == "both":
        return np.maximum(best, mean), ids
    raise ValueError(f"unknown template {template!r}")


def search_outcomes(scores: np.ndarray, ids: np.ndarray, probe_labels: np.ndarray) -> SearchScores:
    """Reduce a (probes, identities) score matrix to per-probe outcomes; a probe is mated when its label is
    among `ids`."""
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[1]
    mated = np.isin(probe_labels, ids)
    order = np.argsort(-scores, axis=1, kind="stable")
    top = np.take_along_axis(scores, order[:, :1], axis=1)[:, 0]
    second = np.take_along_axis(scores, order[:, 1:2], axis=1)[:, 0] if n > 1 else np.full(len(scores), -np.inf)
    column = np.searchsorted(ids, probe_labels[mated])
    mate = scores[np.flatnonzero(mated), column]
    others = scores[mated].copy()
    others[np.arange(len(column)), column] = -np.inf
    best_other = others.max(axis=1) if n > 1 else np.full(len(column), -np.inf)
    return SearchScores(
        mated_score=mate,
        mated_rank1=mate > best_other,
        mated_margin=(top - second)[mated],
        nonmated_top=top[~mated],
        nonmated_margin=(top - second)[~mated],
        identities=n,
    )


def fpir_at(outcome: SearchScores, threshold: float, margin: float = 0.0) -> float:
    hit = (outcome.nonmated_top >= threshold) & (outcome.nonmated_margin >= margin)
    return float(hit.mean()) if len(hit) else float("nan")


def fnir_at(outcome: SearchScores, threshold: float, margin: float = 0.0) -> float:
    found = outcome.mated_rank1 & (outcome.mated_score >= threshold) & (outcome.mated_margin >= margin)
    return float(1 - found.mean()) if len(found) else float("nan")


def rank1(outcome: SearchScores) -> float:
    return float(outcome.mated_rank1.mean()) if len(outcome.mated_rank1) else float("nan")


def threshold_at_fpir(outcome: SearchScores, target: float, margin: float = 0.0) -> float:
    """The lowest threshold whose measured FPIR is at most `target`: just above the stranger score that would
    push the count of named strangers over target × S. +inf when the data cannot show a rate that small with a
    finite threshold (never: a threshold above every stranger gives FPIR 0)."""
    tops = np.sort(outcome.nonmated_top[outcome.nonmated_margin >= margin])[::-1]
    allowed = int(np.floor(target * len(outcome.nonmated_top) + 1e-9))  # strangers that may be named
    if allowed >= len(tops):
        return -np.inf
    return float(np.nextafter(tops[allowed], np.inf))


def fnir_at_fpir(outcome: SearchScores, target: float, margin: float = 0.0) -> tuple[float, float]:
    """(FNIR, threshold) at the lowest threshold with measured FPIR <= target."""
    t = threshold_at_fpir(outcome, target, margin)
    return fnir_at(outcome, t, margin), t


def det_curve(outcome: SearchScores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPIR, FNIR, threshold) at every stranger top score, highest threshold first: the DET curve."""
    t = np.unique(np.r_[outcome.nonmated_top, outcome.mated_score])[::-1]
    tops = np.sort(outcome.nonmated_top)
    found_scores = np.sort(outcome.mated_score[outcome.mated_rank1])
    s, m = max(1, len(tops)), max(1, len(outcome.mated_score))
    fpir_curve = (len(tops) - np.searchsorted(tops, t, side="left")) / s
    fnir_curve = 1 - (len(found_scores) - np.searchsorted(found_scores, t, side="left")) / m
    return fpir_curve, fnir_curve, t


# --- per-comparison FAR over every different-person pair ------------------------------------------------------

def impostor_histogram(embeddings: np.ndarray, labels: np.ndarray, step: float = FAR_STEP,
                       block: int = 1024) -> tuple[np.ndarray, np.ndarray, int]:
    """Counts of different-person cosine scores in bins of `step` over [-1, 1], from every unordered pair.

    Returns (edges, counts, pairs); counts[k] holds scores in [edges[k], edges[k+1]). Blocked, so memory stays
    at block x P scores whatever the number of photos.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    bins = round(2 / step)
    edges = np.linspace(-1.0, 1.0, bins + 1)
    counts = np.zeros(bins, dtype=np.int64)
    pairs = 0
    for start in range(0, len(x), block):
        rows = slice(start, min(start + block, len(x)))
        s = x[rows] @ x[start:].T  # pairs (i, j) with j >= start; keep j > i below
        i = np.arange(rows.start, rows.stop)[:, None]
        j = np.arange(start, len(x))[None, :]
        keep = (j > i) & (labels[rows][:, None] != labels[start:][None, :])
        values = np.clip(s[keep].astype(np.float64), -1.0, 1.0 - 1e-12)
        counts += np.bincount(np.floor((values + 1.0) / step).astype(np.int64), minlength=bins)[:bins]
        pairs += int(keep.sum())
    return edges, counts, pairs


def build_far_table(edges: np.ndarray, counts: np.ndarray, pairs: int, *, rule: str, step: float = 0.01,
                    min_count: int = MIN_FAR_COUNT, start_far: float = 0.2, fit_decades: float = 1.5
                    ) -> FarTable:
    """A FarTable from an impostor histogram.

    Measured points every `step` from where FAR drops below `start_far` up to the last threshold still backed
    by `min_count` impostor scores. Beyond it, log FAR is fitted linearly in t over the last `fit_decades` of
    measured FAR (the tail of impostor cosines is close to exponential there) and continued in `step`s until the
    rate falls under 1e-12, flagged by `measured_to`.
    """
    thresholds = edges
    exceed = np.r_[np.cumsum(counts[::-1])[::-1], 0]  # impostor scores >= each bin edge
    far = exceed / pairs
    grid_index = np.arange(0, len(thresholds), max(1, round(step / (thresholds[1] - thresholds[0]))))
    supported = grid_index[(exceed[grid_index] >= min_count) & (far[grid_index] <= start_far)]
    if len(supported) < 3:
        raise ValueError("too few impostor pairs above the thresholds to build a FAR table")
    # One grid point before start_far, so that lookups below the first point are not flattened.
    first = max(0, supported[0] - (grid_index[1] - grid_index[0]))
    points = np.r_[first, supported]
    t, f = thresholds[points], far[points]
    last_t, last_far = float(t[-1]), float(f[-1])
    tail = far >= last_far * 10**fit_decades
    fit = (np.arange(len(far)) >= np.flatnonzero(tail)[-1]) & (exceed >= min_count)
    slope, intercept = np.polyfit(thresholds[fit], np.log(far[fit]), 1)
    extra_t, extra_f = [], []
    if slope < 0:
        k = 1
        while True:
            tt = last_t + k * step
            ff = float(np.exp(intercept + slope * tt))
            if tt > 1 or ff < 1e-12:
                break
            extra_t.append(tt)
            extra_f.append(min(ff, last_far))
            k += 1
    extrapolation = (
        f"log FAR linear in t, fitted by least squares to the measured FAR between {thresholds[fit][0]:.3f} and "
        f"{thresholds[fit][-1]:.3f} ({float(far[fit][0]):.2g} to {float(far[fit][-1]):.2g}): "
        f"FAR(t) = exp({intercept:.4f} {slope:+.4f} t)"
    ) if extra_t else ""
    return FarTable(
        thresholds=np.r_[t, extra_t].astype(np.float64),
        far=np.r_[f, extra_f].astype(np.float64),
        measured_to=last_t,
        impostor_pairs=int(pairs),
        rule=rule,
        extrapolation=extrapolation,
    )


# --- the protocol -----------------------------------------------------------------------------------------------

@dataclass
class Split:
    gallery: np.ndarray  # row indices of enrolled photos
    probes: np.ndarray  # row indices of probe photos (mated and non-mated)
    enrolled: np.ndarray  # labels of enrolled people


def open_set_split(labels: np.ndarray, identities: int, rng: np.random.Generator, per_person: int = 1,
                   exclude: np.ndarray | None = None) -> Split:
    """Enrol `identities` people drawn at random among those with at least two photos: up to `per_person` of
    their photos (always leaving one or more as mated probes). Every other photo of theirs is a mated probe;
    every photo of anyone not enrolled is a non-mated probe. Rows in `exclude` (e.g. a score-normalisation
    cohort) are neither enrolled nor probes."""
    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    if exclude is not None:
        rows = np.setdiff1d(rows, exclude)
    people, counts = np.unique(labels[rows], return_counts=True)
    candidates = people[counts >= 2]
    if identities > len(candidates):
        raise ValueError(f"only {len(candidates)} people have two or more photos; cannot enrol {identities}")
    enrolled = np.sort(rng.choice(candidates, size=identities, replace=False))
    gallery = []
    for person in enrolled:
        own = rows[labels[rows] == person]
        gallery.extend(own[: min(per_person, len(own) - 1)])
    gallery = np.asarray(sorted(gallery), dtype=np.int64)
    probes = np.setdiff1d(rows, gallery)
    return Split(gallery=gallery, probes=probes, enrolled=enrolled)


def run_search(similarity: np.ndarray, embeddings: np.ndarray, labels: np.ndarray, split: Split,
               template: str = "best", cohort: np.ndarray | None = None) -> SearchScores:
    """Search every probe of a split against its gallery. `similarity` is the (P, P) cosine matrix of all photos.

    cohort: rows of photos of people in neither gallery nor probes. When given, scores are T-normalised per
    probe: (s - mean) / std of the probe's similarities to the cohort, the classic way to make one threshold fit
    probes that are "close to everyone" and probes that are close to no one.
    """
    scores, ids = identity_scores(similarity[np.ix_(split.probes, split.gallery)], labels[split.gallery],
                                  template, embeddings[split.probes], embeddings[split.gallery])
    if cohort is not None:
        c = similarity[np.ix_(split.probes, cohort)].astype(np.float64)
        scores = (scores - c.mean(axis=1, keepdims=True)) / c.std(axis=1, keepdims=True)
    return search_outcomes(scores, ids, labels[split.probes])
