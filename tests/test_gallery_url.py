"""FACE_GALLERY_URL: which store, where; FACE_GALLERY_PATH as its older spelling; refusals that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, gallery_store, redact_url


@pytest.fixture
def models(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("retinaface_mnet025.onnx", "mobilefacenet_192.onnx"):
        (folder / name).write_bytes(b"")
    return folder


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    monkeypatch.delenv("FACE_GALLERY_URL", raising=False)
    monkeypatch.delenv("FACE_GALLERY_PATH", raising=False)


def test_the_default_is_the_sqlite_file(models, monkeypatch) -> None:
    assert Settings(models_dir=models).gallery_url == "sqlite:///data/gallery.db"
    assert gallery_store("sqlite:///data/gallery.db") == ("sqlite", "data/gallery.db")
    assert gallery_store("sqlite:////srv/gallery.db") == ("sqlite", "/srv/gallery.db")
    monkeypatch.setenv("FACE_GALLERY_PATH", "/srv/g.db")  # the older setting still works
    assert gallery_store(Settings(models_dir=models).gallery_url) == ("sqlite", "/srv/g.db")


def test_postgresql_urls(models, monkeypatch) -> None:
    url = "postgresql://facerec:s3cret@db:5432/facerec"
    monkeypatch.setenv("FACE_GALLERY_URL", url)
    settings = Settings(models_dir=models)
    assert gallery_store(settings.gallery_url) == ("postgresql", url)
    assert gallery_store("postgres://db/x")[0] == "postgresql"
    assert redact_url(url) == "postgresql://facerec:***@db:5432/facerec"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("mysql://db/x", "unsupported gallery store"),
        ("gallery.db", "is not a URL"),
        ("sqlite://gallery.db", "sqlite:///relative/path.db"),
        ("sqlite:///", "sqlite:///relative/path.db"),
    ],
)
def test_bad_urls_are_refused_naming_the_setting(models, monkeypatch, url, reason) -> None:
    monkeypatch.setenv("FACE_GALLERY_URL", url)
    with pytest.raises(ValidationError, match=f"FACE_GALLERY_URL.*{reason}"):
        Settings(models_dir=models)


def test_two_different_galleries_are_refused(models, monkeypatch) -> None:
    monkeypatch.setenv("FACE_GALLERY_URL", "postgresql://db/x")
    monkeypatch.setenv("FACE_GALLERY_PATH", "/srv/g.db")
    with pytest.raises(ValidationError, match="FACE_GALLERY_URL and FACE_GALLERY_PATH"):
        Settings(models_dir=models)
    monkeypatch.setenv("FACE_GALLERY_URL", "sqlite:////srv/g.db")  # the same file twice is fine
    assert Settings(models_dir=models).gallery_url == "sqlite:////srv/g.db"
