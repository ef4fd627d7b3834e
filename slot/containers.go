package slot

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/cgmetrics"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// firstPid is the first pid given to a simulated process: PID_MAX_LIMIT
// (2^22), which no real process can have, so a simulated pid never names a
// real process that a tool might signal or inspect.
const firstPid = 1 << 22

var (
	errNoExec = fmt.Errorf("slot containers run no exec processes: %w", errdefs.ErrNotFound)
	errExec   = fmt.Errorf("exec: slot containers are simulated and run no process to exec into: %w", errdefs.ErrNotImplemented)
)

// containers are the simulated containers of every slot sandbox.
type containers struct {
	ev      backend.Events
	lastPid atomic.Uint32

	mu   sync.Mutex
	byID map[ctrKey]*simContainer
}

type ctrKey struct{ namespace, id string }

func keyOf(p backend.Process) ctrKey { return ctrKey{p.Namespace, p.ContainerID} }

// simContainer is a simulated container's init process.
type simContainer struct {
	p   backend.Process
	sim Simulation
	res resourceinfo.Resources

	mu        sync.Mutex
	status    backend.Status
	pid       uint32
	startedAt time.Time
	exitedAt  time.Time
	out       output
	timer     *time.Timer
}

// private is what the controller keeps for a slot container (Private).
type private struct {
	Simulation Simulation `json:"simulation"`
}

func newContainers() *containers {
	c := &containers{byID: map[ctrKey]*simContainer{}}
	c.lastPid.Store(firstPid - 1)
	return c
}

var _ backend.Containers = (*containers)(nil)

func (c *containers) get(p backend.Process) (*simContainer, error) {
	if p.ExecID != "" {
		return nil, errNoExec
	}
	c.mu.Lock()
	sc, ok := c.byID[keyOf(p)]
	c.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("container %s: %w", p.ContainerID, errdefs.ErrNotFound)
	}
	return sc, nil
}

// Create makes a simulated process: a pid, its stdio opened, its
// simulation read from the container's annotations and its pod's
// (SimulationOf).
func (c *containers) Create(ctx context.Context, ctr *backend.Container) (backend.Created, error) {
	var annotations map[string]string
	if ctr.Spec != nil {
		annotations = ctr.Spec.Annotations
	}
	sim, err := SimulationOf(annotations[resourceinfo.AnnotationContainerName], ctr.PodAnnotations, annotations)
	if err != nil {
		return backend.Created{}, fmt.Errorf("container %s: %w", ctr.ContainerID, err)
	}
	data, err := json.Marshal(private{Simulation: sim})
	if err != nil {
		return backend.Created{}, err
	}
	sc := &simContainer{p: ctr.Process.Init(), sim: sim, res: ctr.Resources, status: backend.StatusCreated, pid: c.lastPid.Add(1)}
	c.mu.Lock()
	if _, ok := c.byID[keyOf(sc.p)]; ok {
		c.mu.Unlock()
		return backend.Created{}, fmt.Errorf("container %s: %w", ctr.ContainerID, errdefs.ErrAlreadyExists)
	}
	c.byID[keyOf(sc.p)] = sc
	c.mu.Unlock()
	sc.out = openOutput(ctx, ctr.IO)
	return backend.Created{Pid: sc.pid, Private: data}, nil
}

// Start writes the process's one line of output and, if it is to exit by
// itself, arms its timer.
func (c *containers) Start(_ context.Context, p backend.Process) (uint32, error) {
	sc, err := c.get(p)
	if err != nil {
		return 0, err
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.status != backend.StatusCreated {
		return 0, fmt.Errorf("container %s is %s: %w", p.ContainerID, sc.status, errdefs.ErrFailedPrecondition)
	}
	sc.status, sc.startedAt = backend.StatusRunning, time.Now().UTC()
	if sc.out != nil {
		sc.out.writeLine(sc.startLine())
	}
	c.armExitLocked(sc)
	return sc.pid, nil
}

func (sc *simContainer) startLine() string {
	r := sc.res
	line := fmt.Sprintf("resource-slot: simulated container %s in sandbox %s (no process runs): cpu_limit=%s cpu_request=%s memory_limit=%s pid_limit=%s",
		sc.p.ContainerID, sc.p.SandboxID, fmtPtr(r.CPULimit), fmtPtr(r.CPURequest), fmtPtr(r.MemoryLimit), fmtPtr(r.PidLimit))
	if sc.sim.ExitAfter > 0 {
		line += fmt.Sprintf("; exits with status %d after %s", sc.sim.ExitCode, sc.sim.ExitAfter)
	}
	return line + "\n"
}

func fmtPtr[T any](p *T) string {
	if p == nil {
		return "none"
	}
	return fmt.Sprint(*p)
}

// armExitLocked sets the timer of a process that exits by itself.
func (c *containers) armExitLocked(sc *simContainer) {
	if sc.sim.ExitAfter <= 0 || sc.startedAt.IsZero() {
		return
	}
	at := sc.startedAt.Add(sc.sim.ExitAfter)
	sc.timer = time.AfterFunc(max(time.Until(at), 0), func() { c.exit(sc, sc.sim.ExitCode, at) })
}

// exit ends a process that has not ended yet and reports it.
func (c *containers) exit(sc *simContainer, code uint32, at time.Time) {
	if !sc.end(at) {
		return
	}
	if c.ev != nil {
		c.ev.Exited(sc.p, code, at)
	}
}

// end marks the process stopped, closing its output; false if it had.
func (sc *simContainer) end(at time.Time) bool {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.status == backend.StatusStopped {
		return false
	}
	sc.status, sc.exitedAt = backend.StatusStopped, at.UTC()
	if sc.timer != nil {
		sc.timer.Stop()
	}
	if sc.out != nil {
		sc.out.Close()
	}
	return true
}

// Exec is not simulated.
func (c *containers) Exec(context.Context, backend.Process, *specs.Process, backend.IO) error {
	return errExec
}

// Signal delivers a signal to the simulated process: a signal whose
// default action ends a process ends it, with status 128+signal (SIGTERM
// 143, SIGKILL 137); the others are ignored, as a process would.
func (c *containers) Signal(_ context.Context, p backend.Process, sig syscall.Signal, _ bool) error {
	sc, err := c.get(p)
	if err != nil {
		return err
	}
	sc.mu.Lock()
	st := sc.status
	sc.mu.Unlock()
	if st == backend.StatusStopped {
		return fmt.Errorf("container %s: process already finished: %w", p.ContainerID, errdefs.ErrNotFound)
	}
	if sig == 0 || !terminates(sig) {
		return nil
	}
	c.exit(sc, 128+uint32(sig), time.Now())
	return nil
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

// Delete forgets a container.
func (c *containers) Delete(_ context.Context, p backend.Process) error {
	if p.ExecID != "" {
		return errNoExec
	}
	c.mu.Lock()
	sc, ok := c.byID[keyOf(p)]
	delete(c.byID, keyOf(p))
	c.mu.Unlock()
	if ok {
		sc.end(time.Now())
	}
	return nil
}

// Pids lists the simulated process while it runs.
func (c *containers) Pids(_ context.Context, p backend.Process) ([]uint32, error) {
	sc, err := c.get(p)
	if err != nil {
		return nil, err
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.status == backend.StatusRunning || sc.status == backend.StatusPaused {
		return []uint32{sc.pid}, nil
	}
	return nil, nil
}

// Stats reports the simulated usage with the container's limits, as the
// cgroup metrics type of this host.
func (c *containers) Stats(_ context.Context, p backend.Process, limits resourceinfo.Resources) (*anypb.Any, error) {
	sc, err := c.get(p)
	if err != nil {
		return nil, err
	}
	return typeurl.MarshalAnyToProto(cgmetrics.From(limits, sc.usage(time.Now())))
}

// Update has nothing to apply: the controller records the resources.
func (c *containers) Update(_ context.Context, p backend.Process, _ *specs.LinuxResources) error {
	_, err := c.get(p)
	return err
}

// Pause and Resume change the simulated state.
func (c *containers) Pause(_ context.Context, p backend.Process) error {
	return c.setStatus(p, backend.StatusRunning, backend.StatusPaused)
}

func (c *containers) Resume(_ context.Context, p backend.Process) error {
	return c.setStatus(p, backend.StatusPaused, backend.StatusRunning)
}

func (c *containers) setStatus(p backend.Process, from, to backend.Status) error {
	sc, err := c.get(p)
	if err != nil {
		return err
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.status != from {
		return fmt.Errorf("container %s is %s, not %s: %w", p.ContainerID, sc.status, from, errdefs.ErrFailedPrecondition)
	}
	sc.status = to
	return nil
}

// CloseStdin closes the process's stdin.
func (c *containers) CloseStdin(_ context.Context, p backend.Process) error {
	sc, err := c.get(p)
	if err != nil {
		return err
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.out != nil {
		sc.out.closeStdin()
	}
	return nil
}

// ResizePty: no terminal is attached to a simulated process.
func (c *containers) ResizePty(_ context.Context, p backend.Process, _, _ uint32) error {
	_, err := c.get(p)
	return err
}

// Recover rebuilds a simulated container from its record. containerd still
// holds the read ends of the FIFOs; a process that should have exited
// meanwhile exits now, at the time it was due.
func (c *containers) Recover(ctx context.Context, ctr *backend.Container) error {
	var priv private
	if len(ctr.Private) > 0 {
		if err := json.Unmarshal(ctr.Private, &priv); err != nil {
			return fmt.Errorf("container %s: slot record: %w", ctr.ContainerID, err)
		}
	}
	sc := &simContainer{p: ctr.Process.Init(), sim: priv.Simulation, res: ctr.Resources, status: ctr.Status, pid: ctr.Pid}
	if ctr.StartedAt != nil {
		sc.startedAt = *ctr.StartedAt
	}
	for {
		last := c.lastPid.Load()
		if ctr.Pid <= last || c.lastPid.CompareAndSwap(last, ctr.Pid) {
			break
		}
	}
	c.mu.Lock()
	c.byID[keyOf(sc.p)] = sc
	c.mu.Unlock()
	if sc.status == backend.StatusStopped {
		return nil
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	sc.out = openOutput(ctx, ctr.IO)
	if sc.status == backend.StatusRunning || sc.status == backend.StatusPaused {
		c.armExitLocked(sc)
	}
	log.G(ctx).WithField("container", ctr.ContainerID).Debug("simulated container recovered")
	return nil
}

// stopSandbox ends the containers of a stopping sandbox, without reports:
// the controller records that they ended with it.
func (c *containers) stopSandbox(sandboxID string, at time.Time) {
	for _, sc := range c.ofSandbox(sandboxID) {
		sc.end(at)
	}
}

// forgetSandbox drops the containers of a removed sandbox.
func (c *containers) forgetSandbox(sandboxID string) {
	c.mu.Lock()
	var gone []*simContainer
	for k, sc := range c.byID {
		if sc.p.SandboxID == sandboxID {
			gone = append(gone, sc)
			delete(c.byID, k)
		}
	}
	c.mu.Unlock()
	for _, sc := range gone {
		sc.end(time.Now())
	}
}

func (c *containers) ofSandbox(sandboxID string) []*simContainer {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []*simContainer
	for _, sc := range c.byID {
		if sc.p.SandboxID == sandboxID {
			out = append(out, sc)
		}
	}
	return out
}

// close stops every exit timer.
func (c *containers) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, sc := range c.byID {
		sc.mu.Lock()
		if sc.timer != nil {
			sc.timer.Stop()
		}
		sc.mu.Unlock()
	}
}

// usage is what a simulated process reports: its configured CPU usage
// accrued over its running time, and its configured memory while it runs.
func (sc *simContainer) usage(now time.Time) resourceinfo.Usage {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	var cpuNs, mem, pids uint64
	var cpuPct float64
	if !sc.startedAt.IsZero() {
		end := now
		if !sc.exitedAt.IsZero() {
			end = sc.exitedAt
		}
		if d := end.Sub(sc.startedAt); d > 0 {
			cpuNs = uint64(sc.sim.CPUUsage * float64(d.Nanoseconds()))
		}
	}
	switch sc.status {
	case backend.StatusRunning:
		cpuPct = sc.sim.CPUUsage * 100
		mem, pids = uint64(sc.sim.MemoryUsage), 1
	case backend.StatusPaused:
		mem, pids = uint64(sc.sim.MemoryUsage), 1
	}
	return resourceinfo.Usage{Timestamp: now.UTC(), Source: resourceinfo.UsageSimulated, CPUTimeNanos: &cpuNs, CPUPercent: &cpuPct, MemoryUsage: &mem, MemoryRSS: &mem, Pids: &pids}
}

// usage adds up the simulated containers of a sandbox, with the limits
// the sum exceeds.
func (c *containers) usage(sandboxID string, limits resourceinfo.Resources, at time.Time) resourceinfo.Usage {
	var cpuNs, mem, rss, pids uint64
	var cpuPct float64
	at = at.UTC()
	per := map[string]resourceinfo.Usage{}
	for _, sc := range c.ofSandbox(sandboxID) {
		u := sc.usage(at)
		per[sc.p.ContainerID] = u
		cpuNs += *u.CPUTimeNanos
		mem += *u.MemoryUsage
		rss += *u.MemoryRSS
		pids += *u.Pids
		cpuPct += *u.CPUPercent
	}
	u := resourceinfo.Usage{Timestamp: at, Source: resourceinfo.UsageSimulated, CPUTimeNanos: &cpuNs, CPUPercent: &cpuPct, MemoryUsage: &mem, MemoryRSS: &rss, Pids: &pids}
	if len(per) > 0 {
		u.Containers = per
	}
	if l := limits.MemoryLimit; l != nil && mem > uint64(*l) {
		u.Violations = append(u.Violations, fmt.Sprintf("memory_usage %d > memory_limit %d", mem, *l))
	}
	if l := limits.CPULimit; l != nil && cpuPct/100 > *l+1e-9 {
		u.Violations = append(u.Violations, fmt.Sprintf("cpu_usage %g cores > cpu_limit %g", cpuPct/100, *l))
	}
	if l := limits.PidLimit; l != nil && pids > uint64(*l) {
		u.Violations = append(u.Violations, fmt.Sprintf("pids %d > pid_limit %d", pids, *l))
	}
	return u
}
