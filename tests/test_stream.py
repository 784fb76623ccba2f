"""WebSocket /stream against a real server process: real photos' faces moved across 640x480 frames.

One person is enrolled from one photo and streamed from another photo of them (pairs.csv says the two are the
same person), beside a stranger: each face keeps its track id while it moves, the enrolled one is named and the
stranger is not. A client that sends faster than the server processes gets answers for the newest frames, and
every frame it sent is either answered or counted as dropped, in the answers and in /metrics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from server_process import Server, running_server

websockets_sync = pytest.importorskip("websockets.sync.client", reason="the websockets package is not installed")
from websockets.exceptions import ConnectionClosed

from benchmarks.video_scene import background, head_patch, jpeg, moving_heads, paste

ENROLLED_PHOTO, STREAMED_PHOTO, STRANGER_PHOTO = "pairs/img20.jpg", "pairs/img21.jpg", "pairs/img3.jpg"
API_KEY = "stream-test-key-0123456789"


def ws_url(server: Server, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/stream" + (f"?{query}" if query else "")


def largest_box(server: Server, data: bytes) -> list[float]:
    faces = httpx.post(f"{server.url}/detect", files={"image": ("p.jpg", data, "image/jpeg")}, timeout=60).json()["faces"]
    return max(faces, key=lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]))["box"]


def patch_of(server: Server, faces_dir: Path, name: str) -> np.ndarray:
    data = (faces_dir / name).read_bytes()
    return head_patch(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), largest_box(server, data))


def stream_metrics(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith(("face_stream_frames_total{", "face_stream_embeddings_total ", "face_streams_open ")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def frames_of(answer_stream) -> dict:
    """The next message that is not the hello."""
    while True:
        message = json.loads(answer_stream.recv(timeout=60))
        if message["type"] != "hello":
            return message


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory) -> Server:
    with running_server(models_dir, tmp_path_factory.mktemp("stream"), FACE_STREAM_MAX_FPS="1000") as running:
        yield running


@pytest.fixture(scope="module")
def scene(server: Server, faces_dir: Path) -> list[tuple[np.ndarray, list[tuple[int, int]]]]:
    """60 frames: the enrolled person's other photo on the left strip, a stranger on the right, both moving."""
    patches = [patch_of(server, faces_dir, STREAMED_PHOTO), patch_of(server, faces_dir, STRANGER_PHOTO)]
    enrolled = (faces_dir / ENROLLED_PHOTO).read_bytes()
    response = httpx.post(
        f"{server.url}/enroll", data={"identity_id": "ada", "display_name": "Ada"},
        files=[("images", ("a.jpg", enrolled, "image/jpeg"))], timeout=60,
    )
    assert response.status_code == 200, response.text
    frames = list(moving_heads(patches, 60))
    return [(frame, [(x + p.shape[1] / 2, y + p.shape[0] / 2) for (x, y), p in zip(corners, patches)])
            for frame, corners in frames]


def head_of(face: dict, centres: list[tuple[float, float]]) -> int:
    """Which head (index into the scene's patches) a reported face is: the nearest head centre."""
    x1, y1, x2, y2 = face["box"]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return int(np.argmin([(cx - hx) ** 2 + (cy - hy) ** 2 for hx, hy in centres]))


def test_moving_faces_keep_their_track_ids_and_the_enrolled_one_is_named(server: Server, scene) -> None:
    answers = []
    with websockets_sync.connect(ws_url(server, "top_k=3"), max_size=2**22) as ws:
        hello = json.loads(ws.recv(timeout=30))
        assert hello["type"] == "hello" and hello["options"]["top_k"] == 3
        for frame, _ in scene:  # lock-step: one frame, its answer
            ws.send(jpeg(frame))
            answers.append(frames_of(ws))
    assert [a["frame"] for a in answers] == list(range(1, len(scene) + 1))
    assert all(a["type"] == "frame" and a["dropped"] == 0 for a in answers)
    assert answers[0]["image"] == {"width": 640, "height": 480}

    ids: dict[int, list[int]] = {0: [], 1: []}
    names: dict[int, list[str | None]] = {0: [], 1: []}
    embedded = 0
    for answer, (_, centres) in zip(answers, scene):
        for face in answer["faces"]:
            head = head_of(face, centres)
            ids[head].append(face["track_id"])
            embedded += face["embedded"]
            matches = (face["identity"] or {}).get("matches") or [{}]
            names[head].append(matches[0].get("identity_id"))
    for head in (0, 1):
        assert len(ids[head]) >= 0.95 * len(scene), f"head {head} detected on {len(ids[head])} frames"
        most = max(set(ids[head]), key=ids[head].count)
        assert ids[head].count(most) >= 0.95 * len(scene), f"head {head}'s track ids: {ids[head]}"
    assert set(ids[0]).isdisjoint(ids[1])
    assert names[0].count("ada") >= 0.95 * len(names[0]), names[0]
    assert "ada" not in names[1], names[1]
    # Embedded on a track's start and then only when needed: far fewer embeddings than faces seen.
    assert 2 <= embedded <= 0.4 * (len(ids[0]) + len(ids[1])), embedded
    last = next(f for f in answers[-1]["faces"] if head_of(f, scene[-1][1]) == 0)
    assert last["identity"]["embeddings"] >= 2  # the decision rests on several embeddings, and says so
    assert last["identity"]["matches"][0]["display_name"] == "Ada"


def test_large_faces_are_tracked_on_coarse_frames_and_embedded_only_from_full_ones(server: Server, scene) -> None:
    """Both heads are large (>= 96 px): after the first frames most frames are searched at half size, a full frame
    comes at least every FACE_STREAM_FULL_DETECTION_EVERY (5), faces are embedded only on full frames, and the
    heads are found and named on coarse frames as on full ones."""
    answers = []
    with websockets_sync.connect(ws_url(server), max_size=2**22) as ws:
        for frame, _ in scene:
            ws.send(jpeg(frame))
            answers.append(frames_of(ws))
    sides = [a["detector_side"] for a in answers]
    assert set(sides) <= {640, 320} and sides[0] == 640
    assert sides.count(320) >= 0.6 * len(sides), sides
    runs = "".join("c" if s == 320 else "F" for s in sides).split("F")
    assert max(len(r) for r in runs) <= 4, sides
    for answer, (_, centres) in zip(answers, scene):
        faces = answer["faces"]
        assert sorted(head_of(f, centres) for f in faces) == [0, 1], (answer["frame"], answer["detector_side"])
        assert all(min(f["box"][2] - f["box"][0], f["box"][3] - f["box"][1]) >= 96 for f in faces)
        if answer["detector_side"] == 320:
            assert not any(f["embedded"] for f in faces)
        enrolled = next(f for f in faces if head_of(f, centres) == 0)
        assert (enrolled["identity"]["matches"] or [{}])[0].get("identity_id") == "ada" or answer["frame"] <= 2


def test_small_faces_keep_every_frame_at_full_size(server: Server, faces_dir: Path) -> None:
    selfie = (faces_dir / "groups" / "selfie-many-people.jpg").read_bytes()  # 600x604, six small faces
    with websockets_sync.connect(ws_url(server, "identify=false"), max_size=2**22) as ws:
        answers = []
        for _ in range(8):
            ws.send(selfie)
            answers.append(frames_of(ws))
    assert all(len(a["faces"]) >= 5 for a in answers)
    assert [a["detector_side"] for a in answers] == [604] * 8


def test_faces_large_in_a_big_frame_but_small_for_the_detector_stay_on_full_frames(server: Server, faces_dir) -> None:
    """Two ~160 px faces in a 3840x2160 frame are 27 px at the detector's working size (640) and 13 px at half of it:
    coarse frames would lose them, so every frame stays full size and finds both."""
    data = (faces_dir / STREAMED_PHOTO).read_bytes()
    photo = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    patch = head_patch(photo, largest_box(server, data), face_width=160)
    frame = np.full((2160, 3840, 3), 120, np.uint8)
    for x in (800, 2400):
        frame[900 : 900 + patch.shape[0], x : x + patch.shape[1]] = patch
    payload = jpeg(frame)
    with websockets_sync.connect(ws_url(server, "identify=false"), max_size=2**23) as ws:
        answers = []
        for _ in range(6):
            ws.send(payload)
            answers.append(frames_of(ws))
    assert all(min(f["box"][2] - f["box"][0], f["box"][3] - f["box"][1]) >= 96 for f in answers[0]["faces"])
    assert [len(a["faces"]) for a in answers] == [2] * 6, [(a["detector_side"], len(a["faces"])) for a in answers]
    assert [a["detector_side"] for a in answers] == [640] * 6


def test_a_client_faster_than_the_server_gets_the_newest_frames_and_the_rest_counted_dropped(
    server: Server, scene
) -> None:
    flood(server, scene)


def test_two_frames_in_flight_still_answer_in_order_and_count_every_frame(models_dir, tmp_path, scene) -> None:
    with running_server(models_dir, tmp_path, FACE_STREAM_MAX_FPS="1000", FACE_STREAM_FRAMES_IN_FLIGHT="2",
                        FACE_STREAM_FULL_DETECTION_EVERY="1") as two:
        answers = flood(two, scene)
    assert {a["detector_side"] for a in answers} == {640}  # coarse frames off


def test_a_small_face_stays_found_with_two_frames_in_flight_and_coarse_frames_on(
    models_dir, tmp_path, server: Server, faces_dir: Path
) -> None:
    """A small face (24 px: too small for a coarse frame) walks into a scene of one large face while the client keeps
    two frames unanswered, as /demo does. Once found it keeps every frame full size and is found on (almost) every
    frame, not on one in FACE_STREAM_FULL_DETECTION_EVERY."""
    def patch(name: str, width: int) -> np.ndarray:
        data = (faces_dir / name).read_bytes()
        return head_patch(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), largest_box(server, data),
                          face_width=width)

    big, small = patch(STREAMED_PHOTO, 130), patch(STRANGER_PHOTO, 24)
    frames, room = [], background()
    for t in range(40):
        frame = room.copy()
        paste(frame, big, 40 + t, 100)
        if t >= 12:
            paste(frame, small, 450, 200)
        frames.append(jpeg(frame))
    with (
        running_server(models_dir, tmp_path, FACE_STREAM_MAX_FPS="1000", FACE_STREAM_FRAMES_IN_FLIGHT="2") as two,
        websockets_sync.connect(ws_url(two), max_size=2**22) as ws,
    ):
        json.loads(ws.recv(timeout=30))
        ws.send(frames[0])
        ws.send(frames[1])
        sent, answers = 2, []
        while not answers or answers[-1]["frame"] < len(frames):  # a frame may be dropped: latest frame wins
            answers.append(frames_of(ws))
            if sent < len(frames):
                ws.send(frames[sent])
                sent += 1
    pattern = " ".join(f"{a['frame']}{'c' if a['detector_side'] < 640 else 'F'}{len(a['faces'])}" for a in answers)
    assert any(a["detector_side"] < 640 for a in answers if a["frame"] <= 12), pattern  # coarse while it is alone
    found = next(a["frame"] for a in answers if a["frame"] > 13 and len(a["faces"]) == 2)
    assert found <= 13 + 4, pattern  # it comes into view on frame 13 (frames[12])
    after = [a for a in answers if a["frame"] > found + 2]
    assert len(after) >= 15 and sum(len(a["faces"]) == 2 for a in after) >= 0.9 * len(after), pattern


def flood(server: Server, scene) -> list[dict]:
    """Send every frame at once; then every frame is answered or counted dropped, answers come in order and the
    newest frame is answered."""
    before = stream_metrics(server)
    sent = len(scene)
    payloads = [jpeg(frame) for frame, _ in scene]
    answers = []
    with websockets_sync.connect(ws_url(server), max_size=2**22) as ws:
        json.loads(ws.recv(timeout=30))  # hello
        for data in payloads:  # all at once: the server cannot keep up
            ws.send(data)
        while not answers or answers[-1]["frame"] < sent:
            answers.append(frames_of(ws))
    numbers = [a["frame"] for a in answers]
    assert numbers == sorted(set(numbers)) and numbers[-1] == sent  # in order, and the newest is never dropped
    final = answers[-1]
    assert final["dropped"] > 0, "the client sent 60 frames at once; some had to be replaced"
    assert len(answers) + final["dropped"] == sent
    assert final["rate_limited"] == 0
    assert max(a["queued_ms"] for a in answers) < 60_000
    deadline = time.monotonic() + 10
    while True:  # the server updates its counters as it sends; give the last one a moment
        after = stream_metrics(server)
        delta = {k: after[k] - before.get(k, 0.0) for k in after}
        if delta['face_stream_frames_total{outcome="processed"}'] >= len(answers) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert delta['face_stream_frames_total{outcome="received"}'] == sent
    assert delta['face_stream_frames_total{outcome="processed"}'] == len(answers)
    assert delta['face_stream_frames_total{outcome="dropped"}'] == final["dropped"]
    return answers


def test_a_bad_frame_gets_an_error_and_the_stream_goes_on(server: Server, scene) -> None:
    with websockets_sync.connect(ws_url(server), max_size=2**22) as ws:
        json.loads(ws.recv(timeout=30))
        ws.send(b"\xff\xd8\xff\xe0 this is not a JPEG")
        error = frames_of(ws)
        assert error["type"] == "error" and error["frame"] == 1
        assert error["error"]["code"] in ("invalid_image", "unsupported_media_type"), error
        ws.send("a text message")
        error = frames_of(ws)
        assert (error["frame"], error["error"]["code"]) == (2, "invalid_frame")
        ws.send(jpeg(scene[0][0]))
        answer = frames_of(ws)
        assert answer["type"] == "frame" and answer["frame"] == 3 and len(answer["faces"]) == 2


def test_invalid_options_close_the_stream_with_4422_and_say_which(server: Server) -> None:
    with websockets_sync.connect(ws_url(server, "top_k=0&topk=3")) as ws:
        message = json.loads(ws.recv(timeout=30))
        assert message["error"]["code"] == "invalid_parameter"
        fields = {e["field"] for e in message["error"]["details"]["errors"]}
        assert fields == {"top_k", "topk"}
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
    assert ws.close_code == 4422 and ws.close_reason.startswith("invalid_parameter")


def test_an_option_given_twice_closes_the_stream_with_4422_like_rest(server: Server) -> None:
    """REST answers a repeated option 422 (`given more than once`); the stream must not keep one of them silently."""
    with websockets_sync.connect(ws_url(server, "top_k=1&top_k=100")) as ws:
        message = json.loads(ws.recv(timeout=30))
        assert message["type"] == "error" and message["error"]["code"] == "invalid_parameter", message
        assert [e["field"] for e in message["error"]["details"]["errors"]] == ["top_k"]
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
    assert ws.close_code == 4422


@pytest.fixture(scope="module")
def guarded(models_dir: Path, tmp_path_factory) -> Server:
    """A server with an API key, room for one stream, 5 frames a second and a 2 s idle timeout."""
    with running_server(
        models_dir, tmp_path_factory.mktemp("guarded"), FACE_API_KEYS=API_KEY, FACE_STREAM_MAX_STREAMS="1",
        FACE_STREAM_MAX_FPS="5", FACE_STREAM_IDLE_TIMEOUT_S="2",
    ) as running:
        yield running


def no_streams_open(server: Server) -> None:
    """Wait until the server has let go of every stream (a client's close reaches it a moment later): the guarded
    server has room for one."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics", headers={"X-API-Key": API_KEY}, timeout=10).text
        if "face_streams_open 0.0" in text:
            return
        time.sleep(0.05)
    pytest.fail("a closed stream is still counted open after 10 s")


def closed_with(url: str, **connect) -> tuple[int, str, dict]:
    with websockets_sync.connect(url, **connect) as ws:
        message = json.loads(ws.recv(timeout=30))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
    return ws.close_code, ws.close_reason, message


def test_a_stream_needs_the_api_key_in_any_of_the_ways_a_client_can_send_it(guarded: Server) -> None:
    code, reason, message = closed_with(ws_url(guarded))
    assert (code, message["error"]["code"]) == (4401, "unauthorized") and reason.startswith("unauthorized")
    code, _, _ = closed_with(ws_url(guarded), additional_headers={"X-API-Key": "wrong"})
    assert code == 4401
    for connect in (
        {"additional_headers": {"X-API-Key": API_KEY}},
        {"additional_headers": {"Authorization": f"Bearer {API_KEY}"}},
        {"subprotocols": ["facerec", f"key.{API_KEY}"]},  # what a browser can do
        {"url": ws_url(guarded, f"api_key={API_KEY}")},
    ):
        url = connect.pop("url", ws_url(guarded))
        no_streams_open(guarded)
        with websockets_sync.connect(url, **connect) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "hello"
            if "subprotocols" in connect:
                assert ws.subprotocol == "facerec"  # the key is never echoed back


def test_stream_cap_rate_limit_and_idle_timeout(guarded: Server, scene) -> None:
    headers = {"X-API-Key": API_KEY}
    no_streams_open(guarded)
    with websockets_sync.connect(ws_url(guarded), additional_headers=headers, max_size=2**22) as first:
        assert json.loads(first.recv(timeout=30))["type"] == "hello"
        code, reason, message = closed_with(ws_url(guarded), additional_headers=headers)
        assert (code, message["error"]["code"]) == (4429, "too_many_streams"), reason
        payload = jpeg(scene[0][0])
        for _ in range(20):  # 20 frames at once against 5 a second (a burst of 5 allowed)
            first.send(payload)
        time.sleep(0.5)
        first.send(payload)  # and one more, to see the final counts
        answers = []
        while not answers or answers[-1]["frame"] < 21:
            message = frames_of(first)
            if message["type"] == "frame":
                answers.append(message)
            if message["frame"] == 21:
                break
        final = answers[-1]
        assert 13 <= final["rate_limited"] <= 15, final  # 5 of the 20 fit the burst; 0.5 s refills 2-3
        assert len(answers) + final["dropped"] + final["rate_limited"] == 21
        # Then silence: closed after the idle timeout (2 s after frame 21 arrived).
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            while True:
                first.recv(timeout=30)
        assert first.close_code == 4408 and time.monotonic() - started <= 10
