"""`python -m evaluate` end to end on the shared photos: the report files and their figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluate.__main__ import main
from evaluate.plots import roc_points

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def default_models(models_dir):
    for name in ("retinaface_mnet025.onnx", "mobilefacenet_192.onnx"):
        if not (models_dir / name).is_file():
            pytest.skip(f"{models_dir / name} is absent: run `make models`")
    return models_dir


def test_roc_points_by_hand():
    # Scores 0.9 (same), 0.8 (diff), 0.7 (same), NaN (same: a missed face scores -1).
    far, tar, thresholds = roc_points([0.9, 0.8, 0.7, np.nan], [True, False, True, True])
    assert far.tolist() == [0, 0, 1, 1, 1]
    assert tar.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 1])
    assert thresholds[1:].tolist() == [0.9, 0.8, 0.7, -1.0]


def test_verify_on_pairs_csv(default_models, faces_dir, tmp_path, capsys):
    out = tmp_path / "pairs"
    assert main(["verify", "--pairs", str(faces_dir / "pairs" / "pairs.csv"), "--models-dir", str(default_models),
                 "--threshold", "0.3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 300 and summary["same_pairs"] == 38
    assert summary["photos"] == 25 and summary["photos_without_face"] == 0
    # Measured with the default models: AUC 1.0 and 100 % best accuracy on these pairs.
    assert summary["roc_auc"] > 0.99
    assert summary["best_accuracy"] > 0.98
    assert summary["threshold"] == 0.3
    assert 0.9 < summary["accuracy_at_threshold"] <= 1.0
    assert summary["tar_at_far"]["0.01"] is not None and summary["tar_at_far"]["0.001"] is None  # 262 different
    assert (out / "roc.png").read_bytes()[:8] == PNG_MAGIC
    assert "ROC AUC" in capsys.readouterr().out


def test_verify_on_lfw_pairs_txt_with_folds(default_models, lfw_dir, tmp_path):
    # Two folds of 2 same + 2 different pairs taken from the real pairs.txt (folds 1 and 2 of the file).
    lines = (lfw_dir / "pairs.txt").read_text().splitlines()[1:]
    small = ["2\t2", *lines[0:2], *lines[300:302], *lines[600:602], *lines[900:902]]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(small) + "\n")
    out = tmp_path / "lfw"
    assert main(["verify", "--pairs", str(pairs), "--images-root", str(lfw_dir / "images"),
                 "--models-dir", str(default_models), "--threshold", "0.3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 8 and summary["same_pairs"] == 4
    assert len(summary["folds"]["accuracies"]) == 2
    assert summary["roc_auc"] > 0.9
    assert summary["tar_at_far"] == {"0.01": None, "0.001": None}  # 4 different pairs resolve neither
    assert (out / "roc.png").is_file()


def test_detection_command(default_models, faces_dir, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "det"
    assert main(["detection", "--photos", str(faces_dir / "groups"), "--models-dir", str(default_models),
                 "--out", str(out)]) == 0
    result = json.loads((out / "detection.json").read_text())
    assert result["summary"]["photos"] == 3
    assert result["summary"]["onnx_only"] == 0 and result["summary"]["torch_only"] == 0
    assert result["summary"]["max_landmark_error_px"] < 0.05


def test_wider_command_from_predictions(tmp_path):
    from evaluate import wider

    gt = tmp_path / "gt.txt"
    gt.write_text("e/a.jpg\n2\n0 0 10 10 0 0 0 0 0 0\n20 0 10 10 0 0 0 0 0 0\n")
    wider.write_predictions(tmp_path / "pred", "e/a", np.array([[0, 0, 10, 10, 0.9], [100, 0, 10, 10, 0.5]]))
    assert main(["wider", "--gt", str(gt), "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "w")]) == 0
    # One of two faces found by the best box; the false positive comes after: AP = 1/2.
    assert json.loads((tmp_path / "w" / "wider.json").read_text())["ap"] == {"all": pytest.approx(0.5)}


def test_wider_command_runs_the_detector_on_images(default_models, faces_dir, tmp_path):
    # A one-image "WIDER" tree: couple.jpg under an event folder, its two faces as ground truth, taken from the
    # detector at the file's defaults and rounded to whole pixels as WIDER's annotations are.
    import shutil

    from service.detector import RetinaFaceDetector
    from service.images import decode_image

    photo = faces_dir / "groups" / "couple.jpg"
    (tmp_path / "images" / "0--Couple").mkdir(parents=True)
    shutil.copy(photo, tmp_path / "images" / "0--Couple" / "couple.jpg")
    found = RetinaFaceDetector(default_models / "retinaface_mnet025.onnx").detect(
        decode_image(photo.read_bytes(), max_bytes=1 << 30, max_pixels=1 << 30))
    assert len(found.boxes) == 2
    rows = [f"{x1:.0f} {y1:.0f} {x2 - x1:.0f} {y2 - y1:.0f} 0 0 0 0 0 0" for x1, y1, x2, y2 in found.boxes]
    (tmp_path / "gt.txt").write_text("0--Couple/couple.jpg\n2\n" + "\n".join(rows) + "\n")
    out = tmp_path / "w"
    assert main(["wider", "--gt", str(tmp_path / "gt.txt"), "--images", str(tmp_path / "images"),
                 "--models-dir", str(default_models), "--out", str(out)]) == 0
    assert json.loads((out / "wider.json").read_text())["ap"]["all"] > 0.99
    assert (out / "predictions" / "0--Couple" / "couple.txt").is_file()


@pytest.fixture(scope="module")
def small_people(lfw_dir, tmp_path_factory):
    """40 people with two or more photos and 40 with one, from lfw-dev, as a people folder (symlinks)."""
    root = tmp_path_factory.mktemp("people")
    people = sorted(p for p in (lfw_dir / "images").iterdir() if p.is_dir())
    several = [p for p in people if len(list(p.iterdir())) >= 2][:40]
    single = [p for p in people if len(list(p.iterdir())) == 1][:40]
    for person in several + single:
        (root / person.name).symlink_to(person, target_is_directory=True)
    return root


def test_identify_report_and_table_written_into_a_model(default_models, small_people, tmp_path, capsys):
    import shutil

    from service.decision import FarTable
    from service.embedder import Embedder
    from service.onnx_model import file_sha256, model_identity

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(default_models / "retinaface_mnet025.onnx", models)
    shutil.copy(default_models / "mobilefacenet_192.onnx", models)
    before = file_sha256(models / "mobilefacenet_192.onnx")
    out = tmp_path / "identify"
    argv = ["identify", "--people", str(small_people), "--models-dir", str(models), "--sizes", "10,20,all",
            "--repeats", "2", "--out", str(out)]
    # Writing into the default recognizer's own file is refused: `make models` would silently rebuild it.
    assert main([*argv, "--write-table", str(models / "mobilefacenet_192.onnx")]) == 2
    assert "make models" in capsys.readouterr().err
    assert main([*argv, "--write-table", str(models / "mine.onnx")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["people"] == 80 and summary["largest_gallery"] == 40 and summary["photos_without_face"] == 0
    assert [row["identities"] for row in summary["sizes"]] == [10, 20, 40]
    assert [row["draws"] for row in summary["sizes"]] == [2, 2, 1]
    for row in summary["sizes"]:
        assert 0.9 <= row["rank1"] <= 1.0  # 40 well-photographed people: nearly always ranked first
        assert row["nonmated_searches"] > 0 and row["mated_searches"] > 0
        assert set(row["fnir_at_fpir"]) == {"0.1", "0.01", "0.001"}
        assert row["policy"]["threshold"] >= summary["verify_threshold"]
    assert [r["identities"] for r in summary["serves"]] == [100, 1000, 10000, 100000, 1000000]
    assert {"baseline", "cohort_tnorm", "margin", "templates_3_photos"} <= set(summary["variants"])
    for name in ("det.png", "fpir.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    table = FarTable.from_json((out / "far_table.json").read_text())
    # 80 people: every different-person pair among their photos, counted once.
    photos = summary["photos_with_face"]
    assert table.impostor_pairs < photos * (photos - 1) // 2 and table.impostor_pairs > 0.9 * photos * (photos - 1) // 2
    assert "how large a gallery" in printed and "FNIR@FPIR 0.01" in printed and "fitted tail" in printed

    # The copy carries the table, which the service reads; its file sha256 differs, its model id does not.
    embedder = Embedder(models / "mine.onnx")
    assert file_sha256(models / "mobilefacenet_192.onnx") == before
    assert embedder.sha256 != before and embedder.model_id == model_identity(models / "mobilefacenet_192.onnx")[0]
    assert embedder.far_table is not None and embedder.far_table.impostor_pairs == table.impostor_pairs
    # Bad options are one line on stderr, not a traceback.
    assert main([*argv, "--target-fpir", "0"]) == 2 and main([*argv, "--sizes", "abc"]) == 2


def test_write_far_table_refuses_a_changed_or_wrong_file(default_models, tmp_path):
    import shutil

    from evaluate.model_table import write_far_table
    from export.mobilefacenet_far_table import FAR_TABLE

    model = tmp_path / "m.onnx"
    shutil.copy(default_models / "mobilefacenet_192.onnx", model)
    with pytest.raises(ValueError, match="changed since"):
        write_far_table(model, FAR_TABLE, expected_sha256="0" * 64)
    shutil.copy(default_models / "retinaface_mnet025.onnx", tmp_path / "d.onnx")
    with pytest.raises(ValueError, match="not an embedder"):
        write_far_table(tmp_path / "d.onnx", FAR_TABLE)
    from service.decision import FarTableError

    with pytest.raises(FarTableError):
        write_far_table(model, {**FAR_TABLE, "far": list(reversed(FAR_TABLE["far"]))})


def test_quality_on_pairs_csv(default_models, faces_dir, tmp_path, capsys):
    out = tmp_path / "quality"
    assert main(["quality", "--pairs", str(faces_dir / "pairs" / "pairs.csv"), "--models-dir", str(default_models),
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["same_pairs"] == 38 and summary["same_pairs_with_both_faces"] == 38
    curve = summary["error_versus_discard"]
    assert [row["discarded"] for row in curve][:3] == [0.0, 0.01, 0.02]
    assert all(0 <= row["fnmr"] <= 1 and row["pairs_kept"] <= 38 for row in curve)
    model = summary["model_fitted_on_all_folds"]
    assert set(model) == {"intercept", "log_embedding_norm", "log_face_size", "abs_yaw", "abs_pitch"}
    assert model["log_embedding_norm"] > 0  # longer embeddings, more similar same-person pairs, here too
    correlations = summary["spearman_with_similarity_worse_face"]
    assert set(correlations) >= {"embedding_norm", "face_size", "yaw", "sharpness"}
    assert all(-1 <= value <= 1 for value in correlations.values())
    assert (out / "error_vs_discard.png").read_bytes()[:8] == PNG_MAGIC
    # The photos are measured once: a second run reads them back.
    assert main(["quality", "--pairs", str(faces_dir / "pairs" / "pairs.csv"), "--models-dir", str(default_models),
                 "--out", str(out)]) == 0
    assert "reusing" in capsys.readouterr().out
