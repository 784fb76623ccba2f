"""Enrolment and gallery management over HTTP, with the real models on real photos."""

from __future__ import annotations

import base64
import json
import sqlite3

import pytest
from api_support import api_client, error_code, no_face_jpeg, photo


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def client(request, models_dir, faces_dir, tmp_path_factory):
    """The whole gallery API, once per store: a SQLite file, and a PostgreSQL database (tests/pg_support.py)."""
    if request.param == "sqlite":
        with api_client(models_dir, tmp_path_factory.mktemp("gallery")) as c:
            yield c
        return
    postgres = request.getfixturevalue("postgres")
    url = postgres.new_database()
    try:
        with api_client(models_dir, tmp_path_factory.mktemp("gallery"), gallery_url=url) as c:
            yield c
    finally:
        postgres.drop_database(url)


def _files(faces_dir, *names):
    return [("images", (name, photo(faces_dir, f"pairs/{name}"), "image/jpeg")) for name in names]


def _enroll(client, faces_dir, identity_id, *names, **form):
    response = client.post("/enroll", data={"identity_id": identity_id, **form}, files=_files(faces_dir, *names))
    assert response.status_code == 200, response.text
    return response.json()


def _identify(client, faces_dir, name, **params):
    response = client.post("/identify", files={"image": (name, photo(faces_dir, f"pairs/{name}"))}, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_enroll_identify_delete_cycle(client, faces_dir):
    # img20/img21 are one person, img16/img17 another (pairs.csv: Yes).
    enrolled = _enroll(client, faces_dir, "person-a", "img20.jpg", display_name="Person A",
                       metadata=json.dumps({"team": "x"}))
    assert enrolled["identity_id"] == "person-a" and enrolled["display_name"] == "Person A"
    assert len(enrolled["face_ids"]) == 1 and enrolled["face_count"] == 1
    assert enrolled["faces"][0]["filename"] == "img20.jpg" and enrolled["faces"][0]["image_index"] == 0
    _enroll(client, faces_dir, "person-b", "img16.jpg")

    found = _identify(client, faces_dir, "img21.jpg")["faces"]
    assert len(found) == 1
    matches = found[0]["matches"]
    assert [m["identity_id"] for m in matches] == ["person-a"]  # person-b is below the threshold
    assert matches[0]["display_name"] == "Person A"
    assert matches[0]["similarity"] >= _identify(client, faces_dir, "img21.jpg")["threshold"]

    found = _identify(client, faces_dir, "img17.jpg")["faces"]
    assert [m["identity_id"] for m in found[0]["matches"]] == ["person-b"]

    # A stranger (img3, not enrolled) is nobody we know: no nearest-stranger answer.
    assert _identify(client, faces_dir, "img3.jpg")["faces"][0]["matches"] == []

    deleted = client.delete("/identities/person-a")
    assert deleted.status_code == 200 and deleted.json()["faces_deleted"] == 1
    assert _identify(client, faces_dir, "img21.jpg")["faces"][0]["matches"] == []
    assert client.get("/identities/person-a").status_code == 404
    client.delete("/identities/person-b")


def test_identify_top_k_and_threshold_override(client, faces_dir):
    _enroll(client, faces_dir, "k-a", "img20.jpg")
    _enroll(client, faces_dir, "k-b", "img16.jpg")
    _enroll(client, faces_dir, "k-c", "img3.jpg")
    try:
        everyone = _identify(client, faces_dir, "img21.jpg", threshold=-1, top_k=10)["faces"][0]["matches"]
        assert {m["identity_id"] for m in everyone} == {"k-a", "k-b", "k-c"}
        assert everyone[0]["identity_id"] == "k-a"
        sims = [m["similarity"] for m in everyone]
        assert sims == sorted(sims, reverse=True)
        top1 = _identify(client, faces_dir, "img21.jpg", threshold=-1, top_k=1)["faces"][0]["matches"]
        assert [m["identity_id"] for m in top1] == ["k-a"]
    finally:
        for identity in ("k-a", "k-b", "k-c"):
            client.delete(f"/identities/{identity}")


def test_enroll_several_images_and_manage_faces(client, faces_dir):
    body = _enroll(client, faces_dir, "multi", "img22.jpg", "img23.jpg")
    assert len(body["face_ids"]) == 2 and body["face_count"] == 2
    assert [f["image_index"] for f in body["faces"]] == [0, 1]
    # Enrolling again adds to the identity; the name given now replaces the stored one.
    again = _enroll(client, faces_dir, "multi", "img22.jpg", display_name="Renamed")
    assert again["face_count"] == 3 and again["display_name"] == "Renamed"

    detail = client.get("/identities/multi").json()
    assert detail["face_count"] == 3 and detail["display_name"] == "Renamed"
    face_ids = [f["face_id"] for f in detail["faces"]]
    assert set(face_ids) == set(body["face_ids"] + again["face_ids"])
    assert all(f["current_model"] for f in detail["faces"])
    assert detail["faces"][0]["source"]["filename"] == "img22.jpg"

    removed = client.delete(f"/identities/multi/faces/{face_ids[0]}")
    assert removed.status_code == 200 and removed.json()["face_id"] == face_ids[0]
    assert client.get("/identities/multi").json()["face_count"] == 2
    gone = client.delete(f"/identities/multi/faces/{face_ids[0]}")
    assert gone.status_code == 404 and error_code(gone) == "not_found"
    client.delete("/identities/multi")


def test_enroll_accepts_base64_json(client, faces_dir):
    images = [base64.b64encode(photo(faces_dir, f"pairs/{n}")).decode() for n in ("img24.jpg", "img25.jpg")]
    response = client.post(
        "/enroll", json={"identity_id": "json-person", "images": images, "metadata": {"source": "json"}}
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["face_ids"]) == 2
    assert client.get("/identities/json-person").json()["metadata"] == {"source": "json"}
    client.delete("/identities/json-person")


def test_enroll_rejects_an_image_without_a_face_and_stores_nothing(client, faces_dir):
    files = _files(faces_dir, "img5.jpg") + [("images", ("wall.jpg", no_face_jpeg(faces_dir), "image/jpeg"))]
    response = client.post("/enroll", data={"identity_id": "half"}, files=files)
    assert response.status_code == 422 and error_code(response) == "no_face"
    rejected = response.json()["error"]["details"]["rejected"]
    assert rejected == [
        {"field": "images", "image_index": 1, "filename": "wall.jpg", "code": "no_face",
         "reason": "images[1]: no face found"}
    ]
    # One transaction: the good image was not stored either.
    assert client.get("/identities/half").status_code == 404


def test_enroll_with_several_faces_rejects_or_takes_the_largest(client, faces_dir):
    couple = photo(faces_dir, "groups/couple.jpg")
    files = [("images", ("couple.jpg", couple, "image/jpeg"))]
    response = client.post("/enroll", data={"identity_id": "crowd"}, files=files)
    assert response.status_code == 422 and error_code(response) == "too_many_faces"
    assert response.json()["error"]["details"]["rejected"][0]["faces_found"] == 2
    assert client.get("/identities/crowd").status_code == 404

    response = client.post(
        "/enroll", data={"identity_id": "crowd", "multiple_faces": "largest"}, files=files
    )
    assert response.status_code == 200, response.text
    detected = client.post("/detect", files={"image": ("c.jpg", couple)}).json()["faces"]
    largest = max(detected, key=lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]))
    assert response.json()["faces"][0]["box"] == largest["box"]
    client.delete("/identities/crowd")


def test_verify_against_an_enrolled_identity(client, faces_dir):
    _enroll(client, faces_dir, "verify-me", "img16.jpg")
    try:
        same = client.post("/verify", files={"image1": ("x.jpg", photo(faces_dir, "pairs/img17.jpg"))},
                           data={"identity_id": "verify-me"})
        assert same.status_code == 200, same.text
        assert same.json()["match"] and same.json()["identity_id"] == "verify-me" and same.json()["face2"] is None
        other = client.post("/verify", files={"image1": ("x.jpg", photo(faces_dir, "pairs/img20.jpg"))},
                            data={"identity_id": "verify-me"})
        assert not other.json()["match"]
        unknown = client.post("/verify", files={"image1": ("x.jpg", photo(faces_dir, "pairs/img20.jpg"))},
                              data={"identity_id": "nobody"})
        assert unknown.status_code == 404 and error_code(unknown) == "not_found"
    finally:
        client.delete("/identities/verify-me")


def test_list_identities_paginates(client, faces_dir):
    names = [f"page-{i}" for i in range(3)]
    for name in names:
        _enroll(client, faces_dir, name, "img25.jpg")
    try:
        first = client.get("/identities", params={"offset": 0, "limit": 2}).json()
        rest = client.get("/identities", params={"offset": 2, "limit": 2}).json()
        assert first["total"] == rest["total"] == 3
        assert first["limit"] == 2 and rest["offset"] == 2
        ids = [i["identity_id"] for i in first["items"] + rest["items"]]
        assert ids == names  # ordered by id, no overlap, nothing missed
        assert all(i["face_count"] == 1 for i in first["items"])
        bad = client.get("/identities", params={"limit": 0})
        assert bad.status_code == 422 and error_code(bad) == "invalid_parameter"
    finally:
        for name in names:
            client.delete(f"/identities/{name}")


def test_unknown_and_invalid_identities(client):
    missing = client.get("/identities/no-such-person")
    assert missing.status_code == 404 and error_code(missing) == "not_found"
    assert client.delete("/identities/no-such-person").status_code == 404
    for bad in ("-leading-dash", "a" * 200, "white space", "semi;colon"):
        response = client.get(f"/identities/{bad}")
        assert response.status_code == 422 and error_code(response) == "invalid_parameter", bad
    response = client.post("/enroll", data={"identity_id": "bad id!"},
                           files=[("images", ("x.jpg", b"\xff\xd8\xff", "image/jpeg"))])
    assert response.status_code == 422 and error_code(response) == "invalid_parameter"
    response = client.post("/enroll", data={"identity_id": "ok", "metadata": "[1, 2]"},
                           files=[("images", ("x.jpg", b"\xff\xd8\xff", "image/jpeg"))])
    assert response.status_code == 422 and error_code(response) == "invalid_parameter"


def test_faces_of_another_model_are_kept_counted_and_never_matched(models_dir, faces_dir, tmp_path):
    with api_client(models_dir, tmp_path) as first:
        _enroll(first, faces_dir, "old-model", "img20.jpg")
    # Pretend that face was made by another embedder (a model upgrade): restamp it on disk.
    with sqlite3.connect(tmp_path / "gallery.db") as db:
        db.execute("UPDATE faces SET model_sha256 = ?", ("0" * 64,))
    with api_client(models_dir, tmp_path) as client:
        gallery = client.get("/models").json()["gallery"]
        assert gallery == {"identities": 1, "faces": 0, "foreign_faces": 1}
        detail = client.get("/identities/old-model").json()
        assert detail["face_count"] == 0 and detail["foreign_face_count"] == 1
        assert detail["faces"][0]["current_model"] is False
        # The same person's other photo: the old embedding is not compared, so nobody is found.
        matches = _identify(client, faces_dir, "img21.jpg", threshold=-1)["faces"][0]["matches"]
        assert matches == []
        response = client.post("/verify", files={"image1": ("x.jpg", photo(faces_dir, "pairs/img21.jpg"))},
                               data={"identity_id": "old-model"})
        assert response.status_code == 409 and error_code(response) == "model_mismatch"


def test_page_offsets_are_bounded(client):
    # SQLite integers are 64-bit: a larger offset raised OverflowError in the sqlite3 module (a 500).
    for offset in ("99999999999999999999", str(2**63), "9" * 5000, "-1"):
        response = client.get("/identities", params={"offset": offset})
        assert response.status_code == 422 and error_code(response) == "invalid_parameter", offset
        assert response.json()["error"]["details"]["errors"][0]["field"] == "offset"
    largest = client.get("/identities", params={"offset": 2**63 - 1})
    assert largest.status_code == 200 and largest.json()["items"] == []


def test_metadata_is_stored_up_to_its_depth_limit(client, faces_dir):
    nested: dict = {"leaf": 1}
    for _ in range(31):  # 32 levels of objects: the most the gallery keeps
        nested = {"n": nested}
    _enroll(client, faces_dir, "deep-ok", "img25.jpg", metadata=json.dumps(nested))
    try:
        assert client.get("/identities/deep-ok").json()["metadata"] == nested
        too_deep = {"identity_id": "deep-ok", "metadata": json.dumps({"n": nested})}
        response = client.post("/enroll", data=too_deep, files=_files(faces_dir, "img25.jpg"))
        assert response.status_code == 422 and error_code(response) == "invalid_parameter"
        assert client.get("/identities/deep-ok").json()["face_count"] == 1  # the refused one stored nothing
    finally:
        client.delete("/identities/deep-ok")


def test_an_identity_is_matched_through_the_mean_of_its_faces(client, faces_dir):
    # Two photos of one person: /identify's similarity is the cosine to their normalised mean, and /verify
    # against the identity gives the same number; deleting one face moves the template to the other photo.
    enrolled = _enroll(client, faces_dir, "person-t", "img16.jpg", "img17.jpg")
    assert enrolled["face_count"] == 2
    probe = photo(faces_dir, "pairs/img16.jpg")
    verify_two = client.post("/verify", files={"image1": ("p.jpg", probe)}, data={"identity_id": "person-t"}).json()
    (match,) = [m for m in _identify(client, faces_dir, "img16.jpg")["faces"][0]["matches"]
                if m["identity_id"] == "person-t"]
    assert match["faces"] == 2
    assert match["similarity"] == pytest.approx(verify_two["similarity"], abs=1e-5)
    same = client.post("/verify", files={"image1": ("a.jpg", probe), "image2": ("b.jpg", probe)}).json()
    assert same["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert verify_two["similarity"] < 0.999  # the mean of two different photos is not the probe's own embedding

    client.delete(f"/identities/person-t/faces/{enrolled['face_ids'][1]}").raise_for_status()  # img17 goes
    verify_one = client.post("/verify", files={"image1": ("p.jpg", probe)}, data={"identity_id": "person-t"}).json()
    assert verify_one["similarity"] == pytest.approx(1.0, abs=1e-4)  # only img16 itself is left
    (match,) = [m for m in _identify(client, faces_dir, "img16.jpg")["faces"][0]["matches"]
                if m["identity_id"] == "person-t"]
    assert match["faces"] == 1 and match["similarity"] == pytest.approx(1.0, abs=1e-4)
    client.delete("/identities/person-t").raise_for_status()
