"""SE-LResNetXE-IR, the ArcFace embedding network (Deng et al., "ArcFace", 2018, section 3 / figure 4).

The name reads: SE = squeeze-and-excitation blocks; L = a 3x3 stride-1 stem instead of ResNet's 7x7 stride-2 conv
+ max-pool, to keep feature maps large for 112x112 faces; X = depth; E = output option E (BN-Dropout-FC-BN);
IR = the "improved residual" unit BN-Conv3x3-BN-PReLU-Conv3x3(stride)-BN, which downsamples in its second conv.

Shapes for the ArcFace setting (112x112 RGB in, 512-d out), stage by stage:

    input                  [N, 3, 112, 112]
    stem   conv3x3-BN-PReLU [N, 64, 112, 112]
    stage1 (64,  stride 2)  [N, 64, 56, 56]
    stage2 (128, stride 2)  [N, 128, 28, 28]
    stage3 (256, stride 2)  [N, 256, 14, 14]
    stage4 (512, stride 2)  [N, 512, 7, 7]
    head   BN-Dropout-Flatten-FC-BN  [N, 512]   (not normalised; the service L2-normalises)

Two published relatives load into the same classes through `IRConfig` switches (models/adapters.py maps their
key names):
- TreB1eN/InsightFace_Pytorch `Backbone(50, 0.6, 'ir_se')`: its unit has no BN between the first conv and the
  PReLU (`mid_bn=False`) and its SE block uses bias-free 1x1 convs with ReLU (`se_bias=False, se_act="relu"`).
- ronghuaiyang/arcface-pytorch `ResNetFace` (`variant="resnetface"`): 1-channel 128x128 input, a 2x2 max-pool
  after the stem with stage 1 at stride 1 (so still 16x downsampling: 128 -> 8, hence its 8x8x512 FC), a unit
  whose first conv keeps the input width and whose single scalar PReLU is applied again after the residual sum,
  an identity/1x1-conv shortcut, and SE blocks of Linear-PReLU-Linear-Sigmoid with scalar PReLUs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

# Units per stage, as in ArcFace/InsightFace (and ResNet for 18/34).
UNITS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
}
WIDTHS = (64, 128, 256, 512)


@dataclass(frozen=True)
class IRConfig:
    depth: int = 50
    use_se: bool = True
    in_channels: int = 3
    input_size: tuple[int, int] = (112, 112)  # (height, width); fixes the head's FC input
    embedding_size: int = 512
    dropout: float = 0.4  # ArcFace's rate; inactive in eval mode, so irrelevant to exported graphs
    se_reduction: int = 16
    # Variations of published implementations (see module docstring); defaults follow the paper.
    variant: Literal["ir", "resnetface"] = "ir"
    mid_bn: bool = True
    se_bias: bool = True
    se_act: Literal["prelu", "relu"] = "prelu"

    def __post_init__(self) -> None:
        if self.depth not in UNITS:
            raise ValueError(f"depth must be one of {sorted(UNITS)}, got {self.depth}")
        if self.variant not in ("ir", "resnetface"):
            raise ValueError(f"variant must be 'ir' or 'resnetface', got {self.variant!r}")
        h, w = self.input_size
        if h % 16 or w % 16:
            raise ValueError(f"input_size {self.input_size} must be a multiple of 16 (four 2x downsamplings)")

    @property
    def feature_size(self) -> tuple[int, int]:
        """Spatial size of the last stage's output: the input downsampled 16x."""
        return self.input_size[0] // 16, self.input_size[1] // 16


# The seed's ResNetFace-18 as ronghuaiyang/arcface-pytorch trains it: grayscale 128x128.
RESNETFACE = IRConfig(depth=18, in_channels=1, input_size=(128, 128), variant="resnetface", se_act="prelu")
# TreB1eN/InsightFace_Pytorch's IR-SE (its `ir` mode is the same with use_se=False).
INSIGHTFACE_PYTORCH = IRConfig(depth=50, mid_bn=False, se_bias=False, se_act="relu")


def _prelu(channels: int, shared: bool) -> nn.PReLU:
    """A PReLU with one slope per channel, or one slope for all (the ResNetFace variant's nn.PReLU())."""
    return nn.PReLU(1 if shared else channels)


class SEBlock(nn.Module):
    """Squeeze-and-excitation: reweigh channels by a gate computed from their global average.

    [N, C, H, W] -> pool [N, C, 1, 1] -> 1x1 conv C/r -> act -> 1x1 conv C -> sigmoid -> x * gate.
    """

    def __init__(self, channels: int, reduction: int, bias: bool, act: str, shared_prelu: bool) -> None:
        super().__init__()
        hidden = channels // reduction
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.act = _prelu(hidden, shared_prelu) if act == "prelu" else nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.fc2(self.act(self.fc1(gate))))
        return x * gate


class IRBlock(nn.Module):
    """Improved residual unit: BN-Conv3x3-BN-PReLU-Conv3x3(stride)-BN [-SE] + shortcut.

    [N, C_in, H, W] -> [N, C_out, H / stride, W / stride]. The shortcut is identity (a 1x1 max-pool of that
    stride when it must subsample, as InsightFace writes it) when widths match, else 1x1 conv (stride) + BN.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, cfg: IRConfig) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch) if cfg.mid_bn else nn.Identity()
        self.prelu = _prelu(out_ch, shared=False)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.se = SEBlock(out_ch, cfg.se_reduction, cfg.se_bias, cfg.se_act, False) if cfg.use_se else nn.Identity()
        if in_ch == out_ch:
            self.shortcut = nn.MaxPool2d(1, stride) if stride > 1 else nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.prelu(self.bn2(self.conv1(self.bn1(x))))
        out = self.se(self.bn3(self.conv2(out)))
        return out + self.shortcut(x)


class ResNetFaceBlock(nn.Module):
    """The seed's ResNetFace unit: BN-Conv3x3(keeps C_in)-BN-PReLU-Conv3x3(stride, to C_out)-BN [-SE],
    + shortcut, then the same scalar PReLU again. [N, C_in, H, W] -> [N, C_out, H / stride, W / stride].
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, cfg: IRConfig) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, in_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(in_ch)
        self.prelu = _prelu(in_ch, shared=True)  # one slope, used twice
        self.conv2 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.se = SEBlock(out_ch, cfg.se_reduction, cfg.se_bias, cfg.se_act, True) if cfg.use_se else nn.Identity()
        if stride == 1 and in_ch == out_ch:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.prelu(self.bn2(self.conv1(self.bn1(x))))
        out = self.se(self.bn3(self.conv2(out)))
        return self.prelu(out + self.shortcut(x))


class Stem(nn.Module):
    """conv3x3 stride 1 -> BN -> PReLU: [N, C_in, H, W] -> [N, 64, H, W] (ResNetFace: then max-pool 2 -> H/2)."""

    def __init__(self, cfg: IRConfig) -> None:
        super().__init__()
        resnetface = cfg.variant == "resnetface"
        self.conv = nn.Conv2d(cfg.in_channels, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(WIDTHS[0])
        self.prelu = _prelu(WIDTHS[0], shared=resnetface)
        self.pool = nn.MaxPool2d(2, 2) if resnetface else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.prelu(self.bn(self.conv(x))))


class OutputE(nn.Module):
    """Output option E: BN -> Dropout -> Flatten -> FC -> BN. [N, 512, h, w] -> [N, embedding_size]."""

    def __init__(self, cfg: IRConfig) -> None:
        super().__init__()
        h, w = cfg.feature_size
        self.bn = nn.BatchNorm2d(WIDTHS[-1])
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(WIDTHS[-1] * h * w, cfg.embedding_size)
        self.features = nn.BatchNorm1d(cfg.embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(self.dropout(self.bn(x)).flatten(1)))


class SEResNetIR(nn.Module):
    """SE-LResNet{depth}E-IR: [N, in_channels, H, W] float32 (normalised pixels) -> [N, embedding_size]."""

    def __init__(self, cfg: IRConfig | None = None, **overrides: object) -> None:
        super().__init__()
        cfg = replace(cfg or IRConfig(), **overrides)
        self.cfg = cfg
        block = ResNetFaceBlock if cfg.variant == "resnetface" else IRBlock
        # ResNetFace downsamples in the stem's max-pool instead of stage 1.
        first_stride = 1 if cfg.variant == "resnetface" else 2
        self.stem = Stem(cfg)
        stages = []
        in_ch = WIDTHS[0]
        for i, (units, width) in enumerate(zip(UNITS[cfg.depth], WIDTHS)):
            stride = first_stride if i == 0 else 2
            layers = [block(in_ch, width, stride, cfg)] + [block(width, width, 1, cfg) for _ in range(units - 1)]
            stages.append(nn.Sequential(*layers))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.head = OutputE(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class GrayscaleInput(nn.Module):
    """Lets a 1-channel network honour the contract's 3-channel input: RGB -> ITU-R BT.601 luma -> network.

    The weights sum to 1, so luma of per-channel `(x - m) / s` equals `(luma(x) - m) / s` when all three channels
    share m and s: the file keeps an RGB mean/std and the network sees exactly what it was trained on
    (OpenCV's grayscale conversion uses the same weights). [N, 3, H, W] -> net([N, 1, H, W]).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x * self.luma).sum(dim=1, keepdim=True))


def randomise_batchnorm(model: nn.Module, seed: int = 0, calibration: torch.Tensor | None = None) -> nn.Module:
    """Make an untrained net's BatchNorms non-trivial (for export checks and demos); returns it in eval mode.

    A freshly initialised BN in eval mode is the identity (mean 0, var 1, weight 1, bias 0), and random running
    statistics leave a deep net's output dominated by constant shifts (embeddings of different photos at cosine
    ~0.999). So: random affine terms, and running statistics measured on `calibration` inputs [N, C, H, W] when
    given (one train-mode pass with a cumulative average), else random ones. Calibrated, different photos get
    clearly different embeddings, and a parity check on them exercises the whole graph.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in norms:
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(n, generator=gen) * 0.05)
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
        if calibration is not None:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration pass
            model.train()
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.eval()
            model(calibration)
            for m in norms:
                m.momentum = 0.1
    return model.eval()
