"""`python -m export arcface`: SE-ResNet-IR (ArcFace SE-LResNetXE-IR) checkpoints to embedder ONNX files.

    python -m export arcface model_ir_se50.pth                        # layout and depth read off the keys
    python -m export arcface resnet18_110.pth --layout resnetface --fp16 --int8
    python -m export arcface --random-init 0 --depth 100 --out artifacts/models/se_resnet_ir_100_random.onnx

Checkpoint layouts (models/adapters.py): `ours`, `insightface` (TreB1eN/InsightFace_Pytorch `Backbone(...,
'ir_se')` / `'ir'`) and `resnetface` (ronghuaiyang/arcface-pytorch `ResNetFace`, 1-channel 128x128).

Preprocessing written into the file is the InsightFace convention these networks are trained with: an RGB crop
aligned to the five-point ArcFace template, pixels scaled as (x - 127.5) / 127.5, i.e. mean 127.5 and std 127.5
per channel (TreB1eN's `(x / 255 - 0.5) / 0.5` is the same). ResNetFace was trained on grayscale crops: its
graph starts with an RGB -> luma layer (models.se_resnet_ir.GrayscaleInput), so the file still takes RGB.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export.paths import DEFAULT_MODELS_DIR as DEFAULT_OUT_DIR
from export.paths import shared_data_dir
from export.templates import template_for

log = logging.getLogger(__name__)

# InsightFace convention: RGB, (x - 127.5) / 127.5 maps pixels 0..255 to -1..1.
MEAN = [127.5, 127.5, 127.5]
STD = [127.5, 127.5, 127.5]

ATOL = 1e-4  # fp32 max |torch - ORT| on embeddings (measured ~1e-6..1e-5 on these nets)
MIN_COSINE = 0.99999  # fp32 per-row cosine torch vs ORT


def arch_name(cfg) -> str:  # cfg: models.se_resnet_ir.IRConfig
    family = "resnetface" if cfg.variant == "resnetface" else "resnet-ir"
    return f"{'se-' if cfg.use_se else ''}{family}-{cfg.depth}"


def embedder_metadata(cfg, source: str, source_sha256: str) -> dict[str, object]:
    """Contract metadata (docs/model-contract.md) for an SE-ResNet-IR embedder of config `cfg`."""
    return {
        "face.kind": "embedder",
        "face.arch": arch_name(cfg),
        "face.layout": "NCHW",
        "face.color": "RGB",
        "face.mean": MEAN,
        "face.std": STD,
        "face.input_size": list(cfg.input_size),
        "face.source": source,
        "face.source_sha256": source_sha256,
        "face.embedder.template": template_for(cfg.input_size),
        "face.embedder.embedding_size": cfg.embedding_size,
    }


def parity_inputs(input_size: tuple[int, int], n: int = 4, faces_dir: Path | None = None):
    """Real photos as network inputs [n, 3, H, W], RGB, (x - 127.5) / 127.5.

    Centre square crop resized to the input size: real image statistics, not aligned faces (parity needs real
    pixel distributions, not alignment). Falls back to seeded noise, with a warning, when no photos are at hand.
    """
    import torch

    from export.core import portrait_crops

    faces_dir = Path(faces_dir) if faces_dir is not None else shared_data_dir() / "faces" / "pairs"
    h, w = input_size
    crops = portrait_crops(faces_dir, (h, w), n, "RGB")
    if len(crops) < 2:
        log.warning("no photos in %s: parity runs on seeded noise instead of real images", faces_dir)
        rng = np.random.default_rng(0)
        crops = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]
    batch = (np.stack(crops).astype(np.float32) - np.float32(127.5)) / np.float32(127.5)
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))


def export_model(
    model,  # models.se_resnet_ir.SEResNetIR
    out_path: Path,
    source: str,
    source_sha256: str,
    variants: Sequence[str] = ("fp32",),
    inputs=None,  # torch.Tensor [N, 3, H, W]; default: parity_inputs(...)
):
    """Export an SE-ResNet-IR (eval mode) as a contract embedder; returns export.core.ExportReport."""
    from export.core import export_onnx
    from models.se_resnet_ir import GrayscaleInput

    cfg = model.cfg
    net = GrayscaleInput(model) if cfg.in_channels == 1 else model
    if cfg.in_channels not in (1, 3):
        raise ValueError(f"cannot feed a {cfg.in_channels}-channel network from an RGB crop")
    inputs = parity_inputs(cfg.input_size) if inputs is None else inputs
    return export_onnx(
        net.eval(),
        inputs[:1],
        Path(out_path),
        embedder_metadata(cfg, source, source_sha256),
        output_names=["embedding"],
        parity_inputs=inputs,
        atol=ATOL,
        min_cosine=MIN_COSINE,
        variants=variants,
    )


def state_dict_sha256(model) -> str:
    """sha256 over a module's state_dict (names, shapes, bytes): the provenance of weights made in memory."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- CLI ----------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Export an SE-ResNet-IR (ArcFace SE-LResNetXE-IR) checkpoint to a contract embedder ONNX file, "
        "with ONNX Runtime vs PyTorch parity on real photos."
    )
    parser.add_argument("checkpoint", type=Path, nargs="?", help="state_dict file (.pth/.pt/.ckpt)")
    parser.add_argument(
        "--layout", choices=("auto", "ours", "insightface", "resnetface"), default="auto",
        help="key layout of the checkpoint (default: read off its keys)",
    )  # fmt: skip
    parser.add_argument("--depth", type=int, choices=(18, 34, 50, 100), help="network depth (default: from keys)")
    parser.add_argument("--no-se", action="store_true", help="the network has no squeeze-and-excitation blocks")
    parser.add_argument("--key", help="the state_dict sits under this key of the checkpoint dict")
    parser.add_argument("--out", type=Path, help="ONNX file to write (default: artifacts/models/ARCH.onnx)")
    parser.add_argument("--fp16", action="store_true", help="also write NAME.fp16.onnx")
    parser.add_argument("--int8", action="store_true", help="also write NAME.int8.onnx (dynamic quantisation)")
    parser.add_argument("--faces", type=Path, help="folder of photos for parity (default: ../shared/data/faces/pairs)")
    parser.add_argument(
        "--random-init", type=int, metavar="SEED",
        help="no checkpoint: export a randomly initialised network (for benchmarks and export checks only)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from export.core import ExportError, sha256_file
    from models.adapters import load_se_resnet_ir
    from models.checkpoint import CheckpointError
    from models.se_resnet_ir import SEResNetIR, randomise_batchnorm

    if (args.checkpoint is None) == (args.random_init is None):
        print("error: give a checkpoint file, or --random-init SEED (not both)", file=sys.stderr)
        return 2
    variants = ("fp32",) + (("fp16",) if args.fp16 else ()) + (("int8",) if args.int8 else ())
    try:
        if args.random_init is not None:
            import torch

            torch.manual_seed(args.random_init)
            model = SEResNetIR(depth=args.depth or 50, use_se=not args.no_se)
            photos = parity_inputs(model.cfg.input_size, n=8, faces_dir=args.faces)
            model = randomise_batchnorm(model, args.random_init, torch.cat([photos, photos.flip(3)]))
            source, sha = f"random-init:seed={args.random_init}", state_dict_sha256(model)
        else:
            layout = None if args.layout == "auto" else args.layout
            use_se = False if args.no_se else None
            model = load_se_resnet_ir(args.checkpoint, layout, args.depth, use_se, key=args.key)
            source, sha = args.checkpoint.name, sha256_file(args.checkpoint)
        out = args.out or DEFAULT_OUT_DIR / f"{arch_name(model.cfg)}.onnx"
        inputs = parity_inputs(model.cfg.input_size, faces_dir=args.faces)
        report = export_model(model, out, source, sha, variants, inputs)
    except (CheckpointError, ExportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.table())
    return 0
