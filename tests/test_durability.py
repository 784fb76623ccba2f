"""kill -9 in the middle of enrolments: every enrolment the server acknowledged (200) survives a restart.

This runs the real thing: `python -m service` in its own process on a free port with a temporary gallery,
clients streaming enrolments over TCP, SIGKILL (no shutdown hooks, no flush), then a second server process on
the same gallery file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from api_support import photo, require_default_models

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(models_dir: Path, gallery: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "FACE_MODELS_DIR": str(models_dir),
        "FACE_GALLERY_PATH": str(gallery),
        "FACE_API_KEYS": "",
        "FACE_LOG_LEVEL": "warning",
        "PYTHONPATH": str(ROOT),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def test_acknowledged_enrolments_survive_kill_9(models_dir, faces_dir, tmp_path, figures):
    require_default_models(models_dir)
    gallery = tmp_path / "gallery.db"
    log = tmp_path / "server.log"
    image = photo(faces_dir, "pairs/img25.jpg")  # 400x400: a cheap, single-face enrolment
    acknowledged: dict[str, list[str]] = {}
    attempted: set[str] = set()
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    server, url = _start_server(models_dir, gallery, log)
    try:

        def stream(worker: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as client:
                for i in range(10_000):
                    if stop.is_set():
                        return
                    identity = f"w{worker}-{i:05d}"
                    with lock:
                        attempted.add(identity)
                    try:
                        response = client.post(
                            "/enroll", data={"identity_id": identity},
                            files=[("images", ("face.jpg", image, "image/jpeg"))],
                        )
                    except httpx.TransportError as exc:  # the server died under this request
                        failures.append(f"{identity}: {type(exc).__name__}")
                        return
                    if response.status_code == 200:
                        with lock:
                            acknowledged[identity] = response.json()["face_ids"]

        threads = [threading.Thread(target=stream, args=(w,), daemon=True) for w in range(3)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.send_signal(signal.SIGKILL)  # mid-stream: requests are in flight
        server.wait(timeout=10)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()

    acked = dict(acknowledged)
    figures(f"acknowledged {len(acked)} enrolments, {len(attempted)} attempted, cut off: {failures}")
    assert len(acked) >= 12, log.read_text()[-3000:]

    server, url = _start_server(models_dir, gallery, log)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            for identity, face_ids in acked.items():
                response = client.get(f"/identities/{identity}")
                assert response.status_code == 200, f"acknowledged {identity} lost: {response.text}"
                assert [f["face_id"] for f in response.json()["faces"]] == face_ids
            listed = client.get("/identities", params={"limit": 1000}).json()
            stored = {item["identity_id"] for item in listed["items"]}
            assert set(acked) <= stored <= attempted  # nothing lost, nothing invented
            assert all(item["face_count"] == 1 for item in listed["items"])  # no half-written enrolment
            # The restarted server matches against what survived.
            found = client.post("/identify", files={"image": ("face.jpg", image)}, params={"top_k": 1}).json()
            assert found["faces"][0]["matches"][0]["identity_id"] in stored
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
