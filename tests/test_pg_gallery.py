"""The PostgreSQL store's own mechanics, beyond the contract suite (tests/test_gallery.py runs that on both stores):
searches really go through the per-model HNSW index and still agree with exact search; the schema version guard;
and `python -m service` refusing, with exit code 2 and a message naming FACE_GALLERY_URL, a gallery it cannot use.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
from api_support import require_default_models
from server_process import free_port

from service.gallery import GallerySetupError

pytest.importorskip("pgserver", reason="the pgserver wheel (PostgreSQL + pgvector) is not installed")
from service.pg_gallery import SCHEMA_VERSION, PostgresGallery  # needs psycopg, like pgserver

D = 192
MODEL = "c" * 64
ROOT = Path(__file__).resolve().parents[1]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _bulk_load(url: str, faces: np.ndarray, people: int) -> list[str]:
    """Enrol many faces at once (COPY, one transaction): person i owns faces i, i + people, i + 2 people, ...;
    their templates built as the store builds them (the sum of each identity's faces)."""
    ids = [f"face-{i}" for i in range(len(faces))]
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO identities (id, created_at) SELECT 'p' || i, 0 FROM generate_series(0, %s) i", (people - 1,))
        with conn.cursor().copy(
            "COPY faces (face_id, identity_id, model_sha256, embedding, created_at) FROM STDIN"
        ) as copy:
            for i, face in enumerate(faces):
                copy.write_row((ids[i], f"p{i % people}", MODEL, "[" + ",".join(f"{v:.8g}" for v in face) + "]", 0))
        conn.execute(
            "INSERT INTO templates (identity_id, model_sha256, total, faces) "
            "SELECT identity_id, model_sha256, sum(embedding), count(*) FROM faces GROUP BY identity_id, model_sha256"
        )
        conn.execute("ANALYZE faces")
        conn.execute("ANALYZE templates")
    return ids


def test_search_uses_the_models_hnsw_index_and_agrees_with_exact_search(database, figures) -> None:
    rng = np.random.default_rng(0)
    people, per_person = 600, 3
    centres = unit(rng.normal(size=(people, D)))
    spread = 0.6 / np.sqrt(D)  # per dimension: a face is ~0.85 cosine from its person's centre
    faces = unit(np.concatenate([centres + rng.normal(scale=spread, size=(people, D)) for _ in range(per_person)]))
    with PostgresGallery(database, MODEL, D) as g:
        _bulk_load(database, faces.astype(np.float32), people)
        query = faces[7]
        with g._connection() as conn:
            plan = "\n".join(
                row[0]
                for row in conn.execute(
                    f"EXPLAIN SELECT identity_id FROM templates WHERE model_sha256 = '{MODEL}' "
                    f"ORDER BY total::vector({D}) <=> %s LIMIT 5",
                    (query.astype(np.float32),),
                )
            )
        assert f"Index Scan using templates_hnsw_{MODEL[:32]}" in plan, plan

        # Planted queries: a new photo of an enrolled person (noise around the centre). Exact search's answer is
        # each identity's template (normalised mean of its faces) by brute force; the store's must be the same
        # identities, same scores.
        probes = unit(centres[:100] + rng.normal(scale=spread, size=(100, D)))
        templates = unit(sum(faces[k * people:(k + 1) * people] for k in range(per_person)))
        exact = probes @ templates.T
        found, scored, first = 0, 0, 0
        for probe, scores, matches in zip(probes, exact, g.search(probes, top_k=5)):
            best = {person: float(score) for person, score in enumerate(scores)}
            expected = sorted(best.items(), key=lambda t: -t[1])[:5]
            got = [(int(m.identity_id[1:]), m.similarity) for m in matches]
            found += sum(person in dict(got) for person, _ in expected)
            first += bool(got) and got[0][0] == expected[0][0]
            scored += len(expected)
            for person, similarity in got:  # whatever is returned carries its exact template score
                assert similarity == pytest.approx(best[person], abs=1e-5)
        recall = found / scored
        figures(
            f"HNSW search (ef_search {g.ef_search}), {len(faces)} faces, 100 planted queries: the same best match "
            f"as exact search for {first}, recall@5 vs exact {recall:.4f}"
        )
        # The person asked about is what matters most; places 4 and 5 are strangers with near-equal scores.
        assert first == 100 and recall >= 0.97


def test_a_newer_schema_is_refused(database) -> None:
    with PostgresGallery(database, MODEL, D):
        pass
    with psycopg.connect(database) as conn:
        conn.execute("UPDATE facerec_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(GallerySetupError, match="FACE_GALLERY_URL.*newer than this service"):
        PostgresGallery(database, MODEL, D)


def test_the_index_has_the_shipped_graph_settings_and_an_older_one_is_named_with_its_fix(database, caplog) -> None:
    from service.pg_gallery import HNSW_EF_CONSTRUCTION, HNSW_M, _index_name

    index = _index_name(MODEL)
    wanted = [f"m={HNSW_M}", f"ef_construction={HNSW_EF_CONSTRUCTION}"]

    def options() -> list[str] | None:
        with psycopg.connect(database) as conn:
            return conn.execute("SELECT reloptions FROM pg_class WHERE relname = %s", (index,)).fetchone()[0]

    with caplog.at_level("WARNING", logger="service.pg_gallery"), PostgresGallery(database, MODEL, D):
        pass
    assert options() == wanted and "was built with" not in caplog.text

    # An index an earlier release built with pgvector's defaults: kept (no surprise rebuild at start-up), named in
    # a warning whose statements, run as given, bring it to the shipped settings.
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"DROP INDEX {index}")
        conn.execute(f"CREATE INDEX {index} ON templates USING hnsw ((total::vector({D})) vector_cosine_ops) "
                     f"WHERE model_sha256 = '{MODEL}'")
    caplog.clear()
    with caplog.at_level("WARNING", logger="service.pg_gallery"), PostgresGallery(database, MODEL, D) as g:
        g.enroll("alice", unit(np.random.default_rng(3).normal(size=(1, D))))
    assert options() is None
    warning = caplog.text
    assert f"the HNSW index {index} was built with pgvector's defaults" in warning, warning
    fix = warning[warning.index("ALTER INDEX"):].split(";")[:2]
    with psycopg.connect(database, autocommit=True) as conn:
        for statement in fix:
            conn.execute(statement)
    assert options() == wanted
    caplog.clear()
    with caplog.at_level("WARNING", logger="service.pg_gallery"), PostgresGallery(database, MODEL, D) as g:
        (match,) = g.search(unit(np.random.default_rng(3).normal(size=(1, D))), top_k=1)[0]  # alice's face
        assert match.identity_id == "alice" and match.similarity == pytest.approx(1.0, abs=1e-5)
    assert "was built with" not in caplog.text


def _serve(models_dir: Path, gallery_url: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PORT": str(free_port()),
        "FACE_MODELS_DIR": str(models_dir),
        "FACE_GALLERY_URL": gallery_url,
        "FACE_GALLERY_TIMEOUT_S": "2",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("FACE_GALLERY_PATH", None)
    return subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_server_refuses_a_gallery_it_cannot_use(models_dir, postgres, database) -> None:
    require_default_models(models_dir)
    with PostgresGallery(database, MODEL, D):
        pass
    with psycopg.connect(database) as conn:
        conn.execute("UPDATE facerec_schema SET version = %s", (SCHEMA_VERSION + 1,))
    cases = {
        "mysql://localhost/gallery": "unsupported gallery store",
        "no-scheme": "is not a URL",
        f"postgresql://postgres:secret@127.0.0.1:{free_port()}/gallery": "cannot connect",
        database: "newer than this service",
    }
    for url, reason in cases.items():
        done = _serve(models_dir, url)
        assert done.returncode == 2, (url, done.returncode, done.stderr[-2000:])
        assert "FACE_GALLERY_URL" in done.stderr and reason in done.stderr, done.stderr[-2000:]
        assert "secret" not in done.stderr  # no password in the message
        assert "Traceback" not in done.stderr


def test_a_database_without_pgvector_is_refused_until_a_superuser_enables_it(models_dir, postgres, database) -> None:
    """The usual production set-up: the service's role owns its database but is no superuser, and pgvector is not
    a trusted extension, so the service cannot enable it itself. It must say so (exit 2, naming the setting), not
    fail later on the first query; once a superuser ran CREATE EXTENSION, the same role starts."""
    require_default_models(models_dir)
    role = f"facerec_app_{os.getpid()}"
    name = psycopg.conninfo.conninfo_to_dict(database)["dbname"]
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
        conn.execute(f'ALTER DATABASE "{name}" OWNER TO "{role}"')
    as_role = database.replace("postgresql://postgres:", f"postgresql://{role}:", 1)
    assert as_role != database
    try:
        with psycopg.connect(as_role) as conn:  # the database has no pgvector, and this role may not add it
            assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'vector'").fetchone() == (0,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("CREATE EXTENSION vector")
        with pytest.raises(GallerySetupError, match="FACE_GALLERY_URL: pgvector is not enabled"):
            PostgresGallery(as_role, MODEL, D)
        done = _serve(models_dir, as_role)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "FACE_GALLERY_URL" in done.stderr and "pgvector is not enabled" in done.stderr, done.stderr[-2000:]
        assert "CREATE EXTENSION vector" in done.stderr and "Traceback" not in done.stderr

        with psycopg.connect(database, autocommit=True) as conn:  # the superuser enables it
            conn.execute("CREATE EXTENSION vector")
        with PostgresGallery(as_role, MODEL, D) as gallery:
            gallery.enroll("alice", unit(np.random.default_rng(2).normal(size=(1, D))))
            assert gallery.count_faces() == 1
    finally:
        postgres.drop_database(database)
        with psycopg.connect(postgres.url(), autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_counts_follow_own_writes_at_once_and_other_replicas_within_a_second(database) -> None:
    from service.pg_gallery import COUNT_REUSE_S

    rng = np.random.default_rng(1)
    with PostgresGallery(database, MODEL, D) as one, PostgresGallery(database, MODEL, D) as other:
        assert (one.count_faces(), other.count_faces(), other.count_searchable_identities()) == (0, 0, 0)
        one.enroll("alice", unit(rng.normal(size=(2, D))))
        assert (one.count_faces(), one.count_searchable_identities()) == (2, 1)  # its own write: at once
        # The other replica may reuse its count for COUNT_REUSE_S; a search there sees the faces at once anyway.
        assert other.search(unit(rng.normal(size=(1, D))), top_k=1)[0][0].identity_id == "alice"
        time.sleep(COUNT_REUSE_S + 0.1)
        assert (other.count_faces(), other.count_searchable_identities()) == (2, 1)
        other.delete_identity("alice")
        assert (other.count_faces(), other.count_searchable_identities()) == (0, 0)
        assert one.search(unit(rng.normal(size=(1, D))), top_k=1) == [[]]  # never a deleted face, counts aside


def test_ef_search_comes_from_the_setting(database, monkeypatch) -> None:
    from pydantic import ValidationError

    from service.gallery import open_gallery
    from service.pg_gallery import EF_SEARCH
    from service.settings import Settings

    monkeypatch.setenv("FACE_GALLERY_EF_SEARCH", "0")
    with pytest.raises(ValidationError, match="gallery_ef_search"):
        Settings()
    monkeypatch.setenv("FACE_GALLERY_EF_SEARCH", "40")
    assert Settings().gallery_ef_search == 40
    with open_gallery(database, MODEL, D, ef_search=40) as g, open_gallery(database, MODEL, D) as default:
        assert (g.ef_search, default.ef_search) == (40, EF_SEARCH)
        g.enroll("alice", unit(np.random.default_rng(4).normal(size=(1, D))))
        with g._connection() as conn, conn.transaction():  # what a search sets, in the search's transaction
            assert g._search_one(conn, unit(np.ones(D)).astype(np.float32), 5, None)
            assert conn.execute("SHOW hnsw.ef_search").fetchone() == ("40",)
