"""Embeddings in and out over HTTP (/embed; embedding2 on /verify; candidates on /identify; /enroll from
embeddings), with the real models on real photos: what a client keeps from /embed must give the same answers
the photos give."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from api_support import api_client, error_code, labelled_pairs, no_face_jpeg, photo


@pytest.fixture(scope="module")
def client(models_dir, tmp_path_factory):
    with api_client(models_dir, tmp_path_factory.mktemp("embeddings")) as c:
        yield c


def _pair_file(faces_dir, name):
    return (name, photo(faces_dir, f"pairs/{name}"), "image/jpeg")


def _embed(client, faces_dir, *names, **params) -> dict:
    files = [("images", _pair_file(faces_dir, name)) for name in names]
    response = client.post("/embed", files=files, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _vector(face: dict, fmt: str = "json") -> np.ndarray:
    if fmt == "base64":
        return np.frombuffer(base64.b64decode(face["embedding"]), dtype="<f4")
    return np.asarray(face["embedding"], dtype=np.float32)


@pytest.fixture(scope="module")
def pairs(faces_dir):
    rows = labelled_pairs(faces_dir)
    same = [r for r in rows if r[2]][:2]
    different = [r for r in rows if not r[2]][:2]
    return same + different


def test_embed_agrees_with_verify_on_labelled_pairs(client, faces_dir, pairs, figures):
    """The cosine of two /embed embeddings is the similarity /verify reports for the same photos, to 1e-5."""
    for a, b, same in pairs:
        body = _embed(client, faces_dir, a, b)
        assert body["embedding_size"] == 192 and body["format"] == "json"
        assert len(body["model_sha256"]) == 64 and isinstance(body["flip"], bool)
        ea, eb = (_vector(image["faces"][0]) for image in body["images"])
        assert ea.shape == (192,) and abs(float(np.linalg.norm(ea)) - 1) < 1e-5
        verify = client.post(
            "/verify", files={"image1": _pair_file(faces_dir, a), "image2": _pair_file(faces_dir, b)}
        ).json()
        assert abs(float(ea @ eb) - verify["similarity"]) < 1e-5, (a, b)
        assert verify["match"] == same  # the labelled answer, so the embeddings are the right faces
        assert body["images"][0]["faces"][0]["box"] == verify["face1"]["box"]
    figures(f"/embed vs /verify: cosine equal to 1e-5 on {len(pairs)} labelled pairs")


def test_embed_several_images_and_all_faces_in_both_formats(client, faces_dir):
    couple = ("couple.jpg", photo(faces_dir, "groups/couple.jpg"), "image/jpeg")
    files = [("images", _pair_file(faces_dir, "img1.jpg")), ("images", couple),
             ("images", ("none.jpg", no_face_jpeg(faces_dir), "image/jpeg"))]
    as_json = client.post("/embed", files=files, params={"faces": "all"}).json()
    as_b64 = client.post("/embed", files=files, params={"faces": "all", "format": "base64"}).json()
    assert [i["index"] for i in as_json["images"]] == [0, 1, 2]
    assert [i["filename"] for i in as_json["images"]] == ["img1.jpg", "couple.jpg", "none.jpg"]
    assert [len(i["faces"]) for i in as_json["images"]] == [1, 2, 0]  # an image with no face: empty, not an error
    assert as_b64["format"] == "base64"
    for image_j, image_b in zip(as_json["images"], as_b64["images"]):
        for fj, fb in zip(image_j["faces"], image_b["faces"]):
            assert isinstance(fb["embedding"], str)
            np.testing.assert_allclose(_vector(fj), _vector(fb, "base64"), atol=1e-6)
    two = [_vector(f) for f in as_json["images"][1]["faces"]]
    assert float(two[0] @ two[1]) < 0.4  # the two people of the couple are different people
    largest = client.post("/embed", files=files[1:2]).json()["images"][0]["faces"]
    assert len(largest) == 1
    areas = [(f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]) for f in as_json["images"][1]["faces"]]
    assert largest[0]["box"] == as_json["images"][1]["faces"][int(np.argmax(areas))]["box"]
    # JSON bodies work the same (base64 images)
    encoded = base64.b64encode(photo(faces_dir, "pairs/img1.jpg")).decode()
    via_json = client.post("/embed", json={"images": [encoded], "format": "base64"}).json()
    np.testing.assert_allclose(_vector(via_json["images"][0]["faces"][0], "base64"),
                               _vector(as_json["images"][0]["faces"][0]), atol=1e-5)


def test_verify_with_a_client_held_embedding_gives_the_same_answer(client, faces_dir, pairs):
    for a, b, _ in pairs:
        body = _embed(client, faces_dir, b, format="base64")
        held = body["images"][0]["faces"][0]["embedding"]
        photos = client.post(
            "/verify", files={"image1": _pair_file(faces_dir, a), "image2": _pair_file(faces_dir, b)}
        ).json()
        for value in (held, _vector(body["images"][0]["faces"][0], "base64").tolist()):  # base64 and a JSON list
            held_answer = client.post(
                "/verify", files={"image1": _pair_file(faces_dir, a)},
                data={"embedding2": value if isinstance(value, str) else json.dumps(value),
                      "model_sha256": body["model_sha256"]},
            )
            assert held_answer.status_code == 200, held_answer.text
            answer = held_answer.json()
            assert answer["match"] == photos["match"]
            assert abs(answer["similarity"] - photos["similarity"]) < 1e-5
            assert answer["face2"] is None and answer["identity_id"] is None
        # and in a JSON body
        in_json = client.post("/verify", json={
            "image1": base64.b64encode(photo(faces_dir, f"pairs/{a}")).decode(),
            "embedding2": held, "model_sha256": body["model_sha256"],
        }).json()
        assert abs(in_json["similarity"] - photos["similarity"]) < 1e-5


def test_identify_against_client_held_candidates(client, faces_dir, pairs):
    (a, b, _), stranger = pairs[0], pairs[2][1]  # a same-person pair, and someone else
    body = _embed(client, faces_dir, b, stranger, format="base64")
    sha = body["model_sha256"]
    candidates = [
        {"id": "held-person", "embedding": body["images"][0]["faces"][0]["embedding"], "display_name": "Held"},
        {"id": "held-stranger", "embedding": body["images"][1]["faces"][0]["embedding"]},
    ]
    response = client.post("/identify", files={"image": _pair_file(faces_dir, a)},
                           data={"candidates": json.dumps(candidates), "model_sha256": sha})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["decision"]["searched"] == "candidates" and answer["decision"]["gallery_identities"] == 2
    matches = answer["faces"][0]["matches"]
    assert [m["identity_id"] for m in matches] == ["held-person"]  # the stranger is below the threshold
    assert matches[0]["display_name"] == "Held" and matches[0]["faces"] == 1
    verify = client.post("/verify", files={"image1": _pair_file(faces_dir, a), "image2": _pair_file(faces_dir, b)})
    assert abs(matches[0]["similarity"] - verify.json()["similarity"]) < 1e-5
    # Nobody among the candidates: an empty answer, not the nearest one.
    alone = client.post("/identify", files={"image": _pair_file(faces_dir, a)},
                        data={"candidates": json.dumps(candidates[1:]), "model_sha256": sha}).json()
    assert alone["faces"][0]["matches"] == []
    # Nothing was stored: the gallery does not know them.
    assert client.get("/identities/held-person").status_code == 404
    gallery = client.post("/identify", files={"image": _pair_file(faces_dir, a)}).json()
    assert gallery["decision"]["searched"] == "gallery"


def test_enroll_from_embeddings_matches_like_enrolling_the_photo(client, faces_dir, pairs):
    a, b, _ = pairs[0]
    body = _embed(client, faces_dir, b)
    enrolled = client.post("/enroll", json={
        "identity_id": "from-embedding", "display_name": "Moved", "model_sha256": body["model_sha256"],
        "embeddings": [body["images"][0]["faces"][0]["embedding"]],
    })
    assert enrolled.status_code == 200, enrolled.text
    face = enrolled.json()["faces"][0]
    assert face["embedding_index"] == 0 and face["image_index"] is None and face["box"] is None
    by_photo = client.post("/enroll", data={"identity_id": "from-photo"}, files=[("images", _pair_file(faces_dir, b))])
    assert by_photo.status_code == 200
    matches = client.post("/identify", files={"image": _pair_file(faces_dir, a)}).json()["faces"][0]["matches"]
    scores = {m["identity_id"]: m["similarity"] for m in matches}
    assert abs(scores["from-embedding"] - scores["from-photo"]) < 1e-5
    stored = client.get("/identities/from-embedding").json()
    assert stored["faces"][0]["source"] == {"embedding_index": 0} and stored["display_name"] == "Moved"


def _refused(response) -> tuple[int, str]:
    return response.status_code, error_code(response)


def test_refusals(client, faces_dir):
    body = _embed(client, faces_dir, "img1.jpg")
    sha, vector = body["model_sha256"], _vector(body["images"][0]["faces"][0])
    image1 = {"image1": _pair_file(faces_dir, "img2.jpg")}

    def verify(**data):
        return client.post("/verify", files=image1, data=data)

    other_model = "0" * 64
    assert _refused(verify(embedding2=json.dumps(vector.tolist()), model_sha256=other_model)) == (409, "model_mismatch")
    cases = {
        "wrong size": json.dumps(vector[:100].tolist()),
        "not finite": json.dumps([float("nan")] * 192),
        "not unit length": json.dumps((vector * 3).tolist()),
        "base64 of the wrong size": base64.b64encode(vector[:10].astype("<f4").tobytes()).decode(),
        "not base64": "not an embedding!",
    }
    for what, value in cases.items():
        assert _refused(verify(embedding2=value, model_sha256=sha)) == (422, "invalid_parameter"), what
    assert _refused(verify(embedding2=json.dumps(vector.tolist()))) == (422, "invalid_parameter")  # no model
    both = client.post("/verify", files={**image1, "image2": _pair_file(faces_dir, "img3.jpg")},
                       data={"embedding2": json.dumps(vector.tolist()), "model_sha256": sha})
    assert _refused(both) == (422, "invalid_parameter")
    assert _refused(client.post("/verify", files=image1, data={"model_sha256": sha, "identity_id": "x"})) == (
        422, "invalid_parameter")
    # /identify candidates: another model, bad vectors, duplicate ids
    good = {"id": "a", "embedding": vector.tolist()}

    def identify(candidates, model=sha):
        return client.post("/identify", files={"image": _pair_file(faces_dir, "img2.jpg")},
                           data={"candidates": json.dumps(candidates), "model_sha256": model})

    assert _refused(identify([good], other_model)) == (409, "model_mismatch")
    assert _refused(identify([{**good, "embedding": [0.0] * 192}])) == (422, "invalid_parameter")
    assert _refused(identify([good, good])) == (422, "invalid_parameter")
    assert _refused(identify([{**good, "extra": 1}])) == (422, "invalid_parameter")
    # /enroll: another model, a bad vector, images and embeddings together; nothing stored by any of them
    def enroll(json_body):
        return client.post("/enroll", json={"identity_id": "refused", **json_body})

    assert _refused(enroll({"embeddings": [vector.tolist()], "model_sha256": other_model})) == (409, "model_mismatch")
    assert _refused(enroll({"embeddings": [(vector * 0.5).tolist()], "model_sha256": sha})) == (422, "invalid_parameter")
    assert _refused(enroll({"embeddings": [vector.tolist()], "model_sha256": sha,
                              "images": [base64.b64encode(photo(faces_dir, "pairs/img1.jpg")).decode()]})) == (
        422, "invalid_parameter")
    assert _refused(enroll({})) == (422, "invalid_parameter")
    assert client.get("/identities/refused").status_code == 404
    # /embed's own options
    assert _refused(client.post("/embed", files=[("images", _pair_file(faces_dir, "img1.jpg"))],
                                  params={"format": "hex"})) == (422, "invalid_parameter")
    assert _refused(client.post("/embed", json={"faces": "all"})) == (422, "invalid_parameter")  # no images


def test_hostile_embeddings(client, faces_dir):
    """What the review sent: embeddings that cancel out, booleans as numbers, repeated form fields, a huge list."""
    body = _embed(client, faces_dir, "img1.jpg")
    sha, v = body["model_sha256"], _vector(body["images"][0]["faces"][0])
    # v and -v: a template with no direction, refused whole; and -v sent after v, refused too (nothing stored).
    assert _refused(client.post("/enroll", json={"identity_id": "cancel", "model_sha256": sha,
                                                 "embeddings": [v.tolist(), (-v).tolist()]})) == (422, "invalid_parameter")
    assert client.post("/enroll", json={"identity_id": "cancel", "model_sha256": sha,
                                        "embeddings": [v.tolist()]}).status_code == 200
    assert _refused(client.post("/enroll", json={"identity_id": "cancel", "model_sha256": sha,
                                                 "embeddings": [(-v).tolist()]})) == (422, "invalid_parameter")
    assert client.get("/identities/cancel").json()["face_count"] == 1
    # true/false and numeric strings are not numbers
    image1 = {"image1": _pair_file(faces_dir, "img2.jpg")}
    flags = json.dumps([True] + [False] * 191)
    assert _refused(client.post("/verify", json={"image1": base64.b64encode(photo(faces_dir, "pairs/img2.jpg")).decode(),
                                                "embedding2": json.loads(flags), "model_sha256": sha})) == (
        422, "invalid_parameter")
    # Repeated form fields: every embedding is kept; a repeated single-valued option is refused, not overwritten.
    other = _vector(_embed(client, faces_dir, "img2.jpg")["images"][0]["faces"][0])
    fields = [("identity_id", (None, "repeated")), ("model_sha256", (None, sha)),
              ("embeddings", (None, base64.b64encode(v.astype("<f4").tobytes()).decode())),
              ("embeddings", (None, json.dumps(other.tolist())))]
    response = client.post("/enroll", files=fields)
    assert response.status_code == 200, response.text
    assert response.json()["face_count"] == 2
    assert _refused(client.post("/verify", files=image1, data={"threshold": ["0.1", "0.9"]})) == (
        422, "invalid_parameter")
    # A candidate list far over any cap is refused while parsing, before its embeddings are looked at.
    huge = client.post("/identify", json={"image": "AAAA", "model_sha256": sha,
                                          "candidates": [{"id": "a", "embedding": ""}] * 200_000})
    assert huge.status_code == 422 and "candidates" in huge.text
