// Package e2e drives the sandboxer through a real containerd 2.4 and
// crictl, as a node operator runs it. It needs root, containerd, crictl
// and the binaries in bin/; `make test` installs and builds them and sets
// RSS_E2E=1.
package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// harness is one private containerd and one sandboxer, shared by the tests
// of the package; each test uses its own pods.
type harness struct {
	root      string // repository root
	bin       string
	base      string
	sbConfig  string
	sbLog     string
	sandboxer *exec.Cmd
	// vm is a second daemon in vm mode (runtime handler resource-vm),
	// when RSS_VM_TESTS and RSS_GUEST_DIR are set.
	vm       *exec.Cmd
	vmConfig string
	noop     *exec.Cmd
	cri      runtime.RuntimeServiceClient
	conn     *grpc.ClientConn
}

var h *harness

func TestMain(m *testing.M) {
	if socks := os.Getenv(noopEnv); socks != "" {
		os.Exit(serveNoop(socks))
	}
	if os.Getenv("RSS_E2E") == "" {
		fmt.Println("e2e: skipped; set RSS_E2E=1 (make test does) to run against a real containerd")
		os.Exit(0)
	}
	var err error
	h, err = setup()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e setup:", err)
		if h != nil {
			h.dumpLogs()
			h.teardown()
		}
		os.Exit(1)
	}
	code := m.Run()
	if code != 0 {
		h.dumpLogs()
	}
	h.teardown()
	os.Exit(code)
}

func setup() (*harness, error) {
	root, err := filepath.Abs("..")
	if err != nil {
		return nil, err
	}
	bin := os.Getenv("RSS_BIN_DIR")
	if bin == "" {
		bin = filepath.Join(root, "bin")
	}
	for _, b := range []string{"resource-slot-sandboxer", "containerd-shim-resource-slot-v1"} {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			return nil, fmt.Errorf("%s not built (make build): %w", b, err)
		}
	}
	for _, b := range []string{"containerd", "crictl", "ctr"} {
		if _, err := exec.LookPath(b); err != nil {
			return nil, fmt.Errorf("%s not installed (scripts/install-containerd.sh): %w", b, err)
		}
	}
	// Short: unix socket paths are limited to 108 bytes.
	base, err := os.MkdirTemp("", "rss-e2e-")
	if err != nil {
		return nil, err
	}
	x := &harness{root: root, bin: bin, base: base, sbLog: filepath.Join(base, "sandboxer.log"), sbConfig: filepath.Join(base, "sandboxer.toml")}
	// Tests log at debug, for their failures; benchmarks measure the
	// daemon as it runs by default, at info.
	logLevel := "debug"
	if benchmarking() {
		logLevel = "info"
	}
	cfg := fmt.Sprintf("listen = %q\ndir = %q\nlog_level = %q\ncontainerd_address = %q\n",
		x.SandboxerSock(), x.StateDir(), logLevel, filepath.Join(x.CtrdBase(), "containerd.sock.ttrpc"))
	if err := os.WriteFile(x.sbConfig, []byte(cfg), 0o600); err != nil {
		return x, err
	}
	if err := x.startSandboxer(); err != nil {
		return x, err
	}
	if os.Getenv("RSS_VM_TESTS") != "" && os.Getenv("RSS_GUEST_DIR") != "" {
		x.vmConfig = filepath.Join(base, "vm.toml")
		cfg := fmt.Sprintf("mode = \"vm\"\nlisten = %q\ndir = %q\nlog_level = \"debug\"\ncontainerd_address = %q\n[vm]\nguest_dir = %q\nready_timeout = \"90s\"\n",
			x.VMSock(), filepath.Join(base, "vmstate"), filepath.Join(x.CtrdBase(), "containerd.sock.ttrpc"), os.Getenv("RSS_GUEST_DIR"))
		if err := os.WriteFile(x.vmConfig, []byte(cfg), 0o600); err != nil {
			return x, err
		}
		if err := x.startVM(); err != nil {
			return x, err
		}
	}
	if x.noop, err = startNoopProcess(filepath.Join(base, "noop.log"), filepath.Join(base, "noop.sock"), filepath.Join(base, "noop-task.sock")); err != nil {
		return x, err
	}
	if out, err := x.script("containerd-env.sh", "start"); err != nil {
		return x, fmt.Errorf("start containerd: %v\n%s", err, out)
	}
	if out, err := x.script("build-test-image.sh", "--import", filepath.Join(base, "test-image.tar")); err != nil {
		return x, fmt.Errorf("import test image: %v\n%s", err, out)
	}
	x.conn, err = grpc.NewClient("unix://"+filepath.Join(x.CtrdBase(), "containerd.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return x, err
	}
	x.cri = runtime.NewRuntimeServiceClient(x.conn)
	return x, nil
}

// benchmarking reports whether benchmarks were asked for (-test.bench).
func benchmarking() bool {
	if !flag.Parsed() {
		flag.Parse()
	}
	f := flag.Lookup("test.bench")
	return f != nil && f.Value.String() != ""
}

func (x *harness) CtrdBase() string      { return filepath.Join(x.base, "ctrd") }
func (x *harness) SandboxerSock() string { return filepath.Join(x.base, "sb.sock") }
func (x *harness) StateDir() string      { return filepath.Join(x.base, "state") }
func (x *harness) TaskSock() string      { return filepath.Join(x.base, "sb-task.sock") }
func (x *harness) VMSock() string        { return filepath.Join(x.base, "vm.sock") }
func (x *harness) VMStateDir() string    { return filepath.Join(x.base, "vmstate") }

func (x *harness) startVM() error {
	cmd, err := startDaemon(x.bin, x.vmConfig, filepath.Join(x.base, "vm.log"), x.VMSock(), filepath.Join(x.base, "vm-task.sock"))
	x.vm = cmd
	return err
}

func (x *harness) env() []string {
	return append(os.Environ(),
		"CTRD_BASE="+x.CtrdBase(),
		"SANDBOXER_SOCK="+x.SandboxerSock(),
		"SHIM_DIR="+x.bin,
		"CRI_CONFIG_FILE="+filepath.Join(x.CtrdBase(), "crictl.yaml"),
		"CTRD_EXTRA_SANDBOXERS=noop="+filepath.Join(x.base, "noop.sock"),
		"SANDBOXER_VM_SOCK="+vmSock(x),
	)
}

func (x *harness) script(name string, args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(x.root, "scripts", name), args...)
	cmd.Env = x.env()
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (x *harness) startSandboxer() error {
	cmd, err := startDaemon(x.bin, x.sbConfig, x.sbLog, x.SandboxerSock(), x.TaskSock())
	x.sandboxer = cmd
	return err
}

// stopSandboxer ends the daemon with sig and waits for it.
func (x *harness) stopSandboxer(sig syscall.Signal) error {
	err := stopDaemon(x.sandboxer, sig)
	x.sandboxer = nil
	return err
}

// startDaemon runs resource-slot-sandboxer with a config and waits until
// it serves on sock and its task shim on taskSock.
func startDaemon(bin, config, logPath, sock, taskSock string) (*exec.Cmd, error) {
	cmd := exec.Command(filepath.Join(bin, "resource-slot-sandboxer"), "--config", config)
	if e := os.Getenv("RSS_DAEMON_ENV"); e != "" {
		cmd.Env = append(os.Environ(), strings.Fields(e)...)
	}
	return startProcess(cmd, logPath, sock, taskSock)
}

// startProcess starts cmd with its output in logPath and waits until it
// answers on sock and has created taskSock.
func startProcess(cmd *exec.Cmd, logPath, sock, taskSock string) (*exec.Cmd, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	exited := make(chan struct{})
	go func() { cmd.Process.Wait(); close(exited) }()
	// A killed daemon leaves its socket file: wait until the new one
	// answers, which it does once it has recovered its sandboxes.
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return nil, fmt.Errorf("%s exited; see %s", filepath.Base(cmd.Path), logPath)
		default:
		}
		if c, err := net.DialTimeout("unix", sock, time.Second); err == nil {
			c.Close()
			if _, err := os.Stat(taskSock); err == nil {
				return cmd, nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	cmd.Process.Kill()
	return nil, fmt.Errorf("%s did not start listening on %s", filepath.Base(cmd.Path), sock)
}

// withConfig runs fn with the sandboxer restarted on its configuration
// plus extra (top-level keys, then tables), and restarts it on the
// original afterwards. A top-level key of extra replaces the original's.
func (x *harness) withConfig(tb testing.TB, extra string, fn func()) {
	tb.Helper()
	orig, err := os.ReadFile(x.sbConfig)
	if err != nil {
		tb.Fatal(err)
	}
	restart := func(cfg string) {
		tb.Helper()
		if err := os.WriteFile(x.sbConfig, []byte(cfg), 0o600); err != nil {
			tb.Fatal(err)
		}
		if err := x.stopSandboxer(syscall.SIGTERM); err != nil {
			tb.Fatal(err)
		}
		if err := x.startSandboxer(); err != nil {
			tb.Fatal(err)
		}
	}
	restart(mergeConfig(string(orig), extra))
	defer restart(string(orig))
	fn()
}

// mergeConfig appends extra to a TOML configuration of top-level keys,
// dropping the keys that extra sets again.
func mergeConfig(orig, extra string) string {
	set := map[string]bool{}
	for _, line := range strings.Split(extra, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "[") {
			break
		}
		if k, _, ok := strings.Cut(line, "="); ok {
			set[strings.TrimSpace(k)] = true
		}
	}
	var b strings.Builder
	for _, line := range strings.SplitAfter(orig, "\n") {
		if k, _, ok := strings.Cut(line, "="); ok && set[strings.TrimSpace(k)] {
			continue
		}
		b.WriteString(line)
	}
	return b.String() + extra
}

// vmSock is the vm daemon's socket for containerd's config, "" without one.
func vmSock(x *harness) string {
	if x.vmConfig == "" {
		return ""
	}
	return x.VMSock()
}

// stopDaemon ends a daemon with sig and waits for it.
func stopDaemon(cmd *exec.Cmd, sig syscall.Signal) error {
	if cmd == nil {
		return nil
	}
	cmd.Process.Signal(sig)
	deadline := time.Now().Add(30 * time.Second)
	for syscall.Kill(cmd.Process.Pid, 0) == nil {
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			return fmt.Errorf("the daemon did not stop on %v", sig)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

func (x *harness) restartSandboxer(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := x.stopSandboxer(sig); err != nil {
		t.Fatal(err)
	}
	if err := x.startSandboxer(); err != nil {
		t.Fatal(err)
	}
	x.waitContainerdReconnects(t)
}

var probes int

// waitContainerdReconnects waits until containerd reaches the restarted
// sandboxer: its gRPC connection retries with a backoff of up to 3 s and
// fails calls fast meanwhile.
func (x *harness) waitContainerdReconnects(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	eventually(t, "containerd to reach the sandboxer", func() bool {
		probes++
		resp, err := x.cri.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{
			Config: podConfig(fmt.Sprintf("probe-%d", probes), nil, nil), RuntimeHandler: "resource-slot",
		})
		if err != nil {
			return false
		}
		x.cri.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: resp.PodSandboxId})
		x.cri.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: resp.PodSandboxId})
		return true
	})
}

func (x *harness) restartContainerd(t *testing.T) {
	t.Helper()
	if out, err := x.script("containerd-env.sh", "restart"); err != nil {
		t.Fatalf("restart containerd: %v\n%s", err, out)
	}
	// containerd answers before its CRI has recovered its pods, and the CRI
	// answers "server is not initialized yet" (Unavailable) until then.
	eventually(t, "containerd's CRI to initialize", func() bool {
		_, err := x.cri.ListPodSandbox(context.Background(), &runtime.ListPodSandboxRequest{Filter: &runtime.PodSandboxFilter{Id: "none"}})
		return err == nil
	})
}

func (x *harness) teardown() {
	if x.conn != nil {
		x.conn.Close()
	}
	x.stopSandboxer(syscall.SIGTERM)
	stopDaemon(x.vm, syscall.SIGTERM)
	stopDaemon(x.noop, syscall.SIGTERM)
	// The task shim outlives the sandboxer by design: end the shims of
	// this harness's task sockets, by pid.
	for _, sock := range []string{x.TaskSock(), filepath.Join(x.base, "vm-task.sock")} {
		for _, pid := range shimPIDs(sock) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if os.Getenv("RSS_E2E_KEEP") != "" {
		x.script("containerd-env.sh", "stop")
		return
	}
	x.script("containerd-env.sh", "clean")
	os.RemoveAll(x.base)
}

func (x *harness) dumpLogs() {
	for _, f := range []string{x.sbLog, filepath.Join(x.base, "vm.log"), filepath.Join(x.CtrdBase(), "containerd.log")} {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		lines := strings.Split(string(data), "\n")
		if len(lines) > 60 {
			lines = lines[len(lines)-60:]
		}
		fmt.Fprintf(os.Stderr, "==> last lines of %s\n%s\n", f, strings.Join(lines, "\n"))
	}
}

// crictl runs crictl against the private containerd.
func (x *harness) crictl(args ...string) (string, error) {
	return runCrictl(filepath.Join(x.CtrdBase(), "containerd.sock"), x.env(), args...)
}

// runCrictl runs crictl against the containerd of socket ctrdSock with
// environment env; the output is trimmed.
func runCrictl(ctrdSock string, env []string, args ...string) (string, error) {
	sock := "unix://" + ctrdSock
	cmd := exec.Command("crictl", append([]string{"--runtime-endpoint", sock, "--image-endpoint", sock, "--timeout", "30s"}, args...)...)
	cmd.Env = env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String(), fmt.Errorf("crictl %s: %v: %s", strings.Join(args, " "), err, stderr.String())
	}
	return strings.TrimSpace(stdout.String()), nil
}

func (x *harness) mustCrictl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := x.crictl(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// writeJSON writes v (a CRI config) for crictl, which reads it with
// encoding/json.
func writeJSON(t *testing.T, v any) string {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(f, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// podConfig is a host-network pod: the private containerd has no CNI.
func podConfig(name string, annotations map[string]string, res *runtime.LinuxContainerResources) *runtime.PodSandboxConfig {
	return &runtime.PodSandboxConfig{
		Metadata:    &runtime.PodSandboxMetadata{Name: name, Namespace: "e2e", Uid: name + "-uid"},
		Annotations: annotations,
		Linux: &runtime.LinuxPodSandboxConfig{
			Resources: res,
			SecurityContext: &runtime.LinuxSandboxSecurityContext{
				NamespaceOptions: &runtime.NamespaceOption{Network: runtime.NamespaceMode_NODE},
			},
		},
	}
}

// runp creates a pod with crictl and returns its ID.
func (x *harness) runp(t *testing.T, cfg *runtime.PodSandboxConfig) string {
	t.Helper()
	return x.mustCrictl(t, "runp", "--runtime", "resource-slot", writeJSON(t, cfg))
}

func (x *harness) removePod(t *testing.T, id string) {
	t.Helper()
	x.crictl("stopp", id)
	x.crictl("rmp", "-f", id)
}

func (x *harness) resourceInfo(t *testing.T, podID string) map[string]any {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(x.StateDir(), podID, "resource_info.json"))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// podState is the pod's state as containerd lists it (crictl pods).
func (x *harness) podState(t *testing.T, id string) string {
	t.Helper()
	resp, err := x.cri.ListPodSandbox(context.Background(), &runtime.ListPodSandboxRequest{Filter: &runtime.PodSandboxFilter{Id: id}})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Items) != 1 {
		t.Fatalf("pod %s listed %d times", id, len(resp.Items))
	}
	return resp.Items[0].State.String()
}

// eventually polls cond until it holds or the timeout passes; containerd
// applies some changes asynchronously (exit events).
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

// runParallel calls fn(0..n-1) from workers goroutines and returns the
// errors.
func runParallel(n, workers int, fn func(i int) error) []error {
	var (
		next atomic.Int64
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1)) - 1; i < n; i = int(next.Add(1)) - 1 {
				if err := fn(i); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	return errs
}
