package sandboxer

import (
	"context"
	"encoding/json"
	"fmt"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
)

// maxExecs bounds the exec processes a task records at a time.
const maxExecs = 1024

// Exec adds an exec process to a running task, not started yet.
func (t *Tasks) Exec(ctx context.Context, k TaskKey, execID string, spec *specs.Process, pio backend.IO) error {
	if err := ValidateID("exec", execID); err != nil {
		return err
	}
	if spec == nil {
		return fmt.Errorf("%w: exec %s without a process spec", errdefs.ErrInvalidArgument, execID)
	}
	r, err := t.run(k)
	if err != nil {
		return err
	}
	ctx = WithTask(ctx, k, r.sandboxID)
	rec, _, _, err := t.Get(k)
	if err != nil {
		return err
	}
	if rec.Status != TaskRunning {
		return fmt.Errorf("task %s is %s, not running: %w", k.ID, rec.Status, errdefs.ErrFailedPrecondition)
	}
	specJSON, err := json.Marshal(spec)
	if err != nil {
		return fmt.Errorf("%w: exec %s: process spec: %v", errdefs.ErrInvalidArgument, execID, err)
	}
	pr := newProcRun()
	r.mu.Lock()
	if _, ok := r.procs[execID]; ok {
		r.mu.Unlock()
		return fmt.Errorf("exec %s of task %s: %w", execID, k.ID, errdefs.ErrAlreadyExists)
	}
	if len(r.procs) > maxExecs {
		r.mu.Unlock()
		return fmt.Errorf("task %s has %d exec processes: %w", k.ID, len(r.procs)-1, errdefs.ErrResourceExhausted)
	}
	r.procs[execID] = pr
	r.mu.Unlock()
	forget := func() {
		r.mu.Lock()
		delete(r.procs, execID)
		r.mu.Unlock()
	}

	proc := r.process(execID)
	if err := t.rt.Exec(ctx, proc, spec, pio); err != nil {
		forget()
		return err
	}
	if _, err := t.change(ctx, r, func(c *Container) error {
		if c.Task.Execs == nil {
			c.Task.Execs = map[string]*ExecRecord{}
		}
		c.Task.Execs[execID] = &ExecRecord{
			Spec: specJSON, Stdin: pio.Stdin, Stdout: pio.Stdout, Stderr: pio.Stderr, Terminal: pio.Terminal,
			Status: TaskCreated,
		}
		return nil
	}); err != nil {
		forget()
		if derr := t.rt.Delete(context.WithoutCancel(ctx), proc); derr != nil {
			log.G(ctx).WithError(derr).Warn("delete an exec process that could not be recorded")
		}
		return err
	}
	t.publish(ctx, k.Namespace, &eventstypes.TaskExecAdded{ContainerID: k.ID, ExecID: execID})
	return nil
}
