"""`python -m service.gallery_io import FILE` and `python -m service.gallery_io export FILE`: load identities with
their embeddings into the configured gallery in bulk, and write them out again (backups, moves between
instances of one model, watch-lists kept in another system).

Configured like the server (FACE_GALLERY_URL or FACE_GALLERY_PATH, FACE_MODELS_DIR, FACE_EMBEDDER_MODEL,
FACE_GALLERY_TIMEOUT_S): the embedder file gives the model id that faces are tagged with and the embedding size,
exactly as `python -m service` reads them.

The format, JSON Lines (one identity a line; blank lines are skipped):

    {"identity_id": "alice", "display_name": "Alice", "metadata": {...}, "model_sha256": "<model id>",
     "embeddings": ["<base64 of D little-endian float32>", [0.01, -0.2, ...], ...]}

display_name and metadata are optional; each embedding is a JSON list of numbers or base64 of float32 (what
`/embed` returns), L2-normalised (service.vectors.parse_embedding checks it); FILE `-` reads standard input. Or a
`.npy` matrix (N, D) with `--ids FILE` (one identity id a line, row i's id on line i; an id on several lines gives
that identity several faces) and `--model-sha256`. The model id must be the configured embedder's, or one of the
ids the same network had in older releases (the gallery re-tags those as well).

Import. Identities are written `--batch-size` at a time (default 10,000), each batch one transaction
(`GalleryStore.import_identities`), committed durably before the next is read. Identities the gallery already
holds are skipped whole, so an interrupted import (killed, a lost database) is finished by running the same
command again; the result is the gallery an uninterrupted run makes. Every line is checked as /enroll checks a
request (ids, display name, metadata, the embeddings' size, finiteness and length); embeddings of another model
are refused, since the gallery never compares across models. The first bad line stops the import with exit code
2, its line number in the message, and nothing of its batch written (batches before it are in). A SQLite gallery
is owned by one process: stop the server while importing into it (it would not see the new identities until its
next start). A PostgreSQL gallery can take an import while replicas serve; there the HNSW index's inserts bound the
rate, and `--defer-index` drops the model's index for the import and builds it once at the end (ten times faster
in BENCHMARKS.md; meanwhile searches scan every template, exact but slower).

Export writes the same JSON Lines (base64 embeddings, the current model's faces only; it says how many faces of
other models, and identities without a face of this model, it left out), to FILE.partial first and renamed to
FILE once complete, so a file named FILE is always a whole export (`-`: standard output). Face ids, creation
times and face sources are not part of the format (`service.gallery_copy` copies those, SQLite to PostgreSQL).

Exit codes: 0 done; 2 a bad line, bad arguments, or an unusable gallery or model; 130 interrupted (Ctrl-C: the
batch being written is rolled back, those before it stay).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sqlite3
import sys
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from service.errors import FaceServiceError
from service.gallery import GallerySetupError, GalleryStore, ImportedIdentity, open_gallery
from service.vectors import parse_embedding, to_base64

BATCH_SIZE = 10_000
_FIELDS = {"identity_id", "display_name", "metadata", "model_sha256", "embeddings"}


class BadInput(Exception):
    """A line (or row) of the input that cannot be imported; `where` names it for the message."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


# -- reading ----------------------------------------------------------------------------------------------------


def read_jsonl(
    stream: IO[bytes], model_sha256: str, size: int, name: str, earlier_ids: Collection[str] = ()
) -> Iterator[tuple[int, int, ImportedIdentity]]:
    """(line number, bytes read so far, identity) per line of JSON Lines; BadInput for a line that is not one
    identity (`name`: the input's name in its message). Embeddings tagged with one of `earlier_ids` (the same
    network's ids in older releases, which the gallery re-tags too) are taken as `model_sha256`'s."""
    position = 0
    for number, line in enumerate(stream, start=1):
        position += len(line)
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            item = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise BadInput(where, f"not JSON ({exc})") from None
        if not isinstance(item, dict):
            raise BadInput(where, "not a JSON object")
        if unknown := set(item) - _FIELDS:
            raise BadInput(where, f"unknown field(s) {sorted(unknown)}; expected {sorted(_FIELDS)}")
        for field in ("identity_id", "model_sha256", "embeddings"):
            if field not in item:
                raise BadInput(where, f"no {field!r}")
        if item["model_sha256"] != model_sha256 and item["model_sha256"] not in earlier_ids:
            raise BadInput(where, mismatch(item["model_sha256"], model_sha256))
        embeddings = item["embeddings"]
        if not isinstance(embeddings, list) or not embeddings:
            raise BadInput(where, "'embeddings' must be a non-empty list")
        try:
            vectors = np.stack([parse_embedding(e, size, f"embeddings[{j}]") for j, e in enumerate(embeddings)])
        except FaceServiceError as exc:
            raise BadInput(where, exc.message) from None
        yield number, position, ImportedIdentity(
            identity_id=item["identity_id"],
            embeddings=vectors,
            model_sha256=model_sha256,
            display_name=item.get("display_name"),
            metadata=item.get("metadata"),
        )


def read_npy(
    matrix_path: Path, ids_path: Path, model_sha256: str, size: int | None = None, block: int = BATCH_SIZE
) -> tuple[int, Iterator[tuple[int, int, ImportedIdentity]]]:
    """(number of rows, iterator of (line of the ids file, rows done, identity)) for a .npy matrix and its ids
    file. An id on several lines is one identity with several faces (in line order), at its first line."""
    try:
        matrix = np.load(matrix_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadInput(str(matrix_path), f"not a .npy matrix ({exc})") from None
    if matrix.ndim != 2 or matrix.dtype.kind != "f":
        raise BadInput(str(matrix_path), f"must be a 2-D float matrix (N, D), got {matrix.dtype} {matrix.shape}")
    if size is not None and matrix.shape[1] != size:
        raise BadInput(str(matrix_path), f"rows of {matrix.shape[1]} values; this model's embeddings have {size}")
    try:
        text = ids_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(str(ids_path), f"not UTF-8 text ({exc})") from None
    ids = [line.removesuffix("\r") for line in text.split("\n")]
    if text.endswith("\n"):
        ids.pop()
    if len(ids) != len(matrix):
        raise BadInput(str(ids_path), f"{len(ids)} ids for the {len(matrix)} rows of {matrix_path}")
    # Identities numbered in order of first appearance; their rows gathered by a stable sort (faces keep line order).
    number: dict[str, int] = {}
    group = np.fromiter((number.setdefault(i, len(number)) for i in ids), dtype=np.int64, count=len(ids))
    names = list(number)
    del number, ids
    order = np.argsort(group, kind="stable")
    sizes = np.bincount(group, minlength=len(names))
    ends = np.cumsum(sizes)

    def identities() -> Iterator[tuple[int, int, ImportedIdentity]]:
        for first in range(0, len(names), block):
            last = min(first + block, len(names))
            start, end = int(ends[first] - sizes[first]), int(ends[last - 1])
            rows = order[start:end]
            # One read per block: a contiguous slice when the rows are in order (one face each, the usual case).
            vectors = np.asarray(
                matrix[rows[0]:rows[-1] + 1] if (np.diff(rows) == 1).all() else matrix[rows],
                dtype=np.float32,
            )
            offset = 0
            for g in range(first, last):
                k = int(sizes[g])
                yield int(rows[offset]) + 1, start + offset + k, ImportedIdentity(
                    names[g], vectors[offset:offset + k], model_sha256
                )
                offset += k

    return len(matrix), identities()


def mismatch(theirs: Any, ours: str) -> str:
    return (f"embeddings of model {str(theirs)[:64]!r}, but the configured embedder's model is {ours}: the gallery "
            "never compares embeddings of different models (ModelMismatch)")


# -- writing ----------------------------------------------------------------------------------------------------


def import_identities(
    gallery: GalleryStore,
    items: Iterator[tuple[int, int, ImportedIdentity]],
    source: str,
    *,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
    unique: bool = False,
) -> dict[str, int]:
    """Feed `items` (line number, progress, identity) to the gallery a batch at a time; counts of identities read,
    added, skipped (held already). BadInput for the first bad item (found while reading, or by the gallery's
    checks), named `source`:line: its batch is not written.
    unique: the items' ids are known to be distinct (not checked again here)."""
    counts = {"read": 0, "added": 0, "skipped": 0, "faces": 0}
    seen: dict[str, int] = {}
    batch: list[ImportedIdentity] = []
    lines: list[int] = []
    position = 0

    def flush() -> None:
        try:
            added = gallery.import_identities(batch)
        except FaceServiceError as exc:
            index = exc.details.get("index")
            raise BadInput(f"{source}:{lines[index]}" if isinstance(index, int) else source, exc.message) from None
        counts["added"] += added
        counts["skipped"] += len(batch) - added
        if progress:
            progress.update(position, counts)
        batch.clear()
        lines.clear()

    for line, position, identity in items:
        if not unique and isinstance(identity.identity_id, str):
            if (earlier := seen.get(identity.identity_id)) is not None:
                raise BadInput(f"{source}:{line}", f"identity {identity.identity_id!r} is already on line {earlier}")
            seen[identity.identity_id] = line
        batch.append(identity)
        lines.append(line)
        counts["read"] += 1
        counts["faces"] += len(identity.embeddings)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return counts


def export_identities(gallery: GalleryStore, stream: IO[str]) -> dict[str, int]:
    """Write every identity with at least one current-model face as one JSON line; counts of identities and
    faces written and of what was left out."""
    counts = {"identities": 0, "faces": 0, "without_faces": 0, "foreign_faces": gallery.count_foreign()}
    for identity in gallery.export_identities():
        if len(identity.embeddings) == 0:
            counts["without_faces"] += 1
            continue
        stream.write(json.dumps({
            "identity_id": identity.identity_id,
            "display_name": identity.display_name,
            "metadata": identity.metadata,
            "model_sha256": identity.model_sha256,
            "embeddings": [to_base64(v) for v in identity.embeddings],
        }, ensure_ascii=False, separators=(",", ":")) + "\n")
        counts["identities"] += 1
        counts["faces"] += len(identity.embeddings)
    return counts


class Progress:
    """A tqdm bar on a terminal (when tqdm is installed), else a line on stderr every `every_s` seconds."""

    def __init__(self, total: int | None, unit: str, every_s: float = 10.0):
        self.total, self.unit, self.every_s = total, unit, every_s  # total None: not known (a pipe)
        self.started = self.last = time.monotonic()
        self.done = 0
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit=unit, unit_scale=True, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, done: int, counts: dict[str, int]) -> None:
        now = time.monotonic()
        rate = counts["read"] / max(now - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.bar.set_postfix(added=counts["added"], skipped=counts["skipped"], ids_per_s=f"{rate:,.0f}")
        elif now - self.last >= self.every_s:
            share = f" ({100 * done / self.total:.1f} % of the input)" if self.total else ""
            print(f"import: {counts['read']:,} identities read{share}, {counts['added']:,} added, "
                  f"{counts['skipped']:,} already there, {rate:,.0f} identities/s", file=sys.stderr, flush=True)
            self.last = now
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the command ------------------------------------------------------------------------------------------------


def open_configured_gallery() -> tuple[GalleryStore, list[str]]:
    """The gallery the server's settings (environment) name, opened as the server opens it for its embedder, and
    that embedder's earlier ids."""
    from pydantic import ValidationError

    from service.embedder import Embedder
    from service.onnx_model import session_options
    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        raise GallerySetupError(f"bad settings: {exc}") from None
    embedder = Embedder(settings.embedder_path, session_options(1, 1))
    # The server's index is used (a large gallery opens in seconds) and kept valid, but not rebuilt here: the
    # server rebuilds it when it starts, in the background.
    gallery = open_gallery(settings.gallery_url, embedder.model_id, embedder.embedding_size,
                           timeout_s=settings.gallery_timeout_s, earlier_ids=embedder.earlier_ids,
                           index=dataclasses.replace(settings.gallery_index_options, build=False))
    return gallery, embedder.earlier_ids


def run_import(args: argparse.Namespace, gallery: GalleryStore, earlier_ids: Collection[str] = ()) -> int:
    started = time.perf_counter()
    deferred = getattr(gallery, "search_index_deferred", None)  # PostgreSQL's
    if args.defer_index and deferred is None:
        raise BadInput("--defer-index", "only a PostgreSQL gallery has an index to defer")
    with deferred() if args.defer_index else contextlib.nullcontext():
        counts = read_and_import(args, gallery, earlier_ids)
    elapsed = time.perf_counter() - started
    print(f"imported {args.file}: {counts['read']:,} identities ({counts['faces']:,} faces) read in {elapsed:.1f} s "
          f"({counts['read'] / max(elapsed, 1e-9):,.0f} identities/s); {counts['added']:,} added, "
          f"{counts['skipped']:,} already in the gallery and left as they were; model {gallery.model_sha256[:12]}",
          file=sys.stderr)
    return 0


def read_and_import(args: argparse.Namespace, gallery: GalleryStore, earlier_ids: Collection[str]) -> dict[str, int]:
    if args.ids is not None or args.file.suffix == ".npy":
        if args.ids is None or args.model_sha256 is None:
            raise BadInput(str(args.file), "a .npy matrix needs --ids FILE and --model-sha256")
        if args.model_sha256 != gallery.model_sha256 and args.model_sha256 not in earlier_ids:
            raise BadInput("--model-sha256", mismatch(args.model_sha256, gallery.model_sha256))
        total, items = read_npy(args.file, args.ids, gallery.model_sha256, gallery.embedding_size)
        progress = Progress(total, "faces")
        counts = import_identities(gallery, items, str(args.ids), batch_size=args.batch_size, progress=progress,
                                   unique=True)
    else:
        stdin = str(args.file) == "-"
        stream = sys.stdin.buffer if stdin else args.file.open("rb")
        try:
            total = 0 if stdin else os.fstat(stream.fileno()).st_size
            progress = Progress(total or None, "B")
            name = "stdin" if stdin else str(args.file)
            items = read_jsonl(stream, gallery.model_sha256, gallery.embedding_size, name, earlier_ids)
            counts = import_identities(gallery, items, name, batch_size=args.batch_size, progress=progress)
        finally:
            if not stdin:
                stream.close()
    progress.close()
    return counts


def run_export(args: argparse.Namespace, gallery: GalleryStore) -> int:
    started = time.perf_counter()
    if str(args.file) == "-":
        counts = export_identities(gallery, sys.stdout)
        sys.stdout.flush()
    else:
        partial = args.file.with_name(args.file.name + ".partial")
        with partial.open("w", encoding="utf-8") as stream:
            counts = export_identities(gallery, stream)
            stream.flush()
            os.fsync(stream.fileno())
        partial.replace(args.file)
    print(f"exported {counts['identities']:,} identities with {counts['faces']:,} faces of model "
          f"{gallery.model_sha256[:12]} to {args.file} in {time.perf_counter() - started:.1f} s; left out "
          f"{counts['foreign_faces']:,} faces of other models and {counts['without_faces']:,} identities with no "
          "face of this model", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.gallery_io",
        description="Bulk import into, and export from, the gallery the server's settings (FACE_GALLERY_URL, "
        "FACE_MODELS_DIR, FACE_EMBEDDER_MODEL) name.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("import", help="load identities from JSON Lines (or a .npy matrix with --ids)")
    load.add_argument("file", type=Path, help="JSON Lines file ('-': standard input), or a .npy matrix")
    load.add_argument("--ids", type=Path, help="with a .npy matrix: one identity id a line, one line per row")
    load.add_argument("--model-sha256", help="with a .npy matrix: the model id that made its embeddings")
    load.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="identities per transaction")
    load.add_argument("--defer-index", action="store_true",
                      help="PostgreSQL: drop the model's HNSW index during the import and build it once at the end "
                      "(about ten times faster for large imports; meanwhile searches scan every template)")
    save = commands.add_parser("export", help="write every identity's current-model embeddings as JSON Lines")
    save.add_argument("file", type=Path, help="JSON Lines file to write ('-': standard output)")
    args = parser.parse_args(argv)
    if args.command == "import" and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    try:
        gallery, earlier_ids = open_configured_gallery()
    except (GallerySetupError, FaceServiceError, ValueError, OSError) as exc:
        print(f"gallery {args.command} failed: {exc}", file=sys.stderr)
        return 2
    try:
        return run_import(args, gallery, earlier_ids) if args.command == "import" else run_export(args, gallery)
    except BadInput as exc:
        print(f"import stopped at {exc}; nothing of its batch was written (identities before that batch are in: run "
              "the same command again once the input is fixed, it skips them)", file=sys.stderr)
        return 2
    except (OSError, FaceServiceError) as exc:  # an unreadable file, a database gone (Unavailable)
        print(f"gallery {args.command} failed: {exc}", file=sys.stderr)
        return 2
    except sqlite3.IntegrityError as exc:  # a row this process did not load: another process writes the file
        print(f"gallery {args.command} failed: {exc}; is a server running on this SQLite gallery? Stop it while "
              "importing (one process owns a SQLite gallery), then run the same command again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the batch being written was rolled back; those before it are in
        print(f"gallery {args.command} interrupted" + ("; run the same command again to finish the import (it "
              "skips the identities already written)" if args.command == "import" else ""), file=sys.stderr)
        return 130
    finally:
        gallery.close()


if __name__ == "__main__":
    sys.exit(main())
