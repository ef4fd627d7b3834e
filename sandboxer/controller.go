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
	goruntime "runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	imagespec "github.com/opencontainers/image-spec/specs-go/v1"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

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

// Create records a sandbox, extracts its resources and prepares it in the
// backend. Nothing of it is left on disk when Create fails.
func (c *Controller) Create(ctx context.Context, info sandbox.Sandbox, opts ...sandbox.CreateOpt) (retErr error) {
	id := info.ID
	if err := ValidateID("sandbox", id); err != nil {
		return err
	}
	var o sandbox.CreateOptions
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return fmt.Errorf("%w: %v", errdefs.ErrInvalidArgument, err)
		}
	}
	cfg, err := podSandboxConfig(ctx, o.Options)
	if err != nil {
		return err
	}
	if err := validatePodConfig(cfg); err != nil {
		return err
	}
	spec, err := resourceinfo.FromPodSandboxConfig(cfg)
	if err != nil {
		return err
	}
	annotations := cfg.GetAnnotations()
	if len(annotations) == 0 && len(o.Annotations) > 0 {
		// Not from CRI: read the resources from the request's annotations.
		annotations = o.Annotations
		if spec.Annotations, err = resourceinfo.FromAnnotations(annotations); err != nil {
			return err
		}
	}
	var cfgJSON json.RawMessage
	if cfg != nil {
		// encoding/json, not protojson: containerd's CRI decodes it so.
		if cfgJSON, err = json.Marshal(cfg); err != nil {
			return fmt.Errorf("encode pod sandbox config: %w", err)
		}
	}

	sb := &sandboxEntry{id: id, dir: c.Dir(id), exited: make(chan struct{})}
	sb.op.Lock()
	defer sb.op.Unlock()
	c.mu.Lock()
	if _, ok := c.sandboxes[id]; ok {
		c.mu.Unlock()
		return fmt.Errorf("sandbox %s: %w", id, errdefs.ErrAlreadyExists)
	}
	c.sandboxes[id] = sb
	c.mu.Unlock()
	defer func() {
		if retErr != nil {
			sb.gone = true
			c.forget(id, sb)
		}
	}()

	if err := mkdirSandbox(sb.dir); err != nil {
		return err
	}
	defer func() {
		if retErr != nil {
			if err := os.RemoveAll(sb.dir); err != nil {
				log.G(ctx).WithError(err).Warn("remove directory of failed sandbox")
			}
		}
	}()

	st := &State{
		Version:     stateVersion,
		ID:          id,
		Mode:        c.Mode(),
		Phase:       PhaseCreated,
		CreatedAt:   c.opts.Now().UTC(),
		NetNSPath:   o.NetNSPath,
		Annotations: annotations,
		Config:      cfgJSON,
		Spec:        spec,
		Containers:  map[string]*Container{},
	}
	ri := st.ResourceInfo()
	if err := c.opts.Admitter.Admit(ctx, id, ri.Resources); err != nil {
		return err
	}
	defer func() {
		if retErr != nil {
			c.opts.Admitter.Release(id)
		}
	}()
	if err := c.opts.Backend.Create(ctx, id, sb.dir, ri); err != nil {
		return fmt.Errorf("%s backend: create sandbox %s: %w", c.Mode(), id, err)
	}
	defer func() {
		if retErr != nil {
			if err := c.opts.Backend.Delete(context.WithoutCancel(ctx), id); err != nil {
				log.G(ctx).WithError(err).Warn("delete failed sandbox from backend")
			}
		}
	}()
	// Not synced (see commit): Start makes the sandbox durable.
	if err := c.commit(sb, st); err != nil {
		return err
	}
	logResources(ctx, "sandbox created", ri)
	return nil
}

// Start runs a created sandbox and returns the task API address.
func (c *Controller) Start(ctx context.Context, id string) (sandbox.ControllerInstance, error) {
	sb, unlock, err := c.lock(id)
	if err != nil {
		return sandbox.ControllerInstance{}, err
	}
	defer unlock()
	cur := sb.snap.Load().state
	if cur.Phase != PhaseCreated {
		return sandbox.ControllerInstance{}, fmt.Errorf("sandbox %s is %s, not created: %w", id, cur.Phase, errdefs.ErrFailedPrecondition)
	}
	pid, err := c.opts.Backend.Start(ctx, id, c.exitFunc(sb))
	if err != nil {
		return sandbox.ControllerInstance{}, fmt.Errorf("%s backend: start sandbox %s: %w", c.Mode(), id, err)
	}
	st := cur.clone()
	now := c.opts.Now().UTC()
	st.Phase, st.StartedAt, st.Pid = PhaseReady, &now, pid
	st.Ledger.close(resourceinfo.Allocation{}, now, true)
	// Create did not sync the sandbox's entry in the state dir (see
	// commit): sync it before the first durable state.
	err = c.syncRoot()
	if err == nil {
		err = c.commit(sb, st)
	}
	if err != nil {
		if serr := c.opts.Backend.Stop(context.WithoutCancel(ctx), id, 0); serr != nil {
			log.G(ctx).WithError(serr).Warn("stop sandbox whose start could not be saved")
		}
		return sandbox.ControllerInstance{}, err
	}
	log.G(ctx).WithField("pid", pid).Info("sandbox started")
	return sandbox.ControllerInstance{
		SandboxID: id,
		Pid:       pid,
		CreatedAt: st.CreatedAt,
		Address:   c.opts.TaskAddress,
		Version:   TaskAPIVersion,
		Labels:    map[string]string{"mode": c.Mode()},
	}, nil
}

// Platform is the platform the sandbox's containers run on.
func (c *Controller) Platform(_ context.Context, id string) (imagespec.Platform, error) {
	if _, err := c.get(id); err != nil {
		return imagespec.Platform{}, err
	}
	return imagespec.Platform{OS: goruntime.GOOS, Architecture: goruntime.GOARCH}, nil
}

// Stop stops a sandbox. Stopping a stopped sandbox succeeds: kubelet calls
// StopPodSandbox repeatedly and CRI requires it to be idempotent.
func (c *Controller) Stop(ctx context.Context, id string, opts ...sandbox.StopOpt) error {
	var so sandbox.StopOptions
	for _, opt := range opts {
		opt(&so)
	}
	timeout := c.opts.StopTimeout
	if so.Timeout != nil && *so.Timeout > 0 {
		timeout = *so.Timeout
	}
	sb, unlock, err := c.lock(id)
	if err != nil {
		return err
	}
	defer unlock()
	return c.stopLocked(ctx, sb, timeout, 0)
}

// stopLocked moves a sandbox to stopped with the given exit status.
func (c *Controller) stopLocked(ctx context.Context, sb *sandboxEntry, timeout time.Duration, code uint32) error {
	cur := sb.snap.Load().state
	switch cur.Phase {
	case PhaseStopped:
		return nil
	case PhaseReady:
		if err := c.opts.Backend.Stop(ctx, sb.id, timeout); err != nil {
			return fmt.Errorf("%s backend: stop sandbox %s: %w", c.Mode(), sb.id, err)
		}
	}
	if err := c.markStopped(sb, code, c.opts.Now()); err != nil {
		return err
	}
	log.G(ctx).WithField("exit_status", code).Info("sandbox stopped")
	return nil
}

// markStopped records that a sandbox stopped at the given time with the
// given exit status: its tasks end, its allocation is released and its
// waiters return. The caller holds the sandbox's operation lock.
func (c *Controller) markStopped(sb *sandboxEntry, code uint32, at time.Time) error {
	snap := sb.snap.Load()
	st := snap.state.clone()
	at = at.UTC()
	st.Phase, st.ExitedAt, st.ExitStatus, st.Pid = PhaseStopped, &at, code, 0
	st.Ledger.close(snap.info.Allocation(), at, false)
	stopTasks(st, at)
	if err := c.commit(sb, st); err != nil {
		return err
	}
	c.opts.Admitter.Release(sb.id)
	sb.closeOnce.Do(func() { close(sb.exited) })
	c.notifyTasks(sb.id)
	return nil
}

// stopTasks ends the tasks of a stopping sandbox as SIGKILL would.
func stopTasks(st *State, at time.Time) {
	for _, ctr := range st.Containers {
		if t := ctr.Task; t != nil && t.Status != TaskStopped {
			t.Status, t.ExitStatus, t.ExitedAt = TaskStopped, exitCodeKilled, &at
		}
	}
}

// exitCodeKilled is the exit status of a process killed by SIGKILL.
const exitCodeKilled = 128 + 9

// notifyTasks tells the task server that the tasks of a sandbox changed
// outside the task API (the sandbox stopped, exited or was removed).
func (c *Controller) notifyTasks(sandboxID string) {
	if fn := c.taskHook.Load(); fn != nil {
		(*fn)(sandboxID)
	}
}

// exitFunc is how a backend reports that a sandbox stopped by itself.
func (c *Controller) exitFunc(sb *sandboxEntry) ExitFunc {
	return func(code uint32, at time.Time) {
		go func() {
			ctx := log.WithLogger(context.Background(), log.L.WithField("sandbox", sb.id))
			sb.op.Lock()
			defer sb.op.Unlock()
			if sb.gone || sb.snap.Load().state.Phase != PhaseReady {
				return
			}
			if err := c.markStopped(sb, code, at); err != nil {
				log.G(ctx).WithError(err).Error("record sandbox exit")
				return
			}
			log.G(ctx).WithField("exit_status", code).Warn("sandbox exited unexpectedly")
		}()
	}
}

// Wait blocks until the sandbox stops, or ctx ends.
func (c *Controller) Wait(ctx context.Context, id string) (sandbox.ExitStatus, error) {
	sb, err := c.get(id)
	if err != nil {
		return sandbox.ExitStatus{}, err
	}
	select {
	case <-sb.exited:
	case <-ctx.Done():
		return sandbox.ExitStatus{}, ctx.Err()
	case <-c.closing:
		return sandbox.ExitStatus{}, errShuttingDown
	}
	st := sb.snap.Load().state
	es := sandbox.ExitStatus{ExitStatus: st.ExitStatus}
	if st.ExitedAt != nil {
		es.ExitedAt = *st.ExitedAt
	}
	return es, nil
}

// Status reports a sandbox's state; verbose adds its ResourceInfo, usage
// and config under the "info" key, which crictl inspectp shows.
func (c *Controller) Status(ctx context.Context, id string, verbose bool) (sandbox.ControllerStatus, error) {
	sb, err := c.get(id)
	if err != nil {
		return sandbox.ControllerStatus{}, err
	}
	snap := sb.snap.Load()
	st := snap.state
	status := sandbox.ControllerStatus{
		SandboxID: id,
		Pid:       st.Pid,
		State:     StateNotReady,
		CreatedAt: st.CreatedAt,
	}
	if st.Phase == PhaseReady {
		status.State = StateReady
		status.Address = c.opts.TaskAddress
		status.Version = TaskAPIVersion
	}
	if st.ExitedAt != nil {
		status.ExitedAt = *st.ExitedAt
	}
	if !verbose {
		return status, nil
	}
	var usage *resourceinfo.Usage
	if st.Phase == PhaseReady {
		if u, _, err := c.Usage(ctx, id); err != nil {
			log.G(ctx).WithError(err).Warn("sandbox usage")
		} else {
			usage = &u
		}
	}
	status.Info, err = verboseInfo(st, sb.dir, snap.info, usage)
	if err != nil {
		return sandbox.ControllerStatus{}, err
	}
	return status, nil
}

// verboseInfo is the info map of a verbose Status, which crictl inspectp
// prints key by key. containerd's CRI decodes and re-encodes the "info"
// key as its own SandboxInfo (keeping only its fields), so ours are under
// their own keys: "resourceInfo" and "sandboxer".
func verboseInfo(st *State, dir string, ri resourceinfo.ResourceInfo, usage *resourceinfo.Usage) (map[string]string, error) {
	criInfo := struct {
		Pid    uint32          `json:"pid"`
		Status string          `json:"processStatus"`
		Config json.RawMessage `json:"config,omitempty"`
	}{Pid: st.Pid, Status: string(st.Phase), Config: st.Config}
	own := struct {
		Mode  string              `json:"mode"`
		Phase Phase               `json:"phase"`
		Dir   string              `json:"dir"`
		Usage *resourceinfo.Usage `json:"usage,omitempty"`
	}{st.Mode, st.Phase, dir, usage}
	info := map[string]string{}
	for key, v := range map[string]any{"info": criInfo, "resourceInfo": ri, "sandboxer": own} {
		data, err := json.Marshal(v)
		if err != nil {
			return nil, err
		}
		info[key] = string(data)
	}
	return info, nil
}

// Shutdown stops the sandbox if needed and deletes it with all its files.
func (c *Controller) Shutdown(ctx context.Context, id string) error {
	sb, unlock, err := c.lock(id)
	if err != nil {
		return err
	}
	defer unlock()
	if err := c.stopLocked(ctx, sb, 0, 0); err != nil {
		return err
	}
	if err := c.opts.Backend.Delete(ctx, id); err != nil {
		return fmt.Errorf("%s backend: delete sandbox %s: %w", c.Mode(), id, err)
	}
	if err := c.removeDir(sb.dir); err != nil {
		return err
	}
	sb.gone = true
	c.forget(id, sb)
	c.opts.Admitter.Release(id)
	c.notifyTasks(id)
	log.G(ctx).Info("sandbox shut down")
	return nil
}

// removeDir renames the directory out of the way, which is the atomic
// point of removal, then deletes it.
func (c *Controller) removeDir(dir string) error {
	// IDs are unique among live sandboxes, so is the trash name; one left
	// by an earlier crash is removed first.
	trash := filepath.Join(c.opts.Root, trashPrefix+filepath.Base(dir))
	if err := os.RemoveAll(trash); err != nil {
		return err
	}
	if err := os.Rename(dir, trash); err != nil {
		return fmt.Errorf("remove sandbox directory: %w", err)
	}
	if err := c.syncRoot(); err != nil {
		return err
	}
	return os.RemoveAll(trash)
}

func (c *Controller) syncRoot() error {
	if c.opts.NoSync {
		return nil
	}
	return statefile.SyncDir(c.opts.Root)
}

// Metrics returns the sandbox's usage as cgroup metrics.
func (c *Controller) Metrics(ctx context.Context, id string) (*types.Metric, error) {
	sb, err := c.get(id)
	if err != nil {
		return nil, err
	}
	snap := sb.snap.Load()
	u, _, err := c.Usage(ctx, id)
	if err != nil {
		return nil, err
	}
	data, err := typeurl.MarshalAnyToProto(CgroupMetrics(snap.info.Resources, u))
	if err != nil {
		return nil, err
	}
	return &types.Metric{ID: id, Timestamp: timestamp(u.Timestamp), Data: data}, nil
}

// Update applies changes containerd makes to a sandbox. With in-place pod
// resize (containerd ≥ 2.2) the new pod resources come as the
// "updated-resources" extension.
func (c *Controller) Update(ctx context.Context, id string, info sandbox.Sandbox, fields ...string) error {
	ext, ok := info.Extensions[UpdatedResourcesKey]
	if !ok {
		// Labels, spec or other extensions: nothing resource-related.
		if _, err := c.get(id); err != nil {
			return err
		}
		return nil
	}
	linux, overhead, err := decodeUpdatedResources(ext)
	if err != nil {
		return err
	}
	return c.UpdateSpec(ctx, id, func(spec *resourceinfo.Spec) error {
		if linux != nil {
			spec.Linux = *linux
		}
		if overhead != nil {
			spec.Overhead = *overhead
		}
		return nil
	})
}

// UpdateSpec changes a sandbox's pod-level resources, applies them in the
// backend and persists them.
func (c *Controller) UpdateSpec(ctx context.Context, id string, change func(*resourceinfo.Spec) error) error {
	return c.change(ctx, id, func(st *State) error { return change(&st.Spec) })
}

// SetContainer records (res != nil) or forgets (res == nil) a container's
// resources and recomputes the sandbox totals.
func (c *Controller) SetContainer(ctx context.Context, sandboxID, containerID string, res *resourceinfo.Resources) error {
	if err := ValidateID("container", containerID); err != nil {
		return err
	}
	return c.change(ctx, sandboxID, func(st *State) error {
		if res == nil {
			delete(st.Containers, containerID)
			return nil
		}
		if st.Phase == PhaseStopped {
			return fmt.Errorf("sandbox %s is stopped: %w", sandboxID, errdefs.ErrFailedPrecondition)
		}
		if st.Containers == nil {
			st.Containers = map[string]*Container{}
		}
		if ctr, ok := st.Containers[containerID]; ok {
			ctr.Resources = *res
		} else {
			st.Containers[containerID] = &Container{Resources: *res}
		}
		return nil
	})
}

// change applies fn to a copy of the state; the sandbox changes only if fn,
// the backend and the write to disk all succeed.
func (c *Controller) change(ctx context.Context, id string, fn func(*State) error) error {
	sb, unlock, err := c.lock(id)
	if err != nil {
		return err
	}
	defer unlock()
	old := sb.snap.Load()
	st := old.state.clone()
	if err := fn(st); err != nil {
		return err
	}
	ri := st.ResourceInfo()
	ri.UpdatedAt = old.info.UpdatedAt
	if reflect.DeepEqual(ri, old.info) {
		// A task's status changed, not the resources: only persist.
		// Synced like the rest: an unsynced rename over the synced
		// state could leave an empty file after a power loss.
		return c.commit(sb, st)
	}
	holds := st.Phase != PhaseStopped
	if holds {
		if err := c.opts.Admitter.Admit(ctx, id, ri.Resources); err != nil {
			return err
		}
		// A running sandbox is charged at its old size up to now.
		if st.Ledger.Since != nil {
			st.Ledger.close(old.info.Allocation(), c.opts.Now(), true)
		}
	}
	undo := func() {
		if holds {
			c.opts.Admitter.Restore(id, old.info.Resources)
		}
	}
	if err := c.opts.Backend.Update(ctx, id, ri); err != nil {
		undo()
		return fmt.Errorf("%s backend: update sandbox %s: %w", c.Mode(), id, err)
	}
	if err := c.commit(sb, st); err != nil {
		undo()
		// Put the backend back to what is on disk.
		if rerr := c.opts.Backend.Update(context.WithoutCancel(ctx), id, old.info); rerr != nil {
			log.G(ctx).WithError(rerr).Error("restore sandbox resources after failed save")
		}
		return err
	}
	logResources(ctx, "sandbox resources updated", ri)
	return nil
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

// podSandboxConfig decodes the CRI config containerd passes as options. A
// caller other than CRI may pass nothing, or another type, which is not
// an error: such a sandbox is sized from its annotations only.
func podSandboxConfig(ctx context.Context, opts typeurl.Any) (*runtime.PodSandboxConfig, error) {
	if opts == nil || opts.GetTypeUrl() == "" {
		return nil, nil
	}
	v, err := typeurl.UnmarshalAny(opts)
	if err != nil {
		if typeurl.Is(opts, &runtime.PodSandboxConfig{}) {
			return nil, fmt.Errorf("%w: malformed PodSandboxConfig in options: %v", errdefs.ErrInvalidArgument, err)
		}
		log.G(ctx).WithField("type", opts.GetTypeUrl()).Warn("ignoring sandbox options of unknown type")
		return nil, nil
	}
	cfg, ok := v.(*runtime.PodSandboxConfig)
	if !ok {
		log.G(ctx).WithField("type", opts.GetTypeUrl()).Warn("ignoring sandbox options that are not a PodSandboxConfig")
		return nil, nil
	}
	return cfg, nil
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
