package sandboxer

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
)

// Kill delivers a signal to a task's process, or with all to every
// process of the task. Killing a process that has exited is NotFound, as
// runc answers. The exit, if the signal ends the process, comes back from
// the backend through Events.
func (t *Tasks) Kill(ctx context.Context, k TaskKey, execID string, sig syscall.Signal, all bool) error {
	p, _, err := t.Process(k, execID)
	if err != nil {
		return err
	}
	if p.Status == TaskStopped {
		return fmt.Errorf("task %s: process already finished: %w", k.ID, errdefs.ErrNotFound)
	}
	r, err := t.run(k)
	if err != nil {
		return err
	}
	return t.rt.Signal(WithTask(ctx, k, r.sandboxID), r.process(execID), sig, all)
}

// taskEvents is the backend.Events of the tasks.
type taskEvents struct{ t *Tasks }

func (e taskEvents) Exited(p backend.Process, status uint32, at time.Time) { e.t.exited(p, status, at) }
func (e taskEvents) OOM(p backend.Process)                                 { e.t.oom(p) }

// errEnded: the process's end is already recorded.
var errEnded = errors.New("process already ended")

func (t *Tasks) eventContext(r *taskRun) context.Context {
	return WithTask(namespaces.WithNamespace(context.Background(), r.key.Namespace), r.key, r.sandboxID)
}

// exited records a process's exit that the backend reported.
func (t *Tasks) exited(p backend.Process, status uint32, at time.Time) {
	t.mu.Lock()
	r, ok := t.runs[TaskKey{p.Namespace, p.ContainerID}]
	t.mu.Unlock()
	if !ok || r.sandboxID != p.SandboxID {
		return
	}
	r.mu.Lock()
	pr, ok := r.procs[p.ExecID]
	if ok && pr.starting {
		pr.pending = &exitReport{status: status, at: at}
		r.mu.Unlock()
		return
	}
	r.mu.Unlock()
	if ok {
		t.recordExit(t.eventContext(r), r, p.ExecID, status, at)
	}
}

// recordExit ends a process that has not ended yet and reports it.
func (t *Tasks) recordExit(ctx context.Context, r *taskRun, execID string, status uint32, at time.Time) {
	at = at.UTC()
	var ended processRecord
	_, err := t.change(ctx, r, func(c *Container) error {
		if execID == "" {
			if c.Task.Status == TaskStopped {
				return errEnded
			}
			c.Task.Status, c.Task.ExitStatus, c.Task.ExitedAt = TaskStopped, status, &at
			ended = processRecord{TaskStopped, c.Task.Pid, status, &at}
			return nil
		}
		e, ok := c.Task.Execs[execID]
		if !ok {
			return fmt.Errorf("exec %s: %w", execID, errdefs.ErrNotFound)
		}
		if e.Status == TaskStopped {
			return errEnded
		}
		e.Status, e.ExitStatus, e.ExitedAt = TaskStopped, status, &at
		ended = processRecord{TaskStopped, e.Pid, status, &at}
		return nil
	})
	switch {
	case err == nil:
	case errors.Is(err, errEnded), errdefs.IsNotFound(err):
		return
	default:
		log.G(ctx).WithError(err).WithField("exec", execID).Error("record process exit")
		return
	}
	t.finish(ctx, r, execID, ended)
	log.G(ctx).WithFields(log.Fields{"exec": execID, "exit_status": status}).Info("process exited")
}

// oom records that the OOM killer struck in a task's container.
func (t *Tasks) oom(p backend.Process) {
	t.mu.Lock()
	r, ok := t.runs[TaskKey{p.Namespace, p.ContainerID}]
	t.mu.Unlock()
	if !ok || r.sandboxID != p.SandboxID {
		return
	}
	ctx := t.eventContext(r)
	if _, err := t.change(ctx, r, func(c *Container) error {
		c.Task.OOMKilled = true
		return nil
	}); err != nil && !errdefs.IsNotFound(err) {
		log.G(ctx).WithError(err).Error("record OOM kill")
	}
	t.publish(ctx, r.key.Namespace, &eventstypes.TaskOOM{ContainerID: r.key.ID})
	log.G(ctx).Warn("container OOM-killed")
}

// finish wakes what waits for a process that has ended and reports the
// exit, once.
func (t *Tasks) finish(ctx context.Context, r *taskRun, execID string, p processRecord) {
	pr, ok := r.proc(execID)
	if !ok {
		return
	}
	pr.once.Do(func() {
		close(pr.exited)
		id := execID
		if id == "" {
			id = r.key.ID
		}
		ev := &eventstypes.TaskExit{ContainerID: r.key.ID, ID: id, Pid: p.Pid, ExitStatus: p.ExitStatus}
		if p.ExitedAt != nil {
			ev.ExitedAt = timestamppb.New(*p.ExitedAt)
		}
		t.publish(ctx, r.key.Namespace, ev)
	})
}

// sync catches up with changes the controller made to a sandbox's tasks:
// the sandbox stopped (its processes ended with it) or was removed.
func (t *Tasks) sync(sandboxID string) {
	t.mu.Lock()
	var runs []*taskRun
	for _, r := range t.runs {
		if r.sandboxID == sandboxID {
			runs = append(runs, r)
		}
	}
	t.mu.Unlock()
	for _, r := range runs {
		ctx := t.eventContext(r)
		r.mu.Lock()
		execIDs := make([]string, 0, len(r.procs))
		for id := range r.procs {
			execIDs = append(execIDs, id)
		}
		r.mu.Unlock()
		ctr, err := t.container(r)
		if err != nil {
			now := time.Now().UTC()
			for _, id := range execIDs {
				t.finish(ctx, r, id, processRecord{TaskStopped, 0, exitCodeKilled, &now})
			}
			t.mu.Lock()
			if t.runs[r.key] == r {
				delete(t.runs, r.key)
			}
			t.mu.Unlock()
			continue
		}
		for _, id := range execIDs {
			if p, err := recordOf(ctr.Task, id); err == nil && p.Status == TaskStopped {
				t.finish(ctx, r, id, p)
			}
		}
	}
}
