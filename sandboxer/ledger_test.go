package sandboxer

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

// capAdmitter admits up to a number of cores in total.
type capAdmitter struct {
	mu    sync.Mutex
	cap   float64
	held  map[string]float64
	total float64
}

func (a *capAdmitter) Admit(_ context.Context, id string, r resourceinfo.Resources) error {
	al := r.Allocation()
	a.mu.Lock()
	defer a.mu.Unlock()
	if next := a.total - a.held[id] + al.CPU; next > a.cap {
		return fmt.Errorf("cpu: %w", errdefs.ErrResourceExhausted)
	}
	a.total += al.CPU - a.held[id]
	a.held[id] = al.CPU
	return nil
}

func (a *capAdmitter) Restore(id string, r resourceinfo.Resources) {
	al := r.Allocation()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.total += al.CPU - a.held[id]
	a.held[id] = al.CPU
}

func (a *capAdmitter) Release(id string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.total -= a.held[id]
	delete(a.held, id)
}

func TestAdmission(t *testing.T) {
	ctx := context.Background()
	adm := &capAdmitter{cap: 4, held: map[string]float64{}}
	c := newTestController(t, Options{Root: t.TempDir(), Backend: slot.New(), Admitter: adm})
	cpu := func(v string) map[string]string { return map[string]string{resourceinfo.AnnotationCPULimit: v} }

	// Concurrent creates: exactly as many as fit are admitted.
	var wg sync.WaitGroup
	var mu sync.Mutex
	admitted := 0
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := create(ctx, c, fmt.Sprintf("sb%d", i), podConfig(cpu("1"), nil))
			if err == nil {
				mu.Lock()
				admitted++
				mu.Unlock()
			} else {
				assert.True(t, errdefs.IsResourceExhausted(err), "got %v", err)
			}
		}()
	}
	wg.Wait()
	assert.Equal(t, 4, admitted)
	assert.Equal(t, 4.0, adm.total)

	// Stopping one frees its cores; a resize past the cap is refused and
	// changes nothing.
	var first string
	for _, v := range c.List() {
		first = v.State.ID
		break
	}
	require.NoError(t, c.Stop(ctx, first))
	assert.Equal(t, 3.0, adm.total)
	require.NoError(t, create(ctx, c, "late", podConfig(cpu("1"), nil)))
	var other string
	for _, v := range c.List() {
		if v.State.Phase == PhaseCreated && v.State.ID != "late" {
			other = v.State.ID
			break
		}
	}
	err := c.UpdateSpec(ctx, other, func(s *resourceinfo.Spec) error { s.Annotations.CPULimit = ptrTo(2.0); return nil })
	assert.True(t, errdefs.IsResourceExhausted(err), "got %v", err)
	v, err := c.Get(other)
	require.NoError(t, err)
	assert.Equal(t, 1.0, *v.ResourceInfo.CPULimit)
	assert.Equal(t, 4.0, adm.total)

	// Recovery restores the accounting of the sandboxes that hold.
	adm2 := &capAdmitter{cap: 4, held: map[string]float64{}}
	c.abandon()
	c2 := newTestController(t, Options{Root: c.opts.Root, Backend: slot.New(), Admitter: adm2})
	_, err = c2.Recover(ctx)
	require.NoError(t, err)
	assert.Equal(t, 4.0, adm2.total)
}

func TestLedger(t *testing.T) {
	ctx := context.Background()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	c := newTestController(t, Options{Root: t.TempDir(), Backend: slot.New(), Now: clock})
	require.NoError(t, create(ctx, c, "sb", podConfig(map[string]string{
		resourceinfo.AnnotationCPULimit: "1", resourceinfo.AnnotationMemoryLimit: "1Gi",
	}, nil)))
	now = now.Add(time.Hour) // created, not running: not charged
	_, err := c.Start(ctx, "sb")
	require.NoError(t, err)
	now = now.Add(time.Hour)
	require.NoError(t, c.UpdateSpec(ctx, "sb", func(s *resourceinfo.Spec) error { s.Annotations.CPULimit = ptrTo(2.0); return nil }))
	now = now.Add(30 * time.Minute)

	v, err := c.Get("sb")
	require.NoError(t, err)
	l := v.State.Ledger.At(v.ResourceInfo.Allocation(), now)
	assert.InDelta(t, 3600*1+1800*2, l.CPUCoreSeconds, 1e-6, "each segment at its own size")
	assert.InDelta(t, 5400*float64(1<<30), l.MemoryByteSeconds, 1)

	require.NoError(t, c.Stop(ctx, "sb"))
	now = now.Add(time.Hour) // stopped: no longer charged
	v, err = c.Get("sb")
	require.NoError(t, err)
	assert.Nil(t, v.State.Ledger.Since)
	l = v.State.Ledger.At(v.ResourceInfo.Allocation(), now)
	assert.InDelta(t, 7200.0, l.CPUCoreSeconds, 1e-6)
}
