package sandboxer

import (
	"context"
	"fmt"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
)

// Create creates a task's init process in the backend and records it, with
// its resources, in its sandbox, which must be ready. The backend's
// process comes first: a crash between the two leaves a process the
// record does not know, which the backend's Cleanup and Recover collect,
// never a record without a process.
func (t *Tasks) Create(ctx context.Context, spec TaskSpec) (_ *TaskRecord, retErr error) {
	k := spec.Key
	if err := ValidateID("container", k.ID); err != nil {
		return nil, err
	}
	if err := ValidateID("sandbox", spec.SandboxID); err != nil {
		return nil, err
	}
	ctx = WithTask(ctx, k, spec.SandboxID)
	v, err := t.ctrl.Get(spec.SandboxID)
	if err != nil {
		return nil, err
	}
	if v.State.Phase != PhaseReady {
		return nil, fmt.Errorf("sandbox %s is %s, not ready: %w", spec.SandboxID, v.State.Phase, errdefs.ErrFailedPrecondition)
	}
	podAnn, err := podAnnotations(v.State)
	if err != nil {
		return nil, err
	}
	r := &taskRun{key: k, sandboxID: spec.SandboxID, procs: map[string]*procRun{"": newProcRun()}}
	t.mu.Lock()
	if _, ok := t.runs[k]; ok {
		t.mu.Unlock()
		return nil, fmt.Errorf("task %s: %w", k.ID, errdefs.ErrAlreadyExists)
	}
	t.runs[k] = r
	t.mu.Unlock()
	defer func() {
		if retErr != nil {
			t.mu.Lock()
			delete(t.runs, k)
			t.mu.Unlock()
		}
	}()

	proc := r.process("")
	created, err := t.rt.Create(ctx, &backend.Container{
		Process:        proc,
		Bundle:         spec.Bundle,
		Spec:           spec.Spec,
		Rootfs:         spec.Rootfs,
		IO:             spec.IO,
		Options:        spec.Options,
		Resources:      spec.Resources,
		PodAnnotations: podAnn,
	})
	if err != nil {
		return nil, err
	}
	rec := &TaskRecord{
		Namespace: k.Namespace,
		Bundle:    spec.Bundle,
		Stdin:     spec.IO.Stdin,
		Stdout:    spec.IO.Stdout,
		Stderr:    spec.IO.Stderr,
		Terminal:  spec.IO.Terminal,
		LogPath:   spec.IO.LogPath,
		Status:    TaskCreated,
		Pid:       created.Pid,
		CreatedAt: time.Now().UTC(),
		Private:   created.Private,
		Meta:      spec.Meta,
	}
	err = t.ctrl.change(ctx, spec.SandboxID, func(st *State) error {
		if st.Phase != PhaseReady {
			return fmt.Errorf("sandbox %s is %s, not ready: %w", spec.SandboxID, st.Phase, errdefs.ErrFailedPrecondition)
		}
		if ctr, ok := st.Containers[k.ID]; ok && ctr.Task != nil {
			return fmt.Errorf("task %s: %w", k.ID, errdefs.ErrAlreadyExists)
		}
		if st.Containers == nil {
			st.Containers = map[string]*Container{}
		}
		st.Containers[k.ID] = &Container{Resources: spec.Resources, Task: rec}
		return nil
	})
	if err != nil {
		if derr := t.rt.Delete(context.WithoutCancel(ctx), proc); derr != nil {
			log.G(ctx).WithError(derr).Warn("delete the process of a task that could not be recorded")
		}
		return nil, err
	}
	t.publish(ctx, k.Namespace, &eventstypes.TaskCreate{
		ContainerID: k.ID,
		Bundle:      rec.Bundle,
		Rootfs:      spec.Rootfs,
		IO:          &eventstypes.TaskIO{Stdin: rec.Stdin, Stdout: rec.Stdout, Stderr: rec.Stderr, Terminal: rec.Terminal},
		Pid:         rec.Pid,
	})
	log.G(ctx).WithField("pid", rec.Pid).Info("container created")
	return rec, nil
}
