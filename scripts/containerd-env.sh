#!/usr/bin/env bash
# Run a private containerd (v2.4.2) for e2e tests and the demo, wired to the
# resource-slot sandboxer through a sandbox proxy plugin. Every path it owns
# lives under $CTRD_BASE so it never touches a system containerd.
#
# Execute:  scripts/containerd-env.sh start|stop|restart|status|config|env|clean
# Source:   . scripts/containerd-env.sh   (exports CTRD_* / crictl / ctr env
#           vars and defines ctrd_start, ctrd_stop, ctrd_config, ...)
#
# Environment (all optional):
#   CTRD_BASE          base dir                    (/tmp/rss-containerd)
#   SANDBOXER_SOCK     resource-slot sandboxer     (/run/resource-slot-sandboxer.sock)
#   SANDBOXER_VM_SOCK  if set: adds the resource-vm runtime + proxy plugin
#   CTRD_EXTRA_SANDBOXERS  "name=socket ...": more sandboxer runtimes (the
#                      benchmarks' no-op baseline), runtime_type
#                      io.containerd.resource-slot.v1
#   RESOURCE_VM_RUNTIME_TYPE  runtime_type of resource-vm (io.containerd.resource-slot.v1:
#                      the same task shim binary serves both modes)
#   SHIM_DIR           prepended to containerd's PATH (for
#                      containerd-shim-resource-slot-v1)
#   CONTAINERD_BIN     containerd binary (containerd on PATH, else /usr/local/bin)
#   CTRD_LOG_LEVEL     containerd log level        (info)
#   CTRD_SNAPSHOTTER   CRI snapshotter             (overlayfs)
#   CTRD_SANDBOX_IMAGE pinned CRI sandbox image    (registry.k8s.io/pause:3.10)
#   CTRD_DEFAULT_RUNTIME  CRI default runtime      (runc; resource-slot for a
#                      kubelet without API server, which cannot resolve
#                      RuntimeClasses: its pods name no runtime handler)
#   CTRD_START_TIMEOUT seconds to wait for the socket (30)
#   CTRD_STOP_TIMEOUT  seconds between TERM and KILL (10)
#   CTRD_CNI_BIN_DIR   if set: CNI plugin dir (Debian's containernetworking-
#                      plugins: /usr/lib/cni) and a bridge network for pods
#                      without host networking (ctrd_cni_conf). Unset: no CNI
#   CTRD_CNI_SUBNET    that network's subnet (a 10.x /24 derived from CTRD_BASE)

# Strict mode only when executed; when sourced, the caller's options stand.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
	set -euo pipefail
fi

# Absolute paths: containerd resolves them from its own cwd.
CTRD_BASE="$(realpath -m "${CTRD_BASE:-/tmp/rss-containerd}")"
SANDBOXER_SOCK="${SANDBOXER_SOCK:-/run/resource-slot-sandboxer.sock}"
SANDBOXER_VM_SOCK="${SANDBOXER_VM_SOCK:-}"
CTRD_EXTRA_SANDBOXERS="${CTRD_EXTRA_SANDBOXERS:-}"
RESOURCE_VM_RUNTIME_TYPE="${RESOURCE_VM_RUNTIME_TYPE:-io.containerd.resource-slot.v1}"
SHIM_DIR="${SHIM_DIR:+$(realpath -m "$SHIM_DIR")}"
CTRD_LOG_LEVEL="${CTRD_LOG_LEVEL:-info}"
CTRD_SNAPSHOTTER="${CTRD_SNAPSHOTTER:-overlayfs}"
CTRD_SANDBOX_IMAGE="${CTRD_SANDBOX_IMAGE:-registry.k8s.io/pause:3.10}"
CTRD_DEFAULT_RUNTIME="${CTRD_DEFAULT_RUNTIME:-runc}"
CTRD_START_TIMEOUT="${CTRD_START_TIMEOUT:-30}"
CTRD_STOP_TIMEOUT="${CTRD_STOP_TIMEOUT:-10}"
CTRD_CNI_BIN_DIR="${CTRD_CNI_BIN_DIR:+$(realpath -m "$CTRD_CNI_BIN_DIR")}"
CTRD_CNI_CONF="$CTRD_BASE/cni/net.d/10-resource-slot.conflist"

CTRD_SOCK="$CTRD_BASE/containerd.sock"
CTRD_CONFIG="$CTRD_BASE/config.toml"
CTRD_LOG="$CTRD_BASE/containerd.log"
CTRD_PID_FILE="$CTRD_BASE/containerd.pid"
CRI_CONFIG_FILE="$CTRD_BASE/crictl.yaml"

# Client-side defaults: crictl and ctr read these, so tests can call them bare.
export CTRD_BASE CTRD_SOCK CTRD_CONFIG CTRD_LOG CTRD_PID_FILE SANDBOXER_SOCK
# crictl otherwise warns about a missing /etc/crictl.yaml on every call.
export CRI_CONFIG_FILE
export CONTAINER_RUNTIME_ENDPOINT="unix://$CTRD_SOCK"
export IMAGE_SERVICE_ENDPOINT="unix://$CTRD_SOCK"
export CONTAINERD_ADDRESS="$CTRD_SOCK"
export CONTAINERD_NAMESPACE="${CONTAINERD_NAMESPACE:-k8s.io}"

# The functions run in subshells with strict mode so that sourcing this file
# does not change the caller's shell options.

_ctrd_log() { printf '[containerd-env] %s\n' "$*" >&2; }

_ctrd_bin() {
	if [[ -n "${CONTAINERD_BIN:-}" ]]; then
		realpath -m "$CONTAINERD_BIN"
	elif command -v containerd >/dev/null 2>&1; then
		command -v containerd
	else
		printf '%s\n' /usr/local/bin/containerd
	fi
}

# ctrd_config: (re)write the config file and print its path.
ctrd_config() (
	set -euo pipefail
	mkdir -p "$CTRD_BASE"/{root,state,tmp,opt,cdi,certs.d,image-verifier,cni/bin,cni/net.d}
	local vm_plugin="" vm_runtime=""
	if [[ -n "$SANDBOXER_VM_SOCK" ]]; then
		vm_plugin="
[proxy_plugins.resource-vm]
  type = \"sandbox\"
  address = \"$SANDBOXER_VM_SOCK\"
"
		vm_runtime="
[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.resource-vm]
  runtime_type = \"$RESOURCE_VM_RUNTIME_TYPE\"
  sandboxer = \"resource-vm\"
  disable_pause_image_pull = true
  container_annotations = [\"resource-slot.kuasar.io/*\"]
"
	fi
	local name sock
	for entry in $CTRD_EXTRA_SANDBOXERS; do
		name="${entry%%=*}" sock="${entry#*=}"
		vm_plugin+="
[proxy_plugins.$name]
  type = \"sandbox\"
  address = \"$sock\"
"
		vm_runtime+="
[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.$name]
  runtime_type = \"io.containerd.resource-slot.v1\"
  sandboxer = \"$name\"
  disable_pause_image_pull = true
"
	done
	cat >"$CTRD_CONFIG.tmp" <<EOF
# Generated by scripts/containerd-env.sh; private containerd for resource-slot
# e2e tests. Rewritten on every start.
version = 3
root = "$CTRD_BASE/root"
state = "$CTRD_BASE/state"
temp = "$CTRD_BASE/tmp"

# Version-3 server keys (containerd 2.4 migrates them to the
# io.containerd.server.v1.* plugins). ttrpc is set explicitly so it never
# falls back to /run/containerd/containerd.sock.ttrpc.
[grpc]
  address = "$CTRD_SOCK"
[ttrpc]
  address = "$CTRD_SOCK.ttrpc"
[debug]
  level = "$CTRD_LOG_LEVEL"

# The sandboxer daemon: containerd's sandbox controller "resource-slot".
[proxy_plugins.resource-slot]
  type = "sandbox"
  address = "$SANDBOXER_SOCK"
$vm_plugin
[plugins."io.containerd.cri.v1.runtime"]
  # netns (unused by host-network pods) stays under the state dir.
  netns_mounts_under_state_dir = true
  cdi_spec_dirs = ["$CTRD_BASE/cdi"]

[plugins."io.containerd.cri.v1.runtime".containerd]
  default_runtime_name = "$CTRD_DEFAULT_RUNTIME"

# CRI runtime handler "resource-slot": pods are created by the sandboxer
# (sandboxer = proxy plugin name), containers by the shim
# containerd-shim-resource-slot-v1. No pause image is needed.
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.resource-slot]
  runtime_type = "io.containerd.resource-slot.v1"
  sandboxer = "resource-slot"
  disable_pause_image_pull = true
  # Pass the simulation annotations (exit-after, cpu-usage, ...) of a
  # container to the sandboxer in its OCI spec.
  container_annotations = ["resource-slot.kuasar.io/*"]
$vm_runtime
# Private, empty CNI dirs: CRI starts without CNI (NetworkReady=false);
# test pods use host networking.
[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["${CTRD_CNI_BIN_DIR:-$CTRD_BASE/cni/bin}"]
  conf_dir = "$CTRD_BASE/cni/net.d"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "$CTRD_SNAPSHOTTER"

[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "$CTRD_SANDBOX_IMAGE"

[plugins."io.containerd.cri.v1.images".registry]
  config_path = "$CTRD_BASE/certs.d"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

# NRI would listen on /var/run/nri/nri.sock, shared with any system containerd.
[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.internal.v1.opt"]
  path = "$CTRD_BASE/opt"

[plugins."io.containerd.image-verifier.v1.bindir"]
  bin_dir = "$CTRD_BASE/image-verifier"
EOF
	mv "$CTRD_CONFIG.tmp" "$CTRD_CONFIG"
	if [[ -n "$CTRD_CNI_BIN_DIR" ]]; then
		ctrd_cni_conf >/dev/null
	fi
	cat >"$CRI_CONFIG_FILE" <<EOF
runtime-endpoint: unix://$CTRD_SOCK
image-endpoint: unix://$CTRD_SOCK
timeout: 10
EOF
	printf '%s\n' "$CTRD_CONFIG"
)

# ctrd_cni_conf: write the bridge network of CTRD_CNI_BIN_DIR into conf_dir
# (containerd also reloads it while running) and print its path. A bridge
# and a 10.x /24 derived from CTRD_BASE, so that private containerds do not
# share them. The bridge is created here with the subnet's .1, so that the
# host routes the pod IPs to it and never out of its default route; the
# plugin adds no gateway, masquerading, forwarding or default route: pods
# reach only each other and the host. The IPAM state stays under CTRD_BASE.
# ctrd_clean deletes the bridge.
ctrd_cni_conf() (
	set -euo pipefail
	local h bridge subnet
	h="$(printf '%s' "$CTRD_BASE" | sha256sum | cut -c1-8)"
	bridge="rss${h}"
	subnet="${CTRD_CNI_SUBNET:-10.$((200 + 0x${h:0:2} % 50)).$((0x${h:2:2})).0/24}"
	if ! ip link show "$bridge" >/dev/null 2>&1; then
		ip link add "$bridge" type bridge
		ip addr add "${subnet%.*/*}.1/${subnet#*/}" dev "$bridge"
		ip link set "$bridge" up
	fi
	mkdir -p "$(dirname "$CTRD_CNI_CONF")" "$CTRD_BASE/cni/ipam"
	cat >"$CTRD_CNI_CONF.tmp" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "resource-slot",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": false,
      "isDefaultGateway": false,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$subnet"}]],
        "dataDir": "$CTRD_BASE/cni/ipam"
      }
    }
  ]
}
EOF
	mv "$CTRD_CNI_CONF.tmp" "$CTRD_CNI_CONF"
	printf '%s\n' "$CTRD_CNI_CONF"
)

# _ctrd_pid: print the pid of our running containerd, or fail. Checks the
# process really is a containerd using our config, so a stale pid file never
# makes us signal an unrelated process.
_ctrd_pid() {
	local pid
	[[ -f "$CTRD_PID_FILE" ]] || return 1
	pid="$(cat "$CTRD_PID_FILE")"
	[[ "$pid" =~ ^[0-9]+$ ]] || return 1
	[[ -r "/proc/$pid/cmdline" ]] || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "--config $CTRD_CONFIG" || return 1
	printf '%s\n' "$pid"
}

# _ctrd_ready: true once the gRPC socket answers a version request.
_ctrd_ready() {
	if command -v ctr >/dev/null 2>&1; then
		ctr --address "$CTRD_SOCK" --timeout 2s version >/dev/null 2>&1
	elif command -v crictl >/dev/null 2>&1; then
		crictl --config "$CRI_CONFIG_FILE" --runtime-endpoint "unix://$CTRD_SOCK" --timeout 2s version >/dev/null 2>&1
	else
		[[ -S "$CTRD_SOCK" ]]
	fi
}

ctrd_status() (
	set -euo pipefail
	local pid
	if pid="$(_ctrd_pid)"; then
		_ctrd_log "running: pid $pid, socket $CTRD_SOCK"
	else
		_ctrd_log "not running (base $CTRD_BASE)"
		return 1
	fi
)

ctrd_start() (
	set -euo pipefail
	local pid bin deadline log_from
	if pid="$(_ctrd_pid)"; then
		_ctrd_log "already running: pid $pid, socket $CTRD_SOCK"
		return 0
	fi
	bin="$(_ctrd_bin)"
	[[ -x "$bin" ]] || { _ctrd_log "containerd not found ($bin); run scripts/install-containerd.sh"; return 1; }
	ctrd_config >/dev/null
	# A socket left by a killed containerd would make the readiness probe lie.
	rm -f "$CTRD_SOCK" "$CTRD_SOCK.ttrpc"
	local path="$PATH"
	[[ -n "$SHIM_DIR" ]] && path="$SHIM_DIR:$PATH"
	rm -f "$CTRD_PID_FILE"
	# The log is appended to across runs; on failure show only this run's part.
	log_from=$(($(stat -c %s "$CTRD_LOG" 2>/dev/null || echo 0) + 1))
	# setsid: own session, so the caller's Ctrl-C / job control does not hit
	# it. setsid may fork, so the inner shell records its own pid and then
	# execs containerd (same pid).
	# cd /: do not pin the caller's cwd.
	# shellcheck disable=SC2016 # $$ and "$@" are for the inner shell.
	PATH="$path" setsid bash -c 'cd / && echo $$ >"$0" && exec "$@"' "$CTRD_PID_FILE" \
		"$bin" --config "$CTRD_CONFIG" >>"$CTRD_LOG" 2>&1 </dev/null &
	deadline=$((SECONDS + 5))
	until [[ -s "$CTRD_PID_FILE" ]]; do
		((SECONDS < deadline)) || { _ctrd_log "containerd did not start"; return 1; }
		sleep 0.05
	done
	pid="$(cat "$CTRD_PID_FILE")"
	deadline=$((SECONDS + CTRD_START_TIMEOUT))
	until _ctrd_ready; do
		if ! kill -0 "$pid" 2>/dev/null; then
			_ctrd_log "containerd exited during startup; last log lines:"
			tail -c "+$log_from" "$CTRD_LOG" | tail -n 30 >&2
			rm -f "$CTRD_PID_FILE"
			return 1
		fi
		if ((SECONDS >= deadline)); then
			_ctrd_log "containerd did not answer on $CTRD_SOCK within ${CTRD_START_TIMEOUT}s; last log lines:"
			tail -c "+$log_from" "$CTRD_LOG" | tail -n 30 >&2
			ctrd_stop || true
			return 1
		fi
		sleep 0.2
	done
	_ctrd_log "started: pid $pid, socket $CTRD_SOCK, log $CTRD_LOG, config $CTRD_CONFIG"
)

ctrd_stop() (
	set -euo pipefail
	local pid deadline
	if ! pid="$(_ctrd_pid)"; then
		_ctrd_log "not running"
		rm -f "$CTRD_PID_FILE"
		return 0
	fi
	kill -TERM "$pid" 2>/dev/null || true
	deadline=$((SECONDS + CTRD_STOP_TIMEOUT))
	while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
		sleep 0.2
	done
	if kill -0 "$pid" 2>/dev/null; then
		_ctrd_log "containerd pid $pid ignored TERM for ${CTRD_STOP_TIMEOUT}s, sending KILL"
		kill -KILL "$pid" 2>/dev/null || true
		while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
	fi
	rm -f "$CTRD_PID_FILE" "$CTRD_SOCK" "$CTRD_SOCK.ttrpc"
	_ctrd_log "stopped pid $pid"
)

# ctrd_clean: stop containerd, unmount whatever it left mounted under the base
# dir (snapshot/rootfs mounts) and remove the base dir. Shims and the
# sandboxer are not ours to kill; stop them first.
ctrd_clean() (
	set -euo pipefail
	ctrd_stop
	[[ -d "$CTRD_BASE" ]] || return 0
	local mnt
	# Deepest mounts first (reverse mount order).
	awk -v base="$CTRD_BASE/" 'index($5, base) == 1 { print $5 }' /proc/self/mountinfo | tac |
		while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
	# The bridge of ctrd_cni_conf, if it wrote one.
	local bridge=""
	[[ -f "$CTRD_CNI_CONF" ]] && bridge="$(sed -n 's/^ *"bridge": "\(rss[0-9a-f]*\)",$/\1/p' "$CTRD_CNI_CONF")"
	if [[ -n "$bridge" ]]; then ip link delete "$bridge" type bridge 2>/dev/null || true; fi
	rm -rf "$CTRD_BASE"
	_ctrd_log "removed $CTRD_BASE"
)

# ctrd_env: print shell exports for clients (eval "$(... env)").
ctrd_env() {
	printf 'export %s=%q\n' \
		CTRD_BASE "$CTRD_BASE" CTRD_SOCK "$CTRD_SOCK" CTRD_CONFIG "$CTRD_CONFIG" \
		CTRD_LOG "$CTRD_LOG" CTRD_PID_FILE "$CTRD_PID_FILE" CRI_CONFIG_FILE "$CRI_CONFIG_FILE" \
		CONTAINER_RUNTIME_ENDPOINT "$CONTAINER_RUNTIME_ENDPOINT" \
		IMAGE_SERVICE_ENDPOINT "$IMAGE_SERVICE_ENDPOINT" \
		CONTAINERD_ADDRESS "$CONTAINERD_ADDRESS" CONTAINERD_NAMESPACE "$CONTAINERD_NAMESPACE"
}

_ctrd_main() {
	set -euo pipefail
	case "${1:-}" in
	start) ctrd_start ;;
	stop) ctrd_stop ;;
	restart) ctrd_stop && ctrd_start ;;
	status) ctrd_status ;;
	config) ctrd_config ;;
	env) ctrd_env ;;
	clean) ctrd_clean ;;
	*)
		echo "usage: $0 start|stop|restart|status|config|env|clean" >&2
		return 2
		;;
	esac
}

# Only dispatch when executed, not when sourced.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
	_ctrd_main "$@"
fi
