"""What the routers work with: the loaded models, the gallery, and the thread pools that run them.

The event loop never blocks: image decoding and ONNX Runtime run in the inference pool (FACE_INFERENCE_WORKERS
threads; ORT and OpenCV release the GIL), the gallery in its own pool: one thread for SQLite (one writer at a
time is what SQLite allows anyway), one per pooled connection for PostgreSQL. Each stage is timed into the
`face_stage_duration_seconds` histogram.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import Depends, Request

from service.admission import PixelBudget
from service.api.schemas import DetectionOptions
from service.api.uploads import ImageUpload
from service.decision import Decision, IdentifyPolicy
from service.detector import RetinaFaceDetector
from service.embedder import Embedder
from service.errors import FaceServiceError, InvalidParameter, ModelMismatch
from service.gallery import GalleryStore, open_gallery, unservable_identities
from service.images import probe_image
from service.metrics import Metrics
from service.onnx_model import session_options
from service.pipeline import Face, Pipeline
from service.settings import Settings
from service.vectors import parse_embedding

log = logging.getLogger(__name__)

T = TypeVar("T")


class NotReady(FaceServiceError):
    """The models or the gallery are not loaded (start-up or shutdown in progress)."""

    code = "not_ready"
    status = 503


class Runtime:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        pipeline: Pipeline,
        gallery: GalleryStore,
        inference_pool: ThreadPoolExecutor,
        gallery_pool: ThreadPoolExecutor,
    ):
        self.settings = settings
        self.metrics = metrics
        self.pipeline = pipeline
        self.detector = pipeline.detector
        self.embedder = pipeline.embedder
        self.gallery = gallery
        self._inference = inference_pool
        self._gallery = gallery_pool
        self.admission = PixelBudget(settings.max_pixels_in_flight, settings.queue_timeout_s)
        metrics.pixels_in_flight.set_function(lambda: self.admission.in_use)
        metrics.requests_waiting.set_function(lambda: self.admission.waiting)
        if settings.match_threshold is not None:
            self.threshold, self.threshold_source = float(settings.match_threshold), "settings"
        else:
            self.threshold, self.threshold_source = float(self.embedder.threshold), "model"
        # 1:N decisions: the threshold follows the gallery's size to hold the target FPIR (service/decision.py).
        self.identify_policy = IdentifyPolicy(
            self.embedder.far_table, settings.identify_fpir, self.threshold, settings.identify_threshold
        )
        self.identify_warning: str | None = getattr(self.embedder, "far_table_warning", None)
        if settings.identify_threshold is None and self.embedder.far_table is None:
            self.identify_warning = (
                f"{settings.embedder_path.name} carries no face.embedder.far_table: /identify uses the 1:1 "
                "threshold at every gallery size, so the chance of naming a stranger grows with the gallery. "
                "Measure a table with `python -m evaluate identify --write-table`, or set FACE_IDENTIFY_THRESHOLD."
            )
            log.warning(self.identify_warning)

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics) -> Runtime:
        """Load both models and open the gallery; raise (and so refuse to serve) on any problem."""
        options = partial(session_options, settings.intra_op_threads, settings.inter_op_threads)
        loop = asyncio.get_running_loop()
        inference_pool = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix="inference")
        try:
            detector = await loop.run_in_executor(
                inference_pool, partial(RetinaFaceDetector, settings.detector_path, options())
            )
            embedder = await loop.run_in_executor(
                inference_pool,
                partial(Embedder, settings.embedder_path, options(), flip=settings.embed_flip),
            )
            if settings.match_threshold is None and embedder.threshold is None:
                raise ValueError(
                    f"{settings.embedder_path.name} carries no face.embedder.threshold: set FACE_MATCH_THRESHOLD"
                )
            gallery = await asyncio.to_thread(
                open_gallery,
                settings.gallery_url,
                embedder.model_id,
                embedder.embedding_size,
                timeout_s=settings.gallery_timeout_s,
                earlier_ids=embedder.earlier_ids,
                ef_search=settings.gallery_ef_search,
                index=settings.gallery_index_options,
            )
            # SQLite: one thread (one connection, one lock). PostgreSQL: as many as its connection pool holds.
            gallery_pool = ThreadPoolExecutor(gallery.concurrency, thread_name_prefix="gallery")
        except BaseException:
            inference_pool.shutdown(wait=False, cancel_futures=True)
            raise
        pipeline = Pipeline(detector, embedder, stage=metrics.stage)
        runtime = cls(settings, metrics, pipeline, gallery, inference_pool, gallery_pool)
        await runtime.infer(runtime._warm_up)
        await runtime.refresh_gallery_gauge()
        # A scan of every stored identity: seconds at millions, more from a cold disk. Not something to keep the
        # service from answering for: it runs after start-up, on a thread (and, in SQLite, a connection) of its own.
        threading.Thread(target=_report_unservable_rows, args=(gallery,), name="gallery-text-check",
                         daemon=True).start()
        return runtime

    def _warm_up(self) -> None:
        """One inference per model before serving: ORT allocates its buffers and picks kernels on the first
        run, which would otherwise make the first client's request several times slower than the rest."""
        self.detector.detect(np.zeros((480, 640, 3), np.uint8))
        height, width = self.embedder.input_size
        self.embedder.embed(np.zeros((1, height, width, 3), np.uint8))

    async def close(self) -> None:
        """Let running inference finish, then close the gallery (on its own thread) and stop the pools."""
        await asyncio.to_thread(self._inference.shutdown, wait=True)
        await self.in_gallery(self.gallery.close)
        await asyncio.to_thread(self._gallery.shutdown, wait=True)

    # --- running blocking work ----------------------------------------------------------------------
    async def infer(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._inference, partial(fn, *args, **kwargs))

    async def in_gallery(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._gallery, partial(fn, *args, **kwargs))

    # --- pipeline stages ----------------------------------------------------------------------------
    @asynccontextmanager
    async def admitted(self, *uploads: ImageUpload | None) -> AsyncIterator[None]:
        """Hold these images' pixel count (from their headers) against the in-flight budget while the block
        runs: what keeps many concurrent large uploads from exhausting memory. Decode them inside the block.
        An image whose header cannot be read counts zero; its decode fails with the precise error."""
        pixels = 0
        for upload in uploads:
            if upload is not None:
                try:
                    pixels += probe_image(upload.data).pixels
                except FaceServiceError:
                    pass
        async with self.admission.reserve(pixels):
            yield

    async def decode_faces(
        self, upload: ImageUpload, options: DetectionOptions, *, embed: bool, max_faces: int | None = None,
        quality: bool | None = None,
    ) -> tuple[np.ndarray, list[Face]]:
        """The upload decoded, and its faces, best score first, at most FACE_MAX_FACES; with embeddings when
        `embed`, and with their quality when `quality` (default: the request's `quality` option). One trip to an
        inference worker for both: each trip is a hand-over between threads that a request waits for."""
        limit = min(max_faces or self.settings.max_faces, self.settings.max_faces)
        if quality is None:
            quality = getattr(options, "quality", False)
        return await self.infer(self._decode_faces, upload, options, embed, limit, quality)

    def _decode_faces(
        self, upload: ImageUpload, options: DetectionOptions, embed: bool, max_faces: int, quality: bool
    ) -> tuple[np.ndarray, list[Face]]:
        image = self._decode(upload)
        return image, self._faces(image, options, embed, max_faces, quality)

    async def decode_chosen_faces(
        self, upload: ImageUpload, options: DetectionOptions, choose: Callable[[list[Face]], list[Face]], *,
        quality: bool = False,
    ) -> tuple[np.ndarray, list[Face], list[Face]]:
        """The upload decoded, all its faces (not embedded), and those `choose` picks from them, embedded (with
        their quality when `quality`): the faces a request compares or stores, not every face in the photo. One
        trip to an inference worker, `choose` included (it may raise to refuse the photo): a second trip to
        embed would add a hand-over between threads to the request's time (about 0.14 ms here, each)."""
        return await self.infer(self._decode_chosen_faces, upload, options, choose, self.settings.max_faces, quality)

    def _decode_chosen_faces(
        self, upload: ImageUpload, options: DetectionOptions, choose: Callable[[list[Face]], list[Face]],
        max_faces: int, quality: bool,
    ) -> tuple[np.ndarray, list[Face], list[Face]]:
        image, faces = self._decode_faces(upload, options, False, max_faces, False)
        chosen = choose(faces)
        return image, faces, self.pipeline.embed(image, chosen, quality=quality)

    def _decode(self, upload: ImageUpload) -> np.ndarray:
        """Bytes -> BGR image; an error says which upload it was about (field, index, filename)."""
        try:
            return self.pipeline.decode(
                upload.data, max_bytes=self.settings.max_image_bytes, max_pixels=self.settings.max_image_pixels
            )
        except FaceServiceError as exc:
            exc.details = {**upload.describe(), **exc.details}
            exc.message = f"{upload.field}{f'[{upload.index}]' if upload.field == 'images' else ''}: {exc.message}"
            raise

    def _faces(
        self, image: np.ndarray, options: DetectionOptions, embed: bool, max_faces: int, quality: bool
    ) -> list[Face]:
        score = options.min_score if options.min_score is not None else self.settings.detection_score_threshold
        faces = self.pipeline.analyse(
            image, score_threshold=score, min_face_size=options.min_face_size, max_faces=max_faces, embed=embed,
            quality=quality,
        )
        self.metrics.faces.inc(len(faces))
        return faces

    def client_embeddings(self, values: list, model_sha256: str | None, field: str, *, indexed: bool = True) -> np.ndarray:
        """Embeddings a client sends back (from /embed), as (N, D) unit rows: 409 model_mismatch when they were
        made by another model (they are not comparable with this embedder's), 422 when malformed."""
        if model_sha256 is None:
            raise InvalidParameter(
                f"{field} needs model_sha256: the model id /embed reported with it", details={"field": "model_sha256"}
            )
        if model_sha256 != self.embedder.model_id and model_sha256 not in self.embedder.earlier_ids:
            raise ModelMismatch(
                f"{field} was made by model {model_sha256}, but this service embeds with {self.embedder.model_id}: "
                "embeddings of different models are not comparable",
                details={"field": field, "model_sha256": model_sha256, "expected_model_sha256": self.embedder.model_id},
            )
        size = self.embedder.embedding_size
        names = [f"{field}[{i}]" for i in range(len(values))] if indexed else [field]
        return np.stack([parse_embedding(value, size, name) for value, name in zip(values, names)])

    async def identify(
        self, embeddings: np.ndarray, top_k: int, threshold: float | None
    ) -> tuple[Decision, list]:
        """The decision for the gallery as it is now (its searchable identities; `threshold` overrides the
        policy), and the search under it; both on the gallery thread, one after the other."""

        def run():
            with self.metrics.stage("search"):
                decision = self.identify_policy.decide(self.gallery.count_searchable_identities(), threshold)
                return decision, self.gallery.search(embeddings, top_k=top_k, threshold=decision.threshold)

        return await self.in_gallery(run)

    async def identity_similarity(self, identity_id: str, embeddings: np.ndarray) -> np.ndarray:
        def run():
            with self.metrics.stage("search"):
                return self.gallery.identity_similarity(identity_id, embeddings)

        return await self.in_gallery(run)

    async def refresh_gallery_gauge(self) -> None:
        count = getattr(self.gallery, "count_faces", None)
        if count is not None:
            self.metrics.gallery_faces.set(await self.in_gallery(count))


def _report_unservable_rows(gallery) -> None:
    """Start-up check: rows stored before bad text (lone surrogates, NUL) was refused at the door. Reads serve
    them with U+FFFD in their place; the warning names them so that they can be fixed or deleted."""
    try:
        bad = unservable_identities(gallery)
    except Exception as exc:  # noqa: BLE001 - whichever store: it closed under the scan (shutdown), or is gone
        log.warning("the start-up check of stored identities' text did not finish: %s", exc)
        return
    if bad:
        log.warning(
            "%d identities hold text that is not valid Unicode (served with U+FFFD in its place): %s%s",
            len(bad), ", ".join(bad[:20]), " ..." if len(bad) > 20 else "",
        )


async def get_runtime(request: Request) -> Runtime:
    # async, though it awaits nothing: FastAPI runs a plain `def` dependency in its thread pool, a hop through
    # another thread on every request for what is an attribute lookup.
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReady("the service is starting or stopping; retry shortly")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
