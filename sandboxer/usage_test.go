package sandboxer

import (
	"context"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

// TestUsageSimulated: in slot mode a sandbox uses what its simulated
// containers say they use.
func TestUsageSimulated(t *testing.T) {
	ctx := context.Background()
	c := newTestController(t, Options{Root: t.TempDir(), Backend: slot.New()})
	require.NoError(t, create(ctx, c, "sb", podConfig(map[string]string{
		resourceinfo.AnnotationCPULimit: "1", resourceinfo.AnnotationMemoryLimit: "256Mi", resourceinfo.AnnotationPidLimit: "10",
	}, nil)))

	_, _, err := c.Usage(ctx, "sb")
	assert.True(t, errdefs.IsFailedPrecondition(err), "created: no usage, got %v", err)
	_, _, err = c.Usage(ctx, "nope")
	assert.True(t, errdefs.IsNotFound(err), "%v", err)

	_, err = c.Start(ctx, "sb")
	require.NoError(t, err)
	tasks := NewTasks(ctx, c, nil)
	defer tasks.Close()

	u, source, err := c.Usage(ctx, "sb")
	require.NoError(t, err)
	assert.Equal(t, resourceinfo.UsageSimulated, source)
	assert.Equal(t, uint64(0), *u.MemoryUsage, "no containers")
	assert.Equal(t, 0.0, *u.CPUPercent)

	for _, ctr := range []struct {
		id       string
		cpu, mem string
	}{
		{"c1", "500m", "100Mi"},
		{"c2", "250m", "200Mi"},
	} {
		k := TaskKey{"k8s.io", ctr.id}
		spec := &specs.Spec{Annotations: map[string]string{slot.AnnotationCPUUsage: ctr.cpu, slot.AnnotationMemoryUsage: ctr.mem}}
		_, err := tasks.Create(ctx, TaskSpec{Key: k, SandboxID: "sb", Spec: spec})
		require.NoError(t, err)
		_, err = tasks.Start(ctx, k, "")
		require.NoError(t, err)
	}
	time.Sleep(20 * time.Millisecond)
	u, _, err = c.Usage(ctx, "sb")
	require.NoError(t, err)
	assert.InDelta(t, 75.0, *u.CPUPercent, 1e-9)
	assert.Equal(t, uint64(300<<20), *u.MemoryUsage)
	assert.Equal(t, uint64(2), *u.Pids)
	assert.Positive(t, *u.CPUTimeNanos)
	assert.Equal(t, []string{"memory_usage 314572800 > memory_limit 268435456"}, u.Violations)

	// A stopped container keeps its CPU time, uses nothing more.
	require.NoError(t, tasks.Kill(ctx, TaskKey{"k8s.io", "c2"}, "", 9, false))
	require.Eventually(t, func() bool {
		u, _, err = c.Usage(ctx, "sb")
		return err == nil && *u.Pids == 1
	}, 5*time.Second, 10*time.Millisecond)
	assert.InDelta(t, 50.0, *u.CPUPercent, 1e-9)
	assert.Equal(t, uint64(100<<20), *u.MemoryUsage)
	assert.Empty(t, u.Violations)

	require.NoError(t, c.Stop(ctx, "sb"))
	_, _, err = c.Usage(ctx, "sb")
	assert.True(t, errdefs.IsFailedPrecondition(err), "%v", err)
}

// TestPodAnnotationsReachContainers: what a simulated container does can
// be set by its pod's annotations, keyed by its name, the only ones a
// Kubernetes user sets: for a CRI pod they are in its PodSandboxConfig,
// for another caller in the Create request. A regression test: once a
// CRI pod's annotations were no longer kept in its state, its containers
// saw none, and an init container named otherwise than init never
// completed under kubelet.
func TestPodAnnotationsReachContainers(t *testing.T) {
	ctx := context.Background()
	annotations := map[string]string{
		slot.PodAnnotationExitAfter + "prepare": "10ms", slot.PodAnnotationExitCode + "prepare": "3",
	}
	for _, tc := range []struct {
		desc string
		opts []sandbox.CreateOpt
	}{
		{"PodSandboxConfig", []sandbox.CreateOpt{sandbox.WithOptions(podConfig(annotations, nil))}},
		{"Create request", []sandbox.CreateOpt{sandbox.WithAnnotations(annotations)}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			c := newTestController(t, Options{Root: t.TempDir(), Backend: slot.New()})
			require.NoError(t, c.Create(ctx, sandbox.Sandbox{ID: "sb"}, tc.opts...))
			_, err := c.Start(ctx, "sb")
			require.NoError(t, err)
			tasks := NewTasks(ctx, c, nil)
			defer tasks.Close()
			for _, name := range []string{"prepare", "app"} {
				k := TaskKey{"k8s.io", name}
				spec := &specs.Spec{Annotations: map[string]string{resourceinfo.AnnotationContainerName: name}}
				_, err := tasks.Create(ctx, TaskSpec{Key: k, SandboxID: "sb", Spec: spec})
				require.NoError(t, err)
				_, err = tasks.Start(ctx, k, "")
				require.NoError(t, err)
			}
			wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			p, err := tasks.Wait(wctx, TaskKey{"k8s.io", "prepare"}, "")
			require.NoError(t, err, "prepare completes through its pod's annotation")
			assert.Equal(t, uint32(3), p.ExitStatus)
			p, _, err = tasks.Process(TaskKey{"k8s.io", "app"}, "")
			require.NoError(t, err)
			assert.Equal(t, TaskRunning, p.Status, "app has no annotation: it runs on")
		})
	}
}
