"""Several service replicas on one PostgreSQL gallery: the real thing, over TCP.

Three `python -m service` processes, each on its own port, all with FACE_GALLERY_URL pointing at one database of a
real PostgreSQL 16 + pgvector (started by the `postgres` fixture from the pgserver wheel). No state is shared but
the database, so whatever one replica acknowledges, the others must answer right after its 200. Then the faults:
one replica killed with SIGKILL in the middle of a burst of enrolments, and the database itself stopped and
restarted under load.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from api_support import photo, require_default_models
from server_process import EnrolmentBurst, spawn_service, stop_service, wait_ready

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 120
# The replicas' FACE_GALLERY_TIMEOUT_S: the longest one gallery call waits for the database before a 503.
GALLERY_TIMEOUT_S = 2.0
# What the tests allow a request while the database is down: a gallery call's timeout, plus waiting for one of
# the replica's gallery threads (other requests hold them for up to the same timeout), plus inference.
REQUEST_BOUND_S = 3 * GALLERY_TIMEOUT_S + 5


class Replica:
    def __init__(self, name: str, models_dir: Path, gallery_url: str, log: Path):
        self.name, self.log = name, log
        self.server = spawn_service(
            models_dir, log,
            FACE_GALLERY_URL=gallery_url,
            FACE_GALLERY_TIMEOUT_S=str(GALLERY_TIMEOUT_S),
            FACE_INFERENCE_WORKERS="1",
            FACE_INTRA_OP_THREADS="1",
        )
        self.process, self.url = self.server.process, self.server.url

    def wait_ready(self) -> Replica:
        wait_ready(self.server, self.name)
        return self

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def stop(self) -> None:
        stop_service(self.server)


@pytest.fixture(scope="module")
def gallery_url(postgres):
    url = postgres.new_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(scope="module")
def replicas(models_dir, gallery_url, tmp_path_factory):
    require_default_models(models_dir)
    logs = tmp_path_factory.mktemp("replicas")
    started = [Replica(name, models_dir, gallery_url, logs / f"{name}.log") for name in ("r1", "r2", "r3")]
    try:
        for replica in started:
            replica.wait_ready()
        yield started  # a test may replace a member (the kill -9 test restarts the one it killed)
    finally:
        for replica in started:
            replica.stop()


def _image(faces_dir: Path, name: str) -> tuple[str, bytes, str]:
    return (name, photo(faces_dir, f"pairs/{name}"), "image/jpeg")


def _matches(client: httpx.Client, faces_dir: Path, name: str) -> list[str]:
    response = client.post("/identify", files={"image": _image(faces_dir, name)}, params={"top_k": 5})
    assert response.status_code == 200, response.text
    return [m["identity_id"] for m in response.json()["faces"][0]["matches"]]


def test_every_replica_answers_consistently_right_after_each_200(replicas, faces_dir):
    # img20/img21 are one person (pairs.csv: Yes).
    first, second, third = (r.client() for r in replicas)
    everyone = (first, second, third)

    enrolled = first.post(
        "/enroll", data={"identity_id": "consistent-a", "display_name": "A"}, files=[("images", _image(faces_dir, "img20.jpg"))]
    )
    assert enrolled.status_code == 200, enrolled.text
    face_ids = enrolled.json()["face_ids"]
    for client in everyone:  # no wait, no retry: right after the 200
        detail = client.get("/identities/consistent-a")
        assert detail.status_code == 200, detail.text
        assert [f["face_id"] for f in detail.json()["faces"]] == face_ids and detail.json()["display_name"] == "A"

    assert _matches(second, faces_dir, "img21.jpg")[0] == "consistent-a"
    verified = second.post(
        "/verify", files={"image1": _image(faces_dir, "img21.jpg")}, data={"identity_id": "consistent-a"}
    )
    assert verified.status_code == 200 and verified.json()["match"], verified.text

    more = second.post("/enroll", data={"identity_id": "consistent-a"}, files=[("images", _image(faces_dir, "img21.jpg"))])
    assert more.status_code == 200, more.text
    second_face = more.json()["face_ids"][0]
    for client in everyone:
        assert client.get("/identities/consistent-a").json()["face_count"] == 2

    gone_face = third.delete(f"/identities/consistent-a/faces/{second_face}")
    assert gone_face.status_code == 200, gone_face.text
    for client in everyone:
        faces = client.get("/identities/consistent-a").json()["faces"]
        assert [f["face_id"] for f in faces] == face_ids

    deleted = third.delete("/identities/consistent-a")
    assert deleted.status_code == 200 and deleted.json()["faces_deleted"] == 1, deleted.text
    for client in everyone:  # a deleted face is never served again, by any replica
        assert client.get("/identities/consistent-a").status_code == 404
        assert "consistent-a" not in _matches(client, faces_dir, "img21.jpg")
        verify = client.post(
            "/verify", files={"image1": _image(faces_dir, "img21.jpg")}, data={"identity_id": "consistent-a"}
        )
        assert verify.status_code == 404 and verify.json()["error"]["code"] == "not_found"
    for client in everyone:
        client.close()


def test_kill_9_of_one_replica_loses_no_acknowledged_enrolment(replicas, faces_dir, models_dir, gallery_url, figures):
    image = _image(faces_dir, "img25.jpg")
    burst = EnrolmentBurst()
    acknowledged, attempted, stop = burst.acknowledged, burst.attempted, burst.stop
    threads = [
        threading.Thread(target=burst.send, args=(r.url, f"burst-{r.name}", image), daemon=True) for r in replicas
    ]
    for thread in threads:
        thread.start()
    victim, survivors = replicas[0], replicas[1:]
    deadline = time.monotonic() + 60
    while sum(k.startswith("burst-r1") for k in list(acknowledged)) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.process.send_signal(signal.SIGKILL)  # mid-burst: its requests are in flight
    victim.process.wait(timeout=10)
    killed_at = time.monotonic()
    # The others keep serving: each acknowledges more enrolments after the kill.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = [sum(k.startswith(f"burst-{r.name}") and t > killed_at for k, (_, t) in list(acknowledged.items())) for r in survivors]
        if min(after) >= 3:
            break
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    acked = dict(acknowledged)
    figures(
        f"{len(acked)} enrolments acknowledged ({sum(k.startswith('burst-r1') for k in acked)} by the killed replica), "
        f"{len(attempted)} attempted; after the kill the other two acknowledged {after}"
    )
    assert min(after) >= 3, "the surviving replicas stopped serving"

    with survivors[0].client() as client:
        for identity, (face_ids, _) in acked.items():
            response = client.get(f"/identities/{identity}")
            assert response.status_code == 200, f"acknowledged {identity} lost: {response.text}"
            assert [f["face_id"] for f in response.json()["faces"]] == face_ids
        listed = client.get("/identities", params={"limit": 1000}).json()["items"]
        stored = {item["identity_id"] for item in listed if item["identity_id"].startswith("burst-")}
        assert set(acked) <= stored <= attempted  # nothing lost, nothing invented
        assert all(item["face_count"] == 1 for item in listed if item["identity_id"] in stored)  # no half enrolment

    # The killed replica comes back (a rolling restart) and serves the same gallery at once.
    replacement = Replica("r1", models_dir, gallery_url, victim.log).wait_ready()
    replicas[0] = replacement
    with replacement.client() as client:
        assert client.get("/ready").json()["gallery_faces"] == len(stored)
        some = next(iter(acked))
        assert client.get(f"/identities/{some}").status_code == 200


def test_database_restart_under_load(replicas, postgres, faces_dir, figures):
    """The database goes away under load: 503 `not_ready` (never a 500, never a hang past the bound) and /ready 503
    while it is down; the replicas recover by themselves when it is back; nothing acknowledged is lost."""
    probe = _image(faces_dir, "img21.jpg")
    enrol_image = _image(faces_dir, "img25.jpg")
    results: list[tuple[str, float, int, str | None, float]] = []  # (kind, started, status, code, seconds)
    acknowledged: dict[str, list[str]] = {}
    lock, stop = threading.Lock(), threading.Event()

    def load(replica: Replica, n: int) -> None:
        with replica.client() as client:
            for i in range(100_000):
                if stop.is_set():
                    return
                started = time.monotonic()
                if i % 2:
                    identity = f"restart-{replica.name}-{n}-{i:05d}"
                    response = client.post("/enroll", data={"identity_id": identity}, files=[("images", enrol_image)])
                    kind = "enroll"
                else:
                    response = client.post("/identify", files={"image": probe})
                    kind = "identify"
                elapsed = time.monotonic() - started
                code = response.json().get("error", {}).get("code") if response.status_code != 200 else None
                with lock:
                    results.append((kind, started, response.status_code, code, elapsed))
                    if kind == "enroll" and response.status_code == 200:
                        acknowledged[identity] = response.json()["face_ids"]
                if response.status_code != 200:
                    time.sleep(0.1)

    def ready(replica: Replica) -> int:
        return httpx.get(f"{replica.url}/ready", timeout=REQUEST_BOUND_S + 5).status_code

    with ThreadPoolExecutor(len(replicas)) as pool:
        workers = [pool.submit(load, r, n) for n, r in enumerate(replicas)]
        try:
            time.sleep(2)  # load running against a healthy database
            postgres.stop()
            down_at = time.monotonic()
            try:
                deadline = down_at + 30
                unready: set[str] = set()
                while time.monotonic() < deadline and len(unready) < len(replicas):
                    unready |= {r.name for r in replicas if ready(r) == 503}
                # What needs no gallery keeps working: detection.
                detected = httpx.post(f"{replicas[0].url}/detect", files={"image": probe}, timeout=REQUEST_BOUND_S)
                time.sleep(2)  # stays down a little longer, under load
            finally:
                restart_at = time.monotonic()
                postgres.start()  # returns up to a second after the server accepts connections again
            up_at = time.monotonic()
            deadline = up_at + 60
            back: set[str] = set()
            while time.monotonic() < deadline and len(back) < len(replicas):
                back |= {r.name for r in replicas if ready(r) == 200}
                time.sleep(0.1)
            recovered_at = time.monotonic()
            time.sleep(3)  # and serves again, under load
        finally:
            stop.set()
            for worker in workers:
                worker.result(timeout=60)

    def count(started_from: float, until: float, status: int) -> int:
        return sum(1 for _, s, st, _, _ in results if started_from <= s < until and st == status)

    # Requests that started and ended while the database was down (one still waiting for a connection when it comes
    # back may rightly succeed).
    while_down = [r for r in results if down_at <= r[1] and r[1] + r[4] < restart_at]
    slowest = max((r[4] for r in results), default=0.0)
    after = [r for r in results if r[1] >= recovered_at]
    figures(
        f"{len(results)} requests: {count(0, down_at, 200)} OK before the stop; while down ({restart_at - down_at:.1f} s) "
        f"{sum(r[2] == 503 for r in while_down)} x 503 not_ready, {sum(r[2] == 200 for r in while_down)} x 200; "
        f"all /ready 200 again {recovered_at - up_at:.1f} s after the restart; after that {sum(r[2] == 200 for r in after)} "
        f"x 200 of {len(after)}; slowest request {slowest:.2f} s (bound {REQUEST_BOUND_S:.0f} s)"
    )
    assert len(unready) == len(replicas), "/ready did not turn 503 while the database was down"
    assert detected.status_code == 200 and len(detected.json()["faces"]) == 1, detected.text
    assert len(back) == len(replicas), "the replicas did not recover after the database came back"
    assert {r[2] for r in results} <= {200, 503}, sorted({r[2] for r in results})  # never a 500
    assert all(r[3] == "not_ready" for r in results if r[2] == 503)
    assert while_down and all(r[2] == 503 for r in while_down), [  # no answer made up without the database
        (r[0], round(r[1] - down_at, 3), r[2]) for r in while_down if r[2] != 503
    ]
    assert slowest <= REQUEST_BOUND_S, f"a request took {slowest:.1f} s"
    assert after and all(r[2] == 200 for r in after), [r for r in after if r[2] != 200][:5]
    assert any(r[0] == "enroll" for r in after)

    with replicas[1].client() as client:  # every acknowledged enrolment, before and after the outage, is there
        for identity, face_ids in acknowledged.items():
            response = client.get(f"/identities/{identity}")
            assert response.status_code == 200, f"acknowledged {identity} lost: {response.text}"
            assert [f["face_id"] for f in response.json()["faces"]] == face_ids
