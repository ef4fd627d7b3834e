package sandboxer

import (
	"context"
	"fmt"

	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

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
	return c.change(ctx, id, func(st *State) error {
		// A copy: the spec may be shared with other sandboxes.
		var spec resourceinfo.Spec
		if st.Spec != nil {
			spec = *st.Spec
		}
		if err := change(&spec); err != nil {
			return err
		}
		st.Spec = internSpec(&spec)
		return nil
	})
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
	ri, changed := c.resourcesOf(old, st)
	if !changed {
		// A task's status changed, not the resources: only record it.
		return c.commitResources(sb, st, ri, false)
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
	if err := c.commitResources(sb, st, ri, true); err != nil {
		undo()
		// Put the backend back to what is on disk.
		if rerr := c.opts.Backend.Update(context.WithoutCancel(ctx), id, old.info); rerr != nil {
			log.G(ctx).WithError(rerr).Error("restore sandbox resources after failed save")
		}
		return err
	}
	logResources(ctx, "sandbox resources updated", ri, nil)
	return nil
}
