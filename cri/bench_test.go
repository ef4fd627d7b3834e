package cri

import (
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

// BenchmarkPodCycle is RunPodSandbox, StopPodSandbox and RemovePodSandbox
// through the CRI Go client over a unix socket against the service in
// process, from 1 and 32 concurrent clients, durable and with fsync =
// false: the direct path without another process, for profiles
// (-cpuprofile). Its state is on the test's temp dir.
func BenchmarkPodCycle(b *testing.B) {
	for _, sync := range []bool{true, false} {
		for _, clients := range []int{1, 32} {
			b.Run(fmt.Sprintf("fsync=%v/clients=%d", sync, clients), func(b *testing.B) {
				e := startEnvSync(b, b.TempDir(), sync)
				var seq atomic.Int64
				b.ResetTimer()
				parallel(b.N, clients, func() error {
					name := fmt.Sprintf("p%d", seq.Add(1))
					resp, err := e.rt.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: podConfig(name, map[string]string{
						"resources.limits.cpu": "2", "resources.limits.memory": "2Gi", "resources.limits.pid": "1000",
					})})
					if err != nil {
						return err
					}
					if _, err := e.rt.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: resp.PodSandboxId}); err != nil {
						return err
					}
					_, err = e.rt.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: resp.PodSandboxId})
					return err
				}, b)
			})
		}
	}
}

// parallel calls fn n times from workers goroutines.
func parallel(n, workers int, fn func() error, b testing.TB) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				if err := fn(); err != nil {
					if b != nil {
						b.Error(err)
					}
					return
				}
			}
		}()
	}
	wg.Wait()
}

// BenchmarkRecover10k loads 10,000 compacted pods (RSS_BENCH_PODS) and
// builds the services over them: what a daemon's start costs before it
// serves. For profiles; the e2e BenchmarkRecovery times a real start.
func BenchmarkRecover10k(b *testing.B) {
	n := 10000
	if v, err := strconv.Atoi(os.Getenv("RSS_BENCH_PODS")); err == nil && v > 0 {
		n = v
	}
	dir := b.TempDir()
	e := startEnvSync(b, dir, false)
	parallel(n, 8, func() error {
		_, err := e.rt.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: podConfig(newID()[:12], map[string]string{
			"resources.limits.cpu": "2", "resources.limits.memory": "2Gi", "resources.limits.pid": "1000",
		})})
		return err
	}, b)
	e.stopFn()
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		ctrl, err := sandboxer.New(sandboxer.Options{Root: dir, Backend: slot.New(), NoSync: true})
		if err != nil {
			b.Fatal(err)
		}
		rep, err := ctrl.Recover(ctx)
		if err != nil || rep.Loaded != n {
			b.Fatalf("loaded %d of %d: %v", rep.Loaded, n, err)
		}
		tasks := sandboxer.NewTasks(ctx, ctrl, nil)
		if _, err := New(ctx, Options{Controller: ctrl, Tasks: tasks, Dir: dir, NoSync: true}); err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(time.Since(start).Milliseconds()), "ms-to-serve")
		tasks.Close()
		ctrl.Close(ctx)
	}
}
