"""Layering: the service runs without the training stack, and `python -m export --help` does not pay for it.

Each check runs in a fresh interpreter, because this test process has long imported torch (other tests, the
export package). Each also has a positive control that imports torch on purpose, so a probe that could not see
torch (a typo in the module name, a broken subprocess) fails instead of passing silently.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MODELS_DIR  # the built defaults, when there are any

ROOT = Path(__file__).resolve().parents[1]
TRAINING_SIDE = ("torch", "export", "models")  # top-level packages the service must never import


def _python(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, check=False, cwd=ROOT, timeout=timeout
    )


# Runs in the child: import the service app, build it, start its lifespan (models loaded, one request served)
# when the default models are there, then report which training-side packages ended up in sys.modules.
SERVICE_PROBE = """
import json, sys, warnings
from pathlib import Path
import service.app
from service.settings import Settings

models_dir = Path(sys.argv[1])
settings = Settings(models_dir=models_dir, gallery_path=Path(sys.argv[2]) / "gallery.db")
app = service.app.create_app(settings)
served = None
if all((models_dir / n).is_file() for n in (settings.detector_model, settings.embedder_model)):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    with TestClient(app) as client:
        served = client.get("/ready").status_code
if sys.argv[3] == "control":
    import torch  # noqa: F401
print(json.dumps({
    "served": served,
    "loaded": sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[4]))),
}))
"""


def _service_probe(models_dir: Path, tmp_path: Path, mode: str) -> dict:
    result = _python("-c", SERVICE_PROBE, str(models_dir), str(tmp_path), mode, json.dumps(TRAINING_SIDE))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_service_app_runs_without_torch(tmp_path: Path, figures) -> None:
    report = _service_probe(MODELS_DIR, tmp_path, "plain")
    assert report["loaded"] == [], f"the service imported training-side packages: {report['loaded']}"
    if report["served"] is None:
        figures(f"service layering: app built without torch; lifespan not run ({MODELS_DIR} lacks the defaults)")
    else:
        assert report["served"] == 200  # models loaded through ONNX Runtime alone
        figures("service layering: app built, models loaded, /ready 200, no torch/export/models in sys.modules")
    control = _service_probe(MODELS_DIR, tmp_path, "control")
    assert "torch" in control["loaded"]  # the probe does see torch when it is there


def _imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` output: 'import time: self | cumulative | name' lines."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the header line
                names.add(name)
    return names


def test_export_help_works_without_importing_torch() -> None:
    result = _python("-X", "importtime", "-m", "export", "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    for command in ("defaults", "retinaface", "arcface", "mobilefacenet"):
        assert command in result.stdout
    imported = _imported_modules(result.stderr)
    assert {"export", "argparse"} <= imported  # the probe parsed real importtime output
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}


def test_export_subcommand_help_does_import_torch() -> None:
    """The control for the test above: a subcommand's --help imports its module, and with it torch."""
    result = _python("-X", "importtime", "-m", "export", "mobilefacenet", "--help")
    if result.returncode != 0 and "is not installed" in result.stderr:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--checkpoint" in result.stdout
    assert "torch" in _imported_modules(result.stderr)


def _imports(path: Path) -> set[str]:
    """Top-level package names a Python file imports (module level and inside functions alike)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("side", ["export", "models"])
def test_training_side_never_imports_the_service(side: str) -> None:
    """The contract between the sides is the ONNX file's metadata: the exporter writes what the service reads,
    so neither imports the other (and the Docker build stage needs no copy of service/)."""
    files = sorted((ROOT / side).rglob("*.py"))
    assert len(files) >= 3  # the walk found the package
    offenders = {str(f.relative_to(ROOT)): sorted(_imports(f) & {"service"}) for f in files}
    assert {f: names for f, names in offenders.items() if names} == {}
    assert "torch" in set().union(*(_imports(f) for f in files))  # the parser does see imports


def test_service_never_imports_the_training_side() -> None:
    """The static twin of the runtime probe above: no file under service/ even mentions a training package."""
    files = sorted((ROOT / "service").rglob("*.py"))
    found = {str(f.relative_to(ROOT)): sorted(_imports(f) & set(TRAINING_SIDE)) for f in files}
    assert {f: names for f, names in found.items() if names} == {}
    assert "numpy" in set().union(*(_imports(f) for f in files))


def test_the_api_reaches_the_models_only_through_the_pipeline() -> None:
    """service/pipeline.py is the one recognition path: the routers and the runtime call Pipeline, never a
    stage on their own (the runtime's warm-up, which serves no request, runs each model once directly)."""
    stages = {"decode_image", "align_face", "detect", "embed"}
    found = []
    for path in sorted((ROOT / "service" / "api").glob("*.py")):
        tree = ast.parse(path.read_text())
        warm_up = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "_warm_up"
                   for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and id(node) not in warm_up:
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                owner = func.value if isinstance(func, ast.Attribute) else None
                via_pipeline = isinstance(owner, ast.Attribute) and owner.attr == "pipeline"
                if name in stages and not via_pipeline:
                    found.append(f"{path.name}:{node.lineno} {ast.unparse(func)}")
    assert found == []
