"""`python -m benchmarks.tracking`: the face tracker's per-frame cost and id stability, ours against norfair.

Two steps, so that the library can live in its own environment (norfair 2.3 pins numpy < 2, which the service's
OpenCV refuses):

    python -m benchmarks.tracking detect --models-dir artifacts/models --photos ../shared/data/faces --out d.npz
    python -m benchmarks.tracking compare d.npz           # in any environment with numpy (and norfair, if any)

`detect` runs the service's detector over the stream benchmark's scene (two real heads swaying across 640x480,
benchmarks/video_scene.py) and keeps every frame's boxes and landmarks, with which head each one is. `compare`
feeds them to each tracker, frame by frame, and prints the thread CPU time of each update (other processes on a
busy machine do not inflate it) and how steady the ids were: the share of each head's frames that carry its most
frequent id.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

FRAMES = 300


def detect(models_dir: Path, photos: Path, out: Path, frames: int = FRAMES) -> None:
    import cv2

    from benchmarks.video_scene import head_patch, moving_heads
    from service.detector import RetinaFaceDetector
    from service.pipeline import Pipeline, largest

    detector = RetinaFaceDetector(models_dir / "retinaface_mnet025.onnx")
    pipeline = Pipeline(detector, None)  # type: ignore[arg-type] -- detection only
    patches = []
    for name in ("pairs/img21.jpg", "pairs/img12.jpg"):
        image = cv2.imread(str(photos / name))
        patches.append(head_patch(image, largest(pipeline.detect(image)).box))
    rows = []
    for t, (frame, corners) in enumerate(moving_heads(patches, frames)):
        centres = [(x + p.shape[1] / 2, y + p.shape[0] / 2) for (x, y), p in zip(corners, patches)]
        for face in pipeline.detect(frame):
            cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
            head = int(np.argmin([(cx - hx) ** 2 + (cy - hy) ** 2 for hx, hy in centres]))
            rows.append((t, head, *face.box, *face.landmarks.reshape(-1)))
    np.savez(out, rows=np.array(rows, np.float32))
    print(f"{len(rows)} detections over {frames} frames -> {out}")


def _frames(rows: np.ndarray) -> list[np.ndarray]:
    return [rows[rows[:, 0] == t] for t in range(int(rows[:, 0].max()) + 1)]


def _steadiness(ids: dict[int, list[int]]) -> str:
    parts = []
    for head, seen in sorted(ids.items()):
        most = max(set(seen), key=seen.count)
        parts.append(f"head {head}: {100 * seen.count(most) / len(seen):.1f} % ({len(set(seen))} ids)")
    return "; ".join(parts)


def ours(frames: list[np.ndarray]) -> tuple[list[float], dict[int, list[int]]]:
    from service.tracking import Tracker

    tracker = Tracker()
    costs, ids = [], {0: [], 1: []}
    for t, rows in enumerate(frames):
        start = time.thread_time_ns()
        tracks = tracker.update(t, rows[:, 2:6], rows[:, 6:16].reshape(-1, 5, 2))
        costs.append((time.thread_time_ns() - start) / 1e6)
        for row, track in zip(rows, tracks):
            ids[int(row[1])].append(track.track_id)
    return costs, ids


def norfair(frames: list[np.ndarray]) -> tuple[list[float], dict[int, list[int]]]:
    from norfair import Detection, Tracker

    # Boxes as two points with IoU distance: norfair's documented set-up for box detectors.
    tracker = Tracker(distance_function="iou", distance_threshold=0.7, initialization_delay=0, hit_counter_max=15)
    costs, ids = [], {0: [], 1: []}
    for rows in frames:
        detections = [Detection(points=row[2:6].reshape(2, 2), data=int(row[1])) for row in rows]
        start = time.thread_time_ns()
        tracked = tracker.update(detections=detections)
        costs.append((time.thread_time_ns() - start) / 1e6)
        for obj in tracked:
            if obj.last_detection is not None and obj.last_detection in detections:
                ids[obj.last_detection.data].append(obj.id)
    return costs, ids


def compare(path: Path) -> None:
    rows = np.load(path)["rows"]
    frames = _frames(rows)
    print(f"{len(rows)} detections over {len(frames)} frames; per-frame update, thread CPU time")
    print("| tracker | p50 ms | p95 ms | mean ms | id steadiness |")
    print("|---|---:|---:|---:|---|")
    trackers = [("ours (service/tracking.py)", ours)]
    try:
        import norfair as lib

        trackers.append((f"norfair {lib.__version__} (IoU)", norfair))
    except ImportError:
        print("(norfair not installed here: pip install norfair, in an environment of its own)")
    for name, run in trackers:
        costs, ids = run(frames)
        costs = np.array(costs[5:])  # first updates allocate
        print(f"| {name} | {np.percentile(costs, 50):.3f} | {np.percentile(costs, 95):.3f} | {costs.mean():.3f} "
              f"| {_steadiness(ids)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("detect")
    d.add_argument("--models-dir", type=Path, default=Path("artifacts/models"))
    d.add_argument("--photos", type=Path, default=Path("../shared/data/faces"))
    d.add_argument("--out", type=Path, default=Path("artifacts/tracking-detections.npz"))
    c = sub.add_parser("compare")
    c.add_argument("detections", type=Path)
    args = parser.parse_args()
    if args.command == "detect":
        detect(args.models_dir, args.photos, args.out)
    else:
        compare(args.detections)


if __name__ == "__main__":
    main()
