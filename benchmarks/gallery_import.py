"""Bulk import rate: `python -m benchmarks.gallery_import` loads synthetic identities into a fresh gallery through
the code `python -m service.gallery_io import` runs (its readers and `GalleryStore.import_identities`), and prints
identities per second.

Inputs are written first (not timed): N random unit embeddings (192-d float32, one face per identity) as a `.npy`
matrix with an ids file, and as JSON Lines with base64 embeddings (what `export` writes). Then, each timed from
the open file to the last commit: the .npy import and the JSON Lines import into new SQLite galleries, the same
import run again on the full gallery (everything skipped: what a resumed import pays for the part already done),
and the baseline, `GalleryStore.enroll` one identity at a time (one fsync-ed transaction each, as /enroll does),
on a few hundred identities. `--postgres N` adds the .npy import of N identities into PostgreSQL (pgserver).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from service.gallery import Gallery, GalleryStore
from service.gallery_io import BATCH_SIZE, import_identities, read_jsonl, read_npy

D = 192
MODEL = "f" * 64  # a model id: the readers and the store check that input and gallery agree on it


def write_inputs(folder: Path, n: int, formats: set[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    matrix = np.lib.format.open_memmap(folder / "faces.npy", mode="w+", dtype="<f4", shape=(n, D)) \
        if "npy" in formats else None
    with open(folder / "ids.txt", "w") as ids, open(folder / "faces.jsonl", "w") as jsonl:
        for start in range(0, n, 100_000):
            chunk = rng.standard_normal((min(100_000, n - start), D), dtype=np.float32)
            chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
            names = [f"person-{i:07d}" for i in range(start, start + len(chunk))]
            if matrix is not None:
                matrix[start:start + len(chunk)] = chunk
                ids.write("\n".join(names) + "\n")
            if "jsonl" in formats:
                jsonl.writelines(
                    json.dumps({"identity_id": name, "model_sha256": MODEL,
                                "embeddings": [base64.b64encode(vector.tobytes()).decode("ascii")]}) + "\n"
                    for name, vector in zip(names, chunk)
                )
    if matrix is not None:
        matrix.flush()


def timed_import(gallery: GalleryStore, folder: Path, fmt: str, batch_size: int) -> tuple[dict, float, float]:
    """Counts, wall seconds and this process's CPU seconds: on a shared machine the wall rate is what this process
    got; the CPU time is what the work costs."""
    started, cpu = time.perf_counter(), time.process_time()
    if fmt == "npy":
        _, items = read_npy(folder / "faces.npy", folder / "ids.txt", MODEL)
        counts = import_identities(gallery, items, "ids.txt", batch_size=batch_size, unique=True)
    else:
        with open(folder / "faces.jsonl", "rb") as stream:
            counts = import_identities(gallery, read_jsonl(stream, MODEL, D, "faces.jsonl"), "faces.jsonl",
                                       batch_size=batch_size)
    return counts, time.perf_counter() - started, time.process_time() - cpu


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(n: int, formats: list[str], batch_size: int, baseline: int, postgres: int, folder: Path) -> list[dict]:
    rows = []
    print(f"writing inputs: {n:,} identities ({', '.join(formats)}) in {folder}", flush=True)
    write_inputs(folder, n, set(formats))
    print(f"load average before: {load_average()}", flush=True)
    for fmt in formats:
        path = folder / f"{fmt}.db"
        with Gallery(path, MODEL, D) as gallery:
            counts, elapsed, cpu = timed_import(gallery, folder, fmt, batch_size)
            assert counts["added"] == n and len(gallery) == n, counts
            rows.append({"store": "SQLite", "what": f"import {fmt}", "identities": n, "s": elapsed, "cpu_s": cpu,
                         "load": load_average()})
            print(f"  SQLite, {fmt}: {n:,} identities in {elapsed:.1f} s = {n / elapsed:,.0f} identities/s; CPU "
                  f"{cpu:.1f} s = {n / cpu:,.0f} identities per CPU second (load {load_average()})", flush=True)
            if fmt == formats[0]:
                counts, elapsed, cpu = timed_import(gallery, folder, fmt, batch_size)
                assert counts["skipped"] == n, counts
                rows.append({"store": "SQLite", "what": f"import {fmt} again (all skipped)", "identities": n,
                             "s": elapsed, "cpu_s": cpu, "load": load_average()})
                print(f"  SQLite, {fmt} again, all {n:,} skipped: {elapsed:.1f} s = {n / elapsed:,.0f} identities/s; "
                      f"CPU {cpu:.1f} s", flush=True)
        started = time.perf_counter()
        with Gallery(path, MODEL, D) as gallery:
            opened = time.perf_counter() - started
            print(f"  reopened (what a server start does): {opened:.1f} s; file {path.stat().st_size / 1e6:,.0f} MB",
                  flush=True)
        rows[-1 if fmt != formats[0] else -2]["file_mb"] = path.stat().st_size / 1e6
        rows[-1 if fmt != formats[0] else -2]["open_s"] = opened
        path.unlink()
    if baseline:
        rng = np.random.default_rng(1)
        vectors = rng.standard_normal((baseline, D), dtype=np.float32)
        with Gallery(folder / "enroll.db", MODEL, D) as gallery:
            started, cpu = time.perf_counter(), time.process_time()
            for i, vector in enumerate(vectors):
                gallery.enroll(f"person-{i:07d}", vector[None])
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        rows.append({"store": "SQLite", "what": "enroll() one at a time (baseline)", "identities": baseline,
                     "s": elapsed, "cpu_s": cpu, "load": load_average()})
        print(f"  SQLite, enroll() one identity per transaction: {baseline:,} in {elapsed:.1f} s = "
              f"{baseline / elapsed:,.0f} identities/s", flush=True)
    if postgres:
        rows += run_postgres(postgres, folder, batch_size)
    print(f"load average after: {load_average()}", flush=True)
    return rows


def run_postgres(n: int, folder: Path, batch_size: int) -> list[dict]:
    """The .npy import of the first n identities into PostgreSQL, twice: each template inserted into the HNSW index
    as it comes, and with the index deferred (`--defer-index`: dropped, then built once; the build is timed too)."""
    import pgserver
    import psycopg

    from service.pg_gallery import PostgresGallery

    server_dir = Path(tempfile.mkdtemp(prefix="facerec-bench-pg-"))
    server = pgserver.get_server(str(server_dir), cleanup_mode="stop")
    try:
        subset = folder / "pg"
        subset.mkdir(exist_ok=True)
        np.save(subset / "faces.npy", np.load(folder / "faces.npy", mmap_mode="r")[:n])
        (subset / "ids.txt").write_text("".join(f"person-{i:07d}\n" for i in range(n)))
        rows = []
        for deferred in (False, True):
            name = f"bench_import_{int(deferred)}"
            with psycopg.connect(server.get_uri(), autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {name}")
            with PostgresGallery(server.get_uri(name), MODEL, D) as gallery:
                started = time.perf_counter()
                with gallery.search_index_deferred() if deferred else contextlib.nullcontext():
                    counts, _, cpu = timed_import(gallery, subset, "npy", batch_size)
                elapsed = time.perf_counter() - started
            assert counts["added"] == n, counts
            what = "import npy, --defer-index (index built at the end)" if deferred else "import npy"
            print(f"  PostgreSQL, {what}: {n:,} identities in {elapsed:.1f} s = {n / elapsed:,.0f} identities/s "
                  f"(client CPU {cpu:.1f} s; the server's is not counted)", flush=True)
            rows.append({"store": "PostgreSQL", "what": what, "identities": n, "s": elapsed, "cpu_s": cpu,
                         "load": load_average()})
        return rows
    finally:
        server.cleanup()
        shutil.rmtree(server_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gallery_import", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=1_000_000)
    parser.add_argument("--formats", default="npy,jsonl", help="npy, jsonl or both, in that order")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--baseline", type=int, default=300, help="identities enrolled one at a time (0: none)")
    parser.add_argument("--postgres", type=int, default=0, help="also import this many into PostgreSQL (pgserver)")
    parser.add_argument("--dir", type=Path, help="where the inputs and galleries go (default: a temporary folder)")
    args = parser.parse_args(argv)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="facerec-bench-import-"))
    folder.mkdir(parents=True, exist_ok=True)
    formats = [f for f in args.formats.split(",") if f]
    if args.postgres and "npy" not in formats:
        parser.error("--postgres imports the .npy input: include npy in --formats")
    try:
        rows = run(args.identities, formats, args.batch_size, args.baseline, args.postgres, folder)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    print("\n| store | what | identities | seconds | identities/s | CPU s (this process) | load average after |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['store']} | {r['what']} | {r['identities']:,} | {r['s']:.1f} | {r['identities'] / r['s']:,.0f} "
              f"| {r['cpu_s']:.1f} | {r['load']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
