"""Shared fixtures: where the real data and the built default models live.

Tests that need `../shared/data` (real photos, LFW pairs, real checkpoints) skip with a reason when it is absent;
a user's fresh clone has no `../shared`, CI always has it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FACEREC_SHARED_DATA", ROOT.parent / "shared" / "data"))
MODELS_DIR = Path(os.environ.get("FACE_MODELS_DIR", ROOT / "artifacts" / "models"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (shared test data not available)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def faces_dir(shared_data: Path) -> Path:
    return _need(shared_data / "faces")


@pytest.fixture(scope="session")
def weights_dir(shared_data: Path) -> Path:
    return _need(shared_data / "weights")


@pytest.fixture(scope="session")
def lfw_dir(shared_data: Path) -> Path:
    return _need(shared_data / "lfw-dev")


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL 16 with pgvector for the whole session (tests/pg_support.py). Skips where the `pgserver`
    wheel is not installed (it is in the test extra; it has wheels for Linux and macOS)."""
    pytest.importorskip("pgserver", reason="the pgserver wheel (PostgreSQL + pgvector) is not installed")
    from pg_support import PostgresServer

    # Not under pytest's own temporary folder: the server runs as another user (pgserver does that when run as
    # root), and every pytest session that starts on the machine resets /tmp/pytest-of-<user> to mode 0700,
    # which would lock a running server out of its own files. Also short: its Unix socket lives there.
    folder = Path(tempfile.mkdtemp(prefix="facerec-pg-"))
    server = PostgresServer(folder)
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def database(postgres):
    """A fresh, empty database on the session's server, dropped after the test: its libpq URL."""
    url = postgres.new_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The default models built by `make models` (the test command builds them first)."""
    if not MODELS_DIR.exists():
        pytest.skip(f"{MODELS_DIR} is absent: run `make models`")
    return MODELS_DIR


# ---------------------------------------------------------------------------------------------------------------
# Figures. Tests that measure something (parity, accuracy, agreement) record it with the `figures` fixture; the
# lines are printed together at the end of the run, so `make test` and CI logs show the numbers the assertions
# judged, not only that they passed (pytest hides a passing test's stdout).

_FIGURES: list[tuple[str, str]] = []


@pytest.fixture
def figures(request):
    """`figures("text")`: record a measured figure for the end-of-run summary (and print it, for -s runs)."""

    def record(text: str) -> None:
        text = str(text).strip("\n")
        _FIGURES.append((request.node.nodeid, text))
        print(text)

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _FIGURES:
        return
    terminalreporter.section("figures measured by this run")
    last = None
    for nodeid, text in _FIGURES:
        if nodeid != last:
            terminalreporter.write_line(nodeid)
            last = nodeid
        for line in text.splitlines():
            terminalreporter.write_line("    " + line)
