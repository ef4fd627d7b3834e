#!/usr/bin/env bash
# Build a busybox image for the vm-mode tests from Debian's busybox-static:
# /bin/busybox with every applet as a symlink, /bin/sh, /tmp, /etc/passwd.
# As an OCI image-layout tar (no docker, buildah or skopeo: only apt-get,
# dpkg-deb, tar and sha256sum) importable with
# `ctr -n k8s.io images import`, and/or as a plain rootfs directory.
#
# Usage: scripts/build-busybox-image.sh [--rootfs DIR] [--import] [OUT_TAR]
#   OUT_TAR        default: $CTRD_BASE/rss-busybox.oci.tar
#                  ($CTRD_BASE defaults to /tmp/rss-containerd)
#   --rootfs DIR   also (or, with --no-tar, only) write the root
#                  filesystem to DIR (created; must be empty or absent)
#   --no-tar       do not write the image tar
#   --import       "ctr -n k8s.io images import" the tar into $CTRD_BASE's
#                  containerd (see scripts/build-test-image.sh)
# The image is named localhost/rss-busybox:latest (BUSYBOX_IMAGE_NAMES to
# change), its command is /bin/sh. Reproducible: the same busybox package
# gives the same digest.
set -euo pipefail

CTRD_BASE="${CTRD_BASE:-/tmp/rss-containerd}"
CTRD_SOCK="$CTRD_BASE/containerd.sock"
read -r -a names <<<"${BUSYBOX_IMAGE_NAMES:-localhost/rss-busybox:latest}"

do_import=false
do_tar=true
rootfs_out=""
out=""
while [[ $# -gt 0 ]]; do
	case "$1" in
	--import) do_import=true ;;
	--no-tar) do_tar=false ;;
	--rootfs)
		rootfs_out=${2:?--rootfs needs a directory}
		shift
		;;
	-h | --help)
		sed -n '2,20p' "$0"
		exit 0
		;;
	*) out="$1" ;;
	esac
	shift
done
out="${out:-$CTRD_BASE/rss-busybox.oci.tar}"

log() { printf '[build-busybox-image] %s\n' "$*" >&2; }

work="$(mktemp -d /tmp/rss-busybox.XXXXXX)"
trap 'rm -rf "$work"' EXIT

(cd "$work" && apt-get download busybox-static >/dev/null 2>&1) || {
	[[ $(id -u) -eq 0 ]] && apt-get update >/dev/null
	(cd "$work" && apt-get download busybox-static >/dev/null)
}
dpkg-deb -x "$work"/busybox-static_*.deb "$work/deb"
bbver=$(dpkg-deb -f "$work"/busybox-static_*.deb Version)

r=$work/rootfs
mkdir -p "$r"/{bin,dev,proc,sys,tmp,etc,root,var/tmp}
chmod 1777 "$r/tmp" "$r/var/tmp"
cp "$work/deb/bin/busybox" "$r/bin/busybox"
for a in $("$r/bin/busybox" --list); do
	[[ $a == busybox ]] && continue
	ln -sf busybox "$r/bin/$a"
done
ln -s bin "$r/sbin"
mkdir -p "$r/usr"
ln -s ../bin "$r/usr/bin"
ln -s ../bin "$r/usr/sbin"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$r/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$r/etc/group"
: >"$r/etc/hosts"
: >"$r/etc/resolv.conf"
: >"$r/etc/hostname"

if [[ -n $rootfs_out ]]; then
	if [[ -e $rootfs_out ]] && [[ -n $(ls -A "$rootfs_out") ]]; then
		log "$rootfs_out is not empty"
		exit 1
	fi
	mkdir -p "$rootfs_out"
	cp -a "$r/." "$rootfs_out/"
	log "wrote rootfs $rootfs_out (busybox $bbver)"
fi
"$do_tar" || exit 0

goarch=amd64
mkdir -p "$work/oci/blobs/sha256"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='@0' -C "$r" -cf "$work/layer.tar" .

blob() {
	local f="$1" d s
	d="$(sha256sum "$f" | cut -d' ' -f1)"
	s="$(stat -c %s "$f")"
	mv "$f" "$work/oci/blobs/sha256/$d"
	printf 'sha256:%s %s\n' "$d" "$s"
}
read -r layer_digest layer_size < <(blob "$work/layer.tar")
printf '%s' '{"architecture":"'"$goarch"'","os":"linux","config":{"Cmd":["/bin/sh"],"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["'"$layer_digest"'"]},"history":[{"created_by":"scripts/build-busybox-image.sh (busybox-static '"$bbver"')"}]}' >"$work/config.json"
read -r config_digest config_size < <(blob "$work/config.json")
printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"'"$config_digest"'","size":'"$config_size"'},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"'"$layer_digest"'","size":'"$layer_size"'}]}' >"$work/manifest.json"
read -r manifest_digest manifest_size < <(blob "$work/manifest.json")

entries=""
for name in "${names[@]}"; do
	tag="${name##*:}"
	[[ "$name" == *:* && "$tag" != */* ]] || {
		log "image name needs a tag: $name"
		exit 1
	}
	entries="${entries:+$entries,}"'{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"'"$manifest_digest"'","size":'"$manifest_size"',"platform":{"architecture":"'"$goarch"'","os":"linux"},"annotations":{"io.containerd.image.name":"'"$name"'","org.opencontainers.image.ref.name":"'"$tag"'"}}'
done
printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":['"$entries"']}' >"$work/oci/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$work/oci/oci-layout"

mkdir -p "$(dirname "$out")"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='@0' \
	-C "$work/oci" -cf "$out.tmp" oci-layout index.json blobs
mv "$out.tmp" "$out"
log "wrote $out (manifest $manifest_digest, busybox $bbver, names: ${names[*]})"

if "$do_import"; then
	command -v ctr >/dev/null || {
		log "ctr not on PATH; run scripts/install-containerd.sh"
		exit 1
	}
	[[ -S "$CTRD_SOCK" ]] || {
		log "no containerd at $CTRD_SOCK; run scripts/containerd-env.sh start"
		exit 1
	}
	ctr --address "$CTRD_SOCK" -n k8s.io images import --all-platforms "$out" >&2
	[[ -f "$CTRD_BASE/crictl.yaml" ]] && export CRI_CONFIG_FILE="$CTRD_BASE/crictl.yaml"
	for _ in $(seq 50); do
		listed="$(crictl --runtime-endpoint "unix://$CTRD_SOCK" images -o json)"
		missing=""
		for name in "${names[@]}"; do
			grep -qF "\"$name\"" <<<"$listed" || missing="$name"
		done
		[[ -z "$missing" ]] && break
		sleep 0.1
	done
	[[ -z "$missing" ]] || {
		log "crictl images does not list $missing"
		exit 1
	}
	log "imported into $CTRD_SOCK (namespace k8s.io): ${names[*]}"
fi
printf '%s\n' "$out"
