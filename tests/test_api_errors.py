"""Bad input over HTTP: every case gets its 4xx and machine-readable code, in the one error shape."""

from __future__ import annotations

import base64
import struct

import cv2
import numpy as np
import pytest
from api_support import api_client, error_code, photo, png_bomb

MAX_BYTES = 2 * 1024 * 1024  # small limits, so the oversized cases stay cheap to build and send


@pytest.fixture(scope="module")
def client(models_dir, tmp_path_factory):
    with api_client(
        models_dir, tmp_path_factory.mktemp("gallery"), max_image_bytes=MAX_BYTES, max_image_pixels=20_000_000
    ) as c:
        yield c


def _post_image(client, path, image: bytes, field="image", **kw):
    return client.post(path, files={field: ("upload.bin", image, "application/octet-stream")}, **kw)


def _assert_error(response, status, code):
    assert response.status_code == status, response.text
    assert error_code(response) == code
    assert response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/detect", "/identify"])
def test_not_an_image(client, path):
    _assert_error(_post_image(client, path, b"this is plain text, not a picture"), 400, "invalid_image")
    _assert_error(_post_image(client, path, b""), 400, "invalid_image")


def test_truncated_jpeg(client, faces_dir):
    data = photo(faces_dir, "pairs/img5.jpg")
    response = _post_image(client, "/detect", data[: len(data) // 2])
    _assert_error(response, 400, "invalid_image")
    assert response.json()["error"]["details"]["field"] == "image"


def test_unsupported_format(client, faces_dir):
    gif = b"GIF89a" + b"\x00" * 100
    _assert_error(_post_image(client, "/detect", gif), 415, "unsupported_media_type")


def test_decompression_bomb_is_refused_before_decoding(client):
    bomb = png_bomb(10_000, 10_000)  # 100 MP declared, ~100 KB sent
    assert len(bomb) < 1_000_000
    response = _post_image(client, "/detect", bomb)
    _assert_error(response, 413, "image_too_large")
    assert response.json()["error"]["details"]["width"] == 10_000


def test_oversized_body_is_refused_from_its_content_length(client):
    response = _post_image(client, "/detect", b"\xff\xd8\xff" + b"\x00" * (3 * MAX_BYTES))
    _assert_error(response, 413, "image_too_large")
    assert "max_body_bytes" in response.json()["error"]["details"]


def test_oversized_image_within_a_body_limit(client):
    # /enroll allows a body of several images, so one image over the per-image limit reaches the reader.
    big = b"\xff\xd8\xff" + b"\x00" * (MAX_BYTES + 10)
    response = client.post("/enroll", data={"identity_id": "big"}, files=[("images", ("big.jpg", big))])
    _assert_error(response, 413, "image_too_large")
    details = response.json()["error"]["details"]
    assert details["field"] == "images" and details["filename"] == "big.jpg" and details["image_index"] == 0


def test_oversized_chunked_body_is_cut_off(client):
    def chunks():  # a well-formed start, then more image bytes than any limit allows
        yield b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        for _ in range(4):
            yield b"\x00" * MAX_BYTES

    response = client.post(
        "/detect", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"}
    )
    _assert_error(response, 413, "image_too_large")
    assert "max_body_bytes" in response.json()["error"]["details"]
    metrics = client.get("/metrics").text
    assert 'face_http_requests_total{endpoint="/detect",method="POST",status="413"}' in metrics


def test_oversized_base64(client):
    text = base64.b64encode(b"\xff\xd8\xff" + b"\x00" * (MAX_BYTES + 10)).decode()
    _assert_error(client.post("/detect", json={"image": text}), 413, "image_too_large")


def test_invalid_base64(client):
    _assert_error(client.post("/detect", json={"image": "not base64!!"}), 400, "invalid_image")
    _assert_error(client.post("/detect", json={"image": 12}), 422, "invalid_parameter")


@pytest.mark.parametrize(
    "path, params",
    [
        ("/identify", {"top_k": 0}),
        ("/identify", {"top_k": "many"}),
        ("/identify", {"threshold": 1.5}),
        ("/detect", {"min_score": 2}),
        ("/detect", {"min_score": -0.1}),
        ("/detect", {"max_faces": 0}),
        ("/detect", {"min_face_size": -5}),
        ("/detect", {"topk": 3}),  # unknown option: a typo must not fall back to a default silently
    ],
)
def test_bad_parameters(client, faces_dir, path, params):
    data = photo(faces_dir, "pairs/img5.jpg")
    for response in (
        _post_image(client, path, data, params=params),  # query
        _post_image(client, path, data, data={k: str(v) for k, v in params.items()}),  # form
        client.post(path, json={"image": base64.b64encode(data).decode(), **params}),  # JSON
    ):
        _assert_error(response, 422, "invalid_parameter")
        field = next(iter(params))
        assert any(e["field"] == field for e in response.json()["error"]["details"]["errors"]), response.text


def test_missing_image_and_wrong_body_type(client):
    response = client.post("/detect", data={"max_faces": "2"}, files={"other": ("x.jpg", b"123")})
    _assert_error(response, 422, "invalid_parameter")
    response = client.post("/detect", json={"max_faces": 2})
    _assert_error(response, 422, "invalid_parameter")
    assert response.json()["error"]["details"]["field"] == "image"
    response = client.post("/detect", content=b"raw bytes", headers={"content-type": "image/jpeg"})
    _assert_error(response, 415, "unsupported_media_type")
    response = client.post("/detect", content=b"{not json", headers={"content-type": "application/json"})
    _assert_error(response, 422, "invalid_parameter")
    response = client.post("/detect", json=["a", "list"])
    _assert_error(response, 422, "invalid_parameter")


def test_verify_needs_image2_or_identity(client, faces_dir):
    data = photo(faces_dir, "pairs/img5.jpg")
    _assert_error(client.post("/verify", files={"image1": ("a.jpg", data)}), 422, "invalid_parameter")
    both = client.post(
        "/verify", files={"image1": ("a.jpg", data), "image2": ("b.jpg", data)}, data={"identity_id": "x"}
    )
    _assert_error(both, 422, "invalid_parameter")
    _assert_error(client.post("/verify", files={"image2": ("b.jpg", data)}), 422, "invalid_parameter")


def test_verify_no_face_in_image1(client, faces_dir):
    blank = cv2.imencode(".png", np.full((240, 320, 3), 128, np.uint8))[1].tobytes()
    response = client.post(
        "/verify", files={"image1": ("blank.png", blank), "image2": ("b.jpg", photo(faces_dir, "pairs/img5.jpg"))}
    )
    _assert_error(response, 422, "no_face")
    assert response.json()["error"]["details"]["field"] == "image1"


def test_too_many_enrolment_images(client, faces_dir):
    data = photo(faces_dir, "pairs/img25.jpg")
    files = [("images", (f"{i}.jpg", data)) for i in range(11)]  # FACE_MAX_ENROLL_IMAGES defaults to 10
    _assert_error(client.post("/enroll", data={"identity_id": "many"}, files=files), 422, "invalid_parameter")
    assert client.get("/identities/many").status_code == 404


def test_unknown_routes_and_methods_keep_the_error_shape(client):
    _assert_error(client.get("/no/such/path"), 404, "not_found")
    _assert_error(client.get("/detect"), 405, "method_not_allowed")
    _assert_error(client.post("/identities"), 405, "method_not_allowed")
    # Allow names every method of the path, also when they live on separate routes (GET and DELETE here).
    assert client.get("/detect").headers["Allow"] == "POST"
    answer = client.request("OPTIONS", "/identities/alice.smith")
    _assert_error(answer, 405, "method_not_allowed")
    assert set(answer.headers["Allow"].split(", ")) == {"GET", "HEAD", "DELETE"}  # HEAD wherever GET is
    assert set(client.put("/identities/alice/faces/0123456789abcdef").headers["Allow"].split(", ")) == {"DELETE"}


def test_no_error_leaves_as_a_500(client, faces_dir):
    """A tour of odd inputs; none may surface as a server error."""
    odd = [
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 30,  # PNG signature, broken header
        b"\xff\xd8\xff\xe0" + b"\xff" * 64,  # JPEG markers and nothing else
        b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 20,
        b"BM" + b"\x00" * 60,
        cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))[1].tobytes(),  # 1x1 pixel
        cv2.imencode(".png", np.zeros((4000, 1, 3), np.uint8))[1].tobytes(),  # a 1-pixel-wide sliver
    ]
    for data in odd:
        for path in ("/detect", "/identify"):
            response = _post_image(client, path, data)
            assert response.status_code < 500, (path, data[:16], response.text)
            assert "error" in response.json() or "faces" in response.json()


def test_an_unexpected_failure_is_a_500_that_reveals_nothing(client, faces_dir, monkeypatch):
    pipeline = client.app.state.runtime.pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(pipeline, "detect", broken)
    response = _post_image(client, "/detect", photo(faces_dir, "pairs/img5.jpg"))
    _assert_error(response, 500, "internal_error")
    assert "secret" not in response.text
    monkeypatch.undo()
    assert _post_image(client, "/detect", photo(faces_dir, "pairs/img5.jpg")).status_code == 200


# --- hostile JSON, parameters out of range, bad images on every image endpoint ----------------------------

IMAGE_ENDPOINTS = ["/detect", "/verify", "/identify", "/enroll"]


@pytest.mark.parametrize("path", IMAGE_ENDPOINTS)
def test_json_too_deep_or_with_a_huge_integer_is_a_422(client, path):
    # Python's json parser raises RecursionError on `[[[[...` and ValueError on an integer over 4300 digits:
    # neither is a JSONDecodeError, and both once escaped as 500s.
    deep = "[" * 5000 + "]" * 5000
    huge = '{"max_faces": ' + "7" * 5000 + "}"
    for body in (deep, '{"image": ' + deep + "}", huge):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        _assert_error(response, 422, "invalid_parameter")


def test_enroll_metadata_too_deep_is_a_422(client, faces_dir):
    image = [("images", ("a.jpg", photo(faces_dir, "pairs/img25.jpg")))]
    # 30,000 brackets fit the 64 KiB form-field cap; json.loads raised RecursionError inside the validator.
    too_deep = ("[" * 30000, '{"a": ' + "[" * 30000 + "]" * 30000 + "}", '{"a": ' + "[" * 40 + "]" * 40 + "}")
    for metadata in too_deep:
        response = client.post("/enroll", data={"identity_id": "deep", "metadata": metadata}, files=image)
        _assert_error(response, 422, "invalid_parameter")
        assert response.json()["error"]["details"]["errors"][0]["field"] == "metadata"
    # Through a JSON body the parser takes a few hundred levels; the gallery must still not store them.
    encoded = base64.b64encode(photo(faces_dir, "pairs/img25.jpg")).decode()
    metadata = '{"a": ' + "[" * 400 + "]" * 400 + "}"
    body = '{"identity_id": "deep", "images": ["' + encoded + '"], "metadata": ' + metadata + "}"
    _assert_error(client.post("/enroll", content=body, headers={"content-type": "application/json"}),
                  422, "invalid_parameter")
    assert client.get("/identities/deep").status_code == 404


def _random_bytes() -> bytes:
    return bytes(np.random.default_rng(7).integers(0, 256, 2048, dtype=np.uint8))


def _truncated_jpeg(faces_dir) -> bytes:
    data = photo(faces_dir, "pairs/img5.jpg")
    return data[: len(data) * 2 // 3]


@pytest.mark.parametrize("bad_field", ["image1", "image2"])
@pytest.mark.parametrize("bad_kind", ["random", "truncated"])
def test_verify_invalid_image_names_the_image(client, faces_dir, bad_field, bad_kind):
    bad = _random_bytes() if bad_kind == "random" else _truncated_jpeg(faces_dir)
    good = photo(faces_dir, "pairs/img2.jpg")
    files = {"image1": ("a.jpg", good), "image2": ("b.jpg", good), bad_field: ("bad.jpg", bad)}
    response = client.post("/verify", files=files)
    _assert_error(response, 400, "invalid_image")
    details = response.json()["error"]["details"]
    assert details["field"] == bad_field and details["filename"] == "bad.jpg"


@pytest.mark.parametrize("bad_kind", ["random", "truncated"])
def test_enroll_invalid_image_is_rejected_and_nothing_stored(client, faces_dir, bad_kind):
    bad = _random_bytes() if bad_kind == "random" else _truncated_jpeg(faces_dir)
    files = [("images", ("good.jpg", photo(faces_dir, "pairs/img25.jpg"))), ("images", ("bad.jpg", bad))]
    response = client.post("/enroll", data={"identity_id": "half-bad"}, files=files)
    _assert_error(response, 400, "invalid_image")
    rejected = response.json()["error"]["details"]["rejected"]
    assert [(r["image_index"], r["filename"], r["code"]) for r in rejected] == [
        (1, "bad.jpg", "invalid_image")
    ]
    assert client.get("/identities/half-bad").status_code == 404


@pytest.mark.parametrize(
    "params",
    [{"threshold": 2}, {"face1": -1}, {"face2": "abc"}, {"min_score": 0}, {"identity_id": "no way!"}],
)
def test_verify_bad_parameters(client, faces_dir, params):
    data = photo(faces_dir, "pairs/img5.jpg")
    files = {"image1": ("a.jpg", data), "image2": ("b.jpg", data)}
    encoded = base64.b64encode(data).decode()
    for response in (
        client.post("/verify", files=files, params=params),
        client.post("/verify", files=files, data={k: str(v) for k, v in params.items()}),
        client.post("/verify", json={"image1": encoded, "image2": encoded, **params}),
    ):
        _assert_error(response, 422, "invalid_parameter")
        field = next(iter(params))
        assert any(e["field"] == field for e in response.json()["error"]["details"]["errors"]), response.text


@pytest.mark.parametrize(
    "field, form",
    [
        ("multiple_faces", {"identity_id": "ok-id", "multiple_faces": "bogus"}),
        ("identity_id", {"identity_id": "-starts-with-dash"}),
        ("identity_id", {"identity_id": "has space"}),
        ("identity_id", {"identity_id": "x" * 129}),
        ("display_name", {"identity_id": "ok-id", "display_name": "n" * 257}),
    ],
)
def test_enroll_bad_parameters(client, faces_dir, field, form):
    image = [("images", ("a.jpg", photo(faces_dir, "pairs/img25.jpg")))]
    response = client.post("/enroll", data=form, files=image)
    _assert_error(response, 422, "invalid_parameter")
    assert any(e["field"] == field for e in response.json()["error"]["details"]["errors"]), response.text
    assert client.get(f"/identities/{form['identity_id']}").status_code in (404, 422)  # nothing stored


@pytest.mark.parametrize("kind", ["jpeg", "webp"])
@pytest.mark.parametrize("path", ["/detect", "/verify", "/enroll"])
def test_jpeg_and_webp_bombs_are_refused_over_http(client, faces_dir, kind, path):
    # A real, small photo whose header claims 16383 x 16383 pixels (268 MP, the most a VP8 frame can declare).
    image = cv2.imread(str(faces_dir / "pairs" / "img5.jpg"))
    if kind == "jpeg":
        data = bytearray(cv2.imencode(".jpg", image)[1].tobytes())
        sof = data.index(b"\xff\xc0")  # OpenCV writes baseline JPEGs: height, width at +5
        data[sof + 5 : sof + 9] = struct.pack(">HH", 16383, 16383)
    else:
        data = bytearray(cv2.imencode(".webp", image, [cv2.IMWRITE_WEBP_QUALITY, 80])[1].tobytes())
        assert data[12:16] == b"VP8 "
        data[26:30] = struct.pack("<HH", 16383, 16383)
    assert len(data) < 100_000
    field = {"/detect": "image", "/verify": "image1", "/enroll": "images"}[path]
    files = [(field, ("bomb.bin", bytes(data)))]
    if path == "/verify":
        files.append(("image2", ("b.jpg", photo(faces_dir, "pairs/img5.jpg"))))
    form = {"identity_id": "bomb"} if path == "/enroll" else {}
    response = client.post(path, files=files, data=form)
    _assert_error(response, 413, "image_too_large")
    details = response.json()["error"]["details"]
    if path == "/enroll":
        details = details["rejected"][0]
    assert (details["width"], details["height"]) == (16383, 16383) and details["field"] == field
