#!/usr/bin/env bash
# Install the tools some tests need, from Debian's apt (idempotent):
#   systemd-analyze (package systemd)  verifies the systemd units
#   tmux                               drives `slotctl resources watch` in a terminal
#   /usr/lib/cni/bridge (package containernetworking-plugins)
#                                      pod networks for critest's specs
#   flock (package util-linux)         the state directory lock's test
# It fails when one of them is missing and cannot be installed (no root,
# no apt-get, or apt-get fails): with RSS_E2E=1 (make test, CI) the tests
# that need them fail rather than skip, so a machine that cannot run
# them is found here, first.
set -euo pipefail

log() { printf '[install-test-tools] %s\n' "$*" >&2; }

declare -A want=([systemd-analyze]=systemd [tmux]=tmux [flock]=util-linux)
cni=/usr/lib/cni/bridge

missing() {
	local m=()
	for cmd in "${!want[@]}"; do
		command -v "$cmd" >/dev/null 2>&1 || m+=("${want[$cmd]}")
	done
	[[ -x $cni ]] || m+=(containernetworking-plugins)
	[[ ${#m[@]} -eq 0 ]] || printf '%s\n' "${m[@]}"
}

mapfile -t pkgs < <(missing)
if [[ ${#pkgs[@]} -eq 0 ]]; then
	exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
	log "missing ${pkgs[*]}: run this script as root (apt-get install -y --no-install-recommends ${pkgs[*]})"
	exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
	log "missing ${pkgs[*]} and there is no apt-get to install them with"
	exit 1
fi
log "installing ${pkgs[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || log "apt-get update failed; trying the cached lists"
if ! apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; then
	log "apt-get install ${pkgs[*]} failed"
	exit 1
fi
mapfile -t left < <(missing)
if [[ ${#left[@]} -ne 0 ]]; then
	log "still missing after apt-get install: ${left[*]}"
	exit 1
fi
