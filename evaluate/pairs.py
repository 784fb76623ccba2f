"""Verification over a pairs file, through the service's own pipeline code (decode -> detect -> largest face ->
align -> embed), exactly as /verify does it: per photo the largest detected face, similarity = cosine."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluate.verification import Pair, read_lfw_pairs, read_pairs_csv

log = logging.getLogger(__name__)


def read_pairs(path: str | Path, images_root: str | Path | None = None) -> list[Pair]:
    """pairs.csv (`file_x,file_y,Decision`) or LFW pairs.txt, by suffix; images_root rebases the photos."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        pairs = read_pairs_csv(path)
        if images_root is not None:
            root = Path(images_root)
            pairs = [Pair(root / p.a.relative_to(path.parent), root / p.b.relative_to(path.parent), p.same, p.fold)
                     for p in pairs]
        return pairs
    return read_lfw_pairs(path, images_root)


def build_pipeline(settings):
    """Detector + embedder + Pipeline built from service Settings the way the server builds them."""
    from service.detector import RetinaFaceDetector
    from service.embedder import Embedder
    from service.onnx_model import session_options
    from service.pipeline import Pipeline

    def options():
        return session_options(settings.intra_op_threads, settings.inter_op_threads)

    detector = RetinaFaceDetector(settings.detector_path, options())
    embedder = Embedder(settings.embedder_path, options(), flip=settings.embed_flip)
    return Pipeline(detector, embedder)


@dataclass
class PairScores:
    scores: np.ndarray  # (P,) cosine similarity, NaN where a photo had no face
    labels: np.ndarray  # (P,) bool same person
    folds: np.ndarray  # (P,) int
    missed_photos: list[str]  # photos where no face was detected
    photos: int
    seconds: float  # wall time for all photos (decode + detect + align + embed)


def central(faces, shape: tuple[int, ...]):
    """The face whose box centre is nearest the image centre, or None for no faces.

    LFW's protocol is about the person the photo was cropped around (deep-funneled photos put them at the centre);
    bystanders appear in some photos and are sometimes larger, so "largest" measures the wrong person there.
    """
    cy, cx = shape[0] / 2, shape[1] / 2
    return min(faces, key=lambda f: ((f.box[0] + f.box[2]) / 2 - cx) ** 2 + ((f.box[1] + f.box[3]) / 2 - cy) ** 2,
               default=None)


def score_pairs(pipeline, pairs: list[Pair], max_pixels: int = 40_000_000, detection_score: float | None = None,
                progress: bool = False, face: str = "largest", max_faces: int | None = None) -> PairScores:
    """Embed each distinct photo once (its `face`: "largest", as /verify does, or "central") and score every
    pair by cosine similarity. detection_score, max_faces and max_pixels: the server's settings of the same
    names (FACE_DETECTION_SCORE_THRESHOLD, FACE_MAX_FACES, FACE_MAX_IMAGE_PIXELS), so that the figures are
    those of the service as configured."""
    from service.pipeline import largest
    from service.vectors import similarity

    if face not in ("largest", "central"):
        raise ValueError(f"face must be 'largest' or 'central', not {face!r}")

    photos = sorted({p.a for p in pairs} | {p.b for p in pairs})
    embeddings: dict[Path, np.ndarray | None] = {}
    started = time.perf_counter()
    for k, path in enumerate(photos):
        image = pipeline.decode(path.read_bytes(), max_bytes=1 << 31, max_pixels=max_pixels)
        found = pipeline.detect(image, score_threshold=detection_score, max_faces=max_faces)
        chosen = largest(found) if face == "largest" else central(found, image.shape)
        embeddings[path] = None if chosen is None else pipeline.embed(image, [chosen])[0].embedding
        if progress and (k + 1) % 500 == 0:
            log.info("%d/%d photos", k + 1, len(photos))
    seconds = time.perf_counter() - started
    scores = np.array([
        np.nan if embeddings[p.a] is None or embeddings[p.b] is None
        else float(similarity(embeddings[p.a], embeddings[p.b]))
        for p in pairs
    ])
    return PairScores(
        scores=scores,
        labels=np.array([p.same for p in pairs]),
        folds=np.array([p.fold for p in pairs]),
        missed_photos=[str(p) for p in photos if embeddings[p] is None],
        photos=len(photos),
        seconds=seconds,
    )
