"""Face detection with a RetinaFace-style ONNX graph: priors, decoding and NMS in numpy, the network in ORT.

The graph holds only the network (outputs `loc`, `conf`, `landmarks`, docs/model-contract.md). Everything
after it is numpy: the pure box maths (`prior_boxes`, cached per input size, `decode_boxes`, `decode_landmarks`,
`nms`) in service/boxes.py, and the rest here. `RetinaFaceDetector` learns priors, thresholds, colour order, mean/std and the
resize policy from the file's metadata and returns boxes and landmarks in the caller's image pixels.

Why decoding stays outside the graph (measured on this project's 2-core CPU, one ORT thread, best of 50,
couple.jpg resized to 640x446 = 11,760 priors, 114 of them above 0.5): the network alone runs in 25.1 ms; the
same graph with box and landmark decoding of every prior added inside runs in 36.0 ms. In numpy, thresholding
first and decoding only the candidates takes 0.04 ms (decoding all priors would be 0.93 ms) and NMS 0.03 ms,
and thresholding and NMS would stay in numpy anyway. Keeping the graph to the network also keeps the file the
plain contract every detector follows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from service.boxes import decode_boxes, decode_landmarks, nms, prior_boxes
from service.errors import InvalidImage, InvalidParameter, ModelError
from service.onnx_model import ModelMetadata, file_sha256, open_model

log = logging.getLogger(__name__)

OUTPUTS = ("loc", "conf", "landmarks")


@dataclass(frozen=True)
class Detections:
    """Faces found in one image, in that image's pixel coordinates, sorted by score (highest first).

    boxes `[N, 4]` float32 (x1, y1, x2, y2); scores `[N]` float32 face probabilities; landmarks `[N, 5, 2]`
    float32 (x, y): left eye, right eye, nose tip, left and right mouth corners. Boxes are not clipped: a face
    cut by the image border keeps its whole box (and its landmarks inside it), which alignment relies on.
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))


class RetinaFaceDetector:
    """An ONNX face detector with RetinaFace outputs; everything about it is read from the file's metadata.

    model: a path to the .onnx file or a ready `ort.InferenceSession` (then `path` is None and `sha256` is
    what the caller passes). A file whose metadata breaks docs/model-contract.md raises ModelError.

    Resize policy: images whose longer side exceeds `face.detector.max_side` are shrunk to it (aspect kept);
    smaller images are fed as they are. RetinaFace MobileNet-0.25 was trained on WIDER FACE crops of 640 px,
    and at much larger inputs its fine-stride priors fire on texture (couple.jpg at its full 2280x1588 gives
    3 false positives, at 640 exactly its 2 faces). Small images are not enlarged: upscaling adds no detail
    and multiplies the cost by the area ratio. Measured on 150 LFW photos (250x250): as they are, 0 missed and
    32 with extra (background) faces; enlarged to 640, 0 missed and 34 with extra faces; the 8 pair photos
    under 640 px gave exactly 1 face either way.
    A graph with a fixed `face.input_size` gets the image scaled to fit and padded bottom/right with the mean.
    """

    def __init__(
        self,
        model: str | Path | ort.InferenceSession,
        session_options: ort.SessionOptions | None = None,
        *,
        sha256: str | None = None,
    ):
        self.session, self.path, meta, _ = open_model(model, session_options, kind="detector", outputs=OUTPUTS)
        self.sha256 = sha256 if self.path is None else sha256 or file_sha256(self.path)
        self.metadata = meta
        self._output_names = list(OUTPUTS)
        self.arch = meta.text("face.arch")
        self.layout, self.color, mean, std = meta.preprocessing()
        self.mean = np.asarray(mean, dtype=np.float32)
        self.inv_std = 1.0 / np.asarray(std, dtype=np.float32)
        self.input_size = meta.input_size(optional=True)
        self.max_side = meta.integer("face.detector.max_side", low=32)
        self.score_threshold = meta.number("face.detector.score_threshold", low=0.0, high=1.0)
        self.nms_threshold = meta.number("face.detector.nms_threshold", low=0.0, high=1.0)
        self.min_sizes, self.steps, self.variance = _read_priors(meta)
        # blobFromImage's mean is in the output (network's) channel order, after the swap, like ours.
        self._blob_params = cv2.dnn.Image2BlobParams(
            scalefactor=tuple(float(v) for v in self.inv_std),
            mean=tuple(float(v) for v in self.mean),
            swapRB=self.color == "RGB",
            ddepth=cv2.CV_32F,
            datalayout=_dnn_layout(self.layout),
        )

    @property
    def working_side(self) -> int:
        """The longest side, in pixels, of what the network is fed: larger images are shrunk to it first."""
        return self.max_side if self.input_size is None else max(self.input_size)

    @property
    def resizable(self) -> bool:
        """Whether `detect` can search an image at a smaller size than the file's (`max_side`)."""
        return self.input_size is None

    # The pipeline, top to bottom: resize -> normalise -> network -> filter -> decode -> NMS -> original pixels.
    def detect(
        self,
        image_bgr: np.ndarray,
        score_threshold: float | None = None,
        min_face_size: float = 0,
        max_faces: int | None = None,
        max_side: int | None = None,
    ) -> Detections:
        """Faces in a uint8 BGR image `[H, W, 3]` (or grayscale `[H, W]`), highest score first.

        score_threshold: minimum face probability (default: the file's `face.detector.score_threshold`).
        min_face_size: drop faces whose box is narrower or shorter than this, in original image pixels.
        max_faces: keep at most this many (the highest-scored), or all when None.
        max_side: search the image shrunk to at most this many pixels on its longer side instead of the file's
        `face.detector.max_side` (smaller only; cheaper by the square of the ratio, and blind to faces below
        about 16 px at that scale). Ignored by a graph with a fixed input size.
        """
        image = _check_image(image_bgr)
        threshold = self.score_threshold if score_threshold is None else float(score_threshold)
        if not 0.0 <= threshold <= 1.0:
            raise InvalidParameter(f"score_threshold must be in [0, 1], got {score_threshold}")
        if not min_face_size >= 0:
            raise InvalidParameter(f"min_face_size must be >= 0, got {min_face_size}")
        if max_faces is not None and max_faces < 0:
            raise InvalidParameter(f"max_faces must be >= 0, got {max_faces}")

        blob, scale = self._prepare(image, max_side)
        loc, conf, landmarks = (out[0] for out in self.session.run(self._output_names, {"input": blob}))
        height, width = blob.shape[2:] if self.layout == "NCHW" else blob.shape[1:3]
        priors = prior_boxes(height, width, self.min_sizes, self.steps)
        if not loc.shape[0] == conf.shape[0] == landmarks.shape[0] == len(priors):
            raise ModelError(
                f"{self.metadata.source}: the graph gave {loc.shape[0]} predictions for a {width}x{height} input, "
                f"its face.detector.priors describe {len(priors)}",
                details={"model": self.metadata.source, "key": "face.detector.priors"},
            )

        # Threshold first, so only the few candidates (dozens of ~10^4 priors) are decoded and sorted.
        candidates = np.flatnonzero(conf[:, 1] > threshold)
        if candidates.size == 0:
            return Detections.empty()
        scores = conf[candidates, 1]
        boxes = decode_boxes(loc[candidates], priors[candidates], self.variance)
        points = decode_landmarks(landmarks[candidates], priors[candidates], self.variance)
        keep = nms(boxes, scores, self.nms_threshold)
        boxes, scores, points = boxes[keep] / np.tile(scale, 2), scores[keep], points[keep] / scale

        if min_face_size > 0:
            sizes = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
            big = sizes >= min_face_size
            boxes, scores, points = boxes[big], scores[big], points[big]
        if max_faces is not None:
            boxes, scores, points = boxes[:max_faces], scores[:max_faces], points[:max_faces]
        return Detections(
            boxes=np.ascontiguousarray(boxes, dtype=np.float32),
            scores=np.ascontiguousarray(scores, dtype=np.float32),
            landmarks=np.ascontiguousarray(points, dtype=np.float32),
        )

    def _prepare(self, image: np.ndarray, max_side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The network's input `[1, 3, h, w]` (or NHWC) float32, and the (x, y) scale from image to input pixels."""
        height, width = image.shape[:2]
        if self.input_size is None:
            side = self.max_side if max_side is None else max(32, min(self.max_side, int(max_side)))
            scale = min(1.0, side / max(height, width))
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            pad_to = None
        else:
            target_h, target_w = self.input_size
            scale = min(target_h / height, target_w / width)
            size = (max(1, min(target_w, round(width * scale))), max(1, min(target_h, round(height * scale))))
            pad_to = (target_h, target_w)
        if size != (width, height):
            # INTER_AREA averages the source pixels under each output pixel: no aliasing of fine texture when
            # shrinking (aliased texture is what the fine-stride priors mistake for tiny faces).
            interpolation = cv2.INTER_AREA if size[0] < width else cv2.INTER_LINEAR
            image = cv2.resize(image, size, interpolation=interpolation)
        # Per-axis scales from the rounded size, so boxes map back to the original pixels exactly.
        scale = np.array([image.shape[1] / width, image.shape[0] / height], dtype=np.float32)
        if self.layout == "NCHW":
            return self._planar_blob(image, pad_to), scale
        # One OpenCV pass does the colour swap, (pixel - mean) / std and the layout (NHWC here).
        blob = cv2.dnn.blobFromImageWithParams(image, self._blob_params)
        if pad_to is not None:
            padded = np.zeros(self._blob_shape(*pad_to), dtype=np.float32)  # zero = the mean pixel, normalised
            padded[:, : blob.shape[1], : blob.shape[2]] = blob
            blob = padded
        return blob, scale

    def _planar_blob(self, image: np.ndarray, pad_to: tuple[int, int] | None) -> np.ndarray:
        """`[1, 3, h, w]` (or `pad_to`, zero = the mean pixel, around the image): each plane written by one
        OpenCV pass, `pixel * (1 / std) + (-mean / std)` from uint8 straight into the blob's float32 memory.

        Measured on the 640x480 frame (median of 200, this project's 2-core CPU): 0.22 ms, where
        `cv2.dnn.blobFromImage` (convert, subtract, scale and split as separate passes) took 0.84 ms; numpy's cast,
        subtract, multiply and transpose take about 5 ms (BENCHMARKS.md, "Where a request's time goes"). Same
        float32 values within 1e-5 (tests/test_detector.py compares with the formula written out in numpy).
        """
        height, width = image.shape[:2]
        shape = self._blob_shape(*(pad_to or (height, width)))
        blob = np.zeros(shape, np.float32) if pad_to is not None else np.empty(shape, np.float32)
        planes = cv2.split(image)  # B, G, R
        for channel, source in enumerate((2, 1, 0) if self.color == "RGB" else (0, 1, 2)):
            target = blob[0, channel, :height, :width]
            scale = float(self.inv_std[channel])
            written = cv2.addWeighted(planes[source], scale, planes[source], 0.0,
                                      -float(self.mean[channel]) * scale, dst=target, dtype=cv2.CV_32F)
            if written is not target and not np.shares_memory(written, target):  # a padded plane is not contiguous
                target[...] = written
        return blob

    def _blob_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        return (1, 3, height, width) if self.layout == "NCHW" else (1, height, width, 3)


def _dnn_layout(layout: str) -> int:
    """OpenCV's constant for a blob layout (module `cv2` in OpenCV 5, `cv2.dnn` in 4.x)."""
    name = f"DNN_LAYOUT_{layout}"
    return getattr(cv2 if hasattr(cv2, name) else cv2.dnn, name)


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise InvalidImage(f"expected a uint8 numpy image, got {getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidImage(f"expected an HxWx3 BGR image, got shape {image.shape}")
    return image


def _read_priors(meta: ModelMetadata) -> tuple[tuple, tuple, tuple[float, float]]:
    """`face.detector.priors` checked: min_sizes (one list of positive ints per step), steps, 2 variances."""
    key = "face.detector.priors"
    priors = meta.json(key)
    if not isinstance(priors, dict) or not {"min_sizes", "steps", "variance"} <= set(priors):
        raise meta.error(key, "must be a JSON object with min_sizes, steps and variance")
    min_sizes, steps, variance = priors["min_sizes"], priors["steps"], priors["variance"]

    def positive_ints(values) -> bool:
        return isinstance(values, list) and bool(values) and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
        )

    if not positive_ints(steps):
        raise meta.error(key, f"has steps {steps!r}, expected a list of positive integers")
    if not (isinstance(min_sizes, list) and len(min_sizes) == len(steps) and all(map(positive_ints, min_sizes))):
        raise meta.error(key, f"has min_sizes {min_sizes!r}, expected one list of positive integers per step")
    if not (
        isinstance(variance, list)
        and len(variance) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in variance)
    ):
        raise meta.error(key, f"has variance {variance!r}, expected two positive numbers")
    return (
        tuple(tuple(s) for s in min_sizes),
        tuple(steps),
        (float(variance[0]), float(variance[1])),
    )
