package vmm

// Integration tests of the vm backend against a real libvirtd.
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
	"testing"
	"time"

	"github.com/containerd/errdefs"

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

// checkForkTest waits for the guest's fork test (rss.forktest=1) and checks
// that the kernel refused forks at the pid limit: the sleepers it forked
// and the sandbox group's other processes (acpid, the burners, the forking
// shell) stay within limit, and reach it.
func checkForkTest(t *testing.T, console string, limit int) {
	t.Helper()
	re := regexp.MustCompile(`rss: forktest forked=(\d+) pids.max=(\d+) refused=(\w+)`)
	deadline := time.Now().Add(90 * time.Second)
	for {
		data, _ := os.ReadFile(console)
		if m := re.FindStringSubmatch(string(data)); m != nil {
			forked, _ := strconv.Atoi(m[1])
			t.Logf("fork test: %d sleepers forked under pids.max=%s before the kernel refused (%s)", forked, m[2], m[3])
			if m[2] != strconv.Itoa(limit) || m[3] != "yes" || forked >= limit || forked < limit-8 {
				t.Errorf("fork test: %q; want forks refused just below pids.max=%d", m[0], limit)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no fork test result on the console:\n%s", data)
		}
		time.Sleep(500 * time.Millisecond)
	}
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

// cpuCores measures the domain's CPU use in cores over d and what the
// host had left for it: its CPUs minus what everything else used.
func cpuCores(t *testing.T, b *Backend, id string, d time.Duration) (cores, avail float64) {
	t.Helper()
	ctx := context.Background()
	h1, ncpu := hostBusy(t)
	u1, err := b.Usage(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(d)
	u2, err := b.Usage(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	h2, _ := hostBusy(t)
	if u1.CPUTimeNanos == nil || u2.CPUTimeNanos == nil || u2.CPUPercent == nil {
		t.Fatalf("no cpu time in usage: %+v %+v", u1, u2)
	}
	wall := float64(u2.Timestamp.Sub(u1.Timestamp).Nanoseconds())
	cores = float64(*u2.CPUTimeNanos-*u1.CPUTimeNanos) / wall
	others := max(float64((h2-h1).Nanoseconds())/wall-cores, 0)
	avail = float64(ncpu) - others
	t.Logf("cpu: %.3f cores (usage says %.1f%%); the rest of the host used %.2f of %d cores", cores, *u2.CPUPercent, others, ncpu)
	return cores, avail
}

// checkQuota asserts the guest is held to limit cores: never above it (10%
// slack), and close to it when the host had that much to give.
func checkQuota(t *testing.T, limit float64) func(cores, avail float64) {
	return func(cores, avail float64) {
		t.Helper()
		if cores > limit*1.1 {
			t.Errorf("guest used %.2f cores, above its limit of %.2f", cores, limit)
		}
		if want := min(limit, avail); cores < want*0.8 {
			t.Errorf("guest used %.2f cores; limit %.2f, host had %.2f free", cores, limit, avail)
		}
	}
}

func qemuRSSKiB(pid uint32) int64 {
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

// TestVMSandbox boots a CPU-burning sandbox with CPU, memory, disk, pid and
// network limits and checks them through virsh and tc, holds it to its
// quota, updates it live, restarts the backend and recovers it, and
// finally destroys it behind the backend's back.
func TestVMSandbox(t *testing.T) {
	cfg, opts := vmTestConfig(t)
	cfg.Cmdline = DefaultCmdline + " rss.burn=2 rss.forktest=1"
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
	if err := b.Create(ctx, id, dir, info); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Delete(context.Background(), id) })
	name := DomainName(cfg.NamePrefix, id)
	if err := b.Create(ctx, id, dir, info); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("second Create: %v, want already exists", err)
	}

	exit1 := newExitRecorder()
	t0 := time.Now()
	pid, err := b.Start(ctx, id, exit1.fn)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("boot to READY: %s, qemu pid %d", time.Since(t0).Round(time.Millisecond), pid)
	if pid == 0 {
		t.Error("no qemu pid")
	}

	// The definition and the live values.
	x := virsh(t, "dumpxml", name)
	mustContain(t, "dumpxml", x,
		"<global_period>100000</global_period>", "<global_quota>150000</global_quota>",
		"<shares>1024</shares>",
		"<read_bytes_sec>10485760</read_bytes_sec>", "<write_bytes_sec>5242880</write_bytes_sec>",
		"<read_iops_sec>1000</read_iops_sec>", "<write_iops_sec>500</write_iops_sec>",
		"rss.pids=100", "<currentMemory unit='KiB'>327680</currentMemory>", "<vcpu placement='static'>2</vcpu>",
		MetadataNamespace)
	s := virsh(t, "schedinfo", name)
	if q := field(t, s, "global_quota"); q != "150000" {
		t.Errorf("schedinfo global_quota %s", q)
	}
	if v := field(t, s, "cpu_shares"); v != "1024" {
		t.Errorf("schedinfo cpu_shares %s", v)
	}
	m := virsh(t, "memtune", name)
	if v := field(t, m, "hard_limit"); v != strconv.Itoa((320+256)*1024) {
		t.Errorf("memtune hard_limit %s", v)
	}
	if v := field(t, m, "soft_limit"); v != strconv.Itoa(192*1024) {
		t.Errorf("memtune soft_limit %s", v)
	}
	io := virsh(t, "blkdeviotune", name, DiskDev)
	if v := field(t, io, "read_bytes_sec"); v != "10485760" {
		t.Errorf("blkdeviotune read_bytes_sec %s", v)
	}
	if v := field(t, io, "write_iops_sec"); v != "500" {
		t.Errorf("blkdeviotune write_iops_sec %s", v)
	}
	if out, _ := exec.Command("qemu-img", "info", "-U", filepath.Join(dir, DiskFile)).CombinedOutput(); !strings.Contains(string(out), "128 MiB") {
		t.Errorf("overlay disk size: %s", out)
	}
	console, _ := os.ReadFile(filepath.Join(dir, ConsoleFile))
	mustContain(t, "console", string(console), "pids.max=100", "burn=2", "READY")
	checkForkTest(t, filepath.Join(dir, ConsoleFile), 100)

	u, err := b.Usage(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
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
	t.Logf("qemu RSS with a 320 MiB burning guest: %d KiB", qemuRSSKiB(pid))

	// The burner wants 2 cores; the quota holds it to 1.5 (or to what the
	// host has free, when other work competes).
	time.Sleep(2 * time.Second)
	checkQuota(t, 1.5)(cpuCores(t, b, id, 4*time.Second))

	// Live update: 0.5 cores, 192 MiB.
	info2 := info
	info2.Resources.CPULimit = p(0.5)
	info2.Resources.CPUQuota = p(int64(50000))
	info2.Resources.MemoryLimit = p(int64(192 * mib))
	if err := b.Update(ctx, id, info2); err != nil {
		t.Fatal(err)
	}
	if q := field(t, virsh(t, "schedinfo", name), "global_quota"); q != "50000" {
		t.Errorf("after update: global_quota %s", q)
	}
	if v := field(t, virsh(t, "memtune", name), "hard_limit"); v != strconv.Itoa((256+256)*1024) {
		t.Errorf("after update: hard_limit %s", v)
	}
	// The guest's balloon driver inflates in steps: give it time.
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(250 * time.Millisecond) {
		v := field(t, virsh(t, "dominfo", name), "Used memory")
		if v == strconv.Itoa(256*1024) {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("after update: balloon at %s KiB, want %d", v, 256*1024)
			break
		}
	}
	mustContain(t, "inactive xml after update", virsh(t, "dumpxml", "--inactive", name), "<global_quota>50000</global_quota>")
	time.Sleep(time.Second)
	checkQuota(t, 0.5)(cpuCores(t, b, id, 4*time.Second))
	// More than the maximum fails and changes nothing.
	info3 := info2
	info3.Resources.MemoryLimit = p(int64(4 << 30))
	if err := b.Update(ctx, id, info3); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("update beyond max memory: %v", err)
	}

	// Restart the backend: the new one recovers the running domain.
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	// A long poll interval: the exit below must come from the lifecycle
	// events, not from the safety-net poll.
	opts2 := opts
	opts2.PollInterval = 5 * time.Minute
	b2 := newTestBackend(t, cfg, opts2)
	t.Cleanup(func() { _ = b2.Close() })
	t.Cleanup(func() { _ = b2.Delete(context.Background(), id) })
	exit2 := newExitRecorder()
	alive, err := b2.Recover(ctx, id, dir, info2, true, exit2.fn)
	if err != nil || !alive {
		t.Fatalf("Recover: alive=%v err=%v", alive, err)
	}
	if _, err := b2.Usage(ctx, id); err != nil {
		t.Errorf("usage after recover: %v", err)
	}

	// virsh destroy behind the backend's back fires exited once.
	virsh(t, "destroy", name)
	select {
	case code := <-exit2.ch:
		if code != ExitDestroyed {
			t.Errorf("exit code %d, want %d", code, ExitDestroyed)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("exited not called within 10s of virsh destroy")
	}
	time.Sleep(2 * time.Second)
	if n := exit2.count(); n != 1 {
		t.Errorf("exited called %d times", n)
	}
	if n := exit1.count(); n != 0 {
		t.Errorf("the closed backend's exited was called %d times", n)
	}

	if err := b2.Delete(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, DiskFile)); !os.IsNotExist(err) {
		t.Errorf("disk left after Delete: %v", err)
	}
	if out, err := exec.Command("virsh", "-c", "qemu:///system", "dominfo", name).CombinedOutput(); err == nil {
		t.Errorf("domain left after Delete:\n%s", out)
	}
	if err := b2.Delete(ctx, id); err != nil {
		t.Errorf("second Delete: %v", err)
	}
}

// TestVMStopAndCleanup checks the graceful ACPI stop (no exit reported),
// an idle guest's footprint, a boot timeout, and Cleanup of unknown
// domains.
func TestVMStopAndCleanup(t *testing.T) {
	cfg, opts := vmTestConfig(t)
	ctx := context.Background()
	b := newTestBackend(t, cfg, opts)
	t.Cleanup(func() { _ = b.Close() })

	id, dir := "vmtest-stop", t.TempDir()
	info := resourceinfo.Compute(resourceinfo.Spec{Annotations: resourceinfo.Resources{
		CPULimit: p(1.0), MemoryLimit: p(int64(128 * mib)),
	}}, nil)
	if err := b.Create(ctx, id, dir, info); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Delete(context.Background(), id) })
	exits := newExitRecorder()
	t0 := time.Now()
	pid, err := b.Start(ctx, id, exits.fn)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("boot to READY: %s", time.Since(t0).Round(time.Millisecond))
	time.Sleep(3 * time.Second)
	t.Logf("idle guest (192 MiB): qemu RSS %d KiB", qemuRSSKiB(pid))
	u, err := b.Usage(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if u.MemoryActual == nil || *u.MemoryActual != 192*mib {
		t.Errorf("memory_actual %v", deref(u.MemoryActual))
	}

	// A shutdown the backend did not ask for (the guest powers off after
	// an ACPI press from outside) is reported with code 0.
	virsh(t, "shutdown", DomainName(cfg.NamePrefix, id))
	select {
	case code := <-exits.ch:
		if code != ExitShutdown {
			t.Errorf("exit code %d after a guest poweroff, want %d", code, ExitShutdown)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("exited not called after the guest powered off")
	}

	// Start again, then Stop: graceful, and no exit reported.
	exits = newExitRecorder()
	if _, err := b.Start(ctx, id, exits.fn); err != nil {
		t.Fatal(err)
	}
	t0 = time.Now()
	if err := b.Stop(ctx, id, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("ACPI stop: %s", time.Since(t0).Round(time.Millisecond))
	console, _ := os.ReadFile(filepath.Join(dir, ConsoleFile))
	mustContain(t, "console", string(console), "acpi power button")
	if err := b.Stop(ctx, id, time.Second); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	time.Sleep(2 * time.Second)
	if n := exits.count(); n != 0 {
		t.Errorf("exited called %d times after Stop", n)
	}

	// A guest that is not ready in time is destroyed and the error shows
	// the console.
	short := opts
	short.ReadyTimeout = 300 * time.Millisecond
	bs := newTestBackend(t, cfg, short)
	t.Cleanup(func() { _ = bs.Close() })
	id2, dir2 := "vmtest-timeout", t.TempDir()
	if err := bs.Create(ctx, id2, dir2, info); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = bs.Delete(context.Background(), id2) })
	_, err = bs.Start(ctx, id2, nil)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "console") {
		t.Errorf("Start with a short timeout: %v", err)
	}
	if st := virsh(t, "domstate", DomainName(cfg.NamePrefix, id2)); !strings.Contains(st, "shut off") {
		t.Errorf("domain after timeout: %s", st)
	}

	// Cleanup removes our domains whose sandbox is unknown, nothing else.
	removed, err := b.Cleanup(ctx, map[string]bool{id: true})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, r := range removed {
		if r == id {
			t.Errorf("Cleanup removed the known sandbox")
		}
		found = found || r == id2
	}
	if !found {
		t.Errorf("Cleanup removed %q, want %s among them", removed, id2)
	}
	if _, err := os.Stat(filepath.Join(dir2, DiskFile)); !os.IsNotExist(err) {
		t.Errorf("Cleanup left the disk: %v", err)
	}
	virsh(t, "dominfo", DomainName(cfg.NamePrefix, id))
}
