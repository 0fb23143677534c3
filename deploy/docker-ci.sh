#!/usr/bin/env bash
# Build the bnserve image and run it for real: health, unary + streaming inference checked
# against in-process onnxruntime, metrics, SIGTERM drain (exit 0, "stopped cleanly").
#
#   sudo deploy/docker-ci.sh            # by hand, as root; CI=true from CI (.ci/run)
#
# Needs: root, Debian (apt-get for docker.io and debootstrap if missing), PyPI and a Debian
# mirror, and .venv with tritonclient + onnxruntime (`make install-test`) for the client checks.
# Uses a running Docker engine if there is one; otherwise starts a private dockerd (own
# data-root, exec-root and socket; no bridge, no iptables) and stops it on exit, leaving no
# daemon, mount or container behind.
#
# Environment (all optional):
#   BNSERVE_DOCKER_CACHE  cache dir: dated debootstrap base tarball + the private data-root
#                         (layer cache for reruns); default /var/cache/bnserve-docker
#   BNSERVE_DOCKER_FRESH  1: private data-root in a temp dir, deleted at exit (no layer cache)
#   BNSERVE_BASE_IMAGE    base to build on; default local/bnserve-base (debootstrap bookworm,
#                         made here). Any image with python3.11 and its venv module works,
#                         e.g. python:3.11-slim when a registry is reachable.
#   BNSERVE_IMAGE         tag of the built image; default local/bnserve:ci
#   BNSERVE_CI_PORT, BNSERVE_CI_METRICS_PORT   host ports of the test container (default: free
#                         ones, picked at the start)
#   PYTHON                interpreter for the client checks; default .venv/bin/python
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DOCKER=/usr/bin/docker   # Debian's client; /usr/local/bin/docker (28.x) has no buildx here
IMAGE=${BNSERVE_IMAGE:-local/bnserve:ci}
BASE_REPO=local/bnserve-base
BASE_IMAGE=${BNSERVE_BASE_IMAGE:-$BASE_REPO}
CACHE=${BNSERVE_DOCKER_CACHE:-/var/cache/bnserve-docker}
FRESH=${BNSERVE_DOCKER_FRESH:-0}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
# Free ports by default, picked now (two clones may run this at once on one host).
free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
PORT=${BNSERVE_CI_PORT:-$(free_port)}
METRICS_PORT=${BNSERVE_CI_METRICS_PORT:-$(free_port)}
SUITE=bookworm
CONTAINER=bnserve-ci-$$
DAY=$(date -u +%Y%m%d)

WORK=$(mktemp -d /tmp/bnserve-docker.XXXXXX)   # short path: socket paths are length-limited
EXEC_ROOT=$WORK/exec
SOCK=$WORK/docker.sock
DOCKERD_PID=
CONTAINER_STARTED=0
DATA_ROOT=
MADE_RUN_DOCKER=0

T0=$(date +%s.%N)
PHASE_NAMES=()
PHASE_SECS=()
PHASE=
PHASE_T=

log() { printf '[docker-ci %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
phase() {  # phase NAME: close the previous phase (records its duration), open NAME
    local t
    t=$(now)
    if [[ -n $PHASE ]]; then
        PHASE_NAMES+=("$PHASE")
        PHASE_SECS+=("$(awk -v a="$PHASE_T" -v b="$t" 'BEGIN { printf "%.1f", b - a }')")
    fi
    PHASE=$1
    PHASE_T=$t
    [[ -n $PHASE ]] && log "== $PHASE"
    return 0
}
report_timings() {
    phase ""
    local i
    log "timings (s):"
    for i in "${!PHASE_NAMES[@]}"; do
        printf '    %-22s %6s\n' "${PHASE_NAMES[$i]}" "${PHASE_SECS[$i]}" >&2
    done
    printf '    %-22s %6s\n' total "$(awk -v a="$T0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')" >&2
}

# Every mount point under a directory, deepest first.
mounts_under() {
    awk -v p="$1/" '{ m = $5; gsub(/\\040/, " ", m); if (index(m "/", p) == 1) print m }' \
        /proc/self/mountinfo | sort -r
}
unmount_under() {
    local m
    for m in $(mounts_under "$1"); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
    done
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ $rc -ne 0 ]]; then
        log "exit code $rc"
        if [[ $CONTAINER_STARTED == 1 ]]; then
            log "container log (last 40 lines):"
            timeout 10 "$DOCKER" logs --tail 40 "$CONTAINER" 2>&1 | sed 's/^/    /' >&2
        fi
        if [[ -n $DOCKERD_PID && -f $WORK/dockerd.log ]]; then
            log "dockerd log (last 20 lines):"
            tail -n 20 "$WORK/dockerd.log" | sed 's/^/    /' >&2
        fi
    fi
    if [[ $CONTAINER_STARTED == 1 ]]; then
        timeout 30 "$DOCKER" rm -f "$CONTAINER" >/dev/null 2>&1
    fi
    if [[ -n $DOCKERD_PID ]]; then
        local containerd_pid=
        [[ -f $EXEC_ROOT/containerd/containerd.pid ]] &&
            containerd_pid=$(cat "$EXEC_ROOT/containerd/containerd.pid" 2>/dev/null)
        kill -TERM "$DOCKERD_PID" 2>/dev/null
        local i
        for i in $(seq 1 100); do  # <= 20 s
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            log "dockerd $DOCKERD_PID still running after 20 s: SIGKILL"
            kill -KILL "$DOCKERD_PID" 2>/dev/null
        fi
        wait "$DOCKERD_PID" 2>/dev/null
        # dockerd normally stops the containerd it started; make sure (by its pid, nothing else).
        if [[ -n $containerd_pid ]] && kill -0 "$containerd_pid" 2>/dev/null; then
            log "stopping leftover containerd $containerd_pid"
            kill -TERM "$containerd_pid" 2>/dev/null
            for i in $(seq 1 50); do kill -0 "$containerd_pid" 2>/dev/null || break; sleep 0.2; done
            kill -KILL "$containerd_pid" 2>/dev/null
        fi
        unmount_under "$EXEC_ROOT"     # netns/default and anything else
        [[ -n $DATA_ROOT ]] && unmount_under "$DATA_ROOT"
        [[ $MADE_RUN_DOCKER == 1 ]] && rmdir /run/docker/plugins /run/docker 2>/dev/null
        [[ $FRESH == 1 && -n $DATA_ROOT ]] && rm -rf "$DATA_ROOT"
    fi
    unmount_under "$WORK"              # debootstrap's proc/sys if it was interrupted
    if [[ -z $(mounts_under "$WORK") ]]; then
        rm -rf "$WORK"
    else
        log "mounts remain under $WORK; not deleting it"
    fi
    [[ $PHASE_T ]] && report_timings
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[[ $(id -u) == 0 ]] || die "run as root (apt-get, dockerd, debootstrap)"

# ---------------------------------------------------------------------------------------------
phase "packages"
need=()
DOCKERD=$(command -v dockerd || echo /usr/sbin/dockerd)
[[ -x $DOCKER && -x $DOCKERD ]] || need+=(docker.io)
if [[ $BASE_IMAGE == "$BASE_REPO" ]] && ! command -v debootstrap >/dev/null; then
    need+=(debootstrap)
fi
if ((${#need[@]})); then
    log "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq
    timeout 600 apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[[ -x $PYTHON ]] || die "$PYTHON not found: run 'make install-test' first (or set PYTHON)"
"$PYTHON" -c 'import tritonclient.grpc, onnxruntime, numpy' ||
    die "$PYTHON lacks tritonclient[grpc]/onnxruntime/numpy (make install-test)"

# ---------------------------------------------------------------------------------------------
phase "engine"
if timeout 10 "$DOCKER" info >/dev/null 2>&1; then
    log "using the running Docker engine ($("$DOCKER" version -f '{{.Server.Version}}'))"
else
    mkdir -p "$CACHE"
    if [[ $FRESH == 1 ]]; then
        DATA_ROOT=$WORK/data
    else
        DATA_ROOT=$CACHE/data-root
        # One private engine per data-root at a time.
        exec 9>"$CACHE/lock"
        flock -w 300 9 || die "another docker-ci.sh holds $CACHE/lock"
    fi
    mkdir -p "$DATA_ROOT" "$EXEC_ROOT"
    [[ -e /run/docker ]] || MADE_RUN_DOCKER=1   # dockerd makes /run/docker/plugins regardless
    "$DOCKERD" --data-root "$DATA_ROOT" --exec-root "$EXEC_ROOT" \
        --pidfile "$WORK/dockerd.pid" -H "unix://$SOCK" \
        --storage-driver overlay2 --bridge=none --iptables=false --ip6tables=false \
        >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    export DOCKER_HOST=unix://$SOCK
    for i in $(seq 1 150); do  # <= 30 s
        timeout 5 "$DOCKER" version >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || die "dockerd exited (log: $WORK/dockerd.log)"
        sleep 0.2
    done
    timeout 5 "$DOCKER" version >/dev/null 2>&1 || die "dockerd not ready after 30 s"
    log "private dockerd $DOCKERD_PID ($("$DOCKER" version -f '{{.Server.Version}}')), data-root $DATA_ROOT"
fi
export DOCKER_BUILDKIT=1

# ---------------------------------------------------------------------------------------------
phase "base image"
if [[ $BASE_IMAGE != "$BASE_REPO" ]]; then
    log "building on $BASE_IMAGE (not made here)"
elif "$DOCKER" image inspect "$BASE_REPO:$DAY" >/dev/null 2>&1; then
    log "$BASE_REPO:$DAY already in the engine"
    "$DOCKER" tag "$BASE_REPO:$DAY" "$BASE_REPO:latest"
else
    mkdir -p "$CACHE"
    tarball=$CACHE/base-$SUITE-$DAY.tar
    if [[ ! -s $tarball ]]; then
        mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        [[ -n $mirror ]] || mirror=$(awk '$1 == "deb" && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
        mirror=${mirror:-http://deb.debian.org/debian}
        rootfs=$WORK/rootfs
        log "debootstrap $SUITE from $mirror (about a minute)"
        timeout 600 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$SUITE" "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
            { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
        unmount_under "$rootfs"
        # The machine's extra CAs (e.g. a TLS-inspecting egress proxy) so pip works in the build.
        if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
            cp -r /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/"
            chroot "$rootfs" update-ca-certificates >>"$WORK/debootstrap.log" 2>&1
        fi
        # Trim what a server never reads.
        chroot "$rootfs" apt-get clean
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
            "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log \
            "$rootfs"/var/cache/debconf/*-old "$rootfs"/usr/lib/python3.11/test
        rm -f "$CACHE"/base-$SUITE-*.tar   # older days
        tar -C "$rootfs" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    else
        log "base tarball from cache: $tarball"
    fi
    "$DOCKER" import -c 'CMD ["/bin/bash"]' "$tarball" "$BASE_REPO:$DAY" >/dev/null
    "$DOCKER" tag "$BASE_REPO:$DAY" "$BASE_REPO:latest"
    # Older dated bases go (their tag only; layers still used by cached builds stay).
    for old in $("$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}' "$BASE_REPO"); do
        [[ $old == "$BASE_REPO:$DAY" || $old == "$BASE_REPO:latest" ]] || "$DOCKER" rmi "$old" >/dev/null || true
    done
fi
"$DOCKER" run --rm --network host --entrypoint python3 "$BASE_IMAGE" -c \
    'import sys, venv; assert sys.version_info[:2] == (3, 11), sys.version' ||
    die "$BASE_IMAGE has no python3.11 with venv"

# ---------------------------------------------------------------------------------------------
phase "build"
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
# Reach PyPI the way the host does: the host's pip index/proxy settings become build args
# (ARGs of the build stage only; never in the runtime image). Nothing is hard-coded.
pip_setting() {  # pip_setting ENV_NAME pip-config-key
    local v=${!1:-}
    [[ -n $v ]] || v=$("$PYTHON" -m pip config get "global.$2" 2>/dev/null || true)
    # file:// indexes and find-links live on the host's disk, not in the build: dropped.
    v=$(tr ' ' '\n' <<<"$v" | grep -v '^file:' | paste -sd ' ' || true)
    [[ -n $v ]] && build_args+=(--build-arg "$1=$v")
    return 0
}
pip_setting PIP_INDEX_URL index-url
pip_setting PIP_EXTRA_INDEX_URL extra-index-url
pip_setting PIP_TRUSTED_HOST trusted-host
pip_setting PIP_DEFAULT_TIMEOUT timeout
for v in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
    [[ -n ${!v:-} ]] && build_args+=(--build-arg "$v=${!v}")
done
log "build args: $(printf '%s\n' "${build_args[@]}" | grep -v '^--' | cut -d= -f1 | paste -sd ' ')"
build_start=$(now)
timeout 900 "$DOCKER" build --network host --progress plain "${build_args[@]}" \
    -t "$IMAGE" -f Dockerfile . >"$WORK/build.log" 2>&1 ||
    { tail -n 40 "$WORK/build.log" >&2; die "docker build failed"; }
build_secs=$(awk -v a="$build_start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
cached=$(grep -c ' CACHED$' "$WORK/build.log" || true)
size_bytes=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
size_mb=$(awk -v s="$size_bytes" 'BEGIN { printf "%.0f", s / 1e6 }')
log "built $IMAGE in ${build_secs} s ($cached cached steps): ${size_mb} MB (base $("$DOCKER" image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{ printf "%.0f", $1 / 1e6 }') MB)"
"$DOCKER" image prune -f >/dev/null || true   # dangling images of earlier runs
"$DOCKER" builder prune -f --keep-storage 1gb >/dev/null || true   # bound the build cache

# The image's own contract: non-root, no torch, the bundled repository, exec-form entrypoint.
"$DOCKER" run --rm --network host --entrypoint python "$IMAGE" -c '
import importlib.util, os, pathlib
assert os.getuid() != 0, "runs as root"
assert importlib.util.find_spec("torch") is None, "torch in the serving image"
assert pathlib.Path("/models/digits/1/model.onnx").is_file(), "no bundled repository"
venv = sum(p.stat().st_size for p in pathlib.Path("/opt/bnserve").rglob("*") if p.is_file() and not p.is_symlink())
print("uid", os.getuid(), "no torch, /models:", sorted(p.name for p in pathlib.Path("/models").iterdir()),
      f"venv {venv / 1e6:.0f} MB")
' >&2
[[ $("$DOCKER" image inspect -f '{{json .Config.Entrypoint}}' "$IMAGE") == '["bnserve","serve"]' ]] ||
    die "entrypoint is not exec-form bnserve serve"

# ---------------------------------------------------------------------------------------------
# The same checks against each front end of the image (docs/native.md): start, client checks,
# SIGTERM drain.
serve_and_check() {
local FRONTEND=$1
phase "start + healthy ($FRONTEND)"
"$PYTHON" - "$PORT" "$METRICS_PORT" <<'EOF' || die "port $PORT or $METRICS_PORT is busy on this host (set BNSERVE_CI_PORT/BNSERVE_CI_METRICS_PORT)"
import socket, sys
for port in map(int, sys.argv[1:]):
    with socket.socket() as s:  # SO_REUSEADDR like the servers: TIME_WAIT is not "busy"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
EOF
# Ports through BNSERVE_* (not --port) so the image's HEALTHCHECK follows them; only the
# check interval is shortened for CI.
# Read-only root, /tmp tmpfs, no capabilities: the Deployment's securityContext.
"$DOCKER" run -d --name "$CONTAINER" --network host \
    --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
    -e BNSERVE_HOST=127.0.0.1 -e BNSERVE_PORT="$PORT" -e BNSERVE_METRICS_PORT="$METRICS_PORT" \
    --health-interval 1s --health-start-period 30s \
    "$IMAGE" --instances 2 --frontend "$FRONTEND" >/dev/null
CONTAINER_STARTED=1
status=
for i in $(seq 1 120); do  # <= 60 s
    status=$("$DOCKER" inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$CONTAINER")
    [[ $status == "running healthy" ]] && break
    [[ $status == running* ]] || die "container is $status"
    sleep 0.5
done
[[ $status == "running healthy" ]] || die "not healthy after 60 s: $status"
log "healthy: $("$DOCKER" inspect -f '{{(index .State.Health.Log 0).Output}}' "$CONTAINER" | head -n 1)"

# ---------------------------------------------------------------------------------------------
phase "client checks ($FRONTEND)"
timeout 120 "$PYTHON" - "127.0.0.1:$PORT" "$METRICS_PORT" "$ROOT/model_repository/digits/1/model.onnx" <<'EOF'
"""Unary ModelInfer and ModelStreamInfer on digits, compared with onnxruntime in-process."""
import queue
import sys
import urllib.request

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient

target, metrics_port, onnx_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
in_name, out_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
rng = np.random.default_rng(0)


def expected(x):
    return sess.run([out_name], {in_name: x})[0]


def inputs(x):
    inp = grpcclient.InferInput(in_name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def close(got, want, what):
    err = float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))
    assert got.shape == want.shape and err <= 1e-5, f"{what}: shape {got.shape}, rel err {err}"
    return err


client = grpcclient.InferenceServerClient(target)
assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
worst = 0.0
for batch in (1, 4, 64):
    x = rng.random((batch, 1, 8, 8), dtype=np.float32)
    got = client.infer("digits", inputs(x), outputs=[grpcclient.InferRequestedOutput(out_name)])
    worst = max(worst, close(got.as_numpy(out_name), expected(x), f"unary batch {batch}"))
print(f"unary ModelInfer: batches 1, 4, 64 match onnxruntime (max rel err {worst:.2e})")

answers: queue.Queue = queue.Queue()
client.start_stream(callback=lambda result, error: answers.put((result, error)))
sent = {}
for i in range(32):
    x = rng.random((1 + i % 5, 1, 8, 8), dtype=np.float32)
    sent[f"r{i}"] = x
    client.async_stream_infer("digits", inputs(x), request_id=f"r{i}")
seen = set()
for _ in sent:
    result, error = answers.get(timeout=30)
    assert error is None, error
    rid = result.get_response().id
    assert rid in sent and rid not in seen, f"stream answer id {rid!r}"
    seen.add(rid)
    worst = max(worst, close(result.as_numpy(out_name), expected(sent[rid]), f"stream {rid}"))
client.stop_stream()
print(f"ModelStreamInfer: {len(seen)} answers, ids matched, equal to onnxruntime "
      f"(max rel err {worst:.2e})")

with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
    text = r.read().decode()
assert r.status == 200 and "digits" in text, "metrics endpoint has no digits series"
print(f"metrics: {len(text.splitlines())} lines on :{metrics_port}/metrics")
client.close()
EOF

# The compose file's bench service, in the image, against the container (when the image has
# `bnserve bench`; skipped otherwise). Short: the point is that the command works end to end.
if "$DOCKER" run --rm --network host --entrypoint bnserve "$IMAGE" bench --help >/dev/null 2>&1; then
    timeout 90 "$DOCKER" run --rm --network host --entrypoint bnserve "$IMAGE" \
        bench --target "127.0.0.1:$PORT" --model digits --duration 3 --concurrency 8 >"$WORK/bench.log" 2>&1 ||
        { cat "$WORK/bench.log" >&2; die "bnserve bench in the image failed"; }
    tail -n 12 "$WORK/bench.log" | sed 's/^/    /' >&2
else
    log "the image has no 'bnserve bench' yet: compose's bench command not exercised"
fi
mem=$(timeout 20 "$DOCKER" stats --no-stream --format '{{.MemUsage}}' "$CONTAINER" 2>/dev/null || true)
log "container memory after the checks ($FRONTEND, 2 instances per model): ${mem:-unknown}"

# ---------------------------------------------------------------------------------------------
phase "SIGTERM drain ($FRONTEND)"
timeout 60 "$DOCKER" stop -t 30 "$CONTAINER" >/dev/null   # SIGTERM, SIGKILL only after 30 s
read -r code oom < <("$DOCKER" inspect -f '{{.State.ExitCode}} {{.State.OOMKilled}}' "$CONTAINER")
logs=$("$DOCKER" logs "$CONTAINER" 2>&1)
[[ $code == 0 ]] || { printf '%s\n' "$logs" | tail -n 20 >&2; die "exit code $code after SIGTERM (oom $oom)"; }
grep -q "stopped cleanly" <<<"$logs" || { printf '%s\n' "$logs" | tail -n 20 >&2; die "no 'stopped cleanly' in the log"; }
log "exit code 0; $(grep -o 'stopped cleanly.*' <<<"$logs" | head -n 1)"
"$DOCKER" rm "$CONTAINER" >/dev/null
CONTAINER_STARTED=0

}

for frontend in python native; do
    serve_and_check "$frontend"
done

phase ""
log "OK: image $IMAGE ${size_mb} MB (${size_bytes} bytes), build ${build_secs} s"
echo "image_size_mb=$size_mb build_seconds=$build_secs"
