"""The ROC plot of a verification run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evaluate.verification import MISSING_SCORE


def roc_points(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false accept rate, true accept rate, threshold) at every distinct score, highest threshold first."""
    s = np.asarray(scores, dtype=np.float64).copy()
    s[np.isnan(s)] = MISSING_SCORE
    y = np.asarray(labels, dtype=bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # accept everything >= each distinct score
    tp = np.cumsum(y)[last_of_each]
    fp = np.cumsum(~y)[last_of_each]
    far = np.r_[0.0, fp / max(1, (~y).sum())]
    tar = np.r_[0.0, tp / max(1, y.sum())]
    return far, tar, np.r_[np.inf, s[last_of_each]]


def plot_roc(scores, labels, path: str | Path, title: str, threshold: float | None = None) -> Path:
    """Write a PNG: TAR against FAR on a log axis (where face verification operates), the threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    far, tar, _ = roc_points(scores, labels)
    n_neg = int((~np.asarray(labels, bool)).sum())
    floor = 1.0 / max(n_neg, 1) / 2  # zero FAR is drawn at half the smallest measurable rate
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    ax.step(np.maximum(far, floor), tar, where="post", label="ROC")
    if threshold is not None:
        s = np.asarray(scores, dtype=np.float64)
        s = np.where(np.isnan(s), MISSING_SCORE, s)
        y = np.asarray(labels, bool)
        point_far = max(float(np.mean(s[~y] >= threshold)), floor)
        point_tar = float(np.mean(s[y] >= threshold))
        ax.plot([point_far], [point_tar], "o", color="C3", label=f"threshold {threshold:.3f}")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(max(0.0, float(tar[1:].min()) - 0.05) if len(tar) > 1 else 0.0, 1.005)
    ax.set_xlabel("false accept rate (different-person pairs accepted)")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
