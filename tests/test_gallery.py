"""The gallery contract, held by both stores: SQLite (truth on disk + in-memory search matrix) and PostgreSQL with
pgvector (search in the database), each checked against a brute-force reference. Tests taking `store` run once per
store; the rest are about one store's own mechanics (SQLite's file erasure and failed commits)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from service.errors import InvalidParameter, ModelError, ModelMismatch, NotFound
from service.gallery import Gallery, GalleryStore, ImportedIdentity, Match, open_gallery

D = 192
MODEL = "a" * 64
OTHER_MODEL = "b" * 64
ROOT = Path(__file__).resolve().parents[1]


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def template(faces: dict[str, np.ndarray]) -> np.ndarray:
    """An identity's template: the normalised mean of its (unit) face embeddings."""
    return unit(np.sum([unit(v) for v in faces.values()], axis=0))


def brute_force(enrolled: dict[str, dict[str, np.ndarray]], query: np.ndarray, top_k: int, threshold=None):
    """The obvious loop: each identity's template, identities by score, threshold applied."""
    q = unit(query)
    best = []
    for identity, faces in enrolled.items():
        if not faces:
            continue
        score = float(template(faces) @ q)
        if threshold is None or score >= threshold:
            best.append((identity, len(faces), score))
    best.sort(key=lambda t: -t[2])
    return best[:top_k]


def assert_same(matches: list[Match], expected: list[tuple]) -> None:
    assert [(m.identity_id, m.faces) for m in matches] == [(i, k) for i, k, _ in expected]
    np.testing.assert_allclose([m.similarity for m in matches], [s for _, _, s in expected], atol=1e-5)


class Store:
    """One gallery's storage (a SQLite file, a PostgreSQL database): `open()` gives a new handle on it, as a
    restarted server or another replica would have."""

    def __init__(self, kind: str, url: str):
        self.kind, self.url = kind, url

    def open(self, model: str = MODEL, earlier_ids=()) -> GalleryStore:
        return open_gallery(self.url, model, D, earlier_ids=earlier_ids)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path: Path):
    if request.param == "sqlite":
        yield Store("sqlite", f"sqlite:///{tmp_path / 'gallery.db'}")
        return
    postgres = request.getfixturevalue("postgres")
    url = postgres.new_database()
    yield Store("postgresql", url)
    postgres.drop_database(url)


@pytest.fixture
def gallery(store: Store):
    g = store.open()
    yield g
    g.close()


def populate(
    gallery: Gallery, rng: np.random.Generator, people: int = 40
) -> dict[str, dict[str, np.ndarray]]:
    """People with 1-6 faces each, faces of one person clustered around a centre."""
    enrolled: dict[str, dict[str, np.ndarray]] = {}
    for p in range(people):
        centre = rng.normal(size=D)
        faces = unit(centre + rng.normal(scale=0.8, size=(int(rng.integers(1, 7)), D)))
        ids = gallery.enroll(f"person-{p:03d}", faces, display_name=f"Person {p}")
        enrolled[f"person-{p:03d}"] = dict(zip(ids, faces))
    return enrolled


def test_search_matches_brute_force(gallery: Gallery) -> None:
    rng = np.random.default_rng(0)
    enrolled = populate(gallery, rng)
    queries = rng.normal(size=(25, D))
    queries[:10] = [
        next(iter(enrolled[f"person-{i:03d}"].values())) + rng.normal(scale=0.5, size=D) for i in range(10)
    ]
    for top_k, threshold in [(1, None), (5, None), (40, None), (100, None), (5, 0.3), (3, 0.99), (300, None)]:
        results = gallery.search(queries, top_k=top_k, threshold=threshold)
        assert len(results) == len(queries)
        for query, matches in zip(queries, results):
            assert_same(matches, brute_force(enrolled, query, top_k, threshold))
    first = gallery.search(queries[0], top_k=1)[0][0]
    assert first.identity_id == "person-000" and first.display_name == "Person 0"


@pytest.mark.parametrize("threshold", [None, -0.5])
def test_one_identity_with_many_faces_does_not_hide_the_others(gallery: Gallery, threshold) -> None:
    # 500 faces of one person all closer to the query than anyone else: the top-3 must still list 3 identities.
    rng = np.random.default_rng(1)
    query = unit(rng.normal(size=D))
    gallery.enroll("crowd", unit(query + rng.normal(scale=0.05, size=(500, D))))
    gallery.enroll("second", unit(query + rng.normal(scale=0.6, size=(1, D))))
    gallery.enroll("third", unit(query + rng.normal(scale=1.2, size=(2, D))))
    matches = gallery.search(query, top_k=3, threshold=threshold)[0]
    assert [m.identity_id for m in matches] == ["crowd", "second", "third"]
    assert matches[0].similarity > matches[1].similarity > matches[2].similarity


def test_deletes_remove_faces_from_search_and_disk(gallery: Gallery, store: Store) -> None:
    rng = np.random.default_rng(2)
    enrolled = populate(gallery, rng, people=20)
    victims = ["person-003", "person-010", "person-019"]
    for victim in victims:
        assert gallery.delete_identity(victim) == len(enrolled.pop(victim))
    # Remove single faces too (the swap-with-last-row path), including a person's only face.
    for person in ["person-000", "person-005"]:
        face_id = next(iter(enrolled[person]))
        gallery.delete_face(person, face_id)
        del enrolled[person][face_id]
    assert len(gallery) == sum(len(f) for f in enrolled.values())
    # person-000 and person-005 may have lost their only face: they stay identities, but are not searched.
    searchable = sum(1 for f in enrolled.values() if f)
    assert gallery.count_searchable_identities() == searchable
    assert gallery.count_identities() == 17
    queries = rng.normal(size=(10, D))
    for query, matches in zip(queries, gallery.search(queries, top_k=10)):
        assert_same(matches, brute_force(enrolled, query, 10))
    with pytest.raises(NotFound):
        gallery.get_identity("person-003")
    with pytest.raises(NotFound):
        gallery.delete_identity("person-003")
    with pytest.raises(NotFound):
        gallery.delete_face("person-001", "no-such-face")
    with pytest.raises(NotFound):
        gallery.delete_face("nobody", "no-such-face")
    # Still consistent after reopening from disk.
    gallery.close()
    with store.open() as reopened:
        assert len(reopened) == sum(len(f) for f in enrolled.values())
        assert reopened.count_searchable_identities() == searchable
        for query, matches in zip(queries, reopened.search(queries, top_k=10)):
            assert_same(matches, brute_force(enrolled, query, 10))


def test_deleted_embeddings_are_erased_from_the_files(tmp_path: Path) -> None:
    path = tmp_path / "gallery.db"
    rng = np.random.default_rng(3)
    secret = unit(rng.normal(size=(1, D))).astype("<f4")
    with Gallery(path, MODEL, D) as g:
        g.enroll("keep", unit(rng.normal(size=(3, D))))
        g.enroll("forget-me", secret)
        raw = secret.tobytes()
        assert any(raw in p.read_bytes() for p in tmp_path.iterdir())
        g.delete_identity("forget-me")
        for p in tmp_path.iterdir():
            assert raw[:64] not in p.read_bytes(), p.name


def test_a_listing_page_looks_up_each_identity_instead_of_scanning_the_models_faces(tmp_path: Path) -> None:
    """The server pages through every identity at start-up; a page once scanned all of a model's faces per
    identity (a minute per page at 20,000 faces). Work is counted in SQLite VM steps, not timed."""
    from benchmarks.suites import fill_gallery

    fill_gallery(tmp_path / "g.db", 4000, D, MODEL)
    with Gallery(tmp_path / "g.db", MODEL, D) as g:
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        g._db.set_progress_handler(count, 1000)
        page, total = g.list_identities(0, 100)
        g._db.set_progress_handler(None, 0)
    assert total == 4000 and [i.face_count for i in page] == [1] * 100
    # A scan would be ~100 identities x 4,000 faces x several steps each: thousands of 1,000-step ticks.
    assert steps[0] < 100, steps[0]


def test_identities_listing_and_details(gallery: Gallery) -> None:
    rng = np.random.default_rng(4)
    for name in ["carol", "alice", "bob"]:
        gallery.enroll(
            name, unit(rng.normal(size=(2, D))), display_name=name.title(), metadata={"team": name[0]}
        )
    items, total = gallery.list_identities(offset=0, limit=2)
    assert total == 3 and [i.identity_id for i in items] == ["alice", "bob"]
    assert items[0].face_count == 2 and items[0].metadata == {"team": "a"} and items[0].faces is None
    items, total = gallery.list_identities(offset=2, limit=10)
    assert [i.identity_id for i in items] == ["carol"]

    # Appending: None keeps display name and metadata, given values replace them.
    new = gallery.enroll(
        "alice", unit(rng.normal(size=(1, D))), sources=[{"file": "a.jpg", "box": [1, 2, 3, 4]}]
    )
    alice = gallery.get_identity("alice")
    assert alice.display_name == "Alice" and alice.metadata == {"team": "a"} and alice.face_count == 3
    assert alice.faces[-1].face_id == new[0] and alice.faces[-1].source == {
        "file": "a.jpg",
        "box": [1, 2, 3, 4],
    }
    latest = unit(rng.normal(size=(1, D)))
    gallery.enroll("alice", latest, display_name="Alice B.", metadata={"x": 1, "a": [2, {"b": None}]})
    alice = gallery.get_identity("alice")
    assert (alice.display_name, alice.metadata, alice.face_count) == ("Alice B.", {"x": 1, "a": [2, {"b": None}]}, 4)
    assert list(alice.metadata) == ["x", "a"]  # as given, key order included
    assert gallery.search(latest, top_k=1)[0][0].display_name == "Alice B."
    # Pages are in byte order of the ids, whatever the database's collation would say.
    for name in ["Zed", "a_x", "a-b", "a.b", "ab", "A9"]:
        gallery.enroll(name, unit(rng.normal(size=(1, D))))
    assert [i.identity_id for i in gallery.list_identities(limit=100)[0]] == sorted(
        ["alice", "bob", "carol", "Zed", "a_x", "a-b", "a.b", "ab", "A9"]
    )


def test_other_models_embeddings_are_never_compared(store: Store) -> None:
    rng = np.random.default_rng(5)
    old_faces = unit(rng.normal(size=(4, D)))
    with store.open(OTHER_MODEL) as old:
        old.enroll("alice", old_faces[:3])
        old.enroll("bob", old_faces[3:])
    with store.open() as g:
        assert len(g) == 0 and g.count_foreign() == 4 and g.count_identities() == 2
        assert g.count_searchable_identities() == 0  # foreign faces are never searched, so never counted
        assert g.search(old_faces, top_k=5) == [[], [], [], []]
        g.enroll("alice", unit(rng.normal(size=(1, D))))
        alice = g.get_identity("alice")
        assert (alice.face_count, alice.foreign_face_count) == (1, 3)
        assert [not f.current_model for f in alice.faces].count(True) == 3
        assert [m.identity_id for m in g.search(old_faces[0], top_k=5)[0]] == ["alice"]  # only the new face
        assert g.count_searchable_identities() == 1
    with store.open(OTHER_MODEL) as old:  # rolling back to the old model finds its faces again
        assert len(old) == 4 and old.count_foreign() == 1
        assert old.search(old_faces[3], top_k=5)[0][0].identity_id == "bob"


@pytest.mark.parametrize(
    "bad", ["", "-starts-with-dash", "has space", "a/b", "x" * 129, "é", "alice\n", None]
)
def test_invalid_identity_ids(gallery: Gallery, bad) -> None:
    with pytest.raises(InvalidParameter):
        gallery.enroll(bad, np.ones((1, D)))


def test_invalid_embeddings_and_parameters(gallery: Gallery) -> None:
    for bad in [np.ones((1, D + 1)), np.zeros((1, D)), np.full((1, D), np.nan), np.ones((0, D))]:
        with pytest.raises(InvalidParameter):
            gallery.enroll("ok", bad)
    with pytest.raises(InvalidParameter):
        gallery.enroll("ok", np.ones((1, D)), metadata=["not", "an", "object"])
    with pytest.raises(InvalidParameter):
        gallery.search(np.ones((1, D)), top_k=0)
    with pytest.raises(InvalidParameter):
        gallery.search(np.ones((1, D)), threshold=1.5)
    deep: dict = {}
    for _ in range(40):
        deep = {"n": deep}
    with pytest.raises(InvalidParameter, match="deeper"):
        gallery.enroll("ok", np.ones((1, D)), metadata=deep)
    with pytest.raises(InvalidParameter):  # past SQLite's 64-bit integers: was an OverflowError
        gallery.list_identities(offset=2**63)
    assert gallery.list_identities(offset=2**63 - 1) == ([], 0)
    assert gallery.count_identities() == 0 and gallery.search(np.ones((2, D))) == [[], []]


class FailingCommit:
    """The gallery's sqlite3 connection, except that the next COMMIT fails as on a full disk and leaves the
    transaction open. After SQLITE_FULL, SQLITE_IOERR or SQLITE_BUSY, SQLite may or may not have rolled back
    by itself (its "Response To Errors Within A Transaction"); still open is the case that needs handling."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.fail_next_commit = False

    def execute(self, sql: str, *args):
        if sql.strip().upper() == "COMMIT" and self.fail_next_commit:
            self.fail_next_commit = False
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.db, name)


def test_a_failed_commit_is_rolled_back_and_later_writes_work(tmp_path: Path) -> None:
    path = tmp_path / "gallery.db"
    rng = np.random.default_rng(11)
    kept, lost, later = (unit(rng.normal(size=(1, D))) for _ in range(3))
    with Gallery(path, MODEL, D) as g:
        g.enroll("kept", kept)
        connection = g._db
        g._db = failing = FailingCommit(connection)

        failing.fail_next_commit = True
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            g.enroll("lost", lost, display_name="Lost")
        assert not connection.in_transaction  # rolled back, not left open for every later BEGIN to trip on
        with pytest.raises(NotFound):  # not even this connection sees the uncommitted rows
            g.get_identity("lost")
        assert g.count_identities() == 1 and len(g) == 1
        assert [m.identity_id for m in g.search(lost, top_k=5, threshold=-1.0)[0]] == ["kept"]

        failing.fail_next_commit = True
        with pytest.raises(sqlite3.OperationalError):
            g.delete_identity("kept")
        assert not connection.in_transaction
        assert g.search(kept, top_k=1)[0][0].identity_id == "kept"  # matrix and disk both still hold it

        g.enroll("later", later)  # the next write works
        assert g.search(later, top_k=1)[0][0].identity_id == "later" and len(g) == 2
        g._db = connection
    with Gallery(path, MODEL, D) as reopened:
        assert [i.identity_id for i in reopened.list_identities()[0]] == ["kept", "later"]
        assert len(reopened) == 2


def test_concurrent_enrolments_and_searches(store: Store) -> None:
    with store.open() as g:

        def writer(t: int) -> None:
            rng = np.random.default_rng(t)
            for i in range(15):
                g.enroll(f"t{t}-{i}", unit(rng.normal(size=(2, D))))
                if i % 5 == 4:
                    g.delete_identity(f"t{t}-{i - 1}")

        def reader() -> None:
            rng = np.random.default_rng(99)
            for _ in range(60):
                for matches in g.search(rng.normal(size=(3, D)), top_k=5):
                    assert len({m.identity_id for m in matches}) == len(matches)

        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = [pool.submit(writer, t) for t in range(4)] + [pool.submit(reader) for _ in range(2)]
            for future in futures:
                future.result()  # re-raises whatever failed in that thread
        assert g.count_identities() == 4 * 12 and len(g) == 4 * 12 * 2
    with store.open() as reopened:
        assert len(reopened) == 4 * 12 * 2 and reopened.count_searchable_identities() == 4 * 12


CHILD = """
import os, signal, sys
import numpy as np
from service.gallery import Gallery
g = Gallery(sys.argv[1], "a" * 64, 192)
ids = g.enroll("survivor", np.ones((1, 192)), display_name="S")
print(ids[0], flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit: only what enroll() committed survives
"""


def test_acknowledged_enrolment_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "gallery.db"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    face_id = child.stdout.strip()
    with Gallery(path, MODEL, D) as g:
        identity = g.get_identity("survivor")
        assert [f.face_id for f in identity.faces] == [face_id] and identity.display_name == "S"
        (match,) = g.search(np.ones((1, D)), top_k=1)[0]
        assert match.identity_id == "survivor" and match.faces == 1 and match.similarity == pytest.approx(1.0)


def test_identity_similarity_is_the_identity_template(store: Store) -> None:
    rng = np.random.default_rng(6)
    with store.open(OTHER_MODEL) as old:
        old.enroll("old-only", unit(rng.normal(size=(2, D))))
    with store.open() as g:
        enrolled = populate(g, rng, people=10)
        queries = rng.normal(size=(4, D))
        for person in ["person-000", "person-007"]:
            expected = [float(template(enrolled[person]) @ unit(q)) for q in queries]
            np.testing.assert_allclose(g.identity_similarity(person, queries), expected, atol=1e-5)
            # The same number /identify gives that identity.
            for q, e in zip(queries, expected):
                found = {m.identity_id: m.similarity for m in g.search(q, top_k=10)[0]}
                assert person not in found or found[person] == pytest.approx(e, abs=1e-5)
        assert np.isnan(g.identity_similarity("old-only", queries)).all()
        with pytest.raises(NotFound):
            g.identity_similarity("nobody", queries)


def test_a_corrupt_embedding_is_refused_at_load(tmp_path: Path) -> None:
    path = tmp_path / "gallery.db"
    with Gallery(path, MODEL, D) as g:
        g.enroll("alice", np.ones((1, D)))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE faces SET embedding = ?", (b"\x00" * 12,))
    with pytest.raises(ModelError, match="corrupt"):
        Gallery(path, MODEL, D)


def test_templates_grow_past_their_capacity_and_follow_every_change(tmp_path: Path) -> None:
    # More identities than the initial 1024 rows, faces added to existing identities, faces and identities deleted,
    # then reopened: search stays equal to the brute-force templates at every step.
    rng = np.random.default_rng(7)
    enrolled: dict[str, dict[str, np.ndarray]] = {}
    with Gallery(tmp_path / "gallery.db", MODEL, D) as g:
        for p in range(1100):
            faces = unit(rng.normal(size=(1, D)))
            enrolled[f"p{p}"] = dict(zip(g.enroll(f"p{p}", faces), faces))
        for p in range(0, 1100, 50):  # a second and third face for some
            faces = unit(rng.normal(size=(2, D)))
            enrolled[f"p{p}"].update(zip(g.enroll(f"p{p}", faces), faces))
        for p in range(0, 1100, 100):  # one of those faces deleted again
            face_id = next(iter(enrolled[f"p{p}"]))
            g.delete_face(f"p{p}", face_id)
            del enrolled[f"p{p}"][face_id]
        for p in range(1, 1100, 7):
            g.delete_identity(f"p{p}")
            del enrolled[f"p{p}"]
        queries = rng.normal(size=(5, D))
        assert g.count_searchable_identities() == len(enrolled)
        assert len(g) == sum(len(f) for f in enrolled.values())
        for query, matches in zip(queries, g.search(queries, top_k=7)):
            assert_same(matches, brute_force(enrolled, query, 7))
    with Gallery(tmp_path / "gallery.db", MODEL, D) as g:
        for query, matches in zip(queries, g.search(queries, top_k=7)):
            assert_same(matches, brute_force(enrolled, query, 7))


def test_faces_tagged_with_an_earlier_id_of_the_same_model_are_retagged(store: Store) -> None:
    # Older releases tagged faces with the embedder file's sha256; the model id now is its graph's. Opening with
    # the earlier ids moves those faces (and their templates) to the current id; other models' faces stay apart.
    rng = np.random.default_rng(8)
    earlier = "c" * 64
    faces = unit(rng.normal(size=(3, D)))
    with store.open(earlier) as old:
        old.enroll("alice", faces[:2])
    with store.open(OTHER_MODEL) as other:
        other.enroll("bob", faces[2:])
    with store.open(MODEL) as g:  # without the earlier ids: alice's faces are foreign
        assert (len(g), g.count_foreign(), g.count_searchable_identities()) == (0, 3, 0)
    with store.open(MODEL, earlier_ids=[earlier, "d" * 64]) as g:
        assert (len(g), g.count_foreign(), g.count_searchable_identities()) == (2, 1, 1)
        (match,) = g.search(faces[0], top_k=5)[0]
        assert match.identity_id == "alice" and match.faces == 2
        assert match.similarity == pytest.approx(float(template({"a": faces[0], "b": faces[1]}) @ faces[0]), abs=1e-5)
        assert all(f.current_model for f in g.get_identity("alice").faces)
    with store.open(MODEL) as g:  # done once, for good
        assert (len(g), g.count_foreign()) == (2, 1)


# -- bulk import (service/gallery_io.py writes through import_identities) ----------------------------------------


def test_import_adds_new_identities_in_one_go_and_skips_those_it_holds(store: Store) -> None:
    rng = np.random.default_rng(20)
    with store.open() as g:
        alice = unit(rng.normal(size=(2, D)))
        g.enroll("alice", alice, display_name="Alice", metadata={"team": "a"})
        faces = {name: unit(rng.normal(size=(k, D))) for name, k in [("bob", 3), ("carol", 1), ("dave", 2)]}
        batch = [
            ImportedIdentity("alice", unit(rng.normal(size=(4, D))), MODEL, "Not Alice", {"team": "z"}),
            ImportedIdentity("bob", faces["bob"], MODEL, "Bob", {"n": 1, "tags": ["x", {"y": None}]}),
            ImportedIdentity("carol", faces["carol"], MODEL),
            ImportedIdentity("dave", faces["dave"], MODEL, "Dave"),
        ]
        assert g.import_identities(batch) == 3
        enrolled = {"alice": dict(enumerate(alice)), **{name: dict(enumerate(f)) for name, f in faces.items()}}

        def check(gallery: GalleryStore) -> None:
            a = gallery.get_identity("alice")  # held already: untouched
            assert (a.display_name, a.metadata, a.face_count) == ("Alice", {"team": "a"}, 2)
            bob = gallery.get_identity("bob")
            assert (bob.display_name, bob.metadata, bob.face_count, bob.foreign_face_count) == (
                "Bob", {"n": 1, "tags": ["x", {"y": None}]}, 3, 0
            )
            assert all(f.current_model and f.model_sha256 == MODEL for f in bob.faces)
            carol = gallery.get_identity("carol")
            assert (carol.display_name, carol.metadata, carol.face_count) == (None, {}, 1)
            assert (gallery.count_identities(), len(gallery), gallery.count_searchable_identities()) == (4, 8, 4)
            queries = np.concatenate([faces["bob"][:1], rng.normal(size=(5, D))])
            for query, matches in zip(queries, gallery.search(queries, top_k=4)):
                assert_same(matches, brute_force(enrolled, query, 4))
            for person in ("bob", "dave"):
                np.testing.assert_allclose(
                    gallery.identity_similarity(person, queries), template(enrolled[person]) @ unit(queries).T,
                    atol=1e-5,
                )
            assert gallery.search(faces["dave"][1], top_k=1)[0][0].display_name == "Dave"

        check(g)
        assert g.import_identities(batch) == 0  # a re-run adds nothing, changes nothing
        check(g)
    with store.open() as reopened:
        check(reopened)


@pytest.mark.parametrize(
    "bad, error",
    [
        ({"identity_id": "has space"}, InvalidParameter),
        ({"model_sha256": OTHER_MODEL}, ModelMismatch),
        ({"embeddings": np.ones((1, D + 1)) / np.sqrt(D + 1)}, InvalidParameter),
        ({"embeddings": np.ones((0, D))}, InvalidParameter),
        ({"embeddings": 2 * np.ones((1, D)) / np.sqrt(D)}, InvalidParameter),  # not unit length
        ({"embeddings": np.full((1, D), np.nan)}, InvalidParameter),
        ({"embeddings": [["x"] * D]}, InvalidParameter),
        ({"identity_id": "first"}, InvalidParameter),  # twice in one batch
        ({"display_name": "x" * 300}, InvalidParameter),
        ({"metadata": ["not", "an", "object"]}, InvalidParameter),
        ({"metadata": {"bad": "\udfff"}}, InvalidParameter),
    ],
)
def test_import_refuses_a_bad_identity_and_writes_nothing_of_its_batch(store: Store, bad: dict, error) -> None:
    rng = np.random.default_rng(21)
    good = {"identity_id": "second", "embeddings": unit(rng.normal(size=(2, D))), "model_sha256": MODEL}
    with store.open() as g:
        with pytest.raises(error) as raised:
            g.import_identities([
                ImportedIdentity("first", unit(rng.normal(size=(1, D))), MODEL), ImportedIdentity(**{**good, **bad})
            ])
        assert raised.value.details["index"] == 1
        assert (g.count_identities(), len(g), g.count_foreign()) == (0, 0, 0)
        assert g.import_identities([]) == 0


def test_imports_grow_the_gallery_past_its_capacity(store: Store) -> None:
    # 2,500 identities in three batches (past the SQLite matrix's first 1,024 rows, twice), on top of enrolled ones.
    rng = np.random.default_rng(22)
    enrolled: dict[str, dict[int, np.ndarray]] = {}
    with store.open() as g:
        for p in range(5):
            faces = unit(rng.normal(size=(2, D)))
            g.enroll(f"e{p}", faces)
            enrolled[f"e{p}"] = dict(enumerate(faces))
        people = [(f"p{p:04d}", unit(rng.normal(size=(int(rng.integers(1, 4)), D)))) for p in range(2500)]
        for start in range(0, 2500, 1000):
            assert g.import_identities([ImportedIdentity(i, f, MODEL) for i, f in people[start:start + 1000]]) == len(
                people[start:start + 1000]
            )
        enrolled.update((i, dict(enumerate(f))) for i, f in people)
        extra = unit(rng.normal(size=(1, D)))
        g.enroll("p0007", extra)  # an imported identity takes enrolments like any other
        enrolled["p0007"][99] = extra[0]
    with store.open() as g:
        faces = sum(len(f) for f in enrolled.values())
        assert (g.count_identities(), g.count_searchable_identities()) == (2505, 2505)
        assert len(g) == faces
        sample = ["e0", "p0000", "p0007", "p1024", "p2047", "p2499"]
        queries = np.stack([next(iter(enrolled[i].values())) for i in sample])
        for person, query in zip(sample, queries):
            assert g.identity_similarity(person, query) == pytest.approx(float(template(enrolled[person]) @ query),
                                                                         abs=1e-5)
        if store.kind == "sqlite":  # exact search: equal to brute force (the HNSW index is approximate)
            for query, matches in zip(queries, g.search(queries, top_k=5)):
                assert_same(matches, brute_force(enrolled, query, 5))


def test_export_yields_every_identity_with_its_current_model_faces(store: Store) -> None:
    rng = np.random.default_rng(23)
    with store.open(OTHER_MODEL) as old:
        old.enroll("alice", unit(rng.normal(size=(1, D))))
        old.enroll("old-only", unit(rng.normal(size=(2, D))))
    with store.open() as g:
        alice, bob = unit(rng.normal(size=(2, D))), unit(rng.normal(size=(3, D)))
        g.enroll("alice", alice, display_name="Alice", metadata={"k": [1, 2]})
        g.enroll("bob", bob[:1])
        g.enroll("bob", bob[1:], display_name="Bob")
        g.import_identities([ImportedIdentity("carol", alice[:1], MODEL, None, {"x": "y"})])
        for page in (1, 2, 1000):
            exported = list(g.export_identities(page=page))
            assert [(e.identity_id, e.display_name, e.metadata, e.model_sha256) for e in exported] == [
                ("alice", "Alice", {"k": [1, 2]}, MODEL), ("bob", "Bob", {}, MODEL), ("carol", None, {"x": "y"}, MODEL),
                ("old-only", None, {}, MODEL),
            ]
            for e, faces in zip(exported, [alice, bob, alice[:1], np.zeros((0, D))]):
                assert e.embeddings.dtype == np.float32 and e.embeddings.shape == faces.shape
                np.testing.assert_allclose(e.embeddings, faces, atol=1e-7)  # enrolment order, as stored
