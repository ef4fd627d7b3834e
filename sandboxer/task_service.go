package sandboxer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// annotationSandboxID is the OCI spec annotation in which containerd's CRI
// names a container's sandbox (internal/cri/annotations.SandboxID).
const annotationSandboxID = "io.kubernetes.cri.sandbox-id"

// maxSpecSize bounds the config.json read from a bundle.
const maxSpecSize = 16 << 20

// TaskServer serves containerd.task.v3.Task over ttrpc for the containers
// of every sandbox, behind the task shim whose address the controller's
// Start returns. It reads each container's OCI spec from its bundle and
// drives the Tasks; the processes are the backend's.
type TaskServer struct {
	tasks  *Tasks
	server *ttrpc.Server
}

var _ taskAPI.TTRPCTaskService = (*TaskServer)(nil)

// NewTaskServer builds the task server over tasks; opts add to the ttrpc
// server's (interceptors for metrics).
func NewTaskServer(tasks *Tasks, opts ...ttrpc.ServerOpt) (*TaskServer, error) {
	srv, err := ttrpc.NewServer(append([]ttrpc.ServerOpt{ttrpc.WithServerHandshaker(ttrpc.UnixSocketRequireSameUser())}, opts...)...)
	if err != nil {
		return nil, err
	}
	ts := &TaskServer{tasks: tasks, server: srv}
	taskAPI.RegisterTTRPCTaskService(srv, ts)
	return ts, nil
}

// Serve serves ttrpc on l until Stop.
func (ts *TaskServer) Serve(ctx context.Context, l net.Listener) error {
	err := ts.server.Serve(ctx, l)
	if errors.Is(err, ttrpc.ErrServerClosed) {
		return nil
	}
	return err
}

// Stop stops serving.
func (ts *TaskServer) Stop(ctx context.Context) error {
	return ts.server.Shutdown(ctx)
}

func key(ctx context.Context, id string) TaskKey {
	ns, ok := namespaces.Namespace(ctx)
	if !ok {
		ns = namespaces.Default
	}
	return TaskKey{ns, id}
}

// Create records a container and its resources in its sandbox and creates
// its init process in the backend.
func (ts *TaskServer) Create(ctx context.Context, req *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	k := key(ctx, req.GetID())
	if err := ValidateID("container", k.ID); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	spec, err := readSpec(req.GetBundle())
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	sandboxID := spec.Annotations[annotationSandboxID]
	if sandboxID == "" {
		return nil, errgrpc.ToGRPCf(errdefs.ErrFailedPrecondition, "container %s has no %s annotation: its sandbox is unknown", k.ID, annotationSandboxID)
	}
	res, err := resourceinfo.FromOCISpec(spec)
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", k.ID, err))
	}
	rec, err := ts.tasks.Create(ctx, TaskSpec{
		Key: k, SandboxID: sandboxID, Bundle: req.GetBundle(), Spec: spec, Rootfs: req.GetRootfs(),
		Options: req.GetOptions(), Resources: res,
		IO: backend.IO{Stdin: req.GetStdin(), Stdout: req.GetStdout(), Stderr: req.GetStderr(), Terminal: req.GetTerminal()},
	})
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &taskAPI.CreateTaskResponse{Pid: rec.Pid}, nil
}

func (ts *TaskServer) Start(ctx context.Context, req *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	pid, err := ts.tasks.Start(ctx, key(ctx, req.GetID()), req.GetExecID())
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &taskAPI.StartResponse{Pid: pid}, nil
}

func (ts *TaskServer) Delete(ctx context.Context, req *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	p, err := ts.tasks.Delete(ctx, key(ctx, req.GetID()), req.GetExecID())
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &taskAPI.DeleteResponse{Pid: p.Pid, ExitStatus: p.ExitStatus, ExitedAt: timestampOf(p.ExitedAt)}, nil
}

func timestampOf(t *time.Time) *timestamppb.Timestamp {
	if t == nil {
		return nil
	}
	return timestamppb.New(*t)
}

func (ts *TaskServer) State(ctx context.Context, req *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	k := key(ctx, req.GetID())
	p, rec, err := ts.tasks.Process(k, req.GetExecID())
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	resp := &taskAPI.StateResponse{
		ID:         req.GetID(),
		ExecID:     req.GetExecID(),
		Bundle:     rec.Bundle,
		Pid:        p.Pid,
		Status:     taskStatus(p.Status),
		Stdin:      rec.Stdin,
		Stdout:     rec.Stdout,
		Stderr:     rec.Stderr,
		Terminal:   rec.Terminal,
		ExitStatus: p.ExitStatus,
		ExitedAt:   timestampOf(p.ExitedAt),
	}
	if e := rec.Execs[req.GetExecID()]; req.GetExecID() != "" && e != nil {
		resp.Stdin, resp.Stdout, resp.Stderr, resp.Terminal = e.Stdin, e.Stdout, e.Stderr, e.Terminal
	}
	return resp, nil
}

func taskStatus(s string) task.Status {
	switch s {
	case TaskCreated:
		return task.Status_CREATED
	case TaskRunning:
		return task.Status_RUNNING
	case TaskPaused:
		return task.Status_PAUSED
	case TaskStopped:
		return task.Status_STOPPED
	}
	return task.Status_UNKNOWN
}

func (ts *TaskServer) Pids(ctx context.Context, req *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	pids, err := ts.tasks.Pids(ctx, key(ctx, req.GetID()))
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	resp := &taskAPI.PidsResponse{}
	for _, pid := range pids {
		resp.Processes = append(resp.Processes, &task.ProcessInfo{Pid: pid})
	}
	return resp, nil
}

func (ts *TaskServer) Pause(ctx context.Context, req *taskAPI.PauseRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, errgrpc.ToGRPC(ts.tasks.SetPaused(ctx, key(ctx, req.GetID()), true))
}

func (ts *TaskServer) Resume(ctx context.Context, req *taskAPI.ResumeRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, errgrpc.ToGRPC(ts.tasks.SetPaused(ctx, key(ctx, req.GetID()), false))
}

func (ts *TaskServer) Checkpoint(context.Context, *taskAPI.CheckpointTaskRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPCf(errdefs.ErrNotImplemented, "checkpoint is not supported")
}

func (ts *TaskServer) Kill(ctx context.Context, req *taskAPI.KillRequest) (*emptypb.Empty, error) {
	if err := ts.tasks.Kill(ctx, key(ctx, req.GetID()), req.GetExecID(), syscall.Signal(req.GetSignal()), req.GetAll()); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &emptypb.Empty{}, nil
}

func (ts *TaskServer) Exec(ctx context.Context, req *taskAPI.ExecProcessRequest) (*emptypb.Empty, error) {
	spec, err := processSpec(req.GetSpec())
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	pio := backend.IO{Stdin: req.GetStdin(), Stdout: req.GetStdout(), Stderr: req.GetStderr(), Terminal: req.GetTerminal()}
	if err := ts.tasks.Exec(ctx, key(ctx, req.GetID()), req.GetExecID(), spec, pio); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &emptypb.Empty{}, nil
}

// processSpec decodes the OCI process spec of an exec.
func processSpec(a *anypb.Any) (*specs.Process, error) {
	if a == nil {
		return nil, fmt.Errorf("%w: exec without a process spec", errdefs.ErrInvalidArgument)
	}
	if len(a.GetValue()) > maxSpecSize {
		return nil, fmt.Errorf("%w: exec process spec of %d bytes", errdefs.ErrInvalidArgument, len(a.GetValue()))
	}
	v, err := typeurl.UnmarshalAny(a)
	if err != nil {
		return nil, fmt.Errorf("%w: exec process spec: %v", errdefs.ErrInvalidArgument, err)
	}
	p, ok := v.(*specs.Process)
	if !ok {
		return nil, fmt.Errorf("%w: exec process spec of type %s, want an OCI Process", errdefs.ErrInvalidArgument, a.GetTypeUrl())
	}
	return p, nil
}

func (ts *TaskServer) ResizePty(ctx context.Context, req *taskAPI.ResizePtyRequest) (*emptypb.Empty, error) {
	if err := ts.tasks.ResizePty(ctx, key(ctx, req.GetID()), req.GetExecID(), req.GetWidth(), req.GetHeight()); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &emptypb.Empty{}, nil
}

func (ts *TaskServer) CloseIO(ctx context.Context, req *taskAPI.CloseIORequest) (*emptypb.Empty, error) {
	k := key(ctx, req.GetID())
	if _, _, err := ts.tasks.Process(k, req.GetExecID()); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if req.GetStdin() {
		if err := ts.tasks.CloseStdin(ctx, k, req.GetExecID()); err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
	}
	return &emptypb.Empty{}, nil
}

// Update applies a container's new resources (crictl update, kubelet
// resize) and recomputes the sandbox totals.
func (ts *TaskServer) Update(ctx context.Context, req *taskAPI.UpdateTaskRequest) (*emptypb.Empty, error) {
	k := key(ctx, req.GetID())
	if _, _, _, err := ts.tasks.Get(k); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	lr, err := linuxResources(req.GetResources())
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	res, err := resourceinfo.FromOCISpec(&specs.Spec{Linux: &specs.Linux{Resources: lr}})
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", k.ID, err))
	}
	return &emptypb.Empty{}, errgrpc.ToGRPC(ts.tasks.SetResources(ctx, k, res, lr))
}

// linuxResources decodes the OCI LinuxResources of an update.
func linuxResources(a *anypb.Any) (*specs.LinuxResources, error) {
	if a == nil {
		return nil, fmt.Errorf("%w: update without resources", errdefs.ErrInvalidArgument)
	}
	v, err := typeurl.UnmarshalAny(a)
	if err != nil {
		return nil, fmt.Errorf("%w: resources: %v", errdefs.ErrInvalidArgument, err)
	}
	lr, ok := v.(*specs.LinuxResources)
	if !ok {
		return nil, fmt.Errorf("%w: resources of type %s, want LinuxResources", errdefs.ErrInvalidArgument, a.GetTypeUrl())
	}
	return lr, nil
}

func (ts *TaskServer) Wait(ctx context.Context, req *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	p, err := ts.tasks.Wait(ctx, key(ctx, req.GetID()), req.GetExecID())
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &taskAPI.WaitResponse{ExitStatus: p.ExitStatus, ExitedAt: timestampOf(p.ExitedAt)}, nil
}

// Stats reports a container's cgroup metrics: the guest's in vm mode, the
// simulated usage with the container's limits in slot mode.
func (ts *TaskServer) Stats(ctx context.Context, req *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	data, err := ts.tasks.Stats(ctx, key(ctx, req.GetID()))
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &taskAPI.StatsResponse{Stats: data}, nil
}

func (ts *TaskServer) Connect(ctx context.Context, req *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	rec, _, _, err := ts.tasks.Get(key(ctx, req.GetID()))
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid()), TaskPid: rec.Pid, Version: "3"}, nil
}

// Shutdown is called per task by containerd when it is done with a shim;
// this server is shared by all sandboxes and stays up.
func (ts *TaskServer) Shutdown(context.Context, *taskAPI.ShutdownRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}

// readSpec reads the OCI spec of a bundle.
func readSpec(bundle string) (*specs.Spec, error) {
	if bundle == "" || !filepath.IsAbs(bundle) {
		return nil, fmt.Errorf("%w: bundle %q must be an absolute path", errdefs.ErrInvalidArgument, bundle)
	}
	f, err := os.Open(filepath.Join(bundle, "config.json"))
	if err != nil {
		if os.IsNotExist(err) || errors.Is(err, syscall.ENOTDIR) || errors.Is(err, syscall.ENAMETOOLONG) || errors.Is(err, syscall.ELOOP) {
			return nil, fmt.Errorf("%w: bundle %s has no config.json", errdefs.ErrInvalidArgument, bundle)
		}
		return nil, err
	}
	defer f.Close()
	var spec specs.Spec
	if err := json.NewDecoder(io.LimitReader(f, maxSpecSize)).Decode(&spec); err != nil {
		return nil, fmt.Errorf("%w: bundle %s: config.json: %v", errdefs.ErrInvalidArgument, bundle, err)
	}
	return &spec, nil
}
