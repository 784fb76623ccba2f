"""The whole path on real photos with the default models: decode -> detect -> align -> embed."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from service.detector import RetinaFaceDetector
from service.embedder import Embedder
from service.pipeline import Face, Pipeline, largest

LIMITS = {"max_bytes": 50 * 1024 * 1024, "max_pixels": 40_000_000}


@pytest.fixture(scope="module")
def pipeline(models_dir: Path) -> Pipeline:
    paths = [models_dir / "retinaface_mnet025.onnx", models_dir / "mobilefacenet_192.onnx"]
    for path in paths:
        if not path.exists():
            pytest.skip(f"{path} is absent: run `make models`")
    return Pipeline(RetinaFaceDetector(paths[0]), Embedder(paths[1]))


def read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image


def check_faces(faces: list[Face], image: np.ndarray, dim: int) -> None:
    h, w = image.shape[:2]
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    for face in faces:
        x1, y1, x2, y2 = face.box
        assert face.box.shape == (4,) and face.landmarks.shape == (5, 2)
        assert (
            -0.1 * w < x1 < x2 < 1.1 * w and -0.1 * h < y1 < y2 < 1.1 * h
        )  # original pixels, not 640-scaled
        assert ((face.landmarks >= face.box[:2]) & (face.landmarks <= face.box[2:])).all()
        assert face.landmarks[0, 0] < face.landmarks[1, 0]  # left eye (smaller x) first
        assert (
            face.embedding is not None
            and face.embedding.shape == (dim,)
            and face.embedding.dtype == np.float32
        )
        assert abs(float(np.linalg.norm(face.embedding)) - 1.0) < 1e-5


def test_same_person_pairs_score_higher_than_different_person_pairs(
    pipeline: Pipeline, faces_dir: Path, figures
) -> None:
    pairs_dir = faces_dir / "pairs"
    with open(pairs_dir / "pairs.csv", newline="") as f:
        rows = [
            (r["file_x"].strip(), r["file_y"].strip(), r["Decision"].strip() == "Yes")
            for r in csv.DictReader(f)
        ]
    embeddings = {}
    for name in sorted({n for row in rows for n in row[:2]}):
        faces = pipeline.analyse(pipeline.decode((pairs_dir / name).read_bytes(), **LIMITS))
        assert faces, f"no face found in {name}"
        embeddings[name] = largest(faces).embedding
    scores = np.array([embeddings[a] @ embeddings[b] for a, b, _ in rows])
    same = np.array([s for s, (_, _, y) in zip(scores, rows) if y])
    different = np.array([s for s, (_, _, y) in zip(scores, rows) if not y])
    assert len(same) == 38 and len(different) == 262
    auc = (same[:, None] > different[None, :]).mean() + 0.5 * (same[:, None] == different[None, :]).mean()
    figures(
        f"pairs.csv: AUC {auc:.4f}, same-person cosine min/median {same.min():.3f}/{np.median(same):.3f}, "
        f"different-person max/median {different.max():.3f}/{np.median(different):.3f}"
    )
    # Measured with the default models: AUC 1.000, same >= 0.55, different <= 0.41.
    assert auc >= 0.99
    assert np.median(same) - np.median(different) > 0.4


def test_couple_gives_two_faces_with_distinct_embeddings(pipeline: Pipeline, faces_dir: Path) -> None:
    data = (faces_dir / "groups" / "couple.jpg").read_bytes()
    image = pipeline.decode(data, **LIMITS)
    faces = pipeline.analyse(image)
    assert image.shape[:2] == (1588, 2280)
    assert len(faces) == 2
    check_faces(faces, image, pipeline.embedder.embedding_size)
    assert float(faces[0].embedding @ faces[1].embedding) < 0.4  # two different people
    # The two faces sit side by side, not on top of each other.
    assert abs(faces[0].box[0] - faces[1].box[0]) > 100


def test_group_selfie_options(pipeline: Pipeline, faces_dir: Path) -> None:
    image = read(faces_dir / "groups" / "selfie-many-people.jpg")
    faces = pipeline.analyse(image)
    assert len(faces) >= 4
    check_faces(faces, image, pipeline.embedder.embedding_size)
    assert len(pipeline.analyse(image, max_faces=2)) == 2
    bare = pipeline.analyse(image, embed=False)
    assert [f.embedding for f in bare] == [None] * len(faces)
    np.testing.assert_allclose([f.box for f in bare], [f.box for f in faces])
    smallest = min(min(f.width, f.height) for f in faces)
    assert len(pipeline.detect(image, min_face_size=smallest + 1)) < len(faces)
    assert largest(faces).area == max(f.area for f in faces)
    assert largest([]) is None


def test_embedding_survives_rotation_and_rescaling(pipeline: Pipeline, faces_dir: Path) -> None:
    # The same photo turned upright by EXIF, and at half size: same face, same identity, coordinates follow.
    image = read(faces_dir / "pairs" / "img1.jpg")
    reference = largest(pipeline.analyse(image))
    half = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)
    small = largest(pipeline.analyse(half))
    np.testing.assert_allclose(small.box * 2, reference.box, atol=0.05 * reference.width)
    assert float(small.embedding @ reference.embedding) > 0.9

    # A camera that stored the pixels sideways (rotated 90 degrees counter-clockwise) and tagged EXIF
    # orientation 6 ("rotate 90 clockwise to display"): the decoded picture is upright again.
    ok, sideways = cv2.imencode(
        ".jpg", np.ascontiguousarray(np.rot90(image, 1)), [cv2.IMWRITE_JPEG_QUALITY, 95]
    )
    assert ok
    tagged = sideways.tobytes()[:2] + exif_orientation_6() + sideways.tobytes()[2:]
    upright_image = pipeline.decode(tagged, **LIMITS)
    faces = pipeline.analyse(upright_image)
    assert upright_image.shape == image.shape
    upright = largest(faces)
    np.testing.assert_allclose(upright.box, reference.box, atol=0.05 * reference.width)
    assert float(upright.embedding @ reference.embedding) > 0.9


def exif_orientation_6() -> bytes:
    """APP1 with a big-endian TIFF IFD0 holding one entry: Orientation (0x0112) = 6."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def test_no_face_in_a_plain_picture(pipeline: Pipeline) -> None:
    gradient = np.tile(np.linspace(0, 255, 640, dtype=np.uint8), (480, 1))
    assert pipeline.analyse(cv2.cvtColor(gradient, cv2.COLOR_GRAY2BGR)) == []
    assert pipeline.align(gradient, []).shape == (0, 112, 112, 3)
