#!/usr/bin/env bash
# Install kubelet (v1.36.3) into $PREFIX, built from k8s.io/kubernetes
# through the Go module proxy.
#
# Usage: [PREFIX=/usr/local/bin] [KUBELET_VERSION=v1.36.3] scripts/install-kubelet.sh
#
# `go install k8s.io/kubernetes/cmd/kubelet@v1.36.3` fails: k8s.io/kubernetes'
# go.mod replaces its 33 staging modules (k8s.io/api, k8s.io/client-go, ...)
# with ./staging/src/k8s.io/<name>, and the module zip leaves ./staging out.
# So this script writes a wrapper module that requires k8s.io/kubernetes and
# replaces each staging module with its own published release, v0.<minor>.<patch>,
# which is the same source (the staging trees are published from the same
# commit), and builds cmd/kubelet from it with CGO_ENABLED=0 (a static
# binary, no C toolchain needed), with the version stamped the way
# hack/lib/version.sh does so that `kubelet --version` reports the release.
#
# Idempotent: skipped when $PREFIX/kubelet already reports the version.
set -euo pipefail

PREFIX="${PREFIX:-/usr/local/bin}"
KUBELET_VERSION="${KUBELET_VERSION:-v1.36.3}"

log() { printf '[install-kubelet] %s\n' "$*" >&2; }

command -v go >/dev/null || { log "go is required"; exit 1; }
mkdir -p "$PREFIX"
PREFIX="$(cd "$PREFIX" && pwd)"

if [[ -x "$PREFIX/kubelet" ]] && [[ "$("$PREFIX/kubelet" --version 2>/dev/null)" == "Kubernetes ${KUBELET_VERSION}" ]]; then
	log "kubelet ${KUBELET_VERSION} already present in $PREFIX, skipped"
	exit 0
fi

# v1.36.3 -> major 1, minor 36, staging modules v0.36.3.
ver="${KUBELET_VERSION#v}"
major="${ver%%.*}"
rest="${ver#*.}"
minor="${rest%%.*}"
staging_version="v0.${rest}"

# The staging modules, as k8s.io/kubernetes' go.mod names them
# (`k8s.io/<name> => ./staging/src/k8s.io/<name>`).
staging=(
	api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
	cloud-provider cluster-bootstrap code-generator component-base
	component-helpers controller-manager cri-api cri-client cri-streaming
	csi-translation-lib dynamic-resource-allocation endpointslice externaljwt
	kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler
	kubectl kubelet metrics mount-utils pod-security-admission
	sample-apiserver sample-cli-plugin sample-controller streaming
)

work="$(mktemp -d /tmp/kubelet-build.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# The go directive and godebug line follow k8s.io/kubernetes' own go.mod:
# the main module decides both.
{
	echo "module kubelet-build"
	echo
	echo "go 1.26.0"
	echo
	echo "godebug default=go1.26"
	echo
	echo "require k8s.io/kubernetes ${KUBELET_VERSION}"
	echo
	echo "replace ("
	for m in "${staging[@]}"; do
		echo "	k8s.io/${m} => k8s.io/${m} ${staging_version}"
	done
	echo ")"
} >"$work/go.mod"
# Check the list against the release's go.mod, so a release that adds or
# drops a staging module fails here rather than at link time.
kdir="$(cd "$work" && GOFLAGS='' go mod download -json "k8s.io/kubernetes@${KUBELET_VERSION}" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
[[ -n "$kdir" && -f "$kdir" ]] || { log "go mod download of k8s.io/kubernetes@${KUBELET_VERSION} failed"; exit 1; }
want="$(sed -n 's|^[[:space:]]*k8s.io/\([^ ]*\) => ./staging/src/k8s.io/.*|\1|p' "$kdir" | sort)"
have="$(printf '%s\n' "${staging[@]}" | sort)"
if [[ "$want" != "$have" ]]; then
	log "the staging modules of k8s.io/kubernetes@${KUBELET_VERSION} differ from this script's list:"
	diff <(echo "$have") <(echo "$want") >&2 || true
	exit 1
fi

ldflags=""
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
	ldflags+=" -X ${pkg}.gitVersion=${KUBELET_VERSION}"
	ldflags+=" -X ${pkg}.gitMajor=${major} -X ${pkg}.gitMinor=${minor}"
	ldflags+=" -X ${pkg}.gitTreeState=clean"
	ldflags+=" -X ${pkg}.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
done

t0="$(date +%s)"
log "building kubelet ${KUBELET_VERSION} (staging modules ${staging_version}) in $work ..."
(
	cd "$work"
	# -mod=mod resolves and records (go.sum) only what cmd/kubelet needs;
	# go mod tidy would fetch every test dependency as well.
	CGO_ENABLED=0 GOFLAGS='-mod=mod' go build -trimpath -ldflags "-s -w ${ldflags}" \
		-o "$work/kubelet" k8s.io/kubernetes/cmd/kubelet
)
install -m 0755 "$work/kubelet" "$PREFIX/kubelet"
log "installed $PREFIX/kubelet in $(($(date +%s) - t0))s: $("$PREFIX/kubelet" --version)"
