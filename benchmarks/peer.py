"""The peer users most often pick: `face_recognition` (dlib HOG or CNN detector, dlib ResNet descriptor).

Installed by `pip install -e '.[bench]'` plus `face-recognition==1.3.0 --no-deps` (see the Makefile's `bench`):
face_recognition requires a package named `dlib`, which would compile from source; `dlib-bin` ships the same
module prebuilt.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types


def _pkg_resources_shim() -> None:
    """face_recognition_models 0.3.0 finds its .dat files with `pkg_resources.resource_filename`, which recent
    setuptools no longer ships; a two-line stand-in gives the same path (files inside the installed package)."""
    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        return
    shim = types.ModuleType("pkg_resources")

    def resource_filename(package: str, name: str) -> str:
        return os.path.join(os.path.dirname(importlib.util.find_spec(package).origin), name)

    shim.resource_filename = resource_filename
    sys.modules["pkg_resources"] = shim


def load():
    """The face_recognition module, or None (with the reason printed by the caller) when it is not installed."""
    _pkg_resources_shim()
    import face_recognition

    return face_recognition


def available() -> str | None:
    """None when the peer imports; else why not."""
    try:
        load()
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    except SystemExit:  # face_recognition calls quit() when face_recognition_models is missing
        return "face_recognition_models is not installed"
    return None
