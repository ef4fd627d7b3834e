package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	api "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/containerd/v2/core/sandbox/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/ttrpc"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/testenv"
)

// The benchmarks (make bench) measure through the same containerd the
// sandboxer and the no-op baseline controller it carries (noop_test.go),
// interleaved in blocks so both see the same machine, and report ms per
// cycle and the ratio. Counts can be lowered with RSS_BENCH_CYCLES.

func cycles(def int) int {
	if n, err := strconv.Atoi(os.Getenv("RSS_BENCH_CYCLES")); err == nil && n > 0 {
		return n
	}
	return def
}

var benchSeq atomic.Int64

func uniq(prefix string) string {
	return fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), benchSeq.Add(1))
}

// compare runs one cycle for each runtime n times, alternating in blocks,
// and reports the mean ms per cycle of each and their ratio.
func compare(b *testing.B, n int, cycle func(handler string) error) {
	const block = 50
	total := map[string]time.Duration{}
	for done := 0; done < n; done += block {
		for _, handler := range []string{"noop", "resource-slot"} {
			start := time.Now()
			for i := 0; i < block && done+i < n; i++ {
				if err := cycle(handler); err != nil {
					b.Fatalf("%s: %v", handler, err)
				}
			}
			total[handler] += time.Since(start)
		}
	}
	base := float64(total["noop"].Microseconds()) / 1000 / float64(n)
	ours := float64(total["resource-slot"].Microseconds()) / 1000 / float64(n)
	b.ReportMetric(base, "ms/cycle-noop")
	b.ReportMetric(ours, "ms/cycle-sandboxer")
	b.ReportMetric(ours/base, "ratio")
	fmt.Printf("%s: %d cycles: sandboxer %.2f ms/cycle, no-op baseline %.2f ms/cycle, ratio %.2fx\n", b.Name(), n, ours, base, ours/base)
}

// BenchmarkPodCycle: RunPodSandbox → StopPodSandbox → RemovePodSandbox
// through containerd with the CRI Go client on one connection.
func BenchmarkPodCycle(b *testing.B) {
	for range b.N {
		variants(b, podCycles)
	}
}

// variants runs fn with the sandboxer's default durable writes, with
// fsync = false, and with its state directory on a tmpfs, which leaves
// what the sandboxer costs without its disk.
func variants(b *testing.B, fn func(b *testing.B)) {
	b.Run("fsync", fn)
	b.Run("nofsync", func(b *testing.B) { h.withConfig(b, "fsync = false\n", func() { fn(b) }) })
	b.Run("tmpfs", func(b *testing.B) {
		dir, err := os.MkdirTemp("/dev/shm", "rss-bench-")
		testenv.Need(b, err == nil, "no tmpfs: %v", err)
		defer os.RemoveAll(dir)
		h.withConfig(b, fmt.Sprintf("dir = %q\n", dir), func() { fn(b) })
	})
}

func podCycles(b *testing.B) {
	ctx := context.Background()
	for range b.N {
		waitProfile := profileDaemon(b, 10*time.Second)
		compare(b, cycles(1000), func(handler string) error {
			name := uniq("cycle")
			cfg := podConfig(name, demoAnnotations, nil)
			resp, err := h.cri.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: cfg, RuntimeHandler: handler})
			if err != nil {
				return err
			}
			if _, err := h.cri.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: resp.PodSandboxId}); err != nil {
				return err
			}
			_, err = h.cri.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: resp.PodSandboxId})
			return err
		})
		waitProfile()
	}
}

// BenchmarkControllerDirect: Create+Start+Stop+Shutdown on the
// sandboxer's socket with containerd's own proxy client; p50 and p99.
func BenchmarkControllerDirect(b *testing.B) {
	ctx := context.Background()
	conn, err := grpc.NewClient("unix://"+h.SandboxerSock(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	ctrl := proxy.NewSandboxController(api.NewControllerClient(conn), "resource-slot")
	cfg := podConfig("direct", demoAnnotations, nil)
	for range b.N {
		n := cycles(1000)
		lat := make([]time.Duration, 0, n)
		for range n {
			id := uniq("direct")
			start := time.Now()
			if err := ctrl.Create(ctx, sandbox.Sandbox{ID: id}, sandbox.WithOptions(cfg)); err != nil {
				b.Fatal(err)
			}
			if _, err := ctrl.Start(ctx, id); err != nil {
				b.Fatal(err)
			}
			if err := ctrl.Stop(ctx, id); err != nil {
				b.Fatal(err)
			}
			if err := ctrl.Shutdown(ctx, id); err != nil {
				b.Fatal(err)
			}
			lat = append(lat, time.Since(start))
		}
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]
		b.ReportMetric(float64(p50.Microseconds())/1000, "ms-p50")
		b.ReportMetric(float64(p99.Microseconds())/1000, "ms-p99")
		fmt.Printf("%s: %d cycles of Create+Start+Stop+Shutdown: p50 %.2f ms, p99 %.2f ms\n", b.Name(), n, float64(p50.Microseconds())/1000, float64(p99.Microseconds())/1000)
	}
}

// BenchmarkContainerCycle: CreateContainer → StartContainer →
// StopContainer → RemoveContainer in a running pod, through containerd:
// one container of the pod, created again with the next attempt as
// kubelet restarts a container. The variant "names" gives every cycle's
// container a name of its own: the pod's container history (kubelet's
// rules count init containers after they are gone) then grows by one
// entry a cycle, and every record of the pod carries it.
func BenchmarkContainerCycle(b *testing.B) {
	for range b.N {
		variants(b, func(b *testing.B) { containerCycles(b, false) })
		b.Run("names", func(b *testing.B) { containerCycles(b, true) })
	}
}

func containerCycles(b *testing.B, newNames bool) {
	ctx := context.Background()
	pods := map[string]*runtime.PodSandboxConfig{}
	ids := map[string]string{}
	for _, handler := range []string{"noop", "resource-slot"} {
		cfg := podConfig(uniq("ctr-"+handler), nil, nil)
		cfg.LogDirectory = b.TempDir()
		resp, err := h.cri.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: cfg, RuntimeHandler: handler})
		if err != nil {
			b.Fatal(err)
		}
		pods[handler], ids[handler] = cfg, resp.PodSandboxId
	}
	defer func() {
		for _, id := range ids {
			h.cri.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: id})
			h.cri.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: id})
		}
	}()
	res := &runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 50000, CpuShares: 256, MemoryLimitInBytes: 256 << 20}
	for range b.N {
		// CPU time does not depend on the load of the machine as the
		// cycle's time does: what the task shim, the sandboxer and the
		// no-op baseline (controller and task service in one process)
		// spend per cycle.
		n := cycles(300)
		shim := 0
		if pids := shimPIDs(h.TaskSock()); len(pids) == 1 {
			shim = pids[0]
		}
		shim0, sb0, noop0 := cpuTime(shim), cpuTime(h.sandboxer.Process.Pid), cpuTime(h.noop.Process.Pid)
		waitProfile := profileDaemon(b, 15*time.Second)
		name := uniq("c")
		attempt := map[string]uint32{}
		compare(b, n, func(handler string) error {
			ctrName := name
			if newNames {
				ctrName = uniq("c")
			}
			cfg := containerConfig(ctrName, nil, res)
			if !newNames {
				cfg.Metadata.Attempt = attempt[handler]
				attempt[handler]++
			}
			c, err := h.cri.CreateContainer(ctx, &runtime.CreateContainerRequest{PodSandboxId: ids[handler], Config: cfg, SandboxConfig: pods[handler]})
			if err != nil {
				return err
			}
			if _, err := h.cri.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: c.ContainerId}); err != nil {
				return err
			}
			if _, err := h.cri.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: c.ContainerId, Timeout: 10}); err != nil {
				return err
			}
			_, err = h.cri.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: c.ContainerId})
			return err
		})
		waitProfile()
		perCycle := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(n) }
		shimMs, sbMs, noopMs := perCycle(cpuTime(shim)-shim0), perCycle(cpuTime(h.sandboxer.Process.Pid)-sb0), perCycle(cpuTime(h.noop.Process.Pid)-noop0)
		b.ReportMetric(shimMs, "cpu-ms/cycle-shim")
		b.ReportMetric(sbMs, "cpu-ms/cycle-sandboxer")
		b.ReportMetric(noopMs, "cpu-ms/cycle-noop")
		fmt.Printf("%s: CPU per cycle: task shim %.2f ms, sandboxer %.2f ms, no-op baseline %.2f ms\n", b.Name(), shimMs, sbMs, noopMs)
	}
}

// BenchmarkConcurrentPods: 100 pods × 10 containers created concurrently
// through containerd; wall time and the RSS of the sandboxer and its shim.
func BenchmarkConcurrentPods(b *testing.B) {
	ctx := context.Background()
	pods, perPod := cycles(100), 10
	for range b.N {
		rssBefore := rssKiB(h.sandboxer.Process.Pid)
		var (
			wg     sync.WaitGroup
			mu     sync.Mutex
			errs   []error
			podIDs []string
		)
		start := time.Now()
		for p := range pods {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cfg := podConfig(fmt.Sprintf("conc-%d-%d", os.Getpid(), p), demoAnnotations, nil)
				cfg.LogDirectory = b.TempDir()
				resp, err := h.cri.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: cfg, RuntimeHandler: "resource-slot"})
				if err == nil {
					mu.Lock()
					podIDs = append(podIDs, resp.PodSandboxId)
					mu.Unlock()
					for c := range perPod {
						var cr *runtime.CreateContainerResponse
						cr, err = h.cri.CreateContainer(ctx, &runtime.CreateContainerRequest{
							PodSandboxId: resp.PodSandboxId, Config: containerConfig(fmt.Sprintf("c%d", c), nil, nil), SandboxConfig: cfg,
						})
						if err == nil {
							_, err = h.cri.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: cr.ContainerId})
						}
						if err != nil {
							break
						}
					}
				}
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		elapsed := time.Since(start)
		rssAfter := rssKiB(h.sandboxer.Process.Pid)
		shimRSS := shimRSSKiB()
		if len(errs) > 0 {
			b.Fatalf("%d errors, first: %v", len(errs), errs[0])
		}
		b.ReportMetric(elapsed.Seconds(), "s-total")
		b.ReportMetric(float64(rssAfter)/1024, "MiB-rss-sandboxer")
		fmt.Printf("%s: %d pods x %d containers created concurrently in %.2f s; sandboxer RSS %.1f MiB (%.1f MiB before), task shim RSS %.1f MiB\n",
			b.Name(), pods, perPod, elapsed.Seconds(), float64(rssAfter)/1024, float64(rssBefore)/1024, float64(shimRSS)/1024)
		for _, id := range podIDs {
			h.cri.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: id})
			h.cri.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: id})
		}
	}
}

// settledRSS waits until an idle process's RSS no longer drops (the Go
// runtime returns freed memory to the system over seconds), at most 30 s,
// and returns it.
func settledRSS(pid int) int {
	low, since := rssKiB(pid), time.Now()
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline) && time.Since(since) < 5*time.Second; {
		time.Sleep(500 * time.Millisecond)
		if r := rssKiB(pid); r < low*99/100 {
			low, since = r, time.Now()
		}
	}
	return low
}

// rssKiB reads a process's resident set size.
func rssKiB(pid int) int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return 0
}

// cpuTime is the user and system CPU time a process has used (0 for
// pid 0 or a process that is gone).
func cpuTime(pid int) time.Duration {
	if pid == 0 {
		return 0
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	i := strings.LastIndexByte(string(data), ')')
	f := strings.Fields(string(data)[i+1:])
	if len(f) < 13 {
		return 0
	}
	// utime and stime: fields 14 and 15 of stat, in clock ticks (100 a
	// second on Linux).
	u, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	return time.Duration(u+st) * 10 * time.Millisecond
}

func shimRSSKiB() int {
	entries, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, e := range entries {
		data, err := os.ReadFile(e)
		if err != nil || !strings.Contains(string(data), h.TaskSock()) || !strings.Contains(string(data), "serve") {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(e)))
		return rssKiB(pid)
	}
	return 0
}

// BenchmarkDirectPodCycle: RunPodSandbox → StopPodSandbox →
// RemovePodSandbox through the sandboxer's own CRI endpoint (direct mode)
// and through containerd (runtime handler resource-slot) to the same
// sandboxer, each with the CRI Go client on one connection, interleaved
// in blocks as compare does: ms per cycle of each and their ratio.
func BenchmarkDirectPodCycle(b *testing.B) {
	ctx := context.Background()
	direct, closeDirect := directClient(b)
	defer closeDirect()
	paths := []struct {
		name    string
		client  runtime.RuntimeServiceClient
		handler string
	}{{"containerd", h.cri, "resource-slot"}, {"direct", direct, ""}}
	for range b.N {
		n := cycles(1000)
		const block = 50
		total := map[string]time.Duration{}
		for done := 0; done < n; done += block {
			for _, p := range paths {
				start := time.Now()
				for i := 0; i < block && done+i < n; i++ {
					if err := podCycle(ctx, p.client, p.handler); err != nil {
						b.Fatalf("%s: %v", p.name, err)
					}
				}
				total[p.name] += time.Since(start)
			}
		}
		viaCtrd := float64(total["containerd"].Microseconds()) / 1000 / float64(n)
		viaDirect := float64(total["direct"].Microseconds()) / 1000 / float64(n)
		b.ReportMetric(viaDirect, "ms/cycle-direct")
		b.ReportMetric(viaCtrd, "ms/cycle-containerd")
		b.ReportMetric(viaDirect/viaCtrd, "ratio")
		fmt.Printf("%s: %d cycles: direct CRI %.2f ms/cycle, through containerd %.2f ms/cycle, ratio %.2fx\n",
			b.Name(), n, viaDirect, viaCtrd, viaDirect/viaCtrd)
	}
}

// BenchmarkDirectManyPods: 10,000 live pods (RSS_BENCH_CYCLES) created
// through the direct endpoint by 8 clients, with fsync = false: the
// daemon's RSS per pod and the p50 latency of ListPodSandbox over all of
// them (20 calls); then they are removed.
func BenchmarkDirectManyPods(b *testing.B) {
	for range b.N {
		h.withConfig(b, "fsync = false\n", func() { directManyPods(b, cycles(10000)) })
	}
}

func directManyPods(b *testing.B, n int) {
	ctx := context.Background()
	client, closeClient := directClient(b)
	defer closeClient()
	pid := h.sandboxer.Process.Pid
	rssBefore := rssKiB(pid)
	ids := make([]string, n)
	start := time.Now()
	err := inParallel(n, 8, func(i int) error {
		resp, err := client.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: podConfig(fmt.Sprintf("many-%d", i), demoAnnotations, nil)})
		if err == nil {
			ids[i] = resp.PodSandboxId
		}
		return err
	})
	created := time.Since(start)
	defer func() {
		inParallel(n, 8, func(i int) error {
			if ids[i] == "" {
				return nil
			}
			_, err := client.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: ids[i]})
			return err
		})
	}()
	if err != nil {
		b.Fatal(err)
	}
	rssAfter := rssKiB(pid)
	rssSettled := settledRSS(pid)

	lat := make([]time.Duration, 0, 20)
	for range 20 {
		t0 := time.Now()
		resp, err := client.ListPodSandbox(ctx, &runtime.ListPodSandboxRequest{})
		if err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
		if len(resp.Items) < n {
			b.Fatalf("listed %d pods, want at least %d", len(resp.Items), n)
		}
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	p50 := float64(lat[len(lat)/2].Microseconds()) / 1000
	rssListed := rssKiB(pid)
	rssListedSettled := settledRSS(pid)
	perPod := func(rss int) float64 { return float64(rss-rssBefore) / float64(n) }
	b.ReportMetric(perPod(rssAfter), "KiB-rss/pod")
	b.ReportMetric(perPod(rssSettled), "KiB-rss/pod-settled")
	b.ReportMetric(perPod(rssListedSettled), "KiB-rss/pod-listed-settled")
	b.ReportMetric(p50, "ms-list-p50")
	fmt.Printf("%s: %d pods created in %.1f s (8 clients, fsync = false); daemon RSS %.1f MiB before, per pod: %.2f KiB at once, %.2f KiB settled; after 20 ListPodSandbox of all: %.2f KiB at once, %.2f KiB settled; ListPodSandbox p50 %.1f ms\n",
		b.Name(), n, created.Seconds(), float64(rssBefore)/1024, perPod(rssAfter), perPod(rssSettled), perPod(rssListed), perPod(rssListedSettled), p50)
}

// compareConcurrent runs n cycles of each of two targets from clients
// concurrent clients, alternating between the targets in blocks so that
// both see the same machine, and reports each one's throughput, the wall
// time per cycle it comes to, and the ratio (ours over the baseline's).
// targets[0] is the baseline, targets[1] ours.
//
// servers are the processes serving each target's calls (0: none): the
// CPU time each spends while its target runs is reported per cycle too,
// the daemon's own cost, which does not depend on the machine's load as
// its throughput does.
func compareConcurrent(b *testing.B, n, clients int, targets [2]string, servers [2]int, cycle func(target int) error) {
	block := clients * 25
	var total, cpu [2]time.Duration
	var done [2]int
	for d := 0; d < n; d += block {
		m := min(block, n-d)
		for t := range 2 {
			start, cpu0 := time.Now(), cpuTime(servers[t])
			if errs := runParallel(m, clients, func(int) error { return cycle(t) }); len(errs) > 0 {
				b.Fatalf("%s: %d errors, first: %v", targets[t], len(errs), errs[0])
			}
			total[t] += time.Since(start)
			cpu[t] += cpuTime(servers[t]) - cpu0
			done[t] += m
		}
	}
	var rate, ms, cpuMs [2]float64
	for t := range 2 {
		rate[t] = float64(done[t]) / total[t].Seconds()
		ms[t] = 1000 / rate[t]
		cpuMs[t] = float64(cpu[t].Microseconds()) / 1000 / float64(done[t])
	}
	b.ReportMetric(rate[0], "cycles/s-"+targets[0])
	b.ReportMetric(rate[1], "cycles/s-"+targets[1])
	b.ReportMetric(ms[1]/ms[0], "ratio")
	b.ReportMetric(cpuMs[0], "cpu-ms/cycle-"+targets[0])
	b.ReportMetric(cpuMs[1], "cpu-ms/cycle-"+targets[1])
	fmt.Printf("%s: %d cycles each, %d clients: %s %.0f cycles/s (%.3f ms/cycle), %s %.0f cycles/s (%.3f ms/cycle), ratio %.2fx; server CPU per cycle: %s %.3f ms, %s %.3f ms\n",
		b.Name(), n, clients, targets[1], rate[1], ms[1], targets[0], rate[0], ms[0], ms[1]/ms[0], targets[1], cpuMs[1], targets[0], cpuMs[0])
}

// BenchmarkPodCycleConcurrent: the pod cycle through containerd from 32
// concurrent clients (one CRI connection, as the kubelet has), against
// the no-op baseline.
func BenchmarkPodCycleConcurrent(b *testing.B) {
	ctx := context.Background()
	for range b.N {
		b.Run("fsync", func(b *testing.B) {
			compareConcurrent(b, cycles(2000), 32, [2]string{"noop", "sandboxer"}, [2]int{h.noop.Process.Pid, h.sandboxer.Process.Pid}, func(t int) error {
				return podCycle(ctx, h.cri, [2]string{"noop", "resource-slot"}[t])
			})
		})
	}
}

// noopCRIClient connects the CRI Go client to the no-op baseline's
// socket, which serves a no-op CRI runtime service (noop_test.go).
func noopCRIClient(tb testing.TB) (runtime.RuntimeServiceClient, func()) {
	tb.Helper()
	conn, err := grpc.NewClient("unix://"+filepath.Join(h.base, "noop.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		tb.Fatal(err)
	}
	return runtime.NewRuntimeServiceClient(conn), func() { conn.Close() }
}

// BenchmarkDirectPodCycleConcurrent: the pod cycle on the sandboxer's own
// CRI endpoint from 32 concurrent clients, against a no-op CRI runtime
// service in the baseline's process; durable (the default) and with
// fsync = false.
func BenchmarkDirectPodCycleConcurrent(b *testing.B) {
	ctx := context.Background()
	noop, closeNoop := noopCRIClient(b)
	defer closeNoop()
	run := func(b *testing.B) {
		direct, closeDirect := directClient(b)
		defer closeDirect()
		clients := [2]runtime.RuntimeServiceClient{noop, direct}
		defer profileDaemon(b, 15*time.Second)()
		compareConcurrent(b, cycles(20000), 32, [2]string{"noop", "sandboxer"}, [2]int{h.noop.Process.Pid, h.sandboxer.Process.Pid}, func(t int) error {
			return podCycle(ctx, clients[t], "")
		})
	}
	for range b.N {
		b.Run("fsync", run)
		b.Run("nofsync", func(b *testing.B) { h.withConfig(b, "fsync = false\n", func() { run(b) }) })
	}
}

// BenchmarkRecovery: 10,000 pods (RSS_BENCH_CYCLES) on disk, the daemon
// killed (SIGKILL: the journal holds what compaction had not moved yet)
// or stopped (SIGTERM: compacted), then started again: the time from its
// start to a ListPodSandbox that lists them all.
func BenchmarkRecovery(b *testing.B) {
	ctx := context.Background()
	n := cycles(10000)
	client, closeClient := directClient(b)
	defer closeClient()
	ids := make([]string, n)
	if err := inParallel(n, 8, func(i int) error {
		resp, err := client.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: podConfig(fmt.Sprintf("recover-%d", i), demoAnnotations, nil)})
		if err == nil {
			ids[i] = resp.PodSandboxId
		}
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer inParallel(n, 8, func(i int) error {
		if ids[i] == "" {
			return nil
		}
		_, err := client.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: ids[i]})
		return err
	})
	for range b.N {
		for _, how := range []struct {
			name string
			sig  syscall.Signal
		}{{"killed", syscall.SIGKILL}, {"stopped", syscall.SIGTERM}} {
			b.Run(how.name, func(b *testing.B) {
				if err := h.stopSandboxer(how.sig); err != nil {
					b.Fatal(err)
				}
				start := time.Now()
				if err := h.startSandboxer(); err != nil {
					b.Fatal(err)
				}
				for {
					resp, err := client.ListPodSandbox(ctx, &runtime.ListPodSandboxRequest{})
					if err == nil && len(resp.Items) >= n {
						break
					}
					if time.Since(start) > time.Minute {
						b.Fatalf("pods not listed a minute after the start: %v", err)
					}
					time.Sleep(5 * time.Millisecond)
				}
				d := time.Since(start)
				b.ReportMetric(float64(d.Milliseconds()), "ms-to-serving")
				fmt.Printf("%s: %d pods, from the daemon's start to a ListPodSandbox of all: %.0f ms; %s; %s\n",
					b.Name(), n, float64(d.Microseconds())/1000, logLine("sandboxes recovered"), logLine("serving"))
			})
		}
	}
}

// logLine is the daemon's last log line that contains s.
func logLine(s string) string {
	data, _ := os.ReadFile(h.sbLog)
	lines := strings.Split(string(data), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], s) {
			return strings.TrimSpace(lines[i][strings.Index(lines[i], "msg="):])
		}
	}
	return ""
}

// BenchmarkTaskShimHop: a container's task cycle (create, start, kill,
// wait, delete) on the task API through the task shim, as containerd
// calls it, and on the daemon's own task socket behind the shim,
// interleaved in blocks: what the shim's hop costs per container cycle.
func BenchmarkTaskShimHop(b *testing.B) {
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	conn, err := grpc.NewClient("unix://"+h.SandboxerSock(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	ctrl := proxy.NewSandboxController(api.NewControllerClient(conn), "resource-slot")
	sandboxID := uniq("shimhop")
	if err := ctrl.Create(ctx, sandbox.Sandbox{ID: sandboxID}); err != nil {
		b.Fatal(err)
	}
	defer ctrl.Shutdown(ctx, sandboxID)
	if _, err := ctrl.Start(ctx, sandboxID); err != nil {
		b.Fatal(err)
	}
	bundle := b.TempDir()
	spec := fmt.Sprintf(`{"ociVersion":"1.2.0","annotations":{"io.kubernetes.cri.sandbox-id":%q}}`, sandboxID)
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), []byte(spec), 0o600); err != nil {
		b.Fatal(err)
	}
	socks := []struct{ name, path string }{
		{"shim", h.TaskSock()},
		{"daemon", strings.TrimSuffix(h.TaskSock(), ".sock") + "-upstream.sock"},
	}
	clients := make([]taskAPI.TTRPCTaskService, len(socks))
	for i, s := range socks {
		c, err := net.Dial("unix", s.path)
		if err != nil {
			b.Fatal(err)
		}
		tc := ttrpc.NewClient(c)
		defer tc.Close()
		clients[i] = taskAPI.NewTTRPCTaskClient(tc)
	}
	cycle := func(c taskAPI.TTRPCTaskService) error {
		id := uniq("hop")
		if _, err := c.Create(ctx, &taskAPI.CreateTaskRequest{ID: id, Bundle: bundle}); err != nil {
			return err
		}
		if _, err := c.Start(ctx, &taskAPI.StartRequest{ID: id}); err != nil {
			return err
		}
		if _, err := c.Kill(ctx, &taskAPI.KillRequest{ID: id, Signal: uint32(syscall.SIGKILL)}); err != nil {
			return err
		}
		if _, err := c.Wait(ctx, &taskAPI.WaitRequest{ID: id}); err != nil {
			return err
		}
		_, err := c.Delete(ctx, &taskAPI.DeleteRequest{ID: id})
		return err
	}
	for range b.N {
		n := cycles(1000)
		const block = 50
		total := make([]time.Duration, len(socks))
		for done := 0; done < n; done += block {
			for i := range socks {
				start := time.Now()
				for j := 0; j < block && done+j < n; j++ {
					if err := cycle(clients[i]); err != nil {
						b.Fatalf("%s: %v", socks[i].name, err)
					}
				}
				total[i] += time.Since(start)
			}
		}
		viaShim := float64(total[0].Microseconds()) / 1000 / float64(n)
		direct := float64(total[1].Microseconds()) / 1000 / float64(n)
		b.ReportMetric(viaShim, "ms/cycle-shim")
		b.ReportMetric(direct, "ms/cycle-daemon")
		b.ReportMetric(viaShim-direct, "ms/cycle-hop")
		fmt.Printf("%s: %d task cycles (create, start, kill, wait, delete): through the shim %.3f ms, on the daemon's socket %.3f ms: the hop costs %.3f ms per cycle\n",
			b.Name(), n, viaShim, direct, viaShim-direct)
	}
}
