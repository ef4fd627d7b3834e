#!/usr/bin/env bash
# The reference design's performance test of the direct CRI mode:
#
#   for i in $(seq N); do crictl runp …; done
#
# against a resource-slot-sandboxer started here in a temp dir (or the one
# whose socket is $SANDBOXER_SOCK), timed. Each pod gets its own name (the
# CRI refuses two pods with the same name); the configs are written before
# the clock starts. Prints the total and the time per pod, then removes the
# pods and stops what it started.
#
#   scripts/runp-loop.sh 1000
#   FSYNC=false scripts/runp-loop.sh 1000     # the daemon with fsync = false
set -euo pipefail

n="${1:-100}"
[[ "$n" =~ ^[0-9]+$ && "$n" -gt 0 ]] || { echo "usage: $0 N" >&2; exit 2; }
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v crictl >/dev/null || { echo "crictl not found (scripts/install-containerd.sh)" >&2; exit 1; }

work="$(mktemp -d /tmp/rss-runp-loop.XXXXXX)"
daemon_pid=""
cleanup() {
	if [[ -n "$daemon_pid" ]]; then
		kill "$daemon_pid" 2>/dev/null || true
		wait "$daemon_pid" 2>/dev/null || true
		# The task shim outlives the daemon by design: stop the one it started.
		shim_pid="$(sed -n 's/.*started the task shim" pid=\([0-9]*\).*/\1/p' "$work/daemon.log" | tail -1)"
		[[ -n "$shim_pid" ]] && kill "$shim_pid" 2>/dev/null || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT

sock="${SANDBOXER_SOCK:-}"
if [[ -z "$sock" ]]; then
	[[ -x "$repo/bin/resource-slot-sandboxer" ]] || make -C "$repo" build >/dev/null
	sock="$work/test.sock"
	cat >"$work/config.toml" <<EOF
listen = "$sock"
dir = "$work/state"
containerd_address = ""
fsync = ${FSYNC:-true}
EOF
	"$repo/bin/resource-slot-sandboxer" --config "$work/config.toml" >"$work/daemon.log" 2>&1 &
	daemon_pid=$!
	for _ in $(seq 100); do [[ -S "$sock" ]] && break; sleep 0.1; done
	[[ -S "$sock" ]] || { cat "$work/daemon.log" >&2; exit 1; }
fi
export CRI_CONFIG_FILE="$work/crictl.yaml"
cat >"$CRI_CONFIG_FILE" <<EOF
runtime-endpoint: unix://$sock
image-endpoint: unix://$sock
timeout: 30
EOF

mkdir -p "$work/pods"
for i in $(seq "$n"); do
	cat >"$work/pods/$i.yaml" <<EOF
metadata:
  name: loop-$i
  namespace: default
  uid: loop-$$-$i
annotations:
  resources.limits.cpu: "2"
  resources.limits.memory: "2Gi"
  resources.limits.pid: "1000"
linux:
  cgroup_parent: /resource-slot-loop
  security_context:
    namespace_options:
      network: 2
EOF
done

start=$(date +%s%N)
for i in $(seq "$n"); do crictl runp "$work/pods/$i.yaml" >/dev/null; done
end=$(date +%s%N)

pods=$(crictl pods -q --name '^loop-' | wc -l)
ns=$((end - start))
awk -v n="$n" -v ns="$ns" -v pods="$pods" 'BEGIN {
	printf "crictl runp x %d: %.2f s total, %.2f ms per pod (%d pods ready)\n", n, ns / 1e9, ns / 1e6 / n, pods
}'
[[ "$pods" -eq "$n" ]] || { echo "expected $n pods, found $pods" >&2; exit 1; }

# Remove the pods (not timed).
crictl pods -q --name '^loop-' | xargs -r -n 50 crictl stopp >/dev/null
crictl pods -q --name '^loop-' | xargs -r -n 50 crictl rmp >/dev/null
