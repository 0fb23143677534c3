#!/usr/bin/env bash
# Build bnserve's native data plane (server/native/):  server/native/build.sh -> build/native/bnserve_native
#
# Idempotent and incremental: apt-get runs only when a build dependency is missing; the
# onnxruntime C/C++ API header (Debian trixie's libonnxruntime-dev: no bookworm package has it)
# is fetched once with a private, temporary apt configuration (the host's apt sources and lists
# are never touched) and unpacked into $BNSERVE_NATIVE_CACHE; the library linked is the venv's
# onnxruntime wheel (the same libonnxruntime.so Python loads), found through an rpath.
#
# Environment: VENV (default <repo>/.venv), OUT (default <repo>/build/native),
# BNSERVE_NATIVE_CACHE (default /var/cache/bnserve/native), CXXFLAGS, LDFLAGS, ORT_DEV_SUITE (trixie).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${OUT:-$REPO/build/native}
CACHE=${BNSERVE_NATIVE_CACHE:-/var/cache/bnserve/native}
VENV=${VENV:-$REPO/.venv}
VENV=$(cd "$VENV" && pwd)  # absolute: the library link below is made from it
SUITE=${ORT_DEV_SUITE:-trixie}

log() { echo "build.sh: $*" >&2; }
T0=$(date +%s.%N)
T=$T0
# secs A B: B - A in seconds, two decimals
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
step() {  # step NAME: log how long the step since the previous call took
    local now
    now=$(date +%s.%N)
    log "$(printf '%-30s %7s s' "$1" "$(secs "$T" "$now")")"
    T=$now
}

# 1. Toolchain, gRPC (Debian bookworm: gRPC 1.51, protobuf 3.21) and nlohmann-json.
need=()
command -v g++ >/dev/null || need+=(g++)
command -v make >/dev/null || need+=(make)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v protoc >/dev/null && command -v grpc_cpp_plugin >/dev/null || need+=(protobuf-compiler-grpc)
pkg-config --exists grpc++ 2>/dev/null || need+=(libgrpc++-dev)
pkg-config --exists protobuf 2>/dev/null || need+=(libprotobuf-dev)
[[ -f /usr/include/nlohmann/json.hpp ]] || need+=(nlohmann-json3-dev)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    [[ $(id -u) -eq 0 ]] || { log "need root for apt-get install ${need[*]}"; exit 2; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
step "build dependencies"

# 2. onnxruntime headers: apt-get download libonnxruntime-dev from $SUITE with a private apt
#    configuration in a temporary directory, then dpkg-deb -x into the cache.
ORT_INC=$CACHE/ortdev/usr/include/onnxruntime
if [[ ! -f $ORT_INC/onnxruntime_cxx_api.h ]]; then
    mkdir -p "$CACHE"
    if ! ls "$CACHE"/libonnxruntime-dev_*.deb >/dev/null 2>&1; then
        mirror=""
        if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then  # deb822: the first URIs line
            mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
        fi
        if [[ -z $mirror && -f /etc/apt/sources.list ]]; then
            mirror=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' /etc/apt/sources.list)
        fi
        mirror=${mirror:-http://deb.debian.org/debian}
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/dl"
        keyring=/usr/share/keyrings/debian-archive-keyring.gpg
        echo "deb [signed-by=$keyring] $mirror $SUITE main" >"$tmp/sources.list"
        apt_opts=(-o Dir::Etc::SourceList="$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
                  -o Dir::State::Lists="$tmp/lists" -o Dir::Cache="$tmp/cache"
                  -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null
                  -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root)
        log "fetching libonnxruntime-dev from $mirror $SUITE (private apt configuration in $tmp)"
        apt-get "${apt_opts[@]}" update -qq >&2
        (cd "$tmp/dl" && apt-get "${apt_opts[@]}" download libonnxruntime-dev >&2)
        cp "$tmp"/dl/libonnxruntime-dev_*.deb "$CACHE"/
        rm -rf "$tmp"
        trap - EXIT
    fi
    rm -rf "$CACHE/ortdev"
    dpkg-deb -x "$(ls "$CACHE"/libonnxruntime-dev_*.deb | head -n1)" "$CACHE/ortdev"
fi
[[ -f $ORT_INC/onnxruntime_cxx_api.h ]] || { log "no onnxruntime_cxx_api.h in $ORT_INC"; exit 2; }
step "onnxruntime headers"

# 3. The venv's library. Its soname is libonnxruntime.so.1, which the wheel does not ship: link it.
CAPI=$(ls -d "$VENV"/lib/python3*/site-packages/onnxruntime/capi 2>/dev/null | head -n1 || true)
ORT_LIB=$(ls "$CAPI"/libonnxruntime.so.1.* 2>/dev/null | head -n1 || true)
[[ -n $ORT_LIB ]] || { log "no libonnxruntime.so.1.* under $VENV (onnxruntime wheel installed?)"; exit 2; }
mkdir -p "$OUT/gen" "$OUT/lib"
ln -sfn "$ORT_LIB" "$OUT/lib/libonnxruntime.so.1"
ln -sfn "$ORT_LIB" "$OUT/lib/libonnxruntime.so"

# 4. Generated code from the repo's proto and the health protocol's (each regenerated only when
# its proto changes).
for PROTO in "$REPO/proto/inference.proto" "$HERE/health.proto"; do
    base=$(basename "${PROTO%.proto}")
    if [[ ! -f $OUT/gen/$base.grpc.pb.cc || $PROTO -nt $OUT/gen/$base.grpc.pb.cc ]]; then
        protoc -I "$(dirname "$PROTO")" --cpp_out="$OUT/gen" --grpc_out="$OUT/gen" \
            --plugin=protoc-gen-grpc="$(command -v grpc_cpp_plugin)" "$PROTO"
    fi
done
step "protoc"

# 5. Compile (our sources with -Wall -Wextra; generated code without) and link.
CXXFLAGS=${CXXFLAGS:--O2 -g0 -std=c++17}
WARN="-Wall -Wextra"
# shellcheck disable=SC2207
PKG_CFLAGS=($(pkg-config --cflags grpc++ protobuf))
objs=()
pids=()
srcs=("$OUT/gen/inference.pb.cc" "$OUT/gen/inference.grpc.pb.cc" "$OUT/gen/health.pb.cc"
      "$OUT/gen/health.grpc.pb.cc" "$HERE"/*.cc)
for src in "${srcs[@]}"; do
    obj=$OUT/$(basename "${src%.cc}").o
    flags=$CXXFLAGS
    [[ $src == "$HERE"/* ]] && flags="$CXXFLAGS $WARN"
    # Rebuild on a change of the source, of any header here, or of this script.
    stale=0
    [[ ! -f $obj || $src -nt $obj || $HERE/build.sh -nt $obj ]] && stale=1
    for h in "$HERE"/*.h; do [[ -f $h && $h -nt $obj ]] && stale=1; done
    if ((stale)); then
        log "compiling $(basename "$src")"
        # shellcheck disable=SC2086
        g++ $flags -I "$OUT/gen" -I "$HERE" -isystem "$ORT_INC" "${PKG_CFLAGS[@]}" -c "$src" -o "$obj" &
        pids+=($!)
    fi
    objs+=("$obj")
done
for p in "${pids[@]}"; do wait "$p"; done
step "compile"
relink=0
[[ -f $OUT/bnserve_native ]] || relink=1
for o in "${objs[@]}"; do [[ $o -nt $OUT/bnserve_native ]] && relink=1; done
if ((relink)); then
# shellcheck disable=SC2046
g++ ${LDFLAGS:-} -o "$OUT/bnserve_native.tmp" "${objs[@]}" -L "$OUT/lib" -lonnxruntime \
    -Wl,-rpath,"$OUT/lib" -Wl,--no-as-needed -lgrpc++_reflection -Wl,--as-needed \
    $(pkg-config --libs grpc++ protobuf) -labsl_synchronization -lpthread
mv -f "$OUT/bnserve_native.tmp" "$OUT/bnserve_native"
fi
step "link"
log "built $OUT/bnserve_native in $(secs "$T0" "$(date +%s.%N)") s"
