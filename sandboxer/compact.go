package sandboxer

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	"github.com/containerd/log"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/statefile"
)

// Compaction steps, in order, as compactHook sees them.
const (
	stepSealed   = "sealed"   // the journal's segments to compact are sealed
	stepWrote    = "wrote"    // one sandbox's files are written
	stepSynced   = "synced"   // the state directory's file system is synced
	stepReleased = "released" // the segments are free
)

// Compact moves what the journal's sealed segments hold into the
// sandboxes' own files and frees the segments: the active segment is
// sealed, every sandbox the sealed ones hold records of gets its current
// state written to its state.json (a removed one loses its directory),
// the file system is synced once (syncfs: one flush for all of them), and
// only then are the segments released. A crash at any step leaves the
// segments, whose records recovery still reads, so every step can be
// repeated; state.json is never newer than what the journal says, as it
// only ever holds a committed state.
func (c *Controller) Compact(ctx context.Context) error {
	if !c.compactable.Load() {
		return errors.New("compact: the journal's records are not recovered yet")
	}
	c.compactMu.Lock()
	defer c.compactMu.Unlock()
	start := time.Now()
	sealed, sealErr := c.journal.Seal()
	if sealed == nil || sealed.Len() == 0 {
		return sealErr
	}
	if err := c.step(stepSealed); err != nil {
		return err
	}
	for id := range sealed.IDs() {
		if err := c.compactOne(id); err != nil {
			return err
		}
		if err := c.step(stepWrote); err != nil {
			return err
		}
	}
	if !c.opts.NoSync {
		if err := statefile.SyncFS(c.opts.Root); err != nil {
			return err
		}
	}
	if err := c.step(stepSynced); err != nil {
		return err
	}
	if err := c.journal.Release(sealed); err != nil {
		return err
	}
	if err := c.step(stepReleased); err != nil {
		return err
	}
	log.G(ctx).WithFields(log.Fields{
		"segments": sealed.Len(), "sandboxes": len(sealed.IDs()), "duration": time.Since(start),
	}).Debug("journal compacted")
	return sealErr
}

func (c *Controller) step(name string) error {
	if c.compactHook != nil {
		return c.compactHook(name)
	}
	return nil
}

// compactOne writes one sandbox's state.json, or removes the directory
// of a removed one.
func (c *Controller) compactOne(id string) error {
	c.mu.RLock()
	sb := c.sandboxes[id]
	if sb == nil {
		// Removed: its directory goes before its removal's record does.
		// Under c.mu, which a Create of the same ID needs first.
		err := os.RemoveAll(c.Dir(id))
		c.mu.RUnlock()
		return err
	}
	c.mu.RUnlock()
	// Under the store lock, the snapshot holds every record appended.
	sb.store.Lock()
	defer sb.store.Unlock()
	if sb.removed {
		return os.RemoveAll(c.Dir(sb.id))
	}
	snap := sb.snap.Load()
	if snap == nil {
		// Its Create failed (and removed its directory), or has not
		// appended its record yet.
		return nil
	}
	// As the journal records it: compact, which recovery reads fastest;
	// overwritten in place (its blocks reused): a crash that tears it
	// leaves the records the journal still holds, which recovery prefers.
	data, err := encodeState(snap.state)
	if err != nil {
		return err
	}
	data = append(data, '\n')
	dir := c.Dir(sb.id)
	err = statefile.Overwrite(dir, StateFile, data)
	if errors.Is(err, fs.ErrNotExist) {
		// Its directory was removed behind the daemon's back: rebuilt.
		log.L.WithField("sandbox", sb.id).Warn("rebuilding a sandbox directory that was removed")
		var info []byte
		if info, err = encodeInfo(snap.state, snap.info); err == nil {
			if err = os.Mkdir(dir, 0o700); err == nil {
				if err = statefile.Replace(dir, ResourceInfoFile, info); err == nil {
					err = statefile.Replace(dir, StateFile, data)
				}
			}
		}
	}
	if err != nil {
		return fmt.Errorf("compact sandbox %s: %w", sb.id, storageError(c.Dir(sb.id), err))
	}
	return nil
}

// compactDelay is how long after recovery the first compaction waits.
var compactDelay = 10 * time.Second

// runCompactor compacts the journal when a segment fills up, every
// CompactInterval, and again after a failure (a full disk), until ctx
// ends.
func (c *Controller) runCompactor(ctx context.Context) {
	// Not at once: after a crash the journal holds the changes of every
	// sandbox since the last compaction, and compacting them competes
	// with the first calls of a daemon that just started.
	select {
	case <-ctx.Done():
		return
	case <-time.After(compactDelay):
	}
	tick := time.NewTicker(c.opts.CompactInterval)
	defer tick.Stop()
	var retry <-chan time.Time
	backoff := time.Second
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.journal.Compact():
		case <-tick.C:
		case <-retry:
		}
		retry = nil
		if err := c.Compact(ctx); err != nil {
			log.G(ctx).WithError(err).WithField("retry_in", backoff).Warn("compact the journal")
			retry = time.After(backoff)
			backoff = min(2*backoff, 30*time.Second)
			continue
		}
		backoff = time.Second
	}
}
