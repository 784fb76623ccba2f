"""Face quality on labelled pairs: fit service/quality.py's combination and check it with an error-versus-discard
curve (as in NIST's face image quality evaluations).

Per photo, the served pipeline finds the face (LFW: the central one) and measures its signals and embedding. The
combination is linear in the features (`service.quality.features`): a same-person pair's cosine similarity is
modelled as b + w·f(a) + w·f(b), fitted by least squares, so one face's quality b + 2 w·f is the similarity two
photos of its quality are expected to reach. The curve: same-person pairs sorted by their worse face's quality,
the lowest fraction discarded, the false non-match rate at the shipped threshold over the rest; against
discarding the same fraction at random (the mean over many draws). Qualities on the curve are out-of-fold: each
fold's pairs are scored by a model fitted on the other folds, so the curve does not grade the fit on its own data.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FEATURES = ("log_embedding_norm", "log_face_size", "abs_yaw", "abs_pitch")  # what service.quality.score reads
SIGNALS = ("face_size", "detector_score", "yaw", "pitch", "roll", "sharpness", "brightness", "contrast",
           "embedding_norm")
FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.10, 0.15, 0.20)


@dataclass
class PhotoQuality:
    signals: dict[str, float]  # service.quality.FaceQuality's fields, without the score
    embedding: np.ndarray


def measure_photos(pipeline, photos: list[Path], *, face: str, max_pixels: int, detection_score: float | None,
                   max_faces: int | None) -> dict[Path, PhotoQuality | None]:
    """Each photo's chosen face: its quality signals and embedding (None: no face found)."""
    from evaluate.pairs import central
    from service.pipeline import largest

    found: dict[Path, PhotoQuality | None] = {}
    started = time.perf_counter()
    for k, path in enumerate(photos):
        image = pipeline.decode(path.read_bytes(), max_bytes=1 << 31, max_pixels=max_pixels)
        faces = pipeline.detect(image, score_threshold=detection_score, max_faces=max_faces)
        chosen = largest(faces) if face == "largest" else central(faces, image.shape)
        if chosen is None:
            found[path] = None
        else:
            pipeline.embed(image, [chosen], quality=True)
            signals = {k: (math.nan if v is None else v) for k, v in chosen.quality.as_dict().items() if k != "quality"}
            found[path] = PhotoQuality(signals, chosen.embedding)
        if (k + 1) % 500 == 0:
            log.info("%d/%d photos, %.0f s", k + 1, len(photos), time.perf_counter() - started)
    return found


def signal_correlations(pairs: list[tuple[dict[str, float], dict[str, float]]],
                        similarity: np.ndarray) -> dict[str, float]:
    """Spearman correlation of each signal with same-person pairs' similarity, the pair scored by its worse face:
    the smaller value, or for the pose angles the larger magnitude."""
    def rank(x: np.ndarray) -> np.ndarray:
        return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)

    out = {}
    for name in SIGNALS:
        a = np.array([p[0][name] for p in pairs], dtype=np.float64)
        b = np.array([p[1][name] for p in pairs], dtype=np.float64)
        worse = np.maximum(np.abs(a), np.abs(b)) if name in ("yaw", "pitch", "roll") else np.minimum(a, b)
        worse = np.where(np.isfinite(worse), worse, np.inf if name in ("yaw", "pitch", "roll") else -np.inf)
        out[name] = float(np.corrcoef(rank(worse), rank(similarity))[0, 1])
    return out


def feature_matrix(signals: list[dict[str, float]]) -> np.ndarray:
    from service.quality import features

    return np.array([[features(s)[name] for name in FEATURES] for s in signals], dtype=np.float64)


def fit(fa: np.ndarray, fb: np.ndarray, similarity: np.ndarray) -> dict[str, float]:
    """Least squares for similarity ≈ b + w·fa + w·fb; returns the per-face model {intercept: b, name: 2w}
    (a face's quality: the similarity of two photos like it), the form of service.quality.QUALITY_MODEL."""
    x = np.column_stack([np.ones(len(fa)), fa + fb])
    coef, *_ = np.linalg.lstsq(x, similarity, rcond=None)
    return {"intercept": float(coef[0]), **{name: float(2 * w) for name, w in zip(FEATURES, coef[1:])}}


def predict(model: dict[str, float], f: np.ndarray) -> np.ndarray:
    weights = np.array([model[name] for name in FEATURES])
    return np.clip(model["intercept"] + f @ weights, 0.0, 1.0)


def error_versus_discard(pair_quality: np.ndarray, similarity: np.ndarray, threshold: float,
                         fractions=FRACTIONS, draws: int = 2000, seed: int = 0) -> list[dict[str, float]]:
    """FNMR at `threshold` over same-person pairs after discarding each fraction with the lowest pair quality,
    and after discarding the same number at random (mean over `draws`)."""
    rng = np.random.default_rng(seed)
    n = len(similarity)
    miss = similarity < threshold
    order = np.argsort(pair_quality, kind="stable")
    rows = []
    for fraction in fractions:
        k = round(fraction * n)
        kept = order[k:]
        random = [miss[rng.permutation(n)[k:]].mean() for _ in range(draws if k else 1)]
        rows.append({"discarded": fraction, "pairs_kept": n - k, "fnmr": float(miss[kept].mean()),
                     "fnmr_random_discard": float(np.mean(random)), "misses_kept": int(miss[kept].sum())})
    return rows


def plot_curve(rows: list[dict[str, float]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * r["discarded"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    ax.plot(x, [100 * r["fnmr"] for r in rows], "o-", label="lowest quality discarded")
    ax.plot(x, [100 * r["fnmr_random_discard"] for r in rows], "s--", label="random pairs discarded")
    ax.set_xlabel("same-person pairs discarded (%)")
    ax.set_ylabel("false non-match rate at the threshold (%)")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
