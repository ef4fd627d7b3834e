package sandboxer

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/fifo"
	"github.com/containerd/log"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// firstPid is the first pid given to a simulated task: PID_MAX_LIMIT
// (2^22), which no real process can have, so a simulated pid never names a
// real process that a tool might signal or inspect.
const firstPid = 1 << 22

// stdioOpenTimeout bounds waiting for containerd to open a FIFO's other end.
const stdioOpenTimeout = 30 * time.Second

// Tasks are the simulated containers of every sandbox. A task runs no
// process but has a pid, a status, an exit, output and resources; its
// record lives in its sandbox's state, so a change to it is persisted, and
// its resources counted in the sandbox totals, atomically with the
// sandbox. The task API (TaskServer, for containerd) and the direct CRI
// service both drive Tasks.
type Tasks struct {
	ctrl   *Controller
	events Publisher

	mu   sync.Mutex
	runs map[TaskKey]*taskRun

	lastPid atomic.Uint32
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
	Key        TaskKey
	SandboxID  string
	Bundle     string
	Rootfs     []*types.Mount
	Resources  resourceinfo.Resources
	Simulation Simulation
	// Stdin, Stdout, Stderr and Terminal are containerd's FIFOs.
	Stdin, Stdout, Stderr string
	Terminal              bool
	// LogPath is a CRI container log file to write instead (direct CRI).
	LogPath string
	// Meta is opaque metadata of the caller's, kept with the record.
	Meta json.RawMessage
}

// taskRun is the in-memory side of a task: what waits for it, its timer
// and its output.
type taskRun struct {
	key       TaskKey
	sandboxID string
	exited    chan struct{}
	once      sync.Once

	mu    sync.Mutex
	timer *time.Timer
	out   taskOutput
}

// NewTasks rebuilds the tasks of the controller's (recovered) sandboxes.
// events may be nil.
func NewTasks(ctx context.Context, ctrl *Controller, events Publisher) *Tasks {
	t := &Tasks{ctrl: ctrl, events: events, runs: map[TaskKey]*taskRun{}}
	t.lastPid.Store(firstPid - 1)
	for _, v := range ctrl.List() {
		for id, ctr := range v.State.Containers {
			rec := ctr.Task
			if rec == nil {
				continue
			}
			r := &taskRun{key: TaskKey{rec.Namespace, id}, sandboxID: v.State.ID, exited: make(chan struct{})}
			t.runs[r.key] = r
			if rec.Pid > t.lastPid.Load() {
				t.lastPid.Store(rec.Pid)
			}
			switch rec.Status {
			case TaskStopped:
				r.once.Do(func() { close(r.exited) })
			case TaskCreated, TaskRunning, TaskPaused:
				// containerd still holds the read ends of the FIFOs; a
				// created task writes its line when it starts.
				r.out = openOutput(ctx, rec)
				t.armExit(r, rec)
			}
		}
	}
	hook := t.sync
	ctrl.taskHook.Store(&hook)
	return t
}

// Close stops the timers of the simulation and the event publisher.
func (t *Tasks) Close() {
	t.mu.Lock()
	for _, r := range t.runs {
		r.mu.Lock()
		if r.timer != nil {
			r.timer.Stop()
		}
		r.mu.Unlock()
	}
	t.mu.Unlock()
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

// change changes a task's container under its sandbox's lock.
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

// Create records a new task and its resources in its sandbox, which must
// be ready.
func (t *Tasks) Create(ctx context.Context, spec TaskSpec) (_ *TaskRecord, retErr error) {
	k := spec.Key
	if err := ValidateID("container", k.ID); err != nil {
		return nil, err
	}
	if err := ValidateID("sandbox", spec.SandboxID); err != nil {
		return nil, err
	}
	ctx = WithTask(ctx, k, spec.SandboxID)
	r := &taskRun{key: k, sandboxID: spec.SandboxID, exited: make(chan struct{})}
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

	rec := &TaskRecord{
		Namespace:  k.Namespace,
		Bundle:     spec.Bundle,
		Stdin:      spec.Stdin,
		Stdout:     spec.Stdout,
		Stderr:     spec.Stderr,
		Terminal:   spec.Terminal,
		LogPath:    spec.LogPath,
		Status:     TaskCreated,
		Pid:        t.lastPid.Add(1),
		CreatedAt:  time.Now().UTC(),
		Simulation: spec.Simulation,
		Meta:       spec.Meta,
	}
	err := t.ctrl.change(ctx, spec.SandboxID, func(st *State) error {
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
		return nil, err
	}
	r.out = openOutput(ctx, rec)
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

// Start starts a created task: it writes its one line of output and, if
// asked to, exits by itself later.
func (t *Tasks) Start(ctx context.Context, k TaskKey) (*TaskRecord, error) {
	r, err := t.run(k)
	if err != nil {
		return nil, err
	}
	ctx = WithTask(ctx, k, r.sandboxID)
	var res resourceinfo.Resources
	rec, err := t.change(ctx, r, func(c *Container) error {
		if c.Task.Status != TaskCreated {
			return fmt.Errorf("task %s is %s: %w", k.ID, c.Task.Status, errdefs.ErrFailedPrecondition)
		}
		now := time.Now().UTC()
		c.Task.Status, c.Task.StartedAt = TaskRunning, &now
		res = c.Resources
		return nil
	})
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	if r.out != nil {
		r.out.writeLine(startLine(r, res, rec.Simulation))
	}
	r.mu.Unlock()
	t.armExit(r, rec)
	t.publish(ctx, k.Namespace, &eventstypes.TaskStart{ContainerID: k.ID, Pid: rec.Pid})
	log.G(ctx).Info("container started")
	return rec, nil
}

func startLine(r *taskRun, res resourceinfo.Resources, sim Simulation) string {
	line := fmt.Sprintf("resource-slot: simulated container %s in sandbox %s (no process runs): cpu_limit=%s cpu_request=%s memory_limit=%s pid_limit=%s",
		r.key.ID, r.sandboxID, fmtPtr(res.CPULimit), fmtPtr(res.CPURequest), fmtPtr(res.MemoryLimit), fmtPtr(res.PidLimit))
	if sim.ExitAfter > 0 {
		line += fmt.Sprintf("; exits with status %d after %s", sim.ExitCode, sim.ExitAfter)
	}
	return line + "\n"
}

// armExit sets the timer of a task that exits by itself.
func (t *Tasks) armExit(r *taskRun, rec *TaskRecord) {
	sim := rec.Simulation
	if sim.ExitAfter <= 0 || rec.StartedAt == nil {
		return
	}
	at := rec.StartedAt.Add(sim.ExitAfter)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.timer = time.AfterFunc(max(time.Until(at), 0), func() {
		ctx := WithTask(namespaces.WithNamespace(context.Background(), r.key.Namespace), r.key, r.sandboxID)
		if err := t.exit(ctx, r, sim.ExitCode, at); err != nil && !errdefs.IsNotFound(err) {
			log.G(ctx).WithError(err).Error("simulated exit")
		}
	})
}

// Kill delivers a signal to the simulated process: a signal whose default
// action ends a process ends it, with status 128+signal (SIGTERM 143,
// SIGKILL 137); the others are ignored, as a process would. Killing an
// exited task is NotFound, as runc answers.
func (t *Tasks) Kill(ctx context.Context, k TaskKey, sig syscall.Signal) error {
	rec, _, sandboxID, err := t.Get(k)
	if err != nil {
		return err
	}
	if rec.Status == TaskStopped {
		return fmt.Errorf("task %s: process already finished: %w", k.ID, errdefs.ErrNotFound)
	}
	if sig == 0 || !terminates(sig) {
		return nil
	}
	r, err := t.run(k)
	if err != nil {
		return err
	}
	return t.exit(WithTask(ctx, k, sandboxID), r, 128+uint32(sig), time.Now())
}

// terminates reports whether a signal's default action ends a process.
func terminates(sig syscall.Signal) bool {
	switch sig {
	case syscall.SIGCHLD, syscall.SIGCONT, syscall.SIGSTOP, syscall.SIGTSTP,
		syscall.SIGTTIN, syscall.SIGTTOU, syscall.SIGURG, syscall.SIGWINCH:
		return false
	}
	return sig > 0 && sig < 65
}

// exit ends a task that has not ended yet.
func (t *Tasks) exit(ctx context.Context, r *taskRun, code uint32, at time.Time) error {
	rec, err := t.change(ctx, r, func(c *Container) error {
		if c.Task.Status == TaskStopped {
			return fmt.Errorf("task %s: process already finished: %w", r.key.ID, errdefs.ErrNotFound)
		}
		at := at.UTC()
		c.Task.Status, c.Task.ExitStatus, c.Task.ExitedAt = TaskStopped, code, &at
		return nil
	})
	if err != nil {
		return err
	}
	t.finish(ctx, r, rec)
	log.G(ctx).WithField("exit_status", code).Info("container exited")
	return nil
}

// finish releases what a task held once it has ended and reports the exit.
func (t *Tasks) finish(ctx context.Context, r *taskRun, rec *TaskRecord) {
	r.once.Do(func() {
		r.mu.Lock()
		if r.timer != nil {
			r.timer.Stop()
		}
		if r.out != nil {
			r.out.Close()
		}
		r.mu.Unlock()
		close(r.exited)
		ev := &eventstypes.TaskExit{ContainerID: r.key.ID, ID: r.key.ID, Pid: rec.Pid, ExitStatus: rec.ExitStatus}
		if rec.ExitedAt != nil {
			ev.ExitedAt = timestamppb.New(*rec.ExitedAt)
		}
		t.publish(ctx, r.key.Namespace, ev)
	})
}

// sync catches up with changes the controller made to a sandbox's tasks:
// the sandbox stopped (its tasks were killed with it) or was removed.
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
		ctx := WithTask(namespaces.WithNamespace(context.Background(), r.key.Namespace), r.key, sandboxID)
		ctr, err := t.container(r)
		if err != nil {
			now := time.Now().UTC()
			t.finish(ctx, r, &TaskRecord{ExitStatus: exitCodeKilled, ExitedAt: &now})
			t.mu.Lock()
			delete(t.runs, r.key)
			t.mu.Unlock()
			continue
		}
		if ctr.Task.Status == TaskStopped {
			t.finish(ctx, r, ctr.Task)
		}
	}
}

// Delete removes an exited (or never started) task from its sandbox, whose
// totals drop by its resources.
func (t *Tasks) Delete(ctx context.Context, k TaskKey) (*TaskRecord, error) {
	r, err := t.run(k)
	if err != nil {
		return nil, err
	}
	ctx = WithTask(ctx, k, r.sandboxID)
	var rec TaskRecord
	err = t.ctrl.change(ctx, r.sandboxID, func(st *State) error {
		ctr, ok := st.Containers[k.ID]
		if !ok || ctr.Task == nil {
			return fmt.Errorf("task %s: %w", k.ID, errdefs.ErrNotFound)
		}
		if s := ctr.Task.Status; s == TaskRunning || s == TaskPaused {
			return fmt.Errorf("task %s is %s; kill it first: %w", k.ID, s, errdefs.ErrFailedPrecondition)
		}
		rec = *ctr.Task
		if rec.Status == TaskCreated {
			// A task deleted before it started exits as if killed.
			now := time.Now().UTC()
			rec.ExitStatus, rec.ExitedAt = exitCodeKilled, &now
		}
		delete(st.Containers, k.ID)
		return nil
	})
	if err != nil {
		return nil, err
	}
	t.finish(ctx, r, &rec)
	t.mu.Lock()
	delete(t.runs, k)
	t.mu.Unlock()
	ev := &eventstypes.TaskDelete{ContainerID: k.ID, ID: k.ID, Pid: rec.Pid, ExitStatus: rec.ExitStatus}
	if rec.ExitedAt != nil {
		ev.ExitedAt = timestamppb.New(*rec.ExitedAt)
	}
	t.publish(ctx, k.Namespace, ev)
	log.G(ctx).Info("container deleted")
	return &rec, nil
}

// Wait blocks until the task exits (or ctx ends, or the daemon shuts
// down) and returns its record.
func (t *Tasks) Wait(ctx context.Context, k TaskKey) (*TaskRecord, error) {
	r, err := t.run(k)
	if err != nil {
		return nil, err
	}
	select {
	case <-r.exited:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-t.ctrl.closing:
		return nil, errShuttingDown
	}
	ctr, err := t.container(r)
	if err != nil {
		// Deleted meanwhile: killed with its sandbox, or deleted.
		now := time.Now().UTC()
		return &TaskRecord{Status: TaskStopped, ExitStatus: exitCodeKilled, ExitedAt: &now}, nil
	}
	return ctr.Task, nil
}

// SetPaused moves a task between running and paused.
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
	if _, err := t.change(ctx, r, func(c *Container) error {
		if c.Task.Status != from {
			return fmt.Errorf("task %s is %s, not %s: %w", k.ID, c.Task.Status, from, errdefs.ErrFailedPrecondition)
		}
		c.Task.Status = to
		return nil
	}); err != nil {
		return err
	}
	t.publish(ctx, k.Namespace, ev)
	return nil
}

// SetResources records a task's new resources (crictl update, kubelet
// resize); its sandbox's totals are recomputed.
func (t *Tasks) SetResources(ctx context.Context, k TaskKey, res resourceinfo.Resources) error {
	r, err := t.run(k)
	if err != nil {
		return err
	}
	ctx = WithTask(ctx, k, r.sandboxID)
	if _, err := t.change(ctx, r, func(c *Container) error {
		if c.Task.Status == TaskStopped {
			return fmt.Errorf("task %s has exited: %w", k.ID, errdefs.ErrFailedPrecondition)
		}
		// An update carries no name: the container keeps its own.
		res.Name = c.Resources.Name
		c.Resources = res
		return nil
	}); err != nil {
		return err
	}
	log.G(ctx).WithFields(log.Fields{"cpu_limit": fmtPtr(res.CPULimit), "memory_limit": fmtPtr(res.MemoryLimit)}).Info("container resources updated")
	return nil
}

// CloseStdin closes a task's stdin.
func (t *Tasks) CloseStdin(k TaskKey) error {
	r, err := t.run(k)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.out != nil {
		r.out.closeStdin()
	}
	return nil
}

// Usage is what a simulated task reports: its configured CPU usage accrued
// over its running time, and its configured memory.
func Usage(rec *TaskRecord, now time.Time) resourceinfo.Usage {
	var cpuNs, mem, pids uint64
	if rec.StartedAt != nil {
		end := now
		if rec.ExitedAt != nil {
			end = *rec.ExitedAt
		}
		if d := end.Sub(*rec.StartedAt); d > 0 {
			cpuNs = uint64(rec.Simulation.CPUUsage * float64(d.Nanoseconds()))
		}
	}
	if rec.Status == TaskRunning || rec.Status == TaskPaused {
		mem, pids = uint64(rec.Simulation.MemoryUsage), 1
	}
	cpuPct := rec.Simulation.CPUUsage * 100
	return resourceinfo.Usage{Timestamp: now, CPUTimeNanos: &cpuNs, CPUPercent: &cpuPct, MemoryUsage: &mem, MemoryRSS: &mem, Pids: &pids}
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

// taskOutput is where a simulated process writes: containerd's FIFOs, or
// a CRI log file in direct CRI mode.
type taskOutput interface {
	writeLine(string)
	closeStdin()
	Close()
}

func openOutput(ctx context.Context, rec *TaskRecord) taskOutput {
	if rec.LogPath != "" {
		return &criLog{path: rec.LogPath}
	}
	return openTaskIO(ctx, rec)
}

// criLog appends to a container log file in the CRI format kubelet and
// crictl read ("<RFC3339Nano> stdout F <line>").
type criLog struct {
	mu   sync.Mutex
	path string
}

func (l *criLog) writeLine(s string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := os.MkdirAll(filepath.Dir(l.path), 0o755); err != nil {
		log.L.WithError(err).WithField("path", l.path).Warn("container log")
		return
	}
	f, err := os.OpenFile(l.path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o640)
	if err != nil {
		log.L.WithError(err).WithField("path", l.path).Warn("container log")
		return
	}
	defer f.Close()
	for _, line := range splitLines(s) {
		fmt.Fprintf(f, "%s stdout F %s\n", time.Now().UTC().Format(time.RFC3339Nano), line)
	}
}

func splitLines(s string) []string {
	var lines []string
	start := 0
	for i := 0; i < len(s); i++ {
		if s[i] == '\n' {
			lines = append(lines, s[start:i])
			start = i + 1
		}
	}
	if start < len(s) {
		lines = append(lines, s[start:])
	}
	return lines
}

func (l *criLog) closeStdin() {}
func (l *criLog) Close()      {}

// taskIO holds the FIFOs of a task's stdio. A real process would hold them
// open until it exits; containerd's CRI copies stdout and stderr to the
// container log until it sees their end.
type taskIO struct {
	cancel context.CancelFunc
	mu     sync.Mutex
	stdout io.WriteCloser
	stderr io.WriteCloser
	stdin  io.ReadCloser
	closed bool
}

// openTaskIO opens the FIFOs without blocking the caller (O_NONBLOCK: the
// fifo package connects them once containerd has the other end open, and
// gives up after stdioOpenTimeout).
func openTaskIO(ctx context.Context, rec *TaskRecord) *taskIO {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stdioOpenTimeout)
	t := &taskIO{cancel: cancel}
	open := func(path string, flag int) io.ReadWriteCloser {
		if path == "" {
			return nil
		}
		f, err := fifo.OpenFifo(ctx, path, flag, 0)
		if err != nil {
			log.G(ctx).WithError(err).WithField("path", path).Warn("open task stdio")
			return nil
		}
		return f
	}
	if f := open(rec.Stdout, syscall.O_WRONLY|syscall.O_NONBLOCK); f != nil {
		t.stdout = f
	}
	if !rec.Terminal {
		if f := open(rec.Stderr, syscall.O_WRONLY|syscall.O_NONBLOCK); f != nil {
			t.stderr = f
		}
	}
	if f := open(rec.Stdin, syscall.O_RDONLY|syscall.O_NONBLOCK); f != nil {
		t.stdin = f
		// Drain what is written to stdin, as a process that reads it would.
		go io.Copy(io.Discard, f) //nolint:errcheck
	}
	return t
}

// writeLine writes to stdout without blocking the caller.
func (t *taskIO) writeLine(s string) {
	go func() {
		t.mu.Lock()
		defer t.mu.Unlock()
		if t.closed || t.stdout == nil {
			return
		}
		if _, err := io.WriteString(t.stdout, s); err != nil {
			log.L.WithError(err).Debug("write task stdout")
		}
	}()
}

func (t *taskIO) closeStdin() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stdin != nil {
		t.stdin.Close()
		t.stdin = nil
	}
}

// Close closes every FIFO, which containerd sees as the end of the output.
func (t *taskIO) Close() {
	go func() {
		t.mu.Lock()
		defer t.mu.Unlock()
		if t.closed {
			return
		}
		t.closed = true
		t.cancel()
		for _, c := range []io.Closer{t.stdout, t.stderr, t.stdin} {
			if c != nil {
				c.Close()
			}
		}
	}()
}
