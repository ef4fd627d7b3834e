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
	"syscall"
	"time"
	"unsafe"

	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/journal"
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
	// JournalSegmentSize is the size of the journal's segment files
	// (default journal.DefaultSegmentSize).
	JournalSegmentSize int64
	// CompactInterval is how often the journal is compacted when no
	// segment filled up meanwhile (default 5 minutes).
	CompactInterval time.Duration
}

// JournalDir, under the state directory, holds the journal.
const JournalDir = ".journal"

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

	// journal is the commit point of every change (see commit).
	journal *journal.Journal
	// pool makes and recycles sandbox directories (dirpool.go).
	pool *dirPool
	// replay is what the journal held when it was opened, for Recover.
	replay *journal.Replay
	// compactMu serializes compactions; compactHook, in tests, fails a
	// compaction at a step.
	compactMu   sync.Mutex
	compactHook func(step string) error
	// compactable is set once the journal's records at start are
	// recovered (startCompactor).
	compactable   atomic.Bool
	compactorOnce sync.Once
	// background is cancelled by Close; bg counts its goroutines.
	background context.Context
	stopBg     context.CancelFunc
	bg         sync.WaitGroup
	closeOnce  sync.Once
}

var _ sandbox.Controller = (*Controller)(nil)

// sandboxEntry is one sandbox in memory. op serializes the calls that
// change it; readers use the snapshot and never wait for a slow Start.
type sandboxEntry struct {
	id string

	op   sync.Mutex
	gone bool // removed, or its Create failed; guarded by op

	// store is held from the append of a record of the sandbox to the
	// publication of the snapshot it records, and by compaction while it
	// writes the sandbox's state.json: compaction so sees every record
	// of the segments it releases in the snapshot it writes. removed is
	// set, under it, once the sandbox's removal is recorded.
	store   sync.Mutex
	removed bool

	// unknown is set while the backend could not say whether a sandbox
	// recovered as ready still runs: it is not ready, and not stopped.
	unknown atomic.Bool

	snap atomic.Pointer[snapshot]
	// exited is closed once the sandbox has stopped or is removed.
	exited    chan struct{}
	closeOnce sync.Once
}

// snapshot is an immutable view of a sandbox; commit replaces it whole.
type snapshot struct {
	state *State
	info  resourceinfo.ResourceInfo
	// size is the length of the state's journal record.
	size int
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
	if opts.CompactInterval <= 0 {
		opts.CompactInterval = 5 * time.Minute
	}
	if err := os.MkdirAll(opts.Root, 0o700); err != nil {
		return nil, err
	}
	c := &Controller{opts: opts, sandboxes: map[string]*sandboxEntry{}, closing: make(chan struct{})}
	j, replay, err := journal.Open(filepath.Join(opts.Root, JournalDir), journal.Options{
		SegmentSize: opts.JournalSegmentSize,
		NoSync:      opts.NoSync,
		OnFailed:    c.relog,
	})
	if err != nil {
		return nil, fmt.Errorf("open journal: %w", storageError(filepath.Join(opts.Root, JournalDir), err))
	}
	c.journal, c.replay = j, replay
	if c.pool, err = newDirPool(opts.Root); err != nil {
		j.Close()
		return nil, err
	}
	c.background, c.stopBg = context.WithCancel(context.Background())
	c.bg.Add(1)
	go func() {
		defer c.bg.Done()
		c.pool.run(c.background)
	}()
	if len(replay.Records) == 0 && len(replay.Damage) == 0 {
		// Nothing in the journal to recover first.
		c.startCompactor()
	}
	return c, nil
}

// startCompactor starts compacting the journal in the background, once:
// when what the journal held at start has been recovered, since a
// compaction makes the sandboxes it does not know removed.
func (c *Controller) startCompactor() {
	c.compactorOnce.Do(func() {
		c.compactable.Store(true)
		c.bg.Add(1)
		go func() {
			defer c.bg.Done()
			c.runCompactor(c.background)
		}()
	})
}

// Close compacts the journal, so that the next start reads the sandboxes'
// own files only, stops the background work and closes the journal. The
// sandboxes stay as they are.
func (c *Controller) Close(ctx context.Context) error {
	var err error
	c.closeOnce.Do(func() {
		c.BeginShutdown()
		c.stopBg()
		c.bg.Wait()
		if cerr := c.Compact(ctx); cerr != nil {
			log.G(ctx).WithError(cerr).Warn("compact the journal on shutdown")
		}
		err = c.journal.Close()
	})
	return err
}

// abandon stops the background work and closes the journal without a
// compaction: what a killed daemon leaves (tests).
func (c *Controller) abandon() {
	c.closeOnce.Do(func() {
		c.BeginShutdown()
		c.stopBg()
		c.bg.Wait()
		c.journal.Close()
	})
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

// States returns every sandbox's state, without its resources: a lighter
// List for callers that visit many sandboxes. Do not modify them.
func (c *Controller) States() []*State {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make([]*State, 0, len(c.sandboxes))
	for _, sb := range c.sandboxes {
		if snap := sb.snap.Load(); snap != nil {
			out = append(out, snap.state)
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

// commit records st as the sandbox's state: one record appended to the
// journal is the commit point, shared with the commits of other sandboxes
// that arrive meanwhile (journal.Append). resource_info.json is derived
// from the state and written, without a sync of its own, only when the
// effective resources changed: atomically replaced, up to date when
// commit returns, and rebuilt from the journal by recovery when a power
// loss took it. state.json is only written by compaction (compact.go).
//
// A sandbox still in PhaseCreated is written but not synced: containerd
// starts it right after creating it, and its start's sync makes the
// create durable with it (records are synced in order). A power loss in
// between is a runp that failed; recovery removes what such a create left.
func (c *Controller) commit(sb *sandboxEntry, st *State) error {
	ri, changed := c.resourcesOf(sb.snap.Load(), st)
	return c.commitResources(sb, st, ri, changed)
}

// commitResources is commit with st's effective resources, ri, already
// computed (resourcesOf): changed says whether they differ from the
// sandbox's current ones.
func (c *Controller) commitResources(sb *sandboxEntry, st *State, ri resourceinfo.ResourceInfo, changed bool) error {
	old := sb.snap.Load()
	if changed {
		st.ResourcesUpdatedAt = time.Now().UTC()
		ri.UpdatedAt = st.ResourcesUpdatedAt
	}
	payload, err := encodeState(st)
	if err != nil {
		return err
	}
	var tmp, dir string
	if changed {
		data, err := encodeInfo(st, ri)
		if err != nil {
			return err
		}
		dir = c.Dir(sb.id)
		if tmp, err = statefile.WriteTemp(dir, ResourceInfoFile, data); err != nil {
			return fmt.Errorf("save sandbox %s: %w", sb.id, storageError(dir, err))
		}
	}
	sb.store.Lock()
	defer sb.store.Unlock()
	_, err = c.journal.Append(journal.Entry{
		Kind:    journal.Put,
		ID:      sb.id,
		Payload: payload,
		Frees:   old != nil && freesSpace(old.state, st),
		Durable: !c.opts.NoSync && st.Phase != PhaseCreated,
	})
	if err != nil {
		// The spare holds what was not recorded: never read.
		return fmt.Errorf("save sandbox %s: %w", sb.id, storageError(filepath.Join(c.opts.Root, JournalDir), err))
	}
	if tmp != "" {
		if err := statefile.Swap(tmp, filepath.Join(dir, ResourceInfoFile)); err != nil {
			// Recorded all the same: recovery rewrites the file.
			log.L.WithError(err).WithField("sandbox", sb.id).Error("replace " + ResourceInfoFile)
		}
	}
	sb.snap.Store(&snapshot{state: st, info: ri, size: len(payload)})
	return nil
}

// resourcesOf is the effective resources of st, whose previous state is
// old's, and whether they differ from old's. They are computed again only
// when their inputs (the pod's spec, the containers and their resources)
// changed: most changes (start, stop, a task's status) leave them.
func (c *Controller) resourcesOf(old *snapshot, st *State) (resourceinfo.ResourceInfo, bool) {
	if old == nil {
		return st.ResourceInfo(), true
	}
	if sameResourceInputs(old.state, st) {
		return old.info, false
	}
	ri := st.ResourceInfo()
	ri.UpdatedAt = old.info.UpdatedAt
	if reflect.DeepEqual(ri, old.info) {
		// Replaced by equal values (a resize to the same size).
		return old.info, false
	}
	return ri, true
}

// sameResourceInputs reports whether st has the resource inputs of old by
// identity: the same spec, the same values (pointers, maps) in the
// containers' resources, which a clone shares and a change replaces
// (State.clone), and the same exits. A false negative only costs a
// recomputation.
func sameResourceInputs(old, st *State) bool {
	if old.Spec != st.Spec || len(old.Containers) != len(st.Containers) {
		return false
	}
	for id, ctr := range st.Containers {
		o, ok := old.Containers[id]
		if !ok || !sameResources(&o.Resources, &ctr.Resources) {
			return false
		}
		// An exit goes into the pod's history (State.ResourceInfo).
		oe, os := exitOf(o)
		ne, ns := exitOf(ctr)
		if oe != ne || os != ns {
			return false
		}
	}
	return true
}

// sameResources compares two Resources word by word: every field is a
// pointer or a map, so equal words are the same values.
func sameResources(a, b *resourceinfo.Resources) bool {
	const n = unsafe.Sizeof(resourceinfo.Resources{})
	return *(*[n]byte)(unsafe.Pointer(a)) == *(*[n]byte)(unsafe.Pointer(b))
}

// freesSpace reports whether going from old to st lets space be freed (a
// stop, a container that ends or goes): such a record may use the space
// the journal keeps for when the disk is full, so that a full node can
// still stop and remove what fills it.
func freesSpace(old, st *State) bool {
	if st.Phase == PhaseStopped || len(st.Containers) < len(old.Containers) {
		return true
	}
	return liveTasks(st) < liveTasks(old)
}

// liveTasks counts the processes (init and exec) that have not ended.
func liveTasks(st *State) int {
	n := 0
	for _, ctr := range st.Containers {
		t := ctr.Task
		if t == nil {
			continue
		}
		if t.Status != TaskStopped {
			n++
		}
		for _, e := range t.Execs {
			if e.Status != TaskStopped {
				n++
			}
		}
	}
	return n
}

// commitRemoval records that a sandbox is gone; its directory is removed
// after. The caller holds the sandbox's store lock, if it has an entry.
func (c *Controller) commitRemoval(id string) error {
	_, err := c.journal.Append(journal.Entry{Kind: journal.Delete, ID: id, Frees: true, Durable: !c.opts.NoSync})
	if err != nil {
		return fmt.Errorf("remove sandbox %s: %w", id, storageError(filepath.Join(c.opts.Root, JournalDir), err))
	}
	return nil
}

// relog records again the current state of sandboxes whose records failed
// to be written or synced: the calls that made them failed, but the
// records may still reach the disk, and must not outlive a restart.
func (c *Controller) relog(ids []string) {
	for _, id := range ids {
		c.mu.RLock()
		sb := c.sandboxes[id]
		c.mu.RUnlock()
		var err error
		if sb == nil {
			err = c.commitRemoval(id)
		} else {
			sb.op.Lock()
			sb.store.Lock()
			switch snap := sb.snap.Load(); {
			case sb.gone || snap == nil:
				err = c.commitRemoval(id)
			default:
				var payload []byte
				if payload, err = encodeState(snap.state); err == nil {
					_, err = c.journal.Append(journal.Entry{Kind: journal.Put, ID: id, Payload: payload, Frees: true, Durable: !c.opts.NoSync})
				}
			}
			sb.store.Unlock()
			sb.op.Unlock()
		}
		if err != nil {
			log.L.WithError(err).WithField("sandbox", id).Error("record the sandbox again after a failed journal write")
		}
	}
}

// storageError makes a full disk a ResourceExhausted error naming path.
func storageError(path string, err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%s: %w: %w", path, errdefs.ErrResourceExhausted, err)
	}
	return err
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

// logResources logs a sandbox's new resources; encoded, when not nil, is
// its resource_info.json, which the debug line shows.
func logResources(ctx context.Context, msg string, ri resourceinfo.ResourceInfo, encoded []byte) {
	l := log.G(ctx)
	l.WithFields(log.Fields{
		"cpu_limit":    fmtPtr(ri.CPULimit),
		"memory_limit": fmtPtr(ri.MemoryLimit),
		"pid_limit":    fmtPtr(ri.PidLimit),
	}).Info(msg)
	if l.Logger.IsLevelEnabled(log.DebugLevel) {
		if encoded == nil {
			encoded, _ = json.Marshal(ri)
		}
		l.WithField("resource_info", string(encoded)).Debug(msg)
	}
}

func fmtPtr[T any](p *T) string {
	if p == nil {
		return "none"
	}
	return fmt.Sprint(*p)
}
