"""The measurements themselves. Each returns plain rows (dicts) that __main__ prints and writes to BENCHMARKS.md."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.harness import ServerProcess, load, measure

log = logging.getLogger(__name__)

FRAME_SIZES = ((640, 480), (1280, 720), (1920, 1080))  # width, height


def frame(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """A width x height frame from a photo: centre crop to the aspect ratio, then resize (INTER_AREA)."""
    h, w = image.shape[:2]
    target = width / height
    if w / h > target:
        cw = round(h * target)
        image = image[:, (w - cw) // 2 : (w - cw) // 2 + cw]
    else:
        ch = round(w / target)
        image = image[(h - ch) // 2 : (h - ch) // 2 + ch]
    interpolation = cv2.INTER_AREA if image.shape[1] > width else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(image, (width, height), interpolation=interpolation))


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def letterbox(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """A width x height frame holding the whole photo: resized to fit, centred on a mid-grey background (a
    portrait keeps its whole face, which a centre crop to 4:3 would cut)."""
    scale = min(width / image.shape[1], height / image.shape[0])
    w, h = round(image.shape[1] * scale), round(image.shape[0] * scale)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    canvas = np.full((height, width, 3), 128, np.uint8)
    top, left = (height - h) // 2, (width - w) // 2
    canvas[top : top + h, left : left + w] = cv2.resize(image, (w, h), interpolation=interpolation)
    return canvas


def fit(image: np.ndarray, long_side: int) -> np.ndarray:
    scale = long_side / max(image.shape[:2])
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


# --- models in process --------------------------------------------------------------------------------------


def detector_latency(detector_path: Path, frames: dict, threads: tuple[int, ...], repeat: int) -> list[dict]:
    """RetinaFaceDetector.detect (resize, normalise, network, decode, NMS) and the network alone, per frame."""
    from service.detector import RetinaFaceDetector
    from service.onnx_model import session_options

    rows = []
    for n in threads:
        detector = RetinaFaceDetector(detector_path, session_options(n, 1))
        for (w, h), image in frames.items():
            blob, _ = detector._prepare(image)  # the exact tensor detect() feeds, to time the network alone
            full = measure(lambda image=image, d=detector: d.detect(image), repeat)
            net = measure(lambda blob=blob, d=detector: d.session.run(None, {"input": blob}), repeat)
            faces = len(detector.detect(image).boxes)
            rows.append({"frame": f"{w}x{h}", "threads": n, "input": f"{blob.shape[3]}x{blob.shape[2]}",
                         "detect_ms": full.p50, "detect_p95_ms": full.p95, "network_ms": net.p50, "faces": faces})
    return rows


def embedder_latency(embedder_path: Path, crop: np.ndarray, batches: tuple[int, ...], threads: tuple[int, ...],
                     repeat: int) -> list[dict]:
    """Embedder.embed on `batch` aligned crops (preprocess, network, L2-normalise); per-face time."""
    from service.embedder import Embedder
    from service.onnx_model import session_options

    rows = []
    for n in threads:
        embedder = Embedder(embedder_path, session_options(n, 1))
        for batch in batches:
            crops = np.repeat(crop[None], batch, axis=0)
            t = measure(lambda crops=crops, e=embedder: e.embed(crops), max(3, repeat // max(1, batch // 4)))
            rows.append({"threads": n, "batch": batch, "batch_ms": t.p50, "per_face_ms": t.p50 / batch,
                         "flip": embedder.flip})
    return rows


def gallery_search(sizes: tuple[int, ...], embedding_size: int, model_sha256: str, query: np.ndarray,
                   workdir: Path, repeat: int) -> list[dict]:
    """Gallery.search (top 5) over synthetic unit embeddings, one face per identity.

    The gallery file is filled by one bulk INSERT in the Gallery's own schema (not through /enroll: each
    enrolment is an fsync-ed transaction, which at a million faces would take hours), then opened by the Gallery
    class exactly as the server opens it; the load time is reported too. Timed twice: exact search (no index), and
    as the server searches with its default settings (the ANN index from FACE_GALLERY_INDEX_MIN_IDENTITIES on):
    the index is built and persisted first, so the server started on the file afterwards finds it ready instead of
    building it while it is measured.
    """
    from service.gallery import Gallery
    from service.template_index import IndexOptions

    rows = []
    for n in sizes:
        path = workdir / f"gallery-{n}.db"
        fill_seconds = fill_gallery(path, n, embedding_size, model_sha256)
        started = time.perf_counter()
        gallery = Gallery(path, model_sha256, embedding_size)
        load_seconds = time.perf_counter() - started
        t = measure(lambda g=gallery: g.search(query[None], top_k=5, threshold=None), repeat)
        gallery.close()
        served = Gallery(path, model_sha256, embedding_size, index=IndexOptions())
        indexed = served.wait_for_index()
        s = measure(lambda g=served: g.search(query[None], top_k=5, threshold=None), repeat)
        served.close()
        rows.append({"faces": n, "search_ms": t.p50, "search_p95_ms": t.p95, "load_s": load_seconds,
                     "served_ms": s.p50, "served_p95_ms": s.p95, "indexed": indexed,
                     "fill_s": fill_seconds, "db_mb": path.stat().st_size / 2**20, "path": path})
    return rows


def fill_gallery(path: Path, n: int, d: int, model_sha256: str, seed: int = 0) -> float:
    """Write n random unit embeddings (one identity each) into a new gallery file; returns seconds taken."""
    from service.gallery import Gallery

    if path.exists():
        path.unlink()
    Gallery(path, model_sha256, d).close()  # creates the schema
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    db = sqlite3.connect(str(path), isolation_level=None)
    # A bulk load of a new file: no journal, no fsync (a crash just means filling it again). The Gallery set
    # WAL mode when it created the file; it is switched back after the load.
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    now = time.time()
    for start in range(0, n, 50_000):
        k = min(50_000, n - start)
        x = rng.standard_normal((k, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [f"synthetic-{start + i:07d}" for i in range(k)]
        db.executemany("INSERT INTO identities (id, display_name, metadata, created_at) VALUES (?, NULL, '{}', ?)",
                       [(i, now) for i in ids])
        db.executemany(
            "INSERT INTO faces (face_id, identity_id, model_sha256, embedding, created_at, source) "
            "VALUES (?, ?, ?, ?, ?, NULL)",
            [(f"{start + j:032x}", i, model_sha256, x[j].astype("<f4").tobytes(), now) for j, i in enumerate(ids)],
        )
    db.execute("COMMIT")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    return time.perf_counter() - started


# --- over HTTP against a real server process ----------------------------------------------------------------


def http_suite(env: dict[str, str], detect_jpeg: bytes, verify_jpegs: tuple[bytes, bytes],
               concurrencies: tuple[int, ...], requests: dict[int, int]) -> dict:
    """/detect and /verify at each concurrency, plus the server's start-up time and resident memory."""
    rows = []
    with ServerProcess(env) as server:
        memory = {"rss_idle_mb": server.rss_mb()[0], "startup_s": server.startup_seconds}

        def detect(client):
            return client.post("/detect", files={"image": ("frame.jpg", detect_jpeg, "image/jpeg")})

        def verify(client):
            return client.post("/verify", files={"image1": ("a.jpg", verify_jpegs[0], "image/jpeg"),
                                                 "image2": ("b.jpg", verify_jpegs[1], "image/jpeg")})

        for name, request in (("/detect", detect), ("/verify", verify)):
            for c in concurrencies:
                result = load(server.url, request, c, requests[c])
                rows.append({"endpoint": name, "concurrency": c, "requests": result.requests,
                             "errors": result.errors, "p50_ms": result.latency.p50, "p95_ms": result.latency.p95,
                             "p99_ms": result.latency.p99, "rps": result.throughput})
        memory["rss_after_load_mb"], memory["rss_peak_mb"] = server.rss_mb()
    return {"rows": rows, "memory": memory}


def identify_http(env: dict[str, str], galleries: list[dict], query_jpeg: bytes, requests: int) -> list[dict]:
    """/identify (one face, top 5) at concurrency 1 against a server started on each prefilled gallery."""
    rows = []
    for g in galleries:
        with ServerProcess({**env, "FACE_GALLERY_PATH": str(g["path"])}) as server:
            def identify(client):
                return client.post("/identify", files={"image": ("q.jpg", query_jpeg, "image/jpeg")})

            result = load(server.url, identify, 1, requests)
            rss, peak = server.rss_mb()
            rows.append({"faces": g["faces"], "p50_ms": result.latency.p50, "p95_ms": result.latency.p95,
                         "errors": result.errors, "rss_mb": rss, "rss_peak_mb": peak,
                         "startup_s": server.startup_seconds})
    return rows


# --- the peer: face_recognition (dlib) -----------------------------------------------------------------------


def peer_suite(frames: dict, portrait_bgr: np.ndarray, repeat: int, cnn_sizes: tuple, cnn_repeat: int) -> dict:
    """face_recognition with its defaults (upsample 1): HOG at every frame size, CNN at `cnn_sizes`,
    and the 128-d descriptor per face (`face_encodings`, 5-point landmarks, 1 jitter)."""
    from benchmarks import peer

    fr = peer.load()
    import dlib

    rows = []
    for (w, h), image in frames.items():
        rgb = np.ascontiguousarray(image[..., ::-1])
        t = measure(lambda rgb=rgb: fr.face_locations(rgb, model="hog"), repeat, warmup=1)
        rows.append({"detector": "HOG", "frame": f"{w}x{h}", "ms": t.p50,
                     "faces": len(fr.face_locations(rgb, model="hog"))})
    for w, h in cnn_sizes:
        rgb = np.ascontiguousarray(frames[(w, h)][..., ::-1])
        t = measure(lambda rgb=rgb: fr.face_locations(rgb, model="cnn"), cnn_repeat, warmup=0)
        rows.append({"detector": "CNN (mmod)", "frame": f"{w}x{h}", "ms": t.p50,
                     "faces": len(fr.face_locations(rgb, model="cnn"))})
    rgb = np.ascontiguousarray(portrait_bgr[..., ::-1])
    boxes = fr.face_locations(rgb, model="hog")[:1]
    descriptor = None
    if boxes:
        t = measure(lambda: fr.face_encodings(rgb, known_face_locations=boxes), repeat, warmup=1)
        descriptor = t.p50
    return {"detectors": rows, "descriptor_ms": descriptor, "dlib": dlib.__version__}


# --- JPEG decoding (service/images.py) -----------------------------------------------------------------------


def jpeg_decoders(photo_path: Path, repeat: int) -> list[dict]:
    """JPEG bytes -> BGR array with the libraries we could serve with, on a real photo at three sizes: OpenCV's
    imdecode (what the service used before), simplejpeg in strict mode (what it uses: libjpeg-turbo, refusing
    truncated data), Pillow. `max_diff` is the largest pixel difference from OpenCV's result."""
    import simplejpeg

    try:
        from PIL import Image
    except ImportError:  # the [bench] extra brings Pillow
        Image = None
    import io

    original = photo_path.read_bytes()
    image = cv2.imdecode(np.frombuffer(original, np.uint8), cv2.IMREAD_COLOR)
    inputs = {f"{image.shape[1]}x{image.shape[0]} (the photo)": original}
    for width, height in ((640, 480), (5000, 4000)):
        inputs[f"{width}x{height}"] = jpeg(cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC), 95)

    decoders = {
        "OpenCV imdecode": lambda data: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
        "simplejpeg (strict)": lambda data: simplejpeg.decode_jpeg(data, colorspace="BGR", strict=True),
    }
    if Image is not None:
        decoders["Pillow"] = lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[:, :, ::-1]
    rows = []
    for name, data in inputs.items():
        reference = decoders["OpenCV imdecode"](data)
        baseline = None
        for decoder, fn in decoders.items():
            timing = measure(lambda fn=fn, data=data: fn(data), repeat, max_seconds=20)
            diff = int(np.abs(fn(data).astype(np.int16) - reference).max())
            baseline = baseline or timing.p50
            rows.append({"image": name, "bytes": len(data), "decoder": decoder, "ms": timing.p50,
                         "ratio": timing.p50 / baseline, "max_diff": diff})
    return rows
