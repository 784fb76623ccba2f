"""Enrolled identities in PostgreSQL with pgvector: one gallery shared by any number of service replicas.

Same semantics as the SQLite store (service/gallery.py), held to the same contract suite (tests/test_gallery.py):
identities with a display name and JSON metadata; faces tagged with the sha256 of the embedder that made them;
other models' faces kept and counted, never compared; each identity matched through its template (the normalised
mean of its faces); one transaction per enrolment.

Consistency. There is no per-replica copy of anything: every read and every search runs in the database, so a
replica sees every other replica's committed enrolments and deletions at once. Commits are synchronous
(`synchronous_commit=on` is set on every connection, whatever the server's default): an enrolment is on the
database's disk before its 200.

Search. `templates` holds one row per identity and model: the sum of its faces' unit embeddings, updated in the
enrolment's transaction (an upsert that adds, under the row's lock, so concurrent enrolments of one identity on
several replicas add up) and rebuilt from `faces` when a face is deleted. Cosine distance ignores length, so the
sum stands for the template. Each embedder has its own partial HNSW index (cosine) over `total::vector(D) WHERE
model_sha256 = '<sha>'`: pgvector 0.6 filters after the index scan, so one index over all models would hand back
fewer rows than asked whenever other models' templates are near the query. With one row per identity the index's
nearest rows are the answer (top_k of them, exploring ef_search = max(EF_SEARCH, top_k) candidates), with exact
distances for the rows it returns.

Faults. Database errors that a retry can cure (server down or restarting, connection lost, statement timeout)
become `Unavailable` (503 `not_ready`), within FACE_GALLERY_TIMEOUT_S: that bounds the wait for a pooled
connection, the TCP connect, and every statement (`statement_timeout`). The pool checks a connection before
lending it and reconnects on demand, so a replica recovers by itself when the database is back.

Schema. Created at start-up under an advisory lock (replicas starting together do not race), with a version row
in `facerec_schema`. A database whose schema is newer than this code refuses the start (GallerySetupError, which
`python -m service` turns into exit code 2).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from service.errors import Unavailable
from service.gallery import (
    CheckedImport,
    Enrolment,
    GallerySetupError,
    GalleryStore,
    Identity,
    ImportedIdentity,
    Match,
    cancelling,
    exported,
    face_missing,
    identity_from_row,
    identity_missing,
    identity_with_faces,
    validate_identity_id,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# The HNSW graph of each model's templates, and hnsw.ef_search, the candidates a query explores. Chosen by
# measurement at 1,000,000 faces (250,000 templates; BENCHMARKS.md, "Index options at 1M faces", from
# `python -m benchmarks.pg_index_options`, on 2 busy cores). pgvector's default graph (m 16, ef_construction 64)
# missed a quarter of the enrolled people exact search finds on the clustered synthetic gallery at ef_search 100
# (match recall 0.76) and still 2.4 % at 400 (41 ms). This denser graph finds all of them at ef_search 100
# (1.0; 0.976 at 60), and on a gallery shaped like real embeddings (lfw-dev's statistics) it puts the same
# identity first as exact search for every query at any ef_search from 40 (recall@5 0.98 at 100, 0.997 at 200).
# Its price: a 1M-face build takes ~25 min instead of ~4-7 on those 2 busy cores, the index is 1.4 kB per
# identity, and an enrolment's insert explores 200 candidates. Search p50 at ef_search 100: 13-19 ms when the
# server's shared_buffers hold the index, 27-28 ms with PostgreSQL's default 128 MB. Recall@5 stays below 0.99
# at any ef_search within 20 ms (places 2-5 at 250,000 identities are strangers with near-equal scores).
# IVFFlat was no alternative: at lists 1000 it needed 64 probes (12 ms) for match recall 0.91, and its lists
# must be rebuilt as a gallery grows from empty.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
EF_SEARCH = 100
COUNT_REUSE_S = 1.0  # how long count_faces / count_searchable_identities reuse a count (see _recent_count)
MAX_EF_SEARCH = 1000  # pgvector's upper bound for hnsw.ef_search; past it, the exact fallback answers
POOL_SIZE = 4
# statement_timeout inside an import transaction (import_identities): a batch of thousands of identities is one
# long statement, and FACE_GALLERY_TIMEOUT_S is sized for a request's.
IMPORT_TIMEOUT_MS = 10 * 60 * 1000
_SCHEMA_LOCK = 0x66616365  # "face": pg_advisory_xact_lock key held while the schema is created or checked
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

_TABLES = """
CREATE TABLE facerec_schema (version integer NOT NULL);
CREATE TABLE identities (
    id           text COLLATE "C" PRIMARY KEY,   -- byte order, as SQLite sorts: pages list the same way
    display_name text,
    metadata     text NOT NULL DEFAULT '{}',     -- the JSON text as given (jsonb would reorder the keys)
    created_at   double precision NOT NULL
);
CREATE TABLE faces (
    seq          bigserial,                      -- enrolment order of faces with one created_at
    face_id      text PRIMARY KEY,
    identity_id  text COLLATE "C" NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    model_sha256 text NOT NULL,
    embedding    vector NOT NULL,                -- no fixed size: models of any size share the table
    created_at   double precision NOT NULL,
    source       text
);
CREATE INDEX faces_by_identity ON faces (identity_id, model_sha256);
CREATE INDEX faces_by_model ON faces (model_sha256, identity_id);
-- One row per identity and model: the sum of its faces' unit embeddings. Cosine distance ignores length, so the
-- sum stands for the template (their normalised mean) in every comparison and in the HNSW index. Kept in step
-- with `faces` inside the same transactions.
CREATE TABLE templates (
    identity_id  text COLLATE "C" NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    model_sha256 text NOT NULL,
    total        vector NOT NULL,
    faces        integer NOT NULL,
    PRIMARY KEY (identity_id, model_sha256)
);
"""

# Errors a retry can cure: the server is down or restarting, the connection broke, a statement timed out, a
# deadlock or serialisation failure, a write that reached a read-only standby during a fail-over. Anything else
# (a bug, bad SQL) stays a 500 with its traceback in the log.
_TRANSIENT = (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction, PoolTimeout, PoolClosed)


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable URL>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


def _index_name(model_sha256: str) -> str:
    return f"templates_hnsw_{model_sha256[:32]}"


def _connection_options(url: str, timeout_s: float) -> dict[str, Any]:
    """libpq options that bound every wait by the timeout; values the URL sets itself win."""
    try:
        given = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise GallerySetupError(f"FACE_GALLERY_URL is not a valid PostgreSQL URL: {exc}") from None
    defaults = {
        "connect_timeout": max(2, round(timeout_s)),  # libpq: whole seconds, at least 2
        # A peer that vanishes without closing (network partition) is noticed within the timeout too.
        "keepalives": 1,
        "keepalives_idle": max(1, round(timeout_s)),
        "keepalives_interval": 1,
        "keepalives_count": 3,
        "tcp_user_timeout": int(timeout_s * 1000),
        "application_name": "facerec",
    }
    return {k: v for k, v in defaults.items() if k not in given}


def create_model_index(conn: psycopg.Connection, model_sha256: str, embedding_size: int) -> None:
    """The HNSW index (cosine) of one embedder's templates: partial, so that its searches never see other
    models'. An index left by an earlier release with other graph settings is kept (rebuilding a million rows
    takes many minutes of the database's CPU, not something to do by surprise at start-up); a warning gives the
    statements that rebuild it."""
    if not _SHA256.fullmatch(model_sha256):
        raise ValueError(f"not a sha256: {model_sha256!r}")
    name = _index_name(model_sha256)
    conn.execute(
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {} ON templates USING hnsw ((total::vector({})) vector_cosine_ops) "
            "WITH (m = {}, ef_construction = {}) WHERE model_sha256 = {}"
        ).format(sql.Identifier(name), int(embedding_size), HNSW_M, HNSW_EF_CONSTRUCTION,
                 sql.Literal(model_sha256))
    )
    row = conn.execute("SELECT reloptions FROM pg_class WHERE relname = %s", (name,)).fetchone()
    built = dict(option.split("=", 1) for option in (row[0] or ())) if row else {}
    wanted = {"m": str(HNSW_M), "ef_construction": str(HNSW_EF_CONSTRUCTION)}
    if {k: built.get(k) for k in wanted} != wanted:
        settings = ", ".join(f"{k} = {v}" for k, v in wanted.items())
        log.warning(
            "gallery: the HNSW index %s was built with %s, not this release's %s, so searches in a large gallery "
            "find fewer of the people exact search finds (BENCHMARKS.md). Rebuild it while the service keeps "
            "serving: ALTER INDEX %s SET (%s); REINDEX INDEX CONCURRENTLY %s; (in a session with "
            "maintenance_work_mem large enough for the graph, about 1.5 kB per identity, or it builds far slower)",
            name, ", ".join(row[0]) if row and row[0] else "pgvector's defaults (m 16, ef_construction 64)",
            settings, name, settings, name,
        )


def prepare_database(
    url: str, model_sha256: str | None, embedding_size: int | None, timeout_s: float = 5.0
) -> None:
    """Create (or check) the schema, and this model's HNSW index when a model is given. GallerySetupError when
    that cannot be done."""
    options = _connection_options(url, timeout_s)
    try:
        conn = psycopg.connect(url, autocommit=True, **options)
    except psycopg.Error as exc:
        raise GallerySetupError(f"FACE_GALLERY_URL: cannot connect to {redact(url)}: {exc}") from None
    try:
        with conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            available = conn.execute(
                "SELECT installed_version IS NOT NULL, default_version FROM pg_available_extensions "
                "WHERE name = 'vector'"
            ).fetchone()
            if available is None:
                raise GallerySetupError(
                    f"FACE_GALLERY_URL: the database at {redact(url)} has no pgvector extension (`vector`): "
                    "install pgvector on that server (the pgvector/pgvector:pg16 image has it)"
                )
            if not available[0]:
                try:
                    with conn.transaction():
                        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                except psycopg.errors.InsufficientPrivilege:
                    raise GallerySetupError(
                        f"FACE_GALLERY_URL: pgvector is not enabled in {redact(url)} and this user may not "
                        "enable it (pgvector is not a trusted extension): run `CREATE EXTENSION vector;` in that "
                        "database as a superuser"
                    ) from None
            exists = conn.execute("SELECT to_regclass('facerec_schema') IS NOT NULL").fetchone()[0]
            if not exists:
                conn.execute(_TABLES)
                conn.execute("INSERT INTO facerec_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
                log.info("gallery: created schema version %d in %s", SCHEMA_VERSION, redact(url))
            (version,) = conn.execute("SELECT max(version) FROM facerec_schema").fetchone()
            if version is None or version > SCHEMA_VERSION:
                raise GallerySetupError(
                    f"FACE_GALLERY_URL: the gallery schema in {redact(url)} is version {version}, newer than "
                    f"this service's ({SCHEMA_VERSION}): run a service release that knows it, or point "
                    "FACE_GALLERY_URL at another database"
                )
            if model_sha256 is not None:
                create_model_index(conn, model_sha256, embedding_size)
    except psycopg.Error as exc:
        raise GallerySetupError(f"FACE_GALLERY_URL: cannot set up the gallery in {redact(url)}: {exc}") from None
    finally:
        conn.close()


class PostgresGallery(GalleryStore):
    """The shared store. Thread-safe: each call borrows a pooled connection for its own transaction."""

    def __init__(
        self,
        url: str,
        model_sha256: str,
        embedding_size: int,
        *,
        timeout_s: float = 5.0,
        pool_size: int = POOL_SIZE,
        ef_search: int = EF_SEARCH,
        earlier_ids: Sequence[str] = (),
    ):
        if not _SHA256.fullmatch(model_sha256 or ""):
            raise ValueError("model_sha256 must be a sha256 in hex: it keeps embeddings of different models apart")
        self.model_sha256 = model_sha256
        self.embedding_size = int(embedding_size)
        self.concurrency = pool_size
        if not 1 <= int(ef_search) <= MAX_EF_SEARCH:
            raise ValueError(f"ef_search must be between 1 and {MAX_EF_SEARCH}")
        self.ef_search = int(ef_search)
        self.url = url
        self.timeout_s = float(timeout_s)
        self._counts: dict[str, tuple[int, float]] = {}
        self._counts_lock = threading.Lock()
        self._writes = 0  # this handle's completed writes, so that a count racing one is not kept
        prepare_database(url, model_sha256, self.embedding_size, timeout_s)
        self._retag(earlier_ids)
        self._model = sql.Literal(model_sha256)  # a literal, not a parameter: the planner must see the
        self._vector = sql.SQL("total::vector({})").format(self.embedding_size)  # the partial index's terms
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, **_connection_options(url, timeout_s)},
            configure=self._configure,
            check=ConnectionPool.check_connection,
            timeout=timeout_s,
            # Give up reconnecting quickly: the next request that finds no connection starts a fresh attempt
            # at once, instead of waiting out an exponential back-off grown while the database was down.
            reconnect_timeout=timeout_s,
            name="gallery",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=timeout_s)
        except PoolTimeout as exc:
            self._pool.close()
            raise GallerySetupError(f"FACE_GALLERY_URL: cannot connect to {redact(url)}: {exc}") from None
        log.info("gallery: PostgreSQL %s, model %s, ef_search %d", redact(url), model_sha256[:12], ef_search)

    @contextmanager
    def search_index_deferred(self) -> Iterator[None]:
        """For a large import: this model's HNSW index is dropped on entry and built again on exit, however the
        block ends. Inserting rows into the index one by one is what bounds an import (about 130 identities/s
        measured on a busy 2-core machine; without the index, with one build at the end, about ten times that; see
        BENCHMARKS.md). Searches stay right while it is missing: they scan every template (exact, and slower at
        scale). Should the build never happen (the process killed), every replica's start creates the index."""
        self._index_ddl("DROP INDEX IF EXISTS {}", sql.Identifier(_index_name(self.model_sha256)))
        try:
            yield
        finally:
            log.info("gallery: building the HNSW index of model %s", self.model_sha256[:12])
            self._index_ddl(None)

    def _index_ddl(self, statement: str | None, *args: sql.Composable) -> None:
        """Run index DDL on a connection of its own, without the pool's statement timeout (an index build takes
        minutes at a million templates). None: create this model's index."""
        try:
            with psycopg.connect(self.url, autocommit=True, **_connection_options(self.url, self.timeout_s)) as conn:
                if statement is None:
                    create_model_index(conn, self.model_sha256, self.embedding_size)
                else:
                    conn.execute(sql.SQL(statement).format(*args))
        except _TRANSIENT as exc:
            raise Unavailable(f"the gallery database is unavailable: {exc}", details={"retry": True}) from exc

    def _retag(self, earlier_ids: Sequence[str]) -> None:
        """Faces the same network's earlier ids tagged (older releases keyed them by the whole file's sha256)
        become this model's, their identities' templates rebuilt; one transaction, before serving."""
        others = sorted({s for s in earlier_ids if s and s != self.model_sha256})
        if not others:
            return
        try:
            with psycopg.connect(self.url, autocommit=True, **_connection_options(self.url, self.timeout_s)) as conn:
                register_vector(conn)
                with conn.transaction():
                    moved = conn.execute(
                        "WITH moved AS (UPDATE faces SET model_sha256 = %s WHERE model_sha256 = ANY(%s) "
                        "RETURNING identity_id) SELECT DISTINCT identity_id FROM moved",
                        (self.model_sha256, others),
                    ).fetchall()
                    touched = [identity for (identity,) in moved]
                    if touched:
                        conn.execute("DELETE FROM templates WHERE identity_id = ANY(%s)", (touched,))
                        conn.execute(
                            "INSERT INTO templates (identity_id, model_sha256, total, faces) "
                            "SELECT identity_id, model_sha256, sum(embedding), count(*) FROM faces "
                            "WHERE identity_id = ANY(%s) GROUP BY identity_id, model_sha256",
                            (touched,),
                        )
        except psycopg.Error as exc:
            raise GallerySetupError(f"FACE_GALLERY_URL: cannot re-tag earlier faces in {redact(self.url)}: {exc}") \
                from None
        if touched:
            log.warning("gallery: faces of %d identities tagged with an earlier id of this same network (%s) "
                        "re-tagged as model %s", len(touched), ", ".join(s[:12] for s in others),
                        self.model_sha256[:12])

    def _configure(self, conn: psycopg.Connection) -> None:
        register_vector(conn)
        timeout_ms = int(self.timeout_s * 1000)
        conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(timeout_ms)))
        conn.execute("SET synchronous_commit = on")

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except _TRANSIENT as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise Unavailable(
                f"the gallery database is unavailable: {reason}", details={"retry": True}
            ) from exc

    # -- writes -----------------------------------------------------------------------------------------------

    def _write_enrolment(self, enrolment: Enrolment) -> None:
        """One transaction, committed with synchronous commit (the server's default) before returning."""
        identity_id, display_name = enrolment.identity_id, enrolment.display_name
        metadata_json, vectors, now = enrolment.metadata_json, enrolment.vectors, enrolment.created_at
        rows = enrolment.rows(self.model_sha256, lambda v: v)
        with self._connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO identities (id, display_name, metadata, created_at) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET "
                "display_name = COALESCE(excluded.display_name, identities.display_name), "
                "metadata = CASE WHEN %s THEN excluded.metadata ELSE identities.metadata END",
                (identity_id, display_name, metadata_json or "{}", now, metadata_json is not None),
            )
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO faces (face_id, identity_id, model_sha256, embedding, created_at, source) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    rows,
                )
            # The row lock the upsert takes serialises concurrent enrolments of one identity from any replica.
            total, faces = conn.execute(
                "INSERT INTO templates (identity_id, model_sha256, total, faces) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (identity_id, model_sha256) DO UPDATE SET "
                "total = templates.total + excluded.total, faces = templates.faces + excluded.faces "
                "RETURNING total, faces",
                (identity_id, self.model_sha256, vectors.astype(np.float64).sum(axis=0).astype(np.float32),
                 len(vectors)),
            ).fetchone()
            if problem := cancelling(total.to_numpy(), faces):  # with the faces enrolled before: roll back
                raise problem
        self._forget_counts()

    def _write_new_identities(self, batch: CheckedImport) -> int:
        """COPY into temporary tables, then one INSERT ... ON CONFLICT DO NOTHING of the identities; only the faces
        and templates of those it added follow. A replica enrolling one of these ids at the same moment either
        commits first (the import skips the id) or waits for this transaction (and then adds to it)."""
        totals = batch.template_sums().astype(np.float32)
        now = batch.created_at
        with self._connection() as conn, conn.transaction():
            conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(IMPORT_TIMEOUT_MS)))
            conn.execute(
                'CREATE TEMP TABLE import_identities (id text COLLATE "C", display_name text, metadata text, '
                "total vector, faces integer) ON COMMIT DROP"
            )
            conn.execute(
                'CREATE TEMP TABLE import_faces (ord bigint, face_id text, identity_id text COLLATE "C", '
                "embedding vector) ON COMMIT DROP"
            )
            conn.execute('CREATE TEMP TABLE import_added (id text COLLATE "C" PRIMARY KEY) ON COMMIT DROP')
            with conn.cursor().copy(
                "COPY import_identities (id, display_name, metadata, total, faces) FROM STDIN WITH (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["text", "text", "text", "vector", "int4"])
                for row in zip(batch.identity_ids, batch.display_names, batch.metadata_json, totals,
                               batch.counts.tolist()):
                    copy.write_row(row)
            with conn.cursor().copy(
                "COPY import_faces (ord, face_id, identity_id, embedding) FROM STDIN WITH (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["int8", "text", "text", "vector"])
                for row in zip(itertools.count(), batch.face_ids, batch.face_owners(), batch.vectors):
                    copy.write_row(row)
            conn.execute(
                "WITH added AS (INSERT INTO identities (id, display_name, metadata, created_at) "
                "  SELECT id, display_name, metadata, %s FROM import_identities "
                "  ON CONFLICT (id) DO NOTHING RETURNING id) "
                "INSERT INTO import_added SELECT id FROM added",
                (now,),
            )
            conn.execute(
                sql.SQL(
                    "INSERT INTO faces (face_id, identity_id, model_sha256, embedding, created_at) "
                    "SELECT f.face_id, f.identity_id, {}, f.embedding, %s FROM import_faces f "
                    "JOIN import_added a ON a.id = f.identity_id ORDER BY f.ord"
                ).format(self._model),
                (now,),
            )
            # New identities have no template row yet (it references the identity), so a plain INSERT.
            conn.execute(
                sql.SQL(
                    "INSERT INTO templates (identity_id, model_sha256, total, faces) "
                    "SELECT i.id, {}, i.total, i.faces FROM import_identities i JOIN import_added a ON a.id = i.id"
                ).format(self._model)
            )
            (added,) = conn.execute("SELECT count(*) FROM import_added").fetchone()
        self._forget_counts()
        return added

    def delete_identity(self, identity_id: str) -> int:
        """Remove an identity with all its faces (every model's); returns how many faces went."""
        validate_identity_id(identity_id)
        with self._connection() as conn, conn.transaction():
            (count,) = conn.execute(
                "WITH gone AS (DELETE FROM faces WHERE identity_id = %s RETURNING 1) SELECT count(*) FROM gone",
                (identity_id,),
            ).fetchone()
            if conn.execute("DELETE FROM identities WHERE id = %s", (identity_id,)).rowcount == 0:
                raise identity_missing(identity_id)
        self._forget_counts()
        return count

    def delete_face(self, identity_id: str, face_id: str) -> None:
        """Remove one face of an identity (the identity stays, possibly with no faces)."""
        validate_identity_id(identity_id)
        with self._connection() as conn, conn.transaction():
            deleted = conn.execute(
                "DELETE FROM faces WHERE face_id = %s AND identity_id = %s", (face_id, identity_id)
            ).rowcount
            if deleted == 0:
                exists = conn.execute("SELECT 1 FROM identities WHERE id = %s", (identity_id,)).fetchone()
                raise face_missing(identity_id, face_id, exists is not None)
            # Rebuilt from what is stored, not subtracted: no rounding drift, and every model's row stays right.
            conn.execute("DELETE FROM templates WHERE identity_id = %s", (identity_id,))
            conn.execute(
                "INSERT INTO templates (identity_id, model_sha256, total, faces) "
                "SELECT identity_id, model_sha256, sum(embedding), count(*) FROM faces WHERE identity_id = %s "
                "GROUP BY identity_id, model_sha256",
                (identity_id,),
            )
        self._forget_counts()

    # -- reads ------------------------------------------------------------------------------------------------

    def _list_identities(self, offset: int, limit: int) -> tuple[list[Identity], int]:
        query = sql.SQL(
            "SELECT i.id, i.display_name, i.metadata, i.created_at, "
            "  count(f.face_id) FILTER (WHERE f.model_sha256 = {model}), "
            "  count(f.face_id) FILTER (WHERE f.model_sha256 <> {model}) "
            "FROM (SELECT * FROM identities ORDER BY id LIMIT %s OFFSET %s) i "
            "LEFT JOIN faces f ON f.identity_id = i.id "
            "GROUP BY i.id, i.display_name, i.metadata, i.created_at ORDER BY i.id"
        ).format(model=self._model)
        with self._connection() as conn, conn.transaction():  # one snapshot for the page and its total
            (total,) = conn.execute("SELECT count(*) FROM identities").fetchone()
            rows = conn.execute(query, (limit, offset)).fetchall()
        return [identity_from_row(row) for row in rows], total

    def _export_page(self, after: str, limit: int) -> list[ImportedIdentity]:
        with self._connection() as conn, conn.transaction():  # one snapshot for the page and its faces
            identities = conn.execute(
                "SELECT id, display_name, metadata FROM identities WHERE id > %s ORDER BY id LIMIT %s", (after, limit)
            ).fetchall()
            if not identities:
                return []
            faces = conn.execute(
                sql.SQL(
                    "SELECT identity_id, embedding FROM faces WHERE identity_id BETWEEN %s AND %s "
                    "AND model_sha256 = {} ORDER BY identity_id, created_at, seq"
                ).format(self._model),
                (identities[0][0], identities[-1][0]),
            ).fetchall()
        return exported(identities, [(i, v.to_numpy()) for i, v in faces], self.model_sha256, self.embedding_size)

    def get_identity(self, identity_id: str) -> Identity:
        validate_identity_id(identity_id)
        with self._connection() as conn, conn.transaction():
            row = conn.execute(
                "SELECT id, display_name, metadata, created_at, 0, 0 FROM identities WHERE id = %s",
                (identity_id,),
            ).fetchone()
            if row is None:
                raise identity_missing(identity_id)
            stored = conn.execute(
                "SELECT face_id, model_sha256, created_at, source FROM faces WHERE identity_id = %s "
                "ORDER BY created_at, seq",
                (identity_id,),
            ).fetchall()
        return identity_with_faces(row, stored, self.model_sha256)

    def _count(self, query: sql.Composable) -> int:
        with self._connection() as conn:
            return conn.execute(query).fetchone()[0]

    def _recent_count(self, name: str, query: sql.Composable) -> int:
        """A count over the model's faces, reused for COUNT_REUSE_S. These counts scan an index (12 ms at 100k
        faces, ten times that at 1M) and are asked on every enrolment (the metrics gauge) and possibly every 1:N
        decision. Reusing one for a second is safe: it is a number, never a face, so it cannot make a deleted
        face match; this replica's own writes drop it at once, other replicas' show within the second."""
        now = time.monotonic()
        with self._counts_lock:
            cached = self._counts.get(name)
            if cached is not None and now - cached[1] < COUNT_REUSE_S:
                return cached[0]
            generation = self._writes
        value = self._count(query)
        with self._counts_lock:
            if generation == self._writes:  # no write of ours ended while it counted: the count includes them all
                self._counts[name] = (value, now)
        return value

    def _forget_counts(self) -> None:
        with self._counts_lock:
            self._writes += 1
            self._counts.clear()

    def count_identities(self) -> int:
        return self._count(sql.SQL("SELECT count(*) FROM identities"))

    def count_faces(self) -> int:
        """Faces searchable with the current model (see _recent_count)."""
        return self._recent_count(
            "faces", sql.SQL("SELECT count(*) FROM faces WHERE model_sha256 = {}").format(self._model)
        )

    def count_searchable_identities(self) -> int:
        """Identities with at least one face of the current model (what a 1:N decision compares a probe with;
        see _recent_count)."""
        return self._recent_count(
            "searchable",
            sql.SQL("SELECT count(*) FROM templates WHERE model_sha256 = {}").format(self._model),
        )

    def count_foreign(self) -> int:
        """Faces enrolled with another model: kept, never compared with the current model's."""
        return self._count(sql.SQL("SELECT count(*) FROM faces WHERE model_sha256 <> {}").format(self._model))

    def _search(self, q: np.ndarray, top_k: int, threshold: float | None) -> list[list[Match]]:
        with self._connection() as conn:
            return [self._search_one(conn, query, top_k, threshold) for query in q]

    def _search_one(
        self, conn: psycopg.Connection, query: np.ndarray, top_k: int, threshold: float | None
    ) -> list[Match]:
        # One template per identity, so the index's nearest rows are the answer itself: no grouping, and the
        # distances it orders by are exact for the rows it returns. ef_search bounds how many it explores.
        ef = min(MAX_EF_SEARCH, max(self.ef_search, top_k))
        nearest = sql.SQL(
            "SELECT t.identity_id, 1 - t.distance, t.faces, i.display_name FROM ("
            "  SELECT identity_id, {vector} <=> %s AS distance, faces FROM templates WHERE model_sha256 = {model} "
            "  ORDER BY {vector} <=> %s LIMIT %s"
            ") t JOIN identities i ON i.id = t.identity_id ORDER BY t.distance, t.identity_id"
        ).format(vector=self._vector, model=self._model)
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(ef)))
            rows = conn.execute(nearest, (query, query, top_k)).fetchall()
        return [
            Match(identity_id=i, similarity=float(np.clip(s, -1.0, 1.0)), faces=int(k), display_name=name)
            for i, s, k, name in rows
            if s is not None and math.isfinite(s) and (threshold is None or s >= threshold)  # NaN: a zero template
        ]

    def _template_total(self, identity_id: str) -> np.ndarray | None:
        with self._connection() as conn, conn.transaction():
            if conn.execute("SELECT 1 FROM identities WHERE id = %s", (identity_id,)).fetchone() is None:
                raise identity_missing(identity_id)
            row = conn.execute(
                sql.SQL("SELECT total FROM templates WHERE identity_id = %s AND model_sha256 = {}").format(
                    self._model
                ),
                (identity_id,),
            ).fetchone()
        return None if row is None else row[0].to_numpy()

    def close(self) -> None:
        self._pool.close()
