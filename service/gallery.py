"""Enrolled identities: SQLite is the source of truth, an in-memory matrix answers searches.

Durability. The database runs in WAL mode with `synchronous=FULL`, and every enrolment or deletion is one
transaction committed before the method returns. With WAL, `synchronous=NORMAL` would already survive the
process being killed (kill -9: the committed frames are in the OS page cache), but could lose the last commits
on power loss or a kernel crash; FULL fsyncs the WAL at every commit, so an acknowledged enrolment survives
those too. Enrolments are rare human-scale events, so one fsync (milliseconds) each is cheap.

Erasure. Deleting an identity removes its rows, its template from the search matrix, and, because
biometric data must really go, `secure_delete` overwrites the freed database pages with zeros and a WAL
checkpoint (TRUNCATE) drops old copies of those pages from the write-ahead log.

Models. Each face row records the sha256 of the embedder file that produced it. Only rows of the CURRENT
model are loaded and searched: embeddings from different networks live in unrelated spaces, so comparing them
would give meaningless similarities. Rows of other models are kept (a rollback to the old model finds them)
and counted by `count_foreign()`.

Search. An identity is matched through its template: the normalised mean of its current-model face embeddings.
`python -m evaluate identify` measured it against the best single face on lfw-dev (813 identities, up to 3
photos each): FNIR at FPIR 1 % 0.035 against 0.044, and the FPIR the decision policy predicts for N identities
held (0.94 % measured for a 1 % target), where best-face matching named 1.4 % of strangers, because every extra
face is one more chance for a stranger to come close. With one face per identity the two are the same thing.
The templates sit in one (capacity, D) matrix of face-embedding sums (with their norms) that grows by doubling;
a query is one matrix product over identities, then `argpartition` picks the top ones. Deleting an identity
moves the last row into its slot (O(D), not O(N)); deleting a face rebuilds its identity's sum from the stored
faces. One lock serialises mutations and searches, which keeps row indices consistent; the matrix product itself
runs multi-threaded in BLAS. The face rows stay in SQLite only: memory is one row per identity.

Large galleries. From a configured number of identities the templates are searched through an ANN index persisted
beside the database (service/template_index.py; "Index" in the class below): its candidates are re-ranked with the
stored float32 templates, so every identity found carries exactly the similarity exact search gives it, and
enrolments and deletions since its build are searched exactly beside it (deleted ones never returned). Exact
search answers while it is missing, stale or being built.

Bulk import. `import_identities` (used by `python -m service.gallery_io`) writes a batch of identities that do not
exist yet in one transaction, as durable as an enrolment, and skips those that do, so an interrupted import is
finished by running it again. A batch is checked and written column by column (`CheckedImport`): per-identity
Python objects and numpy calls would cost more than SQLite's own work, which is what bounds the rate (BENCHMARKS.md).

One process owns a gallery file: two server processes on one file would each keep their own matrix and
miss the other's enrolments (run uvicorn with one worker; scale inference with ORT threads instead). Several
replicas share a PostgreSQL gallery instead (service/pg_gallery.py, FACE_GALLERY_URL=postgresql://...): both
stores implement `GalleryStore`, and the routers only know that.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from service.errors import FaceServiceError, InvalidParameter, ModelError, ModelMismatch, NotFound
from service.template_index import (
    MANIFEST,
    MIN_TEMPLATES,
    RETRY_AFTER_FAILURE_S,
    IndexOptions,
    Snapshot,
    SnapshotUnusable,
    SnapshotWriter,
    available_threads,
    index_folder,
    remove_other_tags,
)
from service.vectors import UNIT_TOLERANCE, similarity

log = logging.getLogger(__name__)

IDENTITY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_DISPLAY_NAME = 256
MAX_METADATA_BYTES = 16 * 1024
# Nesting of metadata containers. Deeper JSON is no use to anyone, and the recursive encoders and decoders it
# passes through (json, pydantic) fail with RecursionError somewhere near a thousand levels.
MAX_METADATA_DEPTH = 32
# SQLite integers are signed 64-bit: the sqlite3 module raises OverflowError for a larger Python int.
SQLITE_MAX_INTEGER = 2**63 - 1
# Queries are scored in chunks so that the (queries x faces) score matrix stays under ~128 MB.
_SCORE_BUDGET = 32 * 1024 * 1024
_ID_LOOKUP_CHUNK = 500  # ids per `IN (...)` lookup: well under SQLite's limit on bound parameters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS identities (
    id           TEXT PRIMARY KEY,
    display_name TEXT,
    metadata     TEXT NOT NULL DEFAULT '{}',
    created_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS faces (
    face_id      TEXT PRIMARY KEY,
    identity_id  TEXT NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    model_sha256 TEXT NOT NULL,
    embedding    BLOB NOT NULL,
    created_at   REAL NOT NULL,
    source       TEXT
);
CREATE INDEX IF NOT EXISTS faces_by_identity ON faces(identity_id);
CREATE INDEX IF NOT EXISTS faces_by_model ON faces(model_sha256);
-- Counting one identity's faces of a model (list_identities, per identity of a page): without this index SQLite
-- picked faces_by_model, scanning every face of the model for each identity (65 s per page of 1,000 at 20,000
-- faces, and the server pages through every identity at start-up); with it, 3 ms.
CREATE INDEX IF NOT EXISTS faces_by_identity_model ON faces(identity_id, model_sha256);
-- Which identities' faces changed, in commit order, while an ANN index snapshot exists (service/template_index.py):
-- a restart re-reads only those identities instead of every face. Written by triggers, so any writer (an older
-- release, the sqlite3 shell) is logged too; `template_log` holds the one switch, set while a snapshot exists.
CREATE TABLE IF NOT EXISTS template_changes (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    identity_id  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS template_log (on_since INTEGER NOT NULL);
-- This database's own random id, written once, recorded in every index snapshot built for it: an index folder
-- copied or left beside another gallery file is never used for that file.
CREATE TABLE IF NOT EXISTS gallery_id (id TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS faces_inserted_log AFTER INSERT ON faces WHEN EXISTS (SELECT 1 FROM template_log)
BEGIN INSERT INTO template_changes (identity_id) VALUES (NEW.identity_id); END;
CREATE TRIGGER IF NOT EXISTS faces_deleted_log AFTER DELETE ON faces WHEN EXISTS (SELECT 1 FROM template_log)
BEGIN INSERT INTO template_changes (identity_id) VALUES (OLD.identity_id); END;
CREATE TRIGGER IF NOT EXISTS faces_updated_log AFTER UPDATE OF identity_id, model_sha256, embedding ON faces
WHEN EXISTS (SELECT 1 FROM template_log)
BEGIN
    INSERT INTO template_changes (identity_id) VALUES (OLD.identity_id);
    INSERT INTO template_changes (identity_id) VALUES (NEW.identity_id);
END;
"""


@dataclass(frozen=True)
class Match:
    identity_id: str
    similarity: float  # cosine similarity to the identity's template, in [-1, 1]
    faces: int  # how many enrolled faces (of the current model) the template averages
    display_name: str | None = None


@dataclass(frozen=True)
class FaceRecord:
    face_id: str
    identity_id: str
    model_sha256: str
    created_at: float  # unix seconds, UTC
    source: dict | None  # what the caller said about the source image (file name, box, ...)
    current_model: bool  # False: made by another embedder, never searched


@dataclass(frozen=True)
class Identity:
    identity_id: str
    display_name: str | None
    metadata: dict
    created_at: float  # unix seconds, UTC
    face_count: int  # faces searchable with the current model
    foreign_face_count: int  # faces enrolled with other models
    faces: list[FaceRecord] | None = None  # filled by get_identity, not by list_identities


def validate_identity_id(identity_id: str) -> str:
    if not isinstance(identity_id, str) or not IDENTITY_ID_PATTERN.fullmatch(identity_id):
        raise InvalidParameter(
            "identity id must be 1-128 characters of letters, digits, '_', '.', '-', starting with a "
            "letter or digit",
            details={"identity_id": str(identity_id)[:200], "pattern": IDENTITY_ID_PATTERN.pattern},
        )
    return identity_id


_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(value: Any) -> str | None:
    """Why some text in `value` (a str, or JSON holding them, keys included) must not be stored, or None.

    A lone UTF-16 surrogate ("\\udfff" in JSON) has no UTF-8 encoding: stored, it makes every read that returns
    it fail as it is serialised. A NUL character is refused by PostgreSQL's text and jsonb. Iterative, like
    json_depth_exceeds, so that any nesting is safe to walk."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "a NUL character (U+0000)"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a lone UTF-16 surrogate, which is not valid Unicode text"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return None


def servable(value: Any) -> Any:
    """`value` with every unencodable character of its text replaced by U+FFFD: what a read returns for a row
    stored before text_problem refused such text at the door (see unservable_identities)."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {servable(k): servable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [servable(v) for v in value]
    return value


def unservable_identities(gallery: Any, page: int = 1000) -> list[str]:
    """Ids of stored identities whose display name or metadata holds text that text_problem refuses: rows
    written before that check existed. Reads return them with U+FFFD in place of the bad characters (servable);
    this finds them so that an operator can fix or delete them. Uses only list_identities."""
    if isinstance(gallery, Gallery):  # one SQL pass: paging with OFFSET costs minutes at millions of identities
        return gallery.identities_with_suspect_text(text_problem)
    found, offset = [], 0
    while True:
        identities, total = gallery.list_identities(offset, page)
        found += [i.identity_id for i in identities if text_problem([i.display_name, i.metadata])]
        offset += len(identities)
        if not identities or offset >= total:
            return found


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """True when dicts and lists in `value` nest more than `limit` deep. Iterative, so that any depth is safe
    to check: a recursive walk would fail on exactly the input this is meant to refuse."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


@dataclass(frozen=True)
class Enrolment:
    """A checked enrolment, ready for a store to write in one transaction."""

    identity_id: str
    vectors: np.ndarray  # (k, D) float32 unit rows
    face_ids: list[str]
    sources: list[str | None]  # each face's source as JSON text
    display_name: str | None  # None: keep the stored name
    metadata_json: str | None  # None: keep the stored metadata
    created_at: float

    def rows(self, model_sha256: str, encode: Callable[[np.ndarray], Any]) -> list[tuple]:
        """One `faces` row per face: (face_id, identity_id, model_sha256, encoded vector, created_at, source)."""
        return [
            (face_id, self.identity_id, model_sha256, encode(vector), self.created_at, source)
            for face_id, vector, source in zip(self.face_ids, self.vectors, self.sources)
        ]


class ImportedIdentity(NamedTuple):
    """One identity for `GalleryStore.import_identities`, as a backup or another system holds it. (A tuple: a bulk
    import makes millions.)"""

    identity_id: str
    embeddings: Any  # (k, D) unit vectors, k >= 1
    model_sha256: str  # the model that made them: only the store's own model is accepted
    display_name: str | None = None
    metadata: dict | None = None


@dataclass(frozen=True)
class CheckedImport:
    """A checked batch of identities, column by column, ready for a store to write in one transaction."""

    identity_ids: list[str]
    display_names: list[str | None]
    metadata_json: list[str]
    counts: np.ndarray  # (n,) faces of each identity
    vectors: np.ndarray  # (sum of counts, D) float32 unit rows, identity after identity
    face_ids: list[str]
    created_at: float

    def only(self, keep: Sequence[bool]) -> CheckedImport:
        """The identities whose `keep` is true, with their faces."""
        keep = np.asarray(keep, dtype=bool)
        if keep.all():
            return self
        per_face = np.repeat(keep, self.counts)
        return CheckedImport(
            identity_ids=[v for v, k in zip(self.identity_ids, keep) if k],
            display_names=[v for v, k in zip(self.display_names, keep) if k],
            metadata_json=[v for v, k in zip(self.metadata_json, keep) if k],
            counts=self.counts[keep],
            vectors=self.vectors[per_face],
            face_ids=[v for v, k in zip(self.face_ids, per_face) if k],
            created_at=self.created_at,
        )

    def face_owners(self) -> list[str]:
        """The identity id of each face."""
        if len(self.face_ids) == len(self.identity_ids):
            return self.identity_ids
        return [i for i, k in zip(self.identity_ids, self.counts.tolist()) for _ in range(k)]

    def template_sums(self) -> np.ndarray:
        """(n, D) float64: each identity's sum of its faces, from one running sum over the batch (np.add.reduceat
        with ten thousand one-row segments is a hundred times slower). In float64 a running sum of unit vectors
        stays exact to ~1e-12, far below the float32 the sums are kept in."""
        if len(self.vectors) == len(self.identity_ids):  # one face each: the sums are the faces
            return self.vectors.astype(np.float64)
        running = np.cumsum(self.vectors, axis=0, dtype=np.float64)
        ends = np.cumsum(self.counts) - 1
        totals = running[ends]
        totals[1:] -= running[ends[:-1]]
        return totals


def check_import(batch: Sequence[ImportedIdentity], model_sha256: str, size: int) -> CheckedImport:
    """Each identity checked as an enrolment is (id, display name, metadata, embeddings of `size` values), plus: its
    embeddings made by `model_sha256` (else ModelMismatch) and of unit length within UNIT_TOLERANCE (a raw network
    output is not an embedding the service made), and no id twice in the batch. The first problem raises, its
    details naming the item's `index` in the batch. The vectors are checked for the whole batch at once: the
    per-identity numpy calls of `check_enrolment` would cost more than writing the rows."""
    seen: set[str] = set()
    matrices, metadata = [], []
    for index, item in enumerate(batch):
        try:
            metadata_json = check_identity_fields(item.identity_id, item.display_name, item.metadata)
            if item.identity_id in seen:
                raise InvalidParameter("the identity appears twice in one batch")
            seen.add(item.identity_id)
            if item.model_sha256 != model_sha256:
                raise ModelMismatch(
                    f"embeddings of model {str(item.model_sha256)[:12]}, this gallery's model is {model_sha256[:12]}: "
                    "embeddings of different models are never compared",
                    details={"model_sha256": str(item.model_sha256)[:64], "expected_model_sha256": model_sha256},
                )
            vectors = np.asarray(item.embeddings, dtype=np.float32)
            if vectors.ndim != 2 or vectors.shape[1] != size or len(vectors) == 0:
                raise InvalidParameter(
                    f"embeddings must have shape (k >= 1, {size}), got {vectors.shape}", details={"expected_size": size}
                )
        except FaceServiceError as exc:
            raise _at(exc, index, item) from None
        except (TypeError, ValueError) as exc:  # np.asarray of something that is not numbers
            raise _at(InvalidParameter(f"embeddings are not numbers ({exc})"), index, item) from None
        matrices.append(vectors)
        metadata.append(metadata_json or "{}")
    counts = np.array([len(m) for m in matrices], dtype=np.int64)
    vectors = np.concatenate(matrices) if matrices else np.zeros((0, size), np.float32)
    wide = vectors.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))
    bad = np.flatnonzero(~(np.abs(norms - 1.0) <= UNIT_TOLERANCE))  # NaN and infinities fail this too
    if len(bad):
        index = int(np.searchsorted(np.cumsum(counts), bad[0], side="right"))
        problem = (
            InvalidParameter("embeddings hold NaN or infinite values")
            if not np.isfinite(norms[bad[0]])
            else InvalidParameter(
                f"an embedding has length {norms[bad[0]]:.6g}, not 1: import L2-normalised embeddings",
                details={"norm": float(norms[bad[0]]), "tolerance": UNIT_TOLERANCE},
            )
        )
        raise _at(problem, index, batch[index])
    unit = wide / norms[:, None]
    if len(counts):
        sums = np.add.reduceat(unit, np.concatenate([[0], np.cumsum(counts)[:-1]]), axis=0)
        weak = np.flatnonzero(np.linalg.norm(sums, axis=1) < MIN_TEMPLATE_MEAN_LENGTH * counts)
        if len(weak):
            index = int(weak[0])
            raise _at(cancelling(sums[index], int(counts[index])), index, batch[index])
    return CheckedImport(
        identity_ids=[item.identity_id for item in batch],
        display_names=[item.display_name for item in batch],
        metadata_json=metadata,
        counts=counts,
        vectors=unit.astype(np.float32),
        face_ids=sequential_ids(len(vectors)),
        created_at=time.time(),
    )


def sequential_ids(n: int) -> list[str]:
    """n new face ids, in increasing order: UUIDv7s (RFC 9562) as 32 hex digits, like the uuid4 hex of enrolled
    faces. They share a time-ordered random prefix and count up in their last 32 bits, so a million of them land at
    the end of the face-id indexes (B-trees) instead of at a million random places, each a page to read and
    rewrite once the index outgrows the cache."""
    if n >= 2**32:
        raise ValueError("at most 2**32 ids at once")
    rand_a, rand_b = int.from_bytes(os.urandom(2), "big") >> 4, int.from_bytes(os.urandom(4), "big") >> 2
    # The first 96 bits: unix time in ms (48), version 7 (4), 12 random bits, variant 0b10 (2), 30 random bits.
    head = f"{(time.time_ns() // 1_000_000) << 48 | 0x7 << 44 | rand_a << 32 | 0b10 << 30 | rand_b:024x}"
    return [f"{head}{i:08x}" for i in range(n)]


def _at(exc: FaceServiceError, index: int, item: ImportedIdentity) -> FaceServiceError:
    """The same error, naming the batch item it is about."""
    identity = str(getattr(item, "identity_id", ""))[:200]
    return type(exc)(f"identity {identity!r}: {exc.message}", details={**exc.details, "index": index,
                                                                       "identity_id": identity})


class GalleryStore(ABC):
    """What the routers and the pipeline use, whichever store runs: this module's SQLite `Gallery` (one process)
    or `service.pg_gallery.PostgresGallery` (any number of replicas). tests/test_gallery.py holds both to it.
    The checks every store makes are here, once; each store writes and reads its own way.

    Every method blocks; the runtime calls them on its gallery threads (`concurrency` of them at once)."""

    model_sha256: str
    embedding_size: int
    concurrency: int  # how many threads may usefully call the store at once

    def enroll(
        self,
        identity_id: str,
        embeddings: np.ndarray,
        display_name: str | None = None,
        metadata: dict | None = None,
        *,
        sources: Sequence[dict | None] | None = None,
    ) -> list[str]:
        """Add faces (k, D) to an identity, creating it if new; returns the new face ids.

        For an existing identity, a given display_name or metadata replaces the stored one; None keeps it.
        Embeddings are L2-normalised before storage. Committed durably, in one transaction, before returning.
        """
        vectors, metadata_json = check_enrolment(
            identity_id, embeddings, self.embedding_size, display_name, metadata, sources
        )
        enrolment = Enrolment(
            identity_id=identity_id,
            vectors=vectors,
            face_ids=[uuid.uuid4().hex for _ in range(len(vectors))],
            sources=[None if s is None else json.dumps(s) for s in (sources or [None] * len(vectors))],
            display_name=display_name,
            metadata_json=metadata_json,
            created_at=time.time(),
        )
        self._write_enrolment(enrolment)
        return enrolment.face_ids

    def import_identities(self, batch: Sequence[ImportedIdentity]) -> int:
        """Bulk load (service/gallery_io.py): write the identities of `batch` that the store does not hold yet,
        with their faces and templates, in ONE transaction committed durably before returning; identities it
        already holds are skipped whole (nothing added to them, names and metadata untouched), so an interrupted
        import can simply run again. Every identity is checked first (`check_import`); one bad identity raises
        and nothing of the batch is written. Returns how many identities were added."""
        checked = check_import(batch, self.model_sha256, self.embedding_size)
        return self._write_new_identities(checked) if checked.identity_ids else 0

    def export_identities(self, page: int = 1000) -> Iterator[ImportedIdentity]:
        """Every identity, in id order, with its current-model embeddings as stored ((0, D) when it has none),
        read a page of identities at a time: what `import_identities` takes, for backups and moves. Faces of
        other models are not included (count_foreign counts them)."""
        after = ""  # every id sorts after the empty string
        while True:
            identities = self._export_page(after, page)
            yield from identities
            if len(identities) < page:
                return
            after = identities[-1].identity_id

    def list_identities(self, offset: int = 0, limit: int = 100) -> tuple[list[Identity], int]:
        """A page of identities ordered by id, and the total number of identities."""
        if not (0 <= offset <= SQLITE_MAX_INTEGER and 0 <= limit <= SQLITE_MAX_INTEGER):
            raise InvalidParameter(f"offset and limit must be between 0 and {SQLITE_MAX_INTEGER}")
        return self._list_identities(offset, limit)

    def search(
        self, queries: np.ndarray, top_k: int = 5, threshold: float | None = None
    ) -> list[list[Match]]:
        """For each query (M, D): up to top_k identities, best first, each scored against its template (the
        normalised mean of its faces); only similarities >= threshold when one is given. Queries are
        L2-normalised here."""
        check_search(top_k, threshold)
        return self._search(unit_rows(queries, self.embedding_size, "queries"), top_k, threshold)

    def identity_similarity(self, identity_id: str, queries: np.ndarray) -> np.ndarray:
        """Cosine similarity of each query (M, D) to one identity's template: (M,) float32, the similarity
        /identify would give that identity.

        For 1:1 verification against an enrolled identity, without ranking the whole gallery. NotFound when
        the identity does not exist; an empty identity (or one with only other models' faces) gives NaN.
        """
        validate_identity_id(identity_id)
        q = unit_rows(queries, self.embedding_size, "queries")
        total = self._template_total(identity_id)
        if total is None:
            return np.full(len(q), np.nan, dtype=np.float32)
        total = np.asarray(total, dtype=np.float64)
        return similarity(q, total / np.linalg.norm(total))

    def __len__(self) -> int:
        return self.count_faces()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what each store does its own way ----------------------------------------------------------------

    @abstractmethod
    def _write_enrolment(self, enrolment: Enrolment) -> None: ...
    @abstractmethod
    def _write_new_identities(self, batch: CheckedImport) -> int:
        """Of the batch's identities (distinct ids), write those that do not exist, in one transaction; return how
        many were written."""
    @abstractmethod
    def _export_page(self, after: str, limit: int) -> list[ImportedIdentity]:
        """Up to `limit` identities with ids after `after` (byte order), each with its current-model embeddings
        in enrolment order."""
    @abstractmethod
    def delete_identity(self, identity_id: str) -> int: ...
    @abstractmethod
    def delete_face(self, identity_id: str, face_id: str) -> None: ...
    @abstractmethod
    def _list_identities(self, offset: int, limit: int) -> tuple[list[Identity], int]: ...
    @abstractmethod
    def get_identity(self, identity_id: str) -> Identity: ...
    @abstractmethod
    def count_identities(self) -> int: ...
    @abstractmethod
    def count_faces(self) -> int: ...
    @abstractmethod
    def count_searchable_identities(self) -> int: ...
    @abstractmethod
    def count_foreign(self) -> int: ...
    @abstractmethod
    def _search(self, queries: np.ndarray, top_k: int, threshold: float | None) -> list[list[Match]]: ...
    @abstractmethod
    def _template_total(self, identity_id: str) -> np.ndarray | None:
        """The sum of the identity's current-model embeddings; None when it has none; NotFound when the
        identity does not exist."""
    @abstractmethod
    def close(self) -> None: ...


def identity_missing(identity_id: str) -> NotFound:
    return NotFound(f"identity {identity_id!r} does not exist", details={"identity_id": identity_id})


def face_missing(identity_id: str, face_id: str, identity_exists: bool) -> NotFound:
    """The error for a face that is not there: the identity's, when that is what is missing."""
    if not identity_exists:
        return identity_missing(identity_id)
    return NotFound(
        f"identity {identity_id!r} has no face {face_id!r}",
        details={"identity_id": identity_id, "face_id": face_id},
    )


def identity_with_faces(row: tuple, stored: Iterable[tuple], model_sha256: str) -> Identity:
    """An identity row (id, display_name, metadata, created_at, ...) and its face rows (face_id, model_sha256,
    created_at, source) as one Identity, its counts split by model."""
    faces = [
        FaceRecord(
            face_id=face_id,
            identity_id=row[0],
            model_sha256=sha,
            created_at=created,
            source=None if source is None else json.loads(source),
            current_model=sha == model_sha256,
        )
        for face_id, sha, created, source in stored
    ]
    current = sum(f.current_model for f in faces)
    identity = identity_from_row((*row[:4], current, len(faces) - current))
    return dataclasses.replace(identity, faces=faces)


def exported(identities: Sequence[tuple], faces: Iterable[tuple], model_sha256: str, size: int) -> list[ImportedIdentity]:
    """Identity rows (id, display_name, metadata JSON) and face rows (identity_id, embedding as float32 bytes or
    a vector) as `export_identities` yields them."""
    embeddings: dict[str, list] = {}
    for identity_id, embedding in faces:
        embeddings.setdefault(identity_id, []).append(
            np.frombuffer(embedding, dtype="<f4") if isinstance(embedding, bytes) else embedding
        )
    empty = np.zeros((0, size), dtype=np.float32)
    return [
        ImportedIdentity(
            identity_id=identity_id,
            embeddings=np.array(embeddings[identity_id], dtype=np.float32) if identity_id in embeddings else empty,
            model_sha256=model_sha256,
            display_name=display_name,
            metadata=json.loads(metadata) if metadata else {},
        )
        for identity_id, display_name, metadata in identities
    ]


class GallerySetupError(Exception):
    """The configured gallery cannot be used: unreachable database, no pgvector, a schema newer than the code.
    The message names FACE_GALLERY_URL; `python -m service` prints it and exits with code 2."""


def _postgres():
    try:
        from service import pg_gallery  # psycopg is imported only by those who use PostgreSQL
    except ImportError as exc:
        raise GallerySetupError(
            f"FACE_GALLERY_URL names PostgreSQL, but its driver is not installed ({exc}): "
            "pip install 'facerec[serve]'"
        ) from None
    return pg_gallery


def open_gallery(url: str, model_sha256: str, embedding_size: int, *, timeout_s: float = 5.0,
                 earlier_ids: Sequence[str] = (), ef_search: int | None = None,
                 index: IndexOptions | None = None) -> GalleryStore:
    """The store a FACE_GALLERY_URL names (service.settings.gallery_store parses it). earlier_ids: tags the same
    network's faces carried before (see Gallery), re-tagged as model_sha256's when the store opens. ef_search:
    PostgreSQL's HNSW search breadth (None: its default). index: the SQLite store's ANN index (None: exact
    search, no index)."""
    from service.settings import gallery_store

    store, where = gallery_store(url)
    if store == "sqlite":
        return Gallery(where, model_sha256, embedding_size, earlier_ids=earlier_ids, index=index)
    pg = _postgres()
    return pg.PostgresGallery(where, model_sha256, embedding_size, timeout_s=timeout_s, earlier_ids=earlier_ids,
                              ef_search=pg.EF_SEARCH if ef_search is None else ef_search)


def check_gallery(url: str, *, timeout_s: float = 5.0) -> None:
    """Before serving: can this gallery be used? For PostgreSQL, connects, enables pgvector, creates or checks
    the schema. GallerySetupError when not. (A SQLite file is checked when the server opens it.)"""
    from service.settings import gallery_store

    store, where = gallery_store(url)
    if store == "postgresql":
        _postgres().prepare_database(where, None, None, timeout_s)


def unit_rows(x: Any, size: int, what: str) -> np.ndarray:
    """(N, size) or (size,) finite non-zero vectors -> (N, size) float32 rows of unit length."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != size:
        raise InvalidParameter(f"{what} must have shape (N, {size}), got {x.shape}", details={"expected_size": size})
    if not np.isfinite(x).all():
        raise InvalidParameter(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms < 1e-6).any():
        raise InvalidParameter(f"{what} contain an all-zero vector")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def check_search(top_k: Any, threshold: Any) -> None:
    if not isinstance(top_k, int) or top_k < 1:
        raise InvalidParameter("top_k must be a positive integer")
    if threshold is not None and not (isinstance(threshold, (int, float)) and -1.0 <= threshold <= 1.0):
        raise InvalidParameter("threshold must be a cosine similarity in [-1, 1]")


# An identity's template is the mean direction of its faces. Faces of one person point close together (their mean
# has length about 0.8); sent embeddings that cancel out (v and -v) would leave a template with no direction, which
# matches nothing and still counts as an identity searched. Refused below this mean length.
MIN_TEMPLATE_MEAN_LENGTH = 0.05


def cancelling(total: np.ndarray, count: int) -> InvalidParameter | None:
    """The error for faces whose sum (`total`, of `count` unit vectors) has almost no length; None when fine."""
    length = float(np.linalg.norm(np.asarray(total, dtype=np.float64)))
    if count and length < MIN_TEMPLATE_MEAN_LENGTH * count:
        return InvalidParameter(
            f"the identity's embeddings cancel each other out (their mean has length {length / count:.3g}): its "
            "template would point nowhere", details={"mean_length": length / count},
        )
    return None


def check_enrolment(
    identity_id: str,
    embeddings: Any,
    size: int,
    display_name: Any,
    metadata: Any,
    sources: Sequence[dict | None] | None,
) -> tuple[np.ndarray, str | None]:
    """Validate an enrolment: the unit embeddings, and the metadata as JSON text (None: keep the stored one)."""
    validate_identity_id(identity_id)
    vectors = unit_rows(embeddings, size, "embeddings")
    if len(vectors) == 0:
        raise InvalidParameter("nothing to enroll: no embeddings given")
    if problem := cancelling(vectors.astype(np.float64).sum(axis=0), len(vectors)):
        raise problem
    metadata_json = check_identity_fields(identity_id, display_name, metadata)
    if sources is not None and len(sources) != len(vectors):
        raise ValueError(f"{len(sources)} sources for {len(vectors)} embeddings")
    return vectors, metadata_json


def check_identity_fields(identity_id: Any, display_name: Any, metadata: Any) -> str | None:
    """The checks an identity's own fields get (id, display name, metadata), whether enrolled or imported; returns
    the metadata as JSON text (None when none is given)."""
    validate_identity_id(identity_id)
    if display_name is not None and (not isinstance(display_name, str) or len(display_name) > MAX_DISPLAY_NAME):
        raise InvalidParameter(f"display_name must be a string of at most {MAX_DISPLAY_NAME} characters")
    if display_name is not None and (problem := text_problem(display_name)):
        raise InvalidParameter(f"display_name holds {problem}")
    return None if metadata is None else metadata_text(metadata)


def metadata_text(metadata: Any) -> str:
    if not isinstance(metadata, dict):
        raise InvalidParameter("metadata must be a JSON object")
    if json_depth_exceeds(metadata, MAX_METADATA_DEPTH):
        raise InvalidParameter(f"metadata nests deeper than {MAX_METADATA_DEPTH} levels")
    if problem := text_problem(metadata):
        raise InvalidParameter(f"metadata holds {problem}")
    try:
        text = json.dumps(metadata, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidParameter(f"metadata is not JSON-serialisable: {exc}") from None
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise InvalidParameter(f"metadata exceeds {MAX_METADATA_BYTES} bytes as JSON")
    return text


def identity_from_row(row: tuple) -> Identity:
    identity_id, display_name, metadata, created_at, current, foreign = row
    return Identity(
        identity_id=identity_id,
        display_name=display_name,
        metadata=json.loads(metadata) if metadata else {},
        created_at=created_at,
        face_count=current,
        foreign_face_count=foreign,
    )


class Gallery(GalleryStore):
    """The embedded store: one SQLite file, one process (see the module's docstring)."""

    concurrency = 1  # one connection, one lock: a second thread would only wait

    def __init__(self, path: str | Path, model_sha256: str, embedding_size: int, *,
                 earlier_ids: Sequence[str] = (), index: IndexOptions | None = None):
        """model_sha256: the embedder's model id (service.onnx_model.model_identity). earlier_ids: ids the same
        network's faces were tagged with before (older releases keyed them by the whole file's sha256); such
        faces are re-tagged as this model's when the gallery opens. index: how to use the ANN index (see "Index"
        below); None searches exactly and builds none (what `open_gallery` passes comes from the settings)."""
        if not model_sha256:
            raise ValueError("model_sha256 is required: it keeps embeddings of different models apart")
        self.path = Path(path)
        self.model_sha256 = model_sha256
        self.embedding_size = int(embedding_size)
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per operation.
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        # WAL lets a read-only connection of another thread scan the file beside this one's writes: start-up's
        # whole-table checks run so (`_reading_beside`), after the service is ready. Without it they run inline.
        self._wal = mode.lower() == "wal"
        self._readers_open: set[sqlite3.Connection] = set()  # of `_reading_beside`, changed under the lock
        self._purge_pending = False
        self._checker: threading.Thread | None = None
        if not self._wal:  # e.g. a network file system; rollback journal + FULL is still durable
            log.warning(
                "gallery %s: journal mode is %s, not WAL (the file system refused it)", self.path, mode
            )
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(_SCHEMA)
        self._retag(earlier_ids)
        self._id = self._gallery_id()
        self._index = index if index is not None and index.enabled else None
        self._snap: Snapshot | None = None
        self._retired = np.zeros(0, dtype=bool)  # snapshot rows no longer current (changed or deleted since)
        self._retired_count = 0
        self._touched: set[str] | None = None  # identities changed while a build copies the templates
        self._builder: threading.Thread | None = None
        self._retry_at = 0.0  # time.monotonic() before which no build starts (one has just failed)
        self._closing = threading.Event()
        self._open()

    # -- in-memory index -------------------------------------------------------------------------------------
    # One row per searchable identity: the sum of its current-model face embeddings (`_sums`), that sum's length
    # (`_norms`) and its face count. The identity's template is sum / norm, so a query's similarity to it is
    # (q . sum) / norm: one matrix product over identities, not faces.

    def _retag(self, earlier_ids: Sequence[str]) -> None:
        others = sorted({s for s in earlier_ids if s and s != self.model_sha256})
        marks = ",".join("?" * len(others))
        # Usually nothing to move: look first (faces_by_model), so that a start does not write and fsync for nothing.
        if not others or self._db.execute(
            f"SELECT 1 FROM faces WHERE model_sha256 IN ({marks}) LIMIT 1", others
        ).fetchone() is None:
            return
        with self._transaction() as db:
            moved = db.execute(
                f"UPDATE faces SET model_sha256 = ? WHERE model_sha256 IN ({marks})", (self.model_sha256, *others)
            ).rowcount
        if moved:
            log.warning(
                "gallery %s: %d faces tagged with an earlier id of this same network (%s) re-tagged as model %s",
                self.path, moved, ", ".join(s[:12] for s in others), self.model_sha256[:12],
            )

    # -- Index ----------------------------------------------------------------------------------------------
    # With an index (service/template_index.py), the templates live in two parts. The *snapshot*: the templates
    # as of the last build, memory-mapped from `<gallery.db>.index/` with a faiss index over them; rows that
    # changed since are marked retired. The *delta*: the in-memory matrix above (`_sums`...), holding only the
    # identities enrolled, changed or added since the build; it is always searched exactly. A search takes the
    # index's candidates among the live snapshot rows, scores them exactly with the same float32 sums and norms
    # exact search uses, and merges them with the delta's scores, so that every identity found has exactly its
    # exact-search similarity, and a deleted or changed identity's old template is never returned.
    # Without a usable snapshot (none yet, another model, files corrupt or stale, gallery below
    # `min_identities`) everything is in the delta, which is exact search as without an index; a background
    # thread builds a snapshot once the gallery is large enough, or when the delta has grown past
    # `rebuild_fraction` of the snapshot, while searches go on.
    # Start-up with a snapshot reads no face blobs but those of identities changed since the build: the
    # `template_changes` log (triggers on `faces`, on while a snapshot exists) names them.

    def _open(self) -> None:
        started = time.perf_counter()
        # What this connection has read: a commit by any other connection (another server on the same file, an
        # import while the server runs) changes it. See `_written_elsewhere`.
        self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
        self._warned_elsewhere = False
        # Identities' names and existence are read from the database when needed, not held in memory: a
        # dictionary of them cost start-up time and memory in proportion to the gallery.
        self._reset_delta(0)
        self._faces = 0
        self._foreign_at_open: int | None = None
        source = "an index snapshot"
        if self._index is None or not self._open_snapshot():
            source = "every face"
            if self._index is not None:
                # No usable snapshot: nothing needs the log until the next build starts it again. (Without an
                # index, a snapshot another process uses stays valid: the log goes on.)
                self._stop_change_log()
            self._load()
        if self._snap is not None and self._wal:
            # The database's own totals (every face, every identity: whole-index scans, ~1 GB of reading at 10M
            # faces, most of a cold start-up) are counted after the service is ready, beside it.
            log.info("gallery %s: %d identities searchable with %d faces of model %s, loaded from %s in %.2f s; "
                     "checking the database's totals against it in the background", self.path,
                     self.count_searchable_identities(), self._faces, self.model_sha256[:12], source,
                     time.perf_counter() - started)
            self._checker = threading.Thread(target=self._check_snapshot, name="gallery-check", daemon=True)
            self._checker.start()
        else:
            log.info(
                "gallery %s: %d identities, %d searchable with %d faces of model %s, loaded from %s in %.2f s "
                "(%d faces of other models)",
                self.path,
                self.count_identities(),
                self.count_searchable_identities(),
                self._faces,
                self.model_sha256[:12],
                source,
                time.perf_counter() - started,
                self.count_foreign() if self._foreign_at_open is None else self._foreign_at_open,
            )
        self._maybe_rebuild()

    def _reset_delta(self, rows: int) -> None:
        d = self.embedding_size
        self._sums = np.zeros((max(1024, rows), d), dtype=np.float32)
        self._norms = np.zeros(len(self._sums), dtype=np.float32)
        self._counts = np.zeros(len(self._sums), dtype=np.int64)
        self._row_of: dict[str, int] = {}
        self._row_ids: list[str] = []

    def _load(self) -> None:
        """Every current-model face, summed into the in-memory matrix."""
        d = self.embedding_size
        m = self._db.execute(
            "SELECT COUNT(DISTINCT identity_id) FROM faces WHERE model_sha256 = ?", (self.model_sha256,)
        ).fetchone()[0]
        self._reset_delta(m)
        # Streamed in batches straight into the sums: a million rows as Python bytes objects, or a float64 copy of
        # the matrix, would each need another gigabyte or more.
        cursor = self._db.execute(
            "SELECT face_id, identity_id, embedding FROM faces WHERE model_sha256 = ? ORDER BY rowid",
            (self.model_sha256,),
        )
        while batch := cursor.fetchmany(10_000):
            bad = [face_id for face_id, _, blob in batch if len(blob) != 4 * d]
            if bad:
                raise ModelError(
                    f"{self.path}: embeddings recorded for model {self.model_sha256[:12]} are not {d} float32 "
                    "values; the gallery is corrupt",
                    details={"face_ids": bad[:10]},
                )
            vectors = np.frombuffer(b"".join(blob for _, _, blob in batch), dtype="<f4").reshape(-1, d)
            rows = np.fromiter((self._row(identity_id) for _, identity_id, _ in batch), np.int64, len(batch))
            np.add.at(self._sums, rows, vectors)
            np.add.at(self._counts, rows, 1)
            self._faces += len(batch)
        n = len(self._row_ids)
        # einsum, not linalg.norm: the latter squares the whole matrix into a temporary as large as itself.
        self._norms[:n] = np.sqrt(np.einsum("ij,ij->i", self._sums[:n], self._sums[:n]))

    def _gallery_id(self) -> str:
        row = self._db.execute("SELECT id FROM gallery_id").fetchone()
        if row is None:  # once per database file (a database from before this table gets one too)
            with self._transaction() as db:
                row = db.execute("SELECT id FROM gallery_id").fetchone()
                if row is None:
                    row = (uuid.uuid4().hex,)
                    db.execute("INSERT INTO gallery_id (id) VALUES (?)", row)
        return row[0]

    def _change_seq(self) -> int:
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'template_changes'").fetchone()
        return 0 if row is None else int(row[0])

    def _stop_change_log(self) -> None:
        """No snapshot in use: nothing needs the change log (a later build starts it again)."""
        if self._db.execute("SELECT 1 FROM template_log").fetchone() is None:
            return  # the usual case: nothing to write (and fsync) at start-up
        with self._transaction() as db:
            db.execute("DELETE FROM template_log")
            db.execute("DELETE FROM template_changes")

    def _start_change_log(self) -> int:
        """Log changes from now on (if not already); returns the sequence number the state now reflects."""
        if self._db.execute("SELECT 1 FROM template_log").fetchone() is None:
            with self._transaction() as db:
                db.execute("INSERT INTO template_log (on_since) VALUES (?)", (self._change_seq(),))
        return self._change_seq()

    def _open_snapshot(self) -> bool:
        """Use the persisted snapshot if it matches this database: same model, built at a point of the change log
        that is complete since; the identities changed since are read from the database into the delta."""
        folder = index_folder(self.path)
        try:
            snap = Snapshot.open(folder, self.model_sha256, self.embedding_size, self._id)
            if len(snap) < self._index.min_identities:
                raise SnapshotUnusable(f"{len(snap)} identities, below the index's minimum "
                                       f"{self._index.min_identities}")
            latest = self._change_seq()
            on = self._db.execute("SELECT MIN(on_since) FROM template_log").fetchone()[0]
            logged = self._db.execute("SELECT COUNT(*) FROM template_changes WHERE seq > ?", (snap.seq,)).fetchone()[0]
            if on is None or on > snap.seq or latest < snap.seq or logged != latest - snap.seq:
                raise SnapshotUnusable("the database changed in ways the index cannot account for (change log "
                                       "off or trimmed since its build, or the database is an older copy)")
            changed = [r[0] for r in self._db.execute(
                "SELECT DISTINCT identity_id FROM template_changes WHERE seq > ?", (snap.seq,))]
        except SnapshotUnusable as exc:
            identities = self.count_identities() if not (folder / MANIFEST).exists() else None
            if identities is not None and identities < max(self._index.min_identities, MIN_TEMPLATES):
                # The usual small gallery: no index is due, nothing to warn about.
                log.info("gallery %s: exact search (%d identities; the index is built from %d)", self.path,
                         identities, self._index.min_identities)
                return False
            log.warning("gallery %s: index not used: %s; exact search until it is rebuilt", self.path, exc)
            return False
        self._adopt(snap, changed, from_database=True)
        if not self._wal:  # no reader beside this connection: the check of `_check_snapshot`, here
            total, stored = self._face_totals(self._db)
            self._foreign_at_open = total - stored
            if stored != self._faces:
                self._drop_snapshot(stored)
                return False
        log.info("gallery %s: index %s of %d identities in use (%d identities changed since its build)",
                 self.path, snap.manifest.get("index"), len(snap), len(changed))
        return True

    def _face_totals(self, db: sqlite3.Connection) -> tuple[int, int]:
        """(every face, this model's faces), in one scan of the model index."""
        total, stored = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(model_sha256 = ?), 0) FROM faces", (self.model_sha256,)
        ).fetchone()
        return int(total), int(stored)

    def _drop_snapshot(self, stored: int) -> None:
        """The snapshot accounts for other faces than the database holds: searched exactly from now on (the
        caller loads every face), until a rebuild."""
        log.warning("gallery %s: index not used: it accounts for %d faces, the database holds %d; exact search "
                    "until it is rebuilt", self.path, self._faces, stored)
        self._snap, self._retired, self._retired_count, self._faces = None, np.zeros(0, bool), 0, 0
        self._reset_delta(0)

    def _check_snapshot(self) -> None:
        """After a start from a snapshot: the database's count of this model's faces must be the snapshot's, as
        the change log has brought it up to date. The log is written by triggers, whoever writes, so they agree
        unless the file was changed around them (triggers dropped, rows restored from elsewhere); then the
        snapshot is dropped and every face loaded, as a start-up without one would. Runs in its own thread on a
        read-only connection of its own, which sees the database exactly as `_faces` describes it: its read
        transaction starts while the lock keeps every write out."""
        try:
            with self._reading_beside() as reader:
                with self._lock:
                    if self._closing.is_set() or self._snap is None:
                        return
                    reader.execute("BEGIN")
                    reader.execute("SELECT COUNT(*) FROM gallery_id").fetchone()  # the read snapshot starts here
                    snap, expected = self._snap, self._faces
                total, stored = self._face_totals(reader)
                identities = reader.execute("SELECT COUNT(*) FROM identities").fetchone()[0]
                reader.execute("COMMIT")
        except sqlite3.Error as exc:  # interrupted by close(), or the file is unreadable
            if not self._closing.is_set():
                log.warning("gallery %s: the check of the index against the database failed: %s", self.path, exc)
            return
        if stored == expected:
            log.info("gallery %s: checked: the database holds %d identities and %d faces of model %s, as the "
                     "index accounts for (%d faces of other models)", self.path, identities, stored,
                     self.model_sha256[:12], total - stored)
            return
        with self._lock:
            if self._closing.is_set() or self._snap is not snap:
                return
            self._drop_snapshot(stored)
            self._stop_change_log()
            self._load()
        self._maybe_rebuild()

    def wait_for_check(self, timeout: float | None = None) -> None:
        """Wait for the start-up check of the index against the database (`_check_snapshot`), if one runs."""
        checker = self._checker
        if checker is not None:
            checker.join(timeout)

    @contextmanager
    def _reading_beside(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection of its own, for a whole-table scan in another thread while this connection
        serves (WAL: readers and the writer do not wait for each other). A delete's TRUNCATE checkpoint would
        wait for it (up to the busy timeout, the lock held): it is deferred until the last such reader closes."""
        if not self._wal:
            with self._lock:
                yield self._db
            return
        reader = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False,
                                 timeout=10, isolation_level=None)
        with self._lock:
            self._readers_open.add(reader)
        try:
            yield reader
        finally:
            with self._lock:
                self._readers_open.discard(reader)
                reader.close()
                if not self._readers_open and self._purge_pending and not self._closing.is_set():
                    self._purge_wal()

    def _adopt(self, snap: Snapshot, changed: Iterable[str], *, from_database: bool) -> None:
        """Make `snap` the snapshot. `changed`: identities whose template may differ from the snapshot's, taken
        into the delta from the database (at start-up) or from the templates in memory (after a build)."""
        current = {}
        if not from_database:
            current = {identity_id: self._current(identity_id) for identity_id in changed}
            changed = current.keys()
        self._snap = snap
        self._retired = np.zeros(len(snap), dtype=bool)
        self._retired_count = 0
        self._faces = snap.faces
        self._reset_delta(0)
        for identity_id in changed:
            self._faces -= self._retire(identity_id)
            if from_database:  # summed as `_load` sums, so that a restart gives what a full load would
                faces = self._stored_faces(identity_id)
                found = (np.add.reduce(faces, axis=0, dtype=np.float32), len(faces)) if len(faces) else None
            else:
                found = current[identity_id]
            if found is not None and found[1] > 0:
                self._set_delta(identity_id, np.asarray(found[0], dtype=np.float32), int(found[1]))
                self._faces += int(found[1])
                if from_database:
                    row = self._row_of[identity_id]
                    self._norms[row] = np.sqrt(np.einsum("i,i->", self._sums[row], self._sums[row]))

    def _current(self, identity_id: str) -> tuple[np.ndarray, int] | None:
        """The identity's template sum (float32, D) and face count, wherever it lives; None when it has none."""
        row = self._row_of.get(identity_id)
        if row is not None:
            return self._sums[row], int(self._counts[row])
        if self._snap is not None:
            row = self._snap.row_of(identity_id)
            if row is not None and not self._retired[row]:
                return self._snap.sums[row], int(self._snap.counts[row])
        return None

    def _retire(self, identity_id: str) -> int:
        """The snapshot's template of the identity is no longer current; returns the faces it counted (the callers
        keep `_faces`)."""
        if self._snap is None:
            return 0
        row = self._snap.row_of(identity_id)
        if row is None or self._retired[row]:
            return 0
        self._retired[row] = True
        self._retired_count += 1
        return int(self._snap.counts[row])

    def _touch(self, identity_id: str) -> None:
        if self._touched is not None:
            self._touched.add(identity_id)

    def _maybe_rebuild(self) -> None:
        """Start a background build when the gallery is large enough for an index and has none, or when the
        identities searched exactly beside it (new or changed since the build) have grown too many."""
        options = self._index
        if options is None or not options.build or self._closing.is_set():
            return
        with self._lock:  # checked and started under the lock: two writers never start two builds
            if self._builder is not None and self._builder.is_alive() or time.monotonic() < self._retry_at:
                return
            if self.count_searchable_identities() < max(options.min_identities, MIN_TEMPLATES):
                return
            if self._written_elsewhere():
                return
            if self._snap is not None and (
                len(self._row_ids) + self._retired_count <= options.rebuild_fraction * len(self._snap)
            ):
                return
            self._builder = threading.Thread(target=self._build, name="gallery-index", daemon=True)
            self._builder.start()

    def _build(self) -> None:
        """Copy every template (sorted by id) into a new snapshot a chunk at a time, build its index, persist it,
        and switch to it. Searches and writes go on meanwhile (the lock is taken per chunk); an identity changed
        after the copy began is `_touch`ed and taken from memory when switching."""
        started = time.perf_counter()
        writer = None
        try:
            with self._lock:
                seq = self._start_change_log()
                ids = self._searchable_ids()
                self._touched = set()
                in_use = self._snap.manifest["tag"] if self._snap is not None else None
            # Files of builds killed before their commit (kill -9, the OOM killer) would otherwise pile up, one set
            # per attempt, until a build completes.
            remove_other_tags(index_folder(self.path), keep=in_use)
            ids.sort()  # byte order = SQLite's and numpy's order of these ASCII ids
            log.info("gallery %s: building the ANN index of %d identity templates in the background; exact search "
                     "meanwhile", self.path, len(ids))
            writer = SnapshotWriter(index_folder(self.path), len(ids), self.embedding_size,
                                    max(map(len, ids), default=1))
            chunk = 20_000  # rows copied per hold of the lock: a search waits at most a few ms for a copy
            for start in range(0, len(ids), chunk):
                if self._closing.is_set():
                    writer.abandon()
                    return
                part = ids[start:start + chunk]
                with self._lock:
                    writer.put(start, part, *self._gather(part))
            last = [time.perf_counter()]

            def progress(done: int, total: int, phase: str) -> None:
                if time.perf_counter() - last[0] >= 10 or done in (0, total):
                    last[0] = time.perf_counter()
                    log.info("gallery %s: index build: %s, %d / %d templates (%.0f %%), %.0f s", self.path, phase,
                             done, total, 100 * done / max(1, total), time.perf_counter() - started)

            index = writer.build_index(available_threads(), progress, self._closing.is_set)
            if index is None:
                writer.abandon()
                return
            with self._lock:  # close() takes the lock to close the connection: checked before, used after
                stale = self._closing.is_set() or self._written_elsewhere()
            if stale:
                writer.abandon()
                return
            writer.commit(index, {"model_sha256": self.model_sha256, "embedding_size": self.embedding_size,
                                  "gallery_id": self._id, "seq": seq,
                                  "build_seconds": round(time.perf_counter() - started, 1)})
            snap = Snapshot.open(index_folder(self.path), self.model_sha256, self.embedding_size, self._id)
            with self._lock:
                if self._closing.is_set():
                    return
                touched, self._touched = self._touched or set(), None
                faces = self._faces
                self._adopt(snap, touched, from_database=False)
                if faces != self._faces:  # a bug, not a user's problem: say so, keep serving
                    log.error("gallery %s: face count %d after switching to the index, %d before", self.path,
                              self._faces, faces)
                with self._transaction() as db:
                    db.execute("DELETE FROM template_changes WHERE seq <= ?", (snap.seq,))
            log.info("gallery %s: ANN index of %d identities built in %.1f s and in use (%s)", self.path, len(snap),
                     time.perf_counter() - started, snap.manifest["index"])
        except Exception:
            log.exception("gallery %s: index build failed; exact search goes on (next try in %.0f s at the "
                          "earliest, or at the next start)", self.path, RETRY_AFTER_FAILURE_S)
            self._retry_at = time.monotonic() + RETRY_AFTER_FAILURE_S
            if writer is not None:
                writer.abandon()
        finally:
            with self._lock:
                self._touched = None

    def _written_elsewhere(self) -> bool:
        """Whether another connection has committed to the file since this one loaded it. Its templates in memory
        may then miss those changes, and a snapshot built from them would be stamped with a change number that
        claims them: after a restart a deleted identity would be searched again and an enrolment never, for good
        (one process owns a SQLite gallery: module docstring). So no snapshot is built until a restart reloads."""
        if self._db.execute("PRAGMA data_version").fetchone()[0] == self._data_version:
            return False
        if not self._warned_elsewhere:
            self._warned_elsewhere = True
            log.error("gallery %s: another process has written to this gallery file since this one opened it (one "
                      "process owns a SQLite gallery); this process does not see those changes and builds no index "
                      "until it is restarted", self.path)
        return True

    def _searchable_ids(self) -> list[str]:
        ids = list(self._row_ids)
        if self._snap is not None:
            live = np.flatnonzero(~self._retired)
            ids += [b.decode() for b in self._snap.ids[live].tolist()]
        return ids

    def _gather(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sums, norms, counts) of these identities as searched now; zeros for one that has gone (it was
        touched, and the switch retires it)."""
        sums = np.zeros((len(ids), self.embedding_size), dtype=np.float32)
        norms = np.zeros(len(ids), dtype=np.float32)
        counts = np.zeros(len(ids), dtype=np.int64)
        delta = np.array([self._row_of.get(i, -1) for i in ids], dtype=np.int64)
        here = np.flatnonzero(delta >= 0)
        sums[here], norms[here], counts[here] = self._sums[delta[here]], self._norms[delta[here]], self._counts[delta[here]]
        if self._snap is not None and len(here) < len(ids):
            rest = np.flatnonzero(delta < 0)
            width = self._snap.ids.dtype.itemsize
            rest = np.array([j for j in rest if len(ids[j]) <= width], dtype=np.int64)  # longer: not in it
            keys = np.array([ids[j].encode() for j in rest], dtype=self._snap.ids.dtype)
            rows = np.minimum(np.searchsorted(self._snap.ids, keys), len(self._snap) - 1)
            hit = (self._snap.ids[rows] == keys) & ~self._retired[rows]
            rest, rows = rest[hit], rows[hit]
            sums[rest], norms[rest], counts[rest] = self._snap.sums[rows], self._snap.norms[rows], self._snap.counts[rows]
        return sums, norms, counts

    def _row(self, identity_id: str) -> int:
        """The identity's template row, appended (empty) if it has none; the matrices grow by doubling."""
        row = self._row_of.get(identity_id)
        if row is None:
            row = len(self._row_ids)
            self._reserve(row + 1)
            self._row_of[identity_id] = row
            self._row_ids.append(identity_id)
        return row

    def _reserve(self, rows: int) -> None:
        """Room for `rows` template rows, doubling the capacity as often as needed."""
        capacity = len(self._sums)
        if rows <= capacity:
            return
        while capacity < rows:
            capacity *= 2
        for name in ("_sums", "_norms", "_counts"):
            old = getattr(self, name)
            grown = np.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
            grown[: len(old)] = old
            setattr(self, name, grown)

    def _set_template(self, identity_id: str, total: np.ndarray, count: int) -> None:
        """Make the identity's template the given sum of `count` faces; no faces removes it from search."""
        self._touch(identity_id)
        self._retire(identity_id)
        if count == 0:
            self._drop_template(identity_id)
            return
        self._set_delta(identity_id, total, count)

    def _set_delta(self, identity_id: str, total: np.ndarray, count: int) -> None:
        row = self._row(identity_id)
        self._sums[row] = total
        self._counts[row] = count
        self._norms[row] = np.linalg.norm(total.astype(np.float64))

    def _drop_template(self, identity_id: str) -> None:
        """Remove an identity's row by moving the last row into it (O(D), not O(N)); the freed row is zeroed, so
        no trace of a deleted face stays in memory."""
        self._touch(identity_id)
        self._retire(identity_id)
        row = self._row_of.pop(identity_id, None)
        if row is None:
            return
        last = len(self._row_ids) - 1
        if row != last:
            moved = self._row_ids[last]
            self._touch(moved)  # a build may have copied its old row already
            self._sums[row], self._norms[row], self._counts[row] = self._sums[last], self._norms[last], self._counts[last]
            self._row_ids[row] = moved
            self._row_of[moved] = row
        self._sums[last] = 0.0
        self._norms[last] = 0.0
        self._counts[last] = 0
        self._row_ids.pop()

    def _stored_faces(self, identity_id: str) -> np.ndarray:
        """The identity's current-model embeddings as stored (k, D)."""
        blobs = [
            blob
            for (blob,) in self._db.execute(
                "SELECT embedding FROM faces WHERE identity_id = ? AND model_sha256 = ? ORDER BY rowid",
                (identity_id, self.model_sha256),
            )
        ]
        return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(-1, self.embedding_size)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. The COMMIT is inside the try: a COMMIT that fails (disk full, I/O error,
        busy) can leave the transaction open, and then every later BEGIN fails and this connection keeps
        reading rows the in-memory matrix never got. Callers change the matrix only after a clean exit."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        if not self._db.in_transaction:  # SQLite already rolled back by itself (it does on some I/O errors)
            return
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            # Raise the original error, not this one; it is the cause. A connection that cannot roll back
            # is broken and later writes will fail (logged) until a restart reopens the file.
            log.exception("gallery %s: ROLLBACK failed", self.path)

    # -- writes -----------------------------------------------------------------------------------------------

    def _write_enrolment(self, enrolment: Enrolment) -> None:
        identity_id, display_name = enrolment.identity_id, enrolment.display_name
        metadata_json, vectors, now = enrolment.metadata_json, enrolment.vectors, enrolment.created_at
        rows = enrolment.rows(self.model_sha256, lambda v: v.astype("<f4").tobytes())
        with self._lock:
            # The template after this enrolment, checked before anything is written.
            found = self._current(identity_id)
            previous = (found[0].astype(np.float64), found[1]) if found is not None else (0.0, 0)
            total = previous[0] + vectors.astype(np.float64).sum(axis=0)
            if problem := cancelling(total, previous[1] + len(vectors)):
                raise problem
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO identities (id, display_name, metadata, created_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET "
                    "display_name = COALESCE(excluded.display_name, identities.display_name), "
                    "metadata = CASE WHEN ? THEN excluded.metadata ELSE identities.metadata END",
                    (identity_id, display_name, metadata_json or "{}", now, metadata_json is not None),
                )
                db.executemany(
                    "INSERT INTO faces (face_id, identity_id, model_sha256, embedding, created_at, source) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
            # Committed: only now does the in-memory index change, so it never holds what the disk lacks.
            self._set_template(identity_id, total.astype(np.float32), previous[1] + len(vectors))
            self._faces += len(vectors)
        self._maybe_rebuild()

    def _write_new_identities(self, batch: CheckedImport) -> int:
        with self._lock:
            existing = self._existing(batch.identity_ids)
            batch = batch.only([i not in existing for i in batch.identity_ids])
            if not batch.identity_ids:
                return 0
            blob = memoryview(batch.vectors.astype("<f4").tobytes())  # each face's BLOB a slice of it, not a copy
            step = 4 * self.embedding_size
            now, model = batch.created_at, self.model_sha256
            with self._transaction() as db:
                db.executemany(
                    "INSERT INTO identities (id, display_name, metadata, created_at) VALUES (?, ?, ?, ?)",
                    zip(batch.identity_ids, batch.display_names, batch.metadata_json, itertools.repeat(now)),
                )
                db.executemany(
                    "INSERT INTO faces (face_id, identity_id, model_sha256, embedding, created_at, source) "
                    "VALUES (?, ?, ?, ?, ?, NULL)",
                    (
                        (face_id, owner, model, blob[i * step:(i + 1) * step], now)
                        for i, (face_id, owner) in enumerate(zip(batch.face_ids, batch.face_owners()))
                    ),
                )
            # Committed: the new identities' templates, appended in one go (none of them had a row).
            first, needed = len(self._row_ids), len(self._row_ids) + len(batch.identity_ids)
            self._reserve(needed)
            self._sums[first:needed] = batch.template_sums()
            self._counts[first:needed] = batch.counts
            stored = self._sums[first:needed].astype(np.float64)
            self._norms[first:needed] = np.sqrt(np.einsum("ij,ij->i", stored, stored))
            self._row_of.update(zip(batch.identity_ids, range(first, needed)))
            self._row_ids.extend(batch.identity_ids)
            self._faces += len(batch.face_ids)
            if self._touched is not None:
                self._touched.update(batch.identity_ids)
        self._maybe_rebuild()
        return len(batch.identity_ids)

    def delete_identity(self, identity_id: str) -> int:
        """Remove an identity with all its faces (every model's); returns how many faces went."""
        validate_identity_id(identity_id)
        with self._lock:
            with self._transaction() as db:
                face_ids = [
                    r[0]
                    for r in db.execute("SELECT face_id FROM faces WHERE identity_id = ?", (identity_id,))
                ]
                db.execute("DELETE FROM faces WHERE identity_id = ?", (identity_id,))
                if db.execute("DELETE FROM identities WHERE id = ?", (identity_id,)).rowcount == 0:
                    raise identity_missing(identity_id)
            found = self._current(identity_id)
            self._faces -= 0 if found is None else found[1]
            self._drop_template(identity_id)
            self._purge_wal()
        self._maybe_rebuild()
        return len(face_ids)

    def delete_face(self, identity_id: str, face_id: str) -> None:
        """Remove one face of an identity (the identity stays, possibly with no faces)."""
        validate_identity_id(identity_id)
        with self._lock:
            with self._transaction() as db:
                cursor = db.execute(
                    "DELETE FROM faces WHERE face_id = ? AND identity_id = ?", (face_id, identity_id)
                )
                if cursor.rowcount == 0:
                    raise face_missing(identity_id, face_id, bool(self._existing([identity_id])))
            # Rebuilt from what is stored, not subtracted: no rounding drift, and a face of another model
            # (never in the template) changes nothing.
            remaining = self._stored_faces(identity_id)
            found = self._current(identity_id)
            self._faces += len(remaining) - (0 if found is None else found[1])
            self._set_template(identity_id, remaining.astype(np.float64).sum(axis=0).astype(np.float32), len(remaining))
            self._purge_wal()
        self._maybe_rebuild()

    def _purge_wal(self) -> None:
        # Old versions of the erased pages still sit in the WAL until a checkpoint copies the zeroed pages
        # back and TRUNCATE empties the log.
        if self._readers_open:  # a scan of `_reading_beside` holds old pages; the checkpoint runs when it ends
            self._purge_pending = True
            return
        self._purge_pending = False
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # busy with a reader elsewhere; the next checkpoint completes it
            log.warning("gallery %s: WAL checkpoint after delete failed: %s", self.path, exc)

    # -- reads ------------------------------------------------------------------------------------------------

    def _list_identities(self, offset: int, limit: int) -> tuple[list[Identity], int]:
        with self._lock:
            total = self._db.execute("SELECT COUNT(*) FROM identities").fetchone()[0]
            rows = self._db.execute(
                "SELECT i.id, i.display_name, i.metadata, i.created_at, "
                "  (SELECT COUNT(*) FROM faces f WHERE f.identity_id = i.id AND f.model_sha256 = ?), "
                "  (SELECT COUNT(*) FROM faces f WHERE f.identity_id = i.id AND f.model_sha256 != ?) "
                "FROM identities i ORDER BY i.id LIMIT ? OFFSET ?",
                (self.model_sha256, self.model_sha256, limit, offset),
            ).fetchall()
        return [identity_from_row(row) for row in rows], total

    def _export_page(self, after: str, limit: int) -> list[ImportedIdentity]:
        with self._lock:
            identities = self._db.execute(
                "SELECT id, display_name, metadata FROM identities WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
            ).fetchall()
            if not identities:
                return []
            faces = self._db.execute(
                "SELECT identity_id, embedding FROM faces WHERE identity_id BETWEEN ? AND ? AND model_sha256 = ? "
                "ORDER BY identity_id, created_at, rowid",
                (identities[0][0], identities[-1][0], self.model_sha256),
            ).fetchall()
        return exported(identities, faces, self.model_sha256, self.embedding_size)

    def get_identity(self, identity_id: str) -> Identity:
        validate_identity_id(identity_id)
        with self._lock:
            row = self._db.execute(
                "SELECT id, display_name, metadata, created_at, 0, 0 FROM identities WHERE id = ?",
                (identity_id,),
            ).fetchone()
            if row is None:
                raise identity_missing(identity_id)
            stored = self._db.execute(
                "SELECT face_id, model_sha256, created_at, source FROM faces WHERE identity_id = ? "
                "ORDER BY created_at, rowid",
                (identity_id,),
            ).fetchall()
        return identity_with_faces(row, stored, self.model_sha256)

    def count_identities(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM identities").fetchone()[0]

    def identities_with_suspect_text(self, problem: Callable[[Any], str | None]) -> list[str]:
        """Ids of identities whose display name or metadata `problem` refuses, in id order. Metadata is stored as
        JSON written with ASCII escapes, so a lone surrogate or NUL in it reads `\\u`; a display name can hold
        one only outside ASCII or as a NUL. Only the rows SQL finds so are decoded and checked. A scan of every
        identity, read beside the gallery's connection: searches and writes go on meanwhile."""
        with self._reading_beside() as reader:
            rows = reader.execute(
                "SELECT id, display_name, metadata FROM identities WHERE instr(metadata, '\\u') > 0 "
                "OR instr(display_name, char(0)) > 0 OR display_name GLOB ? ORDER BY id",
                ("*[^ -~]*",),
            ).fetchall()
        return [i for i, name, metadata in rows if problem([name, json.loads(metadata) if metadata else {}])]

    def count_faces(self) -> int:
        """Faces searchable with the current model."""
        with self._lock:
            return self._faces

    def count_searchable_identities(self) -> int:
        """Identities with at least one face of the current model: how many a search compares a probe with,
        which is what sets the chance of naming a stranger (the 1:N decision policy needs it)."""
        with self._lock:
            return len(self._row_ids) + (len(self._snap) - self._retired_count if self._snap is not None else 0)

    def count_foreign(self) -> int:
        """Faces enrolled with another model: kept on disk, never compared with the current model's."""
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM faces WHERE model_sha256 != ?", (self.model_sha256,)
            ).fetchone()[0]

    def _search(self, q: np.ndarray, top_k: int, threshold: float | None) -> list[list[Match]]:
        results: list[list[Match]] = []
        with self._lock:
            if self._snap is not None:
                return [self._search_indexed(query, top_k, threshold) for query in q]
            n = len(self._row_ids)
            if n == 0:
                return [[] for _ in range(len(q))]
            # A template of no length (faces that cancelled out after a deletion) scores 0, not NaN.
            sums, norms = self._sums[:n], np.maximum(self._norms[:n], 1e-12)
            chunk = max(1, _SCORE_BUDGET // n)
            for start in range(0, len(q), chunk):
                scores = (q[start : start + chunk] @ sums.T) / norms  # (m, n) cosine to each template
                results.extend(self._top(query, row, top_k, threshold) for query, row in zip(q[start:], scores))
        return results

    def _search_indexed(self, query: np.ndarray, top_k: int, threshold: float | None) -> list[Match]:
        """One query: the index's candidates among the snapshot's live rows and every delta row, all scored
        exactly as `_search` scores them without an index (one query's row times the float32 sums, over the
        norms), then the same selection."""
        snap, options = self._snap, self._index
        q = query[None, :]
        rows = np.sort(snap.candidates(q, max(options.candidates, top_k), options.nprobe))
        rows = rows[~self._retired[rows]]
        n = len(self._row_ids)
        scores = exact_similarities(snap.sums[rows], snap.norms[rows], query)
        if n:  # identities changed since the build (the delta rows), scored beside the index's candidates
            delta = shortlist((q @ self._sums[:n].T)[0] / np.maximum(self._norms[:n], 1e-12), top_k, threshold)
            scores = np.concatenate([scores, exact_similarities(self._sums[delta], self._norms[delta], query)])
        found = []
        for i in pick(scores, top_k, threshold):
            if i < len(rows):
                identity_id, faces = snap.id_at(int(rows[i])), int(snap.counts[rows[i]])
            else:
                row = int(delta[i - len(rows)])
                identity_id, faces = self._row_ids[row], int(self._counts[row])
            found.append((identity_id, scores[i], faces))
        return self._matches(found)

    def _template_total(self, identity_id: str) -> np.ndarray | None:
        with self._lock:
            if not self._existing([identity_id]):
                raise identity_missing(identity_id)
            found = self._current(identity_id)
            return None if found is None else np.array(found[0])

    @property
    def index_in_use(self) -> bool:
        """Whether searches go through the ANN index now (False: exact search over every template)."""
        with self._lock:
            return self._snap is not None

    def wait_for_index(self, timeout: float | None = None) -> bool:
        """Wait for a background index build, if one runs; returns `index_in_use`. (Tests and benchmarks.)"""
        builder = self._builder
        if builder is not None:
            builder.join(timeout)
        return self.index_in_use

    def _top(self, query: np.ndarray, scores: np.ndarray, top_k: int, threshold: float | None) -> list[Match]:
        """Top identities for one query, from its float32 template scores: a shortlist by those, then exact
        similarities (`exact_similarities`) decide."""
        rows = shortlist(scores, top_k, threshold)
        exact = exact_similarities(self._sums[rows], self._norms[rows], query)
        chosen = pick(exact, top_k, threshold)
        rows, exact = rows[chosen], exact[chosen]
        return self._matches([(self._row_ids[row], similarity, int(self._counts[row]))
                              for row, similarity in zip(rows, exact)])

    def _matches(self, found: list[tuple[str, float, int]]) -> list[Match]:
        """Matches from (identity id, exact similarity, faces), best first, with their display names."""
        names = self._display_names([identity_id for identity_id, _, _ in found])
        return [Match(identity_id=identity_id, similarity=min(1.0, max(-1.0, float(similarity))), faces=faces,
                      display_name=names.get(identity_id)) for identity_id, similarity, faces in found]

    def _display_names(self, ids: Sequence[str]) -> dict[str, str | None]:
        return dict(self._lookup("id, display_name", ids))

    def _existing(self, ids: Sequence[str]) -> set[str]:
        """Which of these identities exist."""
        return {row[0] for row in self._lookup("id", ids)}

    def _lookup(self, columns: str, ids: Sequence[str]) -> Iterator[tuple]:
        for start in range(0, len(ids), _ID_LOOKUP_CHUNK):
            chunk = list(ids[start : start + _ID_LOOKUP_CHUNK])
            yield from self._db.execute(
                f"SELECT {columns} FROM identities WHERE id IN ({','.join('?' * len(chunk))})", chunk)

    def close(self) -> None:
        self._closing.set()
        for reader in list(self._readers_open):  # a scan beside stops at once (sqlite3.OperationalError there)
            try:
                reader.interrupt()
            except sqlite3.ProgrammingError:  # it closed meanwhile
                pass
        builder = self._builder
        if builder is not None:
            # A build stops at its next step; one inside faiss's training cannot be interrupted, and is left
            # to finish on its own (a daemon thread: it does not keep the process alive).
            builder.join(timeout=10)
        with self._lock:
            self._db.close()


def pick(scores: np.ndarray, top_k: int, threshold: float | None) -> np.ndarray:
    """Positions of the top_k highest scores, best first (ties in position order), only those >= threshold when
    one is given. With a threshold, only the (usually few) rows above it are candidates: one comparison pass,
    much cheaper than a partition of the whole gallery."""
    if threshold is None:
        rows = np.argpartition(scores, len(scores) - top_k)[len(scores) - top_k :] if len(scores) > top_k else None
        rows = np.arange(len(scores)) if rows is None else rows
    else:
        rows = np.flatnonzero(scores >= threshold)
        if len(rows) > top_k:
            rows = rows[np.argpartition(scores[rows], len(rows) - top_k)[len(rows) - top_k :]]
    return rows[np.argsort(-scores[rows], kind="stable")]


# A float32 matrix product's rounding depends on how BLAS blocks it (a row's score can differ by ~1e-7 between a
# product over all templates and one over a few), so scores from the product only shortlist: SHORTLIST_SLACK
# below the threshold, SHORTLIST_EXTRA beyond top_k. What is returned and compared with the threshold is
# `exact_similarities`, computed row by row the same way whichever path (exact, index) shortlisted the row.
SHORTLIST_SLACK = 1e-4
SHORTLIST_EXTRA = 16


def shortlist(scores: np.ndarray, top_k: int, threshold: float | None) -> np.ndarray:
    return pick(scores, top_k + SHORTLIST_EXTRA, None if threshold is None else threshold - SHORTLIST_SLACK)


def exact_similarities(sums: np.ndarray, norms: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine of the query with each template (its float32 sum over its float32 norm), in float64, each row
    reduced on its own (numpy's pairwise sum along the row): the same value for a row whatever else is scored
    with it."""
    wide = np.asarray(sums, dtype=np.float64) * np.asarray(query, dtype=np.float64)
    return wide.sum(axis=1) / np.maximum(np.asarray(norms, dtype=np.float64), 1e-12)
