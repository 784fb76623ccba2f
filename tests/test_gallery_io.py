"""`python -m service.gallery_io`: bulk import (JSON Lines, .npy with ids) and export, configured like the server.

Real galleries (a SQLite file; PostgreSQL from pgserver where the test says so), the real default embedder file for
the model id, and real processes where an exit code or a kill is the point."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from service.embedder import Embedder
from service.gallery import open_gallery
from service.gallery_io import main

ROOT = Path(__file__).resolve().parents[1]
OTHER_MODEL = "b" * 64


@pytest.fixture(scope="module")
def model(models_dir: Path) -> tuple[str, int]:
    """(model id, embedding size) of the default embedder: what the command tags faces with."""
    path = models_dir / "mobilefacenet_192.onnx"
    if not path.is_file():
        pytest.skip("default embedder not built (make models)")
    embedder = Embedder(path)
    return embedder.model_id, embedder.embedding_size


@pytest.fixture
def configured(models_dir: Path, monkeypatch):
    """Point the command's settings (the environment, as for the server) at a gallery URL."""

    def configure(url: str) -> None:
        monkeypatch.setenv("FACE_MODELS_DIR", str(models_dir))
        monkeypatch.setenv("FACE_GALLERY_URL", url)

    return configure


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def people(n: int, model_sha256: str, size: int, seed: int = 0) -> list[dict]:
    """n identities as JSON Lines objects: 1-3 faces, as lists of floats or base64, some named, some with metadata."""
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n):
        faces = unit(rng.normal(size=(int(rng.integers(1, 4)), size)))
        item = {"identity_id": f"person-{p:05d}", "model_sha256": model_sha256,
                "embeddings": [base64.b64encode(f.astype("<f4").tobytes()).decode() if (p + j) % 2 else f.tolist()
                               for j, f in enumerate(faces)]}
        if p % 3:
            item["display_name"] = f"Person {p} \u00e9"
        if p % 4 == 0:
            item["metadata"] = {"n": p, "tags": ["a", {"b": None}]}
        out.append(item)
    return out


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def vectors(item: dict, size: int) -> np.ndarray:
    return np.stack([np.frombuffer(base64.b64decode(e), "<f4") if isinstance(e, str) else np.asarray(e, np.float32)
                     for e in item["embeddings"]])


def assert_holds(url: str, model: tuple[str, int], items: list[dict]) -> None:
    """The gallery holds exactly these identities: names, metadata and embeddings."""
    model_sha256, size = model
    with open_gallery(url, model_sha256, size) as g:
        exported = {e.identity_id: e for e in g.export_identities()}
        assert sorted(exported) == sorted(item["identity_id"] for item in items)
        for item in items:
            e = exported[item["identity_id"]]
            assert (e.display_name, e.metadata) == (item.get("display_name"), item.get("metadata", {}))
            np.testing.assert_allclose(e.embeddings, vectors(item, size), atol=1e-6)
        assert len(g) == sum(len(item["embeddings"]) for item in items)


def command(*args: str, url: str, models_dir: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FACE_GALLERY_URL": url, "FACE_MODELS_DIR": str(models_dir)}
    return subprocess.Popen([sys.executable, "-m", "service.gallery_io", *args], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_import_then_export_reproduces_the_gallery(kind, model, configured, tmp_path, request, capsys) -> None:
    if kind == "sqlite":
        first, second = (f"sqlite:///{tmp_path / name}" for name in ("first.db", "second.db"))
    else:
        postgres = request.getfixturevalue("postgres")
        first, second = postgres.new_database(), postgres.new_database()
    items = people(40, model[0], model[1])
    configured(first)
    assert main(["import", str(write_jsonl(tmp_path / "in.jsonl", items)), "--batch-size", "7"]) == 0
    assert "40 identities (" in capsys.readouterr().err
    assert_holds(first, model, items)
    # Faces of another model, and an identity with only such faces: kept in the gallery, left out of the export.
    with open_gallery(first, OTHER_MODEL, model[1]) as other:
        other.enroll("person-00001", unit(np.ones((1, model[1]))))
        other.enroll("other-only", unit(np.ones((2, model[1]))))
    assert main(["export", str(tmp_path / "out.jsonl")]) == 0
    assert "left out 3 faces of other models and 1 identities with no face of this model" in capsys.readouterr().err
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["identity_id"] for line in lines] == [item["identity_id"] for item in items]  # in id order
    assert all(isinstance(e, str) for line in lines for e in line["embeddings"])  # base64
    assert not (tmp_path / "out.jsonl.partial").exists()
    assert main(["export", "-"]) == 0  # to standard output: the same lines
    assert capsys.readouterr().out == (tmp_path / "out.jsonl").read_text()

    configured(second)  # the export, imported elsewhere: the same identities, names, metadata, embeddings
    assert main(["import", str(tmp_path / "out.jsonl")]) == 0
    assert_holds(second, model, items)
    assert main(["export", str(tmp_path / "again.jsonl")]) == 0
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "out.jsonl").read_bytes()


def test_an_import_killed_midway_and_run_again_gives_the_uninterrupted_gallery(model, models_dir, configured,
                                                                                 tmp_path, capsys) -> None:
    items = people(1000, model[0], model[1], seed=1)
    source = write_jsonl(tmp_path / "in.jsonl", items)
    configured(f"sqlite:///{tmp_path / 'whole.db'}")
    assert main(["import", str(source), "--batch-size", "100"]) == 0
    assert main(["export", str(tmp_path / "whole.jsonl")]) == 0

    # A real process reading standard input: 450 lines sent, so 4 batches are committed and 50 identities are
    # read but not yet written when it is killed with SIGKILL (no clean-up of any kind).
    cut = tmp_path / "cut.db"
    child = command("import", "-", "--batch-size", "100", url=f"sqlite:///{cut}", models_dir=models_dir,
                    stdin=subprocess.PIPE)
    try:
        lines = source.read_text().splitlines(keepends=True)
        child.stdin.write("".join(lines[:450]))
        child.stdin.flush()
        deadline, held = time.monotonic() + 60, 0
        while held < 400 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
            try:
                with sqlite3.connect(f"file:{cut}?mode=ro", uri=True) as db:
                    held = db.execute("SELECT count(*) FROM identities").fetchone()[0]
            except sqlite3.OperationalError:  # not created yet
                pass
        time.sleep(0.5)  # the 50 pending identities must stay unwritten: no batch of them is complete
        child.kill()
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    with sqlite3.connect(cut) as db:
        assert db.execute("SELECT count(*) FROM identities").fetchone()[0] == 400
        assert db.execute("SELECT count(DISTINCT identity_id) FROM faces").fetchone()[0] == 400

    configured(f"sqlite:///{cut}")  # the same command again, on the whole input
    capsys.readouterr()
    assert main(["import", str(source), "--batch-size", "100"]) == 0
    assert "600 added, 400 already in the gallery" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "cut.jsonl")]) == 0
    assert (tmp_path / "cut.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert_holds(f"sqlite:///{cut}", model, items)


def test_a_bad_line_stops_the_import_with_its_line_number_and_nothing_of_its_batch(model, models_dir,
                                                                                     tmp_path) -> None:
    items = people(250, model[0], model[1], seed=2)
    items[236]["embeddings"][0] = (2 * vectors(items[236], model[1])[0]).tolist()  # line 237: not unit length
    url = f"sqlite:///{tmp_path / 'g.db'}"
    child = command("import", str(write_jsonl(tmp_path / "in.jsonl", items)), "--batch-size", "100", url=url,
                    models_dir=models_dir)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 2, err
    assert "in.jsonl:237: embeddings[0] has length 2" in err, err
    assert_holds(url, model, items[:200])  # the two batches before it; none of lines 201-250


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not JSON"),
        ('["a list"]', "not a JSON object"),
        ('{"identity_id": "x", "model_sha256": "MODEL", "embedding": []}', "unknown field(s) ['embedding']"),
        ('{"identity_id": "x", "model_sha256": "MODEL"}', "no 'embeddings'"),
        ('{"identity_id": "x", "model_sha256": "MODEL", "embeddings": []}', "non-empty list"),
        ('{"identity_id": "x", "model_sha256": "' + OTHER_MODEL + '", "embeddings": [[1.0]]}', "never compares"),
        ('{"identity_id": "x", "model_sha256": "MODEL", "embeddings": ["AAAA"]}', "holds 3 bytes"),
        ('{"identity_id": "x", "model_sha256": "MODEL", "embeddings": [[1.0, 0.0]]}', "has 2 values"),
        ('{"identity_id": "x y", "model_sha256": "MODEL", "embeddings": [UNIT]}', "identity id must be"),
        ('{"identity_id": "x", "display_name": 5, "model_sha256": "MODEL", "embeddings": [UNIT]}', "display_name"),
        ('{"identity_id": "x", "metadata": [1], "model_sha256": "MODEL", "embeddings": [UNIT]}', "JSON object"),
        ('{"identity_id": "person-00001", "model_sha256": "MODEL", "embeddings": [UNIT]}', "already on"),
    ],
)
def test_bad_lines_are_named(line, message, model, configured, tmp_path, capsys) -> None:
    unit_vector = json.dumps([1.0] + [0.0] * (model[1] - 1))
    items = people(3, model[0], model[1], seed=3)
    text = "".join(json.dumps(item) + "\n" for item in items) + "\n"  # a blank line is skipped
    path = tmp_path / "in.jsonl"
    path.write_text(text + line.replace("MODEL", model[0]).replace("UNIT", unit_vector) + "\n")
    url = f"sqlite:///{tmp_path / 'g.db'}"
    configured(url)
    assert main(["import", str(path)]) == 2
    err = capsys.readouterr().err
    assert "in.jsonl:5: " in err and message in err, err
    assert_holds(url, model, [])  # one batch: nothing written


def test_npy_with_an_ids_file(model, configured, tmp_path, capsys) -> None:
    model_sha256, size = model
    rng = np.random.default_rng(4)
    matrix = unit(rng.normal(size=(7, size)))
    np.save(tmp_path / "faces.npy", matrix)
    ids = ["bob", "alice", "bob", "carol", "alice", "bob", "dave"]  # repeated ids: several faces of one identity
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    url = f"sqlite:///{tmp_path / 'g.db'}"
    configured(url)
    args = ["import", str(tmp_path / "faces.npy"), "--ids", str(tmp_path / "ids.txt"), "--batch-size", "2"]
    assert main([*args, "--model-sha256", OTHER_MODEL]) == 2
    assert "never compares" in capsys.readouterr().err
    assert main(args) == 2
    assert "needs --ids FILE and --model-sha256" in capsys.readouterr().err
    assert main([*args, "--model-sha256", model_sha256]) == 0
    expected = [{"identity_id": name, "model_sha256": model_sha256,
                 "embeddings": [matrix[i].tolist() for i, n in enumerate(ids) if n == name]}
                for name in ("alice", "bob", "carol", "dave")]
    assert_holds(url, model, expected)
    assert main([*args, "--model-sha256", model_sha256]) == 0  # again: all there, nothing added
    assert "0 added, 4 already in the gallery" in capsys.readouterr().err
    assert_holds(url, model, expected)

    (tmp_path / "ids.txt").write_text("\n".join(ids[:-1]) + "\n")
    assert main([*args, "--model-sha256", model_sha256]) == 2
    assert "6 ids for the 7 rows" in capsys.readouterr().err
    np.save(tmp_path / "faces.npy", matrix[:, :100])
    assert main([*args, "--model-sha256", model_sha256]) == 2
    assert f"rows of 100 values; this model's embeddings have {size}" in capsys.readouterr().err
    np.save(tmp_path / "faces.npy", 2 * matrix)
    (tmp_path / "ids.txt").write_text("\n".join(f"new-{i}" for i in range(7)) + "\n")
    assert main([*args, "--model-sha256", model_sha256]) == 2
    assert "ids.txt:1: identity 'new-0': an embedding has length 2" in capsys.readouterr().err


def test_an_unusable_configuration_exits_2(models_dir, tmp_path) -> None:
    child = command("import", str(tmp_path / "missing.jsonl"), url=f"sqlite:///{tmp_path / 'g.db'}",
                    models_dir=models_dir)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 2 and "missing.jsonl" in err, err
    child = command("export", str(tmp_path / "out.jsonl"), url="mysql://nope", models_dir=models_dir)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 2 and "FACE_GALLERY_URL" in err, err


def test_embeddings_tagged_with_an_earlier_id_of_the_same_network_are_taken(models_dir, model, configured, tmp_path,
                                                                            capsys) -> None:
    # Older releases tagged faces with the embedder file's sha256; an export made then carries that id.
    embedder = Embedder(models_dir / "mobilefacenet_192.onnx")
    assert embedder.sha256 in embedder.earlier_ids
    items = people(5, embedder.sha256, model[1], seed=5)
    url = f"sqlite:///{tmp_path / 'g.db'}"
    configured(url)
    assert main(["import", str(write_jsonl(tmp_path / "in.jsonl", items))]) == 0
    assert_holds(url, model, items)  # stored as the current model's faces


def test_defer_index_rebuilds_the_postgresql_index_however_the_import_ends(model, configured, database, tmp_path,
                                                                           capsys) -> None:
    import psycopg

    from service.pg_gallery import _index_name

    def index_exists() -> bool:
        with psycopg.connect(database) as conn:
            return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (_index_name(model[0]),)).fetchone()[0]

    items = people(30, model[0], model[1], seed=6)
    configured(database)
    assert main(["import", str(write_jsonl(tmp_path / "in.jsonl", items)), "--defer-index", "--batch-size", "8"]) == 0
    assert index_exists()
    assert_holds(database, model, items)
    with open_gallery(database, model[0], model[1]) as g:  # the rebuilt index answers
        first = vectors(items[0], model[1])[0]
        assert g.search(first, top_k=1)[0][0].identity_id == items[0]["identity_id"]

    more = people(40, model[0], model[1], seed=7)[30:]
    more[5]["identity_id"] = "bad id"
    assert main(["import", str(write_jsonl(tmp_path / "more.jsonl", more)), "--defer-index", "--batch-size", "4"]) == 2
    assert "more.jsonl:6:" in capsys.readouterr().err
    assert index_exists()  # built again although the import stopped
    assert_holds(database, model, items + more[:4])

    configured(f"sqlite:///{tmp_path / 'g.db'}")
    assert main(["import", str(tmp_path / "in.jsonl"), "--defer-index"]) == 2
    assert "only a PostgreSQL gallery" in capsys.readouterr().err


def test_progress_lines_for_logs(capsys) -> None:
    from service.gallery_io import Progress

    progress = Progress(1000, "B", every_s=0)  # not a terminal here: a line per update, no bar
    progress.update(250, {"read": 20, "added": 15, "skipped": 5})
    progress.close()
    line = capsys.readouterr().err
    assert line.startswith("import: 20 identities read (25.0 % of the input), 15 added, 5 already there, ") and \
        line.rstrip().endswith("identities/s"), line


def test_an_identity_enrolled_by_another_process_meanwhile_is_left_as_it_is(model, configured, tmp_path, capsys,
                                                                            monkeypatch) -> None:
    # The import asks the database which identities exist as it writes each batch: one enrolled behind its back
    # after the import opened the file (a server left running on it) is skipped like any identity already there,
    # not overwritten and not a crash.
    from service import gallery_io

    url = f"sqlite:///{tmp_path / 'g.db'}"
    items = people(3, model[0], model[1], seed=8)
    opened = gallery_io.open_configured_gallery

    def open_then_enrol_elsewhere():
        gallery, earlier = opened()
        with open_gallery(url, model[0], model[1]) as other:
            other.enroll(items[1]["identity_id"], vectors(items[1], model[1]))
        return gallery, earlier

    monkeypatch.setattr(gallery_io, "open_configured_gallery", open_then_enrol_elsewhere)
    configured(url)
    assert main(["import", str(write_jsonl(tmp_path / "in.jsonl", items))]) == 0
    assert "1 already in the gallery" in capsys.readouterr().err
    with open_gallery(url, model[0], model[1]) as gallery:
        assert gallery.count_identities() == 3
        # The other process's enrolment (no name), not the file's ("Person 1 ...").
        assert gallery.get_identity(items[1]["identity_id"]).display_name is None
