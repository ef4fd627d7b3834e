#!/usr/bin/env bash
# build-guest.sh OUTDIR: build the sandbox guest of the vm backend from
# Debian packages only.
#
# Outputs (in OUTDIR):
#   vmlinuz             the Debian cloud kernel (linux-image-cloud-amd64)
#   vmlinux             the same kernel, decompressed (ELF with a PVH entry):
#                       QEMU boots it directly, skipping the real-mode setup
#                       and the in-guest decompressor (~0.4 s under TCG).
#                       The vm backend prefers it over vmlinuz.
#   initramfs.cpio.gz   busybox-static + virtio/ACPI modules + /init
#   base.qcow2          a 64 MiB empty qcow2 each sandbox overlays
#   guest.version       what the outputs were built from
#
# The guest's /init (see the heredoc below) reads from the kernel command
# line:
#   rss.pids=N     pids.max of the cgroup v2 "sandbox" group every process
#                  init starts is put in (init itself stays in the root).
#   rss.burn=N     start N busy loops (tests: CPU quota enforcement).
#   rss.forktest=1 once ready, fork sleepers in the sandbox group until the
#                  kernel refuses, print "rss: forktest forked=N
#                  pids.max=M refused=yes|no" and kill them (tests: the pid
#                  limit is enforced, not just configured).
#   rss.port=NAME  virtio-serial port name to announce readiness on
#                  (default org.kuasar.rss.ready).
#   rss.debug=1    acpid logs to the console.
# When ready it writes "READY" to that port and to the serial console. An
# ACPI power button press (virsh shutdown) powers the guest off via busybox
# acpid, so the host's graceful stop works.
#
# Idempotent: when all outputs exist and were built from the same inputs,
# it returns at once. Set FORCE=1 to rebuild. Needs apt-get (run
# `apt-get update` once on a fresh machine); does not need root except for
# apt's cache.
set -euo pipefail

OUT=${1:?usage: build-guest.sh OUTDIR}
KPKG=${GUEST_KERNEL_PACKAGE:-linux-image-cloud-amd64}
BBPKG=busybox-static
SELF_SUM=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)

log() { printf 'build-guest: %s\n' "$*" >&2; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [[ -z ${FORCE:-} && -s $OUT/vmlinuz && -s $OUT/initramfs.cpio.gz && -s $OUT/base.qcow2 &&
	-s $OUT/guest.version ]] && grep -qx "script=$SELF_SUM" "$OUT/guest.version"; then
	log "up to date: $OUT"
	exit 0
fi

if ! command -v lz4 >/dev/null && [[ $(id -u) -eq 0 ]]; then
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends lz4 xz-utils zstd >/dev/null
fi
for t in apt-get apt-cache dpkg-deb qemu-img gzip; do
	command -v "$t" >/dev/null || {
		log "missing $t (qemu-img: run scripts/setup-libvirt.sh)"
		exit 1
	}
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

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
(cd "$work" && apt-get download "$kimg" "$BBPKG" >/dev/null 2>&1) || {
	apt-get update >/dev/null
	(cd "$work" && apt-get download "$kimg" "$BBPKG" >/dev/null)
}
dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/bb"
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
for m in virtio_pci virtio_console virtio_blk virtio_net virtio_balloon button evdev; do
	resolve "$m"
done
log "modules: ${order[*]}"

# --- initramfs tree --------------------------------------------------------
root=$work/root
mkdir -p "$root"/{bin,sbin,dev,proc,sys,run,tmp,etc/acpi/PWRF,lib/modules,sys/fs/cgroup}
cp "$bb" "$root/bin/busybox"
for a in $("$bb" --list); do
	[[ $a == busybox ]] && continue
	ln -sf busybox "$root/bin/$a"
done
: >"$root/lib/modules/load.order"
for m in "${order[@]}"; do
	f=${kopath[$m]}
	case $f in
	*.ko.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
	*.ko.zst) zstd -dc "$f" >"$root/lib/modules/$m.ko" ;;
	*) cp "$f" "$root/lib/modules/$m.ko" ;;
	esac
	strip_signature "$root/lib/modules/$m.ko"
	echo "$m" >>"$root/lib/modules/load.order"
done

# busybox acpid maps the power button (KEY_POWER via evdev) to the action
# PWRF/00000080 and runs /etc/acpi/PWRF/00000080 (its built-in tables:
# there must be no /etc/acpid.conf or /etc/acpi.map).
cat >"$root/etc/acpi/PWRF/00000080" <<'ACPI'
#!/bin/sh
echo "rss: acpi power button: powering off" >/dev/console
sync
poweroff -f
ACPI
chmod +x "$root/etc/acpi/PWRF/00000080"

cat >"$root/init" <<'INIT'
#!/bin/sh
# Sandbox guest init (PID 1). See scripts/build-guest.sh.
export PATH=/bin:/sbin
mount -t devtmpfs -o nosuid devtmpfs /dev
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t tmpfs -o nosuid,nodev tmpfs /run
exec </dev/console >/dev/console 2>&1

pids="" burn=0 port=org.kuasar.rss.ready debug=0 forktest=0
for arg in $(cat /proc/cmdline); do
	case $arg in
	rss.pids=*) pids=${arg#rss.pids=} ;;
	rss.burn=*) burn=${arg#rss.burn=} ;;
	rss.forktest=*) forktest=${arg#rss.forktest=} ;;
	rss.port=*) port=${arg#rss.port=} ;;
	rss.debug=*) debug=${arg#rss.debug=} ;;
	esac
done

while read -r m; do
	insmod /lib/modules/$m.ko 2>/dev/null
done </lib/modules/load.order

# cgroup v2; a pids limit applies to everything init starts.
cg=/sys/fs/cgroup
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 $cg
echo +pids >$cg/cgroup.subtree_control 2>/dev/null
mkdir -p $cg/sandbox
if [ -n "$pids" ]; then
	echo "$pids" >$cg/sandbox/pids.max
fi
# spawn CMD...: run CMD in the background inside the sandbox cgroup.
spawn() {
	sh -c 'echo $$ >/sys/fs/cgroup/sandbox/cgroup.procs; exec "$@"' spawn "$@" &
}

# Graceful stop: ACPI power button -> acpid -> /etc/acpi/PWRF/00000080.
if [ "$debug" = 1 ]; then
	spawn acpid -d -c /etc/acpi -p /run/acpid.pid
else
	spawn acpid -f -c /etc/acpi -p /run/acpid.pid -l /run/acpid.log
fi

i=0
while [ "$i" -lt "$burn" ]; do
	spawn sh -c 'while :; do :; done'
	i=$((i + 1))
done

# Find the readiness port: /sys/class/virtio-ports/vport*/name == $port.
dev=""
for n in 1 2 3 4 5 6 7 8 9 10; do
	for p in /sys/class/virtio-ports/*; do
		[ -r "$p/name" ] || continue
		if [ "$(cat "$p/name")" = "$port" ]; then
			dev=/dev/${p##*/}
			break 2
		fi
	done
	sleep 0.1
done
echo "rss: pids.max=$(cat $cg/sandbox/pids.max) burn=$burn port=${dev:-none} uptime=$(cut -d" " -f1 /proc/uptime)"
msg="READY"
if [ -n "$dev" ]; then
	echo "$msg" >"$dev"
fi
echo "$msg"

# The fork test: a shell in the sandbox group starts sleepers until a fork
# fails (ash then exits with an error) or 4096 run; the count it reached is
# in /run/forktest.
if [ "$forktest" = 1 ]; then
	spawn sh -c 'n=0; while [ $n -lt 4096 ]; do sleep 1000 & n=$((n + 1)); echo $n >/run/forktest; done; echo no >/run/forktest.end'
	t=0
	while [ "$t" -lt 60 ]; do
		sleep 1
		t=$((t + 1))
		# Done when the forking shell is gone: only sleepers, acpid and
		# the burners are left in the group.
		pgrep -f 'n=0; while' >/dev/null || break
	done
	refused=yes
	[ -e /run/forktest.end ] && refused=no
	echo "rss: forktest forked=$(cat /run/forktest 2>/dev/null || echo 0) pids.max=$(cat $cg/sandbox/pids.max) refused=$refused"
	killall sleep 2>/dev/null
fi

# Idle; the shell reaps orphans between sleeps. vCPUs the host hot-plugs
# (virsh setvcpus --live) arrive offline without udev: bring them online.
while :; do
	for c in /sys/devices/system/cpu/cpu*/online; do
		[ "$(cat "$c")" = 1 ] || echo 1 >"$c"
	done 2>/dev/null
	sleep 2
done
INIT
chmod +x "$root/init"

# --- outputs ---------------------------------------------------------------
(cd "$root" && find . | LC_ALL=C sort | "$bb" cpio -o -H newc 2>/dev/null) | gzip -9 >"$work/initramfs.cpio.gz"
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
mv "$work/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz"
{
	echo "kernel=$kimg"
	echo "kver=$kver"
	echo "busybox=$(dpkg-deb -f "$work"/busybox-static_*.deb Version)"
	echo "modules=${order[*]}"
	echo "script=$SELF_SUM"
} >"$OUT/guest.version.tmp"
mv "$OUT/guest.version.tmp" "$OUT/guest.version"
log "built $OUT ($(du -sh "$OUT/initramfs.cpio.gz" | cut -f1) initramfs, kernel $kver)"
