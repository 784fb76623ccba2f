"""Embedder: how it feeds a network (hand-checkable graphs) and what it gives on real weights and real faces.

The "channel-mean" graphs (tests/onnx_fixtures.py) output each input channel's mean, so colour order,
mean/std and layout handling are checked against numbers computed here by hand. The real-weight tests run the
default embedder built by `make models` on aligned crops of real photos.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from api_support import built_model
from onnx_fixtures import channel_mean_embedder, embedder_metadata, expected_channel_means

from service.embedder import Embedder
from service.errors import InvalidParameter, ModelError
from service.onnx_model import file_sha256
from service.vectors import l2_normalise

DEFAULT_EMBEDDER = "mobilefacenet_192.onnx"
RNG = np.random.default_rng(0)
CROPS = RNG.integers(0, 256, (7, 112, 112, 3), dtype=np.uint8)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("color", ["RGB", "BGR"])
def test_preprocessing_follows_metadata(tmp_path: Path, layout: str, color: str) -> None:
    mean, std = [10.0, 120.0, 250.0], [2.0, 64.0, 0.5]  # distinct per channel, so a swap shows
    meta = embedder_metadata(
        face__layout=layout, face__color=color, face__mean=json.dumps(mean), face__std=json.dumps(std)
    )
    embedder = Embedder(channel_mean_embedder(tmp_path / "m.onnx", layout=layout, metadata=meta))
    out = embedder.embed(CROPS)
    assert out.dtype == np.float32 and out.shape == (7, 3)
    np.testing.assert_allclose(out, unit(expected_channel_means(CROPS, color, mean, std)), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_properties_come_from_metadata(tmp_path: Path) -> None:
    path = channel_mean_embedder(
        tmp_path / "m.onnx",
        size=(112, 96),
        metadata=embedder_metadata(
            face__input_size="[112, 96]",
            face__embedder__template=json.dumps(
                [[30.3, 51.7], [65.5, 51.5], [48.0, 71.7], [33.5, 92.4], [62.7, 92.2]]
            ),
            face__embedder__threshold="0.42",
            face__embedder__flip="true",
        ),
    )
    embedder = Embedder(path)
    assert embedder.input_size == (112, 96)
    assert embedder.embedding_size == 3
    assert embedder.threshold == pytest.approx(0.42)
    assert embedder.flip is True
    assert embedder.template.shape == (5, 2) and embedder.template[0, 0] == pytest.approx(30.3)
    assert embedder.sha256 == file_sha256(path) and len(embedder.sha256) == 64
    assert embedder.path == path
    assert embedder.metadata["face.arch"] == "channel-mean"
    assert Embedder(path, flip=False).flip is False  # the caller overrides the file's default


def test_ready_session_and_batching(tmp_path: Path) -> None:
    path = channel_mean_embedder(tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embedder = Embedder(session, max_batch=3, sha256="abc")
    assert embedder.path is None and embedder.sha256 == "abc"
    whole = Embedder(path).embed(CROPS)
    np.testing.assert_allclose(embedder.embed(CROPS), whole, atol=1e-6)  # 3 + 3 + 1 crops
    np.testing.assert_allclose(embedder.embed(list(CROPS)), whole, atol=1e-6)
    assert embedder.embed([]).shape == (0, 3)


def test_fixed_batch_graph_is_padded(tmp_path: Path) -> None:
    embedder = Embedder(channel_mean_embedder(tmp_path / "m.onnx", batch=4))
    assert embedder.max_batch == 4
    np.testing.assert_allclose(
        embedder.embed(CROPS), Embedder(channel_mean_embedder(tmp_path / "d.onnx")).embed(CROPS), atol=1e-6
    )


def test_flip_sums_crop_and_mirror_then_normalises(tmp_path: Path) -> None:
    # Channel means are mirror-invariant, so here flip must give exactly the unflipped embedding; the real-model
    # test below checks the mirror is really taken.
    embedder = Embedder(channel_mean_embedder(tmp_path / "m.onnx"), flip=True)
    np.testing.assert_allclose(embedder.embed(CROPS), embedder.embed(CROPS, flip=False), atol=1e-6)


def test_wrong_crops_are_refused(tmp_path: Path) -> None:
    embedder = Embedder(channel_mean_embedder(tmp_path / "m.onnx"))
    with pytest.raises(InvalidParameter):
        embedder.embed(np.zeros((2, 100, 100, 3), np.uint8))
    with pytest.raises(InvalidParameter):
        embedder.embed(np.zeros((2, 112, 112, 3), np.float32))


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"face__kind": "detector"}, "face.kind"),
        ({"face__kind": None}, "face.kind"),
        ({"face__layout": "CHWN"}, "face.layout"),
        ({"face__color": "YUV"}, "face.color"),
        ({"face__mean": "[1, 2]"}, "face.mean"),
        ({"face__std": "[1, 0, 1]"}, "face.std"),
        ({"face__std": "not json"}, "face.std"),
        ({"face__input_size": "null"}, "face.input_size"),
        ({"face__input_size": "[112]"}, "face.input_size"),
        ({"face__embedder__template": "[[1, 2]]"}, "face.embedder.template"),
        ({"face__embedder__template": json.dumps([[500, 50]] * 5)}, "face.embedder.template"),
        ({"face__embedder__embedding_size": "0"}, "face.embedder.embedding_size"),
        ({"face__embedder__embedding_size": None}, "face.embedder.embedding_size"),
        ({"face__embedder__threshold": "2.5"}, "face.embedder.threshold"),
        ({"face__embedder__flip": "maybe"}, "face.embedder.flip"),
    ],
)
def test_broken_metadata_is_refused(tmp_path: Path, overrides: dict, key: str) -> None:
    path = channel_mean_embedder(tmp_path / "m.onnx", metadata=embedder_metadata(**overrides))
    with pytest.raises(ModelError) as err:
        Embedder(path)
    assert err.value.details["key"] == key


def test_graph_that_contradicts_metadata_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="embedding_size"):
        Embedder(
            channel_mean_embedder(
                tmp_path / "a.onnx", metadata=embedder_metadata(face__embedder__embedding_size="512")
            )
        )
    with pytest.raises(ModelError, match="implies"):
        Embedder(channel_mean_embedder(tmp_path / "b.onnx", size=(96, 96)))  # metadata says 112x112
    with pytest.raises(ModelError, match="embedding"):
        Embedder(channel_mean_embedder(tmp_path / "c.onnx", output_name="features"))


def test_missing_and_corrupt_files_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such model file"):
        Embedder(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(ModelError, match="cannot load"):
        Embedder(tmp_path / "junk.onnx")


def test_l2_normalise_keeps_zero_rows_finite() -> None:
    out = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


# --- real weights ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_embedder(models_dir: Path) -> Embedder:
    return Embedder(built_model(models_dir, DEFAULT_EMBEDDER))


@pytest.fixture(scope="module")
def aligned_crops(faces_dir: Path, models_dir: Path, default_embedder: Embedder) -> dict[str, np.ndarray]:
    """Aligned crops of a few real photos, via the default detector's landmarks."""
    from service.align import align_face
    from service.detector import RetinaFaceDetector
    from service.images import decode_image

    detector = RetinaFaceDetector(models_dir / "retinaface_mnet025.onnx")
    crops = {}
    for name in ("img1.jpg", "img2.jpg", "img3.jpg"):
        image = decode_image((faces_dir / "pairs" / name).read_bytes(), max_bytes=10**8, max_pixels=10**8)
        found = detector.detect(image)
        assert len(found.scores) >= 1, name
        crops[name] = align_face(
            image, found.landmarks[0], default_embedder.template, default_embedder.input_size
        )
    return crops


def test_default_embedder_metadata(default_embedder: Embedder) -> None:
    assert default_embedder.embedding_size == 192
    assert default_embedder.input_size == (112, 112)
    assert default_embedder.threshold is None or -1 < default_embedder.threshold < 1


def test_default_embedder_on_real_faces(
    default_embedder: Embedder, aligned_crops: dict[str, np.ndarray], figures
) -> None:
    # In deepface's pairs.csv img1-img2 are the same person; img3 is someone else.
    batch = np.stack([aligned_crops[n] for n in ("img1.jpg", "img2.jpg", "img3.jpg")])
    emb = default_embedder.embed(batch, flip=False)
    assert emb.shape == (3, 192) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    same, different = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    figures(f"default embedder cosine: same {same:.3f}, different {different:.3f}")
    assert same > different + 0.2

    # Batching must not change the numbers, and mirror TTA must really use the mirror.
    one_by_one = np.concatenate([default_embedder.embed(batch[i : i + 1], flip=False) for i in range(3)])
    np.testing.assert_allclose(one_by_one, emb, atol=1e-5)
    flipped = default_embedder.embed(batch, flip=True)
    session = default_embedder.session

    def raw(crops: np.ndarray) -> np.ndarray:
        return session.run(["embedding"], {"input": default_embedder.preprocess(crops)})[0]

    expected = unit(raw(batch) + raw(np.ascontiguousarray(batch[:, :, ::-1])))
    np.testing.assert_allclose(flipped, expected, atol=1e-5)
    assert np.abs(flipped - emb).max() > 1e-3


def test_model_identity_ignores_metadata_and_refuses_broken_files(models_dir, tmp_path):
    import hashlib

    import onnx
    import pytest as _pytest

    from service.errors import ModelError
    from service.onnx_model import file_sha256, model_identity

    path = models_dir / "mobilefacenet_192.onnx"
    if not path.is_file():
        _pytest.skip("default embedder not built")
    model = onnx.load(str(path))
    del model.metadata_props[:]
    graph_only = hashlib.sha256(model.SerializeToString()).hexdigest()
    model_id, earlier, _ = model_identity(path)
    assert model_id == graph_only  # what onnx itself serialises without metadata
    assert file_sha256(path) in earlier
    model.metadata_props.add(key="face.note", value="x" * 1000)
    onnx.save(model, str(tmp_path / "other.onnx"))
    assert model_identity(tmp_path / "other.onnx")[0] == graph_only
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(path.read_bytes()[:5000])
    with _pytest.raises(ModelError, match="not an ONNX protobuf"):
        model_identity(truncated)
