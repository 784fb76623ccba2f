"""The ANN libraries compared for the SQLite gallery's index: faiss (IVF), usearch (HNSW) and hnswlib (HNSW).

`python -m benchmarks.ann_libraries --templates 200000` (needs `pip install faiss-cpu usearch hnswlib`; the graph
builds take minutes on 2 cores). Not part of `python -m benchmarks`: BENCHMARKS.md keeps the figures it printed
("ANN libraries compared").

Data: pg_search's clustered synthetic gallery (4 faces per identity, families of 20 look-alikes, isotropic noise),
one template per identity as the gallery indexes; 300 queries, each a new photo of an enrolled identity. Each
library returns 50 candidates, re-ranked exactly (as the gallery does); recall@5: the share of exact search's top 5
found. Search: one query at a time, one thread. Build: 2 threads.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.pg_search import clustered_gallery, photo, templates_of

D = 192


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ann_libraries", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", type=int, default=200_000)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    faces, centres = clustered_gallery(args.templates * 4, rng)
    templates = templates_of(faces).astype(np.float32)
    del faces
    queries = photo(centres[rng.choice(len(centres), 300, replace=False)], rng)
    exact5 = np.argsort(-(queries @ templates.T), axis=1)[:, :5]

    def report(name: str, build_s: float, search, k: int = 50) -> None:
        times, found = [], 0
        for q, want in zip(queries, exact5):
            t0 = time.perf_counter()
            rows = search(q[None], k)
            times.append(time.perf_counter() - t0)
            rows = rows[rows >= 0]
            top = rows[np.argsort(-(templates[rows] @ q))[:5]]
            found += len(set(top.tolist()) & set(want.tolist()))
        print(f"{name:34s} {len(templates)} templates: build {build_s:6.1f} s, search p50 "
              f"{np.median(times) * 1e3:.3f} ms p95 {np.percentile(times, 95) * 1e3:.3f} ms, recall@5 "
              f"{found / (5 * len(queries)):.4f}", flush=True)

    import faiss

    for spec, nprobes in (("IVF1024,SQ8", (16, 32, 64)), ("IVF1024,Flat", (32,))):
        faiss.omp_set_num_threads(2)
        t0 = time.perf_counter()
        index = faiss.index_factory(D, spec, faiss.METRIC_INNER_PRODUCT)
        index.train(templates[rng.choice(len(templates), min(len(templates), 100_000), replace=False)])
        index.add(templates)
        build = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)
        for nprobe in nprobes:
            index.nprobe = nprobe
            report(f"faiss {spec} nprobe {nprobe}", build, lambda q, k, i=index: i.search(q, k)[1][0])
    from usearch.index import Index

    t0 = time.perf_counter()
    graph = Index(ndim=D, metric="cos", dtype="i8", connectivity=16)
    graph.add(np.arange(len(templates)), templates, threads=2)
    build = time.perf_counter() - t0
    for ef in (64, 128):
        graph.expansion_search = ef
        report(f"usearch HNSW i8 M16 ef {ef}", build,
               lambda q, k: graph.search(q, k, threads=1).keys.reshape(-1).astype(np.int64))
    import hnswlib

    t0 = time.perf_counter()
    other = hnswlib.Index(space="ip", dim=D)
    other.init_index(len(templates), M=16, ef_construction=100)
    other.set_num_threads(2)
    other.add_items(templates, np.arange(len(templates)))
    build = time.perf_counter() - t0
    other.set_num_threads(1)
    for ef in (64, 128):
        other.set_ef(ef)
        report(f"hnswlib HNSW f32 M16 ef {ef}", build, lambda q, k: other.knn_query(q, k)[0][0].astype(np.int64))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
