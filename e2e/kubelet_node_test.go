package e2e

import (
	"bytes"
	"context"
	"encoding/xml"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kuasar-io/resource-slot-sandboxer/vmm"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// kubeletSysctls are the kernel settings kubelet changes when it starts
// (cm.setupKernelTunables, protectKernelDefaults false): the node keeps
// what it had once the test ends.
var kubeletSysctls = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
}

// cgroupRoot is where the v1 hierarchies (and the v2 one of a hybrid
// host) are mounted.
const cgroupRoot = "/sys/fs/cgroup"

// nodeMode is the mode of a kubeletNode's sandboxer.
type nodeMode string

const (
	// slotNode runs the sandboxer in slot mode, the pods on runtime
	// handler resource-slot (simulated containers).
	slotNode nodeMode = "slot"
	// vmNode runs it in vm mode (the guest of RSS_GUEST_DIR), the pods on
	// resource-vm: each pod is a VM, its containers run in the guest.
	vmNode nodeMode = "vm"
)

// kubeletNode is a node of its own: a sandboxer, a private containerd
// whose default runtime is the sandboxer's handler (kubelet without an
// API server cannot resolve RuntimeClasses: its pods name no runtime
// handler), and kubelet running standalone on static pods from a
// manifest directory. Everything lives under base; kubelet's servers
// listen on 127.0.0.1 only.
type kubeletNode struct {
	t         *testing.T
	mode      nodeMode
	root      string // repository root
	bin       string
	base      string
	sandboxer *exec.Cmd
	kubelet   *exec.Cmd
	healthz   string
	cri       runtime.RuntimeServiceClient
	conn      *grpc.ClientConn
	sysctls   map[string]string
	hostname  string
	// podTimeout bounds a pod's way to running, and to gone: a VM
	// boots and stops under TCG.
	podTimeout time.Duration
}

func (n *kubeletNode) ctrdBase() string      { return filepath.Join(n.base, "ctrd") }
func (n *kubeletNode) sock() string          { return filepath.Join(n.base, "sb.sock") }
func (n *kubeletNode) taskSock() string      { return filepath.Join(n.base, "sb-task.sock") }
func (n *kubeletNode) stateDir() string      { return filepath.Join(n.base, "state") }
func (n *kubeletNode) manifests() string     { return filepath.Join(n.base, "manifests") }
func (n *kubeletNode) kubeletRoot() string   { return filepath.Join(n.base, "kubelet") }
func (n *kubeletNode) sbConfig() string      { return filepath.Join(n.base, "sandboxer.toml") }
func (n *kubeletNode) sbLog() string         { return filepath.Join(n.base, "sandboxer.log") }
func (n *kubeletNode) kubeletLog() string    { return filepath.Join(n.base, "kubelet.log") }
func (n *kubeletNode) containerdLog() string { return filepath.Join(n.ctrdBase(), "containerd.log") }

// handler is the runtime handler of the node's pods (containerd's
// default runtime).
func (n *kubeletNode) handler() string {
	if n.mode == vmNode {
		return "resource-vm"
	}
	return "resource-slot"
}

// startKubeletNode brings the node up; t.Cleanup takes it down again and
// puts back what kubelet changed on the host (sysctls, cgroups, mounts)
// and, in vm mode, destroys any domain the daemon left.
func startKubeletNode(t *testing.T, mode nodeMode) *kubeletNode {
	t.Helper()
	kubelet, err := exec.LookPath("kubelet")
	require.NoError(t, err, "kubelet not installed (scripts/install-kubelet.sh, run by make deps)")
	for _, c := range []string{"cpu", "memory", "pids"} {
		if _, err := os.Stat(filepath.Join(cgroupRoot, c, "kubepods")); err == nil {
			t.Fatalf("%s/%s/kubepods exists: another kubelet runs on this host", cgroupRoot, c)
		}
	}
	base, err := os.MkdirTemp("", "rss-kl-")
	require.NoError(t, err)
	n := &kubeletNode{t: t, mode: mode, root: h.root, bin: h.bin, base: base, hostname: "rss-e2e", podTimeout: 90 * time.Second}
	t.Cleanup(n.teardown)
	n.saveSysctls()
	for _, d := range []string{n.manifests(), n.kubeletRoot(), filepath.Join(base, "pod-logs"), filepath.Join(base, "volume-plugins"), filepath.Join(base, "path")} {
		require.NoError(t, os.MkdirAll(d, 0o755))
	}
	cfg := fmt.Sprintf("listen = %q\ndir = %q\nlog_level = \"debug\"\ncontainerd_address = %q\n",
		n.sock(), n.stateDir(), filepath.Join(n.ctrdBase(), "containerd.sock.ttrpc"))
	// The test image's simulated containers in slot mode, busybox's real
	// ones in the guest in vm mode.
	imageScript, imageTar := "build-test-image.sh", "test-image.tar"
	if mode == vmNode {
		guest := os.Getenv("RSS_GUEST_DIR")
		require.NotEmpty(t, guest, "RSS_GUEST_DIR (make guest) for a vm node")
		cfg = "mode = \"vm\"\n" + cfg + fmt.Sprintf("[vm]\nguest_dir = %q\nready_timeout = \"90s\"\n", guest)
		imageScript, imageTar = "build-busybox-image.sh", "rss-busybox.oci.tar"
		// A VM boots in 5-10 s under TCG, more on a loaded host; the
		// init container runs in it first.
		n.podTimeout = 5 * time.Minute
	}
	require.NoError(t, os.WriteFile(n.sbConfig(), []byte(cfg), 0o600))
	n.startSandboxer()
	if out, err := n.script("containerd-env.sh", "start"); err != nil {
		t.Fatalf("start containerd: %v\n%s", err, out)
	}
	if out, err := n.script(imageScript, "--import", filepath.Join(base, imageTar)); err != nil {
		t.Fatalf("import the image (%s): %v\n%s", imageScript, err, out)
	}
	n.conn, err = grpc.NewClient("unix://"+filepath.Join(n.ctrdBase(), "containerd.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	n.cri = runtime.NewRuntimeServiceClient(n.conn)
	n.startKubelet(kubelet)
	return n
}

func (n *kubeletNode) env() []string {
	// containerd-env.sh always declares the resource-slot proxy plugin:
	// on a vm node it names a socket nobody serves, which containerd
	// dials only for a resource-slot pod (there is none).
	slotSock, vmSock := n.sock(), ""
	if n.mode == vmNode {
		slotSock, vmSock = filepath.Join(n.base, "no-slot.sock"), n.sock()
	}
	return append(os.Environ(),
		"CTRD_BASE="+n.ctrdBase(),
		"SANDBOXER_SOCK="+slotSock,
		"SHIM_DIR="+n.bin,
		"CTRD_DEFAULT_RUNTIME="+n.handler(),
		"CRI_CONFIG_FILE="+filepath.Join(n.ctrdBase(), "crictl.yaml"),
		"SANDBOXER_VM_SOCK="+vmSock,
		"CTRD_EXTRA_SANDBOXERS=",
	)
}

// crictl runs crictl against the node's containerd.
func (n *kubeletNode) crictl(args ...string) (string, error) {
	return runCrictl(filepath.Join(n.ctrdBase(), "containerd.sock"), n.env(), args...)
}

func (n *kubeletNode) script(name string, args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(n.root, "scripts", name), args...)
	cmd.Env = n.env()
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (n *kubeletNode) startSandboxer() {
	n.t.Helper()
	cmd, err := startDaemon(n.bin, n.sbConfig(), n.sbLog(), n.sock(), n.taskSock())
	require.NoError(n.t, err)
	n.sandboxer = cmd
}

// restartSandboxer ends the daemon with sig and starts it again.
func (n *kubeletNode) restartSandboxer(sig syscall.Signal) {
	n.t.Helper()
	require.NoError(n.t, stopDaemon(n.sandboxer, sig))
	n.sandboxer = nil
	n.startSandboxer()
}

func (n *kubeletNode) restartContainerd() {
	n.t.Helper()
	if out, err := n.script("containerd-env.sh", "restart"); err != nil {
		n.t.Fatalf("restart containerd: %v\n%s", err, out)
	}
}

// freePort is a TCP port of 127.0.0.1 nobody listens on now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func (n *kubeletNode) startKubelet(bin string) {
	t := n.t
	t.Helper()
	port, healthz := freePort(t), freePort(t)
	n.healthz = fmt.Sprintf("http://127.0.0.1:%d/healthz", healthz)
	// The image garbage collector would delete the test image from the
	// private containerd on a full disk, and the eviction manager evict
	// the pods of a busy shared host: both off.
	config := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://%s
staticPodPath: %s
fileCheckFrequency: 1s
syncFrequency: 10s
address: 127.0.0.1
port: %d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %d
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
podLogsDir: %s
volumePluginDir: %s
failSwapOn: false
resolvConf: ""
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "1Mi", nodefs.available: "1%%", imagefs.available: "1%%"}
`, filepath.Join(n.ctrdBase(), "containerd.sock"), n.manifests(), port, healthz,
		filepath.Join(n.base, "pod-logs"), filepath.Join(n.base, "volume-plugins"))
	cfgPath := filepath.Join(n.base, "kubelet.yaml")
	require.NoError(t, os.WriteFile(cfgPath, []byte(config), 0o600))
	// kubelet adds iptables chains to the host's firewall (its
	// KUBE-FIREWALL and hint chains, jumps from INPUT and OUTPUT) and
	// keeps them there: a shared test host is spared them by iptables
	// commands that report iptables missing, which kubelet takes as a
	// host without iptables (utiliptables.NewBestEffort).
	for _, name := range []string{"iptables", "ip6tables"} {
		require.NoError(t, os.WriteFile(filepath.Join(n.base, "path", name), []byte("#!/bin/sh\nexit 1\n"), 0o755))
	}
	logf, err := os.OpenFile(n.kubeletLog(), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	require.NoError(t, err)
	defer logf.Close()
	cmd := exec.Command(bin, "--config", cfgPath, "--root-dir", n.kubeletRoot(),
		"--cert-dir", filepath.Join(n.kubeletRoot(), "pki"), "--hostname-override", n.hostname, "--v=2")
	cmd.Env = append(os.Environ(), "PATH="+filepath.Join(n.base, "path")+":"+os.Getenv("PATH"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	require.NoError(t, cmd.Start())
	n.kubelet = cmd
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	deadline := time.Now().Add(90 * time.Second)
	for {
		select {
		case <-exited:
			t.Fatalf("kubelet exited; see %s:\n%s", n.kubeletLog(), tailFile(n.kubeletLog(), 30))
		default:
		}
		if resp, err := http.Get(n.healthz); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("kubelet is not healthy after 90s:\n%s", tailFile(n.kubeletLog(), 30))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// writeManifest adds a static pod.
func (n *kubeletNode) writeManifest(name, yaml string) {
	n.t.Helper()
	tmp := filepath.Join(n.base, name+".yaml.tmp")
	require.NoError(n.t, os.WriteFile(tmp, []byte(yaml), 0o644))
	// Renamed in: kubelet must never read half a file.
	require.NoError(n.t, os.Rename(tmp, filepath.Join(n.manifests(), name+".yaml")))
}

func (n *kubeletNode) removeManifest(name string) {
	n.t.Helper()
	require.NoError(n.t, os.Remove(filepath.Join(n.manifests(), name+".yaml")))
}

// kubePodState is one static pod as the runtime has it.
type kubePodState struct {
	sandboxes  []*runtime.PodSandbox
	containers []*runtime.Container
}

// pod lists a static pod's sandboxes (kubelet names it <name>-<node>)
// and their containers.
func (n *kubeletNode) pod(name string) (kubePodState, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var st kubePodState
	pods, err := n.cri.ListPodSandbox(ctx, &runtime.ListPodSandboxRequest{})
	if err != nil {
		return st, err
	}
	for _, p := range pods.Items {
		if p.GetMetadata().GetName() == name+"-"+n.hostname {
			st.sandboxes = append(st.sandboxes, p)
		}
	}
	for _, sb := range st.sandboxes {
		cs, err := n.cri.ListContainers(ctx, &runtime.ListContainersRequest{Filter: &runtime.ContainerFilter{PodSandboxId: sb.Id}})
		if err != nil {
			return st, err
		}
		st.containers = append(st.containers, cs.Containers...)
	}
	sort.Slice(st.containers, func(i, j int) bool { return st.containers[i].Id < st.containers[j].Id })
	return st, nil
}

// running reports whether the pod has one ready sandbox whose containers
// named in want all run.
func (s kubePodState) running(want ...string) bool {
	if len(s.sandboxes) != 1 || s.sandboxes[0].State != runtime.PodSandboxState_SANDBOX_READY {
		return false
	}
	up := map[string]bool{}
	for _, c := range s.containers {
		if c.State == runtime.ContainerState_CONTAINER_RUNNING {
			up[c.GetMetadata().GetName()] = true
		}
	}
	for _, w := range want {
		if !up[w] {
			return false
		}
	}
	return true
}

// waitRunning waits until kubelet runs the pod's containers want.
func (n *kubeletNode) waitRunning(name string, want ...string) kubePodState {
	n.t.Helper()
	var st kubePodState
	deadline := time.Now().Add(n.podTimeout)
	for {
		var err error
		st, err = n.pod(name)
		if err == nil && st.running(want...) {
			return st
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("pod %s does not run %v after %v (err %v): %d sandboxes, containers %s\nkubelet:\n%s",
				name, want, n.podTimeout, err, len(st.sandboxes), describeContainers(st.containers), tailFile(n.kubeletLog(), 20))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func describeContainers(cs []*runtime.Container) string {
	var b strings.Builder
	for _, c := range cs {
		fmt.Fprintf(&b, "[%s %s attempt %d] ", c.GetMetadata().GetName(), c.State, c.GetMetadata().GetAttempt())
	}
	return b.String()
}

// readCgroup reads one cgroup v1 file of the pod cgroup parent.
func readCgroup(t *testing.T, controller, parent, file string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(cgroupRoot, controller, parent, file))
	require.NoError(t, err)
	return strings.TrimSpace(string(data))
}

func (n *kubeletNode) saveSysctls() {
	n.sysctls = map[string]string{}
	for _, k := range kubeletSysctls {
		data, err := os.ReadFile(filepath.Join("/proc/sys", k))
		require.NoError(n.t, err)
		n.sysctls[k] = strings.TrimSpace(string(data))
	}
}

func (n *kubeletNode) restoreSysctls() {
	for k, v := range n.sysctls {
		if err := os.WriteFile(filepath.Join("/proc/sys", k), []byte(v), 0o644); err != nil {
			n.t.Errorf("restore %s=%s: %v", k, v, err)
		}
	}
}

// removeKubepods removes the cgroups kubelet created (kubepods and below,
// in every hierarchy) deepest first; slot pods leave no process in them.
func removeKubepods(t *testing.T) {
	hierarchies, _ := os.ReadDir(cgroupRoot)
	for _, hy := range hierarchies {
		top := filepath.Join(cgroupRoot, hy.Name(), "kubepods")
		if _, err := os.Stat(top); err != nil {
			continue
		}
		var dirs []string
		filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := syscall.Rmdir(dirs[i]); err != nil && !os.IsNotExist(err) {
				t.Errorf("remove cgroup %s: %v", dirs[i], err)
			}
		}
	}
}

// stopKubelet ends kubelet; the pods it ran keep running, as on a node.
func (n *kubeletNode) stopKubelet() {
	if n.kubelet == nil {
		return
	}
	n.kubelet.Process.Signal(syscall.SIGTERM)
	deadline := time.Now().Add(30 * time.Second)
	for syscall.Kill(n.kubelet.Process.Pid, 0) == nil && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	n.kubelet.Process.Kill()
	n.kubelet = nil
}

func (n *kubeletNode) teardown() {
	t := n.t
	if t.Failed() {
		for _, f := range []string{n.kubeletLog(), n.sbLog(), n.containerdLog()} {
			fmt.Fprintf(os.Stderr, "==> last lines of %s\n%s\n", f, tailFile(f, 40))
		}
	}
	n.stopKubelet()
	if n.cri != nil {
		timeout := 30 * time.Second
		if n.mode == vmNode {
			timeout = 3 * time.Minute // a VM's stop waits for its guest
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		if pods, err := n.cri.ListPodSandbox(ctx, &runtime.ListPodSandboxRequest{}); err == nil {
			for _, p := range pods.Items {
				n.cri.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: p.Id})
				n.cri.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: p.Id})
			}
		}
		cancel()
		n.conn.Close()
	}
	if out, err := n.script("containerd-env.sh", "clean"); err != nil {
		t.Errorf("containerd-env.sh clean: %v\n%s", err, out)
	}
	stopDaemon(n.sandboxer, syscall.SIGTERM)
	// The task shim outlives the daemon by design: end ours, by pid.
	for _, pid := range pidsWithArg("serve --socket " + n.taskSock()) {
		syscall.Kill(pid, syscall.SIGTERM)
	}
	if n.mode == vmNode {
		n.destroyDomains()
	}
	removeKubepods(t)
	n.restoreSysctls()
	// kubelet bind-mounts its root directory onto itself (to make it
	// shared): unmount everything under base, deepest first.
	for _, m := range mountsUnder(n.base) {
		if err := syscall.Unmount(m, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", m, err)
		}
	}
	if os.Getenv("RSS_E2E_KEEP") == "" {
		os.RemoveAll(n.base)
	}
}

// pidsWithArg lists the processes whose command line contains s.
func pidsWithArg(s string) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '})), s) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// mountsUnder lists the mount points below dir, deepest first.
func mountsUnder(dir string) []string {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var ms []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			ms = append(ms, f[4])
		}
	}
	sort.Slice(ms, func(i, j int) bool { return len(ms[i]) > len(ms[j]) })
	return ms
}

// tailFile is the last n lines of a file.
func tailFile(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	return tail(strings.TrimRight(string(data), "\n"), n)
}

// ownedDomains lists the libvirt domains (defined or running) whose
// metadata names owner, a vm daemon's state directory, as theirs.
func ownedDomains(owner string) ([]string, error) {
	out, err := exec.Command("virsh", "-c", "qemu:///system", "list", "--all", "--name").CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("virsh list: %v: %s", err, out)
	}
	var owned []string
	for _, name := range strings.Fields(string(out)) {
		x, err := exec.Command("virsh", "-c", "qemu:///system", "dumpxml", name).Output()
		if err != nil {
			continue // gone meanwhile, or another helper's
		}
		var d vmm.Domain
		if xml.Unmarshal(x, &d) == nil && d.Metadata != nil && d.Metadata.Sandbox != nil && d.Metadata.Sandbox.Owner == owner {
			owned = append(owned, name)
		}
	}
	return owned, nil
}

// destroyDomains removes the domains the node's vm daemon left: none once
// kubelet's pods were removed through the CRI.
func (n *kubeletNode) destroyDomains() {
	names, err := ownedDomains(n.stateDir())
	if err != nil {
		n.t.Errorf("list the node's domains: %v", err)
		return
	}
	for _, name := range names {
		if !n.t.Failed() {
			n.t.Errorf("domain %s left after its pod was removed", name)
		}
		exec.Command("virsh", "-c", "qemu:///system", "destroy", name).Run()
		exec.Command("virsh", "-c", "qemu:///system", "undefine", name).Run()
	}
}
