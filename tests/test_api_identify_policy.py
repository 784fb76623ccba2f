"""/identify's threshold follows the gallery's size (FPIR policy), over HTTP with the real default models.

The gallery is pre-filled with 5,000 synthetic identities (random unit embeddings of the default model's size,
tagged with its sha256: strangers to every real face), then real people are enrolled through /enroll on top.
"""

from __future__ import annotations

import pytest
from api_support import api_client, photo

from benchmarks.suites import fill_gallery
from service.decision import FarTable, IdentifyPolicy, fpir
from service.embedder import Embedder
from service.onnx_model import model_identity

SYNTHETIC = 5_000


@pytest.fixture(scope="module")
def embedder_file(models_dir):
    path = models_dir / "mobilefacenet_192.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is absent: run `make models`")
    return path


@pytest.fixture(scope="module")
def default_table(embedder_file) -> FarTable:
    table = Embedder(embedder_file).far_table
    assert table is not None, "the default recognizer must ship with a FAR table"
    return table


@pytest.fixture(scope="module")
def crowded(models_dir, faces_dir, embedder_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("crowded")
    fill_gallery(folder / "gallery.db", SYNTHETIC, 192, model_identity(embedder_file)[0], seed=11)
    with api_client(models_dir, folder) as client:
        yield client


def models_with_table(models_dir, embedder_file, folder, table: str | None):
    """A models folder: the default detector, and the default embedder with its FAR table replaced by `table`
    (JSON text) or removed (None)."""
    import onnx

    model = onnx.load(str(embedder_file))
    kept = [p for p in model.metadata_props if p.key != "face.embedder.far_table"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if table is not None:
        model.metadata_props.add(key="face.embedder.far_table", value=table)
    folder.mkdir()
    onnx.save(model, str(folder / "mobilefacenet_192.onnx"))
    (folder / "retinaface_mnet025.onnx").symlink_to(models_dir / "retinaface_mnet025.onnx")
    return folder


def identify(client, faces_dir, name, **params):
    response = client.post("/identify", files={"image": (name, photo(faces_dir, f"pairs/{name}"))}, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_default_model_ships_a_far_table_measured_on_lfw_dev(default_table):
    assert "lfw-dev" in default_table.rule and default_table.impostor_pairs > 1_000_000
    # The 1:1 threshold's FAR on the 1,500 lfw-dev impostor pairs was 0.27 %; over every impostor pair it is close.
    assert 0.001 < default_table.far_at(0.4096) < 0.006
    assert default_table.smallest_measured_far < 1e-5


def test_the_threshold_rises_with_the_gallery_and_each_answer_says_why(crowded, faces_dir, default_table, figures):
    models = crowded.get("/models").json()
    identify_info = models["embedder"]["identify"]
    floor = models["embedder"]["threshold"]
    assert identify_info["policy"] == "fpir" and identify_info["target_fpir"] == 0.01
    assert identify_info["far_table"]["impostor_pairs"] == default_table.impostor_pairs
    assert "lfw-dev" in identify_info["far_table"]["rule"] and identify_info["warning"] is None
    assert identify_info["current"]["gallery_identities"] == SYNTHETIC

    enrolled = crowded.post("/enroll", data={"identity_id": "person-a"},
                            files=[("images", ("img20.jpg", photo(faces_dir, "pairs/img20.jpg")))])
    assert enrolled.status_code == 200, enrolled.text

    answer = identify(crowded, faces_dir, "img21.jpg")  # the same person as img20
    decision = answer["decision"]
    n = SYNTHETIC + 1
    expected = IdentifyPolicy(default_table, 0.01, floor).decide(n)
    assert decision["gallery_identities"] == n and decision["policy"] == "fpir"
    assert decision["threshold"] == pytest.approx(expected.threshold) == pytest.approx(answer["threshold"])
    assert decision["threshold"] > floor + 0.1  # 5,001 identities need a far stricter threshold than one pair
    assert decision["expected_fpir"] == pytest.approx(0.01, rel=1e-3) and decision["target_fpir"] == 0.01
    # The table predicts what a fixed 1:1 threshold would do to strangers here: name nearly all of them.
    assert fpir(default_table.far_at(floor), n) > 0.99
    # The enrolled person is still found, and is the only match: the synthetic crowd stays below the bar.
    (face,) = answer["faces"]
    assert [m["identity_id"] for m in face["matches"]] == ["person-a"]
    figures(f"/identify over {n} identities: threshold {decision['threshold']:.4f} (1:1 threshold {floor}), "
            f"expected FPIR {decision['expected_fpir']:.4f}; same-person similarity {face['matches'][0]['similarity']:.3f}")

    # An explicit threshold overrides the policy, and the answer still states the FPIR it implies.
    answer = identify(crowded, faces_dir, "img21.jpg", threshold=floor)
    assert answer["decision"]["policy"] == "request" and answer["threshold"] == floor
    assert answer["decision"]["expected_fpir"] > 0.99 and answer["decision"]["target_fpir"] is None


def test_a_small_gallery_keeps_the_1_to_1_threshold(models_dir, faces_dir, tmp_path):
    with api_client(models_dir, tmp_path) as client:
        floor = client.get("/models").json()["embedder"]["threshold"]
        empty = identify(client, faces_dir, "img21.jpg")["decision"]
        assert (empty["gallery_identities"], empty["threshold"], empty["expected_fpir"]) == (0, floor, 0.0)
        client.post("/enroll", data={"identity_id": "a"},
                    files=[("images", ("img20.jpg", photo(faces_dir, "pairs/img20.jpg")))]).raise_for_status()
        one = identify(client, faces_dir, "img21.jpg")
        assert one["decision"]["gallery_identities"] == 1 and one["threshold"] == floor
        assert 0 < one["decision"]["expected_fpir"] < 0.01  # the floor is stricter than the target needs here
        assert [m["identity_id"] for m in one["faces"][0]["matches"]] == ["a"]


def test_a_fixed_threshold_setting_or_a_model_without_table(models_dir, faces_dir, tmp_path, embedder_file):
    with api_client(models_dir, tmp_path / "fixed", identify_threshold=0.55) as client:
        info = client.get("/models").json()["embedder"]["identify"]
        assert info["policy"] == "settings" and info["fixed_threshold"] == 0.55
        decision = identify(client, faces_dir, "img21.jpg")["decision"]
        assert decision["policy"] == "settings" and decision["threshold"] == 0.55

    # The same network without the table in its metadata: the 1:1 threshold, and /models says what that costs.
    bare = models_with_table(models_dir, embedder_file, tmp_path / "models", None)
    with api_client(bare, tmp_path / "bare") as client:
        embedder = client.get("/models").json()["embedder"]
        assert embedder["identify"]["policy"] == "model" and embedder["identify"]["far_table"] is None
        assert "far_table" in embedder["identify"]["warning"]
        decision = identify(client, faces_dir, "img21.jpg")["decision"]
        assert decision["policy"] == "model" and decision["threshold"] == embedder["threshold"]
        assert decision["expected_fpir"] is None


def test_bad_policy_settings_are_refused(models_dir):
    from pydantic import ValidationError

    from service.settings import Settings

    for bad in ({"identify_fpir": 0}, {"identify_fpir": 1}, {"identify_fpir": -0.1}, {"identify_threshold": 1.5}):
        with pytest.raises(ValidationError):
            Settings(models_dir=models_dir, **bad)


def test_a_new_far_table_keeps_enrolled_faces_comparable(models_dir, faces_dir, tmp_path, embedder_file):
    """The gallery tags faces with the graph's sha256, not the file's: writing a FAR table (or any metadata) into
    the embedder changes the file but not its model id. Faces an older release tagged with the whole file's
    sha256, of this file or of the same file before its table was added, are re-tagged when the gallery opens."""
    import sqlite3

    from evaluate.model_table import write_far_table
    from export.mobilefacenet_far_table import FAR_TABLE
    from service.onnx_model import file_sha256

    bare = models_with_table(models_dir, embedder_file, tmp_path / "models", None)
    bare_file_sha = file_sha256(bare / "mobilefacenet_192.onnx")
    assert model_identity(bare / "mobilefacenet_192.onnx")[0] == model_identity(embedder_file)[0]

    with api_client(bare, tmp_path / "g") as client:  # enrol with the table-less file
        client.post("/enroll", data={"identity_id": "a"},
                    files=[("images", ("img20.jpg", photo(faces_dir, "pairs/img20.jpg")))]).raise_for_status()
        before = identify(client, faces_dir, "img21.jpg")["faces"][0]["matches"]
    # As an older release would have left it: the face tagged with the table-less file's sha256.
    with sqlite3.connect(tmp_path / "g" / "gallery.db") as db:
        db.execute("UPDATE faces SET model_sha256 = ?", (bare_file_sha,))

    write_far_table(bare / "mobilefacenet_192.onnx", FAR_TABLE)  # the file changes, the model id does not
    assert file_sha256(bare / "mobilefacenet_192.onnx") != bare_file_sha
    with api_client(bare, tmp_path / "g") as client:
        models = client.get("/models").json()
        assert models["gallery"] == {"identities": 1, "faces": 1, "foreign_faces": 0}
        assert models["embedder"]["model_id"] == model_identity(embedder_file)[0]
        after = identify(client, faces_dir, "img21.jpg")["faces"][0]["matches"]
        assert [m["identity_id"] for m in after] == ["a"] == [m["identity_id"] for m in before]
        assert after[0]["similarity"] == pytest.approx(before[0]["similarity"], abs=1e-6)
        stored = client.get("/identities/a").json()["faces"][0]
        assert stored["model_sha256"] == models["embedder"]["model_id"] and stored["current_model"]


def test_a_far_table_at_odds_with_the_files_own_far_is_flagged(models_dir, tmp_path, embedder_file):
    import json

    forged = {"thresholds": [0.0, 1.0], "far": [1e-30, 1e-31], "measured_to": 1.0, "impostor_pairs": 10}
    folder = models_with_table(models_dir, embedder_file, tmp_path / "models", json.dumps(forged))
    with api_client(folder, tmp_path / "g") as client:
        warning = client.get("/models").json()["embedder"]["identify"]["warning"]
        assert warning and "face.embedder.far says 0.0027" in warning
