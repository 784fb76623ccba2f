"""SE-ResNet-IR: ONNX parity for depths 18/50/100 with SE on and off, adapters that reproduce foreign layouts
exactly, and checkpoints that do not fit failing with the keys named.

No trained SE-ResNet-IR weights exist here, so the networks are randomly initialised with randomised BatchNorm
statistics (an untouched eval-mode BN is the identity, which makes deep nets degenerate); parity inputs are real
photos from ../shared/data/faces/pairs when present.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export import arcface
from export.core import read_metadata
from export.templates import ARCFACE_TEMPLATE_112
from models.adapters import from_state_dict, load_se_resnet_ir
from models.checkpoint import CheckpointError
from models.se_resnet_ir import UNITS, SEResNetIR, randomise_batchnorm


@pytest.fixture(scope="module")
def faces_112() -> torch.Tensor:
    """Two real photos as 112x112 network inputs (seeded noise if ../shared is absent)."""
    return arcface.parity_inputs((112, 112), n=2)


@pytest.fixture(scope="module")
def calibration_112() -> torch.Tensor:
    """Four real photos and their mirror images, to measure BatchNorm statistics of untrained nets on."""
    x = arcface.parity_inputs((112, 112), n=4)
    return torch.cat([x, x.flip(3)])


def _random_prelu(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5)
    return model


# --- the network ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", sorted(UNITS))
def test_units_and_shapes(depth: int) -> None:
    model = SEResNetIR(depth=depth).eval()
    assert [len(stage) for stage in model.stages] == list(UNITS[depth])
    assert model.head.fc.in_features == 512 * 7 * 7
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 112, 112)).shape == (1, 512)


def test_random_net_is_not_degenerate(faces_112: torch.Tensor, calibration_112: torch.Tensor, figures) -> None:
    """Different photos give clearly different embeddings, so parity on them means something."""
    torch.manual_seed(0)
    model = randomise_batchnorm(SEResNetIR(depth=18), calibration=calibration_112)
    with torch.no_grad():
        a, b = model(faces_112)
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    figures(f"random SE-ResNet-IR-18: cosine between two different photos {cosine:.4f}, |emb| {a.norm():.2f}")
    assert torch.isfinite(a).all() and a.norm() > 1 and cosine < 0.9


# --- export parity ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "use_se"),
    [(18, True), (18, False), (50, True), (50, False), (100, True), (100, False)],
    ids=["18-se", "18-no-se", "50-se", "50-no-se", "100-se", "100-no-se"],
)
def test_export_parity(
    depth: int, use_se: bool, faces_112: torch.Tensor, calibration_112: torch.Tensor, tmp_path: Path, figures
) -> None:
    torch.manual_seed(depth)
    model = randomise_batchnorm(_random_prelu(SEResNetIR(depth=depth, use_se=use_se)), depth, calibration_112)
    out = tmp_path / "net.onnx"
    sha = arcface.state_dict_sha256(model)

    report = arcface.export_model(model, out, "random-init", sha, inputs=faces_112)

    figures(f"{arcface.arch_name(model.cfg)}: max|diff| {report.max_abs_diff:.3g}, "
          f"min cosine {report.min_cosine:.8f}, {report.size_bytes / 2**20:.1f} MiB")
    assert report.max_abs_diff <= arcface.ATOL and report.min_cosine >= arcface.MIN_COSINE
    assert [c.label for c in report.variants[0].checks] == ["batch 1", "batch 2"]
    meta = read_metadata(out)
    assert meta["face.arch"] == f"{'se-' if use_se else ''}resnet-ir-{depth}"
    assert meta["face.kind"] == "embedder" and meta["face.color"] == "RGB"
    assert json.loads(meta["face.mean"]) == [127.5] * 3 and json.loads(meta["face.std"]) == [127.5] * 3
    assert json.loads(meta["face.input_size"]) == [112, 112]
    assert json.loads(meta["face.embedder.template"]) == ARCFACE_TEMPLATE_112
    assert meta["face.embedder.embedding_size"] == "512" and meta["face.source_sha256"] == sha

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # dynamic batch
    x = faces_112[[1, 0, 1]]  # a batch size the export did not see
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], want, atol=arcface.ATOL)


def test_reduced_precision_variants(
    faces_112: torch.Tensor, calibration_112: torch.Tensor, tmp_path: Path, figures
) -> None:
    torch.manual_seed(0)
    model = randomise_batchnorm(_random_prelu(SEResNetIR(depth=18)), 0, calibration_112)
    report = arcface.export_model(model, tmp_path / "r18.onnx", "random-init", "0" * 64,
                                  variants=("fp32", "fp16", "int8"), inputs=faces_112)
    figures(report.table())
    sizes = {v.precision: v.size_bytes for v in report.variants}
    cosines = {v.precision: v.min_cosine for v in report.variants}
    assert cosines["fp16"] >= 0.999 and cosines["int8"] >= 0.99
    assert sizes["fp16"] < 0.6 * sizes["fp32"] and sizes["int8"] < 0.35 * sizes["fp32"]


# --- foreign layouts, written here as their authors did, to prove the adapters -------------------------------
# TreB1eN/InsightFace_Pytorch model.py (Backbone, bottleneck_IR[_SE], SEModule), trimmed to what forward needs.


class TreB1eNSEModule(nn.Module):
    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class TreB1eNBottleneckIR(nn.Module):
    def __init__(self, in_channel: int, depth: int, stride: int, se: bool) -> None:
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channel, depth, (1, 1), stride, bias=False), nn.BatchNorm2d(depth)
            )
        layers = [
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, (3, 3), (1, 1), 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        ]
        if se:
            layers.append(TreB1eNSEModule(depth, 16))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class TreB1eNBackbone(nn.Module):
    def __init__(self, num_layers: int, drop_ratio: float, mode: str = "ir") -> None:
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512), nn.Dropout(drop_ratio), nn.Flatten(), nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512)
        )
        modules, in_ch = [], 64
        for units, depth in zip(UNITS[num_layers], (64, 128, 256, 512)):
            for i in range(units):
                modules.append(TreB1eNBottleneckIR(in_ch, depth, 2 if i == 0 else 1, mode == "ir_se"))
                in_ch = depth
        self.body = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.output_layer(self.body(self.input_layer(x)))
        return x / torch.norm(x, 2, 1, True)  # it returns l2_norm(x); our graphs leave that to the service


# The seed note's ResNetFace (ronghuaiyang/arcface-pytorch models/resnet.py): IRBlock, SEBlock, ResNetFace.


class SeedSEBlock(nn.Module):
    def __init__(self, channel: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction), nn.PReLU(), nn.Linear(channel // reduction, channel), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        return x * self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)


class SeedIRBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None, use_se: bool = True) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, inplanes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.prelu = nn.PReLU()
        self.conv2 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.use_se = use_se
        if use_se:
            self.se = SeedSEBlock(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.prelu(self.bn1(self.conv1(self.bn0(x))))))
        if self.use_se:
            out = self.se(out)
        residual = x if self.downsample is None else self.downsample(x)
        return self.prelu(out + residual)


class SeedResNetFace(nn.Module):
    def __init__(self, layers: list[int], use_se: bool = True) -> None:
        super().__init__()
        self.inplanes, self.use_se = 64, use_se
        self.conv1 = nn.Conv2d(1, 64, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn4 = nn.BatchNorm2d(512)
        self.dropout = nn.Dropout()
        self.fc5 = nn.Linear(512 * 8 * 8, 512)
        self.bn5 = nn.BatchNorm1d(512)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [SeedIRBlock(self.inplanes, planes, stride, downsample, use_se=self.use_se)]
        self.inplanes = planes
        layers += [SeedIRBlock(planes, planes, use_se=self.use_se) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.prelu(self.bn1(self.conv1(x))))
        x = self.dropout(self.bn4(self.layer4(self.layer3(self.layer2(self.layer1(x))))))
        return self.bn5(self.fc5(x.view(x.size(0), -1)))


def _foreign(net: nn.Module, seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return _random_prelu(randomise_batchnorm(net, seed), seed)


@pytest.mark.parametrize("mode", ["ir_se", "ir"])
def test_insightface_layout_round_trip(mode: str, faces_112: torch.Tensor) -> None:
    theirs = _foreign(TreB1eNBackbone(50, 0.6, mode))
    ours = from_state_dict(theirs.state_dict())  # layout and depth read off the keys
    assert (ours.cfg.depth, ours.cfg.use_se, ours.cfg.mid_bn) == (50, mode == "ir_se", False)
    with torch.no_grad():
        want = theirs(faces_112)
        got = ours(faces_112)
    got = got / got.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_se", [True, False], ids=["se", "no-se"])
def test_resnetface_layout_round_trip(use_se: bool) -> None:
    theirs = _foreign(SeedResNetFace([2, 2, 2, 2], use_se=use_se))
    ours = from_state_dict(theirs.state_dict())
    assert (ours.cfg.variant, ours.cfg.in_channels, ours.cfg.input_size) == ("resnetface", 1, (128, 128))
    x = arcface.parity_inputs((128, 128), n=2).mean(dim=1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_our_layout_round_trip(tmp_path: Path) -> None:
    model = _foreign(SEResNetIR(depth=18, use_se=False))
    torch.save(model.state_dict(), tmp_path / "ours.pth")
    loaded = load_se_resnet_ir(tmp_path / "ours.pth")
    assert loaded.cfg == model.cfg
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_cli_exports_a_resnetface_checkpoint_as_an_rgb_model(tmp_path: Path) -> None:
    """End to end: seed layout checkpoint file -> ONNX taking RGB; equals ResNetFace fed the luma of that RGB."""
    theirs = _foreign(SeedResNetFace([2, 2, 2, 2], use_se=True))
    checkpoint = tmp_path / "resnet18_110.pth"
    torch.save({"model": theirs.state_dict()}, checkpoint)
    out = tmp_path / "resnetface.onnx"
    args = SimpleNamespace(checkpoint=checkpoint, random_init=None, layout="resnetface", depth=18, no_se=False,
                           key="model", out=out, fp16=False, int8=False, faces=None)
    assert arcface.run(args) == 0

    meta = read_metadata(out)
    assert meta["face.arch"] == "se-resnetface-18" and json.loads(meta["face.input_size"]) == [128, 128]
    assert meta["face.source"] == "resnet18_110.pth"
    rgb = arcface.parity_inputs((128, 128), n=2)
    luma = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 128, 128]
    with torch.no_grad():
        want = theirs(luma).numpy()
    np.testing.assert_allclose(session.run(None, {"input": rgb.numpy()})[0], want, atol=1e-4)


# --- checkpoints that do not fit -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ir_se_50() -> dict[str, torch.Tensor]:
    return TreB1eNBackbone(50, 0.6, "ir_se").state_dict()


def test_partial_checkpoint_names_the_missing_keys(ir_se_50: dict) -> None:
    # A checkpoint cut short inside one unit: its first batch-norm is gone, the unit count is unchanged.
    partial = {k: v for k, v in ir_se_50.items() if not k.startswith("body.20.res_layer.0.")}
    with pytest.raises(CheckpointError, match=r"missing keys: stages\.2\.\d+\.bn1\.bias"):
        from_state_dict(partial, depth=50)


def test_foreign_extra_keys_are_unexpected(ir_se_50: dict) -> None:
    extra = {**ir_se_50, "head.arcface.kernel": torch.zeros(512, 10)}
    with pytest.raises(CheckpointError, match=r"unexpected keys: head\.arcface\.kernel"):
        from_state_dict(extra, layout="insightface")


def test_wrong_depth_or_se_flag_is_refused(ir_se_50: dict) -> None:
    with pytest.raises(CheckpointError, match=r"missing keys: .*stages\.2\.10\."):
        from_state_dict(ir_se_50, depth=100)
    with pytest.raises(CheckpointError, match=r"unexpected keys: body\.0\.res_layer\.5\.fc1\.weight"):
        from_state_dict(ir_se_50, use_se=False)


def test_shape_mismatch_is_named(ir_se_50: dict) -> None:
    bad = {**ir_se_50, "output_layer.4.weight": torch.ones(256)}
    with pytest.raises(CheckpointError, match=r"shape mismatches: head\.features\.weight"):
        from_state_dict(bad, layout="insightface")


def test_unknown_layout_and_corrupt_files(tmp_path: Path, capsys) -> None:
    with pytest.raises(CheckpointError, match="not an SE-ResNet-IR checkpoint"):
        from_state_dict({"features.0.weight": torch.zeros(1)})

    corrupt = tmp_path / "model_ir_se50.pth"
    torch.save(SEResNetIR(depth=18).state_dict(), corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])  # a download cut short
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_se_resnet_ir(corrupt)

    args = SimpleNamespace(checkpoint=corrupt, random_init=None, layout="auto", depth=None, no_se=False, key=None,
                           out=tmp_path / "x.onnx", fp16=False, int8=False, faces=None)
    assert arcface.run(args) == 1
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
