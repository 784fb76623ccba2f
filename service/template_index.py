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
                      are scored, never the score. Each template is filed in its two nearest cells ("spilling"),
                      so a query that lands just across a cell border from a face still scans a cell holding it;
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

FORMAT = 2  # 2: each template in its two nearest cells (format 1 snapshots are rebuilt)
MANIFEST = "manifest.json"
# k-means on a sample: 40 points per cell (faiss warns below 39), 10 iterations. Training costs
# cells x sample x D per iteration, so a sample (not every template) keeps it to minutes at 10M faces.
TRAIN_POINTS_PER_CELL = 40
TRAIN_ITERATIONS = 10
ADD_CHUNK = 200_000
# Cells each template is filed in. Measured by `python -m benchmarks.ann_spill --templates 10000000 --cells 16384
# --nprobe 512,768,1024` on uniform random templates, the hard case for k-means cells, with planted queries 0.75
# from their face: the face's own cell was among the query's 512 / 768 / 1,024 nearest for 95.0 / 97.3 / 98.65 %
# of queries, one of its two nearest cells for 99.55 / 99.75 / 99.9 %. Scanning twice the codes per cell costs
# less than scanning twice the cells for the same recall. BENCHMARKS.md has the search-time side.
SPILL = 2


@dataclass(frozen=True)
class IndexOptions:
    """How the SQLite gallery uses its index (FACE_GALLERY_INDEX_* settings)."""

    enabled: bool = True
    # Below this many searchable identities exact search is used (and no index is built): BENCHMARKS.md measures
    # where the index starts to pay.
    min_identities: int = 50_000
    # Cells scanned per query; None: `default_nprobe` of the index's cell count.
    nprobe: int | None = None
    # Identities taken from the index per query, then re-ranked exactly: enough that the coarse codes' ranking
    # keeps exact search's top 5 (see factory_for).
    candidates: int = 200
    # A rebuild starts when identities changed or added since the last build exceed this share of it (they are
    # searched exactly meanwhile, so they cost time per search as they grow).
    rebuild_fraction: float = 0.05
    build: bool = True  # False: use a persisted index, never build one (the bulk-import command)


# Fewest templates an index is built over, whatever min_identities says: k-means needs at least as many points as
# cells (16 at least) and the 4-bit codes 16 per sub-quantizer; faiss refuses to train on fewer.
MIN_TEMPLATES = 16
# After a build fails (disk full, folder not writable, out of memory), writes do not start another for this long:
# every enrolment would otherwise start a doomed build costing both cores for minutes at large sizes.
RETRY_AFTER_FAILURE_S = 600.0


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


# The most cells a query scans by default (`default_nprobe`): below LARGE_INDEX_CELLS cells, and from there on.
MAX_DEFAULT_NPROBE_SMALL = 384
MAX_DEFAULT_NPROBE = 768
LARGE_INDEX_CELLS = 8192


def default_nprobe(cells: int) -> int:
    """Cells a query scans unless FACE_GALLERY_INDEX_NPROBE says: about 8 sqrt(cells), rounded up to a multiple of
    64, at most 384 below 8,192 cells and 768 from there (and at most every cell): 256 of 1,024, 384 of 2,048 and
    4,096, 768 of 8,192 and 16,384.

    A fixed count scans a quarter of a small index (768 of 1,024 cells at 100,000 identities) for no more recall,
    while a large one needs fewer than a fixed share. Measured (BENCHMARKS.md, ANN section and its notes): the
    clustered gallery kept 99.6 % of exact search's top 5 at 256 of 1,024 cells and at 384 of 2,048, and needed 768
    of 8,192 (98.7 % at 512, 99.2 % at 768); uniform 1M (4,096 cells) found every planted match at 384 (one missed
    at 256), 14 % sooner than at 512; uniform 10M (16,384 cells) found every planted match at 768."""
    cap = MAX_DEFAULT_NPROBE if cells >= LARGE_INDEX_CELLS else MAX_DEFAULT_NPROBE_SMALL
    return max(1, min(cells, cap, 64 * math.ceil(8 * math.sqrt(cells) / 64)))


def factory_for(n: int, d: int) -> str:
    # 4-bit product quantisation (fast-scan: SIMD table lookups) over 3-dimension sub-vectors where d allows (d / 6
    # bytes per template), else 2 (d / 4 bytes); the exact re-rank restores the similarity. The 3-dimension codes
    # rank near neighbours more coarsely, so they need 200 candidates (IndexOptions.candidates) to keep exact
    # search's top 5 as the 2-dimension ones did with 100; with those, about the same time on uniform galleries, a
    # little less on clustered ones, and a third less memory for the codes, which the IVF file holds in memory
    # (32 against 48 bytes an entry, two entries a template). 4-dimension codes needed 400 candidates and were
    # slower. Figures: BENCHMARKS.md, ANN section's notes (1M faces, configurations alternating query by query).
    m = d // 3 if d % 3 == 0 else d // 2 if d % 2 == 0 else d
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
        # Plain ndarray views of the memory maps: np.memmap's indexing is Python-level code on every lookup
        # (cProfile, 1M identities: 12 calls a search, 0.12 ms of it counting the lookups themselves).
        ids, sums, norms, counts = (np.asarray(a) for a in (ids, sums, norms, counts))
        self.ids, self.sums, self.norms, self.counts, self.index = ids, sums, norms, counts, index
        self.seq = int(manifest["seq"])
        self.faces = int(manifest["faces"])
        # Kept: `_faiss()` sets a logger's level, which empties the logging module's caches (tens of microseconds
        # a search under cProfile).
        self._faiss = faiss = _faiss()
        self._ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        # A query's cells are chosen here, exactly, from the cell centres (12 MB at 16,384 cells): one
        # matrix-vector product. The HNSW graph over the centres that large indexes carry is what makes a build's
        # millions of assignments quick; for one query it took 0.8-1.1 ms where this takes 0.2 ms (8,192 cells,
        # nprobe 512-1,024, 10M faces), and it may miss a near cell where this never does.
        quantizer = faiss.downcast_index(self._ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer = faiss.downcast_index(quantizer.storage)
        self._centres = quantizer.reconstruct_n(0, self._ivf.nlist)
        self._centre_norms = np.einsum("ij,ij->i", self._centres, self._centres)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def open(cls, folder: Path, model_sha256: str, embedding_size: int, gallery_id: str) -> Snapshot:
        """gallery_id: the database's own random id (service/gallery.py): an index folder copied or left beside
        another gallery file, even one of the same size and change count, is never used for it."""
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
            if manifest.get("gallery_id") != gallery_id:
                raise SnapshotUnusable("index built for another gallery file (or by an earlier version)")
            if int(manifest["seq"]) < 0 or int(manifest["faces"]) < 0:
                raise SnapshotUnusable("index manifest holds negative counts")
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
            if index.ntotal != int(manifest["entries"]) or not n <= index.ntotal <= SPILL * n \
                    or index.d != embedding_size:
                raise SnapshotUnusable(f"index holds {index.ntotal} entries of {index.d}, expected "
                                       f"{manifest['entries']} for {n} identities of {embedding_size}")
            _check_entries(faiss, index, n)
            return cls(folder, manifest, ids, sums, norms, counts, index)
        except SnapshotUnusable:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:  # truncated, garbled
            raise SnapshotUnusable(f"index files unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None

    def row_of(self, identity_id: str) -> int | None:
        key = identity_id.encode()
        if len(key) > self.ids.dtype.itemsize:  # longer than every id of the snapshot
            return None
        row = int(np.searchsorted(self.ids, key))
        return row if row < len(self.ids) and self.ids[row] == key else None

    def id_at(self, row: int) -> str:
        return self.ids[row].decode()

    @property
    def cells(self) -> int:
        return int(self._ivf.nlist)

    def nprobe(self, wanted: int | None) -> int:
        """The cells a query scans: `wanted` (at most every cell), or `default_nprobe` of this index's cells."""
        return default_nprobe(self.cells) if wanted is None else max(1, min(int(wanted), self.cells))

    def candidates(self, q: np.ndarray, k: int, nprobe: int | None) -> np.ndarray:
        """Up to k distinct rows the index proposes for one query (1, D), nearest first; nprobe: see `nprobe`."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        nprobe = self.nprobe(nprobe)
        # Squared distance to each centre, less |q|^2 (the same for every cell): the nprobe nearest cells, nearest
        # first (faiss's own order; the codes are of the templates themselves, not of their offsets from a
        # centre, so the scan does not use these distances).
        gaps = self._centre_norms - 2 * (self._centres @ q[0])
        cells = np.argpartition(gaps, nprobe - 1)[:nprobe] if nprobe < len(gaps) else np.arange(len(gaps))
        cells = cells[np.argsort(gaps[cells], kind="stable")]
        cells, gaps = cells[None, :].astype(np.int64), gaps[cells][None, :].astype(np.float32)
        # One thread a search: scanning half the cells on a second one was slower on the bench machine's 2 cores
        # once nothing else ran (1M faces: 3.10 against 2.33 ms uniform, 1.90 against 1.64 clustered), and it
        # would take the core a concurrent request needs. A template filed in two scanned cells comes back twice
        # (same code, same distance): ask for enough entries to still have k distinct rows.
        rows = self._scan(q, min(k * SPILL, self.index.ntotal), cells, gaps)
        rows = rows[rows >= 0]
        _, first = np.unique(rows, return_index=True)
        return rows[np.sort(first)][:k]

    def _scan(self, q: np.ndarray, k: int, cells: np.ndarray, cell_distances: np.ndarray) -> np.ndarray:
        """The rows of the k nearest entries of those cells, nearest first, -1 past the last (faiss's search after
        its cell choice; it releases the GIL)."""
        faiss = self._faiss
        cells, cell_distances = np.ascontiguousarray(cells), np.ascontiguousarray(cell_distances)
        distances, rows = np.empty((1, k), np.float32), np.empty((1, k), np.int64)
        # The Python wrapper of search_preassigned takes no parameters (so no per-call nprobe): the C one does.
        self._ivf.search_preassigned_c(1, faiss.swig_ptr(q), k, faiss.swig_ptr(cells), faiss.swig_ptr(cell_distances),
                                       faiss.swig_ptr(distances), faiss.swig_ptr(rows), False,
                                       faiss.SearchParametersIVF(nprobe=cells.shape[1]))
        return rows[0]


def available_threads() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _check_entries(faiss, index: Any, n: int) -> None:
    """Every entry of the inverted lists names a row of the snapshot: a damaged id would otherwise fail every
    search (or score a row the index never filed). The ids are in memory once the file is read: one pass."""
    ivf = faiss.extract_index_ivf(index)
    lists, total = ivf.invlists, 0
    for cell in range(ivf.nlist):
        size = lists.list_size(cell)
        if not size:
            continue
        pointer = lists.get_ids(cell)
        try:
            rows = faiss.rev_swig_ptr(pointer, size)
            if int(rows.min()) < 0 or int(rows.max()) >= n:
                raise SnapshotUnusable(f"index cell {cell} names rows outside the {n} identities: the file is corrupt")
        finally:
            lists.release_ids(cell, pointer)
        total += size
    if total != index.ntotal:
        raise SnapshotUnusable(f"index cells hold {total} entries, its header says {index.ntotal}")


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
        try:
            self.ids = _mapped(self._path("ids.npy"), f"S{max(1, id_width)}", (n,))
            self.sums = _mapped(self._path("sums.npy"), np.float32, (n, embedding_size))
            self.norms = _mapped(self._path("norms.npy"), np.float32, (n,))
            self.counts = _mapped(self._path("counts.npy"), np.int64, (n,))
        except BaseException:
            for path in self.folder.glob(f"{self.tag}.*"):
                path.unlink(missing_ok=True)
            raise
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
        # faiss's own `add` files a vector in its nearest cell only, so the cells are filled here: every
        # template's code and two nearest cells a chunk at a time, then each cell's entries in one call.
        ivf = faiss.downcast_index(ivf)
        codes = np.empty((self.n, ivf.pq.code_size), np.uint8)
        assigned = np.empty((self.n, SPILL), np.int64)
        for start in range(0, self.n, ADD_CHUNK):
            if stop():
                return None
            end = min(self.n, start + ADD_CHUNK)
            unit = self._unit(start, end)
            codes[start:end] = ivf.pq.compute_codes(unit)
            _, assigned[start:end] = ivf.quantizer.search(unit, SPILL)
            progress(end, self.n, "assigning")
        if stop():
            return None
        _fill_cells(faiss, ivf, codes, assigned)
        index.ntotal = ivf.ntotal
        return index

    def commit(self, index: Any, manifest: dict) -> None:
        faiss = _faiss()
        faiss.write_index(index, str(self._path("ivf.faiss")))
        for array in (self.ids, self.sums, self.norms, self.counts):
            array.flush()
        for name in ("ids.npy", "sums.npy", "norms.npy", "counts.npy", "ivf.faiss"):
            _fsync(self._path(name))
        manifest = {**manifest, "format": FORMAT, "tag": self.tag, "identities": self.n, "index": self.factory,
                    "entries": int(index.ntotal), "cells_per_template": SPILL,
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


def _mapped(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A new .npy file mapped for writing, its disk space taken first: numpy makes it sparse, and a write to a page
    the file system then has no room for kills the process with SIGBUS, where this raises OSError (ENOSPC)."""
    array = np.lib.format.open_memmap(path, "w+", dtype, shape)
    if not hasattr(os, "posix_fallocate"):  # not Linux: as numpy leaves it
        return array
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except BaseException:
        del array
        raise
    finally:
        os.close(fd)
    return array


def _fill_cells(faiss, ivf: Any, codes: np.ndarray, assigned: np.ndarray) -> None:
    """File row r's code in each cell of `assigned[r]` (-1: none), as fast-scan's blocks of packed codes.

    Each cell's entries go in with one `add_entries` call on the empty list: faiss's BlockInvertedLists copies
    whole packed blocks only when a list is empty or fills up exactly, so everything for a cell is packed here."""
    cells = assigned.ravel()
    rows = np.repeat(np.arange(len(assigned), dtype=np.int64), assigned.shape[1])
    keep = cells >= 0
    cells, rows = cells[keep], rows[keep]
    order = np.argsort(cells, kind="stable")
    cells, rows = cells[order], rows[order]
    bounds = np.searchsorted(cells, np.arange(ivf.nlist + 1))
    packer = ivf.get_CodePacker()
    per_block, block_bytes = packer.nvec, packer.block_size
    lists = ivf.invlists
    for cell in range(ivf.nlist):
        members = rows[bounds[cell]:bounds[cell + 1]]
        if not len(members):
            continue
        blocks = -(-len(members) // per_block)
        flat = np.zeros((blocks * per_block, codes.shape[1]), np.uint8)
        flat[: len(members)] = codes[members]
        packed = np.empty(blocks * block_bytes, np.uint8)
        for b in range(blocks):
            packer.pack_all(faiss.swig_ptr(flat[b * per_block:]), faiss.swig_ptr(packed[b * block_bytes:]))
        lists.add_entries(cell, len(members), faiss.swig_ptr(members), faiss.swig_ptr(packed))
    ivf.ntotal = len(rows)


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
