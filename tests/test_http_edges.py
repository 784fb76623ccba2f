"""The HTTP edges of a real server process (issue 16, low rows), spoken over raw TCP where a well-behaved client
library would not produce the bytes: clients that vanish mid-upload, trickle headers or bodies, frame a request
badly, aim a redirect at another host, or send HEAD."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_process import Server, running_server


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with running_server(
        models_dir, tmp_path_factory.mktemp("edges"), FACE_HEADER_TIMEOUT_S="1", FACE_BODY_TIMEOUT_S="1"
    ) as running:
        yield running


def raw_exchange(server: Server, data: bytes, wait_s: float = 10.0) -> tuple[int, dict[str, str], bytes, float]:
    """Send `data`, read until the server closes (or `wait_s`); return status, headers, body, seconds taken."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait_s) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
                if b"\r\n\r\n" in received:
                    head, _, body = received.partition(b"\r\n\r\n")
                    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), None)
                    if length is not None and len(body) >= length:
                        break
        except TimeoutError:
            pass
    elapsed = time.perf_counter() - started
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), received[:200]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body, elapsed


def json_error(headers: dict[str, str], body: bytes) -> dict:
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message", "details"}
    return error


def metrics_lines(server: Server, path: str) -> list[str]:
    text = httpx.get(server.url + "/metrics").text
    return [line for line in text.splitlines()
            if line.startswith("face_http_requests_total") and f'endpoint="{path}"' in line]


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=xyz", "application/json"])
def test_a_client_that_disconnects_mid_upload_is_logged_at_info_not_a_500(
    server: Server, content_type: str
) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            f"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: 200000\r\n\r\n"
            .encode()
            + (b"--xyz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n"
               if content_type.startswith("multipart") else b'{"image": "')
            + b"A" * 1000
        )
        time.sleep(0.2)
    time.sleep(0.5)
    log = server.log_text()
    assert "the client disconnected before its request body was complete" in log
    assert "Traceback" not in log and "unhandled error" not in log
    counted = metrics_lines(server, "/detect")
    assert any('status="499"' in line for line in counted), counted
    assert not any('status="500"' in line for line in counted), counted


SLOW_CLIENTS = 16  # the row: 16 connections sending headers or body at 1 byte/s


def trickle(server: Server, head: bytes, slow: bytes) -> tuple[int, str, float]:
    """Send `head` at once, then `slow` at 1 byte/s until the server answers or closes; return the status, the
    body and the seconds until the server closed the connection."""
    started = time.perf_counter()
    received = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        for byte in slow:
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # the server closed the connection: what we want
                break
            if select.select([sock], [], [], 1.0)[0]:  # an answer (or a close) instead of the next second
                break
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except OSError:
            pass
    status = int(received.split()[1]) if received else 0
    return status, received.partition(b"\r\n\r\n")[2].decode(), time.perf_counter() - started


@pytest.mark.parametrize(
    "head, slow, message",
    [
        (b"", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 60, "no complete request headers within 1 s"),
        (b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n",
         b'{"image": "' + b"A" * 48 + b'"}', "the request body did not arrive within 1 s"),
    ],
    ids=["headers", "body"],
)
def test_sixteen_slow_clients_time_out_while_others_are_served(
    server: Server, faces_dir: Path, head: bytes, slow: bytes, message: str
) -> None:
    results: list[tuple[int, str, float]] = []
    threads = [threading.Thread(target=lambda: results.append(trickle(server, head, slow)))
               for _ in range(SLOW_CLIENTS)]
    for thread in threads:
        thread.start()
    # Meanwhile, with all sixteen held open, an ordinary request is served as usual.
    time.sleep(0.3)
    assert not results
    photo = (faces_dir / "pairs" / "img25.jpg").read_bytes()
    ordinary = httpx.post(server.url + "/detect", files={"image": photo}, timeout=10)
    assert ordinary.status_code == 200 and len(ordinary.json()["faces"]) >= 1
    for thread in threads:
        thread.join()
    assert len(results) == SLOW_CLIENTS
    for status, body, elapsed in results:
        assert status == 408, (status, body)
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout" and message in error["message"]
        assert elapsed < 4  # the timeouts are 1 s here; the 60 slow bytes alone would take a minute
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: -1\r\n",
        b"Content-Length: 10\r\nContent-Length: 20\r\n",
        b"Content-Length: 1x\r\n",
        b"Transfer-Encoding: gzip\r\n",
    ],
)
def test_malformed_framing_gets_the_json_error_shape(server: Server, framing: bytes) -> None:
    status, headers, body, _ = raw_exchange(
        server, b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + framing + b"\r\n{}"
    )
    assert status == 400
    assert json_error(headers, body)["code"] == "bad_request"
    assert headers["connection"] == "close"


def test_no_redirect_is_built_from_the_host_header(server: Server) -> None:
    response = httpx.post(server.url + "/detect/", headers={"Host": "evil.example"}, content=b"",
                          follow_redirects=False)
    assert response.status_code == 404
    assert "location" not in response.headers
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("path", ["/health", "/ready", "/identities", "/metrics", "/openapi.json"])
def test_head_is_answered_wherever_get_is(server: Server, path: str) -> None:
    get = httpx.get(server.url + path)
    head = httpx.head(server.url + path)
    assert get.status_code == head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if path in ("/health", "/openapi.json"):  # bodies that do not change between the two requests
        assert head.headers["content-length"] == get.headers["content-length"]


def test_head_on_a_post_route_is_405_naming_post(server: Server) -> None:
    response = httpx.head(server.url + "/detect")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


def upgrade_request(target: str, extra_headers: bytes = b"") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    ).encode() + extra_headers + b"\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (upgrade_request("/stream?top_k=" + "1" * 9000), 414, "uri_too_long"),
        (upgrade_request("/stream", b"X-API-Key: " + b"k" * 9000 + b"\r\n"), 431, "headers_too_large"),
        (upgrade_request("/stream", b"".join(b"X-%d: 1\r\n" % i for i in range(130))), 431, "headers_too_large"),
    ],
    ids=["long-request-line", "long-header", "many-headers"],
)
def test_a_websocket_upgrade_too_large_for_the_websocket_parser_is_answered_not_held(
    server: Server, request_bytes: bytes, status: int, code: str
) -> None:
    """websockets' parser refuses these (lines over 8 KiB, over 128 headers) with a response uvicorn never sends:
    without an answer here the client waited for ever on a connection the server held open."""
    got, headers, body, elapsed = raw_exchange(server, request_bytes, wait_s=10)
    assert (got, json_error(headers, body)["code"]) == (status, code), body
    assert elapsed < 5
    # Just under the limits the upgrade still goes through (to the stream's own 4422 for the bad option).
    got, _, _, _ = raw_exchange(server, upgrade_request("/stream?top_k=" + "1" * 8000), wait_s=3)
    assert got == 101
