"""API keys: with FACE_API_KEYS set, everything but /health and /ready needs a valid key (the docs too, unless
FACE_PUBLIC_DOCS is set)."""

from __future__ import annotations

import pytest
from api_support import API_KEY, api_client, error_code, photo, require_default_models
from pydantic import ValidationError

from service.security import key_matches
from service.settings import Settings

OTHER_KEY = "second-key-fedcba9876543210"


@pytest.fixture(scope="module")
def client(models_dir, tmp_path_factory):
    with api_client(models_dir, tmp_path_factory.mktemp("gallery"), api_keys=f"{API_KEY}, {OTHER_KEY}") as c:
        yield c


PROTECTED = [
    ("get", "/models"),
    ("get", "/metrics"),
    ("get", "/identities"),
    ("get", "/identities/someone"),
    ("delete", "/identities/someone"),
    ("delete", "/identities/someone/faces/0123456789abcdef"),
    ("post", "/detect"),
    ("post", "/verify"),
    ("post", "/identify"),
    ("post", "/enroll"),
    # The API's description is not public either, unless FACE_PUBLIC_DOCS says so (test below).
    ("get", "/openapi.json"),
    ("get", "/docs"),
    ("get", "/docs/oauth2-redirect"),
    ("get", "/redoc"),
]


@pytest.mark.parametrize("method, path", PROTECTED)
def test_protected_endpoints_refuse_missing_and_wrong_keys(client, method, path):
    for headers in ({}, {"X-API-Key": "wrong-key-0123456789abcdef"}, {"Authorization": f"Bearer {API_KEY}x"},
                    {"Authorization": f"Basic {API_KEY}"}):
        response = getattr(client, method)(path, headers=headers)
        assert response.status_code == 401, (path, headers, response.text)
        assert error_code(response) == "unauthorized"
        assert "WWW-Authenticate" in response.headers


def test_health_and_ready_stay_open(client):
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200


def test_valid_keys_in_either_header(client, faces_dir):
    image = {"image": ("a.jpg", photo(faces_dir, "pairs/img5.jpg"))}
    for headers in ({"X-API-Key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": OTHER_KEY}):
        assert client.get("/models", headers=headers).status_code == 200
        response = client.post("/detect", files=image, headers=headers)
        assert response.status_code == 200 and len(response.json()["faces"]) == 1


def test_docs_with_a_key(client):
    headers = {"X-API-Key": API_KEY}
    spec = client.get("/openapi.json", headers=headers)
    assert spec.status_code == 200 and "/detect" in spec.json()["paths"]
    assert "/docs" not in spec.json()["paths"]  # the docs routes describe the API, they are not part of it
    for path in ("/docs", "/redoc"):
        page = client.get(path, headers=headers)
        assert page.status_code == 200 and "/openapi.json" in page.text


def test_the_document_asks_for_a_key_only_when_one_is_needed(client, models_dir, tmp_path):
    spec = client.get("/openapi.json", headers={"X-API-Key": API_KEY}).json()
    detect = spec["paths"]["/detect"]["post"]
    assert set(spec["components"]["securitySchemes"]) == {"APIKeyHeader", "HTTPBearer"}
    assert detect["security"] and "401" in detect["responses"]
    assert "security" not in spec["paths"]["/health"]["get"]  # open even with keys
    with api_client(models_dir, tmp_path) as open_api:  # no FACE_API_KEYS: nothing asks for a key
        spec = open_api.get("/openapi.json").json()
        assert "securitySchemes" not in spec.get("components", {})
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                assert "security" not in operation and "401" not in operation["responses"], (method, path)
        assert open_api.post("/detect", files={"image": ("x.bin", b"not an image")}).status_code == 400


def test_public_docs_setting_opens_the_docs_and_nothing_else(models_dir, tmp_path):
    with api_client(models_dir, tmp_path, api_keys=API_KEY, public_docs=True) as public:
        spec = public.get("/openapi.json")
        assert spec.status_code == 200
        # The security schemes are what puts the "Authorize" button on /docs.
        assert set(spec.json()["components"]["securitySchemes"]) == {"APIKeyHeader", "HTTPBearer"}
        assert public.get("/docs").status_code == 200 and "swagger-ui" in public.get("/docs").text
        assert public.get("/redoc").status_code == 200
        for method, path in PROTECTED:
            if path not in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"):
                response = getattr(public, method)(path)
                assert response.status_code == 401 and error_code(response) == "unauthorized", path


def test_public_docs_setting_from_the_environment(models_dir, monkeypatch):
    require_default_models(models_dir)
    monkeypatch.setenv("FACE_MODELS_DIR", str(models_dir))
    monkeypatch.delenv("FACE_PUBLIC_DOCS", raising=False)
    assert Settings().public_docs is False
    monkeypatch.setenv("FACE_PUBLIC_DOCS", "true")
    assert Settings().public_docs is True
    monkeypatch.setenv("FACE_PUBLIC_DOCS", "perhaps")
    with pytest.raises(ValidationError):
        Settings()


def test_key_check_happens_before_the_body_is_used(client):
    # An unauthenticated client learns nothing about its input: 401, not a validation error.
    response = client.post("/detect", files={"image": ("x.jpg", b"not an image")})
    assert response.status_code == 401


def test_key_matching():
    assert key_matches(API_KEY, [OTHER_KEY, API_KEY])
    assert not key_matches(API_KEY[:-1], [API_KEY])
    assert not key_matches("", [API_KEY])
    assert not key_matches(API_KEY, [])


def test_settings_parse_and_check_keys(models_dir, monkeypatch):
    require_default_models(models_dir)
    monkeypatch.setenv("FACE_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("FACE_API_KEYS", f" {API_KEY} ,,{OTHER_KEY} ")
    assert Settings().api_keys == [API_KEY, OTHER_KEY]
    monkeypatch.setenv("FACE_API_KEYS", "")
    assert Settings().api_keys == []
    monkeypatch.setenv("FACE_API_KEYS", "short")
    with pytest.raises(ValidationError):
        Settings()


def test_the_docs_pages_load_nothing_from_another_host(client):
    """FastAPI's own pages load Swagger UI and ReDoc from a CDN, blank without internet; ours reference only this
    server, and the assets they name are served (without a key: they are the same public files for everyone)."""
    import re

    headers = {"X-API-Key": API_KEY}
    for path, assets in (("/docs", {"swagger-ui-bundle.js", "swagger-ui.css"}), ("/redoc", {"redoc.standalone.js"})):
        page = client.get(path, headers=headers).text
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page)
        assert urls and not [u for u in urls if "//" in u], (path, urls)
        assert "fonts.googleapis" not in page and "cdn" not in page.lower()
        named = {u.rsplit("/", 1)[-1] for u in urls}
        assert assets <= named, (path, named)
        for url in urls:
            if url.startswith("/docs/assets/"):
                asset = client.get(url)
                assert asset.status_code == 200 and len(asset.content) > 1000, url


def test_the_demo_page_is_public_and_self_contained(client):
    """A browser opens /demo without a key (it holds nothing secret; the stream and /enroll it uses ask for the
    key), and everything the page loads comes from this server."""
    import re

    page = client.get("/demo")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert {"demo/assets/demo.js", "demo/assets/demo.css"} <= set(urls) and not [u for u in urls if "//" in u]
    for url in urls:
        asset = client.get("/" + url)
        assert asset.status_code == 200 and len(asset.content) > 500, url
        assert "http://" not in asset.text and "https://" not in asset.text, url
    assert client.get("/demo/assets/../../settings.py").status_code == 404
