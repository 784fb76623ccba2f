"""The SQLite gallery's approximate-nearest-neighbour index over identity templates, persisted beside the database.

What is indexed is what the store searches: one template per identity (the sum of its current-model faces over
that sum's length, service/gallery.py). A build writes one *snapshot* into `<gallery.db>.index/`:

- `<tag>.ids.npy`     the identity ids, sorted (fixed-width bytes), so that an id's row is a binary search of a
                      memory-mapped array: no dictionary of millions of ids to build at start-up;
- `<tag>.sums.npy`    each identity's face-embedding sum (float32, as the in-memory matrix holds it), `.norms.npy`
                      its length, `.counts.npy` its face count: what exact search scores with, memory-mapped, so
                      that candidates are re-ranked with exactly the numbers exact search uses, and a restart does
                      not read and sum every face blob again;
- `<tag>.ivf.faiss`   a faiss inverted-file index (k-means cells, vectors stored product-quantised for SIMD
                      "fast-scan"), whose candidates are re-ranked exactly: the index only decides which identities
                      are scored, never the score;
- `manifest.json`     written last (atomically): the model, sizes, and the change sequence number the snapshot
                      reflects (the gallery's `template_changes` log, see service/gallery.py).

Why faiss IVF and these settings: BENCHMARKS.md ("ANN index for the SQLite gallery") compares it with usearch and
hnswlib HNSW graphs on this machine: same recall for far less build time (a graph build costs minutes per
hundred thousand templates on 2 cores, k-means cells seconds).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
# k-means on a sample: 40 points per cell (faiss warns below 39), 10 iterations. Training costs
# cells x sample x D per iteration, so a sample (not every template) keeps it to minutes at 10M faces.
TRAIN_POINTS_PER_CELL = 40
TRAIN_ITERATIONS = 10
ADD_CHUNK = 200_000


@dataclass(frozen=True)
class IndexOptions:
    """How the SQLite gallery uses its index (FACE_GALLERY_INDEX_* settings)."""

    enabled: bool = True
    # Below this many searchable identities exact search is used (and no index is built): BENCHMARKS.md measures
    # where the index starts to pay.
    min_identities: int = 50_000
    nprobe: int = 512  # cells scanned per query
    candidates: int = 100  # identities taken from the index per query, then re-ranked exactly
    # A rebuild starts when identities changed or added since the last build exceed this share of it (they are
    # searched exactly meanwhile, so they cost time per search as they grow).
    rebuild_fraction: float = 0.05
    build: bool = True  # False: use a persisted index, never build one (the bulk-import command)


def index_folder(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".index")


def cells_for(n: int) -> int:
    """Inverted lists for n templates: about 4 sqrt(n), a power of two (faiss's rule of thumb), at least 16."""
    return max(16, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))


# From this many cells on, templates are assigned to cells through an HNSW graph over the cell centres instead of
# comparing each with every centre: at 16,384 cells that is what keeps a 10M build within minutes on 2 cores.
HNSW_QUANTIZER_FROM = 8192
# k-means sample cap: training costs sample x cells x D per iteration.
MAX_TRAIN_POINTS = 262_144


def factory_for(n: int, d: int) -> str:
    # 4-bit product quantisation over 2-dimension sub-vectors (fast-scan): d / 4 bytes per template, scanned with
    # SIMD lookups; the exact re-rank restores the similarity.
    m = d // 2 if d % 2 == 0 else d
    cells = cells_for(n)
    return f"IVF{cells}{'_HNSW32' if cells >= HNSW_QUANTIZER_FROM else ''},PQ{m}x4fs"


class SnapshotUnusable(Exception):
    """The persisted snapshot cannot be used (missing, corrupt, another model, stale); the message says why."""


def _faiss():
    # Its loader logs each SIMD variant it tries at INFO; one library dispatches at run time anyway.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss  # imported when an index is used: a small gallery never loads it

    return faiss


class Snapshot:
    """One persisted build, memory-mapped. Row r of every array is the identity `ids[r]` (ids sorted)."""

    def __init__(self, folder: Path, manifest: dict, ids: np.ndarray, sums: np.ndarray, norms: np.ndarray,
                 counts: np.ndarray, index: Any):
        self.folder, self.manifest = folder, manifest
        self.ids, self.sums, self.norms, self.counts, self.index = ids, sums, norms, counts, index
        self.seq = int(manifest["seq"])
        self.faces = int(manifest["faces"])
        faiss = _faiss()
        self._graph_quantizer = isinstance(faiss.downcast_index(faiss.extract_index_ivf(index).quantizer),
                                           faiss.IndexHNSW)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def open(cls, folder: Path, model_sha256: str, embedding_size: int) -> Snapshot:
        path = folder / MANIFEST
        if not path.is_file():
            raise SnapshotUnusable("no index has been built")
        try:
            manifest = json.loads(path.read_text())
            tag, n = str(manifest["tag"]), int(manifest["identities"])
            if manifest["format"] != FORMAT:
                raise SnapshotUnusable(f"index format {manifest['format']}, this version reads {FORMAT}")
            if manifest["model_sha256"] != model_sha256 or manifest["embedding_size"] != embedding_size:
                raise SnapshotUnusable(f"index built for model {str(manifest['model_sha256'])[:12]}, "
                                       f"the gallery searches {model_sha256[:12]}")
            ids = np.load(folder / f"{tag}.ids.npy", mmap_mode="r")
            sums = np.load(folder / f"{tag}.sums.npy", mmap_mode="r")
            norms = np.load(folder / f"{tag}.norms.npy", mmap_mode="r")
            counts = np.load(folder / f"{tag}.counts.npy", mmap_mode="r")
            shapes = (ids.shape, sums.shape, norms.shape, counts.shape)
            if shapes != ((n,), (n, embedding_size), (n,), (n,)) or sums.dtype != np.float32:
                raise SnapshotUnusable(f"index arrays of shapes {shapes}, the manifest says {n} identities")
            if int(counts.sum(dtype=np.int64)) != int(manifest["faces"]):
                raise SnapshotUnusable("index face counts disagree with its manifest")
            _spot_check(sums, norms)
            faiss = _faiss()
            index = faiss.read_index(str(folder / f"{tag}.ivf.faiss"))
            if index.ntotal != n or index.d != embedding_size:
                raise SnapshotUnusable(f"index holds {index.ntotal} vectors of {index.d}, expected {n} of "
                                       f"{embedding_size}")
        except SnapshotUnusable:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:  # truncated, garbled, missing
            raise SnapshotUnusable(f"index files unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
        return cls(folder, manifest, ids, sums, norms, counts, index)

    def row_of(self, identity_id: str) -> int | None:
        key = identity_id.encode()
        if len(key) > self.ids.dtype.itemsize:  # longer than every id of the snapshot
            return None
        row = int(np.searchsorted(self.ids, key))
        return row if row < len(self.ids) and self.ids[row] == key else None

    def id_at(self, row: int) -> str:
        return self.ids[row].decode()

    def candidates(self, q: np.ndarray, k: int, nprobe: int) -> np.ndarray:
        """(m, k) rows the index proposes for each query (-1 where it has fewer)."""
        faiss = _faiss()
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if self._graph_quantizer:  # the graph must explore at least as many centres as cells are scanned
            params = faiss.SearchParametersIVF(nprobe=nprobe,
                                               quantizer_params=faiss.SearchParametersHNSW(efSearch=max(16, nprobe)))
        _, rows = self.index.search(q, min(k, len(self.ids)), params=params)
        return rows


def _spot_check(sums: np.ndarray, norms: np.ndarray, samples: int = 256) -> None:
    """A few rows' stored norms against their sums: catches a file overwritten or shifted without reading GBs."""
    if not len(norms):
        return
    rows = np.unique(np.linspace(0, len(norms) - 1, min(samples, len(norms))).astype(np.int64))
    got = np.sqrt(np.einsum("ij,ij->i", sums[rows].astype(np.float64), sums[rows].astype(np.float64)))
    if not np.allclose(got, norms[rows], rtol=1e-4, atol=1e-5):
        raise SnapshotUnusable("index templates disagree with their stored lengths: the files are corrupt")


class SnapshotWriter:
    """Writes a snapshot's files under a fresh tag; `commit` makes it the folder's snapshot (manifest replaced
    atomically, older tags removed)."""

    def __init__(self, folder: Path, n: int, embedding_size: int, id_width: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.n, self.d = folder, n, embedding_size
        self.tag = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self.ids = np.lib.format.open_memmap(self._path("ids.npy"), "w+", f"S{max(1, id_width)}", (n,))
        self.sums = np.lib.format.open_memmap(self._path("sums.npy"), "w+", np.float32, (n, embedding_size))
        self.norms = np.lib.format.open_memmap(self._path("norms.npy"), "w+", np.float32, (n,))
        self.counts = np.lib.format.open_memmap(self._path("counts.npy"), "w+", np.int64, (n,))
        self.factory = factory_for(n, embedding_size)

    def _path(self, name: str) -> Path:
        return self.folder / f"{self.tag}.{name}"

    def put(self, start: int, ids: list[str], sums: np.ndarray, norms: np.ndarray, counts: np.ndarray) -> None:
        end = start + len(ids)
        self.ids[start:end] = [i.encode() for i in ids]
        self.sums[start:end], self.norms[start:end], self.counts[start:end] = sums, norms, counts

    def _unit(self, start: int, end: int) -> np.ndarray:
        return (self.sums[start:end] / np.maximum(self.norms[start:end], 1e-12)[:, None]).astype(np.float32)

    def build_index(self, threads: int, progress, stop) -> Any:
        """Train the cells on a sample, then add every template; `progress(done, total, phase)` is called as it
        goes and `stop()` returning True abandons the build (returns None)."""
        faiss = _faiss()
        faiss.omp_set_num_threads(max(1, threads))
        index = faiss.index_factory(self.d, self.factory, faiss.METRIC_L2)  # unit vectors: L2 ranks as cosine
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = TRAIN_ITERATIONS
        cells = ivf.nlist
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(self.n, size=min(self.n, TRAIN_POINTS_PER_CELL * cells, MAX_TRAIN_POINTS),
                                    replace=False))
        train = (self.sums[sample] / np.maximum(self.norms[sample], 1e-12)[:, None]).astype(np.float32)
        progress(0, self.n, f"training {cells} cells on {len(sample)} templates")
        index.train(train)
        del train
        for start in range(0, self.n, ADD_CHUNK):
            if stop():
                return None
            index.add(self._unit(start, min(self.n, start + ADD_CHUNK)))
            progress(min(self.n, start + ADD_CHUNK), self.n, "adding")
        return index

    def commit(self, index: Any, manifest: dict) -> None:
        faiss = _faiss()
        faiss.write_index(index, str(self._path("ivf.faiss")))
        for array in (self.ids, self.sums, self.norms, self.counts):
            array.flush()
        for name in ("ids.npy", "sums.npy", "norms.npy", "counts.npy", "ivf.faiss"):
            _fsync(self._path(name))
        manifest = {**manifest, "format": FORMAT, "tag": self.tag, "identities": self.n, "index": self.factory,
                    "faces": int(np.asarray(self.counts).sum(dtype=np.int64))}
        temporary = self.folder / f"{MANIFEST}.{self.tag}.tmp"
        temporary.write_text(json.dumps(manifest, indent=1))
        _fsync(temporary)
        os.replace(temporary, self.folder / MANIFEST)
        _fsync(self.folder)
        remove_other_tags(self.folder, keep=self.tag)

    def abandon(self) -> None:
        del self.ids, self.sums, self.norms, self.counts
        for path in self.folder.glob(f"{self.tag}.*"):
            path.unlink(missing_ok=True)


def remove_other_tags(folder: Path, keep: str | None) -> None:
    """Delete every snapshot file but those of `keep` (and the manifest). Open memory maps of removed files stay
    valid until unmapped (POSIX), so a running search is never cut off."""
    for path in folder.glob("*"):
        if path.name != MANIFEST and (keep is None or not path.name.startswith(f"{keep}.")):
            path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
