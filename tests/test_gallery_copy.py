"""`python -m service.gallery_copy`: a SQLite gallery copied into PostgreSQL answers exactly as it did."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.gallery import Gallery

pytest.importorskip("pgserver", reason="the pgserver wheel (PostgreSQL + pgvector) is not installed")
from service.gallery_copy import main  # needs psycopg, like pgserver
from service.pg_gallery import PostgresGallery

D = 192
MODEL, OLD_MODEL = "d" * 64, "e" * 64
ROOT = Path(__file__).resolve().parents[1]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_a_copied_gallery_answers_as_the_original(tmp_path: Path, database: str) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "gallery.db"
    with Gallery(path, OLD_MODEL, 128) as old:  # a rolled-back embedder's faces, of another size, come along too
        old.enroll("alice", unit(rng.normal(size=(2, 128))))
        old.enroll("only-old", unit(rng.normal(size=(1, 128))))
    with Gallery(path, MODEL, D) as g:
        for p in range(30):
            g.enroll(
                f"person-{p:02d}",
                unit(rng.normal(size=(int(rng.integers(1, 4)), D))),
                display_name=f"Person {p}" if p % 2 else None,
                metadata={"n": p, "z": [1, {"a": None}]} if p % 3 == 0 else None,
                sources=None,
            )
        g.enroll("alice", unit(rng.normal(size=(2, D))), sources=[{"filename": "a.jpg"}, None])
        g.delete_face("person-03", g.get_identity("person-03").faces[0].face_id)
        queries = unit(rng.normal(size=(8, D)))
        expected = g.search(queries, top_k=5, threshold=-1.0)
        listing = g.list_identities(limit=1000)
        details = {i.identity_id: g.get_identity(i.identity_id) for i in listing[0]}
        counts = (g.count_identities(), g.count_faces(), g.count_foreign(), g.count_searchable_identities())

    assert main(["--from", f"sqlite:///{path}", "--to", database]) == 0
    with PostgresGallery(database, MODEL, D) as copied:
        assert copied.list_identities(limit=1000) == listing
        assert {i: copied.get_identity(i) for i in details} == details  # faces, sources, times, order
        assert (
            copied.count_identities(), copied.count_faces(), copied.count_foreign(), copied.count_searchable_identities()
        ) == counts
        for want, got in zip(expected, copied.search(queries, top_k=5, threshold=-1.0)):
            assert [(m.identity_id, m.faces, m.display_name) for m in got] == [
                (m.identity_id, m.faces, m.display_name) for m in want
            ]
            np.testing.assert_allclose([m.similarity for m in got], [m.similarity for m in want], atol=1e-5)
    with PostgresGallery(database, OLD_MODEL, 128) as old:  # the other model's faces are searchable by it
        assert old.count_faces() == 3 and old.search(unit(rng.normal(size=(1, 128))), top_k=5)[0]

    # Again: nothing new, nothing doubled (a re-run after an interruption is safe).
    assert main(["--from", f"sqlite:///{path}", "--to", database]) == 0
    with PostgresGallery(database, MODEL, D) as copied:
        assert (copied.count_identities(), copied.count_faces(), copied.count_foreign()) == counts[:3]


def test_bad_arguments_exit_2(tmp_path: Path, database: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "service.gallery_copy", *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
        )

    missing = run("--from", f"sqlite:///{tmp_path / 'nope.db'}", "--to", database)
    assert missing.returncode == 2 and "does not exist" in missing.stderr, missing.stderr
    backwards = run("--from", database, "--to", f"sqlite:///{tmp_path / 'x.db'}")
    assert backwards.returncode == 2 and "--from must be a sqlite" in backwards.stderr, backwards.stderr
