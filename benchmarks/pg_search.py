"""1:N search in the PostgreSQL gallery (pgvector HNSW) against exact search, on a clustered synthetic gallery.

`python -m benchmarks` runs this as part of its report (`--pg-sizes`); alone:
`python -m benchmarks.pg_search --sizes 100000`. It starts a private PostgreSQL 16 + pgvector 0.6.2 from the
`pgserver` wheel (the test extra installs it) in a temporary folder.

The gallery: identities with 4 faces each; identities come in families of 20 whose centres are ~0.3 cosine apart
(look-alikes), a face is ~0.8 cosine from its identity's centre, so two photos of one person score ~0.64 and of
two family members ~0.2: dense neighbourhoods, harder for a graph index than uniform random vectors. Loaded by
COPY, the HNSW index built after (as `python -m service.gallery_copy` does).

Figures, per ef_search: in-store `PostgresGallery.search` latency (one query, top 5); match recall (queries are
new photos of enrolled people; of the identities exact search puts at or above the threshold, the share the
store returns with `threshold` set); recall@5 (the share of exact search's top 5 identities the store returns,
no threshold). Exact search is numpy over the identities' templates (the normalised mean of their faces, what
both stores match against), also timed, as the baseline.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import measure

D = 192
FACES_PER_IDENTITY = 4
FAMILY = 20
MATCH_THRESHOLD = 0.4  # between look-alikes (~0.2) and the same person (~0.64) on this data
MODEL = "f" * 64
LFW_THRESHOLD = 0.41  # the default embedder's 1:1 threshold (0.4096): the lowest /identify uses


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered_gallery(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(faces (n, D) float32 ordered by identity, identity centres (n / 4, D))."""
    identities = n // FACES_PER_IDENTITY
    families = _unit(rng.standard_normal((identities // FAMILY + 1, D)))
    own = _unit(rng.standard_normal((identities, D)))
    # cos(centre_a, centre_b) within a family = 0.3: a family part of weight sqrt(0.3), an own part of sqrt(0.7).
    centres = _unit(np.sqrt(0.3) * families[np.arange(identities) // FAMILY] + np.sqrt(0.7) * own)
    faces = np.empty((identities * FACES_PER_IDENTITY, D), np.float32)
    for k in range(FACES_PER_IDENTITY):
        faces[k::FACES_PER_IDENTITY] = photo(centres, rng)
    return faces, centres


def photo(centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A new photo of each person: ~0.8 cosine from the centre."""
    return _unit(0.8 * centres + 0.6 * _unit(rng.standard_normal(centres.shape))).astype(np.float32)


class EmbeddingShape:
    """A Gaussian model of real face embeddings: identity centres drawn around the real identities' mean with
    their between-identity covariance, a photo drawn around its centre with the pooled within-identity
    covariance, then L2-normalised. Fitted to lfw-dev's embeddings by the service's default embedder, it gives
    same-person and different-person cosine distributions close to the real ones (printed by the benchmark),
    with the real data's uneven spectrum (about 50 effective dimensions of 192) rather than isotropic noise."""

    def __init__(self, embeddings: np.ndarray, labels: np.ndarray):
        e = _unit(np.asarray(embeddings, np.float64))
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        means = np.zeros((len(counts), e.shape[1]))
        np.add.at(means, inverse, e)
        means /= counts[:, None]
        residual = e - means[inverse]
        several = counts[inverse] >= 2
        within = residual[several].T @ residual[several] / (several.sum() - (counts >= 2).sum())
        # A real identity's mean over c photos carries within/c of photo noise: take it out of the spread.
        between = np.cov(means.T) - within * np.mean(1.0 / counts)
        self.mean = means.mean(axis=0)
        self._between = _root(between)
        self._within = _root(within)

    def centres(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.mean + rng.standard_normal((n, len(self.mean))) @ self._between.T

    def photo(self, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _unit(centres + rng.standard_normal(centres.shape) @ self._within.T).astype(np.float32)


def _root(covariance: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(covariance)
    return vectors * np.sqrt(np.clip(values, 0.0, None))


def lfw_shaped_gallery(n: int, embeddings: np.ndarray, labels: np.ndarray, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray, EmbeddingShape]:
    """(faces (n, D) ordered by identity, identity centres, the shape) drawn from real embeddings' statistics."""
    shape = EmbeddingShape(embeddings, labels)
    centres = shape.centres(n // FACES_PER_IDENTITY, rng)
    faces = np.empty((len(centres) * FACES_PER_IDENTITY, len(shape.mean)), np.float32)
    for k in range(FACES_PER_IDENTITY):
        faces[k::FACES_PER_IDENTITY] = shape.photo(centres, rng)
    return faces, centres, shape


def fill(url: str, faces: np.ndarray, model: str = MODEL) -> tuple[float, float]:
    """COPY the faces in (identity i owns faces 4i..4i+3), sum them into templates as the store does, then build
    the HNSW index (over templates); (fill s, index s)."""
    import psycopg
    from pgvector.psycopg import register_vector

    from service.pg_gallery import _index_name, create_model_index

    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        conn.execute(f"DROP INDEX IF EXISTS {_index_name(model)}")
        conn.execute(
            "INSERT INTO identities (id, created_at) SELECT 'p' || i, 0 FROM generate_series(0, %s) i",
            (len(faces) // FACES_PER_IDENTITY - 1,),
        )
        with conn.cursor().copy(
            "COPY faces (face_id, identity_id, model_sha256, embedding, created_at) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["text", "text", "text", "vector", "float8"])
            for i, face in enumerate(faces):
                copy.write_row((f"{i:032x}", f"p{i // FACES_PER_IDENTITY}", model, face, 0.0))
        conn.execute(
            "INSERT INTO templates (identity_id, model_sha256, total, faces) "
            "SELECT identity_id, model_sha256, sum(embedding), count(*) FROM faces WHERE model_sha256 = %s "
            "GROUP BY identity_id, model_sha256",
            (model,),
        )
        filled = time.perf_counter()
        conn.execute("SET maintenance_work_mem = '2GB'")
        create_model_index(conn, model, D)
        conn.execute("VACUUM ANALYZE faces")
        conn.execute("VACUUM ANALYZE templates")
    return filled - started, time.perf_counter() - filled


def templates_of(faces: np.ndarray) -> np.ndarray:
    """Each identity's template: the normalised mean of its faces (what both stores match against)."""
    return _unit(faces.reshape(-1, FACES_PER_IDENTITY, faces.shape[1]).astype(np.float64).sum(axis=1))


def exact_top(scores: np.ndarray, top_k: int, threshold: float | None) -> list[int]:
    """scores: a query against every identity's template."""
    order = np.argsort(-scores)[:top_k]
    return [int(i) for i in order if threshold is None or scores[i] >= threshold]


def measure_size(url: str, n: int, ef_values: tuple[int, ...], queries: int, repeat: int, seed: int = 0,
                 model: str = MODEL) -> dict:
    from service.pg_gallery import EF_SEARCH, PostgresGallery

    rng = np.random.default_rng(seed)
    faces, centres = clustered_gallery(n, rng)
    with PostgresGallery(url, model, D):  # the schema, as a server would create it
        pass
    fill_s, index_s = fill(url, faces, model)
    planted = rng.choice(len(centres), size=queries, replace=False)
    probes = photo(centres[planted], rng)
    templates = templates_of(faces).astype(np.float32)
    exact_scores = probes @ templates.T
    exact_match = [exact_top(s, 5, MATCH_THRESHOLD) for s in exact_scores]
    exact_top5 = [exact_top(s, 5, None) for s in exact_scores]
    exact_t = measure(lambda: exact_top(probes[0] @ templates.T, 5, None), repeat)
    rows = []
    for ef in ef_values:
        with PostgresGallery(url, model, D, ef_search=ef, timeout_s=60) as gallery:
            matched = gallery.search(probes, top_k=5, threshold=MATCH_THRESHOLD)
            top5 = gallery.search(probes, top_k=5)
            t = measure(lambda g=gallery: g.search(probes[:1], top_k=5), repeat)
            t_many = measure(lambda g=gallery: g.search(probes[1:2], top_k=5), repeat)
        found = sum(len({int(m.identity_id[1:]) for m in got} & set(want)) for got, want in zip(matched, exact_match))
        expected = sum(len(want) for want in exact_match)
        hit5 = sum(len({int(m.identity_id[1:]) for m in got} & set(want)) for got, want in zip(top5, exact_top5))
        rows.append({
            "faces": n, "ef_search": ef, "shipped": ef == EF_SEARCH,
            "search_ms": min(t.p50, t_many.p50), "search_p95_ms": max(t.p95, t_many.p95),
            "match_recall": found / max(1, expected), "match_pairs": expected,
            "recall_at_5": hit5 / (5 * len(probes)), "queries": len(probes),
            "exact_ms": exact_t.p50, "fill_s": fill_s, "index_s": index_s,
        })
        print(f"  {n:>8} faces, ef_search {ef:>3}: search p50 {rows[-1]['search_ms']:.2f} ms "
              f"(p95 {rows[-1]['search_p95_ms']:.2f}); match recall {rows[-1]['match_recall']:.4f} "
              f"({expected} pairs), recall@5 {rows[-1]['recall_at_5']:.4f}; exact numpy {exact_t.p50:.2f} ms; "
              f"COPY {fill_s:.0f} s, HNSW build {index_s:.0f} s", flush=True)
    return {"rows": rows}


def run(sizes: tuple[int, ...], ef_values: tuple[int, ...] = (40, 100, 200), queries: int = 200,
        repeat: int = 30, *, model: str = MODEL, server_env: dict[str, str] | None = None,
        query_jpeg: bytes | None = None, requests: int = 60) -> tuple[list[dict], list[dict]]:
    """Every size in its own database of one private server: one row per (size, ef_search); and, given a server
    environment and a photo, /identify over HTTP against `python -m service` on that gallery (`model` must then
    be the server's embedder's sha256, or it would search none of the faces)."""
    import pgserver
    import psycopg

    from benchmarks.harness import ServerProcess, load

    folder = Path(tempfile.mkdtemp(prefix="facerec-pgbench-"))
    server = pgserver.get_server(str(folder), cleanup_mode="delete")
    rows, http = [], []
    try:
        for n in sizes:
            name = f"bench_{n}"
            with psycopg.connect(server.get_uri(), autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name}")
                conn.execute(f"CREATE DATABASE {name}")
            url = server.get_uri(name)
            rows += measure_size(url, n, ef_values, queries, repeat, model=model)["rows"]
            if server_env is None or query_jpeg is None:
                continue
            with ServerProcess({**server_env, "FACE_GALLERY_URL": url}) as replica:
                def identify(client):
                    return client.post("/identify", files={"image": ("q.jpg", query_jpeg, "image/jpeg")})

                result = load(replica.url, identify, 1, requests)
                rss, peak = replica.rss_mb()
            http.append({"faces": n, "p50_ms": result.latency.p50, "p95_ms": result.latency.p95,
                         "errors": result.errors, "rss_mb": rss, "rss_peak_mb": peak,
                         "startup_s": replica.startup_seconds})
            print(f"  /identify over HTTP, {n} faces in PostgreSQL: p50 {result.latency.p50:.1f} p95 "
                  f"{result.latency.p95:.1f} ms ({result.errors} errors), server RSS {rss:.0f} MiB", flush=True)
    finally:
        server.cleanup()
    return rows, http


def report_lines(rows: list[dict], http: list[dict], table) -> list[str]:
    """The BENCHMARKS.md section."""
    from service.pg_gallery import EF_SEARCH, HNSW_EF_CONSTRUCTION, HNSW_M

    if not rows:
        return []
    return [
        "## 1:N identification in PostgreSQL (pgvector HNSW)",
        "",
        ("`PostgresGallery.search` (one query, top 5) against a private PostgreSQL 16 + pgvector 0.6.2 (the "
         "`pgserver` wheel, default server settings, same machine), on a clustered synthetic gallery: 4 faces "
         "per identity, identities in families of 20 look-alikes (centres 0.3 cosine apart), a face 0.8 cosine "
         "from its person's centre. 200 queries, each a new photo of an enrolled person. Match recall: of the "
         f"identities exact search puts at or above {MATCH_THRESHOLD} (same person ~0.64, look-alike ~0.2), the "
         "share the store returns; recall@5: the share of exact search's top 5 identities it returns (no "
         "threshold). Both stores match an identity through its template (the normalised mean of its faces; "
         "PostgreSQL indexes one template row per identity); exact search: numpy over the same templates in "
         "memory (what the SQLite store does). "
         f"HNSW as the service builds it (m {HNSW_M}, ef_construction {HNSW_EF_CONSTRUCTION}); the service ships "
         f"`ef_search` {EF_SEARCH} (`max({EF_SEARCH}, top_k)` per query). How those were chosen: \"Index options "
         "at 1M faces\" below."),
        "",
        *table(["faces", "ef_search", "search p50 ms", "search p95 ms", "match recall", "recall@5",
                "exact numpy p50 ms", "COPY s", "HNSW build s"],
               [[f"{r['faces']:,}", f"{r['ef_search']}" + (" (shipped)" if r["shipped"] else ""),
                 f"{r['search_ms']:.2f}", f"{r['search_p95_ms']:.2f}", f"{r['match_recall']:.4f}",
                 f"{r['recall_at_5']:.4f}", f"{r['exact_ms']:.2f}", f"{r['fill_s']:.0f}", f"{r['index_s']:.0f}"]
                for r in rows]),
        "",
    ] + ([
        ("/identify over HTTP (one face, c=1) against `python -m service` with `FACE_GALLERY_URL` on that "
         "database (detection, alignment, embedding and the search in PostgreSQL), and the server's resident "
         "memory: it holds no gallery, whatever the size."),
        "",
        *table(["faces", "/identify p50 ms", "/identify p95 ms", "errors", "server RSS MiB"],
               [[f"{h['faces']:,}", f"{h['p50_ms']:.1f}", f"{h['p95_ms']:.1f}", h["errors"], f"{h['rss_mb']:.0f}"]
                for h in http]),
        "",
    ] if http else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pg_search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000")
    parser.add_argument("--ef", default="40,100,200")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", type=Path, help="update this section of that Markdown file (BENCHMARKS.md)")
    args = parser.parse_args(argv)
    import os

    from benchmarks.__main__ import table
    from benchmarks.harness import write_section_alone

    started, load_before = time.strftime("%Y-%m-%d %H:%M", time.gmtime()), os.getloadavg()[0]
    rows, http = run(tuple(int(s) for s in args.sizes.split(",")), tuple(int(e) for e in args.ef.split(",")),
                     args.queries)
    # (alone, no server: `python -m benchmarks` adds /identify over HTTP)
    if args.out:
        command = f"python -m benchmarks.pg_search --sizes {args.sizes} --ef {args.ef} --out BENCHMARKS.md"
        write_section_alone(args.out, report_lines(rows, http, table), command, started, load_before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
