#!/usr/bin/env bash
# Install containerd + ctr (v2.4.2) and crictl + critest (v1.36.0) into $PREFIX,
# built from source through the Go module proxy (the only network reachable
# here; release tarballs cannot be downloaded).
#
# Usage: [PREFIX=/usr/local/bin] scripts/install-containerd.sh
#
# Idempotent: a binary that already reports the wanted version is skipped.
# runc is deliberately NOT installed: the resource-slot runtime never runs
# real containers through runc.
set -euo pipefail

PREFIX="${PREFIX:-/usr/local/bin}"
CONTAINERD_VERSION="${CONTAINERD_VERSION:-v2.4.2}"
CRITOOLS_VERSION="${CRITOOLS_VERSION:-v1.36.0}"

log() { printf '[install-containerd] %s\n' "$*" >&2; }

# elapsed START -> "Ns" since START (seconds since epoch).
elapsed() { printf '%ds' "$(($(date +%s) - $1))"; }

command -v go >/dev/null || { log "go is required"; exit 1; }
mkdir -p "$PREFIX"
# Resolve to an absolute path: GOBIN and go build -o must not depend on cwd.
PREFIX="$(cd "$PREFIX" && pwd)"

# has_version BIN VERSION: true if "$BIN --version" names VERSION (with or
# without a leading "v", optionally followed by "+suffix") as a whole word.
has_version() {
	local bin="$1" want="${2#v}"
	[[ -x "$bin" ]] || return 1
	"$bin" --version 2>/dev/null | grep -Eq "(^|[ v])${want//./\\.}([ +]|\$)"
}

# containerd's version package defaults to "<ver>+unknown" when built by plain
# go install; set it explicitly so --version is exact and the check is stable.
ctrd_ldflags="-X github.com/containerd/containerd/v2/version.Version=${CONTAINERD_VERSION}"

install_containerd_cmd() {
	local name="$1" t0
	if has_version "$PREFIX/$name" "${CONTAINERD_VERSION}"; then
		log "$name ${CONTAINERD_VERSION} already present in $PREFIX, skipped"
		return
	fi
	t0="$(date +%s)"
	log "building $name ${CONTAINERD_VERSION} (go install) ..."
	# CGO disabled: containerd's cgo parts (btrfs, seccomp) are optional and a
	# static binary avoids needing dev headers.
	GOBIN="$PREFIX" CGO_ENABLED=0 GOFLAGS='' go install -ldflags "$ctrd_ldflags" \
		"github.com/containerd/containerd/v2/cmd/${name}@${CONTAINERD_VERSION}"
	log "installed $PREFIX/$name in $(elapsed "$t0"): $("$PREFIX/$name" --version)"
}

install_containerd_cmd containerd
install_containerd_cmd ctr

# cri-tools cannot be "go install"ed (the proxy refuses: its go.mod has
# replace directives), so build it from a writable copy of the module source.
critools_src=""
cleanup() { [[ -n "$critools_src" ]] && rm -rf "$critools_src"; return 0; }
trap cleanup EXIT

critools_checkout() {
	[[ -n "$critools_src" ]] && return
	local dir
	dir="$(cd /tmp && GOFLAGS='' go mod download -json "sigs.k8s.io/cri-tools@${CRITOOLS_VERSION}" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
	[[ -n "$dir" && -d "$dir" ]] || { log "go mod download of cri-tools failed"; exit 1; }
	critools_src="$(mktemp -d /tmp/cri-tools.XXXXXX)"
	cp -r "$dir/." "$critools_src/"
	# The module cache is read-only; go build -mod=mod wants to write go.sum.
	chmod -R u+w "$critools_src"
}

# Same ldflags as cri-tools' Makefile so "--version" reports the release.
crit_ldflags="-X sigs.k8s.io/cri-tools/pkg/version.Version=${CRITOOLS_VERSION#v}"

if has_version "$PREFIX/crictl" "${CRITOOLS_VERSION#v}"; then
	log "crictl ${CRITOOLS_VERSION} already present in $PREFIX, skipped"
else
	t0="$(date +%s)"
	critools_checkout
	log "building crictl ${CRITOOLS_VERSION} ..."
	# The module zip has no vendor/ dir, hence -mod=mod instead of -mod=vendor.
	(cd "$critools_src" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath \
		-ldflags "$crit_ldflags" -o "$PREFIX/crictl" ./cmd/crictl)
	log "installed $PREFIX/crictl in $(elapsed "$t0"): $("$PREFIX/crictl" --version)"
fi

# critest is a ginkgo test binary: the Makefile builds it with "go test -c".
# Its "--version" prints "critest version: X" (and a PASS line).
if has_version "$PREFIX/critest" "${CRITOOLS_VERSION}"; then
	log "critest ${CRITOOLS_VERSION} already present in $PREFIX, skipped"
else
	t0="$(date +%s)"
	critools_checkout
	log "building critest ${CRITOOLS_VERSION} (go test -c) ..."
	(cd "$critools_src" && CGO_ENABLED=0 GOFLAGS=-mod=mod go test -c -trimpath \
		-ldflags "$crit_ldflags" -o "$PREFIX/critest" ./cmd/critest)
	log "installed $PREFIX/critest in $(elapsed "$t0"): $("$PREFIX/critest" --version 2>/dev/null | head -n 1)"
fi

log "done: $(printf '%s ' "$PREFIX"/{containerd,ctr,crictl,critest})"
