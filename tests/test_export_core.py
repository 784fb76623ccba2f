"""export.core: metadata travels into the file, parity is measured on every export, and failures leave nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export import core
from export.core import ExportError, export_onnx, read_metadata, sha256_file
from export.templates import ARCFACE_TEMPLATE_112


def _meta(kind: str, color: str, mean: list, std: list, input_size: list[int] | None) -> dict[str, object]:
    """The keys every model file carries (docs/model-contract.md), for a randomly initialised test network."""
    return {
        "face.kind": kind, "face.arch": f"tiny-test-{kind}", "face.layout": "NCHW", "face.color": color,
        "face.mean": mean, "face.std": std, "face.input_size": input_size,
        "face.source": "random-init", "face.source_sha256": ("ab" if kind == "embedder" else "cd") * 32,
    }  # fmt: skip


def _embedder_meta(size: int = 16, input_size: list[int] | None = None) -> dict[str, object]:
    return {
        **_meta("embedder", "RGB", [127.5] * 3, [127.5] * 3, input_size or [32, 32]),
        "face.embedder.template": ARCFACE_TEMPLATE_112,
        "face.embedder.embedding_size": size,
        "face.embedder.flip": False,
    }


def _detector_meta() -> dict[str, object]:
    return {
        **_meta("detector", "BGR", [104, 117, 123], [1, 1, 1], None),
        "face.detector.priors": {"min_sizes": [[16, 32]], "steps": [8], "variance": [0.1, 0.2]},
        "face.detector.score_threshold": 0.5,
        "face.detector.nms_threshold": 0.4,
        "face.detector.max_side": 640,
    }


class TinyEmbedder(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.PReLU(8), nn.Conv2d(8, 16, 3, padding=1)
        )
        self.fc = nn.Linear(16 * 16 * 16, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class TinyDetector(nn.Module):
    """Stride-8 feature map with 2 priors per cell: loc [N, P, 4], conf [N, P, 2], landmarks [N, P, 10]."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=8, padding=1), nn.ReLU())
        self.loc = nn.Conv2d(8, 2 * 4, 1)
        self.conf = nn.Conv2d(8, 2 * 2, 1)
        self.landmarks = nn.Conv2d(8, 2 * 10, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.body(x)
        n = x.shape[0]
        loc = self.loc(f).permute(0, 2, 3, 1).reshape(n, -1, 4)
        conf = self.conf(f).permute(0, 2, 3, 1).reshape(n, -1, 2).softmax(-1)
        landmarks = self.landmarks(f).permute(0, 2, 3, 1).reshape(n, -1, 10)
        return loc, conf, landmarks


class Noisy(TinyEmbedder):
    """Adds fresh noise on every call: torch and ORT can never agree, so parity must fail."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + torch.rand_like(y)


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(3, 3, 32, 32)


def _randomise_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def test_embedder_export_metadata_roundtrip_and_parity(tmp_path: Path, images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = _randomise_bn(TinyEmbedder())
    out = tmp_path / "tiny.onnx"
    meta = _embedder_meta()

    report = export_onnx(model, images[:1], out, meta, ["embedding"], parity_inputs=images, min_cosine=0.99999)

    assert report.path == out and out.exists() and report.size_bytes == out.stat().st_size
    assert report.max_abs_diff < 1e-4 and report.min_cosine > 0.99999
    fp32 = report.variants[0]
    assert [c.label for c in fp32.checks] == ["batch 1", "batch 3"]

    expected = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    written = read_metadata(out)
    assert {k: written[k] for k in expected} == expected
    assert written["face.precision"] == "fp32" and written["face.exporter"].startswith("facerec-export ")
    assert json.loads(written["face.embedder.template"]) == ARCFACE_TEMPLATE_112
    assert written["face.embedder.flip"] == "false"

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map == written
    (inp,) = session.get_inputs()
    assert inp.name == "input" and inp.type == "tensor(float)"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]  # batch dynamic, H and W fixed
    assert [o.name for o in session.get_outputs()] == ["embedding"]

    # The file computes what the module computes, at a batch size the parity run did not use.
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        want = model(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert onnx.load(str(out)).opset_import[0].version >= 17


def test_detector_dynamic_hw_checks_a_second_size(tmp_path: Path, images: torch.Tensor) -> None:
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 96)
    out = tmp_path / "det.onnx"
    report = export_onnx(TinyDetector(), images[:1], out, _detector_meta(), ["loc", "conf", "landmarks"],
                         dynamic_hw=True, parity_inputs=images)

    labels = [c.label for c in report.variants[0].checks]
    assert labels[:2] == ["batch 1", "batch 2"] and labels[2].startswith("batch 2 at ")
    assert report.variants[0].checks[2].input_shape[2:] != (64, 96)
    assert report.max_abs_diff < 1e-4 and report.min_cosine is None
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert all(isinstance(d, str) for i, d in enumerate(session.get_inputs()[0].shape) if i != 1)
    loc, conf, landmarks = session.run(None, {"input": np.zeros((1, 3, 128, 160), np.float32)})
    priors = (128 // 8) * (160 // 8) * 2
    assert loc.shape == (1, priors, 4) and conf.shape == (1, priors, 2) and landmarks.shape == (1, priors, 10)
    assert read_metadata(out)["face.input_size"] == "null"


def test_variants_are_written_beside_with_their_own_figures(tmp_path: Path, images: torch.Tensor) -> None:
    torch.manual_seed(0)
    out = tmp_path / "tiny.onnx"
    report = export_onnx(_randomise_bn(TinyEmbedder()), images[:1], out, _embedder_meta(), ["embedding"],
                         parity_inputs=images, min_cosine=0.99999, variants=("fp32", "fp16", "int8"))

    by_precision = {v.precision: v for v in report.variants}
    assert set(by_precision) == {"fp32", "fp16", "int8"}
    assert by_precision["fp16"].path == tmp_path / "tiny.fp16.onnx"
    assert by_precision["int8"].path == tmp_path / "tiny.int8.onnx"
    assert by_precision["fp16"].min_cosine >= 0.999 and by_precision["int8"].min_cosine >= 0.99
    for precision, variant in by_precision.items():
        assert read_metadata(variant.path)["face.precision"] == precision
        assert variant.size_bytes == variant.path.stat().st_size
        session = ort.InferenceSession(str(variant.path), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].type == "tensor(float)"  # the contract: input float32 in every variant
        assert session.get_outputs()[0].type == "tensor(float)"
    assert "fp16" in report.table() and "int8" in report.table()


def test_parity_failure_raises_and_leaves_no_file(tmp_path: Path, images: torch.Tensor, monkeypatch) -> None:
    real_run = core._ort_run
    monkeypatch.setattr(core, "_ort_run", lambda session, x: [o + 1e-2 for o in real_run(session, x)])
    out = tmp_path / "broken.onnx"
    with pytest.raises(ExportError, match=r"max\|diff\| 0\.01 > atol"):
        export_onnx(TinyEmbedder(), images[:1], out, _embedder_meta(), ["embedding"], parity_inputs=images)
    assert list(tmp_path.iterdir()) == []


def test_nondeterministic_model_fails_parity(tmp_path: Path, images: torch.Tensor) -> None:
    with pytest.raises(ExportError, match="fails parity"):
        export_onnx(Noisy(), images[:1], tmp_path / "noisy.onnx", _embedder_meta(), ["embedding"],
                    parity_inputs=images)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"face.embedder.template": None}, "lacks required contract keys: face.embedder.template"),
        ({"face.source_sha256": None}, "lacks required contract keys: face.source_sha256"),
        ({"face.color": "RGBA"}, "face.color must be RGB or BGR"),
        ({"face.mean": [127.5]}, "face.mean must be a JSON list of 3 numbers"),
        ({"face.input_size": [112, 112]}, "does not match the sample"),
        ({"face.embedder.embedding_size": 512}, "model outputs 16-d"),
        ({"face.precision": "fp32"}, "filled by the exporter"),
    ],
)
def test_bad_metadata_is_refused(tmp_path: Path, images: torch.Tensor, change: dict, message: str) -> None:
    meta = {**_embedder_meta(), **change}
    meta = {k: v for k, v in meta.items() if v is not None or k == "face.input_size"}
    with pytest.raises(ExportError, match=message):
        export_onnx(TinyEmbedder(), images[:1], tmp_path / "x.onnx", meta, ["embedding"])
    assert list(tmp_path.iterdir()) == []


def test_output_names_must_match_the_kind(tmp_path: Path, images: torch.Tensor) -> None:
    with pytest.raises(ExportError, match=r"outputs \['embedding'\]"):
        export_onnx(TinyEmbedder(), images[:1], tmp_path / "x.onnx", _embedder_meta(), ["features"])


def test_sha256_file(tmp_path: Path) -> None:
    f = tmp_path / "blob.bin"
    f.write_bytes(b"face" * 1_000_000)
    assert sha256_file(f) == hashlib.sha256(b"face" * 1_000_000).hexdigest()


# --- the CLI: python -m export ----------------------------------------------------------------------------------


def test_cli_help_lists_every_command() -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "export", "--help"], capture_output=True, text=True, check=False,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    for command in ("defaults", "retinaface", "arcface", "mobilefacenet"):
        assert command in result.stdout
    # That --help leaves torch unimported is measured in tests/test_layering.py.


def test_cli_missing_command_module_is_a_clear_error(monkeypatch, capsys) -> None:
    from export import __main__ as cli

    monkeypatch.setitem(cli.COMMANDS, "arcface", ("export.not_written_yet", "placeholder"))
    assert cli.main(["arcface", "--help"]) == 2
    assert "export.not_written_yet is missing" in capsys.readouterr().err


class PooledEmbedder(nn.Module):
    """A few thousand parameters with the default recognizer's interface: [N, 3, 112, 112] -> [N, 192]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=8, padding=1)
        self.fc = nn.Linear(8, 192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def _set_metadata(path: Path, out: Path | None = None, drop: tuple[str, ...] = (), **changes: str) -> None:
    """Rewrite some metadata_props of an ONNX file (what another exporter version would have written), in place
    or into `out`; keys in `drop` are removed."""
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props if p.key not in drop}
    props.update(changes)
    del proto.metadata_props[:]
    for key, value in sorted(props.items()):
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(out or path))


def test_defaults_keeps_an_up_to_date_file_and_rebuilds_a_stale_one(tmp_path: Path, monkeypatch, capsys) -> None:
    from export import defaults
    from export import mobilefacenet as mfn

    detector, recognizer = defaults.DEFAULT_MODELS
    # Up-to-date files: tiny networks exported with exactly the metadata the pinned defaults are exported with.
    export_onnx(_randomise_bn(TinyDetector()), torch.randn(1, 3, 64, 64), tmp_path / detector.file_name,
                detector.metadata(detector), ["loc", "conf", "landmarks"], dynamic_hw=True)
    recognizer_file = tmp_path / recognizer.file_name
    export_onnx(PooledEmbedder(), torch.randn(1, 3, 112, 112), recognizer_file, mfn.tflite_metadata(),
                ["embedding"])
    assert defaults.up_to_date(tmp_path / detector.file_name, detector)
    assert defaults.up_to_date(recognizer_file, recognizer)

    # A new pinned threshold or mirror flag in export/mobilefacenet.py makes the same file stale, by name.
    monkeypatch.setattr(mfn, "THRESHOLD", mfn.THRESHOLD + 0.01)
    assert defaults.stale_keys(recognizer_file, recognizer) == ["face.embedder.threshold"]
    monkeypatch.setattr(mfn, "FLIP", not mfn.FLIP)
    assert defaults.stale_keys(recognizer_file, recognizer) == ["face.embedder.flip", "face.embedder.threshold"]
    monkeypatch.undo()
    assert defaults.up_to_date(recognizer_file, recognizer)
    # So does a file written by another exporter (version, torch or opset), or missing a pinned key.
    stale = tmp_path / "stale"
    stale.mkdir()
    shutil.copy(recognizer_file, stale / recognizer.file_name)
    _set_metadata(stale / recognizer.file_name, **{"face.exporter": "facerec-export 0.0.1 (torch 1.0, opset 11)"})
    assert defaults.stale_keys(stale / recognizer.file_name, recognizer) == ["face.exporter"]
    _set_metadata(recognizer_file, out=stale / recognizer.file_name, drop=("face.embedder.far",))
    assert defaults.stale_keys(stale / recognizer.file_name, recognizer) == ["face.embedder.far"]
    # Built from other weights, or not a model at all.
    export_onnx(TinyEmbedder(), torch.randn(1, 3, 32, 32), stale / "other.onnx", _embedder_meta(), ["embedding"])
    assert "face.source_sha256" in defaults.stale_keys(stale / "other.onnx", recognizer)
    (stale / "junk.onnx").write_bytes(b"junk")
    assert defaults.stale_keys(stale / "junk.onnx", recognizer) == ["unreadable file"]

    # The run keeps the up-to-date detector and rebuilds the recognizer whose threshold is no longer the pinned one.
    _set_metadata(recognizer_file, **{"face.embedder.threshold": json.dumps(mfn.THRESHOLD + 0.01)})
    calls = []

    def fake_export_one(model: defaults.DefaultModel, out_dir: Path) -> Path:
        calls.append(model.role)
        raise defaults.DefaultsError(f"{model.module} is missing")

    monkeypatch.setattr(defaults, "export_one", fake_export_one)
    args = SimpleNamespace(out=tmp_path, force=False)
    assert defaults.run(args) == 1  # the recognizer could not be rebuilt: a failure, reported clearly
    assert calls == ["recognizer"]
    out = capsys.readouterr()
    assert f"detector: {tmp_path / detector.file_name} is up to date" in out.out
    assert f"recognizer: {recognizer_file} is stale (differs in face.embedder.threshold)" in out.out
    assert "recognizer: DefaultsError" in out.err

    calls.clear()
    assert defaults.run(SimpleNamespace(out=tmp_path, force=True)) == 1
    assert calls == ["detector", "recognizer"]


def test_defaults_refuses_an_export_that_would_never_count_as_up_to_date(tmp_path: Path, monkeypatch) -> None:
    """If the module's export and the pins in defaults.py disagree, every run would rebuild: fail, naming keys."""
    from export import defaults
    from export import mobilefacenet as mfn

    _, recognizer = defaults.DEFAULT_MODELS
    meta = {**mfn.tflite_metadata(), "face.embedder.threshold": 0.5}

    def export_default(out_dir: Path) -> Path:
        out = Path(out_dir) / recognizer.file_name
        export_onnx(PooledEmbedder(), torch.randn(1, 3, 112, 112), out, meta, ["embedding"])
        return out

    monkeypatch.setattr(defaults.importlib, "import_module", lambda name: SimpleNamespace(export_default=export_default))
    with pytest.raises(defaults.DefaultsError, match=r"mobilefacenet_192.onnx: .* differs from the pinned default "
                                                     r"in face.embedder.threshold"):
        defaults.export_one(recognizer, tmp_path)


def test_defaults_names_a_missing_exporter_module(tmp_path: Path) -> None:
    from export import defaults

    ghost = defaults.DefaultModel("detector", "export.no_such_module", "x.onnx", "src", "0" * 64, lambda m: {})
    with pytest.raises(defaults.DefaultsError, match="export.no_such_module is missing"):
        defaults.export_one(ghost, tmp_path)
