"""Enrolment rate into each store, and /identify throughput with one and two replicas on one PostgreSQL database.

`python -m benchmarks` runs this as part of its report; alone (a minute or two):
`python -m benchmarks.scale_out --photos ../shared/data/faces`. It starts a private PostgreSQL 16 + pgvector 0.6.2
from the `pgserver` wheel (the test extra installs it) in a temporary folder.

- Enrolment in the store: `Gallery.enroll` / `PostgresGallery.enroll` called directly on a gallery already
  holding `--faces` faces, one new identity with one face per call, one caller: each call is a committed
  transaction (fsync before it returns, in both stores; in PostgreSQL it also inserts into the HNSW graph), so
  this is the store's own cost per enrolment.
- Enrolment over HTTP: POST /enroll with one 640x480 portrait (detection, alignment, embedding, then the store),
  4 clients, against `python -m service` on each store.
- /identify throughput: the PostgreSQL gallery (`--faces` faces, clustered synthetic), one portrait per request, 4 clients; first
  against one replica, then split between two replicas (`python -m service` twice, one database), each client's
  connection to one replica as a round-robin proxy would. On a machine whose cores one replica already uses,
  a second one cannot add throughput: it pays off with cores (or machines) of its own.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import ServerProcess, load

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 4


def store_enrol_rate(gallery, n: int, rng: np.random.Generator) -> dict:
    """Enrolments per second of one caller, each a new identity with one face (a committed transaction)."""
    faces = rng.standard_normal((n, gallery.embedding_size)).astype(np.float32)
    times = []
    for i, face in enumerate(faces):
        started = time.perf_counter()
        gallery.enroll(f"bench-{i}", face[None])
        times.append(time.perf_counter() - started)
    return {"n": n, "rate": n / sum(times), "p50_ms": 1000 * float(np.median(times)),
            "p95_ms": 1000 * float(np.percentile(times, 95))}


def http_enrol(env: dict[str, str], portrait: bytes, requests: int) -> dict:
    counter = itertools.count()

    def enrol(client):
        return client.post("/enroll", data={"identity_id": f"http-{next(counter)}"},
                           files=[("images", ("p.jpg", portrait, "image/jpeg"))])

    with ServerProcess(env) as server:
        result = load(server.url, enrol, CLIENTS, requests)
    return {"rate": result.throughput, "p50_ms": result.latency.p50, "p95_ms": result.latency.p95,
            "errors": result.errors, "requests": result.requests}


def identify_throughput(env: dict[str, str], portrait: bytes, replicas: int, requests: int) -> dict:
    def identify(client):
        return client.post("/identify", files={"image": ("q.jpg", portrait, "image/jpeg")})

    servers = [ServerProcess(env) for _ in range(replicas)]
    started = []
    try:
        for server in servers:
            started.append(server.__enter__())
        result = load([s.url for s in servers], identify, CLIENTS, requests)
    finally:
        for server in started:
            server.__exit__(None, None, None)
    return {"replicas": replicas, "rps": result.throughput, "p50_ms": result.latency.p50,
            "p95_ms": result.latency.p95, "errors": result.errors, "requests": result.requests}


def run(models_dir: Path, portrait: bytes, *, faces: int = 20_000, enrolments: int = 300,
        http_requests: int = 60, identify_requests: int = 120) -> dict:
    import pgserver
    import psycopg

    from benchmarks import pg_search, suites
    from service.embedder import Embedder
    from service.gallery import Gallery
    from service.pg_gallery import PostgresGallery

    embedder = Embedder(models_dir / "mobilefacenet_192.onnx")
    sha, d = embedder.model_id, embedder.embedding_size
    folder = Path(tempfile.mkdtemp(prefix="facerec-scaleout-"))
    server = pgserver.get_server(str(folder / "pg"), cleanup_mode="delete")
    base = {"FACE_MODELS_DIR": str(models_dir.resolve()), "FACE_LOG_LEVEL": "warning"}
    base = {**base, **{k: v for k, v in os.environ.items() if k == "BENCH_SERVER_LOG"}}

    def database(name: str) -> str:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return server.get_uri(name)

    out: dict = {"faces": faces, "clients": CLIENTS}
    try:
        # Both stores hold `faces` faces first: an enrolment into PostgreSQL also inserts into the HNSW graph,
        # whose cost grows with the graph.
        rng = np.random.default_rng(0)
        sqlite_path = folder / "gallery.db"
        suites.fill_gallery(sqlite_path, faces, d, sha)
        url = database("gallery")
        with PostgresGallery(url, sha, d):  # the schema and the model's index, as a server creates them
            pass
        pg_search.fill(url, pg_search.clustered_gallery(faces, rng)[0], sha)
        with Gallery(sqlite_path, sha, d) as gallery:
            out["store_sqlite"] = store_enrol_rate(gallery, enrolments, rng)
        with PostgresGallery(url, sha, d) as gallery:
            out["store_pg"] = store_enrol_rate(gallery, enrolments, rng)
        for name, store in (("sqlite", f"sqlite:///{sqlite_path}"), ("pg", url)):
            out[f"http_{name}"] = http_enrol({**base, "FACE_GALLERY_URL": store}, portrait, http_requests)
        out["identify"] = [identify_throughput({**base, "FACE_GALLERY_URL": url}, portrait, n, identify_requests)
                           for n in (1, 2)]
    finally:
        server.cleanup()
    print_figures(out)
    return out


def print_figures(out: dict) -> None:
    for name, label in (("store_sqlite", "SQLite"), ("store_pg", "PostgreSQL")):
        r = out[name]
        print(f"  enrol in the store, {label}: {r['rate']:.0f} enrolments/s (p50 {r['p50_ms']:.2f} ms, "
              f"p95 {r['p95_ms']:.2f} ms, {r['n']} enrolments, one caller)", flush=True)
    for name, label in (("http_sqlite", "SQLite"), ("http_pg", "PostgreSQL")):
        r = out[name]
        print(f"  POST /enroll, {label}, c={out['clients']}: {r['rate']:.1f} enrolments/s (p50 {r['p50_ms']:.0f} "
              f"ms, p95 {r['p95_ms']:.0f} ms, {r['requests']} requests, {r['errors']} errors)", flush=True)
    for r in out["identify"]:
        print(f"  /identify, {r['replicas']} replica(s) on one database ({out['faces']:,} faces), "
              f"c={out['clients']}: {r['rps']:.1f} req/s (p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, "
              f"{r['requests']} requests, {r['errors']} errors)", flush=True)


def report_lines(out: dict | None, table) -> list[str]:
    """The BENCHMARKS.md section."""
    if not out:
        return []
    single = out["identify"][0]["rps"]
    return [
        "## Enrolment rate and replicas on one database",
        "",
        (f"Enrolment in the store: `enroll` called directly on a gallery already holding {out['faces']:,} faces "
         f"(SQLite: one face per identity; PostgreSQL: the clustered gallery, {out['faces'] // 4:,} identities of 4 "
         "faces, so as many templates in its graph), "
         "one caller, one new identity with one face per call, each a transaction committed to disk before it "
         "returns (both stores; PostgreSQL also inserts the new template into the HNSW graph). POST /enroll: one 640x480 "
         f"portrait per request, {out['clients']} clients, `python -m service` on each store (detection, "
          "alignment and embedding included), same galleries."),
        "",
        *table(["store", "enrol in the store /s", "store p50 ms", "store p95 ms", "POST /enroll /s",
                "/enroll p50 ms", "/enroll p95 ms", "errors"],
               [[label, f"{out['store_' + k]['rate']:.0f}", f"{out['store_' + k]['p50_ms']:.2f}",
                 f"{out['store_' + k]['p95_ms']:.2f}", f"{out['http_' + k]['rate']:.1f}",
                 f"{out['http_' + k]['p50_ms']:.0f}", f"{out['http_' + k]['p95_ms']:.0f}",
                 out["http_" + k]["errors"]]
                for k, label in (("sqlite", "SQLite"), ("pg", "PostgreSQL"))]),
        "",
        (f"/identify throughput on one PostgreSQL database of {out['faces']:,} faces (clustered synthetic "
         f"gallery), one portrait per request, {out['clients']} clients; with two replicas each client keeps "
         "its connection to one of them, in turn. Both replicas run on this same machine, so they share its "
         "cores: the ratio says what a second process adds here, not what a second machine would."),
        "",
        *table(["replicas", "req/s", "x one replica", "p50 ms", "p95 ms", "requests", "errors"],
               [[r["replicas"], f"{r['rps']:.1f}", f"{r['rps'] / single:.2f}", f"{r['p50_ms']:.0f}",
                 f"{r['p95_ms']:.0f}", r["requests"], r["errors"]] for r in out["identify"]]),
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    from benchmarks import suites

    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale_out", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path(os.environ.get("FACE_MODELS_DIR",
                                                                                ROOT / "artifacts/models")))
    parser.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "faces")
    parser.add_argument("--faces", type=int, default=20_000)
    parser.add_argument("--out", type=Path, help="update this section of that Markdown file (BENCHMARKS.md)")
    args = parser.parse_args(argv)
    import cv2

    from benchmarks.__main__ import table
    from benchmarks.harness import write_section_alone

    portrait = suites.jpeg(suites.letterbox(cv2.imread(str(args.photos / "pairs" / "img20.jpg")), 640, 480))
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    load_before = os.getloadavg()
    out = run(args.models_dir, portrait, faces=args.faces)
    if args.out:
        write_section_alone(args.out, report_lines(out, table), "python -m benchmarks.scale_out --out BENCHMARKS.md",
                            started, load_before[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
