package vmm

// Integration tests of the vm backend against a real libvirtd, with real
// containers in the guest (its agent, runc and the busybox rootfs of
// scripts/build-busybox-image.sh).
//
// They run only when RSS_VM_TESTS is set (to anything), after
//
//	scripts/setup-libvirt.sh
//	scripts/build-guest.sh /var/lib/rss/guest
//
// with RSS_GUEST_DIR naming the guest directory, as root:
//
//	RSS_VM_TESTS=1 RSS_GUEST_DIR=/var/lib/rss/guest go test ./vmm -run VM -v -timeout 15m

import (
	"context"
	"errors"
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

	"github.com/containerd/containerd/api/types"
	ctrmeta "github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

func vmTestConfig(t *testing.T) (Config, Options) {
	t.Helper()
	if os.Getenv("RSS_VM_TESTS") == "" {
		t.Skip("set RSS_VM_TESTS=1 and RSS_GUEST_DIR (after scripts/setup-libvirt.sh and scripts/build-guest.sh) to run the vm backend integration tests")
	}
	dir := os.Getenv("RSS_GUEST_DIR")
	if dir == "" {
		t.Fatal("RSS_VM_TESTS is set but RSS_GUEST_DIR is not")
	}
	needRoot(t)
	return Config{GuestDir: dir, NamePrefix: "rss-test-"}, Options{ReadyTimeout: 90 * time.Second, PollInterval: time.Second}
}

func newTestBackend(t *testing.T, cfg Config, opts Options) *Backend {
	t.Helper()
	b, err := New(context.Background(), cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func virsh(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("virsh", append([]string{"-c", "qemu:///system"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("virsh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// field returns the value of "name : value" in virsh output.
func field(t *testing.T, out, name string) string {
	t.Helper()
	re := regexp.MustCompile(`(?m)^\s*` + regexp.QuoteMeta(name) + `\s*:\s*(\S+)`)
	m := re.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no %q in:\n%s", name, out)
	}
	return m[1]
}

func mustContain(t *testing.T, what, s string, subs ...string) {
	t.Helper()
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			t.Errorf("%s: missing %q in:\n%s", what, sub, s)
		}
	}
}

type exitRecorder struct {
	mu    sync.Mutex
	calls []uint32
	ch    chan uint32
}

func newExitRecorder() *exitRecorder { return &exitRecorder{ch: make(chan uint32, 4)} }

func (e *exitRecorder) fn(code uint32, at time.Time) {
	e.mu.Lock()
	e.calls = append(e.calls, code)
	e.mu.Unlock()
	e.ch <- code
}

func (e *exitRecorder) count() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.calls)
}

// hostBusy returns the host's busy CPU time (all CPUs) and its CPU count
// from /proc/stat.
func hostBusy(t *testing.T) (time.Duration, int) {
	t.Helper()
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		t.Fatal(err)
	}
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

// cpuCores measures, over d, the domain's CPU use in cores (libvirt's CPU
// time of the VM), what the host had left for it (its CPUs minus what
// everything else used), and the container's own use in the guest (its
// cgroup's CPU time; -1 without a container).
func cpuCores(t *testing.T, b *Backend, id, cid string, d time.Duration) (vm, avail, ctr float64) {
	t.Helper()
	ctx := context.Background()
	h1, ncpu := hostBusy(t)
	u1, err := b.Usage(ctx, id)
	require.NoError(t, err)
	time.Sleep(d)
	u2, err := b.Usage(ctx, id)
	require.NoError(t, err)
	h2, _ := hostBusy(t)
	require.NotNil(t, u1.CPUTimeNanos)
	require.NotNil(t, u2.CPUTimeNanos)
	wall := float64(u2.Timestamp.Sub(u1.Timestamp).Nanoseconds())
	vm = float64(*u2.CPUTimeNanos-*u1.CPUTimeNanos) / wall
	others := max(float64((h2-h1).Nanoseconds())/wall-vm, 0)
	avail = float64(ncpu) - others
	ctr = -1
	if cid != "" {
		c1, ok1 := u1.Containers[cid]
		c2, ok2 := u2.Containers[cid]
		if ok1 && ok2 && c1.CPUTimeNanos != nil && c2.CPUTimeNanos != nil {
			ctr = float64(*c2.CPUTimeNanos-*c1.CPUTimeNanos) / float64(c2.Timestamp.Sub(c1.Timestamp).Nanoseconds())
		}
	}
	t.Logf("cpu: VM %.3f cores, container %s %.3f cores in the guest; the rest of the host used %.2f of %d cores", vm, cid, ctr, others, ncpu)
	return vm, avail, ctr
}

// checkQuota asserts a use of cores held to limit: never above it (10%
// slack), and close to it when the host had that much to give.
func checkQuota(t *testing.T, what string, limit, cores, avail float64) {
	t.Helper()
	if cores > limit*1.1 {
		t.Errorf("%s used %.2f cores, above its limit of %.2f", what, cores, limit)
	}
	if want := min(limit, avail); cores < want*0.8 {
		t.Errorf("%s used %.2f cores; limit %.2f, host had %.2f free", what, cores, limit, avail)
	}
}

func rssKiB(pid int) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			return v
		}
	}
	return -1
}

// virtiofsdPids are the virtiofsd processes serving dir/shared.
func virtiofsdPids(dir string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if strings.Contains(string(cmd), "virtiofsd") && strings.Contains(string(cmd), "source="+filepath.Join(dir, "shared")) {
			pids = append(pids, pid)
		}
	}
	return pids
}

var (
	busyboxOnce sync.Once
	busyboxDir  string
	busyboxErr  error
)

// busyboxRootfs is a busybox root filesystem (scripts/build-busybox-image.sh),
// built once per test binary.
func busyboxRootfs(t *testing.T) string {
	t.Helper()
	busyboxOnce.Do(func() {
		dir, err := os.MkdirTemp("", "rss-vmm-busybox-")
		if err != nil {
			busyboxErr = err
			return
		}
		busyboxDir = filepath.Join(dir, "rootfs")
		out, err := exec.Command("../scripts/build-busybox-image.sh", "--no-tar", "--rootfs", busyboxDir).CombinedOutput()
		if err != nil {
			busyboxErr = fmt.Errorf("build-busybox-image.sh: %v\n%s", err, out)
		}
	})
	require.NoError(t, busyboxErr)
	return busyboxDir
}

// vmPod is a started sandbox of a real backend and its containers.
type vmPod struct {
	t    *testing.T
	b    *Backend
	id   string
	dir  string
	ctrs backend.Containers
	ev   *recEvents
}

type vmCtr struct {
	p        backend.Process
	out, err *fifoReader
	bundle   string
	private  []byte
	io       backend.IO
}

// container creates and starts container cid running args, as containerd
// would: an overlay of the busybox rootfs (containerd's snapshot mounts),
// the spec of containerd's defaults with the pod's IPC and UTS namespaces
// and a bind of a hosts file, FIFOs for its output.
func (v *vmPod) container(cid string, args []string, opts ...oci.SpecOpts) *vmCtr {
	t := v.t
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	lower := busyboxRootfs(t)
	bdir := t.TempDir()
	for _, d := range []string{"rootfs", "upper", "work"} {
		require.NoError(t, os.Mkdir(filepath.Join(bdir, d), 0o755))
	}
	hosts := filepath.Join(bdir, "hosts")
	require.NoError(t, os.WriteFile(hosts, []byte("127.0.0.1 localhost "+cid+"\n"), 0o644))
	opts = append([]oci.SpecOpts{
		oci.WithProcessArgs(args...), oci.WithHostname("pod-" + v.id), oci.WithEnv([]string{"PATH=/bin:/usr/bin:/sbin"}),
		oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.IPCNamespace, Path: "/proc/1/ns/ipc"}),
		oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.UTSNamespace, Path: "/proc/1/ns/uts"}),
		oci.WithMounts([]specs.Mount{{Destination: "/etc/hosts", Type: "bind", Source: hosts, Options: []string{"rbind", "ro"}}}),
	}, opts...)
	spec, err := oci.GenerateSpec(ctx, nil, &ctrmeta.Container{ID: cid}, opts...)
	require.NoError(t, err)
	c := &vmCtr{p: backend.Process{Namespace: "k8s.io", SandboxID: v.id, ContainerID: cid}, bundle: bdir}
	iodir := t.TempDir()
	c.out, c.err = readFIFO(t, iodir, "stdout"), readFIFO(t, iodir, "stderr")
	c.io = backend.IO{Stdout: c.out.path, Stderr: c.err.path}
	created, err := v.ctrs.Create(ctx, &backend.Container{Process: c.p, Bundle: bdir, Spec: spec, IO: c.io,
		Rootfs: []*types.Mount{{Type: "overlay", Source: "overlay", Options: []string{
			"lowerdir=" + lower, "upperdir=" + filepath.Join(bdir, "upper"), "workdir=" + filepath.Join(bdir, "work")}}}})
	require.NoError(t, err)
	c.private = created.Private
	_, err = v.ctrs.Start(ctx, c.p)
	require.NoError(t, err)
	return c
}

// exec runs args in container c and returns its output and exit status.
func (v *vmPod) exec(c *vmCtr, execID string, args ...string) (string, uint32) {
	t := v.t
	t.Helper()
	ctx := context.Background()
	p := c.p
	p.ExecID = execID
	iodir := t.TempDir()
	out := readFIFO(t, iodir, "stdout")
	require.NoError(t, v.ctrs.Exec(ctx, p, &specs.Process{Args: args, Cwd: "/", Env: []string{"PATH=/bin:/usr/bin"}}, backend.IO{Stdout: out.path}))
	_, err := v.ctrs.Start(ctx, p)
	require.NoError(t, err)
	status := v.ev.waitExit(t, p)
	out.waitEOF(t)
	require.NoError(t, v.ctrs.Delete(ctx, p))
	return out.String(), status
}

// TestVMSandbox runs a pod with CPU, memory, disk, pid and network limits
// and several containers: it checks the limits through virsh and tc, runs
// an exec in the guest's kernel, holds a burner to its quota and to a new
// one after a live update, kills a memory hog at its limit with an OOM
// event, stops a fork loop at the pod's pids.max, restarts the backend
// with the containers running, and finally destroys the VM behind the
// backend's back.
func TestVMSandbox(t *testing.T) {
	cfg, opts := vmTestConfig(t)
	ctx := context.Background()
	b := newTestBackend(t, cfg, opts)
	t.Cleanup(func() { _ = b.Close() })
	t.Logf("domain type %q", b.DomainType())

	id, dir := "vmtest-limits", t.TempDir()
	info := resourceinfo.Compute(resourceinfo.Spec{Annotations: resourceinfo.Resources{
		CPULimit:         p(1.5),
		CPURequest:       p(1.0),
		MemoryLimit:      p(int64(256 * mib)),
		MemoryRequest:    p(int64(128 * mib)),
		PidLimit:         p(int64(100)),
		DiskReadBps:      p(int64(10 * mib)),
		DiskWriteBps:     p(int64(5 * mib)),
		DiskReadIOPS:     p(int64(1000)),
		DiskWriteIOPS:    p(int64(500)),
		StorageLimit:     p(int64(128 * mib)),
		NetworkBandwidth: p(int64(10_000_000)),
	}}, nil)
	require.NoError(t, b.Create(ctx, id, dir, info, backend.Pod{}))
	t.Cleanup(func() { _ = b.Delete(context.Background(), id) })
	name := DomainName(cfg.NamePrefix, id)
	err := b.Create(ctx, id, dir, info, backend.Pod{})
	assert.True(t, errors.Is(err, errdefs.ErrAlreadyExists), "second Create: %v", err)

	ev := newRecEvents()
	pod := &vmPod{t: t, b: b, id: id, dir: dir, ctrs: b.Containers(ev), ev: ev}
	exit1 := newExitRecorder()
	t0 := time.Now()
	qemuPid, err := b.Start(ctx, id, exit1.fn)
	require.NoError(t, err)
	t.Logf("boot to a set-up guest: %s, qemu pid %d", time.Since(t0).Round(time.Millisecond), qemuPid)
	assert.NotZero(t, qemuPid)

	// The definition and the live values.
	x := virsh(t, "dumpxml", name)
	mustContain(t, "dumpxml", x,
		"<global_period>100000</global_period>", "<global_quota>150000</global_quota>",
		"<shares>1024</shares>",
		"<read_bytes_sec>10485760</read_bytes_sec>", "<write_bytes_sec>5242880</write_bytes_sec>",
		"<read_iops_sec>1000</read_iops_sec>", "<write_iops_sec>500</write_iops_sec>",
		"<currentMemory unit='KiB'>327680</currentMemory>", "<vcpu placement='static'>2</vcpu>",
		"<source type='memfd'/>", "<access mode='shared'/>", "<driver type='virtiofs' queue='1024'/>",
		"<target dir='"+DefaultSharedTag+"'/>", "name='"+DefaultAgentPort+"'", MetadataNamespace)
	assert.NotContains(t, x, "rss.pids", "the pid limit is the guest's pod cgroup's, not the kernel command line's")
	s := virsh(t, "schedinfo", name)
	assert.Equal(t, "150000", field(t, s, "global_quota"))
	assert.Equal(t, "1024", field(t, s, "cpu_shares"))
	m := virsh(t, "memtune", name)
	own := b.Config().qemuOwn() / kib
	assert.Equal(t, strconv.FormatInt(320*1024+own, 10), field(t, m, "hard_limit"))
	assert.Equal(t, strconv.Itoa(192*1024), field(t, m, "soft_limit"))
	io := virsh(t, "blkdeviotune", name, DiskDev)
	assert.Equal(t, "10485760", field(t, io, "read_bytes_sec"))
	assert.Equal(t, "500", field(t, io, "write_iops_sec"))
	if out, _ := exec.Command("qemu-img", "info", "-U", filepath.Join(dir, DiskFile)).CombinedOutput(); !strings.Contains(string(out), "128 MiB") {
		t.Errorf("overlay disk size: %s", out)
	}
	vfs := virtiofsdPids(dir)
	assert.NotEmpty(t, vfs, "libvirt runs a virtiofsd for the shared directory")
	u, err := b.Usage(ctx, id)
	require.NoError(t, err)
	if len(u.Unenforced) == 0 {
		tap := TapName(id)
		tc, _ := exec.Command("tc", "qdisc", "show", "dev", tap).CombinedOutput()
		mustContain(t, "tc on "+tap, string(tc), "tbf", "rate 10Mbit", "ingress")
		tc, _ = exec.Command("tc", "qdisc", "show", "dev", IFBName(id)).CombinedOutput()
		mustContain(t, "tc on ifb", string(tc), "tbf", "rate 10Mbit")
	} else {
		t.Logf("unenforced: %q", u.Unenforced)
		for _, n := range u.Unenforced {
			if !strings.HasPrefix(n, "network_") || !strings.Contains(n, "unenforced: ") {
				t.Errorf("unexpected unenforced note %q", n)
			}
		}
	}

	// A burner with a quota of its own (0.5 cores) that wants two.
	burner := pod.container("burner", []string{"sh", "-c", "echo burning; while :; do :; done & while :; do :; done"}, oci.WithCPUCFS(50000, 100000))
	burner.out.waitFor(t, "burning\n")
	out, status := pod.exec(burner, "version", "cat", "/proc/version")
	assert.Equal(t, uint32(0), status)
	host, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	assert.Contains(t, out, "Linux version ")
	assert.NotContains(t, out, strings.TrimSpace(string(host)), "the exec runs in the guest's kernel, not the host's")
	t.Logf("exec in the guest: %s", strings.TrimSpace(out))
	time.Sleep(time.Second)
	_, avail, ctr := cpuCores(t, b, id, "burner", 5*time.Second)
	checkQuota(t, "the burner (guest cgroup)", 0.5, ctr, avail)

	// A live update of the container: 0.25 cores.
	require.NoError(t, pod.ctrs.Update(ctx, burner.p, &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: p(int64(25000)), Period: p(uint64(100000))}}))
	time.Sleep(time.Second)
	_, avail, ctr = cpuCores(t, b, id, "burner", 5*time.Second)
	checkQuota(t, "the burner after its update", 0.25, ctr, avail)

	// A memory hog of 64 MiB: killed by the kernel, reported as an OOM
	// kill with status 137.
	hog := pod.container("hog", []string{"sh", "-c", "tail -c 200m /dev/zero"}, oci.WithMemoryLimit(64*mib))
	assert.Equal(t, uint32(137), ev.waitExit(t, hog.p), "the hog's exit status")
	require.Eventually(t, func() bool { ev.mu.Lock(); defer ev.mu.Unlock(); return ev.ooms[procKey(hog.p)] > 0 }, 30*time.Second, 100*time.Millisecond,
		"an OOM event for the hog")
	require.NoError(t, pod.ctrs.Delete(ctx, hog.p))

	// A fork loop: stopped at the pod's pids.max (100), while the rest
	// of the pod stays usable once it is gone.
	forker := pod.container("forker", []string{"sh", "-c", "n=0; while :; do sleep 1000 & n=$((n+1)); echo $n; done"})
	st := ev.waitExit(t, forker.p)
	forker.out.waitEOF(t)
	lines := strings.Fields(forker.out.String())
	require.NotEmpty(t, lines)
	forked, _ := strconv.Atoi(lines[len(lines)-1])
	t.Logf("fork loop: %d sleepers before the kernel refused (status %d): %s", forked, st, strings.TrimSpace(forker.err.String()))
	assert.Less(t, forked, 100, "the pod cgroup's pids.max holds")
	assert.Greater(t, forked, 80, "forks are refused at the limit, not before")
	assert.NotZero(t, st)
	require.NoError(t, pod.ctrs.Delete(ctx, forker.p))
	out, status = pod.exec(burner, "after-forks", "echo", "still here")
	assert.Equal(t, "still here\n", out)
	assert.Equal(t, uint32(0), status)

	// Live update of the pod: 0.5 cores, 192 MiB: the domain and the
	// guest's pod cgroup together.
	info2 := info
	info2.Resources.CPULimit = p(0.5)
	info2.Resources.CPUQuota = p(int64(50000))
	info2.Resources.MemoryLimit = p(int64(192 * mib))
	require.NoError(t, b.Update(ctx, id, info2))
	assert.Equal(t, "50000", field(t, virsh(t, "schedinfo", name), "global_quota"))
	assert.Equal(t, strconv.FormatInt(256*1024+own, 10), field(t, virsh(t, "memtune", name), "hard_limit"))
	mustContain(t, "inactive xml after update", virsh(t, "dumpxml", "--inactive", name), "<global_quota>50000</global_quota>")
	// More than the maximum fails and changes nothing.
	info3 := info2
	info3.Resources.MemoryLimit = p(int64(4 << 30))
	err = b.Update(ctx, id, info3)
	assert.True(t, errors.Is(err, errdefs.ErrFailedPrecondition), "update beyond max memory: %v", err)
	// The burner's own 0.25 stays below the pod's 0.5.
	require.NoError(t, pod.ctrs.Update(ctx, burner.p, &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: p(int64(100000)), Period: p(uint64(100000))}}))
	time.Sleep(time.Second)
	vm, avail, ctr := cpuCores(t, b, id, "burner", 5*time.Second)
	checkQuota(t, "the burner under the pod's 0.5 cores", 0.5, ctr, avail)
	if vm > 0.5*1.1+0.2 {
		t.Errorf("the VM used %.2f cores under a 0.5-core pod", vm)
	}

	// Restart the backend: the new one recovers the running domain and
	// its containers; the burner runs on.
	require.NoError(t, b.Close())
	opts2 := opts
	opts2.PollInterval = 5 * time.Minute // the exit below must come from the lifecycle events
	b2 := newTestBackend(t, cfg, opts2)
	t.Cleanup(func() { _ = b2.Close() })
	t.Cleanup(func() { _ = b2.Delete(context.Background(), id) })
	exit2 := newExitRecorder()
	alive, err := b2.Recover(ctx, id, dir, info2, true, exit2.fn)
	require.NoError(t, err)
	require.True(t, alive)
	ev2 := newRecEvents()
	pod2 := &vmPod{t: t, b: b2, id: id, dir: dir, ctrs: b2.Containers(ev2), ev: ev2}
	require.NoError(t, pod2.ctrs.Recover(ctx, &backend.Container{Process: burner.p, Bundle: burner.bundle, IO: burner.io,
		Private: burner.private, Status: backend.StatusRunning}))
	pids, err := pod2.ctrs.Pids(ctx, burner.p)
	require.NoError(t, err)
	assert.NotEmpty(t, pids, "the burner runs on")
	out, status = pod2.exec(burner, "after-restart", "echo", "reattached")
	assert.Equal(t, "reattached\n", out)
	assert.Zero(t, status)
	assert.False(t, burner.out.ended(), "the burner's output stayed open across the restart")

	// Its stop ends its output.
	require.NoError(t, pod2.ctrs.Signal(ctx, burner.p, syscall.SIGKILL, false))
	assert.Equal(t, uint32(137), ev2.waitExit(t, burner.p))
	burner.out.waitEOF(t)
	require.NoError(t, pod2.ctrs.Delete(ctx, burner.p))

	// virsh destroy behind the backend's back fires exited once.
	virsh(t, "destroy", name)
	select {
	case code := <-exit2.ch:
		assert.Equal(t, ExitDestroyed, code)
	case <-time.After(10 * time.Second):
		t.Fatal("exited not called within 10s of virsh destroy")
	}
	time.Sleep(2 * time.Second)
	assert.Equal(t, 1, exit2.count())
	assert.Zero(t, exit1.count(), "the closed backend's exited was called")

	require.NoError(t, b2.Delete(ctx, id))
	_, err = os.Stat(filepath.Join(dir, DiskFile))
	assert.True(t, os.IsNotExist(err), "disk left after Delete: %v", err)
	if out, err := exec.Command("virsh", "-c", "qemu:///system", "dominfo", name).CombinedOutput(); err == nil {
		t.Errorf("domain left after Delete:\n%s", out)
	}
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	require.NoError(t, err)
	assert.Empty(t, ms, "mounts left after Delete")
	assert.Empty(t, virtiofsdPids(dir), "virtiofsd left after Delete")
	assert.Empty(t, findKeepers(func(k string) bool { return strings.HasPrefix(k, id+"/") }), "stdio keepers left")
	require.NoError(t, b2.Delete(ctx, id), "second Delete")
}

// TestVMStopAndCleanup checks the graceful stop through the agent (no
// exit reported), an idle guest's footprint, a boot timeout, and Cleanup
// of unknown domains.
func TestVMStopAndCleanup(t *testing.T) {
	cfg, opts := vmTestConfig(t)
	ctx := context.Background()
	b := newTestBackend(t, cfg, opts)
	t.Cleanup(func() { _ = b.Close() })
	ev := newRecEvents()
	ctrs := b.Containers(ev)

	id, dir := "vmtest-stop", t.TempDir()
	info := resourceinfo.Compute(resourceinfo.Spec{Annotations: resourceinfo.Resources{
		CPULimit: p(1.0), MemoryLimit: p(int64(128 * mib)),
	}}, nil)
	require.NoError(t, b.Create(ctx, id, dir, info, backend.Pod{}))
	t.Cleanup(func() { _ = b.Delete(context.Background(), id) })
	exits := newExitRecorder()
	t0 := time.Now()
	pid, err := b.Start(ctx, id, exits.fn)
	require.NoError(t, err)
	t.Logf("boot to a set-up guest: %s", time.Since(t0).Round(time.Millisecond))
	pod := &vmPod{t: t, b: b, id: id, dir: dir, ctrs: ctrs, ev: ev}
	sleeper := pod.container("sleeper", []string{"sleep", "1000"})
	time.Sleep(3 * time.Second)
	vfsRSS := int64(0)
	for _, p := range virtiofsdPids(dir) {
		vfsRSS += rssKiB(p)
	}
	t.Logf("idle guest (192 MiB) with one container: qemu RSS %d KiB, virtiofsd RSS %d KiB", rssKiB(int(pid)), vfsRSS)
	u, err := b.Usage(ctx, id)
	require.NoError(t, err)
	if assert.NotNil(t, u.MemoryActual) {
		assert.Equal(t, uint64(192*mib), *u.MemoryActual)
	}
	assert.Contains(t, u.Containers, "sleeper")

	// A graceful Stop: the agent stops the containers and powers off; no
	// sandbox exit is reported.
	t0 = time.Now()
	require.NoError(t, b.Stop(ctx, id, 30*time.Second))
	t.Logf("graceful stop: %s", time.Since(t0).Round(time.Millisecond))
	assert.True(t, sleeper.out.ended() || func() bool { sleeper.out.waitEOF(t); return true }(), "output ends with the VM")
	require.NoError(t, b.Stop(ctx, id, time.Second), "second Stop")
	time.Sleep(2 * time.Second)
	assert.Zero(t, exits.count(), "exited called after Stop")
	require.NoError(t, ctrs.Delete(ctx, sleeper.p))

	// A shutdown the backend did not ask for (an ACPI press from outside:
	// the guest stops its containers and powers off) is reported with 0.
	exits = newExitRecorder()
	_, err = b.Start(ctx, id, exits.fn)
	require.NoError(t, err)
	virsh(t, "shutdown", DomainName(cfg.NamePrefix, id))
	select {
	case code := <-exits.ch:
		assert.Equal(t, ExitShutdown, code, "exit code after a guest poweroff")
	case <-time.After(60 * time.Second):
		t.Fatal("exited not called after the guest powered off")
	}

	// A guest that is not ready in time is destroyed and the error shows
	// the console.
	short := opts
	short.ReadyTimeout = 300 * time.Millisecond
	bs := newTestBackend(t, cfg, short)
	t.Cleanup(func() { _ = bs.Close() })
	id2, dir2 := "vmtest-timeout", t.TempDir()
	require.NoError(t, bs.Create(ctx, id2, dir2, info, backend.Pod{}))
	t.Cleanup(func() { _ = bs.Delete(context.Background(), id2) })
	_, err = bs.Start(ctx, id2, nil)
	assert.True(t, errors.Is(err, context.DeadlineExceeded) && strings.Contains(err.Error(), "console"), "Start with a short timeout: %v", err)
	assert.Contains(t, virsh(t, "domstate", DomainName(cfg.NamePrefix, id2)), "shut off")

	// Cleanup removes our domains whose sandbox is unknown, nothing else.
	removed, err := b.Cleanup(ctx, map[string]bool{id: true})
	require.NoError(t, err)
	assert.NotContains(t, removed, id)
	assert.Contains(t, removed, id2)
	_, err = os.Stat(filepath.Join(dir2, DiskFile))
	assert.True(t, os.IsNotExist(err), "Cleanup left the disk: %v", err)
	virsh(t, "dominfo", DomainName(cfg.NamePrefix, id))
}
