#!/usr/bin/env bash
# build-guest.sh OUTDIR: build the sandbox guest of the vm backend from
# Debian packages and the guest agent.
#
# Outputs (in OUTDIR):
#   vmlinuz             the Debian cloud kernel (linux-image-cloud-amd64)
#   vmlinux             the same kernel, decompressed (ELF with a PVH entry):
#                       QEMU boots it directly, skipping the real-mode setup
#                       and the in-guest decompressor (~0.4 s under TCG).
#                       The vm backend prefers it over vmlinuz.
#   initramfs.img       the guest agent as /init, Debian's runc with its
#                       libraries, busybox-static (acpid, debugging) and the
#                       virtio/virtio-fs/overlay/ACPI modules; an lz4
#                       (legacy format) cpio, which boots faster than gzip
#                       under TCG (GUEST_COMPRESS=gzip|none to change it)
#   initramfs.cpio.gz   a symlink to initramfs.img, for domains defined
#                       before the rename (the kernel detects the format)
#   base.qcow2          a 64 MiB empty qcow2 each sandbox overlays
#   guest.version       what the outputs were built from
#
# The agent (cmd/rss-guest-agent, built here with CGO_ENABLED=0 unless
# GUEST_AGENT names a binary) is PID 1: it mounts /proc, /sys, /dev, cgroup2,
# loads the modules, reaps, starts busybox acpid, serves the host on the
# virtio-serial port org.kuasar.rss.agent and writes READY to the port
# org.kuasar.rss.ready and the console. Kernel command line:
#   rss.pids=N         pids.max of the pod cgroup (/sys/fs/cgroup/pod) from
#                      boot on
#   rss.port=NAME      the port READY goes to (default org.kuasar.rss.ready)
#   rss.agent_port=NAME the agent's port (default org.kuasar.rss.agent)
#   rss.vsock_port=N   also serve on vsock port N where /dev/vsock exists
#                      (default 1024)
#   rss.debug=1        debug logs; acpid logs to the console
# An ACPI power button press (virsh shutdown) runs acpid's
# /etc/acpi/PWRF/00000080, which asks the agent to stop: SIGTERM to every
# container, SIGKILL after 5 s, sync, power off.
#
# Idempotent: when all outputs exist and were built from the same inputs
# (this script and the agent binary), it returns at once. Set FORCE=1 to
# rebuild. Needs apt-get (run `apt-get update` once on a fresh machine) and
# go (unless GUEST_AGENT is set); does not need root except for apt's cache.
set -euo pipefail

OUT=${1:?usage: build-guest.sh OUTDIR}
KPKG=${GUEST_KERNEL_PACKAGE:-linux-image-cloud-amd64}
BBPKG=busybox-static
COMPRESS=${GUEST_COMPRESS:-lz4}
SELF_SUM=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf 'build-guest: %s\n' "$*" >&2; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The agent: a static binary (the initramfs has no libc for it).
agent=${GUEST_AGENT:-}
if [[ -z $agent ]]; then
	command -v go >/dev/null || {
		log "missing go (or set GUEST_AGENT to a built rss-guest-agent)"
		exit 1
	}
	ver=$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo dev)
	(cd "$REPO" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -buildid= -X main.version=$ver" \
		-o "$work/rss-guest-agent" ./cmd/rss-guest-agent)
	agent=$work/rss-guest-agent
fi
[[ -x $agent ]] || {
	log "agent binary $agent is not executable"
	exit 1
}
AGENT_SUM=$(sha256sum "$agent" | cut -c1-16)

if [[ -z ${FORCE:-} && -s $OUT/vmlinuz && -s $OUT/initramfs.img && -s $OUT/base.qcow2 &&
	-s $OUT/guest.version ]] && grep -qx "script=$SELF_SUM" "$OUT/guest.version" &&
	grep -qx "agent=$AGENT_SUM" "$OUT/guest.version" && grep -qx "compress=$COMPRESS" "$OUT/guest.version"; then
	log "up to date: $OUT"
	exit 0
fi

if ! command -v lz4 >/dev/null && [[ $(id -u) -eq 0 ]]; then
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends lz4 xz-utils zstd >/dev/null
fi
for t in apt-get apt-cache dpkg-deb qemu-img gzip ldd; do
	command -v "$t" >/dev/null || {
		log "missing $t (qemu-img: run scripts/setup-libvirt.sh)"
		exit 1
	}
done

# Resolve the meta package (linux-image-cloud-amd64) to the versioned image.
kimg=$KPKG
if [[ $KPKG != linux-image-[0-9]* ]]; then
	resolve_kernel() { apt-cache depends "$KPKG" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
	kimg=$(resolve_kernel)
	if [[ -z $kimg && $(id -u) -eq 0 ]]; then
		apt-get update >/dev/null
		kimg=$(resolve_kernel)
	fi
	if [[ -z $kimg ]]; then
		log "cannot resolve $KPKG (run apt-get update?)"
		exit 1
	fi
fi
log "kernel package: $kimg"
# runc with the libraries it links (libseccomp2, libc6): taken from their
# packages, not from the host.
RTPKGS=(runc libseccomp2 libc6)
(cd "$work" && apt-get download "$kimg" "$BBPKG" "${RTPKGS[@]}" >/dev/null 2>&1) || {
	apt-get update >/dev/null
	(cd "$work" && apt-get download "$kimg" "$BBPKG" "${RTPKGS[@]}" >/dev/null)
}
dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/bb"
for p in "${RTPKGS[@]}"; do
	dpkg-deb -x "$work/${p}"_*.deb "$work/rt"
done
kver=$(ls "$work/k/lib/modules")
moddir=$work/k/lib/modules/$kver
bb=$work/bb/bin/busybox

# --- modules ---------------------------------------------------------------
# The Debian kernels build virtio and the ACPI button as modules. Resolve
# their dependencies from the .ko's own modinfo ("depends=") and list them
# in load order (dependencies first).
declare -A kopath=() seen=()
while IFS= read -r f; do
	n=$(basename "$f")
	n=${n%.ko*}
	kopath[${n//-/_}]=$f
done < <(find "$moddir/kernel" -name '*.ko*')

modinfo_depends() { # file -> comma separated deps
	local f=$1
	case $f in
	*.ko.xz) xz -dc "$f" ;;
	*.ko.zst) zstd -dc "$f" ;;
	*) cat "$f" ;;
	esac | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1
}
# Debian signs its modules; checking the signatures at insmod costs ~0.2 s
# under TCG. The guest has no Secure Boot lockdown, so unsigned modules load
# (tainting the kernel, which is harmless here). Layout of the tail:
# <signature><struct module_signature: 8 bytes, be32 sig_len><magic>.
strip_signature() {
	local f=$1 magic='~Module signature appended~'
	local size siglen
	size=$(stat -c %s "$f")
	[[ $(tail -c 28 "$f" | head -c 27) == "$magic" ]] || return 0
	siglen=$(tail -c 32 "$f" | head -c 4 | od -An -tu1 | awk '{print $1*16777216 + $2*65536 + $3*256 + $4}')
	truncate -s $((size - 28 - 12 - siglen)) "$f"
}
order=()
resolve() {
	local m=${1//-/_}
	[[ -n ${seen[$m]:-} ]] && return 0
	seen[$m]=1
	if grep -Eq "/${m//_/[-_]}\.ko" "$moddir/modules.builtin" 2>/dev/null; then
		return 0 # built in
	fi
	local f=${kopath[$m]:-}
	if [[ -z $f ]]; then
		log "module $m not found in $kimg"
		exit 1
	fi
	local d
	IFS=, read -ra deps <<<"$(modinfo_depends "$f")"
	for d in "${deps[@]}"; do
		[[ -n $d ]] && resolve "$d"
	done
	order+=("$m")
}
# Two lists: what the agent needs before READY (its virtio-serial port),
# loaded at boot (lib/modules/load.order), and the rest, loaded right
# after READY (lib/modules/load.later): the disk, net and balloon drivers,
# virtiofs (and fuse) for the shared directory, overlay for container
# filesystems made in the guest, the vsock transport for hosts with
# vhost-vsock, button and evdev for acpid.
for m in virtio_pci virtio_console; do
	resolve "$m"
done
nboot=${#order[@]}
for m in virtio_blk virtio_net virtio_balloon virtiofs fuse overlay vmw_vsock_virtio_transport button evdev; do
	resolve "$m"
done
log "modules: ${order[*]:0:nboot} (boot); ${order[*]:nboot} (after READY)"

# --- initramfs tree --------------------------------------------------------
root=$work/root
mkdir -p "$root"/{bin,sbin,usr/sbin,dev,proc,sys,run,tmp,etc/acpi/PWRF,lib/modules,lib64,sys/fs/cgroup}
cp "$bb" "$root/bin/busybox"
for a in $("$bb" --list); do
	[[ $a == busybox ]] && continue
	ln -sf busybox "$root/bin/$a"
done
install -m 0755 "$agent" "$root/sbin/rss-guest-agent"
ln -s sbin/rss-guest-agent "$root/init"
echo "root:x:0:0:root:/:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"

# runc and what it links, found by ldd against the packages' libraries;
# the loader goes where runc's PT_INTERP names it.
install -m 0755 "$work/rt/usr/sbin/runc" "$root/usr/sbin/runc"
libpath=$work/rt/lib/x86_64-linux-gnu:$work/rt/usr/lib/x86_64-linux-gnu
while read -r name arrow path _; do
	if [[ $arrow != "=>" ]]; then
		path=$name # the loader: "/lib64/ld-linux-x86-64.so.2 (0x...)"
		name=$(basename "$path")
	fi
	[[ $path == /* ]] || continue
	case $name in
	linux-vdso.so.*) continue ;;
	ld-linux*)
		src=$work/rt/lib/x86_64-linux-gnu/$name
		[[ -e $src ]] || src=$path
		cp -L "$src" "$root/lib64/$name"
		;;
	*)
		mkdir -p "$root/lib/x86_64-linux-gnu"
		cp -L "$path" "$root/lib/x86_64-linux-gnu/$name"
		;;
	esac
done < <(LD_LIBRARY_PATH=$libpath ldd "$root/usr/sbin/runc" | grep -v 'not a dynamic')
if LD_LIBRARY_PATH=$libpath ldd "$root/usr/sbin/runc" | grep -q 'not found'; then
	log "runc needs libraries that are not found:"
	LD_LIBRARY_PATH=$libpath ldd "$root/usr/sbin/runc" >&2
	exit 1
fi
ls "$root/lib/x86_64-linux-gnu" "$root/lib64" >/dev/null
: >"$root/lib/modules/load.order"
: >"$root/lib/modules/load.later"
i=0
for m in "${order[@]}"; do
	f=${kopath[$m]}
	case $f in
	*.ko.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
	*.ko.zst) zstd -dc "$f" >"$root/lib/modules/$m.ko" ;;
	*) cp "$f" "$root/lib/modules/$m.ko" ;;
	esac
	strip_signature "$root/lib/modules/$m.ko"
	if ((i < nboot)); then
		echo "$m" >>"$root/lib/modules/load.order"
	else
		echo "$m" >>"$root/lib/modules/load.later"
	fi
	i=$((i + 1))
done

# busybox acpid maps the power button (KEY_POWER via evdev) to the action
# PWRF/00000080 and runs /etc/acpi/PWRF/00000080 (its built-in tables:
# there must be no /etc/acpid.conf or /etc/acpi.map). The agent (PID 1)
# takes SIGUSR2 as busybox init does: stop the containers, power off.
cat >"$root/etc/acpi/PWRF/00000080" <<'ACPI'
#!/bin/sh
echo "rss: acpi power button: stopping the containers and powering off" >/dev/console
kill -USR2 1
ACPI
chmod +x "$root/etc/acpi/PWRF/00000080"


# --- outputs ---------------------------------------------------------------
# The archive's owner is root whoever builds it (busybox cpio keeps the
# builder's uid otherwise, and the agent must run runc as root-owned files).
cpio_tree() { (cd "$root" && find . | LC_ALL=C sort | "$bb" cpio -o -H newc -R 0:0 2>/dev/null); }
case $COMPRESS in
lz4) cpio_tree | lz4 -l -9 -q >"$work/initramfs.img" ;; # the kernel reads lz4's legacy format
gzip) cpio_tree | gzip -9 >"$work/initramfs.img" ;;
none) cpio_tree >"$work/initramfs.img" ;;
*)
	log "GUEST_COMPRESS=$COMPRESS: lz4, gzip or none"
	exit 1
	;;
esac
cp "$work/k/boot/vmlinuz-$kver" "$work/vmlinuz"
# vmlinux: find the compressed payload in the bzImage by its magic and
# decompress it (what the kernel's scripts/extract-vmlinux does).
extract_vmlinux() { # bzImage out
	local img=$1 out=$2 magic tool off
	for pair in '02214c18:lz4 -dc' 'fd377a585a00:xz -dc' '28b52ffd:zstd -dc' '1f8b0800:gzip -dc'; do
		magic=${pair%%:*} tool=${pair#*:}
		command -v "${tool%% *}" >/dev/null || continue
		off=$(od -An -v -tx1 -w1 "$img" | tr -d ' \n' | grep -bo "$magic" | awk -F: '$1 % 2 == 0 { print $1; exit }') || true
		[[ -n $off ]] || continue
		tail -c +$((off / 2 + 1)) "$img" | $tool >"$out" 2>/dev/null || true
		if [[ $(head -c 4 "$out" | od -An -tx1 | tr -d ' ') == 7f454c46 ]]; then
			return 0
		fi
	done
	rm -f "$out"
	return 1
}
if extract_vmlinux "$work/vmlinuz" "$work/vmlinux"; then
	mv "$work/vmlinux" "$OUT/vmlinux"
else
	log "warning: could not decompress the kernel (install lz4); vmlinux not built, vmlinuz will be used"
	rm -f "$OUT/vmlinux"
fi
if [[ ! -s $OUT/base.qcow2 ]]; then
	qemu-img create -q -f qcow2 "$work/base.qcow2" 64M
	mv "$work/base.qcow2" "$OUT/base.qcow2"
fi
mv "$work/vmlinuz" "$OUT/vmlinuz"
mv "$work/initramfs.img" "$OUT/initramfs.img"
ln -sfn initramfs.img "$OUT/initramfs.cpio.gz"
{
	echo "kernel=$kimg"
	echo "kver=$kver"
	echo "busybox=$(dpkg-deb -f "$work"/busybox-static_*.deb Version)"
	echo "runc=$(dpkg-deb -f "$work"/runc_*.deb Version)"
	echo "modules=${order[*]}"
	echo "compress=$COMPRESS"
	echo "agent=$AGENT_SUM"
	echo "script=$SELF_SUM"
} >"$OUT/guest.version.tmp"
mv "$OUT/guest.version.tmp" "$OUT/guest.version"
log "built $OUT ($(du -sh "$OUT/initramfs.img" | cut -f1) initramfs, $COMPRESS, kernel $kver)"
