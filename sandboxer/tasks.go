package sandboxer

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// Tasks are the containers of every sandbox, as containerd's task API and
// the direct CRI service see them. A task's record lives in its sandbox's
// state, so a change to it is persisted, and its resources counted in the
// sandbox's totals, atomically with the sandbox. The processes themselves
// are the backend's (backend.Containers): simulated in slot mode, real in
// the guest in vm mode. Tasks publish the task events and answer Wait.
type Tasks struct {
	ctrl   *Controller
	rt     backend.Containers
	events Publisher

	mu   sync.Mutex
	runs map[TaskKey]*taskRun
}

// Publisher sends task events (containerd's types) where they are wanted.
type Publisher interface {
	Publish(ctx context.Context, topic string, event any) error
	Close() error
}

// TaskKey names a task: containerd namespace and container ID.
type TaskKey struct{ Namespace, ID string }

// TaskSpec is what a new task is made of.
type TaskSpec struct {
	Key       TaskKey
	SandboxID string
	Bundle    string
	// Spec is the container's OCI spec (the bundle's config.json).
	Spec      *specs.Spec
	Rootfs    []*types.Mount
	Options   *anypb.Any
	Resources resourceinfo.Resources
	// IO is where the init process's stdio goes.
	IO backend.IO
	// Meta is opaque metadata of the caller's, kept with the record.
	Meta json.RawMessage
}

// taskRun is the in-memory side of a task: what waits for its processes.
type taskRun struct {
	key       TaskKey
	sandboxID string

	mu    sync.Mutex
	procs map[string]*procRun // by exec ID; "" is the init process
}

// procRun is what waits for one process, and the exit of a process whose
// start is being recorded, held until its start event is out.
type procRun struct {
	exited   chan struct{}
	once     sync.Once
	starting bool
	pending  *exitReport
}

type exitReport struct {
	status uint32
	at     time.Time
}

func newProcRun() *procRun { return &procRun{exited: make(chan struct{})} }

func (r *taskRun) proc(execID string) (*procRun, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	p, ok := r.procs[execID]
	return p, ok
}

func (r *taskRun) process(execID string) backend.Process {
	return backend.Process{Namespace: r.key.Namespace, SandboxID: r.sandboxID, ContainerID: r.key.ID, ExecID: execID}
}

// NewTasks rebuilds the tasks of the controller's (recovered) sandboxes
// and re-attaches the backend to every recorded container. events may be
// nil.
func NewTasks(ctx context.Context, ctrl *Controller, events Publisher) *Tasks {
	t := &Tasks{ctrl: ctrl, events: events, runs: map[TaskKey]*taskRun{}}
	t.rt = ctrl.opts.Backend.Containers(taskEvents{t})
	var recover []*backend.Container
	for _, v := range ctrl.List() {
		var podAnn map[string]string
		if len(v.State.Containers) > 0 {
			var err error
			if podAnn, err = podAnnotations(v.State); err != nil {
				log.G(ctx).WithError(err).WithField("sandbox", v.State.ID).Warn("re-attach without the pod's annotations")
			}
		}
		for id, ctr := range v.State.Containers {
			rec := ctr.Task
			if rec == nil {
				continue
			}
			r := &taskRun{key: TaskKey{rec.Namespace, id}, sandboxID: v.State.ID, procs: map[string]*procRun{"": newProcRun()}}
			t.runs[r.key] = r
			if rec.Status == TaskStopped {
				r.procs[""].close()
			}
			execs := map[string]backend.Exec{}
			for eid, e := range rec.Execs {
				p := newProcRun()
				if e.Status == TaskStopped {
					p.close()
				}
				r.procs[eid] = p
				execs[eid] = execOf(e)
			}
			// Stopped ones too: the backend may still hold what a
			// Delete releases (mounts, the guest's record).
			c := containerOf(r, rec, ctr.Resources, podAnn)
			c.Execs = execs
			recover = append(recover, c)
		}
	}
	hook := t.sync
	ctrl.taskHook.Store(&hook)
	for _, c := range recover {
		cctx := WithTask(namespaces.WithNamespace(ctx, c.Namespace), TaskKey{c.Namespace, c.ContainerID}, c.SandboxID)
		if err := t.rt.Recover(cctx, c); err != nil {
			log.G(cctx).WithError(err).Error("re-attach to container")
		}
	}
	return t
}

// podAnnotations are the annotations of a sandbox's pod: a CRI pod's
// from its PodSandboxConfig (State.Config: the state keeps them there
// only), another caller's from its Create request (State.Annotations).
func podAnnotations(st *State) (map[string]string, error) {
	if len(st.Annotations) > 0 || len(st.Config) == 0 {
		return st.Annotations, nil
	}
	var cfg struct {
		Annotations map[string]string `json:"annotations"`
	}
	if err := json.Unmarshal(st.Config, &cfg); err != nil {
		return nil, fmt.Errorf("sandbox %s: decode its pod sandbox config: %w", st.ID, err)
	}
	return cfg.Annotations, nil
}

// containerOf is the backend's view of a recorded task.
func containerOf(r *taskRun, rec *TaskRecord, res resourceinfo.Resources, podAnnotations map[string]string) *backend.Container {
	private := rec.Private
	if len(private) == 0 && len(rec.LegacySimulation) > 0 {
		// Written before Private: the slot record was the simulation.
		private, _ = json.Marshal(map[string]json.RawMessage{"simulation": rec.LegacySimulation})
	}
	return &backend.Container{
		Process:        r.process(""),
		Bundle:         rec.Bundle,
		IO:             backend.IO{Stdin: rec.Stdin, Stdout: rec.Stdout, Stderr: rec.Stderr, Terminal: rec.Terminal, LogPath: rec.LogPath},
		Resources:      res,
		PodAnnotations: podAnnotations,
		Private:        private,
		Pid:            rec.Pid,
		StartedAt:      rec.StartedAt,
		Status:         backend.Status(rec.Status),
	}
}

func execOf(e *ExecRecord) backend.Exec {
	x := backend.Exec{
		IO:     backend.IO{Stdin: e.Stdin, Stdout: e.Stdout, Stderr: e.Stderr, Terminal: e.Terminal},
		Status: backend.Status(e.Status),
		Pid:    e.Pid,
	}
	if len(e.Spec) > 0 {
		var p specs.Process
		if json.Unmarshal(e.Spec, &p) == nil {
			x.Spec = &p
		}
	}
	return x
}

func (p *procRun) close() { p.once.Do(func() { close(p.exited) }) }

// Close stops the event publisher. The backend is closed by its owner.
func (t *Tasks) Close() {
	if t.events != nil {
		t.events.Close()
	}
}

// Closing is closed when the daemon shuts down; waiters should return.
func (t *Tasks) Closing() <-chan struct{} { return t.ctrl.closing }

func (t *Tasks) run(k TaskKey) (*taskRun, error) {
	if err := ValidateID("container", k.ID); err != nil {
		return nil, err
	}
	t.mu.Lock()
	r, ok := t.runs[k]
	t.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("task %s: %w", k.ID, errdefs.ErrNotFound)
	}
	return r, nil
}

// Get returns a task's record and container, and its sandbox's ID.
func (t *Tasks) Get(k TaskKey) (*TaskRecord, *Container, string, error) {
	r, err := t.run(k)
	if err != nil {
		return nil, nil, "", err
	}
	ctr, err := t.container(r)
	if err != nil {
		return nil, nil, "", err
	}
	return ctr.Task, ctr, r.sandboxID, nil
}

func (t *Tasks) container(r *taskRun) (*Container, error) {
	v, err := t.ctrl.Get(r.sandboxID)
	if err != nil {
		return nil, fmt.Errorf("task %s: sandbox %s: %w", r.key.ID, r.sandboxID, errdefs.ErrNotFound)
	}
	ctr, ok := v.State.Containers[r.key.ID]
	if !ok || ctr.Task == nil {
		return nil, fmt.Errorf("task %s: %w", r.key.ID, errdefs.ErrNotFound)
	}
	return ctr, nil
}

// change changes a task's container under its sandbox's lock and returns
// a copy of the task's record as changed.
func (t *Tasks) change(ctx context.Context, r *taskRun, fn func(*Container) error) (*TaskRecord, error) {
	var rec TaskRecord
	err := t.ctrl.change(ctx, r.sandboxID, func(st *State) error {
		ctr, ok := st.Containers[r.key.ID]
		if !ok || ctr.Task == nil {
			return fmt.Errorf("task %s: %w", r.key.ID, errdefs.ErrNotFound)
		}
		if err := fn(ctr); err != nil {
			return err
		}
		if ctr.Task != nil {
			rec = *ctr.Task
		}
		return nil
	})
	return &rec, err
}

// WithTask tags a context's logger with a task.
func WithTask(ctx context.Context, k TaskKey, sandboxID string) context.Context {
	return log.WithLogger(ctx, log.G(ctx).WithFields(log.Fields{"container": k.ID, "sandbox": sandboxID}))
}

// processRecord is the status, pid and exit of a task's process.
type processRecord struct {
	Status     string
	Pid        uint32
	ExitStatus uint32
	ExitedAt   *time.Time
}

func recordOf(rec *TaskRecord, execID string) (processRecord, error) {
	if execID == "" {
		return processRecord{rec.Status, rec.Pid, rec.ExitStatus, rec.ExitedAt}, nil
	}
	e, ok := rec.Execs[execID]
	if !ok {
		return processRecord{}, fmt.Errorf("exec %s: %w", execID, errdefs.ErrNotFound)
	}
	return processRecord{e.Status, e.Pid, e.ExitStatus, e.ExitedAt}, nil
}

// Process returns the record of a task's process (exec ID "" is the init
// process) and its task's record.
func (t *Tasks) Process(k TaskKey, execID string) (processRecord, *TaskRecord, error) {
	rec, _, _, err := t.Get(k)
	if err != nil {
		return processRecord{}, nil, err
	}
	p, err := recordOf(rec, execID)
	return p, rec, err
}

func (t *Tasks) publish(ctx context.Context, ns string, ev any) {
	if t.events == nil {
		return
	}
	ctx = namespaces.WithNamespace(context.WithoutCancel(ctx), ns)
	if err := t.events.Publish(ctx, runtime.GetTopic(ev), ev); err != nil {
		// The publisher retries queued events by itself.
		log.G(ctx).WithError(err).Debug("forward task event")
	}
}
