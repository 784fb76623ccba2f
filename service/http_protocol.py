"""The HTTP/1.1 connection uvicorn serves (its h11 protocol), with two things it leaves out.

- A header timeout. uvicorn's keep-alive timeout closes a connection that stays idle after a response, but a
  new connection that sends its request line and headers one byte a second is held for as long as the client
  likes (slowloris): sixteen such connections were held for 30 s with no end in sight. Here a connection gets
  `header_timeout_s` from its start (and from the end of each response) to deliver complete headers, or is
  answered 408 `request_timeout` and closed. Bodies are timed by service.app.BodyLimitMiddleware.
- The documented error shape for malformed framing (`Content-Length: -1`, two different Content-Length
  headers, a broken request line): h11 refuses these before there is any request for the app to see, and
  uvicorn answers them in plain text; here they get `{"error": {"code": "bad_request", ...}}` like every other
  error.
- WebSocket upgrades the WebSocket layer would refuse for their size. uvicorn hands an upgrade request to
  websockets' parser, which refuses a request line or header line over 8 KiB (or more than 128 headers) with a
  414/431 that uvicorn (0.54, with websockets 17) never writes out: the client waits for an answer forever and the
  connection stays open (twenty such connections were all still held after 40 s). Such requests are answered
  here, 414 `uri_too_long` or 431 `headers_too_large`, and closed.
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # the limits of the parser uvicorn hands WebSocket upgrades to
    from websockets.http11 import MAX_LINE_LENGTH as WS_MAX_LINE
    from websockets.http11 import MAX_NUM_HEADERS as WS_MAX_HEADERS
except ImportError:  # pragma: no cover - websockets is a dependency; these are its defaults
    WS_MAX_LINE, WS_MAX_HEADERS = 8192, 128

log = logging.getLogger(__name__)


def _raw_error(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 error response, written straight to the socket (h11 will not send a response before it
    has parsed a request)."""
    body = json.dumps({"error": {"code": code, "message": message, "details": {}}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        if not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        # IDLE on both sides: no request has been parsed since the connection opened or the last response ended.
        if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
            log.info("closing a connection from %s: no complete request headers within %.0f s",
                     self.client, self.header_timeout_s)
            message = f"no complete request headers within {self.header_timeout_s:g} s"
            self.transport.write(_raw_error(408, "Request Timeout", "request_timeout", message))
            self.transport.close()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        # Lines as the WebSocket parser reads them, CRLF included (module docstring: it would refuse them silently).
        request_line = len(event.method) + len(event.target) + len(b"  HTTP/1.1\r\n")
        if request_line > WS_MAX_LINE:
            message = f"the request line of a WebSocket upgrade is limited to {WS_MAX_LINE} bytes"
            self.transport.write(_raw_error(414, "URI Too Long", "uri_too_long", message))
            self.transport.close()
            return
        if len(self.headers) > WS_MAX_HEADERS or any(
            len(name) + len(value) + 4 > WS_MAX_LINE for name, value in self.headers
        ):
            message = (f"a WebSocket upgrade takes at most {WS_MAX_HEADERS} headers of at most {WS_MAX_LINE} "
                       "bytes each")
            self.transport.write(_raw_error(431, "Request Header Fields Too Large", "headers_too_large", message))
            self.transport.close()
            return
        super().handle_websocket_upgrade(event)

    def send_400_response(self, msg: str) -> None:
        # Called (only) when h11 cannot parse the request; its state is ERROR, so the bytes are written directly.
        message = (
            "malformed HTTP request: the request line, a header, or the framing (Content-Length, "
            "Transfer-Encoding) is invalid"
        )
        self.transport.write(_raw_error(400, "Bad Request", "bad_request", message))
        self.transport.close()


def guarded_protocol(header_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class to give uvicorn (`http=`), with this header timeout."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": float(header_timeout_s)})
