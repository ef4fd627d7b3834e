package sandboxer

import (
	"context"
	"fmt"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Delete removes a task's process that has exited or never started: for
// the init process (execID "") the whole task, whose resources leave its
// sandbox's totals; for an exec process, that process. The backend
// releases the process first; a crash between the two leaves a record
// whose process is gone, which a repeated Delete removes.
func (t *Tasks) Delete(ctx context.Context, k TaskKey, execID string) (processRecord, error) {
	r, err := t.run(k)
	if err != nil {
		return processRecord{}, err
	}
	ctx = WithTask(ctx, k, r.sandboxID)
	cur, _, err := t.Process(k, execID)
	if err != nil {
		return processRecord{}, err
	}
	if s := cur.Status; s == TaskRunning || s == TaskPaused {
		return processRecord{}, fmt.Errorf("task %s %s is %s; kill it first: %w", k.ID, execID, s, errdefs.ErrFailedPrecondition)
	}
	if err := t.rt.Delete(ctx, r.process(execID)); err != nil {
		return processRecord{}, err
	}
	var ended processRecord
	err = t.ctrl.change(ctx, r.sandboxID, func(st *State) error {
		ctr, ok := st.Containers[k.ID]
		if !ok || ctr.Task == nil {
			return fmt.Errorf("task %s: %w", k.ID, errdefs.ErrNotFound)
		}
		p, err := recordOf(ctr.Task, execID)
		if err != nil {
			return err
		}
		if s := p.Status; s == TaskRunning || s == TaskPaused {
			return fmt.Errorf("task %s %s is %s; kill it first: %w", k.ID, execID, s, errdefs.ErrFailedPrecondition)
		}
		if p.Status == TaskCreated {
			// Deleted before it started: it exits as if killed.
			now := time.Now().UTC()
			p.ExitStatus, p.ExitedAt = exitCodeKilled, &now
		}
		ended = p
		if execID == "" {
			delete(st.Containers, k.ID)
		} else {
			delete(ctr.Task.Execs, execID)
		}
		return nil
	})
	if err != nil {
		return processRecord{}, err
	}
	t.finish(ctx, r, execID, ended)
	if execID != "" {
		r.mu.Lock()
		delete(r.procs, execID)
		r.mu.Unlock()
		return ended, nil
	}
	t.mu.Lock()
	delete(t.runs, k)
	t.mu.Unlock()
	ev := &eventstypes.TaskDelete{ContainerID: k.ID, ID: k.ID, Pid: ended.Pid, ExitStatus: ended.ExitStatus}
	if ended.ExitedAt != nil {
		ev.ExitedAt = timestamppb.New(*ended.ExitedAt)
	}
	t.publish(ctx, k.Namespace, ev)
	log.G(ctx).Info("container deleted")
	return ended, nil
}

// Wait blocks until a task's process exits (or ctx ends, or the daemon
// shuts down) and returns its record.
func (t *Tasks) Wait(ctx context.Context, k TaskKey, execID string) (processRecord, error) {
	r, err := t.run(k)
	if err != nil {
		return processRecord{}, err
	}
	pr, ok := r.proc(execID)
	if !ok {
		return processRecord{}, fmt.Errorf("exec %s of task %s: %w", execID, k.ID, errdefs.ErrNotFound)
	}
	select {
	case <-pr.exited:
	case <-ctx.Done():
		return processRecord{}, ctx.Err()
	case <-t.ctrl.closing:
		return processRecord{}, errShuttingDown
	}
	p, _, err := t.Process(k, execID)
	if err != nil || p.Status != TaskStopped {
		// Deleted meanwhile: killed with its sandbox, or deleted.
		now := time.Now().UTC()
		return processRecord{Status: TaskStopped, ExitStatus: exitCodeKilled, ExitedAt: &now}, nil
	}
	return p, nil
}
