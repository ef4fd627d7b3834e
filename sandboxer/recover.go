package sandboxer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"time"

	"github.com/containerd/log"

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
	Loaded      int
	Ready       int
	Exited      []string // were ready, no longer run
	Quarantined []string
	Collected   []string // created but never started, past the grace time
}

// Recover loads every sandbox on disk: it removes the temp files and
// half-removed directories a crash can leave, re-attaches ready sandboxes
// to the backend (those that no longer run become stopped), quarantines the
// unreadable ones and collects created sandboxes older than the grace time.
func (c *Controller) Recover(ctx context.Context) (RecoverReport, error) {
	var rep RecoverReport
	entries, err := os.ReadDir(c.opts.Root)
	if err != nil {
		return rep, err
	}
	for _, e := range entries {
		name := e.Name()
		path := filepath.Join(c.opts.Root, name)
		switch {
		case strings.HasPrefix(name, trashPrefix):
			if err := os.RemoveAll(path); err != nil {
				log.G(ctx).WithError(err).WithField("path", path).Warn("remove half-removed sandbox")
			}
			continue
		case strings.HasPrefix(name, statefile.TempPrefix):
			os.Remove(path)
			continue
		case name == QuarantineDir || !e.IsDir():
			continue
		}
		if ValidateID("sandbox", name) != nil {
			log.G(ctx).WithField("path", path).Warn("ignoring directory that is not a sandbox")
			continue
		}
		sctx := log.WithLogger(ctx, log.G(ctx).WithField("sandbox", name))
		if err := c.recoverOne(sctx, name, &rep); err != nil {
			log.G(sctx).WithError(err).Error("sandbox state is unreadable, quarantining it")
			if qerr := c.quarantine(name); qerr != nil {
				log.G(sctx).WithError(qerr).Error("quarantine sandbox")
			}
			rep.Quarantined = append(rep.Quarantined, name)
		}
	}
	if err := statefile.SyncDir(c.opts.Root); err != nil {
		return rep, err
	}
	rep.Collected = append(rep.Collected, c.CollectCreated(ctx)...)
	log.G(ctx).WithFields(log.Fields{
		"loaded": rep.Loaded, "ready": rep.Ready, "exited": len(rep.Exited),
		"quarantined": len(rep.Quarantined), "collected": len(rep.Collected),
	}).Info("sandboxes recovered")
	return rep, nil
}

func (c *Controller) recoverOne(ctx context.Context, id string, rep *RecoverReport) error {
	ctx, cancel := context.WithTimeout(ctx, recoverTimeout)
	defer cancel()
	dir := c.Dir(id)
	if removed, err := statefile.RemoveTemp(dir); err != nil {
		return err
	} else if len(removed) > 0 {
		log.G(ctx).WithField("files", removed).Info("removed temp files of an interrupted write")
	}
	st, err := loadState(dir, id)
	if errors.Is(err, os.ErrNotExist) || (err != nil && !c.opts.NoSync && emptyFile(filepath.Join(dir, StateFile))) {
		// Create was interrupted before its commit point, or a power
		// loss took its unsynced state (every later write syncs the
		// data before the rename, so only a created sandbox's state can
		// be empty): the sandbox was never started, so nothing is lost
		// by removing it. Without fsync any state can be empty after a
		// power loss, and is quarantined as damaged.
		log.G(ctx).Info("removing sandbox whose creation did not complete")
		if err := c.opts.Backend.Delete(ctx, id); err != nil {
			return fmt.Errorf("delete incomplete sandbox from backend: %w", err)
		}
		return c.removeDir(dir)
	}
	if err != nil {
		return err
	}
	if st.Mode != c.Mode() {
		return fmt.Errorf("sandbox belongs to mode %q, this daemon runs %q", st.Mode, c.Mode())
	}
	sb := &sandboxEntry{id: id, dir: dir, exited: make(chan struct{})}
	ri := st.ResourceInfo()
	running := st.Phase == PhaseReady
	alive, err := c.opts.Backend.Recover(ctx, id, dir, ri, running, c.exitFunc(sb))
	if err != nil {
		log.G(ctx).WithError(err).Warn("backend could not recover the sandbox; treating it as exited")
		alive = false
	}
	changed := false
	if running && !alive {
		now := c.opts.Now().UTC()
		st.Phase, st.ExitedAt, st.ExitStatus, st.Pid = PhaseStopped, &now, unknownExitCode, 0
		st.Ledger.close(ri.Allocation(), now, false)
		stopTasks(st, now)
		changed = true
		rep.Exited = append(rep.Exited, id)
		log.G(ctx).Warn("ready sandbox no longer runs; marked stopped")
	}
	// resource_info.json is derived from state.json: rewrite it when a
	// crash left it missing, damaged or stale, and only then, so that
	// starting with many sandboxes costs no writes.
	old, err := ReadResourceInfo(dir)
	if err == nil {
		ri.UpdatedAt = old.UpdatedAt
	}
	if changed || err != nil || !reflect.DeepEqual(old, ri) {
		if err != nil {
			log.G(ctx).WithError(err).Warn("rewriting resource_info.json from the sandbox state")
		}
		if err := c.commit(sb, st); err != nil {
			return err
		}
	} else {
		sb.snap.Store(&snapshot{state: st, info: old})
	}
	if st.Phase == PhaseStopped {
		sb.closeOnce.Do(func() { close(sb.exited) })
	} else {
		c.opts.Admitter.Restore(id, ri.Resources)
	}
	if st.Phase == PhaseReady {
		rep.Ready++
	}
	c.mu.Lock()
	c.sandboxes[id] = sb
	c.mu.Unlock()
	rep.Loaded++
	return nil
}

// emptyFile reports whether path is a regular file of no bytes.
func emptyFile(path string) bool {
	fi, err := os.Lstat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Size() == 0
}

// unknownExitCode is the exit status of a sandbox whose end was not seen,
// as containerd uses for a task that vanished.
const unknownExitCode = 255

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
