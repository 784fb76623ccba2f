"""Which pgvector index, with which settings, finds what exact search finds at a million faces: the measurements
behind the index parameters in service/pg_gallery.py (BENCHMARKS.md, "Index options at 1M faces").

Long: every index build at 250,000 templates takes minutes on 2 cores, so the steps run one at a time against a
private PostgreSQL 16 + pgvector 0.6.2 (the `pgserver` wheel) kept running in `--pgdata` between them:

    python -m benchmarks.pg_index_options --pgdata /tmp/pgopts load             # both galleries, once (or: load lfw)
    python -m benchmarks.pg_index_options --pgdata /tmp/pgopts hnsw syn 16 64 40,100,200,400
    python -m benchmarks.pg_index_options --pgdata /tmp/pgopts ivfflat lfw 1000 1,4,16,64
    python -m benchmarks.pg_index_options --pgdata /tmp/pgopts exact syn
    python -m benchmarks.pg_index_options --pgdata /tmp/pgopts stop
    python -m benchmarks.pg_index_options --pgdata /tmp/pgopts report intro.md   # the section, into BENCHMARKS.md

Each prints one JSON line per setting (and appends it to `<pgdata>/results.jsonl`).

Two galleries of 1,000,000 faces (250,000 identities, 4 faces each, one template row per identity: the normalised
mean of its faces, what the service's index holds), 200 queries each a new photo of an enrolled person:
- `syn`: benchmarks/pg_search.py's clustered gallery (families of 20 look-alikes in isotropic 192-d noise);
- `lfw`: drawn from lfw-dev's real embeddings' statistics (pg_search.EmbeddingShape): `make evaluate` leaves them
  in artifacts/eval/identify/embeddings.npz; without that file they are computed (minutes).
The table is a plain `(id, v vector(192))`: the same index and the same distance as the service's partial index
over its templates, without the join that the service adds for the display name.

Figures: search p50/p95 (one query, top 5, second pass over the queries); match recall at the threshold (syn: 0.4;
lfw: 0.41, the default embedder's 1:1 threshold, and the /identify threshold the service would use at 250,000
identities, FPIR 1 %: `match_recall_<t>`); recall@5 and top-1 agreement against exact search (numpy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import pg_search as ps
from benchmarks.harness import replace_section

ROOT = Path(__file__).resolve().parents[1]
N_FACES = 1_000_000
QUERIES = 200


def lfw_embeddings(models_dir: Path, lfw_images: Path) -> tuple[np.ndarray, np.ndarray]:
    from evaluate.people import embed_people
    from service.detector import RetinaFaceDetector
    from service.embedder import Embedder
    from service.pipeline import Pipeline

    pipeline = Pipeline(RetinaFaceDetector(models_dir / "retinaface_mnet025.onnx"),
                        Embedder(models_dir / "mobilefacenet_192.onnx"))
    people = embed_people(pipeline, lfw_images, face="central",
                          cache=ROOT / "artifacts" / "eval" / "identify" / "embeddings.npz", progress=True)
    return people.embeddings, people.labels


def identify_threshold(models_dir: Path, identities: int) -> float:
    """/identify's threshold at that gallery size with the default policy (FPIR 1 %, the embedder's FAR table)."""
    from service.decision import IdentifyPolicy
    from service.embedder import Embedder

    embedder = Embedder(models_dir / "mobilefacenet_192.onnx")
    return round(IdentifyPolicy(embedder.far_table, 0.01, embedder.threshold).decide(identities).threshold, 3)


def datasets(models_dir: Path, lfw_images: Path, names=("syn", "lfw")
             ) -> dict[str, tuple[np.ndarray, np.ndarray, list[float]]]:
    """name -> (templates (N/4, D), probes (200, D), thresholds)."""
    out = {}
    if "syn" in names:
        rng = np.random.default_rng(0)
        faces, centres = ps.clustered_gallery(N_FACES, rng)
        planted = rng.choice(len(centres), size=QUERIES, replace=False)
        out["syn"] = (ps.templates_of(faces).astype(np.float32), ps.photo(centres[planted], rng),
                      [ps.MATCH_THRESHOLD])
    if "lfw" not in names:
        return out
    embeddings, labels = lfw_embeddings(models_dir, lfw_images)
    rng = np.random.default_rng(0)
    faces, centres, shape = ps.lfw_shaped_gallery(N_FACES, embeddings, labels, rng)
    planted = rng.choice(len(centres), size=QUERIES, replace=False)
    out["lfw"] = (ps.templates_of(faces).astype(np.float32), shape.photo(centres[planted], rng),
                  [ps.LFW_THRESHOLD, identify_threshold(models_dir, len(centres))])
    return out


class Bench:
    def __init__(self, pgdata: Path):
        import pgserver

        self.dir = pgdata
        self.server = pgserver.get_server(str(pgdata / "data"), cleanup_mode=None)  # kept between steps
        self.server.psql("create extension if not exists vector;")

    def connect(self):
        import psycopg
        from pgvector.psycopg import register_vector

        conn = psycopg.connect(self.server.get_uri(), autocommit=True)
        register_vector(conn)
        return conn

    def record(self, row: dict) -> None:
        row = {**row, "load": round(os.getloadavg()[0], 2), "at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
        print(json.dumps(row), flush=True)
        with open(self.dir / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def load(self, models_dir: Path, lfw_images: Path, names: list[str]) -> None:
        with self.connect() as conn:
            for name, (templates, probes, thresholds) in datasets(models_dir, lfw_images, names).items():
                np.savez(self.dir / f"{name}.npz", templates=templates, probes=probes, thresholds=thresholds)
                conn.execute(f"DROP TABLE IF EXISTS {name}")
                conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v vector({templates.shape[1]}))")
                with conn.cursor().copy(f"COPY {name} (id, v) FROM STDIN WITH (FORMAT BINARY)") as copy:
                    copy.set_types(["int4", "vector"])
                    for i, v in enumerate(templates):
                        copy.write_row((i, v))
                conn.execute(f"VACUUM ANALYZE {name}")
                print(f"loaded {name}: {len(templates)} templates, thresholds {thresholds}", flush=True)

    def build(self, conn, name: str, using: str, label: str) -> None:
        conn.execute(f"DROP INDEX IF EXISTS {name}_idx")
        conn.execute("SET maintenance_work_mem = '4GB'")  # the whole graph in memory: no slow on-disk phase
        conn.execute("SET max_parallel_maintenance_workers = 2")
        started = time.perf_counter()
        conn.execute(f"CREATE INDEX {name}_idx ON {name} USING {using}")
        self.record({"table": name, "index": label, "build_s": round(time.perf_counter() - started, 1)})

    def evaluate(self, conn, name: str, setting: str, values: list[int], label: str) -> None:
        with np.load(self.dir / f"{name}.npz") as z:
            templates, probes, thresholds = z["templates"], z["probes"], [float(t) for t in z["thresholds"]]
        scores = probes @ templates.T
        exact5 = [ps.exact_top(s, 5, None) for s in scores]
        for value in values:
            conn.execute(f"SET {setting} = {int(value)}")
            got, times = [], []
            for rep in range(2):  # the first pass warms the cache; the second is timed
                for q in probes:
                    started = time.perf_counter()
                    rows = conn.execute(f"SELECT id, 1 - (v <=> %s) FROM {name} ORDER BY v <=> %s LIMIT 5",
                                        (q, q)).fetchall()
                    times.append(time.perf_counter() - started)
                    if rep == 0:
                        got.append(rows)
            ms = 1000 * np.array(times[len(probes):])
            row = {"table": name, "index": label, "setting": setting, "value": value,
                   "p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2),
                   "recall5": sum(len({i for i, _ in g} & set(w)) for g, w in zip(got, exact5)) / (5 * len(probes)),
                   "top1": sum(bool(g) and g[0][0] == w[0] for g, w in zip(got, exact5)) / len(probes)}
            for t in thresholds:
                want = [ps.exact_top(s, 5, t) for s in scores]
                found = sum(len({i for i, s in g if s >= t} & set(w)) for g, w in zip(got, want))
                row[f"match_recall_{t:g}"] = found / max(1, sum(map(len, want)))
                row[f"pairs_{t:g}"] = sum(map(len, want))
            self.record(row)


SECTION = "## Index options at 1M faces"


def report_lines(results: list[dict], intro: list[str]) -> list[str]:
    """The BENCHMARKS.md section from the recorded results (the last measurement of each setting wins)."""
    from benchmarks.__main__ import table

    builds = {(r["table"], r["index"]): r for r in results if "build_s" in r}
    rows = {(r["table"], r["index"], r["value"]): r for r in results if "setting" in r}
    lines = [SECTION, "", *intro, ""]
    for name, title in (("syn", "Clustered synthetic gallery (as in the table above)"),
                        ("lfw", "Gallery shaped like lfw-dev's real embeddings")):
        picked = [r for key, r in rows.items() if key[0] == name]
        if not picked:
            continue
        thresholds = sorted({k[len("match_recall_"):] for r in picked for k in r if k.startswith("match_recall_")})
        lines += [f"{title}:", "", *table(
            ["index", "build s (load)", "search setting", "p50 ms", "p95 ms",
             *[f"match recall at {t}" for t in thresholds], "recall@5", "top-1 as exact", "load"],
            [[r["index"], (f"{builds[(name, r['index'])]['build_s']:.0f} ({builds[(name, r['index'])]['load']:.1f})"
                           if (name, r["index"]) in builds else "n/a"),
              f"{r['setting']} {r['value']}", f"{r['p50']:.1f}", f"{r['p95']:.1f}",
              *[f"{r['match_recall_' + t]:.4f}" if "match_recall_" + t in r else "n/a" for t in thresholds],
              f"{r['recall5']:.4f}", f"{r['top1']:.3f}" if "top1" in r else "n/a", f"{r['load']:.1f}"]
             for r in sorted(picked, key=lambda r: (r["index"], r["setting"], r["value"]))]), ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pg_index_options", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pgdata", type=Path, required=True, help="a folder for the server, kept between steps")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "artifacts" / "models")
    parser.add_argument("--lfw", type=Path, default=ROOT.parent / "shared" / "data" / "lfw-dev" / "images")
    parser.add_argument("step", choices=("load", "hnsw", "ivfflat", "exact", "report", "stop"))
    parser.add_argument("args", nargs="*", help="hnsw TABLE M EF_CONSTRUCTION EF_SEARCHES | ivfflat TABLE LISTS "
                        "PROBES | exact TABLE; add `reuse` to measure the index already built | report INTRO.md "
                        "(the section's text: the table goes after it, into --out)")
    parser.add_argument("--note", default="", help="added to the index's label (e.g. a server setting changed)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="report: the file to update")
    a = parser.parse_args(argv)
    if a.step == "report":
        results = [json.loads(line) for line in (a.pgdata / "results.jsonl").read_text().splitlines() if line]
        intro = Path(a.args[0]).read_text().strip().split("\n\n") if a.args else []
        replace_section(a.out, report_lines(results, [p for para in intro for p in (para, "")][:-1]))
        print(f"wrote {SECTION!r} into {a.out}")
        return 0
    a.pgdata.mkdir(parents=True, exist_ok=True)
    bench = Bench(a.pgdata)
    if a.step == "stop":  # a fast shutdown by the postmaster's pid (pg_ctl refuses to run as root)
        import signal

        os.kill(int((a.pgdata / "data" / "postmaster.pid").read_text().split()[0]), signal.SIGINT)
        return 0
    if a.step == "load":
        bench.load(a.models_dir, a.lfw, a.args or ["syn", "lfw"])
        return 0
    name, reuse = a.args[0], a.args[-1] == "reuse"
    if name not in ("syn", "lfw"):
        print("TABLE is syn or lfw", file=sys.stderr)
        return 2
    with bench.connect() as conn:
        if a.step == "hnsw":
            m, ef_construction, searches = int(a.args[1]), int(a.args[2]), a.args[3]
            label = f"hnsw m{m} ef_construction {ef_construction}"
            if not reuse:
                bench.build(conn, name, f"hnsw (v vector_cosine_ops) WITH (m = {m}, ef_construction = "
                            f"{ef_construction})", label)
            bench.evaluate(conn, name, "hnsw.ef_search", [int(x) for x in searches.split(",")], label + a.note)
        elif a.step == "ivfflat":
            lists, probes = int(a.args[1]), a.args[2]
            label = f"ivfflat lists {lists}"
            if not reuse:
                bench.build(conn, name, f"ivfflat (v vector_cosine_ops) WITH (lists = {lists})", label)
            bench.evaluate(conn, name, "ivfflat.probes", [int(x) for x in probes.split(",")], label + a.note)
        else:  # a sequential scan: exact in the database, one process, then with 2 parallel workers
            conn.execute(f"DROP INDEX IF EXISTS {name}_idx")
            bench.evaluate(conn, name, "max_parallel_workers_per_gather", [0, 2], "exact (no index)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
