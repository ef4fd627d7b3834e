// Package slot is the ResourceSlot backend: it simulates sandboxes. No
// process, VM or cgroup is created; a sandbox is its recorded resources,
// which is what capacity planning, control-plane tests and benchmarks of
// the sandbox API need.
package slot

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/containerd/errdefs"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// Mode is the name of this backend.
const Mode = "slot"

// Backend simulates sandboxes. It implements sandboxer.Backend.
type Backend struct {
	mu      sync.Mutex
	running map[string]bool
}

// New returns a slot backend.
func New() *Backend { return &Backend{running: map[string]bool{}} }

// Mode is "slot".
func (b *Backend) Mode() string { return Mode }

// Create records nothing: the controller persists the sandbox.
func (b *Backend) Create(context.Context, string, string, resourceinfo.ResourceInfo) error {
	return nil
}

// Start marks the sandbox running. A slot never exits by itself, and has
// no process: its pid is 0.
func (b *Backend) Start(_ context.Context, id string, _ func(uint32, time.Time)) (uint32, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.running[id] = true
	return 0, nil
}

// Stop marks the sandbox stopped.
func (b *Backend) Stop(_ context.Context, id string, _ time.Duration) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.running, id)
	return nil
}

// Update has nothing to enforce: the new resources are the record.
func (b *Backend) Update(context.Context, string, resourceinfo.ResourceInfo) error { return nil }

// Usage of a simulated sandbox is zero: nothing runs in it.
func (b *Backend) Usage(_ context.Context, id string) (resourceinfo.Usage, error) {
	b.mu.Lock()
	running := b.running[id]
	b.mu.Unlock()
	if !running {
		return resourceinfo.Usage{}, fmt.Errorf("slot %s is not running: %w", id, errdefs.ErrFailedPrecondition)
	}
	var zero uint64
	return resourceinfo.Usage{
		Timestamp:    time.Now().UTC(),
		CPUTimeNanos: &zero,
		MemoryUsage:  &zero,
		Pids:         &zero,
	}, nil
}

// Recover: a slot that was running still is; it lives in the record.
func (b *Backend) Recover(_ context.Context, id, _ string, _ resourceinfo.ResourceInfo, running bool, _ func(uint32, time.Time)) (bool, error) {
	if running {
		b.mu.Lock()
		b.running[id] = true
		b.mu.Unlock()
	}
	return running, nil
}

// Delete forgets the sandbox.
func (b *Backend) Delete(_ context.Context, id string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.running, id)
	return nil
}
