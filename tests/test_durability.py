"""kill -9 in the middle of enrolments: every enrolment the server acknowledged (200) survives a restart.

This runs the real thing: `python -m service` in its own process on a free port with a temporary gallery,
clients streaming enrolments over TCP, SIGKILL (no shutdown hooks, no flush), then a second server process on
the same gallery file.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
from api_support import photo, require_default_models
from server_process import EnrolmentBurst, spawn_service, stop_service, wait_ready


def test_acknowledged_enrolments_survive_kill_9(models_dir, faces_dir, tmp_path, figures):
    require_default_models(models_dir)
    gallery = {"FACE_GALLERY_PATH": str(tmp_path / "gallery.db")}
    log = tmp_path / "server.log"
    image = ("face.jpg", photo(faces_dir, "pairs/img25.jpg"), "image/jpeg")  # 400x400: a cheap enrolment
    burst = EnrolmentBurst()

    server = wait_ready(spawn_service(models_dir, log, **gallery))
    try:
        threads = [
            threading.Thread(target=burst.send, args=(server.url, f"w{w}", image), daemon=True) for w in range(3)
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(burst.acknowledged) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.process.send_signal(signal.SIGKILL)  # mid-stream: requests are in flight
        server.process.wait(timeout=10)
        burst.stop.set()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        if server.process.poll() is None:
            server.process.kill()

    acked = burst.face_ids()
    figures(f"acknowledged {len(acked)} enrolments, {len(burst.attempted)} attempted, cut off: {burst.failures}")
    assert len(acked) >= 12, log.read_text()[-3000:]

    server = wait_ready(spawn_service(models_dir, log, **gallery))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for identity, face_ids in acked.items():
                response = client.get(f"/identities/{identity}")
                assert response.status_code == 200, f"acknowledged {identity} lost: {response.text}"
                assert [f["face_id"] for f in response.json()["faces"]] == face_ids
            listed = client.get("/identities", params={"limit": 1000}).json()
            stored = {item["identity_id"] for item in listed["items"]}
            assert set(acked) <= stored <= burst.attempted  # nothing lost, nothing invented
            assert all(item["face_count"] == 1 for item in listed["items"])  # no half-written enrolment
            # The restarted server matches against what survived.
            found = client.post("/identify", files={"image": image}, params={"top_k": 1}).json()
            assert found["faces"][0]["matches"][0]["identity_id"] in stored
    finally:
        stop_service(server)
