#!/usr/bin/env bash
# Build the tiny e2e test image as an OCI image-layout tar (no docker, buildah
# or skopeo: only go, tar and sha256sum), and optionally import it into the
# private containerd started by scripts/containerd-env.sh.
#
# Usage: scripts/build-test-image.sh [--import] [OUT_TAR]
#   OUT_TAR   default: $CTRD_BASE/resource-slot-test.oci.tar
#             ($CTRD_BASE defaults to /tmp/rss-containerd)
#   --import  also "ctr -n k8s.io images import" it into $CTRD_BASE's
#             containerd and check that crictl lists it.
#
# The single layer holds /bin/testimage (static Go binary from
# scripts/testimage). The same manifest is named
#   localhost/resource-slot-test:latest  and  registry.k8s.io/pause:3.10
# (the pause name = sandbox image pinned by containerd-env.sh, so nothing is
# ever pulled). Extra names: TEST_IMAGE_NAMES="name1 name2 ...".
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CTRD_BASE="${CTRD_BASE:-/tmp/rss-containerd}"
CTRD_SOCK="$CTRD_BASE/containerd.sock"
read -r -a names <<<"${TEST_IMAGE_NAMES:-localhost/resource-slot-test:latest registry.k8s.io/pause:3.10}"

do_import=false
out=""
for arg in "$@"; do
	case "$arg" in
	--import) do_import=true ;;
	-h | --help)
		sed -n '2,16p' "$0"
		exit 0
		;;
	*) out="$arg" ;;
	esac
done
out="${out:-$CTRD_BASE/resource-slot-test.oci.tar}"

log() { printf '[build-test-image] %s\n' "$*" >&2; }

work="$(mktemp -d /tmp/rss-testimage.XXXXXX)"
trap 'rm -rf "$work"' EXIT

goarch="$(go env GOARCH)"
mkdir -p "$work/rootfs/bin" "$work/rootfs/tmp" "$work/oci/blobs/sha256"
chmod 1777 "$work/rootfs/tmp"

# Static binary: the image has no libc. -trimpath/-buildid= keep it
# reproducible, so the image digest only changes when main.go does.
(cd "$script_dir/testimage" && CGO_ENABLED=0 GOFLAGS='' go build -trimpath \
	-ldflags '-s -w -buildid=' -o "$work/rootfs/bin/testimage" .)

# Deterministic layer tar: sorted, fixed owner and mtime.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='@0' \
	-C "$work/rootfs" -cf "$work/layer.tar" bin tmp

# blob FILE: move FILE into blobs/sha256/<digest>; print "<digest> <size>".
blob() {
	local f="$1" d s
	d="$(sha256sum "$f" | cut -d' ' -f1)"
	s="$(stat -c %s "$f")"
	mv "$f" "$work/oci/blobs/sha256/$d"
	printf 'sha256:%s %s\n' "$d" "$s"
}

# Uncompressed layer: its digest is also the diff_id.
read -r layer_digest layer_size < <(blob "$work/layer.tar")

printf '%s' '{"architecture":"'"$goarch"'","os":"linux","config":{"Entrypoint":["/bin/testimage"],"Env":["PATH=/bin"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["'"$layer_digest"'"]},"history":[{"created_by":"scripts/build-test-image.sh"}]}' >"$work/config.json"
read -r config_digest config_size < <(blob "$work/config.json")

printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"'"$config_digest"'","size":'"$config_size"'},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"'"$layer_digest"'","size":'"$layer_size"'}]}' >"$work/manifest.json"
read -r manifest_digest manifest_size < <(blob "$work/manifest.json")

# index.json: one manifest entry per name, annotated the way
# "ctr images export" does (full name + OCI ref name = tag) so that
# "ctr images import" of containerd 2.x names the images.
entries=""
for name in "${names[@]}"; do
	tag="${name##*:}"
	[[ "$name" == *:* && "$tag" != */* ]] || { log "image name needs a tag: $name"; exit 1; }
	entries="${entries:+$entries,}"'{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"'"$manifest_digest"'","size":'"$manifest_size"',"platform":{"architecture":"'"$goarch"'","os":"linux"},"annotations":{"io.containerd.image.name":"'"$name"'","org.opencontainers.image.ref.name":"'"$tag"'"}}'
done
printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":['"$entries"']}' >"$work/oci/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$work/oci/oci-layout"

mkdir -p "$(dirname "$out")"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='@0' \
	-C "$work/oci" -cf "$out.tmp" oci-layout index.json blobs
mv "$out.tmp" "$out"
log "wrote $out (manifest $manifest_digest, names: ${names[*]})"

if "$do_import"; then
	command -v ctr >/dev/null || { log "ctr not on PATH; run scripts/install-containerd.sh"; exit 1; }
	[[ -S "$CTRD_SOCK" ]] || { log "no containerd at $CTRD_SOCK; run scripts/containerd-env.sh start"; exit 1; }
	ctr --address "$CTRD_SOCK" -n k8s.io images import --all-platforms "$out" >&2
	# CRI sees images through its own cache of the k8s.io namespace; check
	# that every name is visible there.
	# crictl.yaml is written by containerd-env.sh; using it avoids crictl's
	# "missing /etc/crictl.yaml" warning.
	[[ -f "$CTRD_BASE/crictl.yaml" ]] && export CRI_CONFIG_FILE="$CTRD_BASE/crictl.yaml"
	# The CRI image cache is filled from containerd's image events, so it
	# may lag the import by a moment.
	for _ in $(seq 50); do
		listed="$(crictl --runtime-endpoint "unix://$CTRD_SOCK" images -o json)"
		missing=""
		for name in "${names[@]}"; do
			grep -qF "\"$name\"" <<<"$listed" || missing="$name"
		done
		[[ -z "$missing" ]] && break
		sleep 0.1
	done
	[[ -z "$missing" ]] || { log "crictl images does not list $missing"; exit 1; }
	log "imported into $CTRD_SOCK (namespace k8s.io); crictl lists: ${names[*]}"
fi
printf '%s\n' "$out"
