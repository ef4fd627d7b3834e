package capacity

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

func ptr[T any](v T) *T { return &v }

const gi = int64(1) << 30

func res(cpu float64, mem int64) resourceinfo.Resources {
	r := resourceinfo.Resources{}
	if cpu > 0 {
		r.CPULimit = &cpu
	}
	if mem > 0 {
		r.MemoryLimit = &mem
	}
	return r
}

func newAdmitter(t *testing.T, policy Policy) *Admitter {
	t.Helper()
	a, err := New(Config{CPU: 4, Memory: 8 * gi, Pids: 1000, Policy: policy})
	require.NoError(t, err)
	return a
}

func resource(s Snapshot, r Resource) ResourceSnapshot { return s.Resources[r] }

func TestEnforce(t *testing.T) {
	ctx := context.Background()
	a := newAdmitter(t, Enforce)
	require.NoError(t, a.Admit(ctx, "a", res(2.5, 2*gi)))

	err := a.Admit(ctx, "b", res(2, gi))
	require.Error(t, err)
	assert.True(t, errdefs.IsResourceExhausted(err), "%v", err)
	assert.Contains(t, err.Error(), "cpu: request 2 cores exceeds the free 1.5 of 4 (capacity 4 × overcommit 1)")
	assert.NotContains(t, err.Error(), "memory:")

	// Both resources are named when both do not fit.
	err = a.Admit(ctx, "b", res(3, 7*gi))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "cpu: request 3 cores exceeds the free 1.5 of 4")
	assert.Contains(t, err.Error(), "memory: request 7Gi exceeds the free 6Gi of 8Gi (capacity 8Gi × overcommit 1)")

	// Exactly what is free fits.
	require.NoError(t, a.Admit(ctx, "b", res(1.5, 6*gi)))
	s := a.Snapshot()
	assert.Equal(t, 2, s.Sandboxes)
	assert.Equal(t, 4.0, resource(s, CPU).Allocated)
	assert.Equal(t, 0.0, resource(s, CPU).Free)
	assert.Equal(t, float64(8*gi), resource(s, Memory).Allocated)

	// A sandbox with no CPU allocation still fits a full CPU.
	require.NoError(t, a.Admit(ctx, "c", res(0, 0)))
	assert.Equal(t, []Rejection{{CPU, Enforce, 2}, {Memory, Enforce, 1}}, a.Snapshot().Rejections)
}

func TestResize(t *testing.T) {
	ctx := context.Background()
	a := newAdmitter(t, Enforce)
	require.NoError(t, a.Admit(ctx, "a", res(2, gi)))
	require.NoError(t, a.Admit(ctx, "b", res(1, gi)))
	// A resize counts what the sandbox held as free for itself.
	require.NoError(t, a.Admit(ctx, "a", res(3, gi)))
	err := a.Admit(ctx, "a", res(3.5, gi))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "cpu: request 3.5 cores exceeds the free 3 of 4")
	assert.Equal(t, 4.0, resource(a.Snapshot(), CPU).Allocated, "a refused resize changes nothing")

	// Over capacity (a smaller node after a restart): shrinking, or
	// keeping a resource as it is, is always admitted.
	a.Restore("big", res(8, gi))
	require.NoError(t, a.Admit(ctx, "a", res(2, 2*gi)))
	require.NoError(t, a.Admit(ctx, "a", res(2, 2*gi)))
	err = a.Admit(ctx, "a", res(2.001, 2*gi))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "exceeds the free 0 of 4")
}

func TestWarnAdmitsLogsAndCounts(t *testing.T) {
	var buf bytes.Buffer
	l := logrus.New()
	l.SetOutput(&buf)
	ctx := log.WithLogger(context.Background(), logrus.NewEntry(l))
	a := newAdmitter(t, Warn)
	require.NoError(t, a.Admit(ctx, "a", res(3, gi)))
	require.NoError(t, a.Admit(ctx, "b", res(3, gi)), "warn admits")
	assert.Equal(t, 6.0, resource(a.Snapshot(), CPU).Allocated)
	assert.Equal(t, 0.0, resource(a.Snapshot(), CPU).Free)
	assert.Equal(t, []Rejection{{CPU, Warn, 1}}, a.Snapshot().Rejections)
	out := buf.String()
	assert.Contains(t, out, "level=warning")
	assert.Contains(t, out, "sandbox=b")
	assert.Contains(t, out, "cpu: request 3 cores exceeds the free 1 of 4")
}

func TestOffAdmitsSilently(t *testing.T) {
	a := newAdmitter(t, Off)
	for i := range 10 {
		require.NoError(t, a.Admit(context.Background(), fmt.Sprint(i), res(4, 8*gi)))
	}
	s := a.Snapshot()
	assert.Equal(t, 40.0, resource(s, CPU).Allocated)
	assert.Empty(t, s.Rejections)
}

func TestRestoreAndRelease(t *testing.T) {
	a := newAdmitter(t, Enforce)
	a.Restore("a", res(3, gi))
	a.Restore("b", res(3, gi)) // never refuses
	assert.Equal(t, 6.0, resource(a.Snapshot(), CPU).Allocated)
	a.Restore("b", res(1, gi)) // replaces
	assert.Equal(t, 4.0, resource(a.Snapshot(), CPU).Allocated)
	a.Release("b")
	a.Release("b")
	a.Release("never")
	s := a.Snapshot()
	assert.Equal(t, 3.0, resource(s, CPU).Allocated)
	assert.Equal(t, float64(gi), resource(s, Memory).Allocated)
	assert.Equal(t, 1, s.Sandboxes)
	a.Release("a")
	s = a.Snapshot()
	for _, r := range s.Resources {
		assert.Zero(t, r.Allocated, r.Resource)
		assert.Zero(t, r.Limited, r.Resource)
		assert.Zero(t, r.Unlimited, r.Resource)
	}
}

func TestSnapshot(t *testing.T) {
	a, err := New(Config{CPU: 8, Memory: 16 * gi, Pids: 1000, CPUOvercommit: 2, MemoryOvercommit: 0.5, Policy: Enforce})
	require.NoError(t, err)
	ctx := context.Background()
	// limits and requests
	require.NoError(t, a.Admit(ctx, "a", resourceinfo.Resources{
		CPULimit: ptr(2.0), CPURequest: ptr(0.5), MemoryLimit: ptr(2 * gi), MemoryRequest: ptr(gi), PidLimit: ptr(int64(100)),
	}))
	// requests only: allocated at the request, not limited
	require.NoError(t, a.Admit(ctx, "b", resourceinfo.Resources{CPURequest: ptr(1.0), MemoryRequest: ptr(gi)}))
	s := a.Snapshot()
	assert.Equal(t, Enforce, s.Policy)
	assert.Equal(t, ResourceSnapshot{
		Resource: CPU, Capacity: 8, Overcommit: 2, Allocatable: 16,
		Allocated: 3, Requested: 1.5, Limited: 2, HasRequests: true, Unlimited: 1, Free: 13,
	}, resource(s, CPU))
	assert.Equal(t, ResourceSnapshot{
		Resource: Memory, Capacity: float64(16 * gi), Overcommit: 0.5, Allocatable: float64(8 * gi),
		Allocated: float64(3 * gi), Requested: float64(2 * gi), Limited: float64(2 * gi), HasRequests: true, Unlimited: 1, Free: float64(5 * gi),
	}, resource(s, Memory))
	assert.Equal(t, ResourceSnapshot{
		Resource: Pids, Capacity: 1000, Overcommit: 1, Allocatable: 1000,
		Allocated: 100, Limited: 100, Unlimited: 1, Free: 900,
	}, resource(s, Pids))

	err = a.Admit(ctx, "c", res(0, 6*gi))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "memory: request 6Gi exceeds the free 5Gi of 8Gi (capacity 16Gi × overcommit 0.5)")
}

// TestConcurrentAdmit: exactly as many as fit are admitted, and the
// accounting stays exact while others release concurrently.
func TestConcurrentAdmit(t *testing.T) {
	a, err := New(Config{CPU: 10, Memory: 100 * gi, Pids: 1 << 20, Policy: Enforce})
	require.NoError(t, err)
	var admitted sync.Map
	var n atomic.Int64
	var wg sync.WaitGroup
	try := func(id string) {
		defer wg.Done()
		if err := a.Admit(context.Background(), id, res(0.25, gi)); err == nil {
			admitted.Store(id, true)
			n.Add(1)
		} else {
			assert.True(t, errdefs.IsResourceExhausted(err))
		}
	}
	for i := range 200 {
		wg.Add(1)
		go try(fmt.Sprint("sb", i))
	}
	wg.Wait()
	assert.Equal(t, int64(40), n.Load())
	assert.Equal(t, 10.0, resource(a.Snapshot(), CPU).Allocated)

	// Release 20 while 100 more try.
	released := 0
	admitted.Range(func(k, _ any) bool {
		if released == 20 {
			return false
		}
		released++
		wg.Add(1)
		go func() { defer wg.Done(); a.Release(k.(string)); a.Release(k.(string)) }()
		n.Add(-1)
		return true
	})
	for i := range 100 {
		wg.Add(1)
		go try(fmt.Sprint("late", i))
	}
	wg.Wait()
	s := a.Snapshot()
	assert.Equal(t, int(n.Load()), s.Sandboxes)
	assert.Equal(t, float64(n.Load())*0.25, resource(s, CPU).Allocated)
	assert.LessOrEqual(t, resource(s, CPU).Allocated, 10.0)
	assert.Equal(t, float64(n.Load())*float64(gi), resource(s, Memory).Allocated)
}

func TestHostileValuesDoNotWrap(t *testing.T) {
	a := newAdmitter(t, Enforce)
	ctx := context.Background()
	err := a.Admit(ctx, "a", resourceinfo.Resources{MemoryLimit: ptr(int64(math.MaxInt64))})
	require.Error(t, err)
	a.Restore("b", resourceinfo.Resources{MemoryLimit: ptr(int64(math.MaxInt64))})
	a.Restore("c", resourceinfo.Resources{MemoryLimit: ptr(int64(math.MaxInt64))})
	assert.Equal(t, float64(math.MaxInt64), resource(a.Snapshot(), Memory).Allocated, "saturated, not negative")
	require.Error(t, a.Admit(ctx, "d", res(0, 1)))
	require.Error(t, a.Admit(ctx, "e", resourceinfo.Resources{CPULimit: ptr(1e30)}))
}

func TestNewErrors(t *testing.T) {
	_, err := New(Config{CPU: 1, Memory: 1, Pids: 1, Policy: "strict"})
	assert.ErrorContains(t, err, `unknown policy "strict"`)
	_, err = New(Config{CPU: 1, Memory: 1, Pids: 1, CPUOvercommit: -1})
	assert.ErrorContains(t, err, "overcommit of cpu")
	_, err = New(Config{CPU: 1, Memory: -1, Pids: 1})
	assert.ErrorContains(t, err, "memory must not be negative")
}

func TestHost(t *testing.T) {
	dir := t.TempDir()
	defer func(m, p string) { meminfoPath, pidMaxPath = m, p }(meminfoPath, pidMaxPath)
	meminfoPath, pidMaxPath = filepath.Join(dir, "meminfo"), filepath.Join(dir, "pid_max")
	require.NoError(t, os.WriteFile(meminfoPath, []byte("MemFree:  1 kB\nMemTotal:       16367428 kB\n"), 0o600))
	require.NoError(t, os.WriteFile(pidMaxPath, []byte("4194304\n"), 0o600))
	h, err := Host()
	require.NoError(t, err)
	assert.Equal(t, HostCapacity{CPU: float64(runtime.NumCPU()), Memory: 16367428 * 1024, Pids: 4194304}, h)

	// Zero values in the configuration come from the host.
	a, err := New(Config{CPU: 2})
	require.NoError(t, err)
	s := a.Snapshot()
	assert.Equal(t, 2.0, resource(s, CPU).Capacity)
	assert.Equal(t, float64(16367428*1024), resource(s, Memory).Capacity)
	assert.Equal(t, 4194304.0, resource(s, Pids).Capacity)
	assert.Equal(t, Off, s.Policy)

	require.NoError(t, os.WriteFile(meminfoPath, []byte("MemFree: 1 kB\n"), 0o600))
	_, err = Host()
	assert.ErrorContains(t, err, "no MemTotal")
	_, err = New(Config{})
	assert.ErrorContains(t, err, "set it in [capacity]")
	require.NoError(t, os.WriteFile(meminfoPath, []byte("MemTotal: 1 kB\n"), 0o600))
	require.NoError(t, os.WriteFile(pidMaxPath, []byte("lots\n"), 0o600))
	_, err = Host()
	assert.ErrorContains(t, err, "not a positive number")
}

func TestRealHost(t *testing.T) {
	h, err := Host()
	require.NoError(t, err)
	assert.Positive(t, h.CPU)
	assert.Positive(t, h.Memory)
	assert.Positive(t, h.Pids)
}

func TestFormat(t *testing.T) {
	for _, tc := range []struct {
		r    Resource
		v    int64
		unit bool
		want string
	}{
		{CPU, 1500, true, "1.5 cores"},
		{CPU, 1000, true, "1 core"},
		{CPU, 250, false, "0.25"},
		{CPU, 0, false, "0"},
		{Memory, 512, false, "512"},
		{Memory, 2 * gi, false, "2Gi"},
		{Memory, 1536 << 20, false, "1.5Gi"},
		{Memory, 100 << 20, false, "100Mi"},
		{Memory, math.MaxInt64, false, "8Ei"},
		{Pids, 500, true, "500"},
	} {
		assert.Equal(t, tc.want, FormatQuantity(tc.r, tc.v, tc.unit))
	}
}
