package vmm

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/mount"
	_ "github.com/containerd/containerd/v2/core/runtime" // typeurl of specs.Process and specs.LinuxResources
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
	"github.com/kuasar-io/resource-slot-sandboxer/backend"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/vmm/mounts"
)

// ExitWithSandbox is the exit status reported for a process whose VM
// stopped or vanished under it (as if killed: 128+SIGKILL).
const ExitWithSandbox uint32 = 137

// exitUnknown is the exit status of a process the guest no longer knows.
const exitUnknown uint32 = 255

// Containers of the vm backend run in the sandbox's guest: the host mounts
// the rootfs and binds below the shared directory (package mounts),
// rewrites the spec (guestSpec), and drives containerd's runc task service
// in the guest (containerd.task.v3.Task on the agent's connection), with
// the agent preparing bundles and stdio (rss.agent.v1.Agent).
type containers struct {
	b  *Backend
	ev backend.Events
}

var _ backend.Containers = (*containers)(nil)

// ctr is the backend's record of a container.
type ctr struct {
	sb   *sandbox
	id   string
	init *proc
	// execs by exec id, guarded by Backend.mu.
	execs map[string]*proc
	priv  privateRecord
}

// proc is a process of a container.
type proc struct {
	p      backend.Process
	io     backend.IO
	copier *stdioCopier
	// guarded by Backend.mu: exited, known to have exited; detached, its
	// stdio could not be reattached after a restart.
	exited   bool
	detached bool
}

// privateRecord is the backend's part of a container's record
// (backend.Created.Private).
type privateRecord struct {
	// Bundle is the guest bundle PrepareContainer made.
	Bundle string `json:"bundle"`
}

// Containers returns the runtime of the vm backend's containers.
func (b *Backend) Containers(ev backend.Events) backend.Containers {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.events = ev
	return &containers{b: b, ev: ev}
}

// taskCtx is ctx with the task's containerd namespace, which the guest's
// task service requires, and a timeout.
func taskCtx(ctx context.Context, ns string, d time.Duration) (context.Context, context.CancelFunc) {
	if ns == "" {
		ns = "k8s.io"
	}
	return context.WithTimeout(namespaces.WithNamespace(ctx, ns), d)
}

// sandboxFor returns the running sandbox of p and its guest connection.
func (c *containers) sandboxFor(p backend.Process) (*sandbox, *guestConn, error) {
	sb, err := c.b.get(p.SandboxID)
	if err != nil {
		return nil, nil, err
	}
	c.b.mu.Lock()
	g := sb.guest
	c.b.mu.Unlock()
	if g == nil {
		return nil, nil, fmt.Errorf("vm sandbox %s is not running: %w", p.SandboxID, errdefs.ErrFailedPrecondition)
	}
	return sb, g, nil
}

func (c *containers) lookup(p backend.Process) (*ctr, *proc, error) {
	c.b.mu.Lock()
	defer c.b.mu.Unlock()
	sb, ok := c.b.sandboxes[p.SandboxID]
	if !ok {
		return nil, nil, fmt.Errorf("vm sandbox %s: %w", p.SandboxID, errdefs.ErrNotFound)
	}
	k, ok := sb.containers[p.ContainerID]
	if !ok {
		return nil, nil, fmt.Errorf("container %s: %w", p.ContainerID, errdefs.ErrNotFound)
	}
	if p.ExecID == "" {
		return k, k.init, nil
	}
	pr, ok := k.execs[p.ExecID]
	if !ok {
		return k, nil, fmt.Errorf("exec %s of container %s: %w", p.ExecID, p.ContainerID, errdefs.ErrNotFound)
	}
	return k, pr, nil
}

func stdioFlags(io_ backend.IO) *api.Stdio {
	return &api.Stdio{Stdin: io_.Stdin != "", Stdout: io_.Stdout != "", Stderr: io_.Stderr != "" && !io_.Terminal, Terminal: io_.Terminal}
}

func checkIO(io_ backend.IO) error {
	if io_.LogPath != "" {
		return fmt.Errorf("vm mode writes no CRI log file itself (the direct CRI endpoint serves slot mode): %w", errdefs.ErrNotImplemented)
	}
	return nil
}

// Create mounts the container's files below the shared directory,
// rewrites its spec, writes the bundle in the guest and creates the task
// there.
func (c *containers) Create(ctx context.Context, k *backend.Container) (_ backend.Created, retErr error) {
	p := k.Process.Init()
	logger := log.G(ctx).WithField("sandbox", p.SandboxID).WithField("container", p.ContainerID)
	if err := checkIO(k.IO); err != nil {
		return backend.Created{}, err
	}
	sb, g, err := c.sandboxFor(p)
	if err != nil {
		return backend.Created{}, err
	}
	c.b.mu.Lock()
	_, exists := sb.containers[p.ContainerID]
	c.b.mu.Unlock()
	if exists {
		return backend.Created{}, fmt.Errorf("container %s: %w", p.ContainerID, errdefs.ErrAlreadyExists)
	}
	taskc, agent, err := g.clients(ctx)
	if err != nil {
		return backend.Created{}, err
	}

	// The pod's /etc files, as containerd binds them for a runc pod.
	hostSpec := withPodFiles(k.Spec, sb.dir)
	binds, idx := sharedBinds(hostSpec)
	rootfs := make([]mount.Mount, 0, len(k.Rootfs))
	for _, m := range k.Rootfs {
		rootfs = append(rootfs, mount.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
	}
	prep, err := mounts.AddContainer(sb.dir, p.ContainerID, rootfs, filepath.Join(k.Bundle, "rootfs"), binds)
	if err != nil {
		return backend.Created{}, fmt.Errorf("share the files of container %s with the guest: %w", p.ContainerID, err)
	}
	guestTask := false
	defer func() {
		if retErr == nil {
			return
		}
		cctx, cancel := taskCtx(context.WithoutCancel(ctx), p.Namespace, callTimeout)
		defer cancel()
		if guestTask {
			_, _ = taskc.Delete(cctx, &taskAPI.DeleteRequest{ID: p.ContainerID})
		}
		_, _ = agent.Release(cctx, &api.ReleaseRequest{ContainerId: p.ContainerID})
		if err := mounts.RemoveContainer(sb.dir, p.ContainerID); err != nil {
			logger.WithError(err).Warn("unmount the files of a container that failed to create")
		}
	}()
	gs, err := guestSpec(hostSpec, p.ContainerID, prep, idx)
	if err != nil {
		return backend.Created{}, err
	}
	specJSON, err := json.Marshal(gs)
	if err != nil {
		return backend.Created{}, fmt.Errorf("guest spec of %s: %w", p.ContainerID, err)
	}
	opts, err := guestRuncOptions()
	if err != nil {
		return backend.Created{}, err
	}
	cctx, cancel := taskCtx(ctx, p.Namespace, callTimeout)
	defer cancel()
	prepResp, err := agent.PrepareContainer(cctx, &api.PrepareContainerRequest{
		ContainerId: p.ContainerID, Spec: specJSON, Stdio: stdioFlags(k.IO),
	})
	if err != nil {
		return backend.Created{}, guestErr(p.SandboxID, "prepare container "+p.ContainerID, err)
	}
	gio := prepResp.GetStdio()
	resp, err := taskc.Create(cctx, &taskAPI.CreateTaskRequest{
		ID: p.ContainerID, Bundle: prepResp.GetBundle(), Terminal: k.IO.Terminal,
		Stdin: gio.GetStdin(), Stdout: gio.GetStdout(), Stderr: gio.GetStderr(), Options: opts,
	})
	if err != nil {
		return backend.Created{}, guestErr(p.SandboxID, "create container "+p.ContainerID, err)
	}
	guestTask = true
	copier, err := c.b.startCopier(g, p, k.IO, 0, false)
	if err != nil {
		return backend.Created{}, err
	}
	rec := &ctr{sb: sb, id: p.ContainerID, execs: map[string]*proc{},
		init: &proc{p: p, io: k.IO, copier: copier}, priv: privateRecord{Bundle: prepResp.GetBundle()}}
	priv, _ := json.Marshal(rec.priv)
	c.b.mu.Lock()
	sb.containers[p.ContainerID] = rec
	c.b.mu.Unlock()
	logger.WithField("pid", resp.GetPid()).Debug("container created in the guest")
	return backend.Created{Pid: resp.GetPid(), Private: priv}, nil
}

// Start starts a created init process or an added exec process.
func (c *containers) Start(ctx context.Context, p backend.Process) (uint32, error) {
	if _, _, err := c.lookup(p); err != nil {
		return 0, err
	}
	taskc, _, err := c.clients(ctx, p)
	if err != nil {
		return 0, err
	}
	cctx, cancel := taskCtx(ctx, p.Namespace, callTimeout)
	defer cancel()
	resp, err := taskc.Start(cctx, &taskAPI.StartRequest{ID: p.ContainerID, ExecID: p.ExecID})
	if err != nil {
		return 0, guestErr(p.SandboxID, "start "+procKey(p), err)
	}
	return resp.GetPid(), nil
}

func (c *containers) clients(ctx context.Context, p backend.Process) (taskAPI.TTRPCTaskService, api.AgentService, error) {
	_, g, err := c.sandboxFor(p)
	if err != nil {
		return nil, nil, err
	}
	return g.clients(ctx)
}

// Exec adds an exec process to a running container.
func (c *containers) Exec(ctx context.Context, p backend.Process, spec *specs.Process, io_ backend.IO) (retErr error) {
	if err := checkIO(io_); err != nil {
		return err
	}
	k, _, err := c.lookup(p.Init())
	if err != nil {
		return err
	}
	c.b.mu.Lock()
	_, exists := k.execs[p.ExecID]
	c.b.mu.Unlock()
	if exists {
		return fmt.Errorf("exec %s of container %s: %w", p.ExecID, p.ContainerID, errdefs.ErrAlreadyExists)
	}
	_, g, err := c.sandboxFor(p)
	if err != nil {
		return err
	}
	taskc, agent, err := g.clients(ctx)
	if err != nil {
		return err
	}
	gs, err := guestExecSpec(spec)
	if err != nil {
		return err
	}
	anySpec, err := typeurl.MarshalAnyToProto(gs)
	if err != nil {
		return fmt.Errorf("exec spec: %w", err)
	}
	cctx, cancel := taskCtx(ctx, p.Namespace, callTimeout)
	defer cancel()
	gio, err := agent.PrepareExec(cctx, &api.PrepareExecRequest{ContainerId: p.ContainerID, ExecId: p.ExecID, Stdio: stdioFlags(io_)})
	if err != nil {
		return guestErr(p.SandboxID, "prepare exec "+procKey(p), err)
	}
	defer func() {
		if retErr != nil {
			_, _ = agent.Release(context.WithoutCancel(cctx), &api.ReleaseRequest{ContainerId: p.ContainerID, ExecId: p.ExecID})
		}
	}()
	if _, err := taskc.Exec(cctx, &taskAPI.ExecProcessRequest{
		ID: p.ContainerID, ExecID: p.ExecID, Terminal: io_.Terminal,
		Stdin: gio.GetStdin(), Stdout: gio.GetStdout(), Stderr: gio.GetStderr(), Spec: anySpec,
	}); err != nil {
		return guestErr(p.SandboxID, "exec "+procKey(p), err)
	}
	copier, err := c.b.startCopier(g, p, io_, 0, false)
	if err != nil {
		_, _ = taskc.Delete(context.WithoutCancel(cctx), &taskAPI.DeleteRequest{ID: p.ContainerID, ExecID: p.ExecID})
		return err
	}
	c.b.mu.Lock()
	k.execs[p.ExecID] = &proc{p: p, io: io_, copier: copier}
	c.b.mu.Unlock()
	return nil
}

// Signal sends sig to the process (or every process of the container).
func (c *containers) Signal(ctx context.Context, p backend.Process, sig syscall.Signal, all bool) error {
	_, pr, err := c.lookup(p)
	if err != nil {
		return err
	}
	c.b.mu.Lock()
	exited := pr.exited
	c.b.mu.Unlock()
	if exited && !all {
		return fmt.Errorf("process %s has exited: %w", procKey(p), errdefs.ErrNotFound)
	}
	taskc, _, err := c.clients(ctx, p)
	if err != nil {
		return err
	}
	cctx, cancel := taskCtx(ctx, p.Namespace, callTimeout)
	defer cancel()
	if _, err := taskc.Kill(cctx, &taskAPI.KillRequest{ID: p.ContainerID, ExecID: p.ExecID, Signal: uint32(sig), All: all}); err != nil {
		return guestErr(p.SandboxID, fmt.Sprintf("signal %d to %s", sig, procKey(p)), err)
	}
	return nil
}

// Delete releases a process that exited or never started; for an init
// process, everything the container holds.
func (c *containers) Delete(ctx context.Context, p backend.Process) error {
	k, pr, err := c.lookup(p)
	if errdefs.IsNotFound(err) {
		// Nothing recorded (already deleted, or lost with a sandbox that
		// is gone): make sure nothing stays mounted.
		if sb, err := c.b.get(p.SandboxID); err == nil && p.ExecID == "" {
			return mounts.RemoveContainer(sb.dir, p.ContainerID)
		}
		return nil
	} else if err != nil {
		return err
	}
	if p.ExecID != "" {
		return c.deleteProc(ctx, k, pr)
	}
	c.b.mu.Lock()
	execs := make([]*proc, 0, len(k.execs))
	for _, e := range k.execs {
		execs = append(execs, e)
	}
	c.b.mu.Unlock()
	for _, e := range execs {
		if err := c.deleteProc(ctx, k, e); err != nil {
			return err
		}
	}
	if err := c.deleteProc(ctx, k, pr); err != nil {
		return err
	}
	if err := mounts.RemoveContainer(k.sb.dir, k.id); err != nil {
		return fmt.Errorf("unmount the files of container %s: %w", k.id, err)
	}
	c.b.mu.Lock()
	if k.sb.containers[k.id] == k {
		delete(k.sb.containers, k.id)
	}
	c.b.mu.Unlock()
	return nil
}

// deleteProc deletes one process in the guest and releases its stdio and
// bundle there. When the VM no longer runs there is nothing to delete in
// the guest.
func (c *containers) deleteProc(ctx context.Context, k *ctr, pr *proc) error {
	p := pr.p
	if pr.copier != nil {
		pr.copier.stop(2*time.Second, false)
	}
	if c.b.guestAlive(k.sb) {
		taskc, agent, err := c.clients(ctx, p)
		if err != nil {
			return err
		}
		cctx, cancel := taskCtx(ctx, p.Namespace, callTimeout)
		defer cancel()
		if _, err := taskc.Delete(cctx, &taskAPI.DeleteRequest{ID: p.ContainerID, ExecID: p.ExecID}); err != nil && !errdefs.IsNotFound(errgrpcNative(err)) {
			return guestErr(p.SandboxID, "delete "+procKey(p), err)
		}
		if _, err := agent.Release(cctx, &api.ReleaseRequest{ContainerId: p.ContainerID, ExecId: p.ExecID}); err != nil && !errdefs.IsNotFound(errgrpcNative(err)) {
			return guestErr(p.SandboxID, "release "+procKey(p), err)
		}
	}
	if pr.copier != nil {
		pr.copier.releaseKeeper()
	}
	c.b.mu.Lock()
	if p.ExecID != "" && k.execs[p.ExecID] == pr {
		delete(k.execs, p.ExecID)
	}
	c.b.mu.Unlock()
	return nil
}

// Pids lists the processes of the container (guest pids).
func (c *containers) Pids(ctx context.Context, p backend.Process) ([]uint32, error) {
	if _, _, err := c.lookup(p.Init()); err != nil {
		return nil, err
	}
	taskc, _, err := c.clients(ctx, p)
	if err != nil {
		return nil, err
	}
	cctx, cancel := taskCtx(ctx, p.Namespace, callTimeout)
	defer cancel()
	resp, err := taskc.Pids(cctx, &taskAPI.PidsRequest{ID: p.ContainerID})
	if err != nil {
		return nil, guestErr(p.SandboxID, "pids of "+p.ContainerID, err)
	}
	pids := make([]uint32, 0, len(resp.GetProcesses()))
	for _, pi := range resp.GetProcesses() {
		pids = append(pids, pi.GetPid())
	}
	return pids, nil
}

// Stats returns the guest's cgroup v2 metrics of the container, as the
// guest's task service encodes them (io.containerd.cgroups.v2.Metrics).
func (c *containers) Stats(ctx context.Context, p backend.Process, _ resourceinfo.Resources) (*anypb.Any, error) {
	if _, _, err := c.lookup(p.Init()); err != nil {
		return nil, err
	}
	taskc, _, err := c.clients(ctx, p)
	if err != nil {
		return nil, err
	}
	cctx, cancel := taskCtx(ctx, p.Namespace, callTimeout)
	defer cancel()
	resp, err := taskc.Stats(cctx, &taskAPI.StatsRequest{ID: p.ContainerID})
	if err != nil {
		return nil, guestErr(p.SandboxID, "stats of "+p.ContainerID, err)
	}
	return resp.GetStats(), nil
}

// Update applies new resources to the container's cgroup in the guest.
func (c *containers) Update(ctx context.Context, p backend.Process, res *specs.LinuxResources) error {
	if _, _, err := c.lookup(p.Init()); err != nil {
		return err
	}
	if res == nil {
		return fmt.Errorf("update of %s without resources: %w", p.ContainerID, errdefs.ErrInvalidArgument)
	}
	r := *res
	// As guestSpec: host devices and what the guest has not.
	r.BlockIO, r.HugepageLimits, r.Rdma, r.Network = nil, nil, nil, nil
	a, err := typeurl.MarshalAnyToProto(&r)
	if err != nil {
		return fmt.Errorf("resources of %s: %w", p.ContainerID, err)
	}
	taskc, _, err := c.clients(ctx, p)
	if err != nil {
		return err
	}
	cctx, cancel := taskCtx(ctx, p.Namespace, callTimeout)
	defer cancel()
	if _, err := taskc.Update(cctx, &taskAPI.UpdateTaskRequest{ID: p.ContainerID, Resources: a}); err != nil {
		return guestErr(p.SandboxID, "update "+p.ContainerID, err)
	}
	return nil
}

// Pause freezes the container's processes.
func (c *containers) Pause(ctx context.Context, p backend.Process) error {
	return c.simple(ctx, p, "pause", func(ctx context.Context, t taskAPI.TTRPCTaskService) error {
		_, err := t.Pause(ctx, &taskAPI.PauseRequest{ID: p.ContainerID})
		return err
	})
}

// Resume thaws them.
func (c *containers) Resume(ctx context.Context, p backend.Process) error {
	return c.simple(ctx, p, "resume", func(ctx context.Context, t taskAPI.TTRPCTaskService) error {
		_, err := t.Resume(ctx, &taskAPI.ResumeRequest{ID: p.ContainerID})
		return err
	})
}

// ResizePty resizes the process's terminal.
func (c *containers) ResizePty(ctx context.Context, p backend.Process, width, height uint32) error {
	return c.simple(ctx, p, "resize the terminal of", func(ctx context.Context, t taskAPI.TTRPCTaskService) error {
		_, err := t.ResizePty(ctx, &taskAPI.ResizePtyRequest{ID: p.ContainerID, ExecID: p.ExecID, Width: width, Height: height})
		return err
	})
}

func (c *containers) simple(ctx context.Context, p backend.Process, op string, call func(context.Context, taskAPI.TTRPCTaskService) error) error {
	if _, _, err := c.lookup(p); err != nil {
		return err
	}
	taskc, _, err := c.clients(ctx, p)
	if err != nil {
		return err
	}
	cctx, cancel := taskCtx(ctx, p.Namespace, callTimeout)
	defer cancel()
	return guestErr(p.SandboxID, op+" "+procKey(p), call(cctx, taskc))
}

// CloseStdin closes the process's stdin, after what containerd wrote to
// it reached the guest.
func (c *containers) CloseStdin(ctx context.Context, p backend.Process) error {
	_, pr, err := c.lookup(p)
	if err != nil {
		return err
	}
	if pr.copier != nil {
		pr.copier.closeStdin()
	}
	return c.simple(ctx, p, "close the stdin of", func(ctx context.Context, t taskAPI.TTRPCTaskService) error {
		_, err := t.CloseIO(ctx, &taskAPI.CloseIORequest{ID: p.ContainerID, ExecID: p.ExecID, Stdin: true})
		if errdefs.IsNotFound(errgrpcNative(err)) {
			return nil
		}
		return err
	})
}

// Recover re-attaches to a recorded container after a daemon restart: its
// stdio copiers resume from what the agent kept, and its processes' states
// are reconciled with the guest once the guest is connected (an exit while
// the daemon was down is reported then).
func (c *containers) Recover(ctx context.Context, k *backend.Container) error {
	p := k.Process.Init()
	sb, err := c.b.get(p.SandboxID)
	if err != nil {
		return fmt.Errorf("recover container %s: %w: %w", p.ContainerID, err, errdefs.ErrUnavailable)
	}
	var priv privateRecord
	if len(k.Private) > 0 {
		if err := json.Unmarshal(k.Private, &priv); err != nil {
			log.G(ctx).WithError(err).WithField("container", p.ContainerID).Warn("unreadable private record of a vm container")
		}
	}
	rec := &ctr{sb: sb, id: p.ContainerID, execs: map[string]*proc{}, init: &proc{p: p, io: k.IO}, priv: priv}
	rec.init.exited = k.Status == backend.StatusStopped
	for id, e := range k.Execs {
		ep := p
		ep.ExecID = id
		rec.execs[id] = &proc{p: ep, io: e.IO, exited: e.Status == backend.StatusStopped}
	}
	c.b.mu.Lock()
	if _, exists := sb.containers[p.ContainerID]; exists {
		c.b.mu.Unlock()
		return nil
	}
	sb.containers[p.ContainerID] = rec
	gone := sb.gone
	c.b.mu.Unlock()

	if gone {
		// The VM is gone: its processes went with it.
		for _, pr := range rec.procs() {
			c.b.reportExit(pr, ExitWithSandbox, time.Now(), "its VM is gone")
		}
		return nil
	}
	// With the guest reachable (or being reconnected) the copiers start
	// now; when the sandbox's recovery failed for a passing reason, once
	// a later Recover of the sandbox finds it.
	c.b.attachCopiers(ctx, sb)
	return nil
}

// attachCopiers starts the stdio copiers of the recovered processes of a
// sandbox whose guest is connected or reconnecting, with the keepers left
// by the previous daemon, and reconciles their states with the guest's.
func (b *Backend) attachCopiers(ctx context.Context, sb *sandbox) {
	b.mu.Lock()
	g := sb.guest
	var todo []*proc
	for _, pr := range sb.allProcs() {
		if pr.copier == nil && !pr.detached {
			todo = append(todo, pr)
		}
	}
	b.mu.Unlock()
	if g == nil || len(todo) == 0 {
		return
	}
	keepers := findKeepers(func(key string) bool { return strings.HasPrefix(key, sb.id+"/") })
	for _, pr := range todo {
		copier, err := b.startCopier(g, pr.p, pr.io, keepers[procKey(pr.p)], true)
		b.mu.Lock()
		if err != nil {
			// Without its FIFOs (containerd gone, files removed) the output
			// has nowhere to go; the process itself is unaffected.
			pr.detached = true
		} else {
			pr.copier = copier
		}
		b.mu.Unlock()
		if err != nil {
			log.G(ctx).WithError(err).WithField("process", procKey(pr.p)).Warn("cannot reattach the stdio of a vm container")
			if pid := keepers[procKey(pr.p)]; pid != 0 {
				killKeeper(procKey(pr.p), pid)
			}
		}
	}
	if g.connected() {
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			b.reconcile(b.bgctx, sb)
		}()
	}
}

// procs returns the container's processes, the init process last.
func (k *ctr) procs() []*proc {
	out := make([]*proc, 0, len(k.execs)+1)
	for _, e := range k.execs {
		out = append(out, e)
	}
	return append(out, k.init)
}

// reportExit reports a process's exit once; how says how the backend
// learnt of it.
func (b *Backend) reportExit(pr *proc, status uint32, at time.Time, how string) {
	b.mu.Lock()
	if pr.exited {
		b.mu.Unlock()
		return
	}
	pr.exited = true
	ev := b.events
	b.mu.Unlock()
	log.L.WithField("process", procKey(pr.p)).WithField("exit_status", status).WithField("from", how).Debug("process exited in the guest")
	if ev != nil {
		ev.Exited(pr.p, status, at)
	}
}

// processes returns the processes of the sandbox's containers.
func (b *Backend) processes(sb *sandbox) []*proc {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []*proc
	for _, k := range sb.containers {
		out = append(out, k.procs()...)
	}
	return out
}

// reconcile asks the guest for the state of every process not known to
// have exited, and reports those that did (while the daemon was down, or
// while the connection was broken).
func (b *Backend) reconcile(ctx context.Context, sb *sandbox) {
	b.mu.Lock()
	g := sb.guest
	b.mu.Unlock()
	if g == nil {
		return
	}
	for _, pr := range b.processes(sb) {
		b.mu.Lock()
		done := pr.exited
		b.mu.Unlock()
		if done {
			continue
		}
		taskc, _, err := g.clients(ctx)
		if err != nil {
			return
		}
		cctx, cancel := taskCtx(ctx, pr.p.Namespace, callTimeout)
		st, err := taskc.State(cctx, &taskAPI.StateRequest{ID: pr.p.ContainerID, ExecID: pr.p.ExecID})
		cancel()
		switch {
		case err == nil && st.GetStatus() == task.Status_STOPPED:
			at := time.Now()
			if st.GetExitedAt() != nil {
				at = st.GetExitedAt().AsTime()
			}
			b.reportExit(pr, st.GetExitStatus(), at, "its state")
		case err != nil && errdefs.IsNotFound(errgrpcNative(err)):
			log.G(ctx).WithField("process", procKey(pr.p)).Warn("the guest does not know a recorded process; reporting it exited")
			b.reportExit(pr, exitUnknown, time.Now(), "unknown to the guest")
		case err != nil:
			log.G(ctx).WithError(err).WithField("process", procKey(pr.p)).Debug("state of a process in the guest")
		}
	}
}

// watchEvents forwards the guest's task events (exits, OOM kills) until
// ctx ends. Events stay in the agent until acknowledged by the next call,
// so none is lost while the daemon is away; after a restart they are
// delivered again (the controller drops repeated exits).
func (b *Backend) watchEvents(ctx context.Context, sb *sandbox, g *guestConn) {
	var after uint64
	pause := reconnectMin
	for ctx.Err() == nil {
		_, agent, err := g.clients(ctx)
		if err == nil {
			cctx, cancel := context.WithTimeout(ctx, pollWait+callTimeout)
			var resp *api.EventsResponse
			resp, err = agent.Events(cctx, &api.EventsRequest{After: after, WaitMs: uint32(pollWait / time.Millisecond), Max: 256})
			cancel()
			if err == nil {
				pause = reconnectMin
				for _, e := range resp.GetEvents() {
					if e.GetSeq() > after {
						after = e.GetSeq()
					}
					b.dispatch(ctx, sb, e)
				}
				continue
			}
		}
		if ctx.Err() != nil {
			return
		}
		log.G(ctx).WithError(err).WithField("sandbox", sb.id).Debug("guest events; retrying")
		select {
		case <-ctx.Done():
			return
		case <-time.After(pause):
		}
		pause = min(pause*2, reconnectMax)
	}
}

func (b *Backend) dispatch(ctx context.Context, sb *sandbox, e *api.Event) {
	if e.GetEvent() == nil {
		return
	}
	v, err := typeurl.UnmarshalAny(e.GetEvent())
	if err != nil {
		log.G(ctx).WithError(err).WithField("topic", e.GetTopic()).Debug("guest event of an unknown type")
		return
	}
	switch ev := v.(type) {
	case *events.TaskExit:
		pr := b.findProc(sb, ev.GetContainerID(), ev.GetID())
		if pr == nil {
			return
		}
		at := time.Now()
		if ev.GetExitedAt() != nil {
			at = ev.GetExitedAt().AsTime()
		}
		b.reportExit(pr, ev.GetExitStatus(), at, fmt.Sprintf("event %d", e.GetSeq()))
	case *events.TaskOOM:
		pr := b.findProc(sb, ev.GetContainerID(), ev.GetContainerID())
		if pr == nil {
			return
		}
		b.mu.Lock()
		sink := b.events
		b.mu.Unlock()
		if sink != nil {
			sink.OOM(pr.p)
		}
	}
}

// findProc finds the process of a task event: id is the exec id, or the
// container id for the init process.
func (b *Backend) findProc(sb *sandbox, cid, id string) *proc {
	b.mu.Lock()
	defer b.mu.Unlock()
	k, ok := sb.containers[cid]
	if !ok {
		return nil
	}
	if id == cid || id == "" {
		return k.init
	}
	return k.execs[id]
}

// errgrpcNative converts a guest call's error (a ttrpc status) to errdefs.
func errgrpcNative(err error) error {
	if err == nil {
		return nil
	}
	return guestErr("", "", err)
}
