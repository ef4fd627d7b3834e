package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// busyboxImage is the image of scripts/build-busybox-image.sh: Debian's
// busybox-static with every applet, /bin/sh as its command.
const busyboxImage = "localhost/rss-busybox:latest"

func virsh(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("virsh", append([]string{"-c", "qemu:///system"}, args...)...).CombinedOutput()
	require.NoError(t, err, "virsh %s: %s", strings.Join(args, " "), out)
	return string(out)
}

func needVM(t *testing.T) {
	t.Helper()
	if h.vm == nil {
		if os.Getenv("RSS_E2E") != "" && os.Getenv("RSS_VM_TESTS") != "" {
			t.Fatal("RSS_VM_TESTS is set but the vm daemon is not running (RSS_GUEST_DIR?)")
		}
		t.Skip("set RSS_VM_TESTS=1 and RSS_GUEST_DIR (make test does) to run the vm mode end to end")
	}
}

var busyboxOnce sync.Once

// importBusybox imports the busybox image into the private containerd once.
func importBusybox(t testing.TB) {
	t.Helper()
	var err error
	var out string
	busyboxOnce.Do(func() {
		out, err = h.script("build-busybox-image.sh", "--import", filepath.Join(h.base, "rss-busybox.oci.tar"))
	})
	require.NoError(t, err, "import the busybox image: %s", out)
}

func vmDomain(t *testing.T, podID string) string {
	t.Helper()
	names := virsh(t, "list", "--all", "--name")
	for _, n := range strings.Fields(names) {
		if strings.Contains(n, podID[:12]) {
			return n
		}
	}
	t.Fatalf("no domain for pod %s among:\n%s", podID, names)
	return ""
}

// TestVMPod runs a pod with the runtime handler resource-vm through
// containerd: the sandboxer in vm mode boots a VM sized from the pod's
// limits, keeps it across a SIGKILL of the daemon, reports it NotReady
// when the VM is destroyed behind its back, and removes it on rmp.
func TestVMPod(t *testing.T) {
	needVM(t)
	id := h.mustCrictl(t, "runp", "--runtime", "resource-vm", writeJSON(t, podConfig("vm", map[string]string{
		"resources.limits.cpu":    "1500m",
		"resources.limits.memory": "256Mi",
		"resources.limits.pid":    "100",
	}, nil)))
	defer h.removePod(t, id)

	data, err := os.ReadFile(filepath.Join(h.VMStateDir(), id, "resource_info.json"))
	require.NoError(t, err)
	var info map[string]any
	require.NoError(t, json.Unmarshal(data, &info))
	assert.Equal(t, 1.5, info["cpu_limit"])
	assert.Equal(t, float64(256<<20), info["memory_limit"])

	// The VM carries the pod's limits.
	name := vmDomain(t, id)
	xml := virsh(t, "dumpxml", name)
	assert.Contains(t, xml, "<vcpu placement='static'>2</vcpu>")
	assert.Contains(t, xml, "<global_quota>150000</global_quota>")
	assert.Contains(t, xml, "<driver type='virtiofs'")
	assert.Contains(t, virsh(t, "memtune", name), "hard_limit")

	var inspect map[string]any
	require.NoError(t, json.Unmarshal([]byte(h.mustCrictl(t, "inspectp", id)), &inspect))
	assert.Equal(t, "SANDBOX_READY", inspect["status"].(map[string]any)["state"])
	assert.Equal(t, "vm", inspect["sandboxer"].(map[string]any)["mode"])

	// kill -9 of the daemon: the VM runs on, the pod stays ready.
	require.NoError(t, stopDaemon(h.vm, syscall.SIGKILL))
	require.NoError(t, h.startVM())
	assert.Contains(t, virsh(t, "domstate", name), "running")
	eventually(t, "the pod to be ready through containerd", func() bool {
		out, err := h.crictl("inspectp", id)
		return err == nil && strings.Contains(out, `"state": "SANDBOX_READY"`)
	})

	// A VM destroyed behind the sandboxer's back ends the sandbox.
	virsh(t, "destroy", name)
	eventually(t, "containerd to see the pod NotReady", func() bool {
		return h.podState(t, id) == "SANDBOX_NOTREADY"
	})

	h.mustCrictl(t, "stopp", id)
	h.mustCrictl(t, "rmp", id)
	_, err = os.Stat(filepath.Join(h.VMStateDir(), id))
	assert.True(t, os.IsNotExist(err), "rmp removes the sandbox directory")
	assert.NotContains(t, virsh(t, "list", "--all", "--name"), name, "rmp undefines the domain")
}

// vmContainer creates and starts a busybox container running sh -c cmd in
// a vm pod.
func vmContainer(t *testing.T, podID, podFile, name, cmd string, res *runtime.LinuxContainerResources) string {
	t.Helper()
	cfg := &runtime.ContainerConfig{
		Metadata: &runtime.ContainerMetadata{Name: name},
		Image:    &runtime.ImageSpec{Image: busyboxImage},
		Command:  []string{"/bin/sh", "-c", cmd},
		Linux:    &runtime.LinuxContainerConfig{Resources: res},
		LogPath:  name + ".log",
	}
	cid := h.mustCrictl(t, "create", podID, writeJSON(t, cfg), podFile)
	h.mustCrictl(t, "start", cid)
	return cid
}

type ctrStatus struct {
	State    string `json:"state"`
	ExitCode int    `json:"exitCode"`
	Reason   string `json:"reason"`
	Created  string `json:"createdAt"`
	Started  string `json:"startedAt"`
}

func inspectCtr(t *testing.T, cid string) (ctrStatus, int) {
	t.Helper()
	var v struct {
		Status ctrStatus `json:"status"`
		Info   struct {
			Pid int `json:"pid"`
		} `json:"info"`
	}
	require.NoError(t, json.Unmarshal([]byte(h.mustCrictl(t, "inspect", cid)), &v))
	return v.Status, v.Info.Pid
}

// statsCores is the container's CPU use in cores as crictl stats reports
// it (containerd computes it between two of its samples).
func statsCores(t *testing.T, cid string) float64 {
	t.Helper()
	var v struct {
		Stats []struct {
			CPU struct {
				UsageNanoCores struct {
					Value string `json:"value"`
				} `json:"usageNanoCores"`
			} `json:"cpu"`
		} `json:"stats"`
	}
	out := h.mustCrictl(t, "stats", "-o", "json", "--id", cid)
	require.NoError(t, json.Unmarshal([]byte(out), &v), out)
	require.Len(t, v.Stats, 1, out)
	n, _ := strconv.ParseFloat(v.Stats[0].CPU.UsageNanoCores.Value, 64)
	return n / 1e9
}

// vmCPUTime is libvirt's CPU time of a domain.
func vmCPUTime(t *testing.T, name string) time.Duration {
	t.Helper()
	out := virsh(t, "domstats", "--cpu-total", name)
	m := regexp.MustCompile(`cpu\.time=(\d+)`).FindStringSubmatch(out)
	require.NotNil(t, m, out)
	ns, _ := strconv.ParseInt(m[1], 10, 64)
	return time.Duration(ns)
}

// hostBusy is the host's busy CPU time (all CPUs) and its CPU count.
func hostBusy(t *testing.T) (time.Duration, int) {
	t.Helper()
	data, err := os.ReadFile("/proc/stat")
	require.NoError(t, err)
	var busy int64
	ncpu := 0
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[0] == "cpu" {
			for i, v := range f[1:] {
				n, _ := strconv.ParseInt(v, 10, 64)
				if i != 3 && i != 4 { // idle, iowait
					busy += n
				}
			}
		} else if len(f) > 0 && strings.HasPrefix(f[0], "cpu") {
			ncpu++
		}
	}
	return time.Duration(busy) * 10 * time.Millisecond, ncpu // USER_HZ = 100
}

// measureBurner samples crictl stats of a burner and the VM's CPU time
// from libvirt over d, and returns both in cores, with the cores the rest
// of the host left the VM.
func measureBurner(t *testing.T, cid, domain string, d time.Duration) (ctr, vm, avail float64) {
	t.Helper()
	statsCores(t, cid) // containerd's previous sample
	h1, ncpu := hostBusy(t)
	v1, t1 := vmCPUTime(t, domain), time.Now()
	time.Sleep(d)
	ctr = statsCores(t, cid)
	wall := float64(time.Since(t1))
	vm = float64(vmCPUTime(t, domain)-v1) / wall
	h2, _ := hostBusy(t)
	avail = float64(ncpu) - max(float64(h2-h1)/wall-vm, 0)
	t.Logf("burner: crictl stats %.3f cores; the VM's CPU time from libvirt %.3f cores; the rest of the host left it %.2f cores", ctr, vm, avail)
	return ctr, vm, avail
}

// TestVMContainers runs containers in a vm pod through containerd and
// crictl, with a busybox image: a pod with resources.limits.cpu=1, 256Mi
// and pid 64 and containers that (a) print to stdout and burn CPU under a
// 0.5-core quota, (b) allocate past a 64Mi limit, (c) fork in a loop, and
// checks (d) crictl update of the burner's quota and (e) SIGKILL and
// SIGTERM restarts of the daemon with them running.
func TestVMContainers(t *testing.T) {
	needVM(t)
	importBusybox(t)
	pod := podConfig("vm-ctrs", map[string]string{
		"resources.limits.cpu":    "1",
		"resources.limits.memory": "256Mi",
		"resources.limits.pid":    "64",
	}, nil)
	pod.LogDirectory = t.TempDir()
	podFile := writeJSON(t, pod)
	id := h.mustCrictl(t, "runp", "--runtime", "resource-vm", podFile)
	defer h.removePod(t, id)
	defer func() {
		if t.Failed() { // the guest's side of the story
			data, _ := os.ReadFile(filepath.Join(h.VMStateDir(), id, "console.log"))
			t.Logf("guest console:\n%s", data)
		}
	}()
	domain := vmDomain(t, id)

	// (a) A burner with a 0.5-core quota that prints a line.
	burner := vmContainer(t, id, podFile, "burner", "echo hello from the guest; while :; do :; done",
		&runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 50000})
	eventually(t, "the burner's line in crictl logs", func() bool {
		out, _ := h.crictl("logs", burner)
		return strings.Contains(out, "hello from the guest")
	})
	version := h.mustCrictl(t, "exec", burner, "cat", "/proc/version")
	hostRelease, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	assert.Contains(t, version, "Linux version")
	assert.NotContains(t, version, strings.TrimSpace(string(hostRelease)), "crictl exec runs in the guest's kernel")
	t.Logf("crictl exec in the guest: %s", version)
	// crictl exec -it needs a terminal of its own: script(1) gives it one.
	sock := "unix://" + filepath.Join(h.CtrdBase(), "containerd.sock")
	cmd := exec.Command("script", "-qec", fmt.Sprintf("crictl --runtime-endpoint %s exec -it %s tty", sock, burner), "/dev/null")
	cmd.Env = h.env()
	cmd.Stdin = strings.NewReader("")
	tty, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", tty)
	assert.Contains(t, string(tty), "/dev/pts/", "crictl exec -it gets a terminal in the guest")
	t.Logf("crictl exec -it: %q", tty)
	time.Sleep(2 * time.Second)
	ctr, vm, avail := measureBurner(t, burner, domain, 6*time.Second)
	assert.InDelta(t, 0.5, ctr, 0.1, "crictl stats of a burner held to 0.5 cores")
	assert.LessOrEqual(t, vm, ctr+0.35, "the VM's CPU time from libvirt exceeds the burner's only by the guest's own work")
	if avail >= 0.8 {
		assert.GreaterOrEqual(t, vm, ctr*0.8, "the VM's CPU time from libvirt covers the burner's")
	} else {
		// Under TCG the guest's clock keeps the host's pace while its vCPUs
		// wait for a host CPU, and charges that wait to what it runs: its
		// figures exceed the VM's CPU time when the host is saturated.
		t.Logf("the host left the VM %.2f cores: the VM's CPU time cannot cover the guest's figure", avail)
	}

	// (b) A memory hog past its 64Mi limit: 137, OOMKilled. (busybox tail
	// fills a 200 MiB buffer with large reads: under TCG three times as
	// fast as a pipe into tail.)
	hog := vmContainer(t, id, podFile, "hog", "tail -c 200m /dev/zero",
		&runtime.LinuxContainerResources{MemoryLimitInBytes: 64 << 20})
	deadline := time.Now().Add(5 * time.Minute)
	for {
		st, _ := inspectCtr(t, hog)
		if st.State == "CONTAINER_EXITED" {
			assert.Equal(t, 137, st.ExitCode)
			assert.Equal(t, "OOMKilled", st.Reason)
			break
		}
		require.True(t, time.Now().Before(deadline), "the hog did not exit: %+v", st)
		time.Sleep(500 * time.Millisecond)
	}
	h.mustCrictl(t, "rm", hog)

	// (c) A fork loop: stopped at the pod's pids.max (64), after which a
	// crictl exec into the burner still works.
	forker := vmContainer(t, id, podFile, "forker", "n=0; while :; do sleep 1000 & n=$((n+1)); echo forked $n; done", nil)
	deadline = time.Now().Add(5 * time.Minute)
	for {
		st, _ := inspectCtr(t, forker)
		if st.State == "CONTAINER_EXITED" {
			assert.NotZero(t, st.ExitCode)
			break
		}
		require.True(t, time.Now().Before(deadline), "the fork loop did not stop: %+v", st)
		time.Sleep(500 * time.Millisecond)
	}
	logs := h.mustCrictl(t, "logs", forker)
	ns := regexp.MustCompile(`forked (\d+)`).FindAllStringSubmatch(logs, -1)
	require.NotEmpty(t, ns, logs)
	forked, _ := strconv.Atoi(ns[len(ns)-1][1])
	t.Logf("fork loop: %d sleepers before the kernel refused (%s)", forked, lastLine(logs))
	assert.Less(t, forked, 64, "the pod's pids.max holds")
	assert.Greater(t, forked, 40, "forks are refused at the limit, not before")
	assert.Equal(t, "still works", h.mustCrictl(t, "exec", burner, "echo", "still works"))
	h.mustCrictl(t, "rm", forker)

	// (d) crictl update of the burner's quota changes its rate.
	h.mustCrictl(t, "update", "--cpu-period", "100000", "--cpu-quota", "25000", burner)
	time.Sleep(2 * time.Second)
	ctr, _, _ = measureBurner(t, burner, domain, 6*time.Second)
	assert.InDelta(t, 0.25, ctr, 0.07, "the burner after crictl update --cpu-quota 25000")

	// (e) The daemon restarts, killed and gracefully: the same containers
	// run on, not restarted, and answer; what a ticker printed while the
	// daemon was down reaches crictl logs after it.
	ticker := vmContainer(t, id, podFile, "ticker", "i=0; while :; do i=$((i+1)); echo tick $i; sleep 1; done", nil)
	ticks := func() []int {
		out, _ := h.crictl("logs", ticker)
		var n []int
		for _, m := range regexp.MustCompile(`tick (\d+)`).FindAllStringSubmatch(out, -1) {
			v, _ := strconv.Atoi(m[1])
			n = append(n, v)
		}
		return n
	}
	eventually(t, "the ticker's first lines", func() bool { return len(ticks()) >= 2 })
	st0, pid0 := inspectCtr(t, burner)
	require.Equal(t, "CONTAINER_RUNNING", st0.State)
	for _, sig := range []syscall.Signal{syscall.SIGKILL, syscall.SIGTERM} {
		t.Run(unix.SignalName(sig), func(t *testing.T) { restartWithContainers(t, sig, id, burner, ticker, st0, pid0, ticks) })
	}
	h.mustCrictl(t, "stop", "--timeout", "5", ticker)
	h.mustCrictl(t, "rm", ticker)
	h.mustCrictl(t, "stop", "--timeout", "5", burner)
	st, _ := inspectCtr(t, burner)
	assert.Equal(t, "CONTAINER_EXITED", st.State)
	h.mustCrictl(t, "rm", burner)
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// restartWithContainers restarts the vm daemon with sig: the burner and
// the ticker run on, not restarted, and what the ticker printed while the
// daemon was down reaches crictl logs.
func restartWithContainers(t *testing.T, sig syscall.Signal, id, burner, ticker string, st0 ctrStatus, pid0 int, ticks func() []int) {
	before := ticks()
	last := before[len(before)-1]
	require.NoError(t, stopDaemon(h.vm, sig))
	time.Sleep(5 * time.Second) // the ticker prints on
	require.NoError(t, h.startVM())
	eventually(t, "containerd to reach the restarted daemon", func() bool {
		out, err := h.crictl("exec", burner, "echo", "back")
		return err == nil && out == "back"
	})
	for _, c := range []string{burner, ticker} {
		st, pid := inspectCtr(t, c)
		assert.Equal(t, "CONTAINER_RUNNING", st.State, "after %v", sig)
		if c == burner {
			assert.Equal(t, st0.Started, st.Started, "not restarted after %v", sig)
			assert.Equal(t, pid0, pid, "the same process after %v", sig)
		}
	}
	ps := strings.Fields(h.mustCrictl(t, "ps", "-q", "--pod", id))
	assert.ElementsMatch(t, []string{burner, ticker}, ps, "the same containers after %v", sig)
	deadline := time.Now().Add(60 * time.Second)
	for {
		got := map[int]bool{}
		for _, n := range ticks() {
			got[n] = true
		}
		missing := 0
		for n := last; n <= last+8; n++ {
			if !got[n] {
				missing++
			}
		}
		if missing == 0 {
			break
		}
		require.True(t, time.Now().Before(deadline), "after %v: ticks %d..%d not all in crictl logs: %v", sig, last, last+8, ticks())
		time.Sleep(time.Second)
	}
}

// sandboxDirs lists the sandbox directories of a state directory (not
// its own entries, which start with a dot).
func sandboxDirs(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	var out []string
	for _, e := range ents {
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
			out = append(out, e.Name())
		}
	}
	return out
}

// TestVMRunpCancelled: a crictl runp whose client gives up while the VM
// boots (containerd cancels the StartSandbox it was making) leaves no
// domain and no sandbox directory, and the pod, if containerd still lists
// it, is removed by rmp. containerd rolls back a sandbox whose
// StartSandbox failed without asking the controller to shut it down, so
// the controller must.
func TestVMRunpCancelled(t *testing.T) {
	needVM(t)
	domains := func() map[string]bool {
		m := map[string]bool{}
		for _, n := range strings.Fields(virsh(t, "list", "--all", "--name")) {
			m[n] = true
		}
		return m
	}
	before := domains()
	dirsBefore := sandboxDirs(t, h.VMStateDir())
	// The last --timeout wins over the harness's 30 s; a TCG guest takes
	// 5-10 s to boot.
	out, err := h.crictl("--timeout", "2s", "runp", "--runtime", "resource-vm", writeJSON(t, podConfig("vm-cancelled", nil, nil)))
	require.Error(t, err, "runp did not time out: %s", out)
	t.Logf("runp: %v", err)
	var left []string
	leftover := func() bool {
		left = nil
		for n := range domains() {
			// Only this harness's daemon's: other tests share libvirtd.
			if x, err := exec.Command("virsh", "-c", "qemu:///system", "dumpxml", n).Output(); err == nil &&
				!before[n] && strings.Contains(string(x), h.VMStateDir()+"/") {
				left = append(left, "domain "+n)
			}
		}
		for _, d := range sandboxDirs(t, h.VMStateDir()) {
			if !slicesContains(dirsBefore, d) {
				left = append(left, "directory "+d)
			}
		}
		return len(left) > 0
	}
	// The start goes on in the daemon until it sees the cancellation;
	// then nothing may stay.
	deadline := time.Now().Add(2 * time.Minute)
	for leftover() && time.Now().Before(deadline) {
		time.Sleep(time.Second)
	}
	assert.Empty(t, left, "a cancelled runp left these behind")
	// What containerd still lists of it goes with rmp.
	pods, err := h.crictl("pods", "-q", "--name", "vm-cancelled")
	require.NoError(t, err)
	for _, id := range strings.Fields(pods) {
		h.mustCrictl(t, "stopp", id)
		h.mustCrictl(t, "rmp", id)
	}
}

func slicesContains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}
