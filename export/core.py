"""Turning a PyTorch module into a self-describing ONNX file, with parity proven on every export.

`export_onnx` is the one way a network leaves the training side. It

1. checks the caller's `face.*` metadata against docs/model-contract.md (the service refuses files whose
   metadata is missing or inconsistent, so we refuse to write them in the first place);
2. exports with input `input` (float32, NCHW, batch dynamic; height/width dynamic for detectors);
3. rewrites what ONNX Runtime's CPU provider runs slowly into equivalents it runs fast (export/onnx_rewrite.py:
   PRelu, Pad before Conv), writes the metadata into `metadata_props` and runs `onnx.checker` with `full_check=True`;
4. runs ONNX Runtime (CPUExecutionProvider, what the service uses) against PyTorch on real inputs at batch 1,
   at the full batch (proves the dynamic batch axis), and for dynamic_hw at a second spatial size;
5. only then moves the file into place (tmp + rename), so a failed export never leaves a file that looks valid;
6. optionally writes fp16 / int8 variants beside it (`name.fp16.onnx`, `name.int8.onnx`), each with its own
   parity figures against the same PyTorch outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tqdm import tqdm

from export.onnx_rewrite import REWRITES
from export.onnx_rewrite import rewrite as rewrite_graph
from export.paths import ROOT, cache_dir, shared_data_dir  # noqa: F401  (re-exported for the exporters)

log = logging.getLogger(__name__)

# Opset 17 is the lowest with LayerNormalization and what ORT >= 1.14 runs everywhere; newer opsets buy our
# conv nets nothing and narrow the runtimes that can load the file.
OPSET = 17

PRECISIONS = ("fp32", "fp16", "int8")

# Looser, stated tolerances for reduced-precision variants of embedders: minimum row cosine vs PyTorch fp32.
# fp16 keeps ~3 significant digits per op; dynamic int8 quantises weights per tensor and activations per call.
VARIANT_MIN_COSINE = {"fp16": 0.999, "int8": 0.99}
# Detectors' variants are reported, not judged, except when they are absurd: non-finite outputs, or face
# probabilities that move by more than this (a probability is in [0, 1], so 0.5 means the decision flipped).
DETECTOR_VARIANT_MAX_CONF_DIFF = 0.5

OUTPUT_NAMES = {"detector": ["loc", "conf", "landmarks"], "embedder": ["embedding"]}
COMMON_KEYS = (
    "face.kind",
    "face.arch",
    "face.layout",
    "face.color",
    "face.mean",
    "face.std",
    "face.input_size",
    "face.source",
    "face.source_sha256",
)
KIND_KEYS = {
    "detector": (
        "face.detector.priors",
        "face.detector.score_threshold",
        "face.detector.nms_threshold",
        "face.detector.max_side",
    ),
    "embedder": ("face.embedder.template", "face.embedder.embedding_size"),
}
# Filled by the exporter itself, never by the caller: they describe this file, not the source weights.
CORE_KEYS = ("face.exporter", "face.precision")

def portrait_crops(faces_dir: Path, size: tuple[int, int], n: int, color: str = "RGB") -> list[np.ndarray]:
    """Up to n real photos from faces_dir (*.jpg, sorted) as centre square crops resized to size (h, w), uint8 in
    `color` order. A centre crop of a portrait is mostly face: real pixel statistics for parity checks, which is
    what they need (alignment is the service's business, not the exporter's). Empty when the folder is absent."""
    import cv2

    h, w = size
    photos = sorted(Path(faces_dir).glob("*.jpg"))[:n] if Path(faces_dir).is_dir() else []
    crops = []
    for photo in photos:
        bgr = cv2.imread(str(photo), cv2.IMREAD_COLOR)
        if bgr is None:
            continue
        side = min(bgr.shape[:2])
        top, left = (bgr.shape[0] - side) // 2, (bgr.shape[1] - side) // 2
        crop = cv2.resize(bgr[top : top + side, left : left + side], (w, h), interpolation=cv2.INTER_AREA)
        crops.append(cv2.cvtColor(crop, cv2.COLOR_BGR2RGB) if color == "RGB" else crop)
    return crops


class ExportError(RuntimeError):
    """The model could not be exported, or the exported graph does not reproduce PyTorch."""


@dataclass(frozen=True)
class ParityCheck:
    """One ORT-vs-PyTorch comparison: which inputs, and how far apart the outputs were."""

    label: str  # e.g. "batch 1", "batch 4", "batch 4 at 480x640"
    input_shape: tuple[int, ...]
    max_abs_diff: float  # over all outputs
    min_cosine: float | None  # embedders only: lowest per-row cosine of `embedding`


@dataclass(frozen=True)
class VariantReport:
    precision: str  # fp32 | fp16 | int8
    path: Path
    max_abs_diff: float
    min_cosine: float | None
    size_bytes: int
    checks: tuple[ParityCheck, ...] = ()


@dataclass(frozen=True)
class ExportReport:
    """What `export_onnx` wrote and measured. `variants[0]` is the fp32 file itself."""

    path: Path
    max_abs_diff: float
    min_cosine: float | None
    size_bytes: int
    variants: list[VariantReport] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        """A plain-text table of the measured figures, for CLI reports."""
        rows = [("precision", "max|diff|", "min cosine", "size", "file")]
        for v in self.variants:
            cos = "-" if v.min_cosine is None else f"{v.min_cosine:.7f}"
            rows.append((v.precision, f"{v.max_abs_diff:.3g}", cos, _human_size(v.size_bytes), str(v.path)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_metadata(onnx_path: str | Path) -> dict[str, str]:
    """The `metadata_props` of an ONNX file as a dict of strings (what the service reads)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def exporter_name(rewrite: bool = True) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("facerec")
    except PackageNotFoundError:  # a plain checkout, not installed: fall back to the source version
        ours = "0.1.0"
    # The rewrites are named: the same weights, torch and opset give a different graph when they change.
    return f"facerec-export {ours} (torch {torch.__version__}, opset {OPSET}{', ' + REWRITES if rewrite else ''})"


def export_onnx(
    model: torch.nn.Module,
    sample: torch.Tensor,
    out_path: Path,
    metadata: Mapping[str, object],
    output_names: list[str],
    dynamic_hw: bool = False,
    parity_inputs: torch.Tensor | None = None,
    atol: float = 1e-4,
    min_cosine: float | None = None,
    variants: Sequence[str] = ("fp32",),
    rewrite: bool = True,
) -> ExportReport:
    """Export `model` to `out_path` as ONNX with contract metadata, and prove ORT reproduces PyTorch.

    sample: example input [N, C, H, W] float32, already normalised as the metadata says.
    parity_inputs: real preprocessed images [N, C, H, W] (N >= 2 ideally, so the dynamic batch is exercised);
        defaults to `sample`.
    atol: largest allowed max |torch - ORT| over all outputs, fp32.
    min_cosine: for embedders, the smallest allowed per-row cosine between torch and ORT embeddings, fp32.
    variants: "fp32" is always written; "fp16" / "int8" add `name.fp16.onnx` / `name.int8.onnx` beside it.
    rewrite: apply export/onnx_rewrite.py (default); False keeps the graph as torch.onnx.export wrote it (for
        comparisons such as benchmarks/embedder_graphs.py).

    Raises ExportError (and leaves no file behind) when metadata is incomplete, the checker fails, or parity
    is beyond tolerance.
    """
    out_path = Path(out_path)
    unknown = [v for v in variants if v not in PRECISIONS]
    if unknown:
        raise ExportError(f"unknown precision(s) {unknown}; choose from {list(PRECISIONS)}")
    sample = _as_input(sample, "sample")
    parity = sample if parity_inputs is None else _as_input(parity_inputs, "parity_inputs")
    if parity.shape[1] != sample.shape[1] or (not dynamic_hw and parity.shape[2:] != sample.shape[2:]):
        raise ExportError(f"parity_inputs {tuple(parity.shape)} do not fit sample {tuple(sample.shape)}")
    meta = encode_metadata(metadata)
    kind = validate_metadata(meta, output_names, sample_shape=tuple(sample.shape), dynamic_hw=dynamic_hw)

    model = model.eval()
    reference = _reference_inputs(parity, dynamic_hw)
    with torch.no_grad():
        expected = {label: _torch_run(model, x) for label, x in reference.items()}
    if kind == "embedder":
        width = next(iter(expected.values()))[0].shape[1]
        if int(meta["face.embedder.embedding_size"]) != width:
            raise ExportError(
                f"face.embedder.embedding_size says {meta['face.embedder.embedding_size']} "
                f"but the model outputs {width}-d embeddings"
            )

    out_path.parent.mkdir(parents=True, exist_ok=True)
    wanted = ["fp32"] + [v for v in variants if v != "fp32"]
    reports: list[VariantReport] = []
    steps = tqdm(total=len(wanted) + 1, desc=f"export {out_path.name}", unit="step", disable=None, leave=False)
    with steps, _temp_beside(out_path) as tmp:
        steps.set_postfix_str("torch.onnx.export")
        _torch_export(model, sample, tmp, output_names, dynamic_hw)
        proto = onnx.load(str(tmp))
        # Before parity: the rewritten graph is the one judged against PyTorch, at the same tolerances.
        if rewrite:
            made = rewrite_graph(proto)
            log.info("%s: rewritten for ONNX Runtime: %s", out_path.name, ", ".join(f"{k} {v}" for k, v in made.items()))
        name = exporter_name(rewrite)
        _set_metadata(proto, {**meta, "face.exporter": name, "face.precision": "fp32"})
        _save_checked(proto, tmp)
        steps.update()

        steps.set_postfix_str("parity fp32")
        fp32 = _judge("fp32", tmp, out_path, reference, expected, kind, atol, min_cosine)
        os.replace(tmp, out_path)
        reports.append(fp32)
        steps.update()

        for precision in wanted[1:]:
            steps.set_postfix_str(f"{precision} variant")
            variant_path = out_path.with_name(f"{out_path.stem}.{precision}{out_path.suffix}")
            with _temp_beside(variant_path) as vtmp:
                _write_variant(precision, out_path, vtmp, meta, name)
                cos = VARIANT_MIN_COSINE[precision] if kind == "embedder" else None
                report = _judge(precision, vtmp, variant_path, reference, expected, kind, None, cos)
                os.replace(vtmp, variant_path)
            reports.append(report)
            steps.update()

    return ExportReport(
        path=out_path,
        max_abs_diff=fp32.max_abs_diff,
        min_cosine=fp32.min_cosine,
        size_bytes=fp32.size_bytes,
        variants=reports,
        metadata=read_metadata(out_path),
    )


# ---------------------------------------------------------------------------------------------------------------
# Metadata


def encode_metadata(metadata: Mapping[str, object]) -> dict[str, str]:
    """Contract values as strings: str stays as is, everything else is JSON (lists, numbers, null, bools)."""
    encoded = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key.startswith("face."):
            raise ExportError(f"metadata key {key!r} is not a face.* contract key")
        encoded[key] = value if isinstance(value, str) else json.dumps(value)
    return encoded


def validate_metadata(
    meta: Mapping[str, str],
    output_names: Sequence[str],
    sample_shape: tuple[int, ...] | None = None,
    dynamic_hw: bool | None = None,
) -> str:
    """Check encoded metadata against docs/model-contract.md; returns the kind. Raises ExportError."""
    kind = meta.get("face.kind")
    if kind not in KIND_KEYS:
        raise ExportError(f"face.kind must be one of {sorted(KIND_KEYS)}, got {kind!r}")
    missing = [k for k in (*COMMON_KEYS, *KIND_KEYS[kind]) if k not in meta]
    if missing:
        raise ExportError(f"metadata for a {kind} lacks required contract keys: {', '.join(missing)}")
    owned = [k for k in CORE_KEYS if k in meta]
    if owned:
        raise ExportError(f"{', '.join(owned)} are filled by the exporter; do not pass them")
    if list(output_names) != OUTPUT_NAMES[kind]:
        raise ExportError(f"a {kind} must have outputs {OUTPUT_NAMES[kind]}, got {list(output_names)}")

    problems = []
    if meta["face.layout"] != "NCHW":
        problems.append(f"face.layout must be NCHW, got {meta['face.layout']!r}")
    if meta["face.color"] not in ("RGB", "BGR"):
        problems.append(f"face.color must be RGB or BGR, got {meta['face.color']!r}")
    for key in ("face.mean", "face.std"):
        values = _json(meta, key)
        if not (isinstance(values, list) and len(values) == 3 and all(_is_number(v) for v in values)):
            problems.append(f"{key} must be a JSON list of 3 numbers, got {meta[key]!r}")
        elif key == "face.std" and any(v <= 0 for v in values):
            problems.append(f"face.std must be positive, got {meta[key]!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", meta["face.source_sha256"]):
        problems.append(f"face.source_sha256 must be 64 lowercase hex digits, got {meta['face.source_sha256']!r}")
    if not meta["face.source"].strip():
        problems.append("face.source is empty")

    input_size = _json(meta, "face.input_size")
    if dynamic_hw is True and input_size is not None:
        problems.append(f"face.input_size must be null for a dynamic height/width model, got {input_size!r}")
    if dynamic_hw is False and sample_shape is not None and input_size != list(sample_shape[2:]):
        problems.append(f"face.input_size {input_size!r} does not match the sample's [H, W] {list(sample_shape[2:])}")

    if kind == "embedder":
        template = _json(meta, "face.embedder.template")
        if not (
            isinstance(template, list)
            and len(template) == 5
            and all(isinstance(p, list) and len(p) == 2 and all(_is_number(c) for c in p) for p in template)
        ):
            problems.append(f"face.embedder.template must be a JSON 5x2 list, got {meta['face.embedder.template']!r}")
        size = _json(meta, "face.embedder.embedding_size")
        if not (isinstance(size, int) and size > 0):
            problems.append(f"face.embedder.embedding_size must be a positive integer, got {size!r}")
        if "face.embedder.far_table" in meta:
            # The full check (monotone, in range) is the service's, at load; here only the shape a reader needs.
            table = _json(meta, "face.embedder.far_table")
            if not (isinstance(table, dict) and {"thresholds", "far", "measured_to", "impostor_pairs"} <= set(table)):
                problems.append("face.embedder.far_table must be a JSON object with thresholds, far, measured_to, "
                                "impostor_pairs")
    else:
        priors = _json(meta, "face.detector.priors")
        if not (isinstance(priors, dict) and {"min_sizes", "steps", "variance"} <= set(priors)):
            problems.append("face.detector.priors must be a JSON object with min_sizes, steps, variance")
        for key in ("face.detector.score_threshold", "face.detector.nms_threshold"):
            value = _json(meta, key)
            if not (_is_number(value) and 0 <= value <= 1):
                problems.append(f"{key} must be a number in [0, 1], got {meta[key]!r}")
        max_side = _json(meta, "face.detector.max_side")
        if not (isinstance(max_side, int) and max_side > 0):
            problems.append(f"face.detector.max_side must be a positive integer, got {meta['face.detector.max_side']!r}")
    if problems:
        raise ExportError("inconsistent model metadata:\n  " + "\n  ".join(problems))
    return kind


def _json(meta: Mapping[str, str], key: str) -> object:
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, TypeError):
        raise ExportError(f"{key} is not valid JSON: {meta[key]!r}") from None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _set_metadata(proto: onnx.ModelProto, meta: Mapping[str, str]) -> None:
    del proto.metadata_props[:]
    for key in sorted(meta):
        proto.metadata_props.add(key=key, value=meta[key])


# ---------------------------------------------------------------------------------------------------------------
# Export and variants


def _torch_export(
    model: torch.nn.Module, sample: torch.Tensor, path: Path, output_names: Sequence[str], dynamic_hw: bool
) -> None:
    # The legacy TorchScript exporter (dynamo=False): our networks are plain feed-forward conv nets that trace
    # cleanly, `dynamic_axes` marks batch/height/width dynamic without torch.export's symbolic-shape constraints
    # (which reject e.g. RetinaFace's size-dependent interpolate unless every relation is declared), and it folds
    # BatchNorm into the convolutions. Its deprecation and tracer warnings are expected and silenced here.
    input_axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    dynamic_axes = {"input": input_axes, **{name: {0: "batch"} for name in output_names}}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # Strided slices (e.g. x[:, ::2]) are not folded; harmless, and not actionable by the user.
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
            torch.onnx.export(
                model,
                (sample,),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=["input"],
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc


def _save_checked(proto: onnx.ModelProto, path: Path) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the exported graph: {exc}") from exc
    onnx.save(proto, str(path))


def _write_variant(precision: str, fp32_path: Path, out: Path, meta: Mapping[str, str], exporter: str) -> None:
    if precision == "fp16":
        from onnxconverter_common import float16

        # keep_io_types: the input stays float32 (contract) and outputs come back float32; casts sit inside.
        # It warns once per weight it clamps into fp16's range (tiny values flush to +-1e-7); one summary line
        # says the same without hundreds of warnings.
        with warnings.catch_warnings(record=True) as clamped:
            warnings.simplefilter("always")
            proto = float16.convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
        if clamped:
            log.info("fp16: %d weight values clamped into the fp16 range", len(clamped))
    elif precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Dynamic quantisation: int8 weights stored in the file, activations quantised per call, so no
        # calibration set is needed. uint8 weights because ORT's CPU ConvInteger kernel takes uint8 x uint8.
        with _quiet_quantizer():
            quantize_dynamic(str(fp32_path), str(out), weight_type=QuantType.QUInt8)
        proto = onnx.load(str(out))
    else:  # pragma: no cover - guarded by PRECISIONS
        raise ExportError(f"no writer for precision {precision!r}")
    _set_metadata(proto, {**meta, "face.exporter": exporter, "face.precision": precision})
    _save_checked(proto, out)


# ---------------------------------------------------------------------------------------------------------------
# Parity


def _as_input(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ExportError(f"{name} must be a 4-d NCHW tensor, got {getattr(x, 'shape', type(x))}")
    return x.detach().to(torch.float32).contiguous()


def _reference_inputs(parity: torch.Tensor, dynamic_hw: bool) -> dict[str, torch.Tensor]:
    """Batch 1 and the full batch; for dynamic height/width also the full batch at a second size."""
    n, _, h, w = parity.shape
    inputs = {"batch 1": parity[:1]}
    if n > 1:
        inputs[f"batch {n}"] = parity
    if dynamic_hw:
        # A different size and aspect ratio, multiples of 32 so every stride of a detector divides it.
        h2 = max(32, round(h * 0.75 / 32) * 32)
        w2 = max(32, round(w * 1.25 / 32) * 32)
        if (h2, w2) == (h, w):
            h2 += 32
        resized = torch.nn.functional.interpolate(parity, size=(h2, w2), mode="bilinear", align_corners=False)
        inputs[f"batch {n} at {h2}x{w2}"] = resized.contiguous()
    return inputs


def _torch_run(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    out = model(x)
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o.detach().cpu().numpy().astype(np.float32) for o in outs]


def _ort_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ort_run(session: ort.InferenceSession, x: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(o, dtype=np.float32) for o in session.run(None, {"input": x})]


def _judge(
    precision: str,
    path: Path,
    final_path: Path,
    reference: Mapping[str, torch.Tensor],
    expected: Mapping[str, list[np.ndarray]],
    kind: str,
    atol: float | None,
    min_cosine: float | None,
) -> VariantReport:
    """Run ORT on `path` against the PyTorch outputs; raise ExportError when beyond the tolerances given."""
    session = _ort_session(path)
    checks = []
    failures = []
    for label, x in reference.items():
        got = _ort_run(session, x.numpy())
        want = expected[label]
        if len(got) != len(want):
            raise ExportError(f"{precision}: ORT returned {len(got)} outputs, PyTorch {len(want)}")
        for g, e in zip(got, want):
            if g.shape != e.shape:
                raise ExportError(f"{precision} {label}: ORT output shape {g.shape} != PyTorch {e.shape}")
        finite = all(np.isfinite(g).all() for g in got)
        diff = max(float(np.max(np.abs(g - e))) for g, e in zip(got, want)) if finite else math.inf
        cos = _min_row_cosine(got[0], want[0]) if kind == "embedder" else None
        checks.append(ParityCheck(label, tuple(x.shape), diff, cos))
        cos_text = "" if cos is None else f", min cosine {cos:.7f}"
        log.info("parity %s %s %s: max|diff| %.3g%s", final_path.name, precision, label, diff, cos_text)
        if not finite:
            failures.append(f"{label}: ORT produced non-finite outputs")
        if atol is not None and not diff <= atol:
            failures.append(f"{label}: max|diff| {diff:.3g} > atol {atol:g}")
        if min_cosine is not None and cos is not None and not cos >= min_cosine:
            failures.append(f"{label}: min cosine {cos:.7f} < {min_cosine}")
        if kind == "detector" and precision != "fp32" and finite:
            conf_diff = float(np.max(np.abs(got[1] - want[1])))
            if conf_diff > DETECTOR_VARIANT_MAX_CONF_DIFF:
                failures.append(f"{label}: face probabilities moved by {conf_diff:.3g}")
    del session
    if failures:
        raise ExportError(f"{final_path.name} ({precision}) fails parity with PyTorch:\n  " + "\n  ".join(failures))
    cosines = [c.min_cosine for c in checks if c.min_cosine is not None]
    return VariantReport(
        precision=precision,
        path=final_path,
        max_abs_diff=max(c.max_abs_diff for c in checks),
        min_cosine=min(cosines) if cosines else None,
        size_bytes=path.stat().st_size,
        checks=tuple(checks),
    )


def _min_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(num / np.maximum(den, 1e-30)))


@contextlib.contextmanager
def _temp_beside(final: Path) -> Iterator[Path]:
    """A temporary path in the destination folder (so the final rename is atomic); removed unless renamed."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    # mkstemp creates 0600; a model file should be as readable as any other file the user writes (the service
    # may run as another user, e.g. in a container).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _not_from_quantizer(record: logging.LogRecord) -> bool:
    return "/onnxruntime/quantization/" not in record.pathname.replace(os.sep, "/")


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime.quantization logs advice and per-tensor notes through the root logger (and the module-level
    `logging.warning` would install a root handler via basicConfig if none exists); neither is ours to show."""
    placeholder = logging.NullHandler()
    logging.root.addHandler(placeholder)
    logging.root.addFilter(_not_from_quantizer)
    try:
        yield
    finally:
        logging.root.removeFilter(_not_from_quantizer)
        logging.root.removeHandler(placeholder)


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover
