"""Prometheus metrics: request counts and latencies per endpoint, and time spent per pipeline stage.

Each app owns its own CollectorRegistry (not prometheus-client's global one), so several apps in one process
(tests) do not collide. Endpoints are labelled by their route template (`/identities/{identity_id}`), never by
the raw path, and methods outside the standard set as "other", so the label set stays bounded whatever clients
send.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STAGES = ("decode", "detect", "align", "embed", "search")

# Seconds. Stages of a CPU face pipeline run from ~0.1 ms (search) to ~1 s (a 40 MP decode).
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "face_http_requests_total",
            "HTTP requests by endpoint, method and status code.",
            ("endpoint", "method", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "face_http_request_duration_seconds",
            "End-to-end request latency, by endpoint.",
            ("endpoint", "method"),
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.stage_latency = Histogram(
            "face_stage_duration_seconds",
            "Time spent per pipeline stage (decode, detect, align, embed, search), per call.",
            ("stage",),
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.faces = Counter(
            "face_faces_processed_total", "Faces detected in accepted images.", registry=self.registry
        )
        self.gallery_faces = Gauge(
            "face_gallery_faces", "Faces in the gallery made by the loaded embedder.", registry=self.registry
        )
        self.pixels_in_flight = Gauge(
            "face_pixels_in_flight",
            "Decoded-image pixels reserved by requests in progress (FACE_MAX_PIXELS_IN_FLIGHT bounds it).",
            registry=self.registry,
        )
        self.requests_waiting = Gauge(
            "face_requests_waiting", "Requests queued for image memory (service/admission.py).",
            registry=self.registry,
        )
        # Video streams (WebSocket /stream, service/api/stream.py).
        self.streams_open = Gauge("face_streams_open", "WebSocket /stream connections open.", registry=self.registry)
        self.stream_frames = Counter(
            "face_stream_frames_total",
            "Stream frames by outcome: received; processed (answered); dropped (a newer frame replaced it while "
            "the stream was busy: latest frame wins); rate_limited (over FACE_STREAM_MAX_FPS); failed (an error "
            "answer: undecodable, too large).",
            ("outcome",),
            registry=self.registry,
        )
        self.stream_latency = Histogram(
            "face_stream_frame_seconds",
            "Stream frames: from receipt to answer sent (queueing included).",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.stream_embeddings = Counter(
            "face_stream_embeddings_total", "Faces embedded by streams (new tracks and re-embeddings).",
            registry=self.registry,
        )
        self.stream_closes = Counter(
            "face_stream_closes_total", "Streams closed by the server, by close code.", ("code",),
            registry=self.registry,
        )
        for outcome in ("received", "processed", "dropped", "rate_limited", "failed"):
            self.stream_frames.labels(outcome)
        for stage in STAGES:  # export every stage from the start, so dashboards see zeros, not gaps
            self.stage_latency.labels(stage)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_latency.labels(name).observe(time.perf_counter() - start)

    def observe_stage(self, name: str, seconds: float) -> None:
        self.stage_latency.labels(name).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# The methods of RFC 9110, and PATCH. HTTP allows any token as a method, and a label per token would let
# clients create series without bound (the route answers 405, but the series would stay).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def method_label(method: str) -> str:
    return method if method in _METHODS else "other"


def route_template(scope: Scope, static_paths: frozenset[str] = frozenset()) -> str:
    """The matched route's path template. A request answered before routing (413 from the body limit) is
    labelled by its path only when that is one of `static_paths`, else "unmatched": a label per raw path
    would let any client grow the metrics without bound."""
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return route.path
    path = scope.get("path", "")
    return path if path in static_paths else "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times every HTTP request, including those that fail early."""

    def __init__(self, app: ASGIApp, metrics: Metrics, static_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.metrics = metrics
        self.static_paths = static_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            endpoint = route_template(scope, self.static_paths)
            method = method_label(scope["method"])
            self.metrics.requests.labels(endpoint, method, str(status)).inc()
            self.metrics.latency.labels(endpoint, method).observe(time.perf_counter() - start)
