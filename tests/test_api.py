"""The API over HTTP with the real default models on real photos: detect, verify, identify, system endpoints."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from api_support import (
    TestClient,
    api_client,
    error_code,
    labelled_pairs,
    no_face_jpeg,
    photo,
    require_default_models,
)
from pydantic import ValidationError

from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def client(models_dir, faces_dir, tmp_path_factory):
    with api_client(models_dir, tmp_path_factory.mktemp("gallery")) as c:
        yield c


def _detect(client, data: bytes, **params):
    response = client.post("/detect", files={"image": ("photo.jpg", data, "image/jpeg")}, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _assert_face_shape(face, width, height):
    x1, y1, x2, y2 = face["box"]
    assert x1 < x2 and y1 < y2
    # A face cut by the image edge keeps its whole box (it may reach past the edge), but it overlaps the image.
    assert x1 < width and x2 > 0 and y1 < height and y2 > 0
    assert 0.0 < face["score"] <= 1.0
    assert len(face["landmarks"]) == 5
    for x, y in face["landmarks"]:  # the five points lie inside their face's box
        assert x1 <= x <= x2 and y1 <= y <= y2
    (lx, _), (rx, _) = face["landmarks"][:2]
    assert lx < rx  # left eye (viewer's side) first


def test_detect_couple_finds_both_faces_in_original_pixels(client, faces_dir):
    body = _detect(client, photo(faces_dir, "groups/couple.jpg"))
    assert body["image"] == {"width": 2280, "height": 1588}
    faces = body["faces"]
    assert len(faces) == 2
    for face in faces:
        _assert_face_shape(face, 2280, 1588)
        # Boxes are in the uploaded image's pixels, not the detector's 640 px input: faces here are large.
        assert face["box"][2] - face["box"][0] > 300
    assert [f["score"] for f in faces] == sorted((f["score"] for f in faces), reverse=True)
    centres = sorted((f["box"][0] + f["box"][2]) / 2 for f in faces)
    assert centres[0] < 1140 < centres[1]  # one person on each half of the photo


def test_detect_selfie_finds_the_crowd(client, faces_dir):
    body = _detect(client, photo(faces_dir, "groups/selfie-many-people.jpg"))
    assert len(body["faces"]) >= 6
    for face in body["faces"]:
        _assert_face_shape(face, body["image"]["width"], body["image"]["height"])


def test_detect_options_filter_faces(client, faces_dir):
    data = photo(faces_dir, "groups/selfie-many-people.jpg")
    everyone = _detect(client, data)["faces"]
    assert len(_detect(client, data, max_faces=2)["faces"]) == 2
    # Options as multipart form fields work the same as query parameters.
    response = client.post("/detect", files={"image": ("s.jpg", data)}, data={"max_faces": "3"})
    assert len(response.json()["faces"]) == 3
    sizes = sorted(min(f["box"][2] - f["box"][0], f["box"][3] - f["box"][1]) for f in everyone)
    cut = sizes[len(sizes) // 2] + 0.01
    big = _detect(client, data, min_face_size=cut)["faces"]
    assert 0 < len(big) < len(everyone)
    assert all(min(f["box"][2] - f["box"][0], f["box"][3] - f["box"][1]) >= cut for f in big)
    strict = _detect(client, data, min_score=0.99)["faces"]
    assert all(f["score"] >= 0.99 for f in strict) and len(strict) <= len(everyone)


def test_detect_accepts_base64_json(client, faces_dir):
    data = photo(faces_dir, "groups/couple.jpg")
    via_multipart = _detect(client, data)
    response = client.post("/detect", json={"image": base64.b64encode(data).decode(), "max_faces": 5})
    assert response.status_code == 200, response.text
    assert response.json() == via_multipart
    data_url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    assert client.post("/detect", json={"image": data_url}).json() == via_multipart


def test_detect_no_face_is_an_empty_list(client, faces_dir):
    assert _detect(client, no_face_jpeg(faces_dir))["faces"] == []


def _verify(client, faces_dir, a: str, b: str, **form):
    files = {
        "image1": (a, photo(faces_dir, f"pairs/{a}"), "image/jpeg"),
        "image2": (b, photo(faces_dir, f"pairs/{b}"), "image/jpeg"),
    }
    response = client.post("/verify", files=files, data=form)
    assert response.status_code == 200, response.text
    return response.json()


def test_verify_labelled_pairs(client, faces_dir, figures):
    """The first 6 same-person and 6 different-person pairs of pairs.csv, in file order (no picking)."""
    pairs = labelled_pairs(faces_dir)
    chosen = [p for p in pairs if p[2]][:6] + [p for p in pairs if not p[2]][:6]
    results = []
    for a, b, same in chosen:
        body = _verify(client, faces_dir, a, b)
        assert -1.0 <= body["similarity"] <= 1.0
        assert body["match"] == (body["similarity"] >= body["threshold"])
        results.append((a, b, same, body["similarity"], body["match"]))
    for a, b, same, similarity, match in results:
        figures(f"{a} {b} same={same} similarity={similarity:.3f} match={match}")
    assert all(match == same for *_, same, _, match in results)
    same_sims = [s for *_, same, s, _ in results if same]
    other_sims = [s for *_, same, s, _ in results if not same]
    assert min(same_sims) > max(other_sims)


def test_verify_reports_the_faces_used(client, faces_dir):
    couple = photo(faces_dir, "groups/couple.jpg")
    detected = _detect(client, couple)["faces"]
    largest = max(range(2), key=lambda i: (detected[i]["box"][2] - detected[i]["box"][0])
                  * (detected[i]["box"][3] - detected[i]["box"][1]))
    response = client.post("/verify", files={"image1": ("c.jpg", couple), "image2": ("c.jpg", couple)})
    body = response.json()
    assert response.status_code == 200, body
    # Same photo, same (largest) face on both sides: similarity 1, and the face is reported as in /detect.
    assert body["similarity"] == pytest.approx(1.0, abs=1e-4) and body["match"]
    assert body["face1"]["index"] == body["face2"]["index"] == largest
    assert body["face1"]["faces_found"] == 2
    assert body["face1"]["box"] == detected[largest]["box"]
    # Choosing the other person in image2: two different people.
    other = 1 - largest
    response = client.post(
        "/verify", files={"image1": ("c.jpg", couple), "image2": ("c.jpg", couple)}, data={"face2": other}
    )
    body = response.json()
    assert body["face2"]["index"] == other and body["face2"]["box"] == detected[other]["box"]
    assert not body["match"] and body["similarity"] < body["threshold"]


def test_verify_without_a_face_says_which_image(client, faces_dir):
    files = {"image1": ("me.jpg", photo(faces_dir, "pairs/img1.jpg")), "image2": ("wall.jpg", no_face_jpeg(faces_dir))}
    response = client.post("/verify", files=files)
    assert response.status_code == 422
    assert error_code(response) == "no_face"
    assert response.json()["error"]["details"]["field"] == "image2"
    assert response.json()["error"]["details"]["filename"] == "wall.jpg"


def test_verify_face_index_out_of_range(client, faces_dir):
    files = {"image1": ("a.jpg", photo(faces_dir, "pairs/img1.jpg")), "image2": ("b.jpg", photo(faces_dir, "pairs/img2.jpg"))}
    response = client.post("/verify", files=files, data={"face1": "3"})
    assert response.status_code == 422 and error_code(response) == "invalid_parameter"
    assert response.json()["error"]["details"]["faces_found"] == 1


def test_identify_on_an_empty_gallery_finds_nobody(client, faces_dir):
    response = client.post("/identify", files={"image": ("c.jpg", photo(faces_dir, "groups/couple.jpg"))})
    body = response.json()
    assert response.status_code == 200, body
    assert len(body["faces"]) == 2 and all(f["matches"] == [] for f in body["faces"])


def test_health_ready_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    models = client.get("/models").json()
    assert models["detector"]["kind"] == "detector" and models["embedder"]["kind"] == "embedder"
    assert len(models["embedder"]["sha256"]) == 64 and len(models["detector"]["sha256"]) == 64
    assert models["embedder"]["input_size"] == [112, 112]
    assert models["embedder"]["embedding_size"] == 192
    assert models["embedder"]["metadata"]["face.embedder.embedding_size"] == "192"
    assert -1 <= models["embedder"]["threshold"] <= 1
    assert models["gallery"]["foreign_faces"] == 0


def test_metrics_count_requests_and_stages(client, faces_dir):
    _detect(client, photo(faces_dir, "pairs/img5.jpg"))
    # /identify aligns and embeds too, so this test does not depend on the ones before it having done so.
    identified = client.post("/identify", files={"image": ("a.jpg", photo(faces_dir, "pairs/img5.jpg"))})
    assert identified.status_code == 200
    text = client.get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['face_http_requests_total{endpoint="/detect",method="POST",status="200"}'] >= 1
    assert samples['face_http_request_duration_seconds_count{endpoint="/detect",method="POST"}'] >= 1
    for stage in ("decode", "detect", "align", "embed"):
        assert samples[f'face_stage_duration_seconds_count{{stage="{stage}"}}'] >= 1, stage
    assert 'face_stage_duration_seconds_count{stage="search"}' in samples


def test_metrics_labels_stay_bounded(client):
    # Any token is a valid HTTP method and any string fits a path parameter: neither may mint a new series.
    for i in range(3):
        client.request(f"BREW{i}", "/identities/someone")
        client.get(f"/identities/random-{i}-xyz")
        client.get(f"/no/such/path/{i}")
    text = client.get("/metrics").text
    pattern = r'^face_http_requests_total\{endpoint="([^"]*)",method="([^"]*)"'
    labels = set(re.findall(pattern, text, re.MULTILINE))
    assert ("/identities/{identity_id}", "other") in labels and ("/identities/{identity_id}", "GET") in labels
    assert ("unmatched", "GET") in labels
    assert not any("BREW" in method or "random" in path or "/no/" in path for path, method in labels)


def test_detect_mirror_photo_finds_one_face(client, faces_dir):
    # ../shared/data/README.md: exactly 1 face with this detector at 640 px on the long side, which is where
    # the service resizes this 1174x1564 photo to.
    body = _detect(client, photo(faces_dir, "groups/mirror-reflection.jpg"))
    assert body["image"] == {"width": 1174, "height": 1564}
    assert len(body["faces"]) == 1, body
    face = body["faces"][0]
    _assert_face_shape(face, 1174, 1564)
    assert face["score"] > 0.99
    x1, y1, x2, y2 = face["box"]
    assert 400 < x2 - x1 < 800 and (y1 + y2) / 2 < 1564 / 2  # a large face, centred in the upper half
    (_, left_eye_y), (_, right_eye_y), _, (_, mouth_left_y), (_, mouth_right_y) = face["landmarks"]
    assert max(left_eye_y, right_eye_y) < min(mouth_left_y, mouth_right_y)  # upright: eyes above the mouth


def test_openapi_documents_both_encodings(client):
    spec = client.get("/openapi.json").json()
    for path in ("/detect", "/verify", "/identify", "/enroll"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(content)
    detect = spec["paths"]["/detect"]["post"]["requestBody"]["content"]
    assert detect["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert detect["application/json"]["schema"]["properties"]["image"]["format"] == "byte"
    assert spec["paths"]["/identify"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    for path in ("/identities", "/identities/{identity_id}", "/health", "/ready", "/metrics", "/models"):
        assert path in spec["paths"]


def test_every_reference_in_the_openapi_document_resolves(client):
    """A `$ref` to a `$defs` the document does not hold (pydantic's nested models, in a hand-built request body)
    makes ReDoc refuse the whole document: /redoc was a blank error page."""
    spec = client.get("/openapi.json").json()

    def refs(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = set(refs(spec))
    assert found  # the walk sees references (responses use components/schemas)
    for ref in found:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in spec["components"]["schemas"], ref
    candidates = spec["paths"]["/identify"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "embedding" in json.dumps(candidates["properties"]["candidates"])  # inlined, not lost


def test_concurrent_requests_are_all_answered(client, faces_dir):
    from concurrent.futures import ThreadPoolExecutor

    data = photo(faces_dir, "pairs/img5.jpg")
    expected = _detect(client, data)
    with ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda _: _detect(client, data), range(8)))
    assert all(b == expected for b in bodies)
    assert np.isfinite([f["score"] for b in bodies for f in b["faces"]]).all()


def test_settings_come_from_the_environment(models_dir, monkeypatch, tmp_path):
    require_default_models(models_dir)
    monkeypatch.setenv("FACE_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.setenv("PORT", "9123")
    monkeypatch.setenv("FACE_MAX_FACES", "7")
    monkeypatch.setenv("FACE_MATCH_THRESHOLD", "0.5")
    settings = Settings()
    assert (settings.host, settings.port, settings.max_faces, settings.match_threshold) == ("0.0.0.0", 9123, 7, 0.5)
    for name, value in [("PORT", "0"), ("FACE_MATCH_THRESHOLD", "2"), ("FACE_MAX_FACES", "0"),
                        ("FACE_INFERENCE_WORKERS", "zero"), ("FACE_MODELS_DIR", str(tmp_path))]:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError):
            Settings()
        monkeypatch.delenv(name)


def test_not_ready_until_the_models_are_loaded(models_dir, tmp_path):
    require_default_models(models_dir)
    app = create_app(Settings(models_dir=models_dir, gallery_path=tmp_path / "g.db"))
    client = TestClient(app, raise_server_exceptions=False)  # not entered: the lifespan has not run
    assert client.get("/health").status_code == 200
    response = client.get("/ready")
    assert response.status_code == 503 and error_code(response) == "not_ready"
    response = client.post("/detect", files={"image": ("a.jpg", b"\xff\xd8\xff")})
    assert response.status_code == 503 and error_code(response) == "not_ready"
