package sandboxer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	goruntime "runtime"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/journal"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/periodic"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/statefile"
)

// QuarantineDir, under the state directory, receives sandbox directories
// whose state cannot be read, so one damaged sandbox never stops the others
// from loading and nothing is deleted that a human may want to look at.
const QuarantineDir = ".quarantine"

// recoverTimeout bounds the recovery of one sandbox: one that hangs in its
// backend must not hold up the others (containerd's CRI does the same).
const recoverTimeout = 30 * time.Second

// RecoverReport says what Recover found.
type RecoverReport struct {
	Loaded int
	Ready  int
	Exited []string // were ready, no longer run
	// Unknown were ready, and the backend could not say whether they
	// still run: retried in the background.
	Unknown     []string
	Quarantined []string
	Collected   []string // created but never started, past the grace time
}

// Recover loads every sandbox: the newest state of each is its last
// record in the journal, else its state.json (written by compaction). It
// finishes what a crash cut short (temp files, removals, creates that did
// not complete), rebuilds a directory or resource_info.json a power loss
// took, re-attaches ready sandboxes to the backend (those it says are gone
// become stopped; those it cannot tell about stay unknown and are retried
// in the background), quarantines what cannot be read and collects created
// sandboxes older than the grace time. Sandboxes load in parallel.
func (c *Controller) Recover(ctx context.Context) (RecoverReport, error) {
	start := time.Now()
	var rep RecoverReport
	replay := c.replay
	c.replay = nil
	if replay == nil {
		replay = &journal.Replay{}
	}
	latest := make(map[string]*journal.Record, len(replay.Records))
	for i := range replay.Records {
		r := &replay.Records[i]
		if cur, ok := latest[r.ID]; !ok || r.Seq > cur.Seq {
			latest[r.ID] = r
		}
	}
	damaged := map[string]bool{}
	for _, d := range replay.Damage {
		log.G(ctx).WithFields(log.Fields{"segment": d.Path, "offset": d.Offset, "sandboxes": d.IDs}).
			Error("the journal holds damaged records: " + d.Reason + "; a copy of the segment goes to " + QuarantineDir)
		if err := c.keepDamagedSegment(d.Path); err != nil {
			log.G(ctx).WithError(err).Warn("copy damaged journal segment")
		}
		for _, id := range d.IDs {
			// A later intact record supersedes the damaged one.
			if r, ok := latest[id]; !ok || r.Seq < d.Seq {
				damaged[id] = true
			}
		}
	}

	entries, err := os.ReadDir(c.opts.Root)
	if err != nil {
		return rep, err
	}
	var items []recoverItem
	listed := make(map[string]bool, len(entries))
	for _, e := range entries {
		name := e.Name()
		path := filepath.Join(c.opts.Root, name)
		switch {
		case strings.HasPrefix(name, trashPrefix):
			// Left by a version that removed sandboxes by renaming.
			if err := os.RemoveAll(path); err != nil {
				log.G(ctx).WithError(err).WithField("path", path).Warn("remove half-removed sandbox")
			}
			continue
		case strings.HasPrefix(name, statefile.TempPrefix):
			os.Remove(path)
			continue
		case strings.HasPrefix(name, "."):
			// The quarantine, the journal, the image list.
			continue
		}
		valid := ValidateID("sandbox", name) == nil
		if e.Type()&fs.ModeSymlink != 0 {
			if !valid {
				log.G(ctx).WithField("path", path).Warn("ignoring a symbolic link in the state directory")
				continue
			}
			// Never followed: the state directory is the daemon's own.
			// The link goes to the quarantine; the sandbox is rebuilt
			// from the journal when it holds it.
			log.G(ctx).WithField("path", path).Error("sandbox directory is a symbolic link; not following it, moving it to " + QuarantineDir)
			if err := c.quarantine(name); err != nil {
				log.G(ctx).WithError(err).WithField("path", path).Error("quarantine symbolic link")
				listed[name] = true
				continue
			}
			if r := latest[name]; r == nil || r.Kind != journal.Put {
				rep.Quarantined = append(rep.Quarantined, name)
				listed[name] = true
			}
			continue
		}
		if !e.IsDir() {
			continue
		}
		if !valid {
			log.G(ctx).WithField("path", path).Warn("ignoring directory that is not a sandbox")
			continue
		}
		listed[name] = true
		items = append(items, recoverItem{id: name, rec: latest[name], dir: true, damaged: damaged[name]})
	}
	for id, r := range latest {
		if !listed[id] && r.Kind == journal.Put {
			// Recorded, but its directory is gone (a power loss took
			// its creation): rebuilt.
			items = append(items, recoverItem{id: id, rec: r})
		}
	}

	var mu sync.Mutex
	work := make(chan recoverItem)
	var wg sync.WaitGroup
	for range min(len(items), max(4, 2*goruntime.GOMAXPROCS(0))) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for it := range work {
				sctx := log.WithLogger(ctx, log.G(ctx).WithField("sandbox", it.id))
				res, err := c.recoverOne(sctx, it)
				if err != nil {
					log.G(sctx).WithError(err).Error("sandbox state is unreadable, quarantining it")
					if qerr := c.quarantine(it.id); qerr != nil && !errors.Is(qerr, fs.ErrNotExist) {
						log.G(sctx).WithError(qerr).Error("quarantine sandbox")
					}
					if it.rec != nil || it.damaged {
						// Its older records must not bring it back.
						if err := c.commitRemoval(it.id); err != nil {
							log.G(sctx).WithError(err).Error("record the quarantine")
						}
					}
					res = recoverResult{quarantined: true}
				}
				mu.Lock()
				switch {
				case res.quarantined:
					rep.Quarantined = append(rep.Quarantined, it.id)
				case res.loaded:
					rep.Loaded++
					if res.ready {
						rep.Ready++
					}
					if res.exited {
						rep.Exited = append(rep.Exited, it.id)
					}
					if res.unknown {
						rep.Unknown = append(rep.Unknown, it.id)
					}
				}
				mu.Unlock()
			}
		}()
	}
	for _, it := range items {
		work <- it
	}
	close(work)
	wg.Wait()

	c.startCompactor()
	rep.Collected = append(rep.Collected, c.CollectCreated(ctx)...)
	// Recovery read every file: give back what it no longer needs.
	debug.FreeOSMemory()
	log.G(ctx).WithFields(log.Fields{
		"loaded": rep.Loaded, "ready": rep.Ready, "exited": len(rep.Exited), "unknown": len(rep.Unknown),
		"quarantined": len(rep.Quarantined), "collected": len(rep.Collected),
		"journal_records": len(replay.Records), "duration": time.Since(start),
	}).Info("sandboxes recovered")
	return rep, nil
}

// recoverItem is one sandbox to recover: its directory, its last journal
// record, or both.
type recoverItem struct {
	id      string
	rec     *journal.Record // nil: not in the journal
	dir     bool            // its directory exists
	damaged bool            // its last record is damaged
}

type recoverResult struct {
	loaded, ready, exited, unknown, quarantined bool
}

// errDamagedRecord: the journal's last record of a sandbox is damaged.
var errDamagedRecord = errors.New("its last record in the journal is damaged")

func (c *Controller) recoverOne(ctx context.Context, it recoverItem) (recoverResult, error) {
	ctx, cancel := context.WithTimeout(ctx, recoverTimeout)
	defer cancel()
	id, dir := it.id, c.Dir(it.id)
	// A write a crash cut short left a torn spare (statefile.SpareName),
	// never read and written over by the next write: nothing to clean.
	// The temp files of earlier versions (".tmp-" names) are not read
	// either, and go with the sandbox's directory; removing them cost
	// three unlinks a sandbox, a fifth of its recovery's CPU.
	var st *State
	var err error
	switch {
	case it.damaged:
		return recoverResult{}, errDamagedRecord
	case it.rec != nil && it.rec.Kind == journal.Delete:
		// Removed: finish what a crash cut short.
		return recoverResult{}, os.RemoveAll(dir)
	case it.rec != nil:
		if st, err = decodeState(it.rec.Payload, id); err != nil {
			return recoverResult{}, err
		}
		if !it.dir {
			log.G(ctx).Warn("rebuilding the directory of a recorded sandbox")
			if err := os.Mkdir(dir, 0o700); err != nil {
				return recoverResult{}, err
			}
		}
	default:
		st, err = loadState(dir, id)
		if errors.Is(err, fs.ErrNotExist) {
			// Neither recorded nor compacted: a Create interrupted
			// before its commit point. Nothing of it was acknowledged.
			log.G(ctx).Info("removing sandbox whose creation did not complete")
			if err := c.opts.Backend.Delete(ctx, id); err != nil {
				return recoverResult{}, fmt.Errorf("delete incomplete sandbox from backend: %w", err)
			}
			return recoverResult{}, os.RemoveAll(dir)
		}
		if err != nil {
			// Damaged, or empty: state.json is written by compaction
			// and synced before the journal lets go of what it holds,
			// so an empty one is damage whatever the sandbox's phase.
			return recoverResult{}, err
		}
	}
	if st.Mode != c.Mode() {
		return recoverResult{}, fmt.Errorf("sandbox belongs to mode %q, this daemon runs %q", st.Mode, c.Mode())
	}
	ri := st.ResourceInfo()
	if st.ResourcesUpdatedAt.IsZero() {
		// Written by a version that kept the time in resource_info.json
		// only.
		if old, err := ReadResourceInfo(dir); err == nil {
			st.ResourcesUpdatedAt = old.UpdatedAt
		}
	}
	ri.UpdatedAt = st.ResourcesUpdatedAt
	// resource_info.json is derived from the state: rewrite it when a
	// crash left it missing, damaged or stale, and only then, so that
	// starting with many sandboxes costs no writes.
	want, err := encodeInfo(st, ri)
	if err != nil {
		return recoverResult{}, err
	}
	if have, err := statefile.ReadSmall(filepath.Join(dir, ResourceInfoFile), nil); err != nil || !bytes.Equal(have, want) {
		log.G(ctx).Warn("rewriting resource_info.json from the sandbox state")
		if err := statefile.Replace(dir, ResourceInfoFile, want); err != nil {
			return recoverResult{}, err
		}
	}
	sb := &sandboxEntry{id: id, exited: make(chan struct{})}
	sb.snap.Store(&snapshot{state: st, info: ri})
	res := recoverResult{loaded: true}
	running := st.Phase == PhaseReady
	alive, err := c.opts.Backend.Recover(ctx, id, dir, ri, running, c.exitFunc(sb))
	switch {
	case !running:
		if err != nil {
			log.G(ctx).WithError(err).Warn("backend could not recover a sandbox that is not running")
		}
	case err == nil && alive:
	case err == nil || errdefs.IsNotFound(err):
		// The backend says it is gone.
		if err := c.markStopped(sb, unknownExitCode, c.opts.Now()); err != nil {
			return recoverResult{}, err
		}
		res.exited = true
		log.G(ctx).WithError(err).Warn("ready sandbox no longer runs; marked stopped")
	default:
		// Not known to be gone: a libvirt hiccup must not kill a pod.
		// It stays recorded as ready, reported not ready, and recovery
		// is tried again in the background.
		sb.unknown.Store(true)
		res.unknown = true
		log.G(ctx).WithError(err).Warn("backend could not recover the sandbox; it is unknown until a retry succeeds")
	}
	switch sb.snap.Load().state.Phase {
	case PhaseStopped:
		sb.closeOnce.Do(func() { close(sb.exited) })
	case PhaseReady:
		res.ready = !sb.unknown.Load()
		fallthrough
	default:
		c.opts.Admitter.Restore(id, ri.Resources)
	}
	c.mu.Lock()
	c.sandboxes[id] = sb
	c.mu.Unlock()
	if sb.unknown.Load() {
		c.retryRecover(sb)
	}
	return res, nil
}

// recoverRetry is the first delay of the retries of an unknown sandbox's
// recovery; it doubles up to recoverRetryMax.
var (
	recoverRetry    = time.Second
	recoverRetryMax = time.Minute
)

// retryRecover asks the backend again, with backoff, about a sandbox it
// could not recover, until it says the sandbox runs (ready again) or is
// gone (stopped), or a call stops or removes it.
func (c *Controller) retryRecover(sb *sandboxEntry) {
	c.bg.Add(1)
	go func() {
		defer c.bg.Done()
		ctx := log.WithLogger(c.background, log.L.WithField("sandbox", sb.id))
		delay := recoverRetry
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(delay):
			}
			delay = min(2*delay, recoverRetryMax)
			sb.op.Lock()
			snap := sb.snap.Load()
			if sb.gone || !sb.unknown.Load() || snap.state.Phase != PhaseReady {
				sb.op.Unlock()
				return
			}
			rctx, cancel := context.WithTimeout(ctx, recoverTimeout)
			alive, err := c.opts.Backend.Recover(rctx, sb.id, c.Dir(sb.id), snap.info, true, c.exitFunc(sb))
			cancel()
			switch {
			case err == nil && alive:
				sb.unknown.Store(false)
				log.G(ctx).Info("sandbox recovered: ready")
			case err == nil || errdefs.IsNotFound(err):
				if serr := c.markStopped(sb, unknownExitCode, c.opts.Now()); serr != nil {
					log.G(ctx).WithError(serr).Error("record that the sandbox is gone")
					sb.op.Unlock()
					continue
				}
				log.G(ctx).WithError(err).Warn("ready sandbox no longer runs; marked stopped")
			default:
				log.G(ctx).WithError(err).WithField("retry_in", delay).Warn("backend still cannot recover the sandbox")
				sb.op.Unlock()
				continue
			}
			sb.op.Unlock()
			return
		}
	}()
}

// keepDamagedSegment copies a journal segment with damage into the
// quarantine, for inspection; the journal goes on with what reads back.
func (c *Controller) keepDamagedSegment(path string) error {
	q := filepath.Join(c.opts.Root, QuarantineDir)
	if err := os.MkdirAll(q, 0o700); err != nil {
		return err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	dst := filepath.Join(q, fmt.Sprintf("journal-%s-%d", filepath.Base(path), time.Now().UnixNano()))
	return os.WriteFile(dst, data, 0o600)
}

// unknownExitCode is the exit status of a sandbox whose end was not seen,
// as containerd uses for a task that vanished.
const unknownExitCode = 255

// quarantine moves a sandbox's directory (or what is in its place) into
// the quarantine.
func (c *Controller) quarantine(id string) error {
	q := filepath.Join(c.opts.Root, QuarantineDir)
	if err := os.MkdirAll(q, 0o700); err != nil {
		return err
	}
	dst := filepath.Join(q, fmt.Sprintf("%s-%d", id, time.Now().UnixNano()))
	return os.Rename(c.Dir(id), dst)
}

// CollectCreated shuts down sandboxes that were created but not started
// within the grace time, and returns their IDs.
func (c *Controller) CollectCreated(ctx context.Context) []string {
	if c.opts.CreatedGrace <= 0 {
		return nil
	}
	var collected []string
	deadline := time.Now().Add(-c.opts.CreatedGrace)
	for _, v := range c.List() {
		if v.State.Phase != PhaseCreated || v.State.CreatedAt.After(deadline) {
			continue
		}
		id := v.State.ID
		sctx := log.WithLogger(ctx, log.G(ctx).WithField("sandbox", id))
		// Recheck under the lock: it may have started meanwhile.
		sb, unlock, err := c.lock(id)
		if err != nil {
			continue
		}
		st := sb.snap.Load().state
		unlock()
		if st.Phase != PhaseCreated {
			continue
		}
		log.G(sctx).WithField("created_at", st.CreatedAt).Info("collecting sandbox created but never started")
		if err := c.Shutdown(sctx, id); err != nil {
			log.G(sctx).WithError(err).Warn("collect sandbox")
			continue
		}
		collected = append(collected, id)
	}
	return collected
}

// RunCollector calls CollectCreated periodically until ctx ends.
func (c *Controller) RunCollector(ctx context.Context) {
	if c.opts.CreatedGrace <= 0 {
		return
	}
	interval := min(max(c.opts.CreatedGrace/2, time.Second), time.Minute)
	periodic.Run(ctx, interval, func() { c.CollectCreated(ctx) })
}
