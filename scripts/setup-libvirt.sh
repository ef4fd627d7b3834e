#!/usr/bin/env bash
# setup-libvirt.sh: install and start libvirt + QEMU for the vm backend.
#
# Idempotent: re-running only starts what is not running. Works without
# systemd (containers, CI sandboxes): virtlogd and libvirtd are started as
# daemons by hand. Needs root.
#
#   scripts/setup-libvirt.sh
#
# Env: LIBVIRT_URI (default qemu:///system), SETUP_TIMEOUT seconds (default 60).
set -euo pipefail

URI=${LIBVIRT_URI:-qemu:///system}
TIMEOUT=${SETUP_TIMEOUT:-60}

log() { printf 'setup-libvirt: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
	log "must run as root"
	exit 1
fi

pkgs=(libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils iproute2 procps lz4)
missing=()
for p in "${pkgs[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$p")
	fi
done
if ((${#missing[@]})); then
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	# Without systemd the packages' postinst cannot start services; that is
	# fine, this script starts them. policy-rc.d keeps invoke-rc.d quiet.
	created_policy=
	if [[ ! -e /usr/sbin/policy-rc.d ]]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod +x /usr/sbin/policy-rc.d
		created_policy=1
	fi
	if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
		apt-get update
		apt-get install -y --no-install-recommends "${missing[@]}"
	fi
	[[ -n $created_policy ]] && rm -f /usr/sbin/policy-rc.d
fi

# Run QEMU as root: the sandboxer (root) owns the sandbox directories that
# hold the kernel, the overlay disks and the console logs, and there is no
# dynamic_ownership dance to do across sandboxes.
conf=/etc/libvirt/qemu.conf
set_conf() { # key value
	local key=$1 val=$2
	if grep -Eq "^[[:space:]]*${key}[[:space:]]*=[[:space:]]*${val//\"/\\\"}[[:space:]]*$" "$conf"; then
		return 1
	fi
	sed -i -E "/^[[:space:]]*#?[[:space:]]*${key}[[:space:]]*=/d" "$conf"
	printf '%s = %s\n' "$key" "$val" >>"$conf"
	return 0
}
changed=0
set_conf user '"root"' && changed=1
set_conf group '"root"' && changed=1

running() { pgrep -x "$1" >/dev/null 2>&1; }

if ! running virtlogd; then
	log "starting virtlogd"
	virtlogd -d
fi
if running libvirtd && ((changed)); then
	log "qemu.conf changed: restarting libvirtd"
	pkill -x libvirtd || true
	for _ in $(seq 50); do running libvirtd || break; sleep 0.1; done
fi
if ! running libvirtd; then
	log "starting libvirtd"
	libvirtd -d
fi

deadline=$((SECONDS + TIMEOUT))
until virsh -c "$URI" version >/dev/null 2>&1; do
	if ((SECONDS >= deadline)); then
		log "libvirtd did not answer on $URI within ${TIMEOUT}s"
		virsh -c "$URI" version || true
		exit 1
	fi
	sleep 0.2
done
virsh -c "$URI" version >&2
if virsh -c "$URI" domcapabilities --virttype kvm >/dev/null 2>&1; then
	log "KVM acceleration: available"
else
	log "KVM acceleration: not available, domains will use TCG (type='qemu')"
fi
log "ready: $URI"
