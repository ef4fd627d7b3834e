package sandboxer

import (
	"context"
	"fmt"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// SetPaused freezes (paused) or thaws a running task.
func (t *Tasks) SetPaused(ctx context.Context, k TaskKey, paused bool) error {
	r, err := t.run(k)
	if err != nil {
		return err
	}
	from, to, ev := TaskRunning, TaskPaused, any(&eventstypes.TaskPaused{ContainerID: k.ID})
	if !paused {
		from, to, ev = TaskPaused, TaskRunning, &eventstypes.TaskResumed{ContainerID: k.ID}
	}
	ctx = WithTask(ctx, k, r.sandboxID)
	rec, _, _, err := t.Get(k)
	if err != nil {
		return err
	}
	if rec.Status != from {
		return fmt.Errorf("task %s is %s, not %s: %w", k.ID, rec.Status, from, errdefs.ErrFailedPrecondition)
	}
	if paused {
		err = t.rt.Pause(ctx, r.process(""))
	} else {
		err = t.rt.Resume(ctx, r.process(""))
	}
	if err != nil {
		return err
	}
	if _, err := t.change(ctx, r, func(c *Container) error {
		if c.Task.Status == from {
			c.Task.Status = to
		}
		return nil
	}); err != nil {
		return err
	}
	t.publish(ctx, k.Namespace, ev)
	return nil
}

// SetResources changes a task's resources (crictl update, kubelet
// resize): the sandbox's totals are recomputed, admitted and applied to
// the sandbox first, then lr (when not nil) to the container's own
// processes. A refused or failed change leaves both as they were.
func (t *Tasks) SetResources(ctx context.Context, k TaskKey, res resourceinfo.Resources, lr *specs.LinuxResources) error {
	r, err := t.run(k)
	if err != nil {
		return err
	}
	ctx = WithTask(ctx, k, r.sandboxID)
	var old resourceinfo.Resources
	if _, err := t.change(ctx, r, func(c *Container) error {
		if c.Task.Status == TaskStopped {
			return fmt.Errorf("task %s has exited: %w", k.ID, errdefs.ErrFailedPrecondition)
		}
		// An update carries no name: the container keeps its own.
		res.Name = c.Resources.Name
		old, c.Resources = c.Resources, res
		return nil
	}); err != nil {
		return err
	}
	if lr != nil {
		if err := t.rt.Update(ctx, r.process(""), lr); err != nil {
			if _, rerr := t.change(context.WithoutCancel(ctx), r, func(c *Container) error {
				c.Resources = old
				return nil
			}); rerr != nil {
				log.G(ctx).WithError(rerr).Error("restore the resources of a container whose update failed")
			}
			return err
		}
	}
	log.G(ctx).WithFields(log.Fields{"cpu_limit": fmtPtr(res.CPULimit), "memory_limit": fmtPtr(res.MemoryLimit)}).Info("container resources updated")
	return nil
}

// CloseStdin closes a task process's stdin.
func (t *Tasks) CloseStdin(ctx context.Context, k TaskKey, execID string) error {
	r, err := t.run(k)
	if err != nil {
		return err
	}
	if _, _, err := t.Process(k, execID); err != nil {
		return err
	}
	return t.rt.CloseStdin(ctx, r.process(execID))
}

// ResizePty resizes a task process's terminal.
func (t *Tasks) ResizePty(ctx context.Context, k TaskKey, execID string, width, height uint32) error {
	r, err := t.run(k)
	if err != nil {
		return err
	}
	if _, _, err := t.Process(k, execID); err != nil {
		return err
	}
	return t.rt.ResizePty(ctx, r.process(execID), width, height)
}

// Pids lists a task's processes.
func (t *Tasks) Pids(ctx context.Context, k TaskKey) ([]uint32, error) {
	r, err := t.run(k)
	if err != nil {
		return nil, err
	}
	rec, _, _, err := t.Get(k)
	if err != nil {
		return nil, err
	}
	if rec.Status == TaskStopped {
		return nil, nil
	}
	return t.rt.Pids(ctx, r.process(""))
}

// Stats returns a task's cgroup metrics, as containerd's CRI decodes them.
func (t *Tasks) Stats(ctx context.Context, k TaskKey) (*anypb.Any, error) {
	r, err := t.run(k)
	if err != nil {
		return nil, err
	}
	_, ctr, _, err := t.Get(k)
	if err != nil {
		return nil, err
	}
	return t.rt.Stats(ctx, r.process(""), ctr.Resources)
}
