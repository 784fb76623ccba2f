"""The SQLite gallery's ANN index (service/template_index.py): whatever it finds carries exact search's similarity and
threshold decision, changes are visible at once, deleted identities never come back, and a missing, stale, corrupt
or other-model index is never used but rebuilt while exact search answers. Real galleries in SQLite files, a real
faiss index, real embeddings of the shared photos where they are available; the index's minimum size is set low so
that small galleries use it."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from service import template_index
from service.gallery import Gallery, ImportedIdentity
from service.template_index import MANIFEST, IndexOptions, index_folder

D = 192
MODEL = "a" * 64
OTHER_MODEL = "b" * 64
# Every cell scanned: the index then proposes every template, so results must equal exact search's exactly.
EVERYTHING = IndexOptions(min_identities=100, nprobe=100_000, candidates=100_000)
# A fraction of the cells scanned, as in production: found means found with the exact similarity.
SMALL = IndexOptions(min_identities=100, nprobe=64, candidates=50)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def fill(path: Path, vectors: np.ndarray, prefix: str = "p", model: str = MODEL) -> list[str]:
    ids = [f"{prefix}{i:06d}" for i in range(len(vectors))]
    with Gallery(path, model, D) as gallery:
        gallery.import_identities([ImportedIdentity(i, v[None], model) for i, v in zip(ids, vectors)])
    return ids


def answers(gallery: Gallery, queries: np.ndarray, top_k: int = 5, threshold: float | None = None) -> list:
    return [[(m.identity_id, m.similarity, m.faces) for m in gallery.search(q, top_k, threshold)[0]]
            for q in queries]


def assert_found_as_exact(indexed: list, exact: list, threshold: float | None = None) -> None:
    """Every identity the index returns has exact search's similarity and face count; with a threshold, exact
    search's matches above it are found too, unless the index missed them (counted by the caller)."""
    for got, want in zip(indexed, exact):
        by_id = {i: (s, k) for i, s, k in want}
        for identity, similarity, faces in got:
            if identity in by_id:
                assert (similarity, faces) == by_id[identity]
            if threshold is not None:
                assert similarity >= threshold


@pytest.fixture
def uniform(tmp_path: Path):
    rng = np.random.default_rng(7)
    vectors = unit(rng.standard_normal((3000, D)))
    path = tmp_path / "gallery.db"
    fill(path, vectors)
    queries = unit(0.75 * vectors[:40] + 0.66 * unit(rng.standard_normal((40, D))))
    return path, vectors, queries


def test_index_built_in_background_agrees_with_exact_search(uniform):
    path, _, queries = uniform
    with Gallery(path, MODEL, D) as exact, Gallery(path, MODEL, D, index=EVERYTHING) as indexed:
        assert indexed.wait_for_index(60)
        assert not exact.index_in_use
        # Every cell scanned: identical answers, similarities bit for bit, with and without a threshold.
        assert_found_as_exact(answers(indexed, queries), answers(exact, queries))  # far ones may be missed
        assert answers(indexed, queries, 5, 0.5) == answers(exact, queries, 5, 0.5)
        assert answers(indexed, queries[:3], top_k=3000) == answers(exact, queries[:3], top_k=3000)
        assert indexed.count_searchable_identities() == exact.count_searchable_identities() == 3000
        assert indexed.count_faces() == exact.count_faces() == 3000
    # Few cells scanned: what is found is still exact search's, and the planted matches are all found.
    with Gallery(path, MODEL, D, index=SMALL) as indexed, Gallery(path, MODEL, D) as exact:
        assert indexed.index_in_use
        got, want = answers(indexed, queries, 5, 0.5), answers(exact, queries, 5, 0.5)
        assert_found_as_exact(got, want, 0.5)
        assert [w[0][0] for w in want] == [f"p{i:06d}" for i in range(40)]
        found = sum(bool(g) and g[0][0] == w[0][0] for g, w in zip(got, want))
        assert found >= 38, f"the index found {found} of 40 planted matches"


def test_each_template_is_filed_in_its_two_nearest_cells(uniform):
    """Spilling: a query just across a cell border from a face still finds it in the neighbouring cell. The
    cells hold each template twice, a search proposes it once, and a face is found by scanning either cell."""
    import faiss

    path, vectors, queries = uniform
    with Gallery(path, MODEL, D, index=SMALL) as gallery:
        assert gallery.wait_for_index(60)
        snap = gallery._snap
        ivf = faiss.extract_index_ivf(snap.index)
        assert snap.index.ntotal == 2 * len(snap) == 2 * len(vectors)
        rows = snap.candidates(queries[:1], 500, 64)
        assert len(rows) == len(set(rows.tolist())) == 500
        # Scanning every cell and asking for every template proposes every row exactly once, though the cells
        # hold each twice; asking for fewer gives (up to ties of the 4-bit codes at the cut) the first of those.
        for q in queries[:10]:
            every, some = snap.candidates(q[None], 5000, snap.cells), snap.candidates(q[None], 100, snap.cells)
            assert sorted(every.tolist()) == list(range(3000))
            assert len(some) == 100 and len(set(some.tolist()) & set(every[:100].tolist())) >= 90
        _, cells = ivf.quantizer.search(vectors[:20], 2)
        for i, (template, (nearest, second)) in enumerate(zip(vectors[:20], cells)):
            row = snap.row_of(f"p{i:06d}")
            for cell in (nearest, second):  # scanning that one cell alone finds the face, exactly scored
                _, found = ivf.search_preassigned(template[None], 1, np.array([[cell]]), np.zeros((1, 1), np.float32))
                assert found[0, 0] == row


def test_a_query_scans_exactly_its_nearest_cells_also_where_a_graph_filed_the_templates(uniform, monkeypatch):
    """Large indexes file templates through an HNSW graph over the cell centres (quick for millions of
    assignments, approximate); a query's cells are the exactly nearest ones all the same, and what is found
    carries exact search's similarity."""
    import faiss

    monkeypatch.setattr(template_index, "HNSW_QUANTIZER_FROM", 16)
    path, _, queries = uniform
    with Gallery(path, MODEL, D, index=SMALL) as gallery, Gallery(path, MODEL, D) as exact:
        assert gallery.wait_for_index(60)
        snap = gallery._snap
        assert "_HNSW" in snap.manifest["index"]
        ivf = faiss.extract_index_ivf(snap.index)
        graph = faiss.downcast_index(ivf.quantizer)
        centres = faiss.rev_swig_ptr(faiss.downcast_index(graph.storage).get_xb(), ivf.nlist * D)
        centres = np.array(centres, dtype=np.float64).reshape(ivf.nlist, D)
        for q in queries[:10]:
            nearest = np.argsort(((centres - q) ** 2).sum(1))[:8]
            filed = set()
            for cell in nearest:
                size = ivf.invlists.list_size(int(cell))
                filed |= set(faiss.rev_swig_ptr(ivf.invlists.get_ids(int(cell)), size).tolist())
            assert set(snap.candidates(q[None], 10_000, 8).tolist()) == filed
        assert_found_as_exact(answers(gallery, queries, 5, 0.5), answers(exact, queries, 5, 0.5), 0.5)


def test_changes_are_visible_at_once_and_deleted_identities_never_return(uniform):
    path, vectors, queries = uniform
    rng = np.random.default_rng(8)
    with Gallery(path, MODEL, D, index=EVERYTHING) as g:
        assert g.wait_for_index(60)
        # A new identity: found by the next search.
        newcomer = unit(rng.standard_normal(D))
        g.enroll("newcomer", newcomer)
        assert g.search(newcomer, 1)[0][0].identity_id == "newcomer"
        # A second face for an indexed identity: its template moves, and the new similarity is what is returned.
        g.enroll("p000001", queries[1])
        # Deleted: the identity a query was planted on, and one face of another.
        g.delete_identity("p000000")
        g.enroll("p000002", queries[2])
        face = g.get_identity("p000002").faces[0].face_id
        g.delete_face("p000002", face)
        g.delete_identity("p000003")
        g.enroll("p000003", vectors[3])  # deleted, then enrolled again: the new one only
        assert g.index_in_use
        after = answers(g, queries[:4], top_k=10)
        assert all(identity != "p000000" for row in after for identity, _, _ in row)
        with Gallery(path, MODEL, D) as exact:  # what a fresh exact search says about the same database
            want = answers(exact, queries[:4], top_k=10)
            # The same identities; similarities to ~1e-7, not bit for bit: an enrolment sums its template in
            # float64, a load from the database in float32 (as without an index).
            assert [[(i, k) for i, _, k in row] for row in after] == [[(i, k) for i, _, k in row] for row in want]
            np.testing.assert_allclose([s for row in after for _, s, _ in row], [s for row in want for _, s, _ in row],
                                       atol=1e-6)
            assert g.count_faces() == exact.count_faces()
            assert g.count_searchable_identities() == exact.count_searchable_identities()
        assert [m.faces for m in g.search(queries[1], 1)[0]] == [2]
        assert g.search(queries[2], 1)[0][0].similarity == pytest.approx(1.0, abs=1e-6)  # only the second face
    # After a restart on the persisted index: the change log brings the same state back.
    with Gallery(path, MODEL, D, index=EVERYTHING) as g, Gallery(path, MODEL, D) as exact:
        assert g.index_in_use
        assert answers(g, queries[:4], top_k=10) == answers(exact, queries[:4], top_k=10)
        assert g.search(newcomer, 1)[0][0].identity_id == "newcomer"


def test_changes_during_a_build_are_kept(tmp_path: Path):
    """Enrolments and deletions while the background build copies the templates: none lost, none resurrected."""
    rng = np.random.default_rng(9)
    vectors = unit(rng.standard_normal((10_000, D)))
    path = tmp_path / "gallery.db"
    fill(path, vectors)
    added, deleted = {}, []
    with Gallery(path, MODEL, D, index=SMALL) as g:
        i = 0
        while g._builder.is_alive() and i < 300:
            if i % 2:
                added[f"new{i}"] = unit(rng.standard_normal(D))
                g.enroll(f"new{i}", added[f"new{i}"])
            else:
                deleted.append(f"p{i * 3:06d}")
                g.delete_identity(deleted[-1])
            i += 1
        assert g.wait_for_index(60)
        assert i > 10, "the build finished before the test could change anything"
        for identity, vector in added.items():
            assert g.search(vector, 1)[0][0].identity_id == identity
        for identity in deleted:
            assert g.search(vectors[int(identity[1:])], 1)[0][0].identity_id != identity
        with Gallery(path, MODEL, D) as exact:
            assert g.count_faces() == exact.count_faces() == 10_000 - len(deleted) + len(added)
            assert g.count_searchable_identities() == exact.count_searchable_identities()


def _restart_and_check(path: Path, queries: np.ndarray, damage) -> None:
    with Gallery(path, MODEL, D, index=EVERYTHING) as g:
        assert g.wait_for_index(60)
    damage(index_folder(path))
    with Gallery(path, MODEL, D, index=EVERYTHING) as g, Gallery(path, MODEL, D) as exact:
        assert not g.index_in_use  # not trusted: exact search answers at once...
        assert answers(g, queries) == answers(exact, queries)
        assert g.wait_for_index(60)  # ...while it is rebuilt
        assert answers(g, queries) == answers(exact, queries)
    with Gallery(path, MODEL, D, index=EVERYTHING) as g:
        assert g.index_in_use  # the rebuilt one is persisted


def _tag(folder: Path) -> str:
    return json.loads((folder / MANIFEST).read_text())["tag"]


@pytest.mark.parametrize("damage", [
    pytest.param(lambda f: (f / f"{_tag(f)}.ivf.faiss").write_bytes(b"\0" * 1000), id="garbled index file"),
    pytest.param(lambda f: (f / f"{_tag(f)}.sums.npy").unlink(), id="templates file missing"),
    pytest.param(lambda f: _truncate(f / f"{_tag(f)}.sums.npy"), id="templates file truncated"),
    pytest.param(lambda f: _scramble_templates(f / f"{_tag(f)}.sums.npy"), id="templates overwritten"),
    pytest.param(lambda f: (f / MANIFEST).write_text("{not json"), id="manifest garbled"),
    pytest.param(lambda f: _edit_manifest(f, seq="x"), id="manifest change number garbled"),
    pytest.param(lambda f: _edit_manifest(f, seq=None), id="manifest change number null"),
    pytest.param(lambda f: _edit_manifest(f, faces=-1, seq=-1), id="manifest counts negative"),
    pytest.param(lambda f: _renumber_an_entry(f / f"{_tag(f)}.ivf.faiss"), id="index entry names no row"),
    pytest.param(lambda f: (f / MANIFEST).unlink(), id="index missing"),
    pytest.param(lambda f: _edit_manifest(f, format=template_index.FORMAT - 1), id="index of the previous format"),
])
def test_missing_or_corrupt_index_is_not_used_and_rebuilt(uniform, damage):
    path, _, queries = uniform
    _restart_and_check(path, queries, damage)


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, **changes}))


def _renumber_an_entry(path: Path) -> None:
    """One entry of the inverted lists names a row past the end (a damaged id): every search would fail on it."""
    import faiss

    index = faiss.read_index(str(path))
    ivf = faiss.extract_index_ivf(index)
    cell = next(c for c in range(ivf.nlist) if ivf.invlists.list_size(c))
    faiss.rev_swig_ptr(ivf.invlists.get_ids(cell), 1)[0] = 10**12
    faiss.write_index(index, str(path))


def _scramble_templates(path: Path) -> None:
    sums = np.load(path, mmap_mode="r+")
    sums[:] = np.random.default_rng(0).standard_normal(sums.shape)
    sums.flush()


def test_changes_the_index_cannot_account_for_make_it_stale(uniform):
    """A database changed while the change log was off (here: the log switched off by hand, then a face deleted
    with the sqlite3 shell's SQL) is not searched through the old index."""
    path, _, queries = uniform

    def stale(folder: Path) -> None:
        with sqlite3.connect(path) as db:
            db.execute("DELETE FROM template_log")
            db.execute("DELETE FROM faces WHERE identity_id = 'p000000'")

    _restart_and_check(path, queries, stale)


def test_a_change_made_around_the_change_log_is_found_after_start_up(uniform, caplog):
    """The database's face count is checked against the index after start-up, beside the service (a scan of
    every face: most of a cold start's reading at millions). A face deleted with the log's trigger dropped (the
    log itself still on, so nothing else tells) is found then: the index is dropped, every face loaded, and the
    index rebuilt, exact search answering meanwhile."""
    path, _, queries = uniform
    with Gallery(path, MODEL, D, index=EVERYTHING) as g:
        assert g.wait_for_index(60)
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER faces_deleted_log")
        db.execute("DELETE FROM faces WHERE identity_id = 'p000000'")
    with caplog.at_level(logging.INFO, logger="service.gallery"), \
            Gallery(path, MODEL, D, index=EVERYTHING) as g, Gallery(path, MODEL, D) as exact:
        g.wait_for_check(60)
        assert "checking the database's totals against it in the background" in caplog.text  # opened on the index
        assert "index not used: it accounts for 3000 faces, the database holds 2999" in caplog.text
        assert g.count_faces() == exact.count_faces() == 2999
        assert answers(g, queries) == answers(exact, queries)
        assert "p000000" not in {m.identity_id for m in g.search(queries[0], 5)[0]}
        assert g.wait_for_index(60)
        assert answers(g, queries) == answers(exact, queries)


def test_a_deletion_beside_a_start_up_scan_does_not_wait_for_it(uniform):
    """Deleting erases the WAL (TRUNCATE checkpoint), which waits for readers; while a start-up scan reads beside
    the gallery, that checkpoint is deferred to the scan's end instead of holding every request up."""
    path, _, _ = uniform
    wal = path.with_name(path.name + "-wal")
    with Gallery(path, MODEL, D, index=EVERYTHING) as g:
        g.wait_for_check(60)
        # The background build writes to the database when it commits (the change log's switch): done first, so
        # that no write after the checkpoint refills the WAL this test looks at.
        assert g.wait_for_index(60)
        with g._reading_beside() as reader:
            reader.execute("BEGIN")
            assert reader.execute("SELECT COUNT(*) FROM faces").fetchone()[0] == 3000
            started = time.monotonic()
            g.delete_identity("p000001")
            assert time.monotonic() - started < 5  # the busy timeout is 10 s
            assert reader.execute("SELECT COUNT(*) FROM faces").fetchone()[0] == 3000  # its snapshot, still
            assert wal.stat().st_size > 0
            reader.execute("COMMIT")
        assert wal.stat().st_size == 0  # erased when the scan ended
        assert g.count_faces() == 2999


def test_closing_stops_a_scan_beside_the_gallery_at_once(uniform):
    """A start-up scan still reading when the service stops (a cold disk at millions of rows) is interrupted, not
    waited for: here a query that would run for minutes."""
    import threading

    path, _, _ = uniform
    g = Gallery(path, MODEL, D)
    outcome: list[BaseException | None] = []

    def scan() -> None:
        try:
            with g._reading_beside() as reader:
                reader.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10000000000) "
                               "SELECT COUNT(*) FROM c").fetchone()
            outcome.append(None)
        except sqlite3.OperationalError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=scan)
    thread.start()
    deadline = time.monotonic() + 10
    while not g._readers_open and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # inside the query by now
    started = time.monotonic()
    g.close()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 5
    assert isinstance(outcome[0], sqlite3.OperationalError) and "interrupted" in str(outcome[0])


def test_an_older_copy_of_the_database_is_not_searched_through_a_newer_index(uniform, tmp_path: Path):
    path, _, queries = uniform
    with Gallery(path, MODEL, D, index=EVERYTHING) as g:
        assert g.wait_for_index(60)
    older = tmp_path / "older.db"
    source, copy = sqlite3.connect(path), sqlite3.connect(older)
    source.backup(copy)
    source.close(), copy.close()
    with Gallery(path, MODEL, D, index=EVERYTHING) as g:
        g.enroll("late", queries[0])
    # The database goes back to the copy from before "late" (as a restore from backup would); the index folder
    # stays, and "late" is logged in a change log the copy does not have.
    older.replace(path)
    for leftover in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    with Gallery(path, MODEL, D, index=EVERYTHING) as g:
        assert g.index_in_use  # built before "late": it matches the older copy exactly
        assert "late" not in {m.identity_id for m in g.search(queries[0], 5)[0]}


def test_an_index_folder_of_another_gallery_is_never_used(uniform, tmp_path: Path):
    """Another gallery file's index folder, copied beside this one: same model, same size, same change count (both
    built once, nothing changed since), so nothing but the gallery's own id tells them apart."""
    path, _, queries = uniform
    other = tmp_path / "other" / "gallery.db"
    fill(other, unit(np.random.default_rng(8).standard_normal((3000, D))), prefix="q")
    with Gallery(other, MODEL, D, index=EVERYTHING) as g:
        assert g.wait_for_index(60)

    def replaced(folder: Path) -> None:
        shutil.rmtree(folder)
        shutil.copytree(index_folder(other), folder)

    _restart_and_check(path, queries, replaced)


_BUILD_FOREVER = """
import sys, time
from service.gallery import Gallery
from service.template_index import IndexOptions
Gallery(sys.argv[1], sys.argv[2], int(sys.argv[3]), index=IndexOptions(min_identities=100))
time.sleep(600)
"""


def test_builds_killed_before_their_commit_do_not_pile_up_files(tmp_path: Path):
    """A server killed during each build (kill -9, the OOM killer of a too small memory limit, restarted in a
    loop) leaves its half-written files; the next build removes them, so they never add up to several copies of
    the templates."""
    path = tmp_path / "gallery.db"
    fill(path, unit(np.random.default_rng(3).standard_normal((20_000, D))))
    folder = index_folder(path)
    for _ in range(3):
        before = set(folder.glob("*.sums.npy"))
        child = subprocess.Popen([sys.executable, "-c", _BUILD_FOREVER, str(path), MODEL, str(D)],
                                 cwd=Path(__file__).resolve().parents[1])
        try:
            deadline = time.monotonic() + 60
            while not set(folder.glob("*.sums.npy")) - before and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert not (folder / MANIFEST).exists()  # killed while copying or training, long before its commit
        tags = {p.name.split(".")[0] for p in folder.iterdir()}
        assert len(tags) == 1, tags  # only the last attempt's files
    with Gallery(path, MODEL, D, index=SMALL) as g:
        assert g.wait_for_index(120)
    assert {p.name.split(".")[0] for p in folder.iterdir() if p.name != MANIFEST} == {_tag(folder)}


_BUILD_ONCE = """
import sys
from service.gallery import Gallery
from service.template_index import IndexOptions
with Gallery(sys.argv[1], sys.argv[2], int(sys.argv[3]), index=IndexOptions(min_identities=100)) as g:
    print("index in use:", g.wait_for_index(120), [m.identity_id for m in g.search(g._sums[0], 1)[0]])
"""


@pytest.fixture
def small_file_system(tmp_path: Path):
    """A tmpfs of 16 MiB (root only: skipped elsewhere)."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)],
                                          check=False, capture_output=True).returncode != 0:
        pytest.skip("needs a small file system (root, to mount a tmpfs)")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_fails_the_build_not_the_server(tmp_path: Path, small_file_system: Path):
    """The index's templates are written through memory maps: on a full file system a write to one of their pages
    killed the process with SIGBUS (no log line; a server restarted in a loop died at each build). The space is
    now taken before anything is mapped, so the build fails like any other, and exact search goes on."""
    path = small_file_system / "gallery.db"
    fill(tmp_path / "gallery.db", unit(np.random.default_rng(6).standard_normal((10_000, D))))
    shutil.copy(tmp_path / "gallery.db", path)  # about 13 MiB: the 7.5 MiB of templates do not fit beside it
    child = subprocess.run([sys.executable, "-c", _BUILD_ONCE, str(path), MODEL, str(D)], check=False,
                           capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert child.returncode == 0, child.stderr[-2000:]
    assert "index in use: False ['p000000']" in child.stdout
    assert "index build failed" in child.stderr
    assert not [p for p in index_folder(path).iterdir() if p.name.endswith(".npy")]  # space given back


def test_a_failed_build_is_not_retried_on_every_write(uniform, caplog):
    """A build that cannot succeed (here the index folder's name is taken by a file) fails once; the enrolments
    after it do not each start another (at 10M faces each would cost minutes of both cores)."""
    path, _, queries = uniform
    index_folder(path).write_text("not a folder")
    caplog.set_level(logging.INFO, logger="service.gallery")
    late = unit(np.random.default_rng(5).standard_normal((5, D)))
    with Gallery(path, MODEL, D, index=SMALL) as g:
        assert not g.wait_for_index(60)
        for i, v in enumerate(late):
            g.enroll(f"late{i}", v)
            assert not g.wait_for_index(60)
            assert g.search(v, 1)[0][0].identity_id == f"late{i}"  # exact search goes on
        assert answers(g, queries[:1])[0][0][0] == "p000000"
    failures = [r for r in caplog.records if "index build failed" in r.getMessage()]
    assert len(failures) == 1


def test_a_minimum_below_what_an_index_needs_builds_none_too_small(tmp_path: Path, caplog):
    """FACE_GALLERY_INDEX_MIN_IDENTITIES=1: a gallery of a few identities has too few templates to train an index
    on; no build is tried (each would fail), exact search answers, and the index comes once there are enough."""
    caplog.set_level(logging.INFO, logger="service.gallery")
    vectors = unit(np.random.default_rng(4).standard_normal((40, D)))
    with Gallery(tmp_path / "gallery.db", MODEL, D, index=dataclasses.replace(EVERYTHING, min_identities=1)) as g:
        for i, v in enumerate(vectors[:10]):
            g.enroll(f"p{i}", v)
            assert not g.wait_for_index(60)
            assert g.search(v, 1)[0][0].identity_id == f"p{i}"
        for i, v in enumerate(vectors[10:], start=10):
            g.enroll(f"p{i}", v)
        assert g.wait_for_index(60)
        assert [g.search(v, 1)[0][0].identity_id for v in vectors] == [f"p{i}" for i in range(40)]
    assert not [r for r in caplog.records if "index build failed" in r.getMessage()]


def test_a_second_writer_on_the_file_never_makes_a_snapshot_that_hides_its_changes(uniform):
    """Two processes on one gallery file (unsupported: each misses the other's changes until restarted; here two
    Gallery objects, i.e. two connections, as two servers would be). One deletes an identity and enrols another;
    the other then changes enough to rebuild the index. After a restart the gallery must be the database's: the
    deleted identity never returned, the enrolment found (a snapshot built from the second's memory, stamped with
    the log's latest change, hid both for good)."""
    path, vectors, _ = uniform
    with Gallery(path, MODEL, D, index=SMALL) as g:
        assert g.wait_for_index(60)
    rng = np.random.default_rng(11)
    newcomer, extra = unit(rng.standard_normal(D)), unit(rng.standard_normal((200, D)))
    with Gallery(path, MODEL, D, index=SMALL) as first, Gallery(path, MODEL, D, index=SMALL) as second:
        first.delete_identity("p000000")
        first.enroll("newcomer", newcomer)
        for i, v in enumerate(extra):  # past the rebuild fraction (5 % of 3,000)
            second.enroll(f"extra{i}", v)
        second.wait_for_index(60)
    with Gallery(path, MODEL, D, index=SMALL) as g, Gallery(path, MODEL, D) as exact:
        assert g.count_faces() == exact.count_faces() == 3000 - 1 + 1 + 200
        assert "p000000" not in [m.identity_id for m in g.search(vectors[0], 5)[0]]
        assert g.search(newcomer, 1)[0][0].identity_id == "newcomer"
        assert [g.search(v, 1)[0][0].identity_id for v in extra] == [f"extra{i}" for i in range(200)]


def test_another_models_index_is_never_used(uniform):
    path, vectors, queries = uniform
    with Gallery(path, MODEL, D, index=EVERYTHING) as g:
        assert g.wait_for_index(60)
    with Gallery(path, OTHER_MODEL, D, index=EVERYTHING) as other:
        assert not other.index_in_use
        assert other.search(queries[0], 5) == [[]]  # none of the other model's faces; nothing compared across
        other.enroll("other-person", vectors[0])
        assert [m.identity_id for m in other.search(queries[0], 5)[0]] == ["other-person"]
        assert not other.wait_for_index(5)  # one identity: below the minimum, no index built
    with Gallery(path, MODEL, D, index=EVERYTHING) as g:
        # Its own model's index was rebuilt (the other model's opening stopped the change log): same answers.
        assert g.wait_for_index(60)
        assert g.search(queries[0], 1)[0][0].identity_id == "p000000"


def test_a_small_gallery_opens_without_a_warning(tmp_path: Path, caplog):
    """Below the minimum no index is due: opening one (every start of every small gallery, every import) warned
    that the index was not used and would be rebuilt."""
    fill(tmp_path / "gallery.db", unit(np.random.default_rng(2).standard_normal((50, D))))
    caplog.set_level(logging.INFO, logger="service.gallery")
    with Gallery(tmp_path / "gallery.db", MODEL, D, index=IndexOptions()) as g:
        assert not g.index_in_use
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_small_galleries_search_exactly_and_disabled_means_no_index(tmp_path: Path):
    path = tmp_path / "gallery.db"
    fill(path, unit(np.random.default_rng(1).standard_normal((50, D))))
    with Gallery(path, MODEL, D, index=SMALL) as g:  # 50 identities, minimum 100
        assert not g.wait_for_index(5)
    with Gallery(path, MODEL, D, index=dataclasses.replace(SMALL, min_identities=10, enabled=False)) as g:
        assert not g.wait_for_index(5)
    assert not (index_folder(path) / MANIFEST).exists()


def test_index_agrees_with_exact_search_on_real_embeddings(lfw_dir: Path, models_dir: Path, tmp_path: Path):
    """Real embeddings of the shared lfw-dev photos: people with several photos enrolled with all but one, the
    held-out photos as queries, among 2,000 other identities; /identify's 1:1 threshold decides a match."""
    from evaluate.pairs import central
    from service.detector import RetinaFaceDetector
    from service.embedder import Embedder
    from service.pipeline import Pipeline

    pipeline = Pipeline(RetinaFaceDetector(models_dir / "retinaface_mnet025.onnx"),
                        Embedder(models_dir / "mobilefacenet_192.onnx"))
    people = sorted(p for p in (lfw_dir / "images").iterdir() if len(list(p.glob("*.jpg"))) >= 3)[:25]
    import cv2

    enrolled, probes = {}, {}
    for person in people:
        photos = sorted(person.glob("*.jpg"))[:3]
        vectors = []
        for photo in photos:
            image = cv2.imread(str(photo))
            faces = pipeline.detect(image)
            vectors.append(pipeline.embed(image, [central(faces, image.shape)])[0].embedding)
        enrolled[person.name], probes[person.name] = np.array(vectors[:-1]), vectors[-1]
    path = tmp_path / "gallery.db"
    rng = np.random.default_rng(3)
    fill(path, unit(rng.standard_normal((2000, D))), prefix="filler")
    threshold = float(pipeline.embedder.threshold)
    with Gallery(path, MODEL, D) as g:
        for name, vectors in enrolled.items():
            g.enroll(name, vectors)
    queries = np.array(list(probes.values()))
    with Gallery(path, MODEL, D, index=SMALL) as indexed, Gallery(path, MODEL, D) as exact:
        assert indexed.wait_for_index(60)
        got, want = answers(indexed, queries, 5, threshold), answers(exact, queries, 5, threshold)
        assert got == want  # real faces: every match above the threshold found, with the exact similarity
        assert sum(bool(w) and w[0][0] == name for w, name in zip(want, probes)) >= 20  # the data is real
        assert_found_as_exact(answers(indexed, queries), answers(exact, queries))  # far ones may be missed


def test_codes_use_three_dimension_sub_vectors_where_the_embedding_size_allows():
    """d / 3 sub-quantizers where 3 divides d (192-d MobileFaceNet: 64, 32 bytes a code), else d / 2 (512-d
    ArcFace: 256), else one per dimension; the cells follow the gallery's size."""
    assert template_index.factory_for(10**6, 192) == "IVF4096,PQ64x4fs"
    assert template_index.factory_for(10**6, 512) == "IVF4096,PQ256x4fs"
    assert template_index.factory_for(10**5, 127) == "IVF1024,PQ127x4fs"
    assert template_index.factory_for(10**7, 192) == "IVF16384_HNSW32,PQ64x4fs"


def test_default_nprobe_grows_with_the_square_root_of_the_cells():
    """About 8 sqrt(cells) rounded up to a multiple of 64, never more than 384 below 8,192 cells nor 768 from there,
    nor than every cell: a small index is not scanned by the quarter, a large one not by a fixed share (the figures
    behind it: BENCHMARKS.md)."""
    cells = [16, 64, 256, 1024, 2048, 4096, 8192, 16384, 65536]
    assert [template_index.default_nprobe(c) for c in cells] == [16, 64, 128, 256, 384, 384, 768, 768, 768]
    # The cells an index has for a gallery size: 100k identities scan 256 of 1,024, 1M 384 of 4,096.
    assert [template_index.default_nprobe(template_index.cells_for(n)) for n in (10**5, 10**6, 10**7)] == [256, 384, 768]


def test_index_settings_come_from_the_environment(uniform, monkeypatch):
    from pydantic import ValidationError

    from service.gallery import open_gallery
    from service.settings import Settings

    path, _, queries = uniform
    # Unset: the default rule, on the index's own cell count.
    options = Settings().gallery_index_options
    assert options.nprobe is None
    with open_gallery(f"sqlite:///{path}", MODEL, D, index=dataclasses.replace(options, min_identities=100)) as g:
        assert g.wait_for_index(60)
        snap = g._snap
        default = template_index.default_nprobe(snap.cells)
        assert snap.nprobe(None) == default < snap.cells
        for q in queries[:5]:
            # Unset scans that many cells: the same candidates as asking for the number, and (asking for every
            # template) fewer than scanning every cell finds.
            assert snap.candidates(q[None], 50, None).tolist() == snap.candidates(q[None], 50, default).tolist()
            assert len(snap.candidates(q[None], 3000, None)) < len(snap.candidates(q[None], 3000, snap.cells)) == 3000
        assert g.search(queries[0], 1)[0][0].identity_id == "p000000"
    monkeypatch.setenv("FACE_GALLERY_INDEX_NPROBE", "0")
    with pytest.raises(ValidationError, match="gallery_index_nprobe"):
        Settings()
    for name, value in (("NPROBE", "16"), ("CANDIDATES", "30"), ("MIN_IDENTITIES", "2000")):
        monkeypatch.setenv(f"FACE_GALLERY_INDEX_{name}", value)
    options = Settings().gallery_index_options
    assert (options.enabled, options.nprobe, options.candidates, options.min_identities) == (True, 16, 30, 2000)
    with open_gallery(f"sqlite:///{path}", MODEL, D, index=options) as g:
        assert g.wait_for_index(60)  # 3,000 identities, minimum 2,000: built
        assert g.search(queries[0], 1)[0][0].identity_id == "p000000"
    monkeypatch.setenv("FACE_GALLERY_INDEX", "false")
    with open_gallery(f"sqlite:///{path}", MODEL, D, index=Settings().gallery_index_options) as g:
        assert not g.index_in_use  # off: exact search, the persisted index left alone
    assert (index_folder(path) / MANIFEST).exists()
