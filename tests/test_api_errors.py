"""Bad input over HTTP: every case gets its 4xx and machine-readable code, in the one error shape."""

from __future__ import annotations

import base64

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
