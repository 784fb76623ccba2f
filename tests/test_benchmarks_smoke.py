"""The benchmark code paths at tiny sizes: a real server process, the load generator, the gallery fill, the report.

No timing is asserted: speed figures come from `python -m benchmarks`, never from tests.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from benchmarks import harness, suites
from benchmarks.__main__ import main


def test_timing_percentiles_and_rss():
    t = harness.Timing(np.arange(1, 101, dtype=float))
    assert (t.p50, t.p95, t.p99, t.min) == pytest.approx((50.5, 95.05, 99.01, 1.0))
    calls = []
    assert harness.measure(lambda: calls.append(1), repeat=5, warmup=2).n == 5 and len(calls) == 7
    rss, peak = harness.rss_mb(os.getpid())
    assert 10 < rss <= peak


def test_frame_has_the_requested_size():
    image = np.zeros((300, 500, 3), np.uint8)
    for w, h in suites.FRAME_SIZES:
        assert suites.frame(image, w, h).shape == (h, w, 3)


def test_gallery_fill_is_searchable(tmp_path):
    from service.gallery import Gallery

    suites.fill_gallery(tmp_path / "g.db", 300, 8, "a" * 64, seed=3)
    with Gallery(tmp_path / "g.db", "a" * 64, 8) as gallery:
        assert len(gallery) == 300
        # Query with a stored vector (one face per identity: the template is the face): first, similarity 1.
        stored = gallery._sums[123].copy()
        (matches,) = gallery.search(stored[None], top_k=3)
        assert matches[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_quick_run_writes_the_report(models_dir, faces_dir, weights_dir, tmp_path, capsys):
    if not (models_dir / "mobilefacenet_192.onnx").is_file():
        pytest.skip("default embedder not built")
    out = tmp_path / "BENCH.md"
    assert main(["--quick", "--no-peer", "--models-dir", str(models_dir), "--photos", str(faces_dir),
                 "--weights", str(weights_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # Every HTTP load line reports its error count: all must be zero ("10 errors" must not pass for "0 errors").
    error_counts = [int(n) for n in re.findall(r"(\d+) errors\)", printed)]
    # 6 loads of /detect and /verify, 1 of /identify on the PostgreSQL gallery, /enroll on each store, /identify
    # on one and on two replicas
    assert len(error_counts) == 11 and error_counts == [0] * 11, printed
    assert all(f"c={c:>2}" in printed for c in (1, 4, 16))
    report = out.read_text()
    for heading in ("## Detector", "## Embedder", "## Embedder graph", "## HTTP", "## 1:N identification",
                    "## The peer", "## 1:N identification in PostgreSQL", "## Enrolment rate and replicas",
                    "## Where a request's time goes", "## ANN index for the SQLite gallery"):
        assert heading in report
    # The request profile: every step timed, both endpoints answered without errors, the target line written.
    profile = report.split("## Where a request's time goes")[1].split("\n## ")[0]
    for step in ("JPEG decode", "numpy form (first)", "blobFromImage (before)", "addWeighted per plane (after)",
                 "network (ONNX Runtime", "the answer's JSON"):
        assert step in profile, profile
    for row in ("/health", "/detect", "/verify", "/health (httpx)", "/detect (httpx)"):
        assert f"| {row} | 3 | 0 |" in profile, profile
    assert "Against the targets, this run: /detect p50" in profile
    assert "QUICK MODE" in report
    assert "| /verify | 16 |" in report
    # The embedder graphs were built and timed side by side (the foamliu baseline needs ../shared's weights).
    graphs = [line for line in report.splitlines() if line.startswith(("| shipped", "| PRelu graph", "| foamliu"))]
    # A timing row and a kernel-profile row each, and an Embedder.embed row for the two 192-d graphs.
    assert len(graphs) == 8, report
    profiles = {g.split("|")[1].strip(): g.split("|")[3] for g in graphs[-3:]}  # graph -> "by operator" column
    assert "PRelu " in profiles["PRelu graph (--no-rewrite)"] and "Conv " in profiles["foamliu (ReLU6)"]
    assert "PRelu" not in profiles["shipped (rewritten)"] and "Pad" not in profiles["shipped (rewritten)"]


def test_peer_runs_when_installed(faces_dir):
    from benchmarks import peer

    missing = peer.available()
    if missing:
        pytest.skip(f"face_recognition not installed ({missing}); `make bench` installs it")
    import cv2

    couple = cv2.imread(str(faces_dir / "groups" / "couple.jpg"))
    frames = {(640, 480): suites.frame(couple, 640, 480)}
    result = suites.peer_suite(frames, suites.fit(couple, 640), repeat=1, cnn_sizes=(), cnn_repeat=1)
    assert result["detectors"][0]["faces"] == 2  # HOG finds the couple
    assert result["descriptor_ms"] is not None


def test_a_rewritten_report_keeps_the_sections_recorded_by_hand(tmp_path):
    from benchmarks.__main__ import kept_sections

    report = tmp_path / "BENCH.md"
    report.write_text("# Benchmarks\n\n## Detector\n\nold\n\n## Bulk import and export\n\nfigures\n| a | b |\n\n"
                      "## How to reproduce\n\nold\n")
    assert kept_sections(report) == ["## Bulk import and export", "", "figures", "| a | b |", ""]
    assert kept_sections(tmp_path / "absent.md") == []


def test_gallery_import_benchmark_runs(tmp_path, capsys):
    from benchmarks import gallery_import

    assert gallery_import.main(["--identities", "300", "--baseline", "5", "--dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for what in ("| SQLite | import npy | 300 |", "| SQLite | import npy again (all skipped) | 300 |",
                 "| SQLite | import jsonl | 300 |", "| SQLite | enroll() one at a time (baseline) | 5 |"):
        assert what in printed, printed


def test_tracker_comparison_runs_on_a_few_frames(models_dir, faces_dir, tmp_path, capsys):
    from benchmarks import tracking

    tracking.detect(models_dir, faces_dir, tmp_path / "d.npz", frames=6)
    tracking.compare(tmp_path / "d.npz")
    out = capsys.readouterr().out
    assert "12 detections over 6 frames" in out  # two heads on every frame
    assert re.search(r"\| ours \(service/tracking.py\) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| head 0: 100.0 % \(1 ids\); "
                     r"head 1: 100.0 % \(1 ids\) \|", out), out


def test_stream_benchmark_runs_on_a_few_frames(models_dir, faces_dir, tmp_path, capsys):
    pytest.importorskip("websockets")
    from benchmarks import stream

    stream.main(["--models-dir", str(models_dir), "--photos", str(faces_dir), "--seconds", "0.2",
                 "--gallery", str(tmp_path / "g.db")])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| /")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| /stream x1", "| /stream x1, 2 in flight", "| /stream x4", "| /identify x1", "| /identify x4"
    ]
    assert all(row.split(" | ")[1] in ("6", "24") for row in rows), rows  # 0.2 s at 30 fps, per client


def test_a_rewritten_report_keeps_the_sections_measured_by_their_own_commands(tmp_path):
    from benchmarks.__main__ import kept_sections

    report = tmp_path / "B.md"
    report.write_text("# B\n\n## Detector\n\nold\n\n## Video streams\n\nmeasured by hand\n\n## How to reproduce\n\nx\n")
    assert kept_sections(report) == ["## Video streams", "", "measured by hand", ""]
    assert kept_sections(tmp_path / "absent.md") == []
