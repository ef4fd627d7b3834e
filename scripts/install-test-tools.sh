#!/usr/bin/env bash
# Install the tools some tests need, from Debian's apt (idempotent):
#   systemd-analyze (package systemd)  verifies the systemd units
#   tmux                               drives `slotctl resources watch` in a terminal
#   /usr/lib/cni/bridge (package containernetworking-plugins)
#                                      pod networks for critest's specs
# Without root or apt the tests that need them are skipped: this script
# then only warns.
set -euo pipefail

log() { printf '[install-test-tools] %s\n' "$*" >&2; }

declare -A want=([systemd-analyze]=systemd [tmux]=tmux)
missing=()
for cmd in "${!want[@]}"; do
	command -v "$cmd" >/dev/null 2>&1 || missing+=("${want[$cmd]}")
done
[[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
if [[ ${#missing[@]} -eq 0 ]]; then
	exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
	log "missing ${missing[*]}; install them as root with apt-get (the tests that need them are skipped)"
	exit 0
fi
log "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || log "apt-get update failed; trying the cached lists"
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
