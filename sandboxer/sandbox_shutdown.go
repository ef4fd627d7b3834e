package sandboxer

import (
	"context"
	"fmt"

	"github.com/containerd/log"
)

// Shutdown stops the sandbox if needed and deletes it with all its files.
func (c *Controller) Shutdown(ctx context.Context, id string) error {
	sb, unlock, err := c.lock(id)
	if err != nil {
		return err
	}
	defer unlock()
	if err := c.shutdownLocked(ctx, sb); err != nil {
		return err
	}
	log.G(ctx).Info("sandbox shut down")
	return nil
}

// shutdownLocked is Shutdown with the sandbox's operation lock held.
func (c *Controller) shutdownLocked(ctx context.Context, sb *sandboxEntry) error {
	id := sb.id
	if err := c.stopLocked(ctx, sb, 0, 0); err != nil {
		return err
	}
	if err := c.opts.Backend.Delete(ctx, id); err != nil {
		return fmt.Errorf("%s backend: delete sandbox %s: %w", c.Mode(), id, err)
	}
	if err := c.remove(sb); err != nil {
		return err
	}
	sb.gone = true
	c.forget(id, sb)
	c.opts.Admitter.Release(id)
	c.notifyTasks(id)
	return nil
}

// remove records the removal of a sandbox, its commit point, and deletes
// its directory. A crash in between leaves the directory to recovery; a
// failure to delete it is logged, and compaction tries again before the
// journal lets go of the record.
func (c *Controller) remove(sb *sandboxEntry) error {
	sb.store.Lock()
	defer sb.store.Unlock()
	if err := c.commitRemoval(sb.id); err != nil {
		return err
	}
	sb.removed = true
	if err := c.pool.remove(c.Dir(sb.id)); err != nil {
		log.L.WithError(err).WithField("sandbox", sb.id).Error("remove sandbox directory")
	}
	return nil
}
