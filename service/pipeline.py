"""The whole recognition path, top to bottom: decode -> detect -> align -> embed (L2-normalised).

Every endpoint reaches the models through this class (service/api/runtime.py builds one and runs it on its
inference threads); evaluation and benchmarks use the same class, so what they measure is what is served.
Matching against enrolled identities is the gallery's job (service/gallery.py); this module ends with one
unit-length embedding per face, in the embedder's space, and every coordinate in ORIGINAL image pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np

from service.align import align_face
from service.detector import RetinaFaceDetector
from service.embedder import Embedder
from service.images import decode_image
from service.quality import FaceQuality, assess

log = logging.getLogger(__name__)

# Times one named stage ("decode", "detect", "align", "embed"): the service passes Metrics.stage, which feeds
# the face_stage_duration_seconds histogram; elsewhere nothing is timed.
StageTimer = Callable[[str], AbstractContextManager]


def _untimed(stage: str) -> AbstractContextManager:
    return nullcontext()


@dataclass
class Face:
    """One detected face. Coordinates are in the pixels of the decoded (EXIF-upright) image."""

    box: np.ndarray  # (4,) float32 x1, y1, x2, y2
    score: float  # detector probability in [0, 1]
    landmarks: np.ndarray  # (5, 2) float32 x, y
    embedding: np.ndarray | None = None  # (D,) float32, unit length; None when not computed
    quality: FaceQuality | None = None  # signals and score (service/quality.py); None when not assessed

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


def largest(faces: list[Face]) -> Face | None:
    """The face with the largest box (the subject of a portrait or selfie), or None for no faces."""
    return max(faces, key=lambda f: f.area, default=None)


class Pipeline:
    """A detector and an embedder, composed. Thread-safe as far as ORT sessions are (run() is)."""

    def __init__(self, detector: RetinaFaceDetector, embedder: Embedder, *, stage: StageTimer = _untimed):
        self.detector = detector
        self.embedder = embedder
        self.stage = stage

    def decode(self, data: bytes, *, max_bytes: int, max_pixels: int) -> np.ndarray:
        """Uploaded bytes -> BGR uint8 image, EXIF-upright; refuses what service/images.py refuses."""
        with self.stage("decode"):
            return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)

    def detect(
        self,
        image: np.ndarray,
        score_threshold: float | None = None,
        min_face_size: float = 0,
        max_faces: int | None = None,
        max_side: int | None = None,
    ) -> list[Face]:
        """Faces in a BGR uint8 image, highest score first; no embeddings. max_side: search it at a smaller size
        than the detector's own (RetinaFaceDetector.detect)."""
        with self.stage("detect"):
            found = self.detector.detect(
                image, score_threshold=score_threshold, min_face_size=min_face_size, max_faces=max_faces,
                max_side=max_side,
            )
        return [
            Face(
                box=np.asarray(box, dtype=np.float32),
                score=float(score),
                landmarks=np.asarray(points, dtype=np.float32).reshape(5, 2),
            )
            for box, score, points in zip(found.boxes, found.scores, found.landmarks)
        ]

    def align(self, image: np.ndarray, faces: list[Face]) -> np.ndarray:
        """Aligned crops (N, h, w, 3) BGR uint8, warped onto the embedder's template."""
        h, w = self.embedder.input_size
        if not faces:
            return np.zeros((0, h, w, 3), np.uint8)
        with self.stage("align"):
            return np.stack([align_face(image, f.landmarks, self.embedder.template, (h, w)) for f in faces])

    def embed(self, image: np.ndarray, faces: list[Face], *, quality: bool = False) -> list[Face]:
        """Fill in the given faces' embeddings (one batched embedder call for all of them), and their quality
        when asked (from the same aligned crops and the embeddings' lengths); returns them."""
        if faces:
            crops = self.align(image, faces)
            with self.stage("embed"):
                embeddings, norms = self.embedder.embed_with_norms(crops)
            for face, embedding in zip(faces, embeddings):
                face.embedding = embedding
            if quality:
                with self.stage("quality"):
                    for face, crop, norm in zip(faces, crops, norms):
                        face.quality = assess(
                            image.shape, face.landmarks, face.score, crop, self.embedder.template, float(norm)
                        )
        return faces

    def analyse(
        self,
        image: np.ndarray,
        score_threshold: float | None = None,
        min_face_size: float = 0,
        max_faces: int | None = None,
        embed: bool = True,
        quality: bool = False,
    ) -> list[Face]:
        """detect -> align -> embed for every face in a decoded BGR image (detect only when neither `embed` nor
        `quality`: a face's quality rests on its embedding's length, so asking for it embeds the face)."""
        faces = self.detect(
            image, score_threshold=score_threshold, min_face_size=min_face_size, max_faces=max_faces
        )
        return self.embed(image, faces, quality=quality) if embed or quality else faces
