"""`python -m benchmarks.embed_batching`: is one embedder call over the faces of several images faster than one
call per image? (/embed aligns every face of every image first, then embeds them in one batch.)

Real aligned faces: the largest face of each photo in ../shared/data/faces/pairs, aligned by the service's own
pipeline. For N faces, per-face time of N calls of one crop against one call of N crops, in the same run,
round-robin, median of the repeats; at one intra-op thread (FACE_INTRA_OP_THREADS=1, what a busy server gives
each request) and at the machine's cores. At one thread ORT computes on the calling thread, so its thread CPU time
is also printed: other processes on a busy machine do not inflate it.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import ROOT


def _crops(models_dir: Path, photos: Path, n: int) -> np.ndarray:
    from service.detector import RetinaFaceDetector
    from service.embedder import Embedder
    from service.pipeline import Pipeline, largest

    pipeline = Pipeline(RetinaFaceDetector(models_dir / "retinaface_mnet025.onnx"),
                        Embedder(models_dir / "mobilefacenet_192.onnx"))
    crops = []
    for path in sorted(photos.glob("*.jpg")):
        image = pipeline.decode(path.read_bytes(), max_bytes=1 << 30, max_pixels=1 << 30)
        face = largest(pipeline.detect(image))
        if face is not None:
            crops.append(pipeline.align(image, [face])[0])
        if len(crops) == n:
            break
    return np.stack(crops)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "artifacts" / "models")
    parser.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "faces" / "pairs")
    parser.add_argument("--faces", type=int, nargs="+", default=[2, 4, 10])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)

    from service.embedder import Embedder
    from service.onnx_model import session_options

    crops = _crops(args.models_dir, args.photos, max(args.faces))
    print(f"{len(crops)} real aligned faces; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| intra-op threads | faces | ms per face, one call per face | ms per face, one batch | batch / single "
          "| thread-CPU batch / single |")
    print("|---:|---:|---:|---:|---:|---:|")
    for threads in (1, os.cpu_count() or 1):
        embedder = Embedder(args.models_dir / "mobilefacenet_192.onnx", session_options(threads, 1))
        embedder.embed(crops[:1])  # warm-up
        for n in args.faces:
            batch = crops[:n]
            single, batched, single_cpu, batched_cpu = [], [], [], []
            for _ in range(args.repeat):  # round-robin: both see the same machine
                start, cpu = time.perf_counter(), time.thread_time()
                for i in range(n):
                    embedder.embed(batch[i : i + 1])
                single.append((time.perf_counter() - start) * 1000 / n)
                single_cpu.append(time.thread_time() - cpu)
                start, cpu = time.perf_counter(), time.thread_time()
                embedder.embed(batch)
                batched.append((time.perf_counter() - start) * 1000 / n)
                batched_cpu.append(time.thread_time() - cpu)
            s, b = float(np.median(single)), float(np.median(batched))
            cpu_ratio = f"{np.median(batched_cpu) / np.median(single_cpu):.2f}" if threads == 1 else "-"
            print(f"| {threads} | {n} | {s:.2f} | {b:.2f} | {b / s:.2f} | {cpu_ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
