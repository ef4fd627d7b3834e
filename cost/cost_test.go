package cost

import (
	"context"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

var prices = Prices{CPUCoreHour: 0.04, MemoryGiBHour: 0.005, PidHour: 0.0001, StorageGiBHour: 0.0002, Currency: "EUR"}

func TestOf(t *testing.T) {
	e := prices.Of(sandboxer.Ledger{
		CPUCoreSeconds:    2 * 3600,             // 2 core-hours
		MemoryByteSeconds: 4 * (1 << 30) * 3600, // 4 GiB-hours
		PidSeconds:        100 * 3600,
		StorageByteSecs:   10 * (1 << 30) * 1800,
	})
	assert.InDelta(t, 2, e.CPUCoreHours, 1e-12)
	assert.InDelta(t, 4, e.MemoryGiBHours, 1e-12)
	assert.InDelta(t, 100, e.PidHours, 1e-12)
	assert.InDelta(t, 5, e.StorageGiBHours, 1e-12)
	assert.InDelta(t, 0.08, e.CPU, 1e-12)
	assert.InDelta(t, 0.02, e.Memory, 1e-12)
	assert.InDelta(t, 0.01, e.Pids, 1e-12)
	assert.InDelta(t, 0.001, e.Storage, 1e-12)
	assert.InDelta(t, 0.111, e.Total, 1e-12)
	assert.False(t, prices.Free())
	assert.True(t, Prices{Currency: "USD"}.Free())
	assert.Zero(t, Prices{}.Of(sandboxer.Ledger{CPUCoreSeconds: 1e9}).Total)
}

// TestControllerCost runs sandboxes through a real controller with an
// injected clock: created time is free, running time is charged at the
// allocation it had, a resize changes the rate from then on, stopped time
// is free.
func TestControllerCost(t *testing.T) {
	ctx := context.Background()
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	c, err := sandboxer.New(sandboxer.Options{Root: t.TempDir(), Backend: slot.New(), Now: clock})
	require.NoError(t, err)
	create := func(id string, a map[string]string) {
		require.NoError(t, c.Create(ctx, sandbox.Sandbox{ID: id}, sandbox.WithAnnotations(a)))
	}
	create("a", map[string]string{
		resourceinfo.AnnotationCPULimit: "2", resourceinfo.AnnotationMemoryLimit: "4Gi",
		resourceinfo.AnnotationPidLimit: "100", resourceinfo.AnnotationStorageLimit: "10Gi",
	})
	// Requests only: charged at the requests.
	create("b", map[string]string{resourceinfo.AnnotationCPURequest: "500m", resourceinfo.AnnotationMemoryRequest: "1Gi"})

	now = now.Add(time.Hour) // created: free
	_, err = c.Start(ctx, "a")
	require.NoError(t, err)
	_, err = c.Start(ctx, "b")
	require.NoError(t, err)
	now = now.Add(time.Hour)
	require.NoError(t, c.UpdateSpec(ctx, "a", func(s *resourceinfo.Spec) error {
		s.Annotations.CPULimit = ptr(1.0)
		return nil
	}))
	now = now.Add(30 * time.Minute)

	rep := prices.Report(c.List(), now)
	require.Len(t, rep.Sandboxes, 2)
	a, b := rep.Sandboxes[0], rep.Sandboxes[1]
	assert.Equal(t, "a", a.ID)
	assert.Equal(t, sandboxer.PhaseReady, a.Phase)
	assert.InDelta(t, 2*1+1*0.5, a.CPUCoreHours, 1e-9, "each segment at its own size")
	assert.InDelta(t, 4*1.5, a.MemoryGiBHours, 1e-9)
	assert.InDelta(t, 150, a.PidHours, 1e-9)
	assert.InDelta(t, 15, a.StorageGiBHours, 1e-9)
	wantA := 2.5*0.04 + 6*0.005 + 150*0.0001 + 15*0.0002
	assert.InDelta(t, wantA, a.Total, 1e-9)
	assert.InDelta(t, 0.5*1.5*0.04+1*1.5*0.005, b.Total, 1e-9)
	assert.InDelta(t, a.Total+b.Total, rep.Total.Total, 1e-9)
	assert.InDelta(t, a.CPUCoreHours+b.CPUCoreHours, rep.Total.CPUCoreHours, 1e-9)
	assert.Equal(t, "EUR", rep.Prices.Currency)
	assert.Equal(t, now, rep.At)

	// Stopped: no longer charged.
	require.NoError(t, c.Stop(ctx, "a"))
	stoppedAt := prices.Report(c.List(), now).Sandboxes[0].Total
	now = now.Add(10 * time.Hour)
	rep = prices.Report(c.List(), now)
	assert.InDelta(t, stoppedAt, rep.Sandboxes[0].Total, 1e-12)
	assert.InDelta(t, wantA, rep.Sandboxes[0].Total, 1e-9)
	assert.Equal(t, sandboxer.PhaseStopped, rep.Sandboxes[0].Phase)
	assert.InDelta(t, 0.5*11.5*0.04+1*11.5*0.005, rep.Sandboxes[1].Total, 1e-9)

	// The ledger survives a restart of the daemon.
	c2, err := sandboxer.New(sandboxer.Options{Root: c.Dir(""), Backend: slot.New(), Now: clock})
	require.NoError(t, err)
	_, err = c2.Recover(ctx)
	require.NoError(t, err)
	assert.InDelta(t, rep.Total.Total, prices.Report(c2.List(), now).Total.Total, 1e-9)

	assert.Empty(t, prices.Report(nil, now).Sandboxes)
}

func ptr[T any](v T) *T { return &v }
