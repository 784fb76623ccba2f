"""WebSocket /stream: live video in, one JSON answer per processed frame out, faces tracked across frames.

The protocol (README.md, "Video streams"):
- Connect to /stream with options as query parameters (StreamOptions: identify, top_k, threshold, min_score,
  min_face_size, max_faces, embed_every), validated like the REST options. The server first sends
  `{"type": "hello", ...}` (limits, options, the embedder's model id).
- Send each frame as one binary message: JPEG, PNG or WebP bytes, decoded like a REST upload.
- Each processed frame is answered with `{"type": "frame", ...}` (StreamFrame): its number (arrival order),
  faces with a `track_id` and their track's identity, and the dropped-frame counts. A frame that cannot be used
  is answered with `{"type": "error", "frame": n, "error": {code, message, details}}` and the stream goes on.
- Coarse frames: while every face in view is large (COARSE_MIN_FACE) and already embedded, frames are searched
  for faces at half the detector's working size, a quarter of its cost, except every
  FACE_STREAM_FULL_DETECTION_EVERY-th frame, searched at full size so that a small face coming into view is found
  within that many frames. Faces are embedded only from full-size frames (landmarks found at half size are a few
  pixels less exact), and a new face or a face that shrinks sends the next frame back to full size. Each answer
  says which (`detector_side`).
- Latency never grows: while a frame is processed, a newer frame replaces the one waiting (latest frame wins),
  and the replaced one is counted as dropped. So a client that sends faster than the server processes gets
  answers for the newest frames only, never a queue of old ones.

The API key (when FACE_API_KEYS is set) comes with the upgrade request: `X-API-Key` or `Authorization: Bearer`
where the client can set headers; a browser cannot, so it offers the subprotocols `facerec` and
`key.<KEY>` (`new WebSocket(url, ["facerec", "key." + key])`), or, last, `?api_key=<KEY>` (which access logs
and proxies record, hence last). The server accepts the connection and then refuses what it must with a close
code and reason, after an error message saying why: a browser sees neither the status nor the body of a refused
upgrade, only a close code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from service.api.runtime import Runtime
from service.api.schemas import (
    IdentityMatch,
    ImageInfo,
    StreamFace,
    StreamFrame,
    StreamOptions,
    TrackIdentity,
    face_out,
)
from service.errors import FaceServiceError
from service.metrics import Metrics
from service.pipeline import Face
from service.security import key_matches
from service.settings import Settings
from service.tracking import Track, Tracker, sharpness

log = logging.getLogger(__name__)

router = APIRouter()

SUBPROTOCOL = "facerec"
KEY_SUBPROTOCOL_PREFIX = "key."
KEY_QUERY_PARAMETER = "api_key"
# A track's identity is searched again at least this often even without a new embedding: an identity enrolled
# (or deleted) while the face is in view shows within this time.
RESEARCH_S = 1.0

# Coarse frames need every face in view at least this large (px, shorter box side) at the detector's working size,
# that is in the frame as the detector sees it, shrunk to its working side: at half size it is still 48 px, three
# times RetinaFace's smallest anchor (16 px), where the detector finds faces as reliably as at full size. Measured
# in the frame's own pixels instead, a 130 px face in a 3840x2160 frame (22 px at the working size, 11 at half)
# vanished from every coarse frame.
COARSE_MIN_FACE = 96

# Close codes: 4000 + the HTTP status the same refusal gets over REST; 1001/1009/1011 are the protocol's own.
CLOSE_UNAUTHORIZED = 4401
CLOSE_IDLE = 4408
CLOSE_INVALID_OPTIONS = 4422
CLOSE_TOO_MANY_STREAMS = 4429
CLOSE_NOT_READY = 4503
CLOSE_INTERNAL = 1011


class StreamRefused(Exception):
    def __init__(self, close_code: int, code: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.close_code, self.code, self.message, self.details = close_code, code, message, details or {}


@dataclass
class Frame:
    number: int
    data: bytes
    arrived: float  # perf_counter
    dispatched: float = 0.0  # perf_counter when its decoding and detection were started


def _error(frame: int | None, code: str, message: str, details: dict | None = None) -> dict:
    return {"type": "error", "frame": frame, "error": {"code": code, "message": message, "details": details or {}}}


def _reason(text: str) -> str:
    """A close reason must fit 123 bytes of UTF-8."""
    encoded = text.encode()[:123]
    return encoded.decode(errors="ignore")


def _offered_key(websocket: WebSocket) -> str | None:
    headers = websocket.headers
    if key := headers.get("x-api-key"):
        return key
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for protocol in websocket.scope.get("subprotocols", []):
        if protocol.startswith(KEY_SUBPROTOCOL_PREFIX) and len(protocol) > len(KEY_SUBPROTOCOL_PREFIX):
            return protocol[len(KEY_SUBPROTOCOL_PREFIX):]
    return websocket.query_params.get(KEY_QUERY_PARAMETER) or None


def _check_key(websocket: WebSocket, settings: Settings) -> None:
    if not settings.api_keys:
        return
    key = _offered_key(websocket)
    if not key:
        raise StreamRefused(
            CLOSE_UNAUTHORIZED, "unauthorized",
            "an API key is required: X-API-Key or Authorization: Bearer on the upgrade request, or the "
            "subprotocol key.<KEY> (with facerec) from a browser",
        )
    if not key_matches(key, settings.api_keys):
        raise StreamRefused(CLOSE_UNAUTHORIZED, "unauthorized", "the API key is not valid")


def _options(websocket: WebSocket) -> StreamOptions:
    # `query_params.items()` keeps only the last of a repeated option; REST refuses a repeat (uploads.read_request).
    raw: dict[str, str] = {}
    for key, value in websocket.query_params.multi_items():
        if key == KEY_QUERY_PARAMETER:
            continue
        if key in raw:
            raise StreamRefused(
                CLOSE_INVALID_OPTIONS, "invalid_parameter", f"invalid parameter: {key} given more than once",
                {"errors": [{"field": key, "message": "given more than once", "type": "repeated"}]},
            )
        raw[key] = value
    try:
        return StreamOptions.model_validate(raw)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]) or None, "message": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False)
        ]
        summary = "; ".join(f"{e['field'] or 'options'}: {e['message']}" for e in errors)
        raise StreamRefused(
            CLOSE_INVALID_OPTIONS, "invalid_parameter", f"invalid parameter: {summary}", {"errors": errors}
        ) from None


@router.websocket("/stream")
async def stream(websocket: WebSocket) -> None:
    app = websocket.app
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    counted = False
    try:
        _check_key(websocket, settings)
        options = _options(websocket)
        runtime: Runtime | None = app.state.runtime
        if runtime is None:
            raise StreamRefused(CLOSE_NOT_READY, "not_ready", "the service is starting or stopping; retry shortly")
        if app.state.streams_open >= settings.stream_max_streams:
            raise StreamRefused(
                CLOSE_TOO_MANY_STREAMS, "too_many_streams",
                f"at most {settings.stream_max_streams} streams at once (FACE_STREAM_MAX_STREAMS); retry later",
                {"max_streams": settings.stream_max_streams},
            )
        app.state.streams_open += 1
        metrics.streams_open.inc()
        counted = True
        await StreamSession(websocket, runtime, options).run()
    except StreamRefused as refusal:
        await _close(websocket, metrics, refusal.close_code, _error(None, refusal.code, refusal.message, refusal.details))
    except WebSocketDisconnect:
        pass
    finally:
        if counted:
            app.state.streams_open -= 1
            metrics.streams_open.dec()


async def _close(websocket: WebSocket, metrics: Metrics, close_code: int, message: dict | None = None) -> None:
    """Say why (a last error message), then close with that code and reason; the client may be gone already."""
    metrics.stream_closes.labels(str(close_code)).inc()
    if websocket.application_state != WebSocketState.CONNECTED:
        return
    try:
        reason = ""
        if message is not None:
            await websocket.send_json(message)
            reason = f"{message['error']['code']}: {message['error']['message']}"
        await websocket.close(close_code, reason=_reason(reason))
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass


class StreamSession:
    """One open stream, three tasks: receiving (keeps only the newest waiting frame), detecting (decodes and
    detects up to `depth` frames at once, in the inference pool) and finishing (tracks, embeds, searches and
    answers them one at a time, in arrival order: the tracker needs them in order).

    Why more than one frame at a time: one frame at a time, a stream uses one inference worker, one core, and
    detection is most of a frame's cost. With FACE_STREAM_FRAMES_IN_FLIGHT = 2 a stream that is the only one open
    can keep two workers busy; with other streams open each has one frame in flight, since extra frames would
    only queue in the shared pool and add to everyone's latency. The default is 1: on a busy machine, where no
    core is idle, two frames in flight took twice as long each (BENCHMARKS.md, "Video streams").
    """

    def __init__(self, websocket: WebSocket, runtime: Runtime, options: StreamOptions):
        self.ws = websocket
        self.runtime = runtime
        self.settings = runtime.settings
        self.metrics = runtime.metrics
        self.options = options
        self.tracker = Tracker(embed_every=options.embed_every or self.settings.stream_embed_every)
        self.pending: Frame | None = None
        self.wake = asyncio.Event()
        self.received = self.processed = self.dropped = self.rate_limited = 0
        self.send_lock = asyncio.Lock()
        self.in_flight = 0  # frames dispatched and not answered yet
        self.last_message = time.monotonic()
        # One frame at a time, its whole analysis is one job on the inference pool; with more in flight, decoding
        # and detection are one job (several at once) and tracking and embedding another (in order). Each job is
        # a hand-over between the event loop and a worker thread, and under load every hand-over waits for the
        # GIL and the OS scheduler, so the fewer the better.
        self.split = self.settings.stream_frames_in_flight > 1
        self.detected: asyncio.Queue[tuple[Frame, asyncio.Future]] = asyncio.Queue()
        # Coarse frames (module docstring): allowed after a frame whose faces were all large and embedded; a full
        # frame at least every `full_every`.
        detector = runtime.pipeline.detector
        self.full_every = self.settings.stream_full_detection_every if detector.resizable else 1
        self.full_side = detector.working_side
        self.coarse_allowed = False
        self.coarse_run = 0  # coarse frames dispatched since the last full one
        # Token bucket for FACE_STREAM_MAX_FPS: one second of burst.
        self.tokens = self.settings.stream_max_fps
        self.refilled = time.monotonic()

    async def run(self) -> None:
        await self.send(
            {
                "type": "hello",
                "model_sha256": self.runtime.embedder.model_id,
                "options": self.options.model_dump(),
                "limits": {
                    "max_frame_bytes": self.settings.stream_max_frame_bytes,
                    "max_frame_pixels": self.settings.stream_max_frame_pixels,
                    "max_fps": self.settings.stream_max_fps,
                    "idle_timeout_s": self.settings.stream_idle_timeout_s,
                },
            }
        )
        tasks = {
            asyncio.create_task(self.receive_frames()),
            asyncio.create_task(self.detect_frames()),
            asyncio.create_task(self.finish_frames()),
            asyncio.create_task(self.watch_idle()),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            while not self.detected.empty():  # detections still running for frames nobody will answer
                self.detected.get_nowait()[1].cancel()
        for task in done:
            error = task.exception()
            if isinstance(error, StreamRefused):
                raise error
            if error is not None and not isinstance(error, WebSocketDisconnect):
                log.error("stream failed", exc_info=error)
                await _close(self.ws, self.metrics, CLOSE_INTERNAL, _error(None, "internal_error", "internal error"))

    async def send(self, message: dict) -> None:
        async with self.send_lock:
            await self.ws.send_json(message)

    def _within_rate(self) -> bool:
        now = time.monotonic()
        fps = self.settings.stream_max_fps
        self.tokens = min(fps, self.tokens + (now - self.refilled) * fps)
        self.refilled = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    async def receive_frames(self) -> None:
        while True:
            # No wait_for per message (a task and a timer each, at up to FACE_STREAM_MAX_FPS a second): the idle
            # timeout is watched by its own task (watch_idle).
            message = await self.ws.receive()
            self.last_message = time.monotonic()
            if message["type"] == "websocket.disconnect":
                return
            self.received += 1
            number = self.received
            self.metrics.stream_frames.labels("received").inc()
            data = message.get("bytes")
            if data is None:
                self.metrics.stream_frames.labels("failed").inc()
                await self.send(_error(number, "invalid_frame", "send each frame as a binary message (JPEG, PNG or WebP bytes)"))
                continue
            if not self._within_rate():
                self.rate_limited += 1
                self.metrics.stream_frames.labels("rate_limited").inc()
                continue
            limit = self.settings.stream_max_frame_bytes
            if len(data) > limit:
                self.metrics.stream_frames.labels("failed").inc()
                await self.send(_error(number, "image_too_large", f"a frame is limited to {limit} bytes",
                                       {"max_frame_bytes": limit, "frame_bytes": len(data)}))
                continue
            if self.pending is not None:  # latest frame wins
                self.dropped += 1
                self.metrics.stream_frames.labels("dropped").inc()
            self.pending = Frame(number, data, time.perf_counter())
            if self.in_flight < self._depth():  # else the answer of the frame in flight wakes the dispatcher
                self.wake.set()

    async def watch_idle(self) -> None:
        timeout = self.settings.stream_idle_timeout_s
        while True:
            idle = time.monotonic() - self.last_message
            if idle >= timeout:
                raise StreamRefused(CLOSE_IDLE, "idle_timeout", f"no frame for {timeout:g} s")
            await asyncio.sleep(timeout - idle)

    def _depth(self) -> int:
        alone = self.ws.app.state.streams_open <= 1
        return self.settings.stream_frames_in_flight if alone else 1

    async def detect_frames(self) -> None:
        while True:
            while self.pending is None or self.in_flight >= self._depth():
                self.wake.clear()
                await self.wake.wait()  # set by a new frame, and by each answered one
            frame, self.pending = self.pending, None
            frame.dispatched = time.perf_counter()
            self.in_flight += 1
            if self.split:
                detecting = asyncio.ensure_future(self.runtime.infer(self._detect, frame.data))
            else:
                detecting = asyncio.ensure_future(self.runtime.infer(self._whole, frame.data))
            self.detected.put_nowait((frame, detecting))

    async def finish_frames(self) -> None:
        while True:
            frame, detecting = await self.detected.get()
            try:
                try:
                    answer = await self.answer(frame, *await detecting)
                except FaceServiceError as exc:
                    self.metrics.stream_frames.labels("failed").inc()
                    await self.send(_error(frame.number, exc.code, exc.message, exc.details))
                    continue
                await self.send(answer)
                self.metrics.stream_frames.labels("processed").inc()
                self.metrics.stream_latency.observe(time.perf_counter() - frame.arrived)
            finally:
                self.in_flight -= 1
                self.wake.set()

    def _detect(self, data: bytes) -> tuple[np.ndarray, list[Face], int]:
        """On an inference thread: decode and detect (the part of a frame that runs `depth` frames at once); with
        the side, in pixels, the frame was searched at."""
        settings, options, runtime = self.settings, self.options, self.runtime
        image = runtime.pipeline.decode(data, max_bytes=settings.stream_max_frame_bytes,
                                        max_pixels=settings.stream_max_frame_pixels)
        score = options.min_score if options.min_score is not None else settings.detection_score_threshold
        limit = min(options.max_faces or settings.max_faces, settings.max_faces)
        side = self._full_side_of(image)
        # A frame too small to halve (the detector searches no less than 32 px) is searched whole.
        if self.coarse_allowed and self.coarse_run < self.full_every - 1 and side >= 64:
            self.coarse_run += 1
            side //= 2
        else:
            self.coarse_run = 0
        faces = runtime.pipeline.detect(image, score_threshold=score, min_face_size=options.min_face_size,
                                        max_faces=limit, max_side=side)
        return image, faces, side

    def _full_side_of(self, image: np.ndarray) -> int:
        """The longer side a full-size search of this frame looks at: the detector's working size, or the frame's
        own when it is smaller."""
        return min(self.full_side, max(image.shape[:2]))

    def _whole(self, data: bytes) -> tuple[np.ndarray, list[Face], int, list[Track], set[int]]:
        image, faces, side = self._detect(data)
        self.processed += 1  # safe here: with one frame in flight, no other job of this stream runs
        return image, faces, side, *self._track(image, faces, self.processed, side)

    async def answer(
        self, frame: Frame, image: np.ndarray, faces: list[Face], side: int, tracks: list[Track] | None = None,
        embedded: set[int] | None = None,
    ) -> dict:
        if tracks is None or embedded is None:
            self.processed += 1
            tracks, embedded = await self.runtime.infer(self._track, image, faces, self.processed, side)
        if self.options.identify:
            await self._search(tracks, embedded)
        out = [
            StreamFace(
                **face_out(face).model_dump(),
                track_id=track.track_id,
                embedded=track.track_id in embedded,
                identity=track.identity,
            )
            for face, track in zip(faces, tracks)
        ]
        return StreamFrame(
            frame=frame.number,
            image=ImageInfo(width=image.shape[1], height=image.shape[0]),
            detector_side=side,
            faces=out,
            dropped=self.dropped,
            rate_limited=self.rate_limited,
            queued_ms=round((frame.dispatched - frame.arrived) * 1000, 2),
            process_ms=round((time.perf_counter() - frame.dispatched) * 1000, 2),
        ).model_dump()

    def _track(self, image: np.ndarray, faces: list[Face], number: int, side: int
               ) -> tuple[list[Track], set[int]]:
        """On an inference thread, one frame at a time in arrival order: track, and embed the faces that need it
        (from full-size frames only)."""
        boxes = np.array([f.box for f in faces], np.float32).reshape(-1, 4)
        points = np.array([f.landmarks for f in faces], np.float32).reshape(-1, 5, 2)
        tracks = self.tracker.update(number, boxes, points)
        full_side = self._full_side_of(image)
        full = side >= full_side
        chosen: list[tuple[Face, Track, float, float]] = []
        if self.options.identify and faces and full:
            green = image[..., 1]  # sharpness needs one channel, not a colour conversion
            for face, track in zip(faces, tracks):
                sharp = sharpness(green, face.box)
                if self.tracker.needs_embedding(track, number, face.area, sharp):
                    chosen.append((face, track, face.area, sharp))
            self.runtime.pipeline.embed(image, [face for face, *_ in chosen])
            for face, track, area, sharp in chosen:
                self.tracker.add_embedding(track, face.embedding, number, area, sharp)
        # The next frame may be coarse if every face here is large (at the working size) and, when identifying,
        # embedded.
        working_scale = full_side / max(image.shape[:2])
        allowed = bool(faces) and all(
            min(f.width, f.height) * working_scale >= COARSE_MIN_FACE and (t.embeddings or not self.options.identify)
            for f, t in zip(faces, tracks)
        )
        # Only a full frame may allow coarse ones; a coarse frame may only end them. A coarse frame is blind to the
        # small faces that keep frames full, and with two frames in flight one is dispatched before the frame ahead
        # of it is tracked: a coarse frame that followed the full frame which found a small face re-allowed coarse
        # frames, and the small face was then seen on one frame in FACE_STREAM_FULL_DETECTION_EVERY.
        self.coarse_allowed = allowed if full else self.coarse_allowed and allowed
        self.metrics.faces.inc(len(faces))
        self.metrics.stream_embeddings.inc(len(chosen))
        return tracks, {track.track_id for _, track, *_ in chosen}

    async def _search(self, tracks: list[Track], embedded: set[int]) -> None:
        """Search the gallery for the tracks with a new embedding, and for those last searched RESEARCH_S ago."""
        now = time.monotonic()
        due = [
            t for t in tracks
            if t.embeddings and (t.track_id in embedded or now - t.searched_at >= RESEARCH_S)
        ]
        if not due:
            return
        queries = np.stack([t.identity_embedding() for t in due])
        decision, results = await self.runtime.identify(queries, self.options.top_k, self.options.threshold)
        for track, matches in zip(due, results):
            track.searched_at = now
            track.identity = TrackIdentity(
                embeddings=len(track.embeddings),
                threshold=decision.threshold,
                matches=[
                    IdentityMatch(
                        identity_id=m.identity_id, similarity=m.similarity, faces=m.faces, display_name=m.display_name
                    )
                    for m in matches
                ],
            )
