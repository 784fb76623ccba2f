"""The shipped embedder's forward pass against two other MobileFaceNet graphs, timed side by side in one run.

    python -m benchmarks.embedder_graphs [--models-dir artifacts/models] [--runs 60]

- shipped: `mobilefacenet_192.onnx` as `make models` builds it (PRelu and Pad rewritten, export/onnx_rewrite.py);
- PRelu graph: the same weights exported with `--no-rewrite` (what the exporter wrote before the rewrite);
- foamliu: `python -m export mobilefacenet --layout foamliu` of ../shared/data/weights, the same 234 M
  multiply-adds with ReLU6 (ONNX Runtime fuses it into the convolutions): the speed of the convolutions alone.

Batch 1, one intra-op thread, ONNX Runtime's default CPU provider settings as the service uses them
(service.onnx_model.session_options), on one real aligned face. The graphs run round-robin (one forward each per
round), so load on the machine hits them alike; minimum and median wall time over the rounds, and the median
thread CPU time (time the thread actually ran: robust to other processes taking the cores). ONNX Runtime's
profiler adds the kernel time per operator type.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.harness import ROOT

FOAMLIU = "mobilefacenet_ms1m_arcface_112_foamliu.pt"
DEFAULT_WEIGHTS = ROOT.parent / "shared" / "data" / "weights"


def build_graphs(models_dir: Path, weights_dir: Path, workdir: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The three graphs (label -> file), exporting the two comparison graphs with the project's exporter CLI;
    a graph that cannot be built is returned in the second dict with the reason."""
    graphs = {"shipped (rewritten)": models_dir / "mobilefacenet_192.onnx"}
    missing: dict[str, str] = {}
    commands = {
        "PRelu graph (--no-rewrite)": ["mobilefacenet", "--no-rewrite", "--out", str(workdir / "prelu.onnx")],
        "foamliu (ReLU6)": ["mobilefacenet", "--checkpoint", str(weights_dir / FOAMLIU), "--layout", "foamliu",
                            "--out", str(workdir / "foamliu.onnx")],
    }
    for label, args in commands.items():
        proc = subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False, timeout=900)
        if proc.returncode == 0:
            graphs[label] = Path(args[-1])
        else:
            missing[label] = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return graphs, missing


def _input(path: Path, crop_bgr: np.ndarray) -> np.ndarray:
    """The crop as the file's metadata says to feed it (colour order, mean, std), NCHW batch 1."""
    from export.core import read_metadata

    meta = read_metadata(path)
    x = crop_bgr[..., ::-1] if meta["face.color"] == "RGB" else crop_bgr
    x = (x.astype(np.float32) - np.float32(json.loads(meta["face.mean"]))) / np.float32(json.loads(meta["face.std"]))
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def forward_times(graphs: dict[str, Path], crop_bgr: np.ndarray, runs: int = 60, warmup: int = 5) -> list[dict]:
    """Round-robin forward passes, batch 1, one thread: min / median wall ms and median thread-CPU ms per graph."""
    import onnxruntime as ort

    from service.onnx_model import session_options

    sessions = {k: ort.InferenceSession(str(p), session_options(1, 1), providers=["CPUExecutionProvider"])
                for k, p in graphs.items()}
    feeds = {k: {"input": _input(p, crop_bgr)} for k, p in graphs.items()}
    for label, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[label])
    wall, cpu = defaultdict(list), defaultdict(list)
    for _ in range(runs):
        for label, session in sessions.items():
            feed = feeds[label]
            c0, t0 = time.thread_time(), time.perf_counter()
            session.run(None, feed)
            wall[label].append(time.perf_counter() - t0)
            cpu[label].append(time.thread_time() - c0)
    return [{"graph": label, "runs": runs, "min_ms": 1e3 * min(wall[label]),
             "median_ms": 1e3 * float(np.median(wall[label])), "cpu_median_ms": 1e3 * float(np.median(cpu[label])),
             "path": str(graphs[label])} for label in sessions]


def embed_times(graphs: dict[str, Path], crop_bgr: np.ndarray, runs: int = 60) -> list[dict]:
    """`Embedder.embed` of one face (preprocess, network, mirrored crop when the file says so, L2-normalise),
    one thread, round-robin over the 192-d graphs (the foamliu file has no threshold: the service would not
    start on it alone, and its per-face cost is its forward pass)."""
    from service.embedder import Embedder
    from service.onnx_model import session_options

    embedders = {k: Embedder(p, session_options(1, 1)) for k, p in graphs.items() if not k.startswith("foamliu")}
    for embedder in embedders.values():
        for _ in range(3):
            embedder.embed(crop_bgr[None])
    wall = defaultdict(list)
    for _ in range(runs):
        for label, embedder in embedders.items():
            t0 = time.perf_counter()
            embedder.embed(crop_bgr[None])
            wall[label].append(time.perf_counter() - t0)
    return [{"graph": label, "flip": embedders[label].flip, "min_ms": 1e3 * min(wall[label]),
             "median_ms": 1e3 * float(np.median(wall[label]))} for label in embedders]


def kernel_profile(path: Path, crop_bgr: np.ndarray, runs: int = 20, warmup: int = 3) -> dict[str, float]:
    """ONNX Runtime's profiler: kernel ms per run by operator type (after its graph optimisations), one thread."""
    import onnxruntime as ort

    from service.onnx_model import session_options

    options = session_options(1, 1)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"input": _input(path, crop_bgr)}
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    measured_from = model_runs[warmup]["ts"]  # the warm-up runs' kernels are left out
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= measured_from:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def aligned_crop(models_dir: Path, photos: Path) -> np.ndarray:
    """The largest face of a real portrait, detected and aligned by the service: 112x112 BGR."""
    import cv2

    from service.detector import RetinaFaceDetector
    from service.embedder import Embedder
    from service.pipeline import Pipeline, largest

    pipeline = Pipeline(RetinaFaceDetector(models_dir / "retinaface_mnet025.onnx"),
                        Embedder(models_dir / "mobilefacenet_192.onnx"))
    image = cv2.imread(str(photos / "pairs" / "img20.jpg"))
    return pipeline.align(image, [largest(pipeline.detect(image))])[0]


def run(models_dir: Path, photos: Path, weights_dir: Path, runs: int, profile_runs: int = 20) -> dict:
    """Build, time and profile the graphs; prints the figures and returns them for the report."""
    crop = aligned_crop(models_dir, photos)
    with tempfile.TemporaryDirectory(prefix="facerec-graphs-") as tmp:
        graphs, missing = build_graphs(models_dir, weights_dir, Path(tmp))
        rows = forward_times(graphs, crop, runs)
        embeds = embed_times(graphs, crop, runs)
        profiles = {label: kernel_profile(path, crop, profile_runs) for label, path in graphs.items()}
    base = next((r for r in rows if r["graph"].startswith("foamliu")), None)
    print(f"\nembedder graphs (forward pass, batch 1, 1 thread, {runs} round-robin runs each)")
    for r in rows:
        ratio = "" if base is None else (f"  x foamliu: min {r['min_ms'] / base['min_ms']:.2f}, "
                                         f"cpu median {r['cpu_median_ms'] / base['cpu_median_ms']:.2f}")
        print(f"  {r['graph']:<26} min {r['min_ms']:6.2f}  median {r['median_ms']:6.2f}  "
              f"thread-cpu median {r['cpu_median_ms']:6.2f} ms{ratio}")
    for label, reason in missing.items():
        print(f"  {label}: not measured ({reason})")
    for r in embeds:
        print(f"  Embedder.embed, {r['graph']:<26} one face, mirror {'on' if r['flip'] else 'off'}: "
              f"min {r['min_ms']:6.2f}  median {r['median_ms']:6.2f} ms")
    print("kernel ms per run by operator (ONNX Runtime profiler, after its optimisations)")
    for label, ops in profiles.items():
        print(f"  {label:<26} total {sum(ops.values()):6.2f}: "
              + ", ".join(f"{op} {ms:.2f}" for op, ms in list(ops.items())[:6]))
    return {"rows": rows, "missing": missing, "profiles": profiles, "runs": runs, "embeds": embeds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.embedder_graphs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path(os.environ.get("FACE_MODELS_DIR", ROOT / "artifacts/models")))
    parser.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "faces")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help=f"the folder holding {FOAMLIU}")
    parser.add_argument("--runs", type=int, default=60, help="forward passes per graph (at least 60 for the report)")
    args = parser.parse_args(argv)
    run(args.models_dir, args.photos, args.weights, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def report(result: dict) -> list[str]:
    """The BENCHMARKS.md section for `run`'s result."""
    from benchmarks.__main__ import f, table

    rows = result["rows"]
    base = next((r for r in rows if r["graph"].startswith("foamliu")), None)
    lines = [
        "## Embedder graph: the shipped MobileFaceNet against the speed of its convolutions",
        "",
        (f"One forward pass (`InferenceSession.run`, batch 1, one intra-op thread, the service's session options) "
         f"on a real aligned face, {result['runs']} round-robin runs per graph: the shipped "
         "`mobilefacenet_192.onnx` (PRelu written as `z + sign(1-s) Relu(-|1-s| z)` and TF-SAME Pads folded into "
         "their Convs by the exporter, export/onnx_rewrite.py), the same weights exported with `--no-rewrite` "
         "(the graph shipped before: 33 PRelu, 4 Pad), and the foamliu MobileFaceNet (`python -m export "
         "mobilefacenet --layout foamliu`: the same 234 M multiply-adds, ReLU6 fused into its convolutions). "
         "Thread CPU time is the time the thread ran, which other processes on the machine do not inflate."),
        "",
        *table(["graph", "min ms", "median ms", "thread-CPU median ms", "min / foamliu min",
                "CPU median / foamliu's"],
               [[r["graph"], f(r["min_ms"], ".2f"), f(r["median_ms"], ".2f"), f(r["cpu_median_ms"], ".2f"),
                 "n/a" if base is None else f(r["min_ms"] / base["min_ms"], ".2f"),
                 "n/a" if base is None else f(r["cpu_median_ms"] / base["cpu_median_ms"], ".2f")] for r in rows]),
        "",
    ]
    for label, reason in result["missing"].items():
        lines += [f"{label}: not measured ({reason}).", ""]
    lines += [("What a face costs the service: `Embedder.embed` of one aligned face (preprocess, forward, the "
               "mirrored crop's forward when the file says so, L2-normalise), one thread, same round-robin:"), ""]
    lines += table(["graph", "mirror averaging", "min ms", "median ms"],
                   [[r["graph"], "on" if r["flip"] else "off", f(r["min_ms"], ".2f"), f(r["median_ms"], ".2f")]
                    for r in result["embeds"]])
    lines.append("")
    lines += [("Kernel time per run by operator (ONNX Runtime's profiler, after its graph optimisations; "
               "ms per forward pass):"), ""]
    lines += table(["graph", "total", "by operator"],
                   [[label, f(sum(ops.values()), ".2f"), ", ".join(f"{op} {ms:.2f}" for op, ms in ops.items())]
                    for label, ops in result["profiles"].items()])
    return [*lines, ""]
