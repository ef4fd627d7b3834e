// Package sandboxer is the sandbox controller: it keeps every sandbox's
// state and resources, persists them under <dir>/<sandbox-id>/, recovers
// them after a restart, and drives a Backend that makes them real. The gRPC
// service containerd calls (service.go) is a thin adapter over Controller.
package sandboxer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/statefile"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// CRI sandbox states, as containerd's CRI expects them from Status.
const (
	StateReady    = "SANDBOX_READY"
	StateNotReady = "SANDBOX_NOTREADY"
)

// TaskAPIVersion is the task API version of the address Start returns.
const TaskAPIVersion = 3

// trashPrefix marks a sandbox directory being removed: Shutdown renames the
// directory first, so a crash mid-removal cannot resurrect the sandbox.
const trashPrefix = ".trash-"

// Options configure a Controller.
type Options struct {
	// Root is the state directory, <dir> in <dir>/<sandbox-id>/.
	Root string
	// Backend realizes the sandboxes.
	Backend Backend
	// TaskAddress is the task API address Start returns (ttrpc+unix://...).
	TaskAddress string
	// StopTimeout is used when Stop is called without a timeout.
	StopTimeout time.Duration
	// NoSync makes state writes atomic but not durable: they survive a
	// killed daemon, not a power loss. For slot mode used as a load
	// generator, where a commit's fsyncs dominate the cost of a call.
	NoSync bool
	// Admitter admits sandboxes against the node's capacity; nil admits
	// everything.
	Admitter Admitter
	// Now is the clock; nil is time.Now. Tests inject one.
	Now func() time.Time
	// CreatedGrace is how long a sandbox may stay created but not started
	// before it is garbage-collected (containerd leaves such sandboxes
	// behind when a RunPodSandbox fails while the daemon is down).
	CreatedGrace time.Duration
}

// Controller implements containerd's sandbox.Controller.
type Controller struct {
	opts Options

	mu        sync.RWMutex
	sandboxes map[string]*sandboxEntry

	taskHook atomic.Pointer[func(sandboxID string)]

	// closing is closed when the daemon shuts down, to end Wait calls,
	// which would otherwise hold a graceful stop until its timeout.
	closing     chan struct{}
	closingOnce sync.Once
}

var _ sandbox.Controller = (*Controller)(nil)

// sandboxEntry is one sandbox in memory. op serializes the calls that
// change it; readers use the snapshot and never wait for a slow Start.
type sandboxEntry struct {
	id, dir string

	op   sync.Mutex
	gone bool // removed, or its Create failed; guarded by op

	snap atomic.Pointer[snapshot]
	// exited is closed once the sandbox has stopped or is removed.
	exited    chan struct{}
	closeOnce sync.Once
}

// snapshot is an immutable view of a sandbox; commit replaces it whole.
type snapshot struct {
	state *State
	info  resourceinfo.ResourceInfo
}

// New returns a controller with no sandboxes; call Recover to load the
// ones on disk.
func New(opts Options) (*Controller, error) {
	if opts.Backend == nil {
		return nil, errors.New("sandboxer: no backend")
	}
	if opts.StopTimeout <= 0 {
		opts.StopTimeout = 10 * time.Second
	}
	if opts.Admitter == nil {
		opts.Admitter = noAdmission{}
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if err := os.MkdirAll(opts.Root, 0o700); err != nil {
		return nil, err
	}
	return &Controller{opts: opts, sandboxes: map[string]*sandboxEntry{}, closing: make(chan struct{})}, nil
}

// BeginShutdown ends pending Wait calls with Unavailable: the daemon is
// going away, the sandboxes are not.
func (c *Controller) BeginShutdown() {
	c.closingOnce.Do(func() { close(c.closing) })
}

var errShuttingDown = fmt.Errorf("resource-slot-sandboxer is shutting down: %w", errdefs.ErrUnavailable)

// Mode is the backend's mode.
func (c *Controller) Mode() string { return c.opts.Backend.Mode() }

// Dir is a sandbox's state directory.
func (c *Controller) Dir(id string) string { return filepath.Join(c.opts.Root, id) }

func (c *Controller) syncRoot() error {
	if c.opts.NoSync {
		return nil
	}
	return statefile.SyncDir(c.opts.Root)
}

// List returns a snapshot of every sandbox's state and resources.
func (c *Controller) List() []SandboxView {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make([]SandboxView, 0, len(c.sandboxes))
	for _, sb := range c.sandboxes {
		if snap := sb.snap.Load(); snap != nil {
			out = append(out, SandboxView{State: snap.state, ResourceInfo: snap.info})
		}
	}
	return out
}

// Get returns one sandbox's state and resources.
func (c *Controller) Get(id string) (SandboxView, error) {
	sb, err := c.get(id)
	if err != nil {
		return SandboxView{}, err
	}
	snap := sb.snap.Load()
	return SandboxView{State: snap.state, ResourceInfo: snap.info}, nil
}

// SandboxView is a read-only view of a sandbox; do not modify it.
type SandboxView struct {
	State        *State
	ResourceInfo resourceinfo.ResourceInfo
}

// commit persists st and makes it the sandbox's state. resource_info.json
// is rewritten only when the resources changed: most changes (start, stop,
// a task's status) leave them as they were.
//
// A sandbox still in PhaseCreated is written atomically but not synced:
// containerd starts it right after creating it, a power loss in between is
// the runp that failed, and recovery collects created sandboxes anyway
// (created_grace). This saves two of a pod's eight syncs.
func (c *Controller) commit(sb *sandboxEntry, st *State) error {
	ri := st.ResourceInfo()
	write := &ri
	if old := sb.snap.Load(); old != nil {
		ri.UpdatedAt = old.info.UpdatedAt
		if reflect.DeepEqual(ri, old.info) {
			write = nil
		} else {
			ri.UpdatedAt = time.Now().UTC()
		}
	}
	durable := !c.opts.NoSync && st.Phase != PhaseCreated
	if err := persist(sb.dir, durable, st, write); err != nil {
		return fmt.Errorf("save sandbox %s: %w", sb.id, err)
	}
	sb.snap.Store(&snapshot{state: st, info: ri})
	return nil
}

// get finds a sandbox that has been created.
func (c *Controller) get(id string) (*sandboxEntry, error) {
	if err := ValidateID("sandbox", id); err != nil {
		return nil, err
	}
	c.mu.RLock()
	sb, ok := c.sandboxes[id]
	c.mu.RUnlock()
	if !ok || sb.snap.Load() == nil {
		return nil, fmt.Errorf("sandbox %s: %w", id, errdefs.ErrNotFound)
	}
	return sb, nil
}

// lock finds a sandbox and takes its operation lock.
func (c *Controller) lock(id string) (*sandboxEntry, func(), error) {
	if err := ValidateID("sandbox", id); err != nil {
		return nil, nil, err
	}
	c.mu.RLock()
	sb, ok := c.sandboxes[id]
	c.mu.RUnlock()
	if !ok {
		return nil, nil, fmt.Errorf("sandbox %s: %w", id, errdefs.ErrNotFound)
	}
	sb.op.Lock()
	if sb.gone {
		sb.op.Unlock()
		return nil, nil, fmt.Errorf("sandbox %s: %w", id, errdefs.ErrNotFound)
	}
	return sb, sb.op.Unlock, nil
}

// forget drops a sandbox from memory and wakes its waiters.
func (c *Controller) forget(id string, sb *sandboxEntry) {
	c.mu.Lock()
	if c.sandboxes[id] == sb {
		delete(c.sandboxes, id)
	}
	c.mu.Unlock()
	sb.closeOnce.Do(func() { close(sb.exited) })
}

func logResources(ctx context.Context, msg string, ri resourceinfo.ResourceInfo) {
	l := log.G(ctx)
	l.WithFields(log.Fields{
		"cpu_limit":    fmtPtr(ri.CPULimit),
		"memory_limit": fmtPtr(ri.MemoryLimit),
		"pid_limit":    fmtPtr(ri.PidLimit),
	}).Info(msg)
	if l.Logger.IsLevelEnabled(log.DebugLevel) {
		data, _ := json.Marshal(ri)
		l.WithField("resource_info", string(data)).Debug(msg)
	}
}

func fmtPtr[T any](p *T) string {
	if p == nil {
		return "none"
	}
	return fmt.Sprint(*p)
}
