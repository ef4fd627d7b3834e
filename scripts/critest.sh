#!/usr/bin/env bash
# Run critest (cri-tools v1.36.0, the CRI validation suite) against the
# resource-slot runtime handler: a private containerd 2.4 with CNI, the
# sandboxer in slot mode and its task shim, started as the e2e harness does
# and removed at the end (everything under a temp base dir).
#
# Usage: scripts/critest.sh [options] [-- more critest flags]
#   -p, --parallel N   ginkgo parallel nodes (2). N > 1 needs the ginkgo CLI
#                      of critest's ginkgo version; it is go-installed into
#                      $(go env GOPATH)/bin when missing.
#   --focus REGEX      --ginkgo.focus (repeatable: a spec runs if any matches)
#   --skip REGEX       --ginkgo.skip (repeatable)
#   --pass-list        focus on the specs of scripts/critest-pass.txt: those
#                      that pass in slot mode (exact spec names, one a line)
#   --report-dir DIR   keep the reports there: critest.json (ginkgo JSON),
#                      junit.xml, summary.txt, and the logs of the sandboxer,
#                      the shim and containerd; default: a temp dir, removed
#   --timeout DUR      --ginkgo.timeout of the whole run (60m)
#   --no-default-skip  also run the specs skipped by default: "runtime should
#                      support attach" never ends in slot mode (its container
#                      never closes the attach stream) and would stall the
#                      run until --timeout, which then skips all the rest
#   --reuse            use the containerd already running at $CTRD_BASE (and
#                      its sandboxer, e.g. the e2e harness): start and stop
#                      nothing; import the images; for the run only, if its
#                      CNI conf dir is empty, give it the bridge network
#                      (plugin links in its bin dir, a conflist, the bridge)
#                      and the closed registry (certs.d/_default)
#   --keep             keep the base dir and leave everything running
#   --vm               the resource-vm runtime handler: the sandboxer in vm
#                      mode (guest in $RSS_GUEST_DIR, default bin/guest),
#                      critest's images from the busybox image (its
#                      containers run), scripts/critest-pass-vm.txt for
#                      --pass-list; with --reuse, the harness's vm daemon
#
# Environment: RSS_BIN_DIR (bin/), CTRD_CNI_BIN_DIR (/usr/lib/cni: Debian's
# containernetworking-plugins), CRITEST (critest on PATH), RSS_CRITEST_BASE
# (a new /tmp/rss-critest.XXXXXX), RSS_LOG_LEVEL (the sandboxer's: info).
#
# Pods get a bridge network with a 10.x /24 and no route off it
# (ctrd_cni_conf of containerd-env.sh); every registry is sent to a closed
# port on 127.0.0.1, so nothing leaves the machine. The pod specs of critest
# need the network: containerd fails RunPodSandbox with "cni plugin not
# initialized" for a pod without host networking otherwise.
#
# Prints the counts and the failed specs at the end (from the JSON report);
# the exit status is critest's.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
scripts="$repo/scripts"
parallel=2 timeout=60m reuse=false keep=false report_dir="" vm=false pass_list=false
focus=() skip=() extra=()
default_skip=('runtime should support attach \[Conformance\]$')

while (($#)); do
	case "$1" in
	-p | --parallel) parallel="$2" && shift ;;
	--focus) focus+=("$2") && shift ;;
	--skip) skip+=("$2") && shift ;;
	--pass-list) pass_list=true ;;
	--vm) vm=true ;;
	--report-dir) report_dir="$2" && shift ;;
	--timeout) timeout="$2" && shift ;;
	--reuse) reuse=true ;;
	--no-default-skip) default_skip=() ;;
	--keep) keep=true ;;
	-h | --help)
		sed -n '2,42p' "$0"
		exit 0
		;;
	--)
		shift
		extra=("$@")
		break
		;;
	*)
		echo "unknown argument $1 (--help)" >&2
		exit 2
		;;
	esac
	shift
done

if "$pass_list"; then
	list="$scripts/critest-pass.txt"
	"$vm" && list="$scripts/critest-pass-vm.txt"
	# One exact spec name a line -> an escaped regex anchored at the end
	# (ginkgo matches "CRI validation <spec text>").
	while IFS= read -r line; do
		[[ -z "$line" || "$line" == \#* ]] && continue
		focus+=("$(printf '%s' "$line" | sed 's/[][\\.*^$+?(){}|/]/\\&/g')\$")
	done <"$list"
fi
handler=resource-slot
if "$vm"; then
	handler=resource-vm
	# A vm container reads its stdin: the attach spec ends there.
	default_skip=()
fi

log() { printf '[critest] %s\n' "$*" >&2; }
die() {
	log "$*"
	exit 1
}

[[ $EUID -eq 0 ]] || die "run as root: containerd needs it"
CRITEST="${CRITEST:-$(command -v critest || echo /usr/local/bin/critest)}"
[[ -x "$CRITEST" ]] || die "critest not installed (scripts/install-containerd.sh)"
for b in containerd ctr crictl jq go; do
	command -v "$b" >/dev/null || die "$b not on PATH (containerd, ctr, crictl: scripts/install-containerd.sh)"
done
CTRD_CNI_BIN_DIR="${CTRD_CNI_BIN_DIR:-/usr/lib/cni}"
[[ -x "$CTRD_CNI_BIN_DIR/bridge" && -x "$CTRD_CNI_BIN_DIR/host-local" && -x "$CTRD_CNI_BIN_DIR/loopback" ]] ||
	die "no CNI plugins in $CTRD_CNI_BIN_DIR: apt-get install -y --no-install-recommends containernetworking-plugins"

# The ginkgo CLI runs the parallel nodes; its version must be critest's.
if ((parallel > 1)); then
	want="$(go version -m "$CRITEST" 2>/dev/null | awk '$2 == "github.com/onsi/ginkgo/v2" { print $3 }')"
	want="${want:-v2.28.1}"
	gobin="$(go env GOPATH)/bin"
	export PATH="$PATH:$gobin"
	if [[ "$(ginkgo version 2>/dev/null)" != "Ginkgo Version ${want#v}" ]]; then
		log "installing the ginkgo CLI $want into $gobin"
		GOBIN="$gobin" GOFLAGS='' go install "github.com/onsi/ginkgo/v2/ginkgo@$want"
		PATH="$gobin:$PATH"
	fi
fi

sb_pid="" base="" critest_tmp="" report_tmp="" cni_added=() cni_conf_added="" hosts_added=""

if "$reuse"; then
	[[ -n "${CTRD_BASE:-}" ]] || die "--reuse needs CTRD_BASE (the base dir of scripts/containerd-env.sh)"
	"$scripts/containerd-env.sh" status >/dev/null 2>&1 || die "no containerd running at $CTRD_BASE"
	export CTRD_BASE
else
	# Short: unix socket paths are limited to 108 bytes.
	base="${RSS_CRITEST_BASE:-$(mktemp -d /tmp/rss-critest.XXXXXX)}"
	mkdir -p "$base/bin"
	export CTRD_BASE="$base/ctrd" SANDBOXER_SOCK="$base/sb.sock" SHIM_DIR="$base/bin" CTRD_CNI_BIN_DIR
	# vm mode: the same daemon and socket serve the resource-vm handler.
	if "$vm"; then export SANDBOXER_VM_SOCK="$SANDBOXER_SOCK"; fi
fi
# Reads the config, never changes it: CTRD_* paths, ctrd_cni_conf.
# shellcheck source-path=SCRIPTDIR source=containerd-env.sh
. "$scripts/containerd-env.sh"
sock="unix://$CTRD_SOCK"

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
	local rc=$? pid
	set +e
	[[ -n "$critest_tmp" ]] && rm -rf "$critest_tmp"
	[[ -n "$report_tmp" ]] && rm -rf "$report_tmp"
	if "$keep"; then
		log "kept ${base:-$CTRD_BASE} (containerd $CTRD_BASE, sandboxer pid ${sb_pid:-?})"
		exit "$rc"
	fi
	if "$reuse"; then
		# Undo what we added to a containerd that is not ours.
		if [[ -n "$cni_conf_added" ]]; then
			local bridge
			bridge="$(sed -n 's/^ *"bridge": "\(rss[0-9a-f]*\)",$/\1/p' "$cni_conf_added")"
			rm -f "$cni_conf_added"
			[[ -n "$bridge" ]] && ip link delete "$bridge" type bridge 2>/dev/null
		fi
		((${#cni_added[@]})) && rm -f "${cni_added[@]}"
		[[ -n "$hosts_added" ]] && rm -rf "$hosts_added"
		exit "$rc"
	fi
	if [[ -n "$sb_pid" ]] && kill -0 "$sb_pid" 2>/dev/null; then
		# Pods critest left behind: their CNI teardown needs the daemons.
		crictl --runtime-endpoint "$sock" --timeout 30s rmp -fa >/dev/null 2>&1
		kill -TERM "$sb_pid"
		for _ in $(seq 100); do kill -0 "$sb_pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$sb_pid" 2>/dev/null
	fi
	# The task shim outlives the daemon by design: ours serves $base/sb-task.sock.
	for pid in $(shim_pids); do kill -TERM "$pid" 2>/dev/null; done
	"$scripts/containerd-env.sh" clean >/dev/null 2>&1
	rm -rf "$base"
	exit "$rc"
}

# shellcheck disable=SC2317 # invoked by cleanup
shim_pids() {
	local f
	for f in /proc/[0-9]*/cmdline; do
		tr '\0' ' ' 2>/dev/null <"$f" | grep -qF -- "serve --socket $base/sb-task.sock " && { f="${f#/proc/}" && echo "${f%/cmdline}"; }
	done
	return 0
}

trap cleanup EXIT
trap 'exit 130' INT TERM

if ! "$reuse"; then
	[[ -d "${RSS_BIN_DIR:-$repo/bin}" ]] || die "no binaries: make build"
	# A copy: a rebuild of bin/ during the run does not change what runs.
	for b in resource-slot-sandboxer containerd-shim-resource-slot-v1; do
		cp "${RSS_BIN_DIR:-$repo/bin}/$b" "$base/bin/" || die "$b not built (make build)"
	done
	cat >"$base/sandboxer.toml" <<EOF
listen = "$SANDBOXER_SOCK"
dir = "$base/state"
log_level = "${RSS_LOG_LEVEL:-info}"
containerd_address = "$CTRD_SOCK.ttrpc"
EOF
	if "$vm"; then
		guest="$(realpath -m "${RSS_GUEST_DIR:-$repo/bin/guest}")"
		[[ -s "$guest/vmlinux" || -s "$guest/vmlinuz" ]] || die "no guest in $guest (make guest)"
		# The mode key before the tables.
		{ echo 'mode = "vm"'; cat "$base/sandboxer.toml"; printf '[vm]\nguest_dir = "%s"\nready_timeout = "3m"\n' "$guest"; } >"$base/sandboxer.toml.new"
		mv "$base/sandboxer.toml.new" "$base/sandboxer.toml"
	fi
	setsid "$base/bin/resource-slot-sandboxer" --config "$base/sandboxer.toml" >"$base/sandboxer.log" 2>&1 </dev/null &
	sb_pid=$!
	for _ in $(seq 200); do
		[[ -S "$SANDBOXER_SOCK" && -S "$base/sb-task.sock" ]] && break
		kill -0 "$sb_pid" 2>/dev/null || { tail -20 "$base/sandboxer.log" >&2; die "the sandboxer exited"; }
		sleep 0.1
	done
	[[ -S "$base/sb-task.sock" ]] || die "the sandboxer did not listen on $SANDBOXER_SOCK"
	log "sandboxer pid $sb_pid, state $base/state, log $base/sandboxer.log"
	"$scripts/containerd-env.sh" start
else
	# Pods without host networking need CNI: containerd fails
	# RunPodSandbox with "cni plugin not initialized" otherwise.
	if [[ -z "$(ls -A "$CTRD_BASE/cni/net.d" 2>/dev/null)" ]]; then
		bindir="$(sed -n 's/^ *bin_dirs = \["\(.*\)"\]$/\1/p' "$CTRD_CONFIG")"
		[[ -n "$bindir" ]] || die "cannot read the CNI bin dir of $CTRD_CONFIG"
		mkdir -p "$bindir"
		for p in bridge host-local loopback; do
			if [[ ! -e "$bindir/$p" ]]; then
				ln -s "$CTRD_CNI_BIN_DIR/$p" "$bindir/$p"
				cni_added+=("$bindir/$p")
			fi
		done
		cni_conf_added="$(ctrd_cni_conf)"
		log "CNI for the run: $cni_conf_added, plugins in $bindir"
	fi
fi

# No image can be pulled here, and critest's image specs pull (containerd's
# PullImage always asks the registry): send every registry to a closed local
# port (certs.d/_default, the hosts dir of containerd-env.sh), so that those
# pulls fail at once without DNS lookups or traffic off the machine.
hosts="$CTRD_BASE/certs.d/_default"
if [[ ! -e "$hosts/hosts.toml" ]]; then
	mkdir -p "$hosts"
	printf '# scripts/critest.sh: no registry is reachable\nserver = "http://127.0.0.1:1"\n' >"$hosts/hosts.toml"
	hosts_added="$hosts"
fi

log "importing the critest images: $("$scripts/critest-images.sh" --list | tr '\n' ' ')"
images=""
if "$vm"; then images=busybox; fi
out="$(CRITEST_IMAGES="$images" "$scripts/critest-images.sh" 2>&1)" || die "image import failed: $out"

# containerd loads the CNI conf asynchronously.
for _ in $(seq 100); do
	crictl --runtime-endpoint "$sock" info 2>/dev/null |
		jq -e '.status.conditions[] | select(.type == "NetworkReady") | .status' >/dev/null && break
	sleep 0.1
done

report_keep=true
if [[ -z "$report_dir" ]]; then
	report_dir="$(mktemp -d /tmp/rss-critest-report.XXXXXX)"
	report_tmp="$report_dir"
	report_keep=false
fi
mkdir -p "$report_dir"
report_dir="$(realpath "$report_dir")"
rm -f "$report_dir/critest.json" "$report_dir/junit.xml" "$report_dir/summary.txt"

args=(
	--runtime-endpoint "$sock" --image-endpoint "$sock"
	--runtime-handler "$handler"
	--ginkgo.timeout "$timeout"
	--ginkgo.no-color
	--ginkgo.json-report "$report_dir/critest.json"
	--ginkgo.junit-report "$report_dir/junit.xml"
)
# critest's own -parallel flag; 1 runs the specs in-process.
((parallel > 1)) && args+=(--parallel "$parallel")
for f in "${focus[@]}"; do args+=(--ginkgo.focus "$f"); done
for s in "${default_skip[@]}" "${skip[@]}"; do args+=(--ginkgo.skip "$s"); done
args+=("${extra[@]}")

log "critest ${args[*]}"
start=$SECONDS
rc=0
# critest leaves a dir in TMPDIR (the parallel runner's symlink and the
# nodes' report dirs): give it one of its own.
critest_tmp="$(mktemp -d /tmp/rss-critest-tmp.XXXXXX)"
(cd "$report_dir" && TMPDIR="$critest_tmp" "$CRITEST" "${args[@]}") || rc=$?
rm -rf "$critest_tmp"
critest_tmp=""
elapsed=$((SECONDS - start))
if "$report_keep" && ! "$reuse"; then
	cp "$base/sandboxer.log" "$base/state/shim.log" "$CTRD_LOG" "$report_dir/" 2>/dev/null || true
fi

if [[ -s "$report_dir/critest.json" ]]; then
	jq -r --arg t "${elapsed}s" '
		[.[].SpecReports[] | select(.LeafNodeType == "It")] as $s
		| "critest: \($s | map(select(.State == "passed")) | length) passed, "
		  + "\($s | map(select(.State == "failed" or .State == "panicked" or .State == "timedout" or .State == "interrupted" or .State == "aborted")) | length) failed, "
		  + "\($s | map(select(.State == "skipped" or .State == "pending")) | length) skipped, "
		  + "of \($s | length) specs in \($t)",
		  ($s[] | select(.State != "passed" and .State != "skipped" and .State != "pending")
		   | "  \(.State): \((.ContainerHierarchyTexts + [.LeafNodeText]) | join(" "))")
	' "$report_dir/critest.json" | tee "$report_dir/summary.txt" >&2
fi
"$report_keep" && log "reports in $report_dir"
exit "$rc"
