"""`python -m benchmarks`: speed and memory of the default models and the HTTP service, against face_recognition.

Prints every figure and rewrites BENCHMARKS.md (or --out). `--quick` runs every code path at tiny sizes
(what tests/test_benchmarks_smoke.py does); the full run takes a few minutes on 2 cores, most of it dlib's CNN.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from benchmarks import suites
from benchmarks.harness import ROOT

DEFAULT_PHOTOS = ROOT.parent / "shared" / "data" / "faces"


def machine() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import onnxruntime

    return {
        "cpu": cpu,
        "cores": str(len(os.sched_getaffinity(0))),
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
    }


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def table(headers: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def f(value, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path(os.environ.get("FACE_MODELS_DIR", ROOT / "artifacts/models")))
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="the shared faces folder (groups/, pairs/)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown report to (re)write")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the code paths, not the speed")
    parser.add_argument("--no-peer", action="store_true", help="skip face_recognition")
    parser.add_argument("--gallery-sizes", default="10000,100000,1000000")
    parser.add_argument("--pg-sizes", default="100000",
                        help="PostgreSQL gallery sizes (benchmarks/pg_search.py); empty to skip")
    parser.add_argument("--ann-sizes", default="",
                        help="faces per gallery for the SQLite gallery's ANN index (benchmarks/ann.py), e.g. "
                        "100000,1000000,10000000 (about an hour here); empty (the default): keep the section as "
                        "`python -m benchmarks.ann` wrote it")
    parser.add_argument("--ann-http-sizes", default="1000000,10000000",
                        help="of those, the sizes also served over HTTP (/identify, server RSS)")
    parser.add_argument("--weights", type=Path, default=ROOT.parent / "shared" / "data" / "weights",
                        help="the shared checkpoints (the foamliu MobileFaceNet, the embedder graph's baseline)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    quick = args.quick
    repeat = 2 if quick else 30
    detector_path = args.models_dir / "retinaface_mnet025.onnx"
    embedder_path = args.models_dir / "mobilefacenet_192.onnx"
    for path in (detector_path, embedder_path):
        if not path.is_file():
            print(f"{path} is absent: run `make models`", file=sys.stderr)
            return 2
    gallery_sizes = (500,) if quick else tuple(int(s) for s in args.gallery_sizes.split(","))
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = dt.datetime.now(dt.timezone.utc)
    load_before = load_average()
    info = machine()
    from service.onnx_model import file_sha256

    info["detector"] = f"{detector_path.name} {file_sha256(detector_path)[:12]}"
    info["embedder"] = f"{embedder_path.name} {file_sha256(embedder_path)[:12]}"
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; load average {load_before}")

    # Inputs: real photos, cut to standard frame sizes.
    couple = cv2.imread(str(args.photos / "groups" / "couple.jpg"))
    frames = {size: suites.frame(couple, *size) for size in suites.FRAME_SIZES}
    # Portraits as 640x480 frames (the size the latency figures are quoted at), letterboxed whole.
    portrait_a = suites.letterbox(cv2.imread(str(args.photos / "pairs" / "img20.jpg")), 640, 480)
    portrait_b = suites.letterbox(cv2.imread(str(args.photos / "pairs" / "img21.jpg")), 640, 480)

    # 1. Detector, in process.
    det_rows = suites.detector_latency(detector_path, frames, (1, 2), repeat)
    print("\ndetector (RetinaFaceDetector.detect: resize + network + decode + NMS; network alone in brackets)")
    for r in det_rows:
        print(f"  {r['frame']:>9} -> {r['input']:>7}, {r['threads']} thread(s): {r['detect_ms']:6.1f} ms "
              f"[{r['network_ms']:.1f}], {r['faces']} faces")

    # 2. Embedder, in process, on a real aligned crop.
    from service.detector import RetinaFaceDetector
    from service.embedder import Embedder
    from service.pipeline import Pipeline, largest

    pipeline = Pipeline(RetinaFaceDetector(detector_path), Embedder(embedder_path))
    face = largest(pipeline.detect(portrait_a))
    crop = pipeline.align(portrait_a, [face])[0]
    query = pipeline.embed(portrait_a, [face])[0].embedding
    emb_rows = suites.embedder_latency(embedder_path, crop, (1, 2) if quick else (1, 8, 32), (1, 2), repeat)
    print("\nembedder (Embedder.embed on aligned crops)")
    for r in emb_rows:
        print(f"  batch {r['batch']:>2}, {r['threads']} thread(s): {r['batch_ms']:6.1f} ms per batch, "
              f"{r['per_face_ms']:5.2f} ms per face")

    # 2b. The embedder's forward pass against the foamliu export and the un-rewritten graph, side by side.
    from benchmarks import embedder_graphs

    graphs = embedder_graphs.run(args.models_dir, args.photos, args.weights, runs=3 if quick else 60,
                                 profile_runs=2 if quick else 20)

    # 3. HTTP against a real server process.
    workdir = Path(tempfile.mkdtemp(prefix="facerec-bench-"))
    env = {"FACE_MODELS_DIR": str(args.models_dir.resolve()), "FACE_GALLERY_PATH": str(workdir / "http.db"),
           "FACE_LOG_LEVEL": "warning"}
    if Embedder(embedder_path).threshold is None:
        env["FACE_MATCH_THRESHOLD"] = "0.4"  # the model carries none yet; needed to start, irrelevant to speed
    concurrencies = (1, 4, 16)
    requests = {1: 3, 4: 4, 16: 16} if quick else {1: 100, 4: 200, 16: 320}
    detect_jpeg = suites.jpeg(frames[(640, 480)])
    http = suites.http_suite(env, detect_jpeg, (suites.jpeg(portrait_a), suites.jpeg(portrait_b)),
                             concurrencies, requests)
    print("\nHTTP (python -m service, default settings; /detect: a 640x480 JPEG with 2 faces; "
          "/verify: two 640x480 JPEGs of one person)")
    for r in http["rows"]:
        print(f"  {r['endpoint']:>8} c={r['concurrency']:>2}: p50 {r['p50_ms']:6.1f} p95 {r['p95_ms']:6.1f} "
              f"p99 {r['p99_ms']:6.1f} ms, {r['rps']:6.1f} req/s ({r['requests']} requests, {r['errors']} errors)")
    m = http["memory"]
    print(f"  server: ready in {m['startup_s']:.1f} s, RSS {m['rss_idle_mb']:.0f} MiB idle, "
          f"{m['rss_after_load_mb']:.0f} MiB after the load (peak {m['rss_peak_mb']:.0f})")

    # 3b. Where one /detect and one /verify request's time goes (against the network's own time).
    from benchmarks import request_profile

    profile = request_profile.run(args.models_dir, args.photos, requests=3 if quick else 100,
                                  repeat=3 if quick else 60)
    print("\n" + "\n".join(request_profile.report(profile)))

    # 4. 1:N identification.
    sha = Embedder(embedder_path).model_id  # what the server's gallery tags faces with
    galleries = suites.gallery_search(gallery_sizes, len(query), sha, query, workdir, repeat)
    print("\ngallery search (Gallery.search, top 5, one query, synthetic unit embeddings)")
    for g in galleries:
        print(f"  {g['faces']:>8} faces: {g['search_ms']:7.2f} ms (p95 {g['search_p95_ms']:.2f}) exact, "
              f"{g['served_ms']:7.2f} ms {'through the ANN index' if g['indexed'] else 'exact (no index)'}; "
              f"bulk fill {g['fill_s']:.1f} s, {g['db_mb']:.0f} MB file, Gallery load {g['load_s']:.1f} s")
    identify = suites.identify_http(env, galleries, suites.jpeg(portrait_a), 3 if quick else 60)
    print("/identify over HTTP (one face, c=1)")
    for r in identify:
        print(f"  {r['faces']:>8} faces: p50 {r['p50_ms']:6.1f} p95 {r['p95_ms']:6.1f} ms, server RSS "
              f"{r['rss_mb']:.0f} MiB (peak {r['rss_peak_mb']:.0f}), ready in {r['startup_s']:.1f} s")
    shutil.rmtree(workdir, ignore_errors=True)

    # 4b. 1:N identification in PostgreSQL (pgvector HNSW) against exact search.
    from benchmarks import pg_search

    pg_sizes = (2000,) if quick else tuple(int(s) for s in args.pg_sizes.split(",") if s)
    pg_rows, pg_http = [], []
    if pg_sizes:
        print("\ngallery search in PostgreSQL (PostgresGallery.search, top 5, clustered gallery) vs exact")
        pg_rows, pg_http = pg_search.run(
            pg_sizes, (100,) if quick else (40, 100, 200), 20 if quick else 200, repeat, model=sha,
            server_env={k: v for k, v in env.items() if k != "FACE_GALLERY_PATH"}, query_jpeg=suites.jpeg(portrait_a),
            requests=3 if quick else 60,
        )

    # 4b'. The SQLite gallery's ANN index, 100k to 10M faces.
    from benchmarks import ann

    ann_sizes = (2000,) if quick else tuple(int(s) for s in args.ann_sizes.split(",") if s)
    ann_rows, ann_http, ann_builds = [], [], []
    if ann_sizes:
        print("\nSQLite gallery through its ANN index (Gallery.search, top 5) vs exact")
        ann_rows, ann_http, ann_builds = ann.run(
            ann_sizes, args.models_dir, args.photos.parent / "lfw-dev" / "images",
            nprobes=(None, 32) if quick else (None, 512, 768),
            http_sizes=() if quick else tuple(int(s) for s in args.ann_http_sizes.split(",") if s),
            server_env={k: v for k, v in env.items() if k != "FACE_GALLERY_PATH"}, query_jpeg=suites.jpeg(portrait_a),
            requests=3 if quick else 60, repeat=5 if quick else 200, kinds=("uniform",) if quick else ann.KINDS,
        )

    # 4c. Enrolment rate into each store; /identify with one and two replicas on one database.
    from benchmarks import scale_out

    print("\nenrolment rate per store; /identify throughput with one and two replicas on one PostgreSQL database")
    scale = scale_out.run(args.models_dir, suites.jpeg(portrait_a), faces=500 if quick else 100_000,
                          enrolments=20 if quick else 300, http_requests=4 if quick else 60,
                          identify_requests=4 if quick else 120)

    # 5. JPEG decoding libraries.
    decoders = suites.jpeg_decoders(args.photos / "pairs" / "img1.jpg", 3 if quick else 20)
    print("\nJPEG decoding (bytes -> BGR array, one thread)")
    for r in decoders:
        print(f"  {r['image']:>22} {r['decoder']:>20}: {r['ms']:7.1f} ms ({r['ratio']:.2f} x OpenCV), "
              f"max pixel difference from OpenCV {r['max_diff']}")

    # 6. The peer.
    from benchmarks import peer

    peer_result, peer_missing = None, None if not args.no_peer else "skipped (--no-peer)"
    if peer_missing is None:
        peer_missing = peer.available()
    if peer_missing is None:
        cnn_sizes = ((640, 480),)
        peer_result = suites.peer_suite(frames, portrait_a, 2 if quick else 10, cnn_sizes, 1 if quick else 2)
        print(f"\nface_recognition 1.3.0 (dlib {peer_result['dlib']}), defaults (upsample 1)")
        for r in peer_result["detectors"]:
            print(f"  {r['detector']:>10} {r['frame']:>9}: {r['ms']:8.1f} ms, {r['faces']} faces")
        print(f"  descriptor (face_encodings, per face): {f(peer_result['descriptor_ms'])} ms")
    else:
        print(f"\nface_recognition not measured: {peer_missing}")

    ours = {(r["frame"], r["threads"]): r for r in det_rows}
    ratios = []
    if peer_result:
        for r in peer_result["detectors"]:
            mine = ours[(r["frame"], 1)]["detect_ms"]
            ratios.append((f"detect {r['frame']}: ours (1 thread) / {r['detector']}", mine, r["ms"]))
        if peer_result["descriptor_ms"]:
            mine = next(r["per_face_ms"] for r in emb_rows if r["batch"] == 1 and r["threads"] == 1)
            ratios.append(("embed one face: ours (batch 1, 1 thread) / dlib descriptor", mine,
                           peer_result["descriptor_ms"]))
        print("\nratio of our time to face_recognition's (lower is faster)")
        for name, mine, theirs in ratios:
            print(f"  {name}: {mine:.1f} / {theirs:.1f} ms = {mine / theirs:.3f} ({theirs / mine:.0f}x faster)")

    load_after = load_average()
    if not quick or args.out != ROOT / "BENCHMARKS.md":
        write_report(args.out, info, started, load_before, load_after, command, det_rows, emb_rows, http,
                     galleries, identify, peer_result, peer_missing, ratios, quick, graphs, pg_rows, pg_http,
                     decoders, scale, profile, ann_rows, ann_http, ann_builds)
        print(f"\nwrote {args.out}")
    return 0


def jpeg_decoders_section(rows: list[dict]) -> list[str]:
    return [
        "## JPEG decoding",
        "",
        ("Which library turns uploaded JPEG bytes into pixels (`service/images.py`): a real photo (`img1.jpg`) as "
         "sent, and re-encoded at quality 95 as 640x480 and as 5000x4000 (20 MP); median of up to 20 decodes, one "
         "thread. The service uses simplejpeg (libjpeg-turbo) in strict mode: it refuses the entropy-coded data "
         "that ends early, which OpenCV decodes into a grey lower half, and it is the fastest here with the same "
         "pixels as OpenCV."),
        "",
        *table(["image", "bytes", "decoder", "p50 ms", "x OpenCV", "max pixel difference from OpenCV"],
               [[r["image"], f"{r['bytes']:,}", r["decoder"], f(r["ms"]), f(r["ratio"], ".2f"), r["max_diff"]]
                for r in rows]),
        "",
    ]


# Sections that other commands measure and record by hand (each says its own command and date): a rewrite of
# the report keeps them as they are, before "How to reproduce".
KEPT_SECTIONS = ("## Bulk import", "## Video streams", "## Embedding the faces of several images")


def kept_sections(path: Path, headings: tuple[str, ...] = KEPT_SECTIONS) -> list[str]:
    """The sections of the report at `path` whose headings start with one of `headings`, each up to the next
    `## ` heading, as lines: what longer, separate commands wrote (benchmarks/gallery_import.py,
    benchmarks/pg_index_options.py, benchmarks/stream.py), carried over as it stands."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    kept: list[str] = []
    keeping = False
    for line in lines:
        if line.startswith("## "):
            keeping = line.startswith(headings)
        if keeping:
            kept.append(line)
    return kept + [""] if kept and kept[-1] else kept


def write_report(path, info, started, load_before, load_after, command, det_rows, emb_rows, http, galleries,
                 identify, peer_result, peer_missing, ratios, quick, graphs, pg_rows=(), pg_http=(),
                 decoders=(), scale=None, profile=None, ann_rows=(), ann_http=(), ann_builds=()) -> None:
    from benchmarks import ann, pg_index_options, pg_search, request_profile, scale_out
    from benchmarks.embedder_graphs import report as graphs_report

    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{command.strip()}` on {started:%Y-%m-%d %H:%M} UTC"
        + (" (QUICK MODE: tiny sizes, figures meaningless)" if quick else "") + ". Rerun that command to "
        "regenerate this file (`make bench` installs what it needs first). Figures are medians (p50) unless "
        "stated; they are measured, never asserted by tests.",
        "",
        (f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM; {info['os']}; Python "
        f"{info['python']}, onnxruntime {info['onnxruntime']}, numpy {info['numpy']}, OpenCV {info['opencv']}. "
        f"Load average (1, 5, 15 min) before the run: {load_before}; after: {load_after} (other work on the "
        "machine inflates these figures; a load near 0 means they are clean)."),
        "",
        f"Models: `{info['detector']}`, `{info['embedder']}` (sha256 prefixes; built by `make models`).",
        "",
        ("Inputs: `couple.jpg` (two faces) from the shared test photos, centre-cropped and resized to each frame "
        "size; portraits `img20.jpg` / `img21.jpg` (one person) letterboxed whole into 640x480 frames."),
        "",
        "## Detector (RetinaFace MobileNet-0.25, `retinaface_mnet025.onnx`)",
        "",
        ("`RetinaFaceDetector.detect` end to end (resize to the file's `max_side`, normalise, network, decode, "
        "NMS); the network alone in its own column. Frames larger than 640 px are shrunk to 640 px on the long "
        "side first, so the network input is the `input` column and the extra cost of big frames is the resize."),
        "",
        *table(["frame", "network input", "threads", "detect p50 ms", "detect p95 ms", "network p50 ms", "fps",
                "faces"],
               [[r["frame"], r["input"], r["threads"], f(r["detect_ms"]), f(r["detect_p95_ms"]),
                 f(r["network_ms"]), f(1000 / r["detect_ms"], ".0f"), r["faces"]] for r in det_rows]),
        "",
        "## Embedder (MobileFaceNet 192-d, `mobilefacenet_192.onnx`)",
        "",
        "`Embedder.embed` on aligned 112x112 crops (preprocess, network, L2-normalise"
        + (", mirrored-crop averaging on" if emb_rows and emb_rows[0]["flip"] else "") + ").",
        "",
        *table(["threads", "batch", "ms per batch", "ms per face"],
               [[r["threads"], r["batch"], f(r["batch_ms"]), f(r["per_face_ms"], ".2f")] for r in emb_rows]),
        "",
        *graphs_report(graphs),
        "## HTTP, a real server process",
        "",
        ("`python -m service` on a free port, configured only by environment (`FACE_MODELS_DIR`, "
        "`FACE_GALLERY_PATH`, default worker/thread sizing for the cores), loaded by a closed-loop client: "
        "`concurrency` threads, each on its own keep-alive connection, sending its next request when the last "
        "answered. /detect: a 640x480 JPEG with 2 faces; /verify: two 640x480 JPEGs (the portraits). Latency includes "
        "upload, multipart parsing, JPEG decode and the JSON answer."),
        "",
        *table(["endpoint", "concurrency", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "req/s"],
               [[r["endpoint"], r["concurrency"], r["requests"], r["errors"], f(r["p50_ms"]), f(r["p95_ms"]),
                 f(r["p99_ms"]), f(r["rps"])] for r in http["rows"]]),
        "",
        (f"Server resident memory: {http['memory']['rss_idle_mb']:.0f} MiB after start-up (both models loaded, "
        f"empty gallery, ready in {http['memory']['startup_s']:.1f} s), {http['memory']['rss_after_load_mb']:.0f} "
        f"MiB after the load above (peak {http['memory']['rss_peak_mb']:.0f} MiB)."),
        "",
        *([*request_profile.report(profile), ""] if profile else []),
        "## 1:N identification",
        "",
        ("Galleries of synthetic random unit embeddings (192-d, one face per identity). HONEST NOTE on how they "
        "were filled: by one bulk SQL INSERT into the Gallery's own schema (not through /enroll, where each "
        "enrolment is an fsync-ed transaction and a million would take hours), then opened by the `Gallery` "
        "class exactly as the server opens it. `exact search` is `Gallery.search` in process (one query, top 5) "
        "without the ANN index; `as served` is the same with the server's default settings, through the index "
        "where the gallery is large enough for one (FACE_GALLERY_INDEX_MIN_IDENTITIES, 50,000; built and persisted "
        "before the server starts, so it is not measured while building). /identify is over HTTP against a server "
        "started on that gallery file (one face in the photo, so it includes detection, alignment and embedding "
        "as well as the search); its memory includes the index."),
        "",
        *table(["faces", "exact search p50 ms", "exact p95 ms", "as served p50 ms", "as served", "/identify p50 ms",
                "/identify p95 ms", "server RSS MiB", "Gallery load s", "file MB"],
               [[f"{g['faces']:,}", f(g["search_ms"], ".2f"), f(g["search_p95_ms"], ".2f"), f(g["served_ms"], ".2f"),
                 "ANN index" if g["indexed"] else "exact", f(i["p50_ms"]), f(i["p95_ms"]), f(i["rss_mb"], ".0f"),
                 f(g["load_s"]), f(g["db_mb"], ".0f")]
                for g, i in zip(galleries, identify)]),
        "",
        *pg_search.report_lines(list(pg_rows), list(pg_http), table),
        *kept_sections(path, (pg_index_options.SECTION,)),
        *(ann.report_lines(list(ann_rows), list(ann_http), table, list(ann_builds)) if ann_rows
          else kept_sections(path, ("## ANN index for the SQLite gallery",))),
        *kept_sections(path, (ann.LIBRARIES_SECTION,)),
        *scale_out.report_lines(scale, table),
        *(jpeg_decoders_section(decoders) if decoders else []),
        "## The peer: face_recognition 1.3.0 (dlib)",
        "",
    ]
    if peer_result:
        lines += [
            (f"Same frames, `face_recognition.face_locations(rgb, model=...)` with its defaults (upsample 1), dlib "
            f"{peer_result['dlib']} from the `dlib-bin` wheel (CPU, no CUDA). The CNN detector is measured at "
            "640x480 only: at upsample 1 it takes seconds per VGA frame and minutes at 1080p here. Descriptor: "
            "`face_encodings` for one known face (5-point landmarks, 1 jitter), per face."),
            "",
            *table(["detector", "frame", "ms per frame", "faces"],
                   [[r["detector"], r["frame"], f(r["ms"]), r["faces"]] for r in peer_result["detectors"]]),
            "",
            f"Descriptor per face: {f(peer_result['descriptor_ms'])} ms.",
            "",
            ("Ratio of our time to face_recognition's for the same frames (below 1: we are faster). Not the same "
             "arithmetic at every size: our detector shrinks a frame to 640 px on the long side before the "
             "network (its file's `max_side`, what it was trained for), while HOG scans the frame at full size "
             "(upsampled once), so above 640x480 the ratio compares the two tools as each is used, not equal work."),
            "",
            *table(["what", "ours ms", "face_recognition ms", "ratio ours/theirs", "speed-up"],
                   [[name, f(mine), f(theirs), f(mine / theirs, ".3f"), f(theirs / mine, ".0f") + "x"]
                    for name, mine, theirs in ratios]),
        ]
    else:
        lines.append(f"Not measured: {peer_missing}.")
    lines += [
        "",
        *kept_sections(path),
        "## How to reproduce",
        "",
        "```sh",
        "make bench                     # installs the [bench] extra and face_recognition, then runs:",
        f"{command.strip()}",
        'python -m benchmarks.stream --seconds 10   # "Video streams": measured on its own; a rewrite keeps it',
        ("python -m benchmarks.ann --sizes 100000,1000000,10000000 --out BENCHMARKS.md   # the ANN index "
         "(about an hour)"),
        "make evaluate                  # accuracy: pairs.csv, LFW pairs (folds 6-10), detection agreement",
        "```",
        "",
    ]
    Path(path).write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
