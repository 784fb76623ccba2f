"""Why the gallery index files each template in two cells: how often a planted face's cell is scanned.

`python -m benchmarks.ann_spill --templates 10000000 --cells 16384` (about 2 minutes on 2 cores: the k-means
training). Uniform random unit templates (192-d, the hard case for k-means cells) and probes 0.75 cosine from their
face, as in benchmarks/ann.py. Only the cells matter here, not the other templates: the cells are trained on a
sample, the share of templates a search scans is estimated from another sample, and for each probe we look up the
rank of its face's nearest cell (one cell per template, faiss's own `add`), of its second-nearest too (what
service/template_index.py does), and of SOAR's choice of second cell (the candidate among the 8 nearest whose
residual is most orthogonal to the first one's; Sun et al., NeurIPS 2023), among the probe's nearest cells.
Prints, per nprobe, the share of the gallery scanned and the share of probes whose face is in a scanned cell.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

D = 192
SAME_PERSON = 0.75


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ann_spill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", type=int, default=10_000_000, help="gallery size the cells are sized for")
    parser.add_argument("--cells", type=int, default=16384)
    parser.add_argument("--probes", type=int, default=2000)
    parser.add_argument("--nprobe", default="128,256,512,1024,2048")
    args = parser.parse_args(argv)
    import faiss

    rng = np.random.default_rng(0)
    train = _unit(rng.standard_normal((min(args.templates, 262_144), D)))
    faces = _unit(rng.standard_normal((args.probes, D)))
    noise = _unit(rng.standard_normal((args.probes, D)))
    probes = _unit(SAME_PERSON * faces + np.sqrt(1 - SAME_PERSON ** 2) * noise)
    started = time.perf_counter()
    kmeans = faiss.Kmeans(D, args.cells, niter=10, seed=1)
    kmeans.train(train)
    centres = kmeans.centroids
    print(f"k-means: {args.cells} cells on {len(train)} templates in {time.perf_counter() - started:.0f} s")
    flat = faiss.IndexFlatL2(D)
    flat.add(centres)
    _, sample_cells = flat.search(_unit(rng.standard_normal((500_000, D))), 1)
    share = np.bincount(sample_cells[:, 0], minlength=args.cells) / len(sample_cells)
    _, near = flat.search(faces, 8)
    residual = faces - centres[near[:, 0]]
    others = faces[:, None, :] - centres[near[:, 1:]]
    soar = ((others ** 2).sum(-1)
            + (np.einsum("pcd,pd->pc", others, residual) ** 2) / (residual ** 2).sum(-1)[:, None])
    soar_cell = near[np.arange(args.probes), 1 + soar.argmin(1)]
    _, order = flat.search(probes, args.cells)
    rank = np.empty_like(order)
    rank[np.arange(args.probes)[:, None], order] = np.arange(args.cells)[None, :]
    first = rank[np.arange(args.probes), near[:, 0]]
    second = rank[np.arange(args.probes), near[:, 1]]
    by_soar = rank[np.arange(args.probes), soar_cell]
    print("| nprobe | gallery scanned, one cell each | face's cell scanned | either of its 2 nearest | nearest or SOAR's |")
    print("|---:|---:|---:|---:|---:|")
    for nprobe in (int(p) for p in args.nprobe.split(",")):
        scanned = share[order[:, :nprobe]].sum(1).mean()
        print(f"| {nprobe} | {scanned:.4f} | {np.mean(first < nprobe):.4f} | "
              f"{np.mean(np.minimum(first, second) < nprobe):.4f} | {np.mean(np.minimum(first, by_soar) < nprobe):.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
