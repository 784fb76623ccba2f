"""Where the exporter reads and writes: torch-free, so that command-line modules can name their defaults
without loading the training stack."""

from __future__ import annotations

import os
from pathlib import Path

# The checkout the exporter runs from (with an installed, non-editable package this is site-packages, so the
# locations below can be moved by environment variables: the Docker build stage does).
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS_DIR = ROOT / "artifacts" / "models"


def cache_dir() -> Path:
    """Where downloaded registry packages are kept between runs (FACEREC_CACHE_DIR overrides)."""
    return Path(os.environ.get("FACEREC_CACHE_DIR", ROOT / "artifacts" / "cache"))


def shared_data_dir() -> Path:
    """The project's shared test data (`../shared/data`, FACEREC_SHARED_DATA overrides). Used for parity
    inputs when it exists; the export never depends on it."""
    return Path(os.environ.get("FACEREC_SHARED_DATA", ROOT.parent / "shared" / "data"))
