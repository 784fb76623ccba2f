"""Photos laid out one sub-folder per person (`root/<person>/<photo>`, as LFW's images/), embedded once through
the service's own pipeline and cached, for the open-set identification evaluation (evaluate/identification.py).

The cache (`embeddings.npz` in the output folder) is keyed by the embedder file's sha256, the detection settings,
the face choice and the list of photos, so a changed model or folder is embedded again and never mixed up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass
class People:
    """One row per photo with a face; photos without a detected face are listed in `missed`."""

    paths: list[str]  # relative to the root, "person/photo.jpg"
    labels: np.ndarray  # (P,) int person index
    names: list[str]  # person index -> folder name
    embeddings: np.ndarray  # (P, D) float32, unit length
    missed: list[str]  # photos where no face was found (not in the rows above)
    seconds: float  # wall time of the embedding run (0 when read from the cache)

    @property
    def photos(self) -> int:
        return len(self.paths)


def list_people(root: str | Path) -> list[tuple[str, list[Path]]]:
    """(person, sorted photo paths) for each sub-folder of `root` holding at least one photo, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    people = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
        if photos:
            people.append((folder.name, photos))
    if not people:
        raise ValueError(f"{root}: no sub-folders with photos (expected root/<person>/<photo>.jpg)")
    return people


def _cache_key(embedder_sha256: str, settings: dict, files: list[str]) -> str:
    text = json.dumps({"embedder": embedder_sha256, "settings": settings, "files": files}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def embed_people(
    pipeline,
    root: str | Path,
    *,
    face: str = "central",
    detection_score: float | None = None,
    max_faces: int | None = None,
    max_pixels: int = 40_000_000,
    cache: str | Path | None = None,
    progress: bool = False,
) -> People:
    """Embed one face per photo (`central`: nearest the image centre, right for LFW's photos cropped around their
    subject; `largest`: as /enroll with multiple_faces=largest), with the service's settings."""
    from evaluate.pairs import central
    from service.pipeline import largest

    if face not in ("central", "largest"):
        raise ValueError(f"face must be 'central' or 'largest', not {face!r}")
    root = Path(root)
    people = list_people(root)
    files = [f"{name}/{p.name}" for name, photos in people for p in photos]
    settings = {"face": face, "detection_score": detection_score, "max_faces": max_faces,
                "flip": bool(pipeline.embedder.flip), "max_pixels": max_pixels}
    key = _cache_key(pipeline.embedder.sha256 or "", settings, files)
    if cache is not None and Path(cache).is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                log.info("embeddings of %d photos read from %s", len(files), cache)
                return People(
                    paths=[str(p) for p in z["paths"]], labels=z["labels"], names=[str(n) for n in z["names"]],
                    embeddings=z["embeddings"], missed=[str(m) for m in z["missed"]], seconds=0.0,
                )

    paths, labels, vectors, missed = [], [], [], []
    started = time.perf_counter()
    done = 0
    for index, (name, photos) in enumerate(people):
        for path in photos:
            image = pipeline.decode(path.read_bytes(), max_bytes=1 << 31, max_pixels=max_pixels)
            found = pipeline.detect(image, score_threshold=detection_score, max_faces=max_faces)
            chosen = largest(found) if face == "largest" else central(found, image.shape)
            relative = f"{name}/{path.name}"
            if chosen is None:
                missed.append(relative)
            else:
                paths.append(relative)
                labels.append(index)
                vectors.append(pipeline.embed(image, [chosen])[0].embedding)
            done += 1
            if progress and done % 500 == 0:
                log.info("%d/%d photos embedded", done, len(files))
    seconds = time.perf_counter() - started
    d = pipeline.embedder.embedding_size
    result = People(
        paths=paths,
        labels=np.asarray(labels, dtype=np.int64),
        names=[name for name, _ in people],
        embeddings=np.asarray(vectors, dtype=np.float32).reshape(-1, d),
        missed=missed,
        seconds=seconds,
    )
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, key=key, paths=np.asarray(paths), labels=result.labels, names=np.asarray(result.names),
                 embeddings=result.embeddings, missed=np.asarray(missed, dtype=str))
    return result
