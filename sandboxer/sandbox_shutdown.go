package sandboxer

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/log"
)

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
