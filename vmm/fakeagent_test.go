package vmm

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
)

// fakeAgent is an agent for unit tests: it serves the task service and the
// agent service on a unix socket, as the guest agent does on its port, and
// keeps its processes in memory. Tests make processes print and exit.
type fakeAgent struct {
	t    *testing.T
	path string
	srv  *ttrpc.Server

	mu       sync.Mutex
	cond     *sync.Cond
	bootID   string
	setup    *api.SetupSandboxRequest
	pod      *api.PodResources
	updates  []*api.PodResources
	failNext map[string]error // method -> error of its next call
	procs    map[string]*fakeProc
	specs    map[string]*specs.Spec // guest specs by container
	events   []*api.Event
	seq      uint64
	nextPid  uint32
	shutdown *api.ShutdownRequest
	onShut   func()
	// unresponsive: calls hang until their context ends.
	unresponsive bool
}

type fakeProc struct {
	cid, exec   string
	status      task.Status
	pid         uint32
	exitStatus  uint32
	terminal    bool
	out         map[api.Stream]*fakeStream
	stdin       []byte
	stdinClosed bool
	execSpec    *specs.Process
	resources   *specs.LinuxResources
}

type fakeStream struct {
	base int64 // offset of data[0]
	data []byte
	eof  bool
}

func newFakeAgent(t *testing.T) *fakeAgent {
	t.Helper()
	f := &fakeAgent{t: t, bootID: "boot-1", failNext: map[string]error{}, procs: map[string]*fakeProc{},
		specs: map[string]*specs.Spec{}, nextPid: 100}
	f.cond = sync.NewCond(&f.mu)
	f.path = filepath.Join(t.TempDir(), "agent.sock")
	f.start()
	t.Cleanup(f.stop)
	return f
}

func (f *fakeAgent) start() {
	srv, err := ttrpc.NewServer()
	if err != nil {
		f.t.Fatal(err)
	}
	taskAPI.RegisterTTRPCTaskService(srv, (*fakeTask)(f))
	api.RegisterAgentService(srv, (*fakeAgentSvc)(f))
	l, err := net.Listen("unix", f.path)
	if err != nil {
		f.t.Fatal(err)
	}
	f.srv = srv
	go srv.Serve(context.Background(), l) //nolint:errcheck
}

func (f *fakeAgent) stop() {
	f.mu.Lock()
	srv := f.srv
	f.srv = nil
	f.cond.Broadcast()
	f.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

// dialer dials the fake agent (no handshake: the socket is the agent's).
func (f *fakeAgent) dialer() Dialer { return fakeDialer(f.path) }

type fakeDialer string

func (d fakeDialer) Dial(ctx context.Context) (net.Conn, error) {
	var nd net.Dialer
	return nd.DialContext(ctx, "unix", string(d))
}

func key(cid, exec string) string { return cid + "/" + exec }

func (f *fakeAgent) hang(ctx context.Context) error {
	f.mu.Lock()
	h := f.unresponsive
	f.mu.Unlock()
	if h {
		<-ctx.Done()
		return ctx.Err()
	}
	return nil
}

func (f *fakeAgent) fail(method string) error {
	if err := f.failNext[method]; err != nil {
		delete(f.failNext, method)
		return errgrpc.ToGRPC(err)
	}
	return nil
}

func (f *fakeAgent) setFail(method string, err error) {
	f.mu.Lock()
	f.failNext[method] = err
	f.mu.Unlock()
}

// emit queues a task event; mu held.
func (f *fakeAgent) emit(topic string, ev any) {
	a, err := typeurl.MarshalAnyToProto(ev)
	if err != nil {
		f.t.Error(err)
		return
	}
	f.seq++
	f.events = append(f.events, &api.Event{Seq: f.seq, Timestamp: timestamppb.Now(), Namespace: "k8s.io", Topic: topic, Event: a})
	f.cond.Broadcast()
}

// print appends output of a process.
func (f *fakeAgent) print(cid, exec string, stream api.Stream, s string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p := f.procs[key(cid, exec)]
	if p == nil {
		f.t.Errorf("print to unknown process %s/%s", cid, exec)
		return
	}
	p.out[stream].data = append(p.out[stream].data, s...)
	f.cond.Broadcast()
}

// exit ends a process with status: its streams end and a TaskExit is
// queued.
func (f *fakeAgent) exit(cid, exec string, status uint32) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.exitLocked(f.procs[key(cid, exec)], status)
}

func (f *fakeAgent) exitLocked(p *fakeProc, status uint32) {
	if p == nil || p.status == task.Status_STOPPED {
		return
	}
	p.status, p.exitStatus = task.Status_STOPPED, status
	for _, s := range p.out {
		s.eof = true
	}
	id := p.exec
	if id == "" {
		id = p.cid
	}
	f.emit("/tasks/exit", &events.TaskExit{ContainerID: p.cid, ID: id, Pid: p.pid, ExitStatus: status, ExitedAt: timestamppb.Now()})
}

func (f *fakeAgent) oom(cid string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.emit("/tasks/oom", &events.TaskOOM{ContainerID: cid})
}

func (f *fakeAgent) proc(cid, exec string) *fakeProc {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.procs[key(cid, exec)]
}

// --- rss.agent.v1.Agent ---------------------------------------------------

type fakeAgentSvc fakeAgent

func (s *fakeAgentSvc) f() *fakeAgent { return (*fakeAgent)(s) }

func (s *fakeAgentSvc) Info(ctx context.Context, _ *api.InfoRequest) (*api.InfoResponse, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return &api.InfoResponse{Version: "fake", BootId: f.bootID, Kernel: "6.1.0-fake"}, nil
}

func (s *fakeAgentSvc) SetupSandbox(ctx context.Context, r *api.SetupSandboxRequest) (*emptypb.Empty, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("SetupSandbox"); err != nil {
		return nil, err
	}
	f.setup, f.pod = r, r.GetResources()
	return &emptypb.Empty{}, nil
}

func (s *fakeAgentSvc) UpdateSandbox(ctx context.Context, r *api.UpdateSandboxRequest) (*emptypb.Empty, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("UpdateSandbox"); err != nil {
		return nil, err
	}
	f.pod = r.GetResources()
	f.updates = append(f.updates, r.GetResources())
	return &emptypb.Empty{}, nil
}

func (s *fakeAgentSvc) SandboxStats(ctx context.Context, r *api.SandboxStatsRequest) (*api.SandboxStatsResponse, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	resp := &api.SandboxStatsResponse{Timestamp: timestamppb.Now(), Pod: &api.CgroupStats{MemoryCurrent: 10 << 20, PidsCurrent: 3, CpuUsageUsec: 1000},
		Containers: map[string]*api.CgroupStats{}}
	for _, p := range f.procs {
		if p.exec == "" {
			resp.Containers[p.cid] = &api.CgroupStats{MemoryCurrent: 5 << 20, PidsCurrent: 1, CpuUsageUsec: 500}
		}
	}
	return resp, nil
}

func (s *fakeAgentSvc) PrepareContainer(ctx context.Context, r *api.PrepareContainerRequest) (*api.PrepareContainerResponse, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("PrepareContainer"); err != nil {
		return nil, err
	}
	var sp specs.Spec
	if err := json.Unmarshal(r.GetSpec(), &sp); err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("spec: %v: %w", err, errdefs.ErrInvalidArgument))
	}
	f.specs[r.GetContainerId()] = &sp
	return &api.PrepareContainerResponse{Bundle: "/run/rss/bundles/" + r.GetContainerId(), Stdio: guestStdio(r.GetContainerId(), "", r.GetStdio())}, nil
}

func guestStdio(cid, exec string, s *api.Stdio) *api.StdioPaths {
	base := "/run/rss/io/" + cid + "/" + exec
	p := &api.StdioPaths{}
	if s.GetStdin() {
		p.Stdin = base + "stdin"
	}
	if s.GetStdout() {
		p.Stdout = base + "stdout"
	}
	if s.GetStderr() {
		p.Stderr = base + "stderr"
	}
	return p
}

func (s *fakeAgentSvc) PrepareExec(ctx context.Context, r *api.PrepareExecRequest) (*api.StdioPaths, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	return guestStdio(r.GetContainerId(), r.GetExecId(), r.GetStdio()), nil
}

func (s *fakeAgentSvc) ReadStdio(ctx context.Context, r *api.ReadStdioRequest) (*api.ReadStdioResponse, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(time.Duration(r.GetWaitMs()) * time.Millisecond)
	stop := context.AfterFunc(ctx, func() { f.mu.Lock(); f.cond.Broadcast(); f.mu.Unlock() })
	defer stop()
	timer := time.AfterFunc(time.Until(deadline), func() { f.mu.Lock(); f.cond.Broadcast(); f.mu.Unlock() })
	defer timer.Stop()
	f.mu.Lock()
	defer f.mu.Unlock()
	for {
		p := f.procs[key(r.GetContainerId(), r.GetExecId())]
		if p == nil {
			return nil, errgrpc.ToGRPC(fmt.Errorf("process %s/%s: %w", r.GetContainerId(), r.GetExecId(), errdefs.ErrNotFound))
		}
		st := p.out[r.GetStream()]
		if st == nil {
			return nil, errgrpc.ToGRPC(fmt.Errorf("stream %v: %w", r.GetStream(), errdefs.ErrNotFound))
		}
		off := r.GetOffset()
		if off < st.base {
			off = st.base
		}
		// Release what was delivered.
		if drop := off - st.base; drop > 0 && drop <= int64(len(st.data)) {
			st.data, st.base = st.data[drop:], off
		}
		if n := int64(len(st.data)) - (off - st.base); n > 0 {
			n = min(n, int64(r.GetMaxBytes()))
			data := append([]byte(nil), st.data[off-st.base:off-st.base+n]...)
			return &api.ReadStdioResponse{Offset: off, Data: data, Eof: st.eof && off+n == st.base+int64(len(st.data))}, nil
		}
		if st.eof {
			return &api.ReadStdioResponse{Offset: off, Eof: true}, nil
		}
		if ctx.Err() != nil || !time.Now().Before(deadline) || f.srv == nil {
			return &api.ReadStdioResponse{Offset: off}, nil
		}
		f.cond.Wait()
	}
}

func (s *fakeAgentSvc) WriteStdin(ctx context.Context, r *api.WriteStdinRequest) (*api.WriteStdinResponse, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	p := f.procs[key(r.GetContainerId(), r.GetExecId())]
	if p == nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("process: %w", errdefs.ErrNotFound))
	}
	if p.stdinClosed {
		return nil, errgrpc.ToGRPC(fmt.Errorf("stdin closed: %w", errdefs.ErrFailedPrecondition))
	}
	p.stdin = append(p.stdin, r.GetData()...)
	p.stdinClosed = r.GetClose()
	f.cond.Broadcast()
	return &api.WriteStdinResponse{Written: uint32(len(r.GetData()))}, nil
}

func (s *fakeAgentSvc) Events(ctx context.Context, r *api.EventsRequest) (*api.EventsResponse, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(time.Duration(r.GetWaitMs()) * time.Millisecond)
	stop := context.AfterFunc(ctx, func() { f.mu.Lock(); f.cond.Broadcast(); f.mu.Unlock() })
	defer stop()
	timer := time.AfterFunc(time.Until(deadline), func() { f.mu.Lock(); f.cond.Broadcast(); f.mu.Unlock() })
	defer timer.Stop()
	f.mu.Lock()
	defer f.mu.Unlock()
	for {
		// Release what the host acknowledged.
		for len(f.events) > 0 && f.events[0].GetSeq() <= r.GetAfter() {
			f.events = f.events[1:]
		}
		if len(f.events) > 0 {
			n := min(len(f.events), int(max(r.GetMax(), 1)))
			return &api.EventsResponse{Events: append([]*api.Event(nil), f.events[:n]...)}, nil
		}
		if ctx.Err() != nil || !time.Now().Before(deadline) || f.srv == nil {
			return &api.EventsResponse{}, nil
		}
		f.cond.Wait()
	}
}

func (s *fakeAgentSvc) Release(ctx context.Context, r *api.ReleaseRequest) (*emptypb.Empty, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.procs, key(r.GetContainerId(), r.GetExecId()))
	if r.GetExecId() == "" {
		delete(f.specs, r.GetContainerId())
	}
	f.cond.Broadcast()
	return &emptypb.Empty{}, nil
}

func (s *fakeAgentSvc) Shutdown(ctx context.Context, r *api.ShutdownRequest) (*emptypb.Empty, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.shutdown = r
	for _, p := range f.procs {
		f.exitLocked(p, 128+uint32(syscall.SIGTERM))
	}
	hook := f.onShut
	f.mu.Unlock()
	if hook != nil {
		go hook()
	}
	return &emptypb.Empty{}, nil
}

// --- containerd.task.v3.Task ----------------------------------------------

type fakeTask fakeAgent

func (s *fakeTask) f() *fakeAgent { return (*fakeAgent)(s) }

func (s *fakeTask) lookup(cid, exec string) (*fakeProc, error) {
	p := s.f().procs[key(cid, exec)]
	if p == nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("process %s/%s: %w", cid, exec, errdefs.ErrNotFound))
	}
	return p, nil
}

func newFakeProc(cid, exec string, stdout, stderr string, terminal bool) *fakeProc {
	p := &fakeProc{cid: cid, exec: exec, status: task.Status_CREATED, terminal: terminal, out: map[api.Stream]*fakeStream{}}
	if stdout != "" {
		p.out[api.Stream_STDOUT] = &fakeStream{}
	}
	if stderr != "" {
		p.out[api.Stream_STDERR] = &fakeStream{}
	}
	return p
}

func (s *fakeTask) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("Create"); err != nil {
		return nil, err
	}
	if _, ok := f.specs[r.GetID()]; !ok {
		return nil, errgrpc.ToGRPC(fmt.Errorf("no bundle for %s: %w", r.GetID(), errdefs.ErrFailedPrecondition))
	}
	p := newFakeProc(r.GetID(), "", r.GetStdout(), r.GetStderr(), r.GetTerminal())
	f.nextPid++
	p.pid = f.nextPid
	f.procs[key(r.GetID(), "")] = p
	return &taskAPI.CreateTaskResponse{Pid: p.pid}, nil
}

func (s *fakeTask) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	p, err := s.lookup(r.GetID(), r.GetExecID())
	if err != nil {
		return nil, err
	}
	if p.status != task.Status_CREATED {
		return nil, errgrpc.ToGRPC(fmt.Errorf("process %s is %v: %w", r.GetID(), p.status, errdefs.ErrFailedPrecondition))
	}
	p.status = task.Status_RUNNING
	return &taskAPI.StartResponse{Pid: p.pid}, nil
}

func (s *fakeTask) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*emptypb.Empty, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := s.lookup(r.GetID(), ""); err != nil {
		return nil, err
	}
	v, err := typeurl.UnmarshalAny(r.GetSpec())
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("exec spec: %v: %w", err, errdefs.ErrInvalidArgument))
	}
	p := newFakeProc(r.GetID(), r.GetExecID(), r.GetStdout(), r.GetStderr(), r.GetTerminal())
	p.execSpec = v.(*specs.Process)
	f.nextPid++
	p.pid = f.nextPid
	f.procs[key(r.GetID(), r.GetExecID())] = p
	return &emptypb.Empty{}, nil
}

func (s *fakeTask) Kill(ctx context.Context, r *taskAPI.KillRequest) (*emptypb.Empty, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	p, err := s.lookup(r.GetID(), r.GetExecID())
	if err != nil {
		return nil, err
	}
	if p.status == task.Status_STOPPED {
		return nil, errgrpc.ToGRPC(fmt.Errorf("process already finished: %w", errdefs.ErrNotFound))
	}
	f.exitLocked(p, 128+r.GetSignal())
	return &emptypb.Empty{}, nil
}

func (s *fakeTask) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	p, err := s.lookup(r.GetID(), r.GetExecID())
	if err != nil {
		return nil, err
	}
	if p.status == task.Status_RUNNING {
		return nil, errgrpc.ToGRPC(fmt.Errorf("process %s is running: %w", r.GetID(), errdefs.ErrFailedPrecondition))
	}
	p.status = task.Status_UNKNOWN // deleted; Release removes it
	return &taskAPI.DeleteResponse{Pid: p.pid, ExitStatus: p.exitStatus}, nil
}

func (s *fakeTask) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	f := s.f()
	if err := f.hang(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	p, err := s.lookup(r.GetID(), r.GetExecID())
	if err != nil {
		return nil, err
	}
	return &taskAPI.StateResponse{ID: r.GetID(), ExecID: r.GetExecID(), Pid: p.pid, Status: p.status, ExitStatus: p.exitStatus, ExitedAt: timestamppb.Now()}, nil
}

func (s *fakeTask) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	f := s.f()
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*task.ProcessInfo
	for _, p := range f.procs {
		if p.cid == r.GetID() && p.status == task.Status_RUNNING {
			out = append(out, &task.ProcessInfo{Pid: p.pid})
		}
	}
	return &taskAPI.PidsResponse{Processes: out}, nil
}

func (s *fakeTask) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	a, err := typeurl.MarshalAnyToProto(&cgroupsv2.Metrics{CPU: &cgroupsv2.CPUStat{UsageUsec: 1234}, Pids: &cgroupsv2.PidsStat{Current: 2, Limit: 64}})
	if err != nil {
		return nil, err
	}
	return &taskAPI.StatsResponse{Stats: a}, nil
}

func (s *fakeTask) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (*emptypb.Empty, error) {
	f := s.f()
	f.mu.Lock()
	defer f.mu.Unlock()
	p, err := s.lookup(r.GetID(), "")
	if err != nil {
		return nil, err
	}
	v, err := typeurl.UnmarshalAny(r.GetResources())
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("resources: %v: %w", err, errdefs.ErrInvalidArgument))
	}
	p.resources = v.(*specs.LinuxResources)
	return &emptypb.Empty{}, nil
}

func (s *fakeTask) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}

func (s *fakeTask) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*emptypb.Empty, error) {
	f := s.f()
	f.mu.Lock()
	defer f.mu.Unlock()
	p, err := s.lookup(r.GetID(), "")
	if err != nil {
		return nil, err
	}
	p.status = task.Status_PAUSED
	return &emptypb.Empty{}, nil
}

func (s *fakeTask) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*emptypb.Empty, error) {
	f := s.f()
	f.mu.Lock()
	defer f.mu.Unlock()
	p, err := s.lookup(r.GetID(), "")
	if err != nil {
		return nil, err
	}
	p.status = task.Status_RUNNING
	return &emptypb.Empty{}, nil
}

func (s *fakeTask) ResizePty(context.Context, *taskAPI.ResizePtyRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}

func (s *fakeTask) Checkpoint(context.Context, *taskAPI.CheckpointTaskRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPC(errdefs.ErrNotImplemented)
}

func (s *fakeTask) Wait(context.Context, *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	return nil, errgrpc.ToGRPC(errdefs.ErrNotImplemented)
}

func (s *fakeTask) Connect(context.Context, *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	return &taskAPI.ConnectResponse{}, nil
}

func (s *fakeTask) Shutdown(context.Context, *taskAPI.ShutdownRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}
