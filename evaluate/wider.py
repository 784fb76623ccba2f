"""WIDER FACE detection evaluation (AP on the easy / medium / hard settings), the standard protocol.

This follows the official `eval_tools` (wider_eval.m) and its widely used Python port, step by step, so
figures are comparable with published ones:
- every prediction's score is min-max normalised over the WHOLE set before thresholding;
- per image, predictions are taken best score first; one matches the ground-truth box it overlaps most, if
  that IoU >= 0.5 (areas in the inclusive-pixel convention, `w + 1`); a match to a box outside the setting's
  keep list is "ignored" (neither a true nor a false positive); a box counts once as recalled;
- 1000 score thresholds give a precision/recall curve summed over images; AP is the VOC area under the
  monotone envelope of that curve.

Inputs: the ground truth in `wider_face_val_bbx_gt.txt` format; the easy/medium/hard keep lists from the
eval_tools `.mat` files (`wider_face_val.mat` with `event_list`/`file_list`, and `wider_{easy,medium,hard}_val.mat`
with `gt_list`) when scipy is available. Without them only the `all` setting is computed: every box whose
`invalid` flag is 0 is kept, invalid ones are ignored. The official split cannot be rebuilt from the txt
(it was made from EdgeBox detection rates), so `all` is not "hard" and is labelled as such.

Predictions: `pred_dir/<event>/<image name>.txt` as the RetinaFace / eval_tools tools write them (image name,
count, then `x y w h score` per line), or a dict built in code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IOU_THRESHOLD = 0.5
THRESHOLDS = 1000
SETTINGS = ("easy", "medium", "hard")


@dataclass
class GroundTruth:
    """One image: boxes (N, 4) x, y, w, h in pixels, and which boxes a setting keeps (0-based indices)."""

    boxes: np.ndarray
    invalid: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


def image_key(name: str) -> str:
    """`0--Parade/0_Parade_marchingband_1_465.jpg` -> `0--Parade/0_Parade_marchingband_1_465`."""
    name = name.strip().replace("\\", "/")
    return name[: -len(Path(name).suffix)] if Path(name).suffix else name


def read_ground_truth(path: str | Path) -> dict[str, GroundTruth]:
    """Parse `wider_face_*_bbx_gt.txt`: name line, count line, then `x y w h blur expr illum invalid occl pose`.

    An image with no face is written with count 0 followed by one line of zeros, which is skipped.
    """
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    lines = [line for line in lines if line]
    out: dict[str, GroundTruth] = {}
    i = 0
    while i < len(lines):
        name = lines[i]
        try:
            count = int(lines[i + 1])
        except (IndexError, ValueError):
            raise ValueError(f"{path}: line {i + 2}: expected a face count after {name!r}") from None
        rows = lines[i + 2 : i + 2 + max(count, 1)]
        i += 2 + max(count, 1)
        if count == 0:
            out[image_key(name)] = GroundTruth(np.zeros((0, 4)), np.zeros(0, bool))
            continue
        values = np.array([[float(v) for v in row.split()] for row in rows])
        if values.ndim != 2 or values.shape[1] < 4 or len(values) != count:
            raise ValueError(f"{path}: {name}: expected {count} rows of at least 4 numbers")
        invalid = values[:, 7].astype(bool) if values.shape[1] >= 8 else np.zeros(count, bool)
        out[image_key(name)] = GroundTruth(values[:, :4], invalid)
    return out


def read_predictions(pred_dir: str | Path) -> dict[str, np.ndarray]:
    """`pred_dir/<event>/<name>.txt` files -> {"event/name": (K, 5) x, y, w, h, score}."""
    pred_dir = Path(pred_dir)
    out = {}
    for txt in sorted(pred_dir.glob("*/*.txt")):
        lines = [line.strip() for line in txt.read_text().splitlines()]
        count = int(lines[1]) if len(lines) > 1 and lines[1] else 0
        rows = [[float(v) for v in line.split()[:5]] for line in lines[2 : 2 + count] if line]
        out[f"{txt.parent.name}/{txt.stem}"] = np.array(rows, dtype=np.float64).reshape(-1, 5)
    return out


def write_predictions(pred_dir: str | Path, key: str, boxes_xywh_score: np.ndarray) -> Path:
    """Write one image's predictions in the eval_tools format (the inverse of `read_predictions`)."""
    path = Path(pred_dir) / f"{key}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [" ".join(f"{v:.3f}" for v in row[:4]) + f" {row[4]:.6f}" for row in boxes_xywh_score]
    path.write_text("\n".join([Path(key).name, str(len(rows)), *rows]) + "\n")
    return path


def read_split_mats(eval_tools_dir: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """{setting: {"event/name": 0-based kept box indices}} from the eval_tools ground-truth .mat files."""
    from scipy.io import loadmat  # optional: only for the official easy/medium/hard split

    root = Path(eval_tools_dir)
    val = loadmat(root / "wider_face_val.mat")
    events = val["event_list"]
    files = val["file_list"]
    splits = {}
    for setting in SETTINGS:
        gt_list = loadmat(root / f"wider_{setting}_val.mat")["gt_list"]
        keep: dict[str, np.ndarray] = {}
        for e in range(len(events)):
            event = str(np.ravel(events[e][0])[0])
            names, lists = files[e][0], gt_list[e][0]
            for j in range(len(names)):
                name = str(np.ravel(names[j][0])[0])
                indices = np.asarray(lists[j][0], dtype=np.int64).ravel() - 1  # MATLAB indices are 1-based
                keep[f"{event}/{name}"] = indices
        splits[setting] = keep
    return splits


def _overlaps(pred_x1y1x2y2: np.ndarray, gt_x1y1x2y2: np.ndarray) -> np.ndarray:
    """IoU (K, N) in the inclusive-pixel convention of eval_tools' bbox_overlaps (`x2 - x1 + 1`)."""
    p, g = pred_x1y1x2y2[:, None, :], gt_x1y1x2y2[None, :, :]
    iw = np.minimum(p[..., 2], g[..., 2]) - np.maximum(p[..., 0], g[..., 0]) + 1
    ih = np.minimum(p[..., 3], g[..., 3]) - np.maximum(p[..., 1], g[..., 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_p = (p[..., 2] - p[..., 0] + 1) * (p[..., 3] - p[..., 1] + 1)
    area_g = (g[..., 2] - g[..., 0] + 1) * (g[..., 3] - g[..., 1] + 1)
    return inter / (area_p + area_g - inter)


def _image_eval(pred: np.ndarray, gt: np.ndarray, kept: np.ndarray, iou_threshold: float):
    """Per prediction (best first): running count of recalled kept boxes, and whether it is a proposal."""
    p = pred[:, :4].copy()
    g = gt.copy()
    p[:, 2:] += p[:, :2]
    g[:, 2:] += g[:, :2]
    overlaps = _overlaps(p, g)
    recalled = np.zeros(len(g), np.int8)  # 0 not yet, 1 recalled, -1 matched but not in the setting
    proposal = np.ones(len(p), np.int8)  # -1: matched an ignored box, not counted as a proposal
    pred_recall = np.zeros(len(p))
    for h in range(len(p)):
        best = int(np.argmax(overlaps[h]))
        if overlaps[h, best] >= iou_threshold:
            if not kept[best]:
                recalled[best] = -1
                proposal[h] = -1
            elif recalled[best] == 0:
                recalled[best] = 1
        pred_recall[h] = np.sum(recalled == 1)
    return pred_recall, proposal


def _image_pr(scores: np.ndarray, proposal: np.ndarray, pred_recall: np.ndarray, n: int) -> np.ndarray:
    """(n, 2) proposals and recalled boxes at each threshold 1 - (t + 1) / n (scores sorted, best first)."""
    out = np.zeros((n, 2))
    for t in range(n):
        above = np.flatnonzero(scores >= 1 - (t + 1) / n)
        if len(above):
            last = above[-1]
            out[t, 0] = np.sum(proposal[: last + 1] == 1)
            out[t, 1] = pred_recall[last]
    return out


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (precision made non-increasing in recall), VOC style."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def normalise_scores(predictions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Min-max normalise every score over the whole prediction set, as eval_tools does."""
    scores = [p[:, 4] for p in predictions.values() if len(p)]
    if not scores:
        return predictions
    all_scores = np.concatenate(scores)
    low, high = float(all_scores.min()), float(all_scores.max())
    span = high - low if high > low else 1.0
    out = {}
    for key, p in predictions.items():
        q = np.asarray(p, dtype=np.float64).reshape(-1, 5).copy()
        q[:, 4] = (q[:, 4] - low) / span if high > low else 1.0
        out[key] = q
    return out


def average_precision(
    predictions: dict[str, np.ndarray],
    ground_truth: dict[str, GroundTruth],
    keep: dict[str, np.ndarray] | None = None,
    iou_threshold: float = IOU_THRESHOLD,
    thresholds: int = THRESHOLDS,
) -> tuple[float, np.ndarray]:
    """AP of one setting and its (thresholds, 2) [precision, recall] curve.

    keep: {"event/name": 0-based indices of the boxes this setting counts}; None keeps every valid box
    (the `all` setting). Images absent from `keep` count no face, as in eval_tools.
    """
    preds = normalise_scores(predictions)
    pr = np.zeros((thresholds, 2))
    faces = 0
    for key, gt in ground_truth.items():
        if keep is None:
            kept = ~gt.invalid if len(gt.invalid) == len(gt.boxes) else np.ones(len(gt.boxes), bool)
        else:
            kept = np.zeros(len(gt.boxes), bool)
            indices = keep.get(key, np.zeros(0, np.int64))
            kept[indices[(indices >= 0) & (indices < len(kept))]] = True
        faces += int(kept.sum())
        pred = preds.get(key, np.zeros((0, 5)))
        if len(gt.boxes) == 0 or len(pred) == 0:
            continue
        pred = pred[np.argsort(-pred[:, 4], kind="stable")]
        pred_recall, proposal = _image_eval(pred, gt.boxes, kept, iou_threshold)
        pr += _image_pr(pred[:, 4], proposal, pred_recall, thresholds)
    if faces == 0:
        raise ValueError("no ground-truth face is kept by this setting")
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(pr[:, 0] > 0, pr[:, 1] / np.maximum(pr[:, 0], 1), 0.0)
    recall = pr[:, 1] / faces
    return voc_ap(recall, precision), np.stack([precision, recall], axis=1)


def evaluate(
    predictions: dict[str, np.ndarray],
    ground_truth: dict[str, GroundTruth],
    splits: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, float]:
    """{setting: AP}: easy/medium/hard with the official splits, else only `all` (every valid box)."""
    if splits:
        return {name: average_precision(predictions, ground_truth, keep)[0] for name, keep in splits.items()}
    return {"all": average_precision(predictions, ground_truth, None)[0]}
