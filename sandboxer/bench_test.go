package sandboxer

import (
	"context"
	"fmt"
	"syscall"
	"testing"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// BenchmarkLifecycle is the controller alone, in process: Create, Start,
// Stop and Shutdown of one sandbox, with its state on the test's disk;
// durable (the default) and with fsync = false.
func BenchmarkLifecycle(b *testing.B) {
	for _, bc := range []struct {
		name   string
		noSync bool
	}{{"fsync", false}, {"nofsync", true}} {
		b.Run(bc.name, func(b *testing.B) {
			ctx := context.Background()
			c, err := New(Options{Root: b.TempDir(), Backend: slot.New(), NoSync: bc.noSync})
			if err != nil {
				b.Fatal(err)
			}
			cfg := podConfig(map[string]string{resourceinfo.AnnotationCPULimit: "2", resourceinfo.AnnotationMemoryLimit: "2Gi"}, nil)
			b.ResetTimer()
			for i := range b.N {
				id := fmt.Sprintf("sb%d", i)
				if err := create(ctx, c, id, cfg); err != nil {
					b.Fatal(err)
				}
				if _, err := c.Start(ctx, id); err != nil {
					b.Fatal(err)
				}
				if err := c.Stop(ctx, id); err != nil {
					b.Fatal(err)
				}
				if err := c.Shutdown(ctx, id); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkContainerCycle is a container's task calls as containerd makes
// them through the task shim (Create, Start, State, Kill, Wait, Delete),
// on the daemon's task server in process with its events queued: the
// sandboxer's side of the e2e container cycle, for profiles.
func BenchmarkContainerCycle(b *testing.B) {
	ctx := ns(context.Background())
	e := newTaskEnv(b, b.TempDir())
	go func() {
		for range e.events.got {
		}
	}()
	readySandbox(b, e, "sb")
	quota, period, shares := int64(50000), uint64(100000), uint64(256)
	mem := int64(256 << 20)
	bundle := bundle(b, "sb", &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: &quota, Period: &period, Shares: &shares}, Memory: &specs.LinuxMemory{Limit: &mem}}, nil)
	b.ResetTimer()
	for i := range b.N {
		id := fmt.Sprintf("c%d", i)
		if _, err := e.client.Create(ctx, &taskAPI.CreateTaskRequest{ID: id, Bundle: bundle}); err != nil {
			b.Fatal(err)
		}
		if _, err := e.client.Start(ctx, &taskAPI.StartRequest{ID: id}); err != nil {
			b.Fatal(err)
		}
		if _, err := e.client.State(ctx, &taskAPI.StateRequest{ID: id}); err != nil {
			b.Fatal(err)
		}
		if _, err := e.client.Kill(ctx, &taskAPI.KillRequest{ID: id, Signal: uint32(syscall.SIGKILL)}); err != nil {
			b.Fatal(err)
		}
		if _, err := e.client.Wait(ctx, &taskAPI.WaitRequest{ID: id}); err != nil {
			b.Fatal(err)
		}
		if _, err := e.client.Delete(ctx, &taskAPI.DeleteRequest{ID: id}); err != nil {
			b.Fatal(err)
		}
	}
}
