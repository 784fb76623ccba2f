"""1:N search through the SQLite gallery's ANN index (service/template_index.py) at 100k to 10M faces.

`python -m benchmarks` runs this as one step (`--ann-sizes`); alone, it replaces only its section:
`python -m benchmarks.ann --sizes 100000,1000000 --out BENCHMARKS.md`.

Two synthetic galleries per size, filled through the bulk-import path (`Gallery.import_identities`):
- **uniform**: one face per identity, uniform random unit vectors (the worst case for memory: a template per face);
- **clustered**: identities with 1-5 faces (uniformly drawn) around identity centres, drawn from a Gaussian fitted to
  the default embedder's real lfw-dev embeddings (`pg_search.EmbeddingShape`: their between- and within-identity
  covariances, so same-person and different-person cosines and the uneven spectrum are the real ones).
Each with 200 planted queries: a new photo of an enrolled identity (clustered: drawn like its faces; uniform: 0.75
cosine from its face, about the real same-person median).

Exact reference: every template (the normalised sum of an identity's faces) scored against every query as the gallery
is generated, a chunk at a time. Match recall: of the identities exact search puts at or above /identify's threshold
for that gallery size (the default policy, FPIR 1 %), the share the indexed gallery returns with that threshold;
recall@5: the share of exact search's top 5 it returns (no threshold). Search: `Gallery.search`, one query, top 5,
in this process. Build: the background build a gallery opened on the filled database starts (from its in-memory
templates). Start-up: opening the gallery again, with the persisted index. Then, at the sizes given by
`--http-sizes`, `python -m service` on that database: its time to /ready, /identify p50 over HTTP (one face,
concurrency 1) and its resident memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import ROOT, measure

D = 192
QUERIES = 200
UNIFORM_SAME_PERSON = 0.75
CHUNK = 50_000  # identities generated, imported and scored at a time
KINDS = ("uniform", "clustered")
# Measured once by benchmarks/ann_libraries.py (it takes many minutes: graph builds); a rewrite keeps it.
LIBRARIES_SECTION = "## ANN libraries compared"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Draw:
    """A synthetic gallery drawn a chunk of identities at a time (each chunk from its own seed), with the planted
    identities' centres drawn first so that the queries are known before the gallery is."""

    def __init__(self, kind: str, faces: int, shape, seed: int = 0):
        self.kind, self.shape, self.seed = kind, shape, seed
        rng = np.random.default_rng([seed, 1])
        if kind == "uniform":
            self.counts = np.ones(faces, dtype=np.int64)
        else:
            counts = rng.integers(1, 6, size=faces // 2 + 10)
            ends = np.cumsum(counts)
            n = int(np.searchsorted(ends, faces)) + 1
            counts = counts[:n]
            counts[-1] -= int(ends[n - 1] - faces)
            self.counts = counts[counts > 0]
        self.identities = len(self.counts)
        self.planted = np.sort(rng.choice(self.identities, size=min(QUERIES, self.identities), replace=False))
        self.planted_centres = self._centres(len(self.planted), rng)
        if kind == "uniform":
            noise = _unit(rng.standard_normal((len(self.planted), D)))
            c = UNIFORM_SAME_PERSON
            self.queries = _unit(c * self.planted_centres + np.sqrt(1 - c * c) * noise).astype(np.float32)
        else:
            self.queries = shape.photo(self.planted_centres, rng)

    def _centres(self, n: int, rng) -> np.ndarray:
        return _unit(rng.standard_normal((n, D))) if self.kind == "uniform" else self.shape.centres(n, rng)

    def chunks(self):
        """(first identity, ids, faces (sum of counts, D) float32 identity after identity, counts, templates)"""
        for first in range(0, self.identities, CHUNK):
            rng = np.random.default_rng([self.seed, 2, first])
            counts = self.counts[first:first + CHUNK]
            centres = self._centres(len(counts), rng)
            mine = (self.planted >= first) & (self.planted < first + len(counts))
            centres[self.planted[mine] - first] = self.planted_centres[mine]
            if self.kind == "uniform":
                faces = centres.astype(np.float32)
            else:
                owner = np.repeat(np.arange(len(counts)), counts)
                faces = self.shape.photo(centres[owner], rng)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            sums = faces if self.kind == "uniform" else np.add.reduceat(faces.astype(np.float64), starts, axis=0)
            ids = [f"{self.kind[0]}{i:09d}" for i in range(first, first + len(counts))]
            yield first, ids, faces, counts, _unit(sums).astype(np.float32)


class Reference:
    """Exact search's answers for the queries, accumulated chunk by chunk."""

    def __init__(self, queries: np.ndarray, thresholds: dict[str, float]):
        self.q = queries
        self.best = np.full((len(queries), 5), -np.inf)
        self.best_ids = np.full((len(queries), 5), -1, dtype=np.int64)
        self.thresholds = thresholds
        self.matches: dict[str, list[set[int]]] = {k: [set() for _ in queries] for k in thresholds}

    def add(self, first: int, templates: np.ndarray) -> None:
        scores = self.q @ templates.T
        top = np.argpartition(-scores, 5, axis=1)[:, :5] if scores.shape[1] > 5 else np.indices(scores.shape)[1]
        both = np.hstack([self.best, np.take_along_axis(scores, top, 1)])
        both_ids = np.hstack([self.best_ids, top + first])
        top = np.argsort(-both, axis=1, kind="stable")[:, :5]
        self.best, self.best_ids = np.take_along_axis(both, top, 1), np.take_along_axis(both_ids, top, 1)
        for name, t in self.thresholds.items():
            for qi, col in zip(*np.nonzero(scores >= t)):
                self.matches[name][qi].add(first + int(col))


def fill(path: Path, draw: Draw, model: str, reference: Reference) -> float:
    from service.gallery import Gallery, ImportedIdentity

    started = time.perf_counter()
    with Gallery(path, model, D) as gallery:
        # Room for every template at once: growing by doubling would hold 1.7 times the matrix at 10M (13 GB).
        gallery._reserve(draw.identities)
        for first, ids, faces, counts, templates in draw.chunks():
            ends = np.cumsum(counts)
            gallery.import_identities([ImportedIdentity(i, faces[e - k:e], model)
                                       for i, k, e in zip(ids, counts.tolist(), ends.tolist())])
            reference.add(first, templates)
            if first and first % 1_000_000 == 0:
                print(f"    {first:,} identities in {time.perf_counter() - started:.0f} s", flush=True)
    return time.perf_counter() - started


def _recall(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _recall_at(entry) -> str:
    """(recall, pairs, threshold) -> "0.9950 at 0.41 (200 pairs)"."""
    return "n/a" if entry is None else f"{_recall(entry[0])} ({entry[2]}, {entry[1]})"


def identify_threshold(models_dir: Path, identities: int) -> float:
    from service.decision import IdentifyPolicy
    from service.embedder import Embedder

    embedder = Embedder(models_dir / "mobilefacenet_192.onnx")
    return round(IdentifyPolicy(embedder.far_table, 0.01, embedder.threshold).decide(identities).threshold, 3)


def one_to_one_threshold(models_dir: Path) -> float:
    """The embedder's 1:1 threshold: the lowest /identify applies (a small gallery)."""
    from service.embedder import Embedder

    return round(float(Embedder(models_dir / "mobilefacenet_192.onnx").threshold), 3)


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.glob("*")) / 2**20 if path.exists() else 0.0


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (Linux, as root), for a start-up as cold as after a reboot; False where this
    process may not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as switch:
            switch.write("3\n")
    except OSError:
        return False
    return True


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def measure_gallery(path: Path, draw: Draw, reference: Reference, model: str, nprobes: tuple[int | None, ...],
                    repeat: int, exact: bool) -> list[dict]:
    """nprobes: cells scanned per query; None: the service's default for the index's cell count."""
    from service.gallery import Gallery
    from service.template_index import IndexOptions, index_folder

    shipped = IndexOptions()
    options = dataclasses.replace(shipped, min_identities=1)
    exact_ms = None
    queries = draw.queries
    if exact:  # the baseline: the same gallery searched exactly (no index)
        with Gallery(path, model, D) as gallery:
            turn = iter(range(10**9))
            exact_ms = measure(lambda: gallery.search(queries[next(turn) % len(queries)], top_k=5), repeat).p50
    started = time.perf_counter()
    with Gallery(path, model, D, index=options) as gallery:
        opened = time.perf_counter()
        assert gallery.wait_for_index(), "the index build failed (see the log)"
        build_s = time.perf_counter() - opened
        load_s = opened - started
    # The build leaves gigabytes of dirty pages at 10M: a start-up timed while the kernel writes them back
    # measures the disk's write-back (103 s once here), not the start-up. Then a start-up from an empty page cache,
    # as after a reboot, where this process may empty it.
    started = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - started
    cold_s = check_s = None
    if drop_page_cache():
        started = time.perf_counter()
        with Gallery(path, model, D, index=options) as gallery:
            cold_s = time.perf_counter() - started
            assert gallery.index_in_use
            # The database's totals are counted after the open, beside the serving gallery: when that is done.
            gallery.wait_for_check()
            check_s = time.perf_counter() - started
    rows = []
    for nprobe in nprobes:
        started = time.perf_counter()
        with Gallery(path, model, D, index=dataclasses.replace(options, nprobe=nprobe)) as gallery:
            startup_s = time.perf_counter() - started
            assert gallery.index_in_use
            # Steady state: the start-up check of the database's totals (a scan of every row, reported above as
            # "database check done at") runs beside the first searches and takes a core from them; searches are
            # timed once it is done.
            gallery.wait_for_check()
            cells = gallery._snap.nprobe(nprobe)  # what the index scans for this setting (None: its default)
            found = {name: gallery.search(queries, top_k=5, threshold=t) for name, t in reference.thresholds.items()}
            top5 = gallery.search(queries, top_k=5)
            turn = iter(range(10**9))
            one_query = lambda g=gallery, turn=turn: g.search(queries[next(turn) % len(queries)], top_k=5)
            t = measure(one_query, repeat)
        number = lambda m: int(m.identity_id[1:])
        recall = {}
        for name, got_all in found.items():
            want = reference.matches[name]
            hits = sum(len({number(m) for m in got} & w) for got, w in zip(got_all, want))
            pairs = sum(len(w) for w in want)
            recall[name] = (hits / pairs if pairs else None, pairs, reference.thresholds[name])
        threshold, (match_recall, pairs, _) = reference.thresholds["identify"], recall["identify"]
        hit5 = sum(len({number(m) for m in got} & set(w.tolist())) for got, w in zip(top5, reference.best_ids))
        rows.append({
            "kind": draw.kind, "faces": int(draw.counts.sum()), "identities": draw.identities,
            "nprobe": cells, "default": nprobe is None, "threshold": threshold, "match_recall": match_recall,
            "recall_1to1": recall.get("1:1"),
            "match_pairs": pairs, "recall_at_5": hit5 / (5 * len(queries)), "p50_ms": t.p50, "p95_ms": t.p95,
            "exact_ms": exact_ms, "build_s": build_s, "load_s": load_s, "startup_s": startup_s,
            "cold_startup_s": cold_s, "cold_check_s": check_s, "sync_s": sync_s,
            "index_mb": folder_mb(index_folder(path)), "db_mb": path.stat().st_size / 2**20,
            "load": os.getloadavg()[0],
        })
        r = rows[-1]
        print(f"  {r['kind']:>9} {r['faces']:>10,} faces ({r['identities']:,} identities), nprobe {r['nprobe']}: "
              f"p50 {r['p50_ms']:.2f} ms (p95 {r['p95_ms']:.2f}; exact {exact_ms and f'{exact_ms:.2f}'}), match "
              f"recall {_recall(r['match_recall'])} at {threshold} ({pairs} pairs), at the 1:1 threshold "
              f"{_recall_at(r['recall_1to1'])}, recall@5 {r['recall_at_5']:.4f}; "
              f"build {build_s:.0f} s (written back in {sync_s:.0f} s), start-up {startup_s:.2f} s (cold "
              f"{_seconds(cold_s)}, database check done at {_seconds(check_s)}; exact load {load_s:.1f} s), index "
              f"{r['index_mb']:.0f} MiB, load {r['load']:.1f}", flush=True)
    return rows


def http_row(path: Path, server_env: dict[str, str], query_jpeg: bytes, requests: int, draw: Draw) -> dict:
    from benchmarks.harness import ServerProcess, load

    with ServerProcess({**server_env, "FACE_GALLERY_PATH": str(path)}) as server:
        def identify(client):
            return client.post("/identify", files={"image": ("q.jpg", query_jpeg, "image/jpeg")})

        result = load(server.url, identify, 1, requests)
        rss, peak = server.rss_mb()
    row = {"kind": draw.kind, "faces": int(draw.counts.sum()), "p50_ms": result.latency.p50,
           "p95_ms": result.latency.p95, "errors": result.errors, "rss_mb": rss, "rss_peak_mb": peak,
           "ready_s": server.startup_seconds}
    print(f"  /identify over HTTP, {draw.kind} {row['faces']:,} faces: p50 {row['p50_ms']:.1f} p95 "
          f"{row['p95_ms']:.1f} ms ({row['errors']} errors); server ready in {row['ready_s']:.1f} s, RSS "
          f"{rss:.0f} MiB (peak {peak:.0f})", flush=True)
    return row


def run(sizes: tuple[int, ...], models_dir: Path, lfw_images: Path, *, nprobes: tuple[int | None, ...] = (None, 512, 768),
        http_sizes: tuple[int, ...] = (), server_env: dict[str, str] | None = None, query_jpeg: bytes | None = None,
        requests: int = 60, repeat: int = 200, exact_max: int = 1_000_000, kinds: tuple[str, ...] = KINDS,
        workdir: Path | None = None, build_sizes: tuple[int, ...] = ()) -> tuple[list[dict], list[dict], list[dict]]:
    from benchmarks.pg_index_options import lfw_embeddings
    from benchmarks.pg_search import EmbeddingShape
    from service.embedder import Embedder
    from service.template_index import index_folder

    shape = EmbeddingShape(*lfw_embeddings(models_dir, lfw_images)) if "clustered" in kinds else None
    model = Embedder(models_dir / "mobilefacenet_192.onnx").model_id
    folder = Path(tempfile.mkdtemp(prefix="facerec-ann-", dir=workdir))
    rows, http, builds = [], [], []
    try:
        for n in sizes:
            for kind in kinds:
                draw = Draw(kind, n, shape)
                reference = Reference(draw.queries, {"identify": identify_threshold(models_dir, draw.identities),
                                                     "1:1": one_to_one_threshold(models_dir)})
                path = folder / f"{kind}-{n}.db"
                print(f"  filling {kind} {n:,} faces ({draw.identities:,} identities)", flush=True)
                fill_s = fill(path, draw, model, reference)
                for row in measure_gallery(path, draw, reference, model, nprobes, repeat, n <= exact_max):
                    rows.append({**row, "fill_s": fill_s})
                if n in http_sizes and server_env is not None and query_jpeg is not None:
                    http.append(http_row(path, server_env, query_jpeg, requests, draw))
                if n in build_sizes and server_env is not None:
                    builds.append(server_build_row(path, server_env, draw))
                path.unlink()
                shutil.rmtree(index_folder(path), ignore_errors=True)
                for extra in folder.glob(f"{path.name}-*"):
                    extra.unlink()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows, http, builds


def server_build_row(path: Path, server_env: dict[str, str], draw: Draw, timeout_s: float = 3600.0) -> dict:
    """`python -m service` on the database with its index folder removed: it loads every template to search
    exactly and builds the index in the background, the most memory the server needs (what to size a container's
    memory limit by). Waits for the build's log line."""
    from benchmarks.harness import ServerProcess
    from service.template_index import index_folder

    shutil.rmtree(index_folder(path), ignore_errors=True)
    server_log = path.with_name(path.name + "-server.log")
    server_log.unlink(missing_ok=True)
    # Its progress and "built in" lines are at info level.
    env = {**server_env, "FACE_GALLERY_PATH": str(path), "BENCH_SERVER_LOG": str(server_log), "FACE_LOG_LEVEL": "info"}
    with ServerProcess(env, start_timeout=900) as server:
        ready = time.perf_counter()
        while b"built in" not in server_log.read_bytes():
            if time.perf_counter() - ready > timeout_s or server.process.poll() is not None:
                raise RuntimeError(f"no index built by the server within {timeout_s:.0f} s (log: {server_log})")
            time.sleep(1)
        build_s = time.perf_counter() - ready
        rss, peak = server.rss_mb()
    row = {"kind": draw.kind, "faces": int(draw.counts.sum()), "identities": draw.identities,
           "ready_s": server.startup_seconds, "build_s": build_s, "rss_mb": rss, "rss_peak_mb": peak}
    print(f"  server building the index, {draw.kind} {row['faces']:,} faces: ready (exact) in "
          f"{row['ready_s']:.1f} s, index built {build_s:.0f} s later, RSS after {rss:.0f} MiB, peak "
          f"{peak:.0f} MiB", flush=True)
    return row


def report_lines(rows: list[dict], http: list[dict], table, builds: list[dict] = ()) -> list[str]:
    from service.template_index import (
        LARGE_INDEX_CELLS,
        MAX_DEFAULT_NPROBE,
        MAX_DEFAULT_NPROBE_SMALL,
        IndexOptions,
        factory_for,
    )

    if not rows:
        return []
    shipped = IndexOptions()
    sizes = sorted({r["faces"] for r in rows})
    return [
        "## ANN index for the SQLite gallery (faiss IVF)",
        "",
        ("`Gallery.search` (one query, top 5) through the index, on two synthetic galleries filled by bulk import: "
         "**uniform** (one face per identity, uniform random unit vectors) and **clustered** (identities with 1-5 "
         "faces around centres drawn from a Gaussian fitted to the default embedder's lfw-dev embeddings, "
         "`pg_search.EmbeddingShape`). 200 planted queries, each a new photo of an enrolled identity. Match recall: "
         "of the identities exact search puts at or above /identify's threshold for that many identities (the "
         "default policy, FPIR 1 %; the `threshold` column; n/a where no planted query reaches it), the share "
         "the index returns, and the same at the embedder's 1:1 threshold (the lowest /identify uses); recall@5: "
         "the share of "
         "exact search's top 5 it returns (on uniform galleries the 2nd-5th are near-ties far below any "
         "threshold). Candidates are re-ranked exactly, so every similarity returned is exact search's. Search "
         "times: steady state, once the start-up check of the database's totals (below) is done; it scans every "
         "row on a core of its own and would otherwise slow the searches beside it. "
         f"Index: `{factory_for(10**6, D).split(',')[1]}` fast-scan codes in IVF cells (about 4 sqrt(N): "
         + ", ".join(f"{factory_for(n, D).split(',')[0]} at {n:,}" for n in sorted({r['identities'] for r in rows}))
         + "), each template filed in its two nearest cells (spilling), a query's cells scanned on one thread; "
         f"{shipped.candidates} candidates re-ranked; by default a query scans about 8 sqrt(cells), at most "
         f"{MAX_DEFAULT_NPROBE_SMALL} below {LARGE_INDEX_CELLS:,} cells and {MAX_DEFAULT_NPROBE} from there "
         "(`template_index.default_nprobe`: the rows marked default; "
         "`FACE_GALLERY_INDEX_NPROBE` sets a number). Build: from the templates in memory, on the 2 cores. Start-up: opening "
         "the gallery on its persisted index, page cache warm (cold: after emptying the kernel's page cache, as "
         "after a reboot; measured once per gallery, n/a where the benchmark may not empty it; both after the "
         "build's files are written back; in brackets, when the check of the database's totals against the index, "
         "which runs beside the opened gallery, was done) (exact load: the same without an index, reading every "
         "face). Sizes: "
         "the index folder (templates float32 memory-mapped + the IVF file), beside the database."),
        "",
        *table(["gallery", "faces", "identities", "nprobe", "search p50 ms", "p95 ms", "exact p50 ms",
                "match recall (threshold, pairs)", "match recall at 1:1 threshold (pairs)", "recall@5", "build s", "start-up s", "cold start-up s", "exact load s",
                "index MiB", "database MiB", "load"],
               [[r["kind"], f"{r['faces']:,}", f"{r['identities']:,}",
                 f"{r['nprobe']}" + (" (default)" if r["default"] else ""), f"{r['p50_ms']:.2f}",
                 f"{r['p95_ms']:.2f}",
                 "n/a" if r["exact_ms"] is None else f"{r['exact_ms']:.2f}",
                 f"{_recall(r['match_recall'])} ({r['threshold']}, {r['match_pairs']})",
                 _recall_at(r.get("recall_1to1")), f"{r['recall_at_5']:.4f}",
                 f"{r['build_s']:.0f}", f"{r['startup_s']:.2f}",
                 "n/a" if r.get("cold_startup_s") is None else f"{r['cold_startup_s']:.2f}"
                 + ("" if r.get("cold_check_s") is None else f" ({r['cold_check_s']:.2f})"),
                 f"{r['load_s']:.1f}", f"{r['index_mb']:.0f}",
                 f"{r['db_mb']:.0f}", f"{r['load']:.1f}"]
                for r in rows]),
        "",
    ] + ([
        ("`python -m service` on the same databases (persisted index): time to /ready (models, gallery, warm-up), "
         "/identify over HTTP (one face, concurrency 1: detection, alignment, embedding, search) and the server's "
         "resident memory after it (the memory-mapped templates count only where touched)."),
        "",
        *table(["gallery", "faces", "/identify p50 ms", "p95 ms", "errors", "ready s", "server RSS MiB",
                "peak RSS MiB"],
               [[h["kind"], f"{h['faces']:,}", f"{h['p50_ms']:.1f}", f"{h['p95_ms']:.1f}", h["errors"],
                 f"{h['ready_s']:.1f}", f"{h['rss_mb']:.0f}", f"{h['rss_peak_mb']:.0f}"] for h in http]),
        "",
    ] if http else []) + ([
        ("`python -m service` on the same databases with the index folder removed, as on a first start after a bulk "
         "import: it loads every template (ready: exact search), builds the index in the background on both "
         "cores and then searches through it. Its peak resident memory is what a container's memory limit must "
         "allow (or build the index once with a larger limit and serve from it)."),
        "",
        *table(["gallery", "faces", "identities", "ready s (exact)", "build s after ready", "RSS after MiB",
                "peak RSS MiB"],
               [[b["kind"], f"{b['faces']:,}", f"{b['identities']:,}", f"{b['ready_s']:.1f}", f"{b['build_s']:.0f}",
                 f"{b['rss_mb']:.0f}", f"{b['rss_peak_mb']:.0f}"] for b in builds]),
        "",
    ] if builds else []) + [f"Sizes measured: {', '.join(f'{s:,}' for s in sizes)} faces.", ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ann", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000,10000000", help="faces per gallery, comma-separated")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--nprobe", default="default,512,768",
                        help="cells scanned per query, comma-separated; default: the service's rule for the cell count")
    parser.add_argument("--http-sizes", default="1000000,10000000",
                        help="sizes at which a server is started for /identify over HTTP (empty: none)")
    parser.add_argument("--build-sizes", default="1000000,10000000",
                        help="sizes at which a server is started without the index, to measure its build's memory")
    parser.add_argument("--models-dir", type=Path, default=Path(os.environ.get("FACE_MODELS_DIR",
                                                                               ROOT / "artifacts/models")))
    parser.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "faces")
    parser.add_argument("--lfw", type=Path, default=ROOT.parent / "shared" / "data" / "lfw-dev" / "images")
    parser.add_argument("--workdir", type=Path, default=ROOT / "artifacts", help="where the galleries are written")
    parser.add_argument("--out", type=Path, help="update this section of that Markdown file (BENCHMARKS.md)")
    args = parser.parse_args(argv)
    import logging

    from benchmarks.__main__ import table
    from benchmarks.harness import write_section_alone

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("service.gallery").setLevel(logging.INFO)
    started, load_before = time.strftime("%Y-%m-%d %H:%M", time.gmtime()), os.getloadavg()[0]
    server_env, query_jpeg = http_inputs(args.models_dir, args.photos)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows, http, builds = run(tuple(int(s) for s in args.sizes.split(",")), args.models_dir, args.lfw,
                     nprobes=tuple(None if p == "default" else int(p) for p in args.nprobe.split(",")),
                     http_sizes=tuple(int(s) for s in args.http_sizes.split(",") if s), server_env=server_env,
                     query_jpeg=query_jpeg, kinds=tuple(args.kinds.split(",")), workdir=args.workdir,
                     build_sizes=tuple(int(s) for s in args.build_sizes.split(",") if s))
    if args.out:
        command = (f"python -m benchmarks.ann --sizes {args.sizes} --kinds {args.kinds} --nprobe {args.nprobe} "
                   f"--http-sizes {args.http_sizes} --build-sizes {args.build_sizes} --out BENCHMARKS.md")
        write_section_alone(args.out, report_lines(rows, http, table, builds), command, started, load_before)
    return 0


def http_inputs(models_dir: Path, photos: Path) -> tuple[dict[str, str], bytes]:
    """The server's environment and a one-face query photo, as `python -m benchmarks` uses them."""
    import cv2

    from benchmarks import suites

    portrait = suites.letterbox(cv2.imread(str(photos / "pairs" / "img20.jpg")), 640, 480)
    env = {"FACE_MODELS_DIR": str(models_dir.resolve()), "FACE_LOG_LEVEL": "warning"}
    return env, suites.jpeg(portrait)


if __name__ == "__main__":
    raise SystemExit(main())
