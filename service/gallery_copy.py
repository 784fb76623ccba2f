"""`python -m service.gallery_copy --from sqlite:///data/gallery.db --to postgresql://...`: move a gallery from the
embedded SQLite store into PostgreSQL, to scale out onto several replicas.

Everything is copied as it is: identities (display name, metadata, creation time), and faces of every model with
their ids, embeddings, creation times and sources, so face ids stay valid and a later rollback to another
embedder still finds its faces. One transaction: the target gets all of it or nothing. Faces and identities that
the target already has (same ids) are left alone, so the copy can be run again after an interruption or to pick
up enrolments made since (stop the SQLite server first for a final pass). HNSW indexes are built once the rows
are in, one per embedder found, which is much faster than growing them row by row.

Exit codes: 0 copied (and the target's counts checked), 2 bad arguments or an unusable source or target.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from pathlib import Path

from service.gallery import GallerySetupError
from service.settings import gallery_store


def _source(url: str) -> sqlite3.Connection:
    store, where = gallery_store(url)
    if store != "sqlite":
        raise ValueError(f"--from must be a sqlite:/// URL, not {store}")
    path = Path(where)
    if not path.is_file():
        raise ValueError(f"--from: {path} does not exist")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not {"identities", "faces"} <= tables:
        raise ValueError(f"--from: {path} is not a gallery (no identities/faces tables)")
    return db


def copy_gallery(source_url: str, target_url: str, *, log=print) -> dict[str, int]:
    """Copy; returns counts: identities and faces found in the source, and how many of each were new."""
    import numpy as np
    import psycopg
    from pgvector.psycopg import register_vector

    from service.pg_gallery import create_model_index, prepare_database, redact

    src = _source(source_url)
    store, target = gallery_store(target_url)
    if store != "postgresql":
        raise ValueError(f"--to must be a postgresql:// URL, not {store}")
    models = dict(src.execute("SELECT model_sha256, length(embedding) / 4 FROM faces GROUP BY model_sha256"))
    sizes = dict(src.execute("SELECT model_sha256, COUNT(DISTINCT length(embedding)) FROM faces GROUP BY model_sha256"))
    if any(n != 1 for n in sizes.values()):
        raise ValueError("--from: one model's embeddings have different sizes; the gallery is corrupt")
    prepare_database(target, None, None)
    started = time.perf_counter()
    counts = {"identities": 0, "faces": 0}
    with psycopg.connect(target) as conn:  # one transaction, committed at the end of the block
        register_vector(conn)
        conn.execute(
            "CREATE TEMP TABLE copy_identities (id text, display_name text, metadata text, "
            "created_at double precision) ON COMMIT DROP"
        )
        conn.execute(
            "CREATE TEMP TABLE copy_faces (ord bigint, face_id text, identity_id text, model_sha256 text, "
            "embedding vector, created_at double precision, source text) ON COMMIT DROP"
        )
        with conn.cursor().copy(
            "COPY copy_identities (id, display_name, metadata, created_at) FROM STDIN"
        ) as copy:
            for row in src.execute("SELECT id, display_name, metadata, created_at FROM identities"):
                copy.write_row(row)
                counts["identities"] += 1
        with conn.cursor().copy(
            "COPY copy_faces (ord, face_id, identity_id, model_sha256, embedding, created_at, source) "
            "FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", "text", "text", "text", "vector", "float8", "text"])
            # rowid order: enrolment order, which the target's seq column keeps for faces of one created_at
            for face_id, identity, sha, blob, created, source in src.execute(
                "SELECT face_id, identity_id, model_sha256, embedding, created_at, source FROM faces ORDER BY rowid"
            ):
                copy.write_row(
                    (counts["faces"], face_id, identity, sha, np.frombuffer(blob, dtype="<f4"), created, source)
                )
                counts["faces"] += 1
                if counts["faces"] % 100_000 == 0:
                    log(f"  {counts['faces']} faces read")
        new_identities = conn.execute(
            "INSERT INTO identities (id, display_name, metadata, created_at) "
            "SELECT id, display_name, metadata, created_at FROM copy_identities ORDER BY id "
            "ON CONFLICT (id) DO NOTHING"
        ).rowcount
        new_faces = conn.execute(
            "INSERT INTO faces (face_id, identity_id, model_sha256, embedding, created_at, source) "
            "SELECT face_id, identity_id, model_sha256, embedding, created_at, source FROM copy_faces ORDER BY ord "
            "ON CONFLICT (face_id) DO NOTHING"
        ).rowcount
        # Templates (per identity and model: the sum of its faces) rebuilt for every identity the copy touched.
        conn.execute("DELETE FROM templates WHERE identity_id IN (SELECT DISTINCT identity_id FROM copy_faces)")
        conn.execute(
            "INSERT INTO templates (identity_id, model_sha256, total, faces) "
            "SELECT identity_id, model_sha256, sum(embedding), count(*) FROM faces "
            "WHERE identity_id IN (SELECT DISTINCT identity_id FROM copy_faces) GROUP BY identity_id, model_sha256"
        )
        for sha, size in models.items():
            log(f"  building the HNSW index of model {sha[:12]} ({size} dimensions)")
            create_model_index(conn, sha, int(size))
        # The check: the target holds at least every source face of each model, and every source identity.
        for sha, (n,) in ((sha, src.execute("SELECT COUNT(*) FROM faces WHERE model_sha256 = ?", (sha,)).fetchone())
                          for sha in models):
            (have,) = conn.execute(
                "SELECT count(*) FROM faces f JOIN copy_faces c USING (face_id) WHERE f.model_sha256 = %s", (sha,)
            ).fetchone()
            if have != n:
                raise RuntimeError(f"model {sha[:12]}: {n} faces in the source, {have} of them in the target")
    src.close()
    log(
        f"copied into {redact(target)} in {time.perf_counter() - started:.1f} s: {new_identities} of "
        f"{counts['identities']} identities and {new_faces} of {counts['faces']} faces were new "
        f"({len(models)} model(s): {', '.join(sha[:12] for sha in models) or 'none'})"
    )
    return {**counts, "new_identities": new_identities, "new_faces": new_faces}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.gallery_copy",
        description="Copy a SQLite gallery (every identity, every model's faces) into a PostgreSQL gallery.",
    )
    parser.add_argument("--from", dest="source", required=True, help="sqlite:///path/to/gallery.db")
    parser.add_argument("--to", dest="target", required=True, help="postgresql://user:password@host:port/db")
    args = parser.parse_args(argv)
    try:
        copy_gallery(args.source, args.target)
    except (ValueError, GallerySetupError, sqlite3.Error) as exc:
        print(f"gallery copy failed: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

