// Package slot is the ResourceSlot backend: it simulates sandboxes and
// their containers. No process, VM or cgroup is created; a sandbox is its
// recorded resources, and a container a process that runs nothing but has
// a pid, a status, an exit, one line of output and the usage its
// annotations set: what capacity planning, control-plane tests and
// benchmarks of the sandbox and task APIs need.
package slot

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/containerd/errdefs"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// Mode is the name of this backend.
const Mode = "slot"

// Backend simulates sandboxes and their containers.
type Backend struct {
	mu        sync.Mutex
	sandboxes map[string]*sandbox

	ctrs *containers
}

var _ backend.Backend = (*Backend)(nil)

// New returns a slot backend.
func New() *Backend {
	b := &Backend{sandboxes: map[string]*sandbox{}}
	b.ctrs = newContainers()
	return b
}

// Mode is "slot".
func (b *Backend) Mode() string { return Mode }

// Containers returns the simulated containers, which report to ev.
func (b *Backend) Containers(ev backend.Events) backend.Containers {
	b.ctrs.ev = ev
	return b.ctrs
}

// Cleanup has nothing to clean: a slot holds nothing outside the record.
func (b *Backend) Cleanup(context.Context, map[string]bool) ([]string, error) { return nil, nil }

// Close stops the simulated containers' exit timers.
func (b *Backend) Close() error {
	b.ctrs.close()
	return nil
}

// sandbox is what a slot keeps of a sandbox: its resources, for the
// violations Usage reports, and whether it runs.
type sandbox struct {
	info    resourceinfo.ResourceInfo
	running bool
}

// Create keeps the sandbox's resources; the controller persists it.
// The pod's hostname, DNS and sysctls mean nothing to a simulation.
func (b *Backend) Create(_ context.Context, id, _ string, info resourceinfo.ResourceInfo, _ backend.Pod) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.sandboxes[id] = &sandbox{info: info}
	return nil
}

// Start marks the sandbox running. A slot never exits by itself, and has
// no process: its pid is 0.
func (b *Backend) Start(_ context.Context, id string, _ backend.ExitFunc) (uint32, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	sb, ok := b.sandboxes[id]
	if !ok {
		return 0, fmt.Errorf("slot %s: %w", id, errdefs.ErrNotFound)
	}
	sb.running = true
	return 0, nil
}

// Stop marks the sandbox stopped, and its containers with it.
func (b *Backend) Stop(_ context.Context, id string, _ time.Duration) error {
	b.mu.Lock()
	if sb, ok := b.sandboxes[id]; ok {
		sb.running = false
	}
	b.mu.Unlock()
	b.ctrs.stopSandbox(id, time.Now())
	return nil
}

// Update has nothing to enforce: the new resources are the record. It
// keeps them for the violations Usage reports.
func (b *Backend) Update(_ context.Context, id string, info resourceinfo.ResourceInfo) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if sb, ok := b.sandboxes[id]; ok {
		sb.info = info
	}
	return nil
}

// Usage of a simulated sandbox is the sum of its containers' simulated
// usage (their cpu-usage and memory-usage annotations), with the limits
// it exceeds.
func (b *Backend) Usage(_ context.Context, id string) (resourceinfo.Usage, error) {
	b.mu.Lock()
	sb, ok := b.sandboxes[id]
	var limits resourceinfo.Resources
	running := false
	if ok {
		// Read under the lock: Stop and Update write them.
		limits, running = sb.info.Resources, sb.running
	}
	b.mu.Unlock()
	if !running {
		return resourceinfo.Usage{}, fmt.Errorf("slot %s is not running: %w", id, errdefs.ErrFailedPrecondition)
	}
	return b.ctrs.usage(id, limits, time.Now()), nil
}

// Recover: a slot that was running still is; it lives in the record.
func (b *Backend) Recover(_ context.Context, id, _ string, info resourceinfo.ResourceInfo, running bool, _ backend.ExitFunc) (bool, error) {
	b.mu.Lock()
	b.sandboxes[id] = &sandbox{info: info, running: running}
	b.mu.Unlock()
	return running, nil
}

// Delete forgets the sandbox and its containers.
func (b *Backend) Delete(_ context.Context, id string) error {
	b.mu.Lock()
	delete(b.sandboxes, id)
	b.mu.Unlock()
	b.ctrs.forgetSandbox(id)
	return nil
}
