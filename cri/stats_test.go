package cri

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

func TestStats(t *testing.T) {
	e := newEnv(t)
	podID := e.runp(podConfig("stats", nil))
	sim := map[string]string{slot.AnnotationCPUUsage: "500m", slot.AnnotationMemoryUsage: "64Mi"}
	a := e.create(podID, containerConfig("a", sim, &runtime.LinuxContainerResources{MemoryLimitInBytes: 256 << 20}))
	b := e.create(podID, containerConfig("b", sim, &runtime.LinuxContainerResources{MemoryLimitInBytes: 128 << 20}))
	idle := e.create(podID, containerConfig("idle", nil, nil))
	e.start(a)
	e.start(b)
	time.Sleep(20 * time.Millisecond)

	for _, tc := range []struct {
		id    string
		avail uint64
	}{{a, 192 << 20}, {b, 64 << 20}} {
		resp, err := e.rt.ContainerStats(ctx, &runtime.ContainerStatsRequest{ContainerId: tc.id})
		require.NoError(t, err)
		s := resp.Stats
		assert.Equal(t, tc.id, s.Attributes.Id)
		assert.NotEmpty(t, s.Attributes.Metadata.Name)
		assert.Positive(t, s.Cpu.UsageCoreNanoSeconds.Value, "CPU time accrues at 500m")
		assert.Equal(t, uint64(500_000_000), s.Cpu.UsageNanoCores.Value)
		assert.Equal(t, uint64(64<<20), s.Memory.WorkingSetBytes.Value)
		assert.Equal(t, uint64(64<<20), s.Memory.UsageBytes.Value)
		assert.Equal(t, tc.avail, s.Memory.AvailableBytes.Value, "limit minus working set")
		assert.Zero(t, s.WritableLayer.UsedBytes.Value, "no writable layer")
	}

	resp, err := e.rt.ListContainerStats(ctx, &runtime.ListContainerStatsRequest{Filter: &runtime.ContainerStatsFilter{PodSandboxId: podID}})
	require.NoError(t, err)
	var ids []string
	for _, s := range resp.Stats {
		ids = append(ids, s.Attributes.Id)
	}
	assert.ElementsMatch(t, []string{a, b}, ids, "running containers only, not %s", idle)

	resp, err = e.rt.ListContainerStats(ctx, &runtime.ListContainerStatsRequest{Filter: &runtime.ContainerStatsFilter{LabelSelector: map[string]string{"ctr": "b"}}})
	require.NoError(t, err)
	require.Len(t, resp.Stats, 1)
	assert.Equal(t, b, resp.Stats[0].Attributes.Id)

	ps, err := e.rt.PodSandboxStats(ctx, &runtime.PodSandboxStatsRequest{PodSandboxId: podID})
	require.NoError(t, err)
	l := ps.Stats.Linux
	assert.Equal(t, podID, ps.Stats.Attributes.Id)
	assert.Equal(t, "stats", ps.Stats.Attributes.Metadata.Name)
	assert.Equal(t, uint64(128<<20), l.Memory.WorkingSetBytes.Value, "the sum of the containers")
	assert.Equal(t, uint64(1_000_000_000), l.Cpu.UsageNanoCores.Value)
	assert.Equal(t, uint64(2), l.Process.ProcessCount.Value)
	assert.Len(t, l.Containers, 2)
	// The pod is unlimited: one of its containers is.
	assert.Zero(t, l.Memory.AvailableBytes.Value)

	_, err = e.rt.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: a})
	require.NoError(t, err)
	list, err := e.rt.ListPodSandboxStats(ctx, &runtime.ListPodSandboxStatsRequest{Filter: &runtime.PodSandboxStatsFilter{Id: podID}})
	require.NoError(t, err)
	require.Len(t, list.Stats, 1)
	assert.Equal(t, uint64(64<<20), list.Stats[0].Linux.Memory.WorkingSetBytes.Value, "an exited container uses no memory")
	assert.Equal(t, uint64(1), list.Stats[0].Linux.Process.ProcessCount.Value)

	_, err = e.rt.PodSandboxStats(ctx, &runtime.PodSandboxStatsRequest{PodSandboxId: "nope"})
	assert.Equal(t, codes.NotFound, code(err))
	_, err = e.rt.ContainerStats(ctx, &runtime.ContainerStatsRequest{ContainerId: "nope"})
	assert.Equal(t, codes.NotFound, code(err))
}

func TestPodStatsLimit(t *testing.T) {
	e := newEnv(t)
	podID := e.runp(podConfig("limited", map[string]string{"resources.limits.memory": "1Gi"}))
	id := e.create(podID, containerConfig("a", map[string]string{slot.AnnotationMemoryUsage: "256Mi"}, nil))
	e.start(id)
	list, err := e.rt.ListPodSandboxStats(ctx, &runtime.ListPodSandboxStatsRequest{})
	require.NoError(t, err)
	require.Len(t, list.Stats, 1)
	assert.Equal(t, uint64(768<<20), list.Stats[0].Linux.Memory.AvailableBytes.Value, "the pod's effective limit minus its working set")
}
