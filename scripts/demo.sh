#!/usr/bin/env bash
# The README's first command: install containerd 2.4.2 and crictl, start a
# private containerd and the sandboxer, run a pod with resources through
# `crictl runp` and print its resource_info.json. Everything lives under
# $DEMO_BASE (/tmp/rss-demo) and stays running so that you can go on with
# crictl; `scripts/demo.sh stop` stops it.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEMO_BASE="${DEMO_BASE:-/tmp/rss-demo}"
export CTRD_BASE="$DEMO_BASE/containerd"
export SANDBOXER_SOCK="$DEMO_BASE/resource-slot-sandboxer.sock"
export SHIM_DIR="$repo/bin"
state="$DEMO_BASE/state"
sock="unix://$CTRD_BASE/containerd.sock"

log() { printf '\033[1m[demo] %s\033[0m\n' "$*" >&2; }

stop() {
	if [[ -f "$DEMO_BASE/sandboxer.pid" ]]; then
		kill "$(cat "$DEMO_BASE/sandboxer.pid")" 2>/dev/null || true
		rm -f "$DEMO_BASE/sandboxer.pid"
	fi
	pkill -f "serve --socket $DEMO_BASE/" 2>/dev/null || true
	"$repo/scripts/containerd-env.sh" stop >/dev/null 2>&1 || true
}

if [[ "${1:-}" == "stop" ]]; then
	stop
	log "stopped; $DEMO_BASE is left for inspection"
	exit 0
fi

[[ $EUID -eq 0 ]] || { echo "run as root: containerd needs it" >&2; exit 1; }
stop
mkdir -p "$DEMO_BASE/pod-logs"

log "installing containerd v2.4.2 and crictl v1.36.0 (built with go; minutes the first time)"
"$repo/scripts/install-containerd.sh"
log "building the sandboxer"
make -C "$repo" build >/dev/null

cat >"$DEMO_BASE/sandboxer.toml" <<CFG
listen = "$SANDBOXER_SOCK"
dir = "$state"
containerd_address = "$CTRD_BASE/containerd.sock.ttrpc"
CFG
log "starting resource-slot-sandboxer (slot mode) on $SANDBOXER_SOCK, state in $state"
setsid "$repo/bin/resource-slot-sandboxer" --config "$DEMO_BASE/sandboxer.toml" >"$DEMO_BASE/sandboxer.log" 2>&1 &
echo $! >"$DEMO_BASE/sandboxer.pid"
for _ in $(seq 100); do [[ -S "$SANDBOXER_SOCK" ]] && break; sleep 0.1; done

log "starting a private containerd with the runtime handler resource-slot"
"$repo/scripts/containerd-env.sh" start
export CRI_CONFIG_FILE="$CTRD_BASE/crictl.yaml"
crictl() { command crictl --runtime-endpoint "$sock" --image-endpoint "$sock" "$@"; }

log "crictl runp --runtime resource-slot scripts/demo-pod.json"
pod="$(crictl runp --runtime resource-slot "$repo/scripts/demo-pod.json")"
crictl pods --id "$pod"

log "$state/$pod/resource_info.json"
cat "$state/$pod/resource_info.json"

cat >&2 <<MSG

[demo] The pod runs in slot mode: its limits are recorded and simulated, no process runs.
[demo] Go on with:
  export CONTAINER_RUNTIME_ENDPOINT=$sock CRI_CONFIG_FILE=$CRI_CONFIG_FILE
  crictl inspectp $pod
  crictl stopp $pod && crictl rmp $pod
[demo] Stop everything with: scripts/demo.sh stop
MSG
