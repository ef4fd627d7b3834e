package sandboxer

import (
	"context"
	"fmt"
	"syscall"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// Start starts a task's created init process (execID "") or an added exec
// process, and returns its pid. An exit the backend reports while the
// start is being recorded is held until the start event is out, so that
// containerd sees the start before the exit.
func (t *Tasks) Start(ctx context.Context, k TaskKey, execID string) (uint32, error) {
	r, err := t.run(k)
	if err != nil {
		return 0, err
	}
	ctx = WithTask(ctx, k, r.sandboxID)
	pr, ok := r.proc(execID)
	if !ok {
		return 0, fmt.Errorf("exec %s of task %s: %w", execID, k.ID, errdefs.ErrNotFound)
	}
	cur, _, err := t.Process(k, execID)
	if err != nil {
		return 0, err
	}
	if cur.Status != TaskCreated {
		return 0, fmt.Errorf("task %s %s is %s: %w", k.ID, execID, cur.Status, errdefs.ErrFailedPrecondition)
	}
	r.mu.Lock()
	if pr.starting {
		r.mu.Unlock()
		return 0, fmt.Errorf("task %s %s is being started: %w", k.ID, execID, errdefs.ErrFailedPrecondition)
	}
	pr.starting = true
	r.mu.Unlock()
	var pending *exitReport
	defer func() {
		r.mu.Lock()
		pr.starting = false
		pending, pr.pending = pr.pending, nil
		r.mu.Unlock()
		if pending != nil {
			t.recordExit(ctx, r, execID, pending.status, pending.at)
		}
	}()

	pid, err := t.rt.Start(ctx, r.process(execID))
	if err != nil {
		return 0, err
	}
	now := time.Now().UTC()
	if _, err := t.change(ctx, r, func(c *Container) error {
		if execID == "" {
			c.Task.Status, c.Task.StartedAt, c.Task.Pid = TaskRunning, &now, pid
			return nil
		}
		e, ok := c.Task.Execs[execID]
		if !ok {
			return fmt.Errorf("exec %s: %w", execID, errdefs.ErrNotFound)
		}
		e.Status, e.Pid = TaskRunning, pid
		return nil
	}); err != nil {
		// The process runs but its start is not recorded: end it, so that
		// the record (created) stays the truth.
		if kerr := t.rt.Signal(context.WithoutCancel(ctx), r.process(execID), syscall.SIGKILL, false); kerr != nil && !errdefs.IsNotFound(kerr) {
			log.G(ctx).WithError(kerr).Warn("kill a process whose start could not be saved")
		}
		return 0, err
	}
	if execID == "" {
		t.publish(ctx, k.Namespace, &eventstypes.TaskStart{ContainerID: k.ID, Pid: pid})
		log.G(ctx).WithField("pid", pid).Info("container started")
	} else {
		t.publish(ctx, k.Namespace, &eventstypes.TaskExecStarted{ContainerID: k.ID, ExecID: execID, Pid: pid})
		log.G(ctx).WithFields(log.Fields{"exec": execID, "pid": pid}).Info("exec started")
	}
	return pid, nil
}
