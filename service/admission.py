"""Admission control: a budget of decoded pixels in flight, so that concurrent uploads cannot exhaust memory.

Every request's images are checked against FACE_MAX_IMAGE_PIXELS one by one, but a decoded image lives until
its request is done, and a busy server holds many requests at once: sixteen clients each sending a 25 MP photo
would hold 1.2 GB of decoded pixels (3 bytes each, before OpenCV's own decode buffers), past a typical
container limit. So a request reserves its images' pixel count, read from their headers before anything is
decoded, and waits while the budget is spent. Waiters are served first come, first served (a large request is
not starved by a stream of small ones), and a request larger than the whole budget still runs, alone.

A request that waits longer than the queue timeout is answered 503 `busy` with a Retry-After header: a clear
answer a client can act on, instead of a connection that hangs while the queue drains.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from service.errors import FaceServiceError


class Busy(FaceServiceError):
    """The server's budget of images in flight stayed spent for the whole queue timeout."""

    code = "busy"
    status = 503

    def __init__(self, message: str, *, retry_after_s: float, details: dict | None = None):
        super().__init__(message, details=details)
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}


class PixelBudget:
    """At most `capacity` pixels reserved at once (one request alone may exceed it); FIFO waiting.

    Not thread-safe: it lives on the event loop, as the routers that use it do.
    """

    def __init__(self, capacity: int, timeout_s: float):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = int(capacity)
        self.timeout_s = float(timeout_s)
        self.in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _fits(self, pixels: int) -> bool:
        return self.in_use == 0 or self.in_use + pixels <= self.capacity

    def _grant(self) -> None:
        """Admit waiters from the head of the queue while they fit; never overtake the head."""
        while self._waiters and self._fits(self._waiters[0][0]):
            pixels, future = self._waiters.popleft()
            self.in_use += pixels
            future.set_result(None)

    def _release(self, pixels: int) -> None:
        self.in_use -= pixels
        self._grant()

    @asynccontextmanager
    async def reserve(self, pixels: int) -> AsyncIterator[None]:
        pixels = max(0, int(pixels))
        if not self._waiters and self._fits(pixels):
            self.in_use += pixels
        else:
            entry = (pixels, asyncio.get_running_loop().create_future())
            self._waiters.append(entry)
            try:
                await asyncio.wait_for(entry[1], self.timeout_s)
            except BaseException as exc:  # timed out, or the client went away (cancelled)
                if entry[1].done() and not entry[1].cancelled():
                    self._release(pixels)  # granted just as we gave up: hand it on
                else:
                    entry[1].cancel()
                    if entry in self._waiters:
                        self._waiters.remove(entry)
                    self._grant()  # the head may have been us: whoever is behind may fit now
                if isinstance(exc, TimeoutError | asyncio.TimeoutError):
                    raise Busy(
                        f"the server is busy: {self.waiting} request(s) waiting for image memory; try again",
                        retry_after_s=self.timeout_s / 4,
                        details={"queued_for_s": self.timeout_s},
                    ) from None
                raise
        try:
            yield
        finally:
            self._release(pixels)
