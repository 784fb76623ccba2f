"""docker-compose.replicas.yml (several replicas on PostgreSQL, nginx in front) follows the Compose specification and
wires what the service needs: a pgvector image, a FACE_GALLERY_URL the settings accept that names that database,
replicas without host ports behind a proxy that forwards to them with a body limit /enroll fits in.

Validated against the same vendored schema as docker-compose.yml (tests/test_compose.py says where it comes from).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from test_compose import SCHEMA_FILE, _environment, _setting_names, _validator, settings_from

from service.settings import Settings, gallery_store

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.replicas.yml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_follows_the_compose_spec(compose):
    import json

    errors = sorted(_validator(json.loads(SCHEMA_FILE.read_text())).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    assert set(compose["services"]) == {"postgres", "facerec", "proxy"}


def test_the_replicas_share_the_pgvector_database(compose, tmp_path, monkeypatch):
    postgres, facerec = compose["services"]["postgres"], compose["services"]["facerec"]
    assert postgres["image"].startswith("pgvector/pgvector:pg16")
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])  # data outlives containers
    assert facerec["depends_on"]["postgres"]["condition"] == "service_healthy"
    env = _environment(facerec, {"POSTGRES_PASSWORD": "s3cret"})
    assert set(env) <= _setting_names(), set(env) - _setting_names()
    pg_env = _environment(postgres, {"POSTGRES_PASSWORD": "s3cret"})

    # What a replica gets is a valid configuration whose gallery is that database.
    settings = settings_from(env, tmp_path, monkeypatch)
    store, url = gallery_store(settings.gallery_url)
    assert store == "postgresql"
    assert url == f"postgresql://{pg_env['POSTGRES_USER']}:s3cret@postgres:5432/{pg_env['POSTGRES_DB']}"
    # Several replicas, none published on the host: the proxy is the way in.
    assert facerec["deploy"]["replicas"] >= 2
    assert "ports" not in facerec
    assert "/ready" in " ".join(facerec["healthcheck"]["test"])


def test_the_proxy_forwards_to_every_replica(compose):
    proxy = compose["services"]["proxy"]
    assert re.fullmatch(r"127\.0\.0\.1:\$\{FACE_HOST_PORT:-8000\}:8000", proxy["ports"][0])
    assert any(str(v).startswith("./deploy/nginx.conf:") for v in proxy["volumes"])
    conf = NGINX_CONF.read_text()
    assert re.search(r"listen 8000;", conf)
    assert re.search(r"server facerec:8000\b", conf)  # the service name: Docker's DNS lists every replica
    assert "proxy_pass http://facerec;" in conf
    assert not re.search(r"^\s*proxy_next_upstream [^;#]*non_idempotent", conf, re.MULTILINE)
    body = re.search(r"client_max_body_size (\d+)m;", conf)
    fields = Settings.model_fields
    enroll_limit = fields["max_enroll_images"].default * fields["max_image_bytes"].default
    assert body and int(body.group(1)) * 2**20 > enroll_limit, "the proxy would refuse a largest /enroll"
