package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// runcShim makes containerd's own runc handler ("runc", the harness's
// default runtime) work: containerd-shim-runc-v2 built from the same
// containerd module as the sandboxer, next to the sandboxer's shim on
// containerd's PATH, and Debian's runc.
func runcShim(b *testing.B) {
	b.Helper()
	if _, err := exec.LookPath("runc"); err != nil {
		b.Fatal("runc not installed: apt-get install -y --no-install-recommends runc (make bench does)")
	}
	shim := filepath.Join(h.bin, "containerd-shim-runc-v2")
	if _, err := os.Stat(shim); err == nil {
		return
	}
	cmd := exec.Command("go", "build", "-o", shim, "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2")
	cmd.Dir = h.root
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("build containerd-shim-runc-v2: %v\n%s", err, out)
	}
}

// cycleTimes are the steps of runp -> create -> start -> exec -> stop ->
// rm of one container.
type cycleTimes struct {
	runp, create, start, exec, stop, rm time.Duration
}

func (c cycleTimes) total() time.Duration {
	return c.runp + c.create + c.start + c.exec + c.stop + c.rm
}

// containerCycle runs one cycle through the CRI: a pod on handler, a
// busybox container (sleep), an ExecSync of echo, then StopPodSandbox and
// RemovePodSandbox (which stop and remove the container).
func containerCycle(ctx context.Context, handler string, idle func(podID string)) (cycleTimes, error) {
	var t cycleTimes
	pod := podConfig(uniq("bench-"+handler), nil, nil)
	step := func(d *time.Duration, f func() error) error {
		t0 := time.Now()
		err := f()
		*d = time.Since(t0)
		return err
	}
	var podID, cid string
	if err := step(&t.runp, func() error {
		r, err := h.cri.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: pod, RuntimeHandler: handler})
		if err == nil {
			podID = r.PodSandboxId
		}
		return err
	}); err != nil {
		return t, fmt.Errorf("runp: %w", err)
	}
	defer func() {
		h.cri.StopPodSandbox(context.WithoutCancel(ctx), &runtime.StopPodSandboxRequest{PodSandboxId: podID})
		h.cri.RemovePodSandbox(context.WithoutCancel(ctx), &runtime.RemovePodSandboxRequest{PodSandboxId: podID})
	}()
	if err := step(&t.create, func() error {
		r, err := h.cri.CreateContainer(ctx, &runtime.CreateContainerRequest{PodSandboxId: podID, SandboxConfig: pod,
			Config: &runtime.ContainerConfig{
				Metadata: &runtime.ContainerMetadata{Name: "sleeper"},
				Image:    &runtime.ImageSpec{Image: busyboxImage},
				Command:  []string{"/bin/sleep", "3600"},
			}})
		if err == nil {
			cid = r.ContainerId
		}
		return err
	}); err != nil {
		return t, fmt.Errorf("create: %w", err)
	}
	if err := step(&t.start, func() error {
		_, err := h.cri.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: cid})
		return err
	}); err != nil {
		return t, fmt.Errorf("start: %w", err)
	}
	if err := step(&t.exec, func() error {
		r, err := h.cri.ExecSync(ctx, &runtime.ExecSyncRequest{ContainerId: cid, Cmd: []string{"echo", "hi"}, Timeout: 60})
		if err == nil && (r.ExitCode != 0 || strings.TrimSpace(string(r.Stdout)) != "hi") {
			err = fmt.Errorf("exec: exit %d, stdout %q, stderr %q", r.ExitCode, r.Stdout, r.Stderr)
		}
		return err
	}); err != nil {
		return t, fmt.Errorf("exec: %w", err)
	}
	if idle != nil {
		idle(podID)
	}
	if err := step(&t.stop, func() error {
		_, err := h.cri.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: podID})
		return err
	}); err != nil {
		return t, fmt.Errorf("stopp: %w", err)
	}
	if err := step(&t.rm, func() error {
		_, err := h.cri.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: podID})
		return err
	}); err != nil {
		return t, fmt.Errorf("rmp: %w", err)
	}
	return t, nil
}

// vmHostMemory is the resident memory of the VM of a pod on the host:
// QEMU's and its virtiofsd's (both processes), in KiB.
func vmHostMemory(b *testing.B, podID string) (qemu, virtiofsd int64) {
	b.Helper()
	data, err := os.ReadFile(filepath.Join("/run/libvirt/qemu", "rss-"+podID+".pid"))
	if err != nil {
		b.Fatalf("qemu pid of pod %s: %v", podID, err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(data)))
	qemu = rssKiBOf(pid)
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		cmd, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(cmd), "virtiofsd") && strings.Contains(string(cmd), podID) {
			p, _ := strconv.Atoi(e.Name())
			virtiofsd += rssKiBOf(p)
		}
	}
	return qemu, virtiofsd
}

func rssKiBOf(pid int) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			return v
		}
	}
	return 0
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// BenchmarkVMContainerCycle runs runp -> create -> start -> exec -> stop
// -> rm of one busybox container in vm mode (resource-vm: a VM per pod,
// the container in it) against the same cycle on containerd's own runc
// handler on the host, alternating, and reports the cycle of each, the
// container start and exec latencies in vm mode (the targets under TCG:
// start <= 1.5 s, exec <= 1 s), and the host memory of an idle vm pod with
// one container (QEMU + virtiofsd resident memory) and the CPU its VM uses
// idle, which is what runtime-class.yaml's overhead.podFixed declares.
// RSS_BENCH_CYCLES sets the cycles of each (default 5).
func BenchmarkVMContainerCycle(b *testing.B) {
	if h.vm == nil {
		if os.Getenv("RSS_VM_TESTS") != "" {
			b.Fatal("RSS_VM_TESTS is set but the vm daemon is not running (RSS_GUEST_DIR?)")
		}
		b.Skip("set RSS_VM_TESTS=1 and RSS_GUEST_DIR")
	}
	runcShim(b)
	importBusybox(b)
	ctx := context.Background()
	n := cycles(5)
	for range b.N {
		times := map[string][]cycleTimes{}
		var memQEMU, memVFS, idleCPU []float64
		for i := 0; i < n; i++ {
			for _, handler := range []string{"runc", "resource-vm"} {
				var idle func(string)
				if handler == "resource-vm" && i < 3 {
					idle = func(podID string) {
						time.Sleep(5 * time.Second) // settle: the idle footprint
						q, v := vmHostMemory(b, podID)
						memQEMU, memVFS = append(memQEMU, float64(q)/1024), append(memVFS, float64(v)/1024)
						c1, t1 := vmCPU(b, podID), time.Now()
						time.Sleep(10 * time.Second)
						idleCPU = append(idleCPU, float64(vmCPU(b, podID)-c1)/float64(time.Since(t1)))
					}
				}
				t, err := containerCycle(ctx, handler, idle)
				if err != nil {
					b.Fatalf("%s: %v", handler, err)
				}
				times[handler] = append(times[handler], t)
			}
		}
		for _, handler := range []string{"runc", "resource-vm"} {
			var total, start, exec, runp []time.Duration
			for _, t := range times[handler] {
				total, start, exec, runp = append(total, t.total()), append(start, t.start), append(exec, t.exec), append(runp, t.runp)
			}
			suffix := "-" + handler
			b.ReportMetric(ms(median(total)), "ms/cycle"+suffix)
			b.ReportMetric(ms(median(runp)), "ms/runp"+suffix)
			b.ReportMetric(ms(median(start)), "ms/start"+suffix)
			b.ReportMetric(ms(median(exec)), "ms/exec"+suffix)
			fmt.Printf("%s %s: median of %d cycles: cycle %.0f ms (runp %.0f, start %.0f, exec %.0f ms)\n", b.Name(), handler, n,
				ms(median(total)), ms(median(runp)), ms(median(start)), ms(median(exec)))
			for i, t := range times[handler] {
				fmt.Printf("  %s cycle %d: runp %.0f create %.0f start %.0f exec %.0f stop %.0f rm %.0f ms\n", handler, i,
					ms(t.runp), ms(t.create), ms(t.start), ms(t.exec), ms(t.stop), ms(t.rm))
			}
		}
		ratio := ms(median(cycleTotals(times["resource-vm"]))) / ms(median(cycleTotals(times["runc"])))
		b.ReportMetric(ratio, "ratio-vm/runc")
		q, v, c := mean(memQEMU), mean(memVFS), mean(idleCPU)
		b.ReportMetric(q, "MiB-qemu-idle")
		b.ReportMetric(v, "MiB-virtiofsd-idle")
		b.ReportMetric(c*1000, "mcores-idle")
		fmt.Printf("%s: vm/runc cycle ratio %.1fx; idle vm pod with one container: QEMU %.0f MiB + virtiofsd %.0f MiB resident, %.0fm CPU\n",
			b.Name(), ratio, q, v, c*1000)
	}
}

func cycleTotals(ts []cycleTimes) []time.Duration {
	out := make([]time.Duration, len(ts))
	for i, t := range ts {
		out[i] = t.total()
	}
	return out
}

func mean(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := 0.0
	for _, x := range v {
		s += x
	}
	return s / float64(len(v))
}

// vmCPU is libvirt's CPU time of a pod's VM.
func vmCPU(b *testing.B, podID string) time.Duration {
	b.Helper()
	out, err := exec.Command("virsh", "-c", "qemu:///system", "domstats", "--cpu-total", "rss-"+podID).CombinedOutput()
	if err != nil {
		b.Fatalf("virsh domstats: %v\n%s", err, out)
	}
	for _, f := range strings.Fields(string(out)) {
		if v, ok := strings.CutPrefix(f, "cpu.time="); ok {
			ns, _ := strconv.ParseInt(v, 10, 64)
			return time.Duration(ns)
		}
	}
	b.Fatalf("no cpu.time in %s", out)
	return 0
}
