"""`python -m benchmarks.stream`: WebSocket /stream against calling /identify on every frame, on a real server.

The scene: two enrolled people (each enrolled from one photo, streamed from another photo of them) swaying
across 640x480 frames (benchmarks/video_scene.py), JPEG at quality 85, offered at 30 fps for `--seconds`. A
sender thread sends on the 30 fps clock whatever the answers do; the main thread reads the answers. Latency is
from a frame's send to its answer. The /identify baseline is a client posting each frame and waiting for the
answer before the next (it cannot go faster than the server, so it falls behind the camera instead of dropping).

Also printed: the server process's CPU time per answered frame (/proc/<pid>/stat), which other processes on a
busy machine do not inflate the way they inflate wall-clock figures.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np

from benchmarks.harness import ServerProcess
from benchmarks.video_scene import head_patch, jpeg, moving_heads

FPS = 30
PEOPLE = [("pairs/img20.jpg", "pairs/img21.jpg", "ada"), ("pairs/img12.jpg", "pairs/img3.jpg", "bob")]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def counter(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def prepare(url: str, photos: Path, frames: int) -> list[bytes]:
    patches = []
    for enrolled, streamed, identity in PEOPLE:
        response = httpx.post(f"{url}/enroll", data={"identity_id": identity},
                              files=[("images", ("e.jpg", (photos / enrolled).read_bytes()))], timeout=60)
        response.raise_for_status()
        data = (photos / streamed).read_bytes()
        faces = httpx.post(f"{url}/detect", files={"image": ("s.jpg", data)}, timeout=60).json()["faces"]
        box = max(faces, key=lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]))["box"]
        patches.append(head_patch(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), box))
    return [jpeg(frame) for frame, _ in moving_heads(patches, frames)]


def one_stream(url: str, frames: list[bytes], results: list, index: int) -> None:
    from websockets.sync.client import connect

    sent_at: dict[int, float] = {}
    answers: list[dict] = []
    with connect(url.replace("http://", "ws://") + "/stream", max_size=2**22) as ws:
        json.loads(ws.recv(timeout=30))  # hello

        def send() -> None:
            start = time.perf_counter()
            for i, data in enumerate(frames):
                delay = start + i / FPS - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                sent_at[i + 1] = time.perf_counter()
                ws.send(data)

        sender = threading.Thread(target=send)
        sender.start()
        while not answers or answers[-1]["frame"] < len(frames):
            message = json.loads(ws.recv(timeout=60))
            message["answered_at"] = time.perf_counter()
            answers.append(message)
        sender.join()
    latencies = [1000 * (a["answered_at"] - sent_at[a["frame"]]) for a in answers if a["type"] == "frame"]
    duration = answers[-1]["answered_at"] - sent_at[1]
    named = sum(
        1 for a in answers if a["type"] == "frame" for f in a["faces"]
        if f["identity"] and f["identity"]["matches"]
    )
    faces = sum(len(a["faces"]) for a in answers if a["type"] == "frame")
    ids = {f["track_id"] for a in answers if a["type"] == "frame" for f in a["faces"]}
    results[index] = {
        "answered": len(latencies), "dropped": answers[-1]["dropped"], "duration": duration,
        "latencies": latencies, "named": named, "faces": faces, "track_ids": len(ids),
    }


def run_streams(server: ServerProcess, frames: list[bytes], streams: int) -> dict:
    cpu0, emb0 = cpu_seconds(server.process.pid), counter(server.url, "face_stream_embeddings_total")
    results: list = [None] * streams
    threads = [threading.Thread(target=one_stream, args=(server.url, frames, results, i)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = cpu_seconds(server.process.pid) - cpu0
    embeddings = counter(server.url, "face_stream_embeddings_total") - emb0
    duration = max(r["duration"] for r in results)
    latencies = np.concatenate([r["latencies"] for r in results])
    answered = sum(r["answered"] for r in results)
    return {
        "mode": f"/stream x{streams}", "offered": len(frames) * streams, "answered": answered,
        "fps": answered / duration / streams, "p50": np.percentile(latencies, 50), "p95": np.percentile(latencies, 95),
        "dropped": sum(r["dropped"] for r in results), "embeddings_per_s": embeddings / duration,
        "cpu_ms_per_frame": 1000 * cpu / answered,
        "named": sum(r["named"] for r in results) / max(sum(r["faces"] for r in results), 1),
        "track_ids": sum(r["track_ids"] for r in results),
    }


def one_identify_client(url: str, frames: list[bytes], results: list, index: int) -> None:
    latencies, named, faces = [], 0, 0
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=60) as client:
        for i, data in enumerate(frames):
            delay = start + i / FPS - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent = time.perf_counter()
            body = client.post("/identify", files={"image": ("f.jpg", data, "image/jpeg")}).json()
            latencies.append(1000 * (time.perf_counter() - sent))
            faces += len(body["faces"])
            named += sum(1 for f in body["faces"] if f["matches"])
    results[index] = {"latencies": latencies, "duration": time.perf_counter() - start, "named": named, "faces": faces}


def run_identify(server: ServerProcess, frames: list[bytes], clients: int) -> dict:
    cpu0 = cpu_seconds(server.process.pid)
    results: list = [None] * clients
    threads = [threading.Thread(target=one_identify_client, args=(server.url, frames, results, i))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = cpu_seconds(server.process.pid) - cpu0
    duration = max(r["duration"] for r in results)
    latencies = np.concatenate([r["latencies"] for r in results])
    answered = len(latencies)
    faces = sum(r["faces"] for r in results)
    return {
        "mode": f"/identify x{clients}", "offered": len(frames) * clients, "answered": answered,
        "fps": answered / duration / clients, "p50": np.percentile(latencies, 50), "p95": np.percentile(latencies, 95),
        "dropped": 0, "embeddings_per_s": faces / duration, "cpu_ms_per_frame": 1000 * cpu / answered,
        "named": sum(r["named"] for r in results) / max(faces, 1), "track_ids": None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("artifacts/models"))
    parser.add_argument("--photos", type=Path, default=Path("../shared/data/faces"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--gallery", type=Path, default=Path("artifacts/bench-stream.db"))
    args = parser.parse_args(argv)
    args.gallery.unlink(missing_ok=True)
    frames_count = int(args.seconds * FPS)
    env = {"FACE_MODELS_DIR": str(args.models_dir), "FACE_GALLERY_PATH": str(args.gallery), "FACE_API_KEYS": "",
           "FACE_LOG_LEVEL": "warning"}
    print(f"load average before: {os.getloadavg()}")
    with ServerProcess(env) as server:
        frames = prepare(server.url, args.photos, frames_count)
        rows = [run_streams(server, frames, 1), run_streams(server, frames, 4),
                run_identify(server, frames, 1), run_identify(server, frames, 4)]
    # The same lone stream with two frames in flight (FACE_STREAM_FRAMES_IN_FLIGHT=2), in the same run.
    args.gallery.unlink(missing_ok=True)
    with ServerProcess({**env, "FACE_STREAM_FRAMES_IN_FLIGHT": "2"}) as server:
        prepare(server.url, args.photos, 1)
        row = run_streams(server, frames, 1)
        rows.insert(1, {**row, "mode": "/stream x1, 2 in flight"})
    print(f"load average after: {os.getloadavg()}")
    print(f"{frames_count} frames of 640x480 with two enrolled faces per client, offered at {FPS} fps")
    print("| client | frames offered | answered | fps per client | p50 ms | p95 ms | dropped | embeddings/s "
          "| server CPU ms per frame | faces named | track ids per client |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['offered']} | {r['answered']} | {r['fps']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} "
              f"| {r['dropped']} | {r['embeddings_per_s']:.1f} | {r['cpu_ms_per_frame']:.1f} | {100 * r['named']:.0f} % "
              f"| {'-' if r['track_ids'] is None else r['track_ids'] / int(r['mode'].split(',')[0].rsplit('x', 1)[1])} |")


if __name__ == "__main__":
    main()
