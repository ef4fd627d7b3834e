#!/usr/bin/env bash
# Import, under the names critest (cri-tools v1.36.0) runs its containers
# from, the e2e test image of scripts/build-test-image.sh into the private
# containerd at $CTRD_BASE (scripts/containerd-env.sh). Nothing can be pulled
# on the test machines, and in slot mode no process runs, so one tiny image
# stands for all of them.
#
# Usage: scripts/critest-images.sh [--list]
#   --list   only print the names
#
# With CRITEST_IMAGES=busybox (vm mode, where the containers run) the image
# under those names is the busybox image of scripts/build-busybox-image.sh
# instead: critest's commands (sh -c, top, echo, cat, ls, sleep, id) need a
# shell and coreutils; the nginx and httpd names get busybox too, whose
# default command is /bin/sh, so their specs fail.
#
# The names (pkg/framework and pkg/validate of cri-tools v1.36.0):
#   registry.k8s.io/e2e-test-images/busybox:1.29-2   default container image
#   registry.k8s.io/e2e-test-images/nginx:1.14-2     networking, HostPID/PodPID/ContainerPID
#   registry.k8s.io/e2e-test-images/httpd:2.4.39-4   multiple containers
#   registry.k8s.io/e2e-test-images/nonewprivs:1.3   NoNewPrivs
#   gcr.io/k8s-staging-cri-tools/hostnet-nginx-<GOARCH>:latest      host network, port-forward
#   gcr.io/k8s-staging-cri-tools/test-image-predefined-group:latest  SupplementalGroupsPolicy
# plus the defaults of build-test-image.sh (localhost/resource-slot-test:latest
# and the sandbox image registry.k8s.io/pause:3.10).
#
# Deliberately NOT imported: the images of the Image Manager, Image
# Consistency and Image Identifier Consistency specs (test-image-latest,
# test-image-tag:{test,all}, test-image-digest@sha256:9700f9a2...,
# test-image-{1,2,3}:latest, test-image-tags:{1,2,3}, test-image-user-*,
# registry.k8s.io/pause:3.9, k8s.gcr.io/pause:3.9). Those specs remove the
# image first (RemoveImage by image ID, which drops every name of that image)
# and then PullImage, which containerd always sends to the registry. Under
# the shared image ID, the removal would delete busybox, pause and the rest
# for the specs that follow, and the pull fails anyway.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CTRD_BASE="${CTRD_BASE:-/tmp/rss-containerd}"
goarch="$(go env GOARCH)"

names=(
	localhost/resource-slot-test:latest
	registry.k8s.io/pause:3.10
	registry.k8s.io/e2e-test-images/busybox:1.29-2
	registry.k8s.io/e2e-test-images/nginx:1.14-2
	registry.k8s.io/e2e-test-images/httpd:2.4.39-4
	registry.k8s.io/e2e-test-images/nonewprivs:1.3
	"gcr.io/k8s-staging-cri-tools/hostnet-nginx-$goarch:latest"
	gcr.io/k8s-staging-cri-tools/test-image-predefined-group:latest
)

case "${1:-}" in
--list)
	printf '%s\n' "${names[@]}"
	exit 0
	;;
-h | --help)
	sed -n '2,30p' "$0"
	exit 0
	;;
"") ;;
*)
	echo "usage: $0 [--list]" >&2
	exit 2
	;;
esac

if [[ "${CRITEST_IMAGES:-}" == busybox ]]; then
	BUSYBOX_IMAGE_NAMES="${names[*]}" "$script_dir/build-busybox-image.sh" --import "$CTRD_BASE/critest-busybox.oci.tar" >/dev/null
else
	TEST_IMAGE_NAMES="${names[*]}" "$script_dir/build-test-image.sh" --import "$CTRD_BASE/critest-images.oci.tar" >/dev/null
fi
