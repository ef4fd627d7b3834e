package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	api "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/fifo"
	"github.com/containerd/ttrpc"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// noop is the benchmarks' baseline: a sandbox controller and task service
// that do the least containerd needs (states, waits, stdio) and nothing
// else: no extraction, no persistence. Like the sandboxer it is a process
// of its own (the test binary run again, see serveNoop), so that the two
// differ in the work they do, not in how containerd reaches them; it is
// registered in containerd as the runtime "noop".
type noop struct {
	api.UnimplementedControllerServer
	taskAddr string

	mu        sync.Mutex
	sandboxes map[string]chan struct{}
	tasks     map[string]*noopTask
	pid       atomic.Uint32
	grpc      *grpc.Server
	ttrpc     *ttrpc.Server
}

type noopTask struct {
	pid    uint32
	status task.Status
	exit   uint32
	done   chan struct{}
	stdio  []interface{ Close() error }
	cancel context.CancelFunc
}

// noopEnv, set to "<controller socket>:<task socket>", makes the test
// binary serve the baseline instead of running tests.
const noopEnv = "RSS_NOOP_SOCKETS"

// startNoopProcess runs the baseline in a child process.
func startNoopProcess(logPath, sock, taskSock string) (*exec.Cmd, error) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), noopEnv+"="+sock+":"+taskSock)
	return startProcess(cmd, logPath, sock, taskSock)
}

// serveNoop serves the baseline until SIGTERM or SIGINT.
func serveNoop(socks string) int {
	sock, taskSock, ok := strings.Cut(socks, ":")
	if !ok {
		fmt.Fprintf(os.Stderr, "%s=%q: want <socket>:<task socket>\n", noopEnv, socks)
		return 2
	}
	n, err := startNoop(sock, taskSock)
	if err != nil {
		fmt.Fprintln(os.Stderr, "noop baseline:", err)
		return 1
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	n.stop()
	return 0
}

func startNoop(sock, taskSock string) (*noop, error) {
	n := &noop{taskAddr: "ttrpc+unix://" + taskSock, sandboxes: map[string]chan struct{}{}, tasks: map[string]*noopTask{}}
	n.pid.Store(1 << 22)
	l, err := net.Listen("unix", sock)
	if err != nil {
		return nil, err
	}
	n.grpc = grpc.NewServer()
	api.RegisterControllerServer(n.grpc, n)
	// The baseline of the direct CRI benchmarks, on the same socket.
	runtime.RegisterRuntimeServiceServer(n.grpc, &noopCRI{pods: map[string]bool{}})
	go n.grpc.Serve(l)
	tl, err := net.Listen("unix", taskSock)
	if err != nil {
		return nil, err
	}
	if n.ttrpc, err = ttrpc.NewServer(); err != nil {
		return nil, err
	}
	taskAPI.RegisterTTRPCTaskService(n.ttrpc, &noopTasks{n})
	go n.ttrpc.Serve(context.Background(), tl)
	return n, nil
}

func (n *noop) stop() {
	n.grpc.Stop()
	n.ttrpc.Close()
}

func (n *noop) Create(_ context.Context, r *api.ControllerCreateRequest) (*api.ControllerCreateResponse, error) {
	n.mu.Lock()
	n.sandboxes[r.SandboxID] = make(chan struct{})
	n.mu.Unlock()
	return &api.ControllerCreateResponse{SandboxID: r.SandboxID}, nil
}

func (n *noop) Start(_ context.Context, r *api.ControllerStartRequest) (*api.ControllerStartResponse, error) {
	return &api.ControllerStartResponse{SandboxID: r.SandboxID, CreatedAt: timestamppb.Now(), Address: n.taskAddr, Version: 3}, nil
}

func (n *noop) Platform(context.Context, *api.ControllerPlatformRequest) (*api.ControllerPlatformResponse, error) {
	return &api.ControllerPlatformResponse{Platform: &types.Platform{OS: "linux", Architecture: "amd64"}}, nil
}

func (n *noop) stopSandbox(id string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if ch, ok := n.sandboxes[id]; ok {
		select {
		case <-ch:
		default:
			close(ch)
		}
	}
}

func (n *noop) Stop(_ context.Context, r *api.ControllerStopRequest) (*api.ControllerStopResponse, error) {
	n.stopSandbox(r.SandboxID)
	return &api.ControllerStopResponse{}, nil
}

func (n *noop) Wait(ctx context.Context, r *api.ControllerWaitRequest) (*api.ControllerWaitResponse, error) {
	n.mu.Lock()
	ch, ok := n.sandboxes[r.SandboxID]
	n.mu.Unlock()
	if ok {
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return &api.ControllerWaitResponse{ExitedAt: timestamppb.Now()}, nil
}

func (n *noop) Status(_ context.Context, r *api.ControllerStatusRequest) (*api.ControllerStatusResponse, error) {
	state := "SANDBOX_READY"
	n.mu.Lock()
	ch, ok := n.sandboxes[r.SandboxID]
	n.mu.Unlock()
	if ok {
		select {
		case <-ch:
			state = "SANDBOX_NOTREADY"
		default:
		}
	}
	return &api.ControllerStatusResponse{SandboxID: r.SandboxID, State: state, CreatedAt: timestamppb.Now(), Address: n.taskAddr, Version: 3}, nil
}

func (n *noop) Shutdown(_ context.Context, r *api.ControllerShutdownRequest) (*api.ControllerShutdownResponse, error) {
	n.stopSandbox(r.SandboxID)
	n.mu.Lock()
	delete(n.sandboxes, r.SandboxID)
	n.mu.Unlock()
	return &api.ControllerShutdownResponse{}, nil
}

func (n *noop) Metrics(context.Context, *api.ControllerMetricsRequest) (*api.ControllerMetricsResponse, error) {
	return &api.ControllerMetricsResponse{}, nil
}

func (n *noop) Update(context.Context, *api.ControllerUpdateRequest) (*api.ControllerUpdateResponse, error) {
	return &api.ControllerUpdateResponse{}, nil
}

// noopTasks is the baseline's task service: a task is a pid, a status and
// the FIFOs containerd waits to see closed.
type noopTasks struct{ n *noop }

func (s *noopTasks) get(id string) *noopTask {
	s.n.mu.Lock()
	defer s.n.mu.Unlock()
	return s.n.tasks[id]
}

func (s *noopTasks) Create(_ context.Context, r *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t := &noopTask{pid: s.n.pid.Add(1), status: task.Status_CREATED, done: make(chan struct{}), cancel: cancel}
	for _, p := range []string{r.Stdout, r.Stderr} {
		if p == "" {
			continue
		}
		if f, err := fifo.OpenFifo(ctx, p, syscall.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
			t.stdio = append(t.stdio, f)
		}
	}
	s.n.mu.Lock()
	s.n.tasks[r.ID] = t
	s.n.mu.Unlock()
	return &taskAPI.CreateTaskResponse{Pid: t.pid}, nil
}

func (s *noopTasks) Start(_ context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	t := s.get(r.ID)
	s.n.mu.Lock()
	t.status = task.Status_RUNNING
	s.n.mu.Unlock()
	return &taskAPI.StartResponse{Pid: t.pid}, nil
}

func (s *noopTasks) Kill(_ context.Context, r *taskAPI.KillRequest) (*emptypb.Empty, error) {
	t := s.get(r.ID)
	s.n.mu.Lock()
	defer s.n.mu.Unlock()
	if t != nil && t.status != task.Status_STOPPED {
		t.status, t.exit = task.Status_STOPPED, 128+r.Signal
		for _, c := range t.stdio {
			c.Close()
		}
		t.cancel()
		close(t.done)
	}
	return &emptypb.Empty{}, nil
}

func (s *noopTasks) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	t := s.get(r.ID)
	select {
	case <-t.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return &taskAPI.WaitResponse{ExitStatus: t.exit, ExitedAt: timestamppb.Now()}, nil
}

func (s *noopTasks) Delete(_ context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	s.n.mu.Lock()
	t := s.n.tasks[r.ID]
	delete(s.n.tasks, r.ID)
	s.n.mu.Unlock()
	return &taskAPI.DeleteResponse{Pid: t.pid, ExitStatus: t.exit, ExitedAt: timestamppb.Now()}, nil
}

func (s *noopTasks) State(_ context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	t := s.get(r.ID)
	s.n.mu.Lock()
	defer s.n.mu.Unlock()
	return &taskAPI.StateResponse{ID: r.ID, Pid: t.pid, Status: t.status, ExitStatus: t.exit}, nil
}

func (s *noopTasks) Pids(context.Context, *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	return &taskAPI.PidsResponse{}, nil
}
func (s *noopTasks) Pause(context.Context, *taskAPI.PauseRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}
func (s *noopTasks) Resume(context.Context, *taskAPI.ResumeRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}
func (s *noopTasks) Checkpoint(context.Context, *taskAPI.CheckpointTaskRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}
func (s *noopTasks) Exec(context.Context, *taskAPI.ExecProcessRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}
func (s *noopTasks) ResizePty(context.Context, *taskAPI.ResizePtyRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}
func (s *noopTasks) CloseIO(context.Context, *taskAPI.CloseIORequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}
func (s *noopTasks) Update(context.Context, *taskAPI.UpdateTaskRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}
func (s *noopTasks) Stats(context.Context, *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	return &taskAPI.StatsResponse{}, nil
}
func (s *noopTasks) Connect(_ context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	return &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid())}, nil
}
func (s *noopTasks) Shutdown(context.Context, *taskAPI.ShutdownRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}

// noopCRI is the baseline of the direct CRI benchmarks: a CRI runtime
// service whose pods are an ID and a state, as the sandboxer's direct
// endpoint would be if it did nothing else.
type noopCRI struct {
	runtime.UnimplementedRuntimeServiceServer
	mu   sync.Mutex
	pods map[string]bool // ID -> ready
}

func (n *noopCRI) RunPodSandbox(context.Context, *runtime.RunPodSandboxRequest) (*runtime.RunPodSandboxResponse, error) {
	var b [32]byte
	rand.Read(b[:])
	id := hex.EncodeToString(b[:])
	n.mu.Lock()
	n.pods[id] = true
	n.mu.Unlock()
	return &runtime.RunPodSandboxResponse{PodSandboxId: id}, nil
}

func (n *noopCRI) StopPodSandbox(_ context.Context, r *runtime.StopPodSandboxRequest) (*runtime.StopPodSandboxResponse, error) {
	n.mu.Lock()
	if _, ok := n.pods[r.PodSandboxId]; ok {
		n.pods[r.PodSandboxId] = false
	}
	n.mu.Unlock()
	return &runtime.StopPodSandboxResponse{}, nil
}

func (n *noopCRI) RemovePodSandbox(_ context.Context, r *runtime.RemovePodSandboxRequest) (*runtime.RemovePodSandboxResponse, error) {
	n.mu.Lock()
	delete(n.pods, r.PodSandboxId)
	n.mu.Unlock()
	return &runtime.RemovePodSandboxResponse{}, nil
}
