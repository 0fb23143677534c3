#!/usr/bin/env bash
# Run Triton's perf_analyzer against a bnserve server (docs/perf_analyzer.md).
#
# PyPI's perf-analyzer wheel is tagged manylinux_2_38: on a Debian 12 host (glibc 2.36) pip
# quietly falls back to a 0.1.0 placeholder without the binary. So the real wheel is installed in
# a Debian trixie (glibc 2.41) chroot, prepared once and cached in $PA_ROOT, and the binary is run
# in there. A chroot shares the host's network: -u 127.0.0.1:PORT reaches a server on the host.
#
#   bench/perf_analyzer.sh --prepare-only     # prepare the chroot if needed (idempotent); no run
#   bench/perf_analyzer.sh -m digits -u 127.0.0.1:8001 -i grpc --concurrency-range 4
#
# Every argument but --prepare-only goes to perf_analyzer unchanged; its exit status is returned.
# The current directory is bind-mounted at the same path inside the chroot, so relative paths
# (-f out.csv, --input-data data.json) work; other host paths are not visible in there.
# Root only: debootstrap, chroot, mount and unshare need it.
#
# Environment:
#   PA_ROOT             the chroot (default /var/cache/bnserve/perf-analyzer-trixie), ~260 MB
#   PA_VERSION          perf-analyzer version from PyPI (default 2.60.0)
#   PA_MIRROR           Debian mirror for debootstrap (default: the host's apt mirror)
#   PA_PREPARE_TIMEOUT  seconds for each preparation step, and for waiting on another
#                       preparer's lock (default 900)
#   PA_TIMEOUT          seconds perf_analyzer may run before it is killed (default 1800)
set -euo pipefail

PA_ROOT=${PA_ROOT:-/var/cache/bnserve/perf-analyzer-trixie}
PA_VERSION=${PA_VERSION:-2.60.0}
PA_PREPARE_TIMEOUT=${PA_PREPARE_TIMEOUT:-900}
PA_TIMEOUT=${PA_TIMEOUT:-1800}
SUITE=trixie
VENV=/opt/perf-analyzer                  # inside the chroot
BINARY=$VENV/bin/perf_analyzer.elf       # inside the chroot: link to the wheel's ELF binary
STAMP=.bnserve-perf-analyzer             # in $PA_ROOT: the version, written last
# Beyond minbase: python3-venv for the venv; the shared libraries `ldd perf_analyzer` lists
# (libssl, libcrypto, zlib, zstd, libstdc++, libgcc_s).
EXTRA_PACKAGES=python3,python3-venv,ca-certificates,libssl3t64,zlib1g,libzstd1,libstdc++6,libgcc-s1
CLEAN_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

die() { echo "perf_analyzer.sh: $*" >&2; exit 2; }
log() { echo "perf_analyzer.sh: $*" >&2; }

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap, chroot, mount and unshare need it)"
[[ $PA_ROOT == /* && $PA_ROOT != / ]] || die "PA_ROOT must be an absolute path other than /: '$PA_ROOT'"
for tool in timeout flock unshare chroot mount; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

prepare_only=0
args=()
for a in "$@"; do
    if [[ $a == --prepare-only ]]; then prepare_only=1; else args+=("$a"); fi
done

# A clean environment inside the chroot: the host's PIP_*, proxies and the like mean nothing
# there (a proxy variable could even send 127.0.0.1 traffic astray). GRPC_* is kept (tracing).
chroot_env() {
    local v keep=()
    while IFS='=' read -r v _; do
        [[ $v == GRPC_* ]] && keep+=("$v=${!v}")
    done < <(env)
    env -i PATH="$CLEAN_PATH" HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" "${keep[@]}" "$@"
}

host_mirror() {
    # The first URIs: of the host's deb822 sources, or the first deb line of sources.list.
    local uri=""
    if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
        uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources)
    fi
    if [[ -z $uri && -f /etc/apt/sources.list ]]; then
        uri=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
            /etc/apt/sources.list)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

host_pip_python() {
    local py
    for py in python3 "$(dirname "$(readlink -f "$0")")/../.venv/bin/python"; do
        if "$py" -m pip --version >/dev/null 2>&1; then echo "$py"; return 0; fi
    done
    return 1
}

# Unmount everything at or below $1, deepest first.
umount_below() {
    local root=$1 m
    awk -v r="$root" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

ready() {
    [[ -f $PA_ROOT/$STAMP && $(cat "$PA_ROOT/$STAMP") == "$PA_VERSION" && -x $PA_ROOT$BINARY ]]
}

prepare() {
    if ! command -v debootstrap >/dev/null; then  # a fresh machine: Debian has it
        log "installing debootstrap (apt-get)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; } \
            >/dev/null 2>&1 || die "debootstrap not found and apt-get install debootstrap failed"
    fi
    local work=$PA_ROOT.partial mirror py elf t0=$SECONDS
    mirror=${PA_MIRROR:-$(host_mirror)}
    py=$(host_pip_python) || die "no python with pip on the host (python3 -m pip, or the repo's .venv)"
    umount_below "$work"
    rm -rf --one-file-system "$work" "$work.wheels"
    trap 'umount_below "'"$work"'"; rm -rf "'"$work.wheels"'"' EXIT

    # 1. The wheel, fetched on the host with the host's pip configuration (index, proxy, CAs), so
    #    nothing network-related needs setting up inside. --platform makes pip take the real one.
    log "downloading perf-analyzer==$PA_VERSION (the manylinux_2_38 wheel, 7 MB)"
    timeout --kill-after=10 "$PA_PREPARE_TIMEOUT" "$py" -m pip download --quiet --no-deps \
        --disable-pip-version-check --only-binary=:all: --platform manylinux_2_38_x86_64 \
        --implementation py -d "$work.wheels" "perf-analyzer==$PA_VERSION" >"$work.log" 2>&1 ||
        { tail -20 "$work.log" >&2; die "pip download perf-analyzer==$PA_VERSION failed"; }

    # 2. A minimal trixie (glibc 2.41).
    log "debootstrap $SUITE from $mirror into $work (about a minute)"
    timeout --kill-after=10 "$PA_PREPARE_TIMEOUT" debootstrap --variant=minbase \
        --include="$EXTRA_PACKAGES" "$SUITE" "$work" "$mirror" >"$work.log" 2>&1 ||
        { tail -20 "$work.log" >&2; die "debootstrap failed (log: $work.log)"; }
    rm -f "$work.log"

    # The host's extra CAs (a TLS-intercepting proxy's, say) and names, for anything done inside.
    if compgen -G '/usr/local/share/ca-certificates/*' >/dev/null; then
        mkdir -p "$work/usr/local/share/ca-certificates"
        cp -a /usr/local/share/ca-certificates/. "$work/usr/local/share/ca-certificates/"
    fi
    cp /etc/hosts "$work/etc/hosts"
    cp -L /etc/resolv.conf "$work/etc/resolv.conf" 2>/dev/null || true
    mount -t proc proc "$work/proc"
    mount --bind /dev "$work/dev"
    chroot_env chroot "$work" update-ca-certificates >/dev/null 2>&1 ||
        die "update-ca-certificates failed in the chroot"

    # 3. A venv with the wheel, installed offline from the downloaded file.
    mkdir -p "$work/tmp/wheels"
    cp "$work.wheels"/*.whl "$work/tmp/wheels/"
    chroot_env timeout --kill-after=10 "$PA_PREPARE_TIMEOUT" chroot "$work" /bin/sh -ec "
        python3 -m venv $VENV
        $VENV/bin/pip install --quiet --disable-pip-version-check --no-index \
            --find-links /tmp/wheels perf-analyzer==$PA_VERSION
        rm -rf /tmp/wheels /root/.cache" || die "pip install in the chroot failed"

    # The wheel's perf_analyzer script is a Python shim that drops the exit status: use the ELF.
    elf=$(chroot_env chroot "$work" $VENV/bin/python -c 'import os, perf_analyzer as p
print(os.path.join(os.path.dirname(p.__file__), "bin", "perf_analyzer"))')
    [[ $elf == "$VENV"/* ]] || die "unexpected location of the perf_analyzer binary: $elf"
    ln -sf "../${elf#"$VENV"/}" "$work$BINARY"  # relative: resolves on the host too
    ln -sf "$BINARY" "$work/usr/local/bin/perf_analyzer"
    if chroot_env chroot "$work" ldd "$elf" | grep 'not found' >&2; then
        die "perf_analyzer lacks shared libraries in the chroot: add their packages to EXTRA_PACKAGES"
    fi
    chroot_env chroot "$work" "$BINARY" --version 2>&1 | grep -q 'Perf Analyzer' ||
        die "perf_analyzer does not start in the chroot: $(chroot_env chroot "$work" "$BINARY" --version 2>&1 | head -3)"
    chroot_env chroot "$work" apt-get clean

    umount_below "$work"
    echo "$PA_VERSION" >"$work/$STAMP"
    umount_below "$PA_ROOT"
    rm -rf --one-file-system "$PA_ROOT"
    mv "$work" "$PA_ROOT"
    rm -rf "$work.wheels"
    trap - EXIT
    log "prepared $PA_ROOT in $((SECONDS - t0)) s, $(du -sh --one-file-system "$PA_ROOT" | cut -f1)"
}

# One preparer at a time; a second caller waits (bounded) and then finds the chroot ready.
mkdir -p "$(dirname "$PA_ROOT")"
exec 9>"$PA_ROOT.lock"
flock -w "$PA_PREPARE_TIMEOUT" 9 || die "timed out waiting for another preparation ($PA_ROOT.lock)"
if ready; then
    if [[ $prepare_only -eq 1 ]]; then log "already prepared: $PA_ROOT (perf-analyzer $PA_VERSION)"; fi
else
    prepare
fi
exec 9>&-
if [[ $prepare_only -eq 1 ]]; then exit 0; fi

# Only the current directory is visible inside; perf_analyzer says nothing when it cannot write
# its -f file, so warn about a path it would not find (or would write inside the chroot).
for ((i = 0; i < ${#args[@]}; i++)); do
    a=${args[i]} path=""
    case $a in
        -f | --filename | --input-data | --profile-export-file) path=${args[i + 1]:-} ;;
        --filename=* | --input-data=* | --profile-export-file=*) path=${a#*=} ;;
    esac
    if [[ $path == /* && $path != "$PWD"/* ]]; then
        log "warning: $path is outside the current directory ($PWD), the only host directory" \
            "visible in the chroot; use a path under it"
    fi
done

# The run, in a private mount namespace: its mounts vanish with it even on SIGKILL, and parallel
# runs do not see each other's. The trap unmounts too and removes the mount point it made.
# shellcheck disable=SC2016  # $root etc. expand in the inner shell
inner='
set -euo pipefail
root=$1 here=$2 binary=$3; shift 3
made=""
cleanup() {
    umount -l "$root$here" 2>/dev/null || true
    umount -l "$root/dev" 2>/dev/null || true
    umount -l "$root/proc" 2>/dev/null || true
    if [[ -n $made ]]; then  # rmdir the directories mkdir made, deepest first (empty ones only)
        d=$here
        while rmdir "$root$d" 2>/dev/null && [[ $d != "$made" ]]; do d=$(dirname "$d"); done
    fi
}
trap cleanup EXIT
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
wd=/
if [[ $here != / && $here != "$root" && $here != "$root"/* && $here != /proc* && $here != /dev* ]]; then
    d=$here
    while [[ ! -e $root$d ]]; do made=$d; d=$(dirname "$d"); done
    mkdir -p "$root$here" && mount --bind "$here" "$root$here" && wd=$here
fi
status=0
chroot "$root" /bin/sh -c "cd \"\$1\" && shift && exec \"\$@\"" sh "$wd" "$binary" "$@" || status=$?
exit "$status"
'
status=0
chroot_env timeout --kill-after=10 "$PA_TIMEOUT" unshare --mount --propagation private \
    /bin/bash -c "$inner" bash "$PA_ROOT" "$PWD" "$BINARY" "${args[@]}" || status=$?
if [[ $status -eq 124 ]]; then log "perf_analyzer timed out after PA_TIMEOUT=$PA_TIMEOUT s"; fi
exit "$status"
