"""Foreign SE-ResNet-IR checkpoints onto our `SEResNetIR`, key by key, loaded strictly.

Layouts:
- `ours`: a state_dict of `models.se_resnet_ir.SEResNetIR` itself (`stem.*`, `stages.S.U.*`, `head.*`).
- `insightface`: TreB1eN/InsightFace_Pytorch `Backbone(depth, drop, 'ir' | 'ir_se')` (`input_layer.*`,
  `body.N.res_layer.*`, `body.N.shortcut_layer.*`, `output_layer.*`), e.g. its `model_ir_se50.pth`.
- `resnetface`: ronghuaiyang/arcface-pytorch `ResNetFace` (the seed note's code: `conv1`, `bn1`, `prelu`,
  `layerL.U.*`, `bn4`, `fc5`, `bn5`), e.g. `resnet18_110.pth`.

Each mapping is a pure renaming (plus the Linear -> 1x1 conv reshape of ResNetFace's SE weights, which is
exact), built from our module's own key list, so a foreign key that is not consumed or one of ours that is not
produced surfaces as an "unexpected"/"missing" key in `CheckpointError` instead of a silently random layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from models.checkpoint import CheckpointError, load_strict, read_state_dict
from models.se_resnet_ir import INSIGHTFACE_PYTORCH, RESNETFACE, UNITS, IRConfig, SEResNetIR

LAYOUTS = ("ours", "insightface", "resnetface")

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Tell the layout from the key names; CheckpointError when none fits."""
    keys = set(state_dict)
    if any(k.startswith("stem.") for k in keys) and any(k.startswith("stages.") for k in keys):
        return "ours"
    if any(k.startswith("input_layer.") for k in keys) and any(k.startswith("body.") for k in keys):
        return "insightface"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys) and "fc5.weight" in keys:
        return "resnetface"
    sample = ", ".join(sorted(keys)[:6])
    raise CheckpointError(f"not an SE-ResNet-IR checkpoint in any known layout {LAYOUTS} (keys: {sample}, ...)")


def infer_config(state_dict: Mapping[str, torch.Tensor], layout: str) -> IRConfig:
    """The architecture a checkpoint was saved from: depth (units per stage), SE on/off, input and widths."""
    if layout == "ours":
        units = _count_units(state_dict, r"stages\.(\d)\.(\d+)\.")
        use_se = any(".se." in k for k in state_dict)
        base = IRConfig(
            mid_bn=any(re.match(r"stages\.\d\.\d+\.bn2\.", k) for k in state_dict),
            # Without SE blocks there is nothing to tell their form by: keep the defaults.
            se_bias=any(k.endswith("se.fc1.bias") for k in state_dict) or not use_se,
            se_act="prelu" if any(k.endswith("se.act.weight") for k in state_dict) or not use_se else "relu",
            variant="resnetface" if "stem.prelu.weight" in state_dict
            and state_dict["stem.prelu.weight"].numel() == 1 else "ir",
        )
        in_channels = _shape(state_dict, "stem.conv.weight")[1]
        fc_in, embedding = _shape(state_dict, "head.fc.weight")[1], _shape(state_dict, "head.fc.weight")[0]
    elif layout == "insightface":
        units = _insightface_units(state_dict)
        use_se = any(".res_layer.5." in k for k in state_dict)
        base = INSIGHTFACE_PYTORCH
        in_channels = _shape(state_dict, "input_layer.0.weight")[1]
        fc_in, embedding = _shape(state_dict, "output_layer.3.weight")[1], _shape(state_dict, "output_layer.3.weight")[0]
    elif layout == "resnetface":
        units = _count_units(state_dict, r"layer([1-4])\.(\d+)\.", first=1)
        use_se = any(".se." in k for k in state_dict)
        base = RESNETFACE
        in_channels = _shape(state_dict, "conv1.weight")[1]
        fc_in, embedding = _shape(state_dict, "fc5.weight")[1], _shape(state_dict, "fc5.weight")[0]
    else:
        raise CheckpointError(f"unknown layout {layout!r}; choose from {LAYOUTS}")

    depth = next((d for d, u in UNITS.items() if u == units), None)
    if depth is None:
        raise CheckpointError(f"{layout} checkpoint has {units} units per stage, which is no depth in {dict(UNITS)}")
    side = round((fc_in / 512) ** 0.5)
    if side * side * 512 != fc_in:
        raise CheckpointError(f"{layout} checkpoint: FC input {fc_in} is not 512 x a square feature map")
    return IRConfig(
        depth=depth,
        use_se=use_se,
        in_channels=in_channels,
        input_size=(side * 16, side * 16),
        embedding_size=embedding,
        variant=base.variant,
        mid_bn=base.mid_bn,
        se_bias=base.se_bias,
        se_act=base.se_act,
    )


def to_ours(state_dict: Mapping[str, torch.Tensor], layout: str, model: SEResNetIR) -> dict[str, torch.Tensor]:
    """Rename a foreign state_dict into `model`'s keys. Keys that have no counterpart are kept under their own
    name, so `load_strict` reports them as unexpected (and ours that were not produced as missing)."""
    if layout == "ours":
        return dict(state_dict)
    source_of: Callable[[str, tuple[int, ...]], str] = {
        "insightface": _insightface_key,
        "resnetface": _resnetface_key,
    }[layout]
    units = UNITS[model.cfg.depth]
    mapped: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for ours in model.state_dict():
        theirs = source_of(ours, units)
        if theirs not in state_dict:
            continue
        tensor = state_dict[theirs]
        if layout == "resnetface" and re.search(r"\.se\.fc[12]\.weight$", ours) and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # nn.Linear [out, in] -> 1x1 conv [out, in, 1, 1]
        mapped[ours] = tensor
        consumed.add(theirs)
    mapped.update({k: v for k, v in state_dict.items() if k not in consumed})
    return mapped


def load_se_resnet_ir(
    path: str | Path,
    layout: str | None = None,
    depth: int | None = None,
    use_se: bool | None = None,
    key: str | None = None,
) -> SEResNetIR:
    """Read a checkpoint, map it onto `SEResNetIR` and load it strictly; eval mode.

    layout/depth/use_se default to what the checkpoint itself shows; when given they must agree with it, else
    CheckpointError names the missing and unexpected keys.
    """
    state_dict = read_state_dict(path, key=key)
    return from_state_dict(state_dict, layout, depth, use_se, source=str(path))


def from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    layout: str | None = None,
    depth: int | None = None,
    use_se: bool | None = None,
    source: str = "state_dict",
) -> SEResNetIR:
    layout = layout or detect_layout(state_dict)
    cfg = infer_config(state_dict, layout)
    overrides = {k: v for k, v in (("depth", depth), ("use_se", use_se)) if v is not None}
    model = SEResNetIR(cfg, **overrides)
    load_strict(model, to_ours(state_dict, layout, model), source=f"{source} ({layout} layout)")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Reading the architecture off the keys


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointError(f"checkpoint lacks {key!r}, which its layout always has")
    return tuple(state_dict[key].shape)


def _count_units(state_dict: Mapping[str, torch.Tensor], pattern: str, first: int = 0) -> tuple[int, ...]:
    """Units per stage from keys like `stages.S.U.` (or `layerS.U.`, stages numbered from `first`)."""
    last: dict[int, int] = {}
    for k in state_dict:
        m = re.match(pattern, k)
        if m:
            stage, unit = int(m[1]) - first, int(m[2])
            last[stage] = max(last.get(stage, -1), unit)
    return tuple(last.get(s, -1) + 1 for s in range(4))


def _insightface_units(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """TreB1eN's body is flat: a unit's stage is its output width (64, 128, 256, 512)."""
    widths = {}
    for k, v in state_dict.items():
        m = re.match(r"body\.(\d+)\.res_layer\.1\.weight$", k)
        if m:
            widths[int(m[1])] = v.shape[0]
    ordered = [widths[i] for i in sorted(widths)]
    return tuple(ordered.count(w) for w in (64, 128, 256, 512))


# ---------------------------------------------------------------------------------------------------------------
# Key maps: ours -> theirs


def _stage_unit(ours: str) -> tuple[int, int, str] | None:
    m = re.match(r"stages\.(\d)\.(\d+)\.(.+)$", ours)
    return (int(m[1]), int(m[2]), m[3]) if m else None


# Within one IR unit (stages.S.U.<rest>): our module names -> theirs. TreB1eN's res_layer is
# Sequential(BN, Conv, PReLU, Conv, BN[, SEModule(fc1, fc2)]); ronghuaiyang's IRBlock names its own (bn0, conv1, bn1,
# prelu, conv2, bn2, se.fc = Sequential(Linear, PReLU, Linear, Sigmoid), downsample = Sequential(Conv, BN)).
_INSIGHTFACE_UNIT = {
    "bn1.": "res_layer.0.", "conv1.": "res_layer.1.", "prelu.": "res_layer.2.", "conv2.": "res_layer.3.",
    "bn3.": "res_layer.4.", "se.fc1.": "res_layer.5.fc1.", "se.fc2.": "res_layer.5.fc2.",
    "shortcut.0.": "shortcut_layer.0.", "shortcut.1.": "shortcut_layer.1.",
}  # fmt: skip
_RESNETFACE_UNIT = {
    "bn1.": "bn0.", "conv1.": "conv1.", "bn2.": "bn1.", "prelu.": "prelu.", "conv2.": "conv2.", "bn3.": "bn2.",
    "se.fc1.": "se.fc.0.", "se.act.": "se.fc.1.", "se.fc2.": "se.fc.2.",
    "shortcut.0.": "downsample.0.", "shortcut.1.": "downsample.1.",
}  # fmt: skip


def _renamed(ours: str, prefixes: tuple[tuple[str, str], ...], unit_names: dict[str, str], unit_prefix) -> str:
    """ours with its first matching prefix replaced; for a unit's key, `unit_prefix(stage, unit)` + the unit
    module's name in `unit_names`; unchanged when nothing matches."""
    for prefix, theirs in prefixes:
        if ours.startswith(prefix):
            return theirs + ours[len(prefix):]
    parsed = _stage_unit(ours)
    if parsed is not None:
        stage, unit, rest = parsed
        for mine, theirs in unit_names.items():
            if rest.startswith(mine):
                return f"{unit_prefix(stage, unit)}{theirs}{rest[len(mine):]}"
    return ours


def _insightface_key(ours: str, units: tuple[int, ...]) -> str:
    """TreB1eN: input_layer (Conv, BN, PReLU), body flat over all stages, output_layer (BN, Dropout, Flatten, FC, BN)."""
    fixed = {
        "stem.conv.weight": "input_layer.0.weight",
        "stem.prelu.weight": "input_layer.2.weight",
        "head.fc.weight": "output_layer.3.weight",
        "head.fc.bias": "output_layer.3.bias",
    }
    if ours in fixed:
        return fixed[ours]
    prefixes = (("stem.bn.", "input_layer.1."), ("head.bn.", "output_layer.0."), ("head.features.", "output_layer.4."))
    # TreB1eN's body is one flat Sequential over all stages.
    return _renamed(ours, prefixes, _INSIGHTFACE_UNIT, lambda stage, unit: f"body.{sum(units[:stage]) + unit}.")


def _resnetface_key(ours: str, units: tuple[int, ...]) -> str:
    """ronghuaiyang ResNetFace: conv1/bn1/prelu stem, layer1-4 of IRBlock, bn4, fc5, bn5."""
    prefixes = (("stem.conv.", "conv1."), ("stem.bn.", "bn1."), ("stem.prelu.", "prelu."),
                ("head.bn.", "bn4."), ("head.fc.", "fc5."), ("head.features.", "bn5."))  # fmt: skip
    return _renamed(ours, prefixes, _RESNETFACE_UNIT, lambda stage, unit: f"layer{stage + 1}.{unit}.")
