#!/usr/bin/env bash
# Builds the project's real Dockerfile and proves the image serves real requests, on a machine with no Docker
# engine and no container registry (see README.md, "How the image is checked").
#
#   scripts/check-container.sh                       # from the repository root or anywhere
#   scripts/check-container.sh FACE_INTRA_OP_THREADS=1  # NAME=VALUE: extra environment for the server
#
# 1. installs podman, buildah and debootstrap with apt-get when they are missing (skips, exit 0, when it can't);
# 2. makes a stand-in for the base image, tagged exactly as the Dockerfile's FROM (docker.io/library/
#    python:3.11-slim): Debian bookworm's Python 3.11 via debootstrap, unless an image of that name exists;
# 3. `podman build` of the real Dockerfile (chroot isolation, host network, the CA bundle and the local torch
#    wheel folder mounted in, TORCH_FIND_LINKS pointing at it);
# 4. starts the image's own CMD with `buildah run` (chroot isolation, host network), waits for /health, runs the
#    image's own HEALTHCHECK command inside the container, calls /detect and /verify with real photos over
#    loopback (a synthetic image when ../shared/data is absent), prints the image size and the server's memory;
# 5. cleans up on success and on failure: server stopped, container removed, image removed (KEEP_IMAGE=1
#    keeps it, and the layer cache with it, for a fast re-run).
#
# Environment: CHECK_PORT (default: a free port), IMAGE (default localhost/facerec:check), KEEP_IMAGE (default 0),
# FACEREC_SHARED_DATA (default ../shared/data), TORCH_FIND_LINKS (default: pip's global.find-links).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BASE=docker.io/library/python:3.11-slim
IMAGE=${IMAGE:-localhost/facerec:check}
CTR_NAME=facerec-container-check
KEEP_IMAGE=${KEEP_IMAGE:-0}
SHARED_DATA=${FACEREC_SHARED_DATA:-$ROOT/../shared/data}
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
PY=$(command -v python3 || command -v python)

T0=$SECONDS
say() { printf '[check-container %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
skip() {
    say "SKIP: $*"
    exit 0
}

# --- 1. tools -------------------------------------------------------------------------------------------------
need=()
for tool in podman buildah debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        skip "${need[*]} missing and not root: cannot apt-get install them (install podman, buildah, debootstrap)"
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        skip "${need[*]} missing and no apt-get on this machine"
    fi
    say "installing ${need[*]} with apt-get"
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah debootstrap; } \
        >/tmp/check-container-apt.log 2>&1; then
        tail -20 /tmp/check-container-apt.log
        skip "apt-get could not install podman/buildah/debootstrap (log above)"
    fi
fi
if [[ $(id -u) -ne 0 ]]; then
    skip "not root: the chroot isolation this check relies on needs root"
fi

# --- cleanup, armed before anything is created ---------------------------------------------------------------
rootfs=""
ctr=""
run_pid=""
server_pid=""
workdir=$(mktemp -d)
cleanup() {
    local rc=$?
    set +e
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$server_pid" 2>/dev/null
    fi
    if [[ -n $run_pid ]] && kill -0 "$run_pid" 2>/dev/null; then
        kill "$run_pid" 2>/dev/null
        sleep 1
        kill -9 "$run_pid" 2>/dev/null
    fi
    [[ -n $run_pid ]] && wait "$run_pid" 2>/dev/null
    [[ -n $ctr ]] && buildah rm "$ctr" >/dev/null 2>&1
    [[ -n $rootfs && -d $rootfs ]] && rm -rf --one-file-system "$rootfs"
    if [[ $KEEP_IMAGE != 1 ]]; then
        podman rmi -f "$IMAGE" >/dev/null 2>&1
        # The build stage's layers (torch, npm) are left untagged: drop them too.
        podman image prune -f >/dev/null 2>&1
    fi
    if ((rc != 0)) && [[ -f $workdir/server.log ]]; then
        echo "--- last lines of the server's log ---"
        tail -40 "$workdir/server.log"
    fi
    rm -rf "$workdir"
    if ((rc == 0)); then say "done"; else say "FAILED (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 2. the stand-in base image -------------------------------------------------------------------------------
if podman image exists "$BASE"; then
    say "base image $BASE present"
else
    say "making a stand-in for $BASE with debootstrap (Debian bookworm, Python 3.11)"
    rootfs=$(mktemp -d /var/tmp/check-container-rootfs.XXXXXX)
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian >"$workdir/debootstrap.log" 2>&1 \
        || { tail -20 "$workdir/debootstrap.log"; exit 1; }
    # The official image has `python` on the PATH (in /usr/local/bin); Debian's is python3 in /usr/bin.
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import -q - "$BASE" >/dev/null
    rm -rf --one-file-system "$rootfs"
    rootfs=""
    say "stand-in $BASE made"
fi

# --- 3. build -------------------------------------------------------------------------------------------------
build_args=(--isolation chroot --network host --format docker --pull=never -t "$IMAGE")
[[ -f $CA_BUNDLE ]] && build_args+=(-v "$CA_BUNDLE:$CA_BUNDLE:ro")
wheels=${TORCH_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}
if [[ -n $wheels && -d $wheels ]]; then
    build_args+=(-v "$wheels:$wheels:ro" --build-arg "TORCH_FIND_LINKS=$wheels")
    say "torch from the local wheel folder $wheels"
else
    say "torch from the Dockerfile's default index (no local wheel folder)"
fi
say "building $IMAGE from the Dockerfile"
t_build=$SECONDS
if ! podman build "${build_args[@]}" . >"$workdir/build.log" 2>&1; then
    tail -60 "$workdir/build.log"
    echo "check-container: podman build failed" >&2
    exit 1
fi
grep -E '^(torch |STEP [0-9]+/[0-9]+: FROM)|parity|max \|diff\||\.onnx' "$workdir/build.log" | head -40 || true
say "built in $((SECONDS - t_build)) s"

# --- 4. run and call --------------------------------------------------------------------------------------------
image_json=$(podman image inspect "$IMAGE")
mapfile -t cmd < <("$PY" -c '
import json, sys
cfg = json.loads(sys.stdin.read())[0]["Config"]
for arg in (cfg.get("Entrypoint") or []) + (cfg.get("Cmd") or []):
    print(arg)' <<<"$image_json")
mapfile -t healthcheck < <("$PY" -c '
import json, sys
image = json.loads(sys.stdin.read())[0]
# podman shows it beside Config, docker inside it.
test = (image.get("Healthcheck") or image["Config"].get("Healthcheck") or {}).get("Test") or []
if test[:1] == ["CMD-SHELL"]:
    test = ["/bin/sh", "-c"] + test[1:]
elif test[:1] == ["CMD"]:
    test = test[1:]
else:
    test = []
for arg in test:
    print(arg)' <<<"$image_json")
((${#cmd[@]})) || { echo "check-container: the image has no CMD" >&2; exit 1; }
((${#healthcheck[@]})) || { echo "check-container: the image has no HEALTHCHECK" >&2; exit 1; }

# A fixed name: a container left by a run that was killed outright is removed here.
buildah rm "$CTR_NAME" >/dev/null 2>&1 || true
ctr=$(buildah from --pull-never --name "$CTR_NAME" "$IMAGE")
PORT=${CHECK_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if "$PY" -c "import socket, sys; sys.exit(socket.socket().connect_ex(('127.0.0.1', $PORT)) != 0)"; then
    echo "check-container: something already listens on port $PORT (set CHECK_PORT)" >&2
    exit 1
fi
# Only PORT changes from the image's own environment, so that the check can run beside a server on :8000.
buildah config --env "PORT=$PORT" "$ctr"
# NAME=VALUE arguments are passed to the server's environment, as `docker run -e` would.
for assignment in "$@"; do
    [[ $assignment == *=* ]] || { echo "check-container: expected NAME=VALUE, got $assignment" >&2; exit 2; }
    buildah config --env "$assignment" "$ctr"
done
say "starting the image's CMD: ${cmd[*]} (PORT=$PORT)"
buildah run --isolation chroot --network host "$ctr" -- "${cmd[@]}" >"$workdir/server.log" 2>&1 &
run_pid=$!

t_start=$SECONDS
until "$PY" -c "import urllib.request, sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" \
    2>/dev/null; do
    if ! kill -0 "$run_pid" 2>/dev/null; then
        echo "check-container: the server exited before it was healthy" >&2
        exit 1
    fi
    if ((SECONDS - t_start > 180)); then
        echo "check-container: no /health answer within 180 s" >&2
        exit 1
    fi
    sleep 1
done
say "healthy after $((SECONDS - t_start)) s"

# The server's own process (buildah run forks it into the chroot): whoever listens on the port.
server_pid=$(ss -ltnpH "sport = :$PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -n | head -1 || true)
if [[ -z $server_pid ]]; then
    # No `ss`: the first python process under `buildah run`.
    server_pid=$("$PY" - "$run_pid" <<'EOF'
import os, sys
children = {}
for entry in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{entry}/stat") as f:
            children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    except OSError:
        pass
stack = [int(sys.argv[1])]
while stack:
    pid = stack.pop(0)
    with open(f"/proc/{pid}/comm") as f:
        if f.read().startswith("python"):
            print(pid)
            break
    stack.extend(sorted(children.get(pid, [])))
EOF
)
fi
[[ -n $server_pid ]] || { echo "check-container: cannot find the process listening on :$PORT" >&2; exit 1; }

rss_of_tree() {
    "$PY" - "$1" <<'EOF'
import os, sys
root = int(sys.argv[1])
children = {}
for entry in os.listdir("/proc"):
    if entry.isdigit():
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(entry))
total, stack = 0, [root]
while stack:
    pid = stack.pop()
    stack.extend(children.get(pid, []))
    with open(f"/proc/{pid}/status") as f:
        total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
print(f"{total / 1024:.1f}")
EOF
}
sleep 2
rss_rest=$(rss_of_tree "$server_pid")

say "running the image's HEALTHCHECK inside the container: ${healthcheck[*]}"
buildah run --isolation chroot --network host "$ctr" -- "${healthcheck[@]}"

"$PY" - "$PORT" "$SHARED_DATA" <<'EOF'
"""Real requests over loopback, standard library only: what a user's `curl -F` would send."""
import csv, json, struct, sys, uuid, zlib
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

port, shared = sys.argv[1], Path(sys.argv[2])
base = f"http://127.0.0.1:{port}"


def call(path, files=None):
    if files is None:
        req = Request(base + path)
    else:
        boundary = uuid.uuid4().hex
        body = b""
        for field, (name, data) in files.items():
            body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
                     f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        req = Request(base + path, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def png(width=96, height=96):
    rows = b"".join(b"\x00" + bytes((x * 255 // width) for x in range(width)) for _ in range(height))
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


status, health = call("/health")
print(f"GET /health -> {status} {json.dumps(health)}")
assert status == 200, health

pairs = shared / "faces" / "pairs" / "pairs.csv"
if pairs.is_file():
    with open(pairs) as f:
        same = next(r for r in csv.DictReader(f, skipinitialspace=True) if r["Decision"].strip() == "Yes")
    a, b = pairs.parent / same["file_x"].strip(), pairs.parent / same["file_y"].strip()
    status, body = call("/detect", {"image": (a.name, a.read_bytes())})
    faces = body.get("faces")
    print(f"POST /detect {a.name} -> {status}, {len(faces or [])} face(s), first: "
          f"{json.dumps((faces or [None])[0])[:200]}")
    assert status == 200 and isinstance(faces, list) and len(faces) >= 1, body
    assert {"box", "score", "landmarks"} <= set(faces[0]), faces[0]
    status, body = call("/verify", {"image1": (a.name, a.read_bytes()), "image2": (b.name, b.read_bytes())})
    print(f"POST /verify {a.name} {b.name} (same person) -> {status} {json.dumps(body)[:300]}")
    assert status == 200 and body.get("match") is True, body
else:
    print(f"SKIP /verify: {shared} is absent, so there is no real same-person pair to send; "
          "/detect runs on a synthetic image (answer shape only)")
    status, body = call("/detect", {"image": ("synthetic.png", png())})
    print(f"POST /detect synthetic.png -> {status} {json.dumps(body)[:200]}")
    assert status == 200 and isinstance(body.get("faces"), list), body
EOF

rss_after=$(rss_of_tree "$server_pid")
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
base_size=$(podman image inspect --format '{{.Size}}' "$BASE")
say "image $IMAGE: $((size / 1000000)) MB uncompressed, of which base $((base_size / 1000000)) MB" \
    "and the project's layers $(((size - base_size) / 1000000)) MB"
# The layers that weigh something (no `head`: a closed pipe would end the script under pipefail).
podman history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | awk -F'\t' '$1 !~ /^0 B/' | cut -c1-150
say "server memory (RSS, process tree of pid $server_pid): ${rss_rest} MiB at rest after start-up," \
    "${rss_after} MiB after the requests"
if [[ -f $SHARED_DATA/faces/pairs/pairs.csv ]]; then
    say "all checks passed"
else
    say "all checks passed except /verify, skipped: no shared data at $SHARED_DATA"
fi
