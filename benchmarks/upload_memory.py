"""`python -m benchmarks.upload_memory`: what large request bodies cost a real server process, and how fast
ordinary JSON requests are, printed as figures (issue 16's medium row).

- One /enroll of ten 20 MiB images (not images: a JPEG signature and random bytes, refused when looked at) as a
  JSON body of base64 and as multipart: status, seconds, and the server's RSS and peak RSS growth.
- One JSON /enroll body just under the JSON cap, the largest JSON body the defaults accept.
- Median latency of JSON /detect (one photo) and JSON /verify (two photos), against multipart in the same run.

Each heavy case starts from a reset peak (`/proc/PID/clear_refs`), so its peak growth is its own.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.harness import ROOT, ServerProcess, measure

MB = 1024 * 1024


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def _fake_images(size: int, count: int) -> list[bytes]:
    one = b"\xff\xd8\xff\x00" + os.urandom(size - 4)
    return [one] * count


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def heavy(server: ServerProcess, label: str, send) -> None:
    time.sleep(0.3)
    _reset_peak(server.process.pid)
    before, _ = server.rss_mb()
    started = time.perf_counter()
    response = send()
    elapsed = time.perf_counter() - started
    after, peak = server.rss_mb()
    code = response.json().get("error", {}).get("code", "ok")
    print(f"{label}: {response.status_code} {code} in {elapsed:.2f} s; RSS {before:.0f} -> {after:.0f} MiB "
          f"(+{after - before:.0f}), peak +{peak - before:.0f} MiB")


def large_bodies(server: ServerProcess, client: httpx.Client) -> None:
    url, json_headers = server.url, {"content-type": "application/json"}
    fakes = _fake_images(20 * MB, 10)
    body = json.dumps({"identity_id": "big", "images": [b64(f) for f in fakes]}).encode()
    heavy(server, f"JSON /enroll, 10 x 20 MiB ({len(body) / MB:.0f} MiB body)",
          lambda: client.post(url + "/enroll", content=body, headers=json_headers))
    files = [("images", (f"{i}.jpg", f, "image/jpeg")) for i, f in enumerate(fakes)]
    heavy(server, "multipart /enroll, 10 x 20 MiB",
          lambda: client.post(url + "/enroll", data={"identity_id": "big"}, files=files))
    # near the largest JSON body the defaults accept (32 MiB)
    near_cap = json.dumps({"identity_id": "big", "images": [b64(f) for f in _fake_images(2_300_000, 10)]})
    heavy(server, f"JSON /enroll, 10 x 2.3 MB ({len(near_cap) / MB:.1f} MiB body)",
          lambda: client.post(url + "/enroll", content=near_cap.encode(), headers=json_headers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "artifacts" / "models")
    parser.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "faces")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--latency-only", action="store_true", help="skip the large bodies")
    args = parser.parse_args()

    env = {"FACE_MODELS_DIR": str(args.models_dir), "FACE_API_KEYS": "", "FACE_LOG_LEVEL": "warning"}
    photo1 = (args.photos / "pairs" / "img25.jpg").read_bytes()
    photo2 = (args.photos / "pairs" / "img5.jpg").read_bytes()
    json_headers = {"content-type": "application/json"}

    with tempfile.TemporaryDirectory() as tmp, ServerProcess({**env, "FACE_GALLERY_PATH": f"{tmp}/g.db"}) as server:
        url = server.url
        with httpx.Client(timeout=120) as client:
            if not args.latency_only:
                large_bodies(server, client)

            detect_json = json.dumps({"image": b64(photo1)}).encode()
            verify_json = json.dumps({"image1": b64(photo1), "image2": b64(photo2)}).encode()
            cases = {
                "JSON /detect, one photo": lambda: client.post(url + "/detect", content=detect_json,
                                                               headers=json_headers),
                "multipart /detect, one photo": lambda: client.post(url + "/detect", files={"image": photo1}),
                "JSON /verify, two photos": lambda: client.post(url + "/verify", content=verify_json,
                                                                headers=json_headers),
                "multipart /verify, two photos": lambda: client.post(
                    url + "/verify", files={"image1": photo1, "image2": photo2}),
            }
            for label, call in cases.items():
                assert call().status_code == 200, label
                timing = measure(call, repeat=args.repeat, warmup=3)
                print(f"{label} ({len(photo1) // 1024} KiB photo): p50 {timing.p50:.1f} ms, "
                      f"min {timing.min:.1f} ms over {timing.n}")


if __name__ == "__main__":
    main()
