package cri

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
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
func parallel(n, workers int, fn func() error, b *testing.B) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				if err := fn(); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
}
