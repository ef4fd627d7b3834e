package taskproxy

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"syscall"
	"testing"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

// typedProxy is the forwarding the shim did before this package: decode
// each call into its type, and encode it again upstream.
type typedProxy struct{ c taskAPI.TTRPCTaskService }

func (p typedProxy) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	return p.c.State(ctx, r)
}
func (p typedProxy) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	return p.c.Create(ctx, r)
}
func (p typedProxy) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	return p.c.Start(ctx, r)
}
func (p typedProxy) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	return p.c.Delete(ctx, r)
}
func (p typedProxy) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	return p.c.Pids(ctx, r)
}
func (p typedProxy) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*emptypb.Empty, error) {
	return p.c.Pause(ctx, r)
}
func (p typedProxy) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*emptypb.Empty, error) {
	return p.c.Resume(ctx, r)
}
func (p typedProxy) Checkpoint(ctx context.Context, r *taskAPI.CheckpointTaskRequest) (*emptypb.Empty, error) {
	return p.c.Checkpoint(ctx, r)
}
func (p typedProxy) Kill(ctx context.Context, r *taskAPI.KillRequest) (*emptypb.Empty, error) {
	return p.c.Kill(ctx, r)
}
func (p typedProxy) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*emptypb.Empty, error) {
	return p.c.Exec(ctx, r)
}
func (p typedProxy) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (*emptypb.Empty, error) {
	return p.c.ResizePty(ctx, r)
}
func (p typedProxy) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*emptypb.Empty, error) {
	return p.c.CloseIO(ctx, r)
}
func (p typedProxy) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (*emptypb.Empty, error) {
	return p.c.Update(ctx, r)
}
func (p typedProxy) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	return p.c.Wait(ctx, r)
}
func (p typedProxy) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	return p.c.Stats(ctx, r)
}
func (p typedProxy) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	return p.c.Connect(ctx, r)
}
func (p typedProxy) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}

func serveOn(b *testing.B, sock string, register func(*ttrpc.Server)) {
	srv, err := ttrpc.NewServer()
	require.NoError(b, err)
	register(srv)
	l, err := net.Listen("unix", sock)
	require.NoError(b, err)
	go srv.Serve(context.Background(), l)
	b.Cleanup(func() { srv.Close() })
}

func clientOf(b *testing.B, sock string) taskAPI.TTRPCTaskService {
	c, err := net.Dial("unix", sock)
	require.NoError(b, err)
	tc := ttrpc.NewClient(c)
	b.Cleanup(func() { tc.Close() })
	return taskAPI.NewTTRPCTaskClient(tc)
}

// BenchmarkForwarding: task calls on the sandboxer's task server (slot,
// no fsync) directly, through the typed forwarding the shim did before,
// and through Proxy; State alone, and a container's life (Create, Start,
// State, Kill, Wait, Delete). In one process: what the forwarding itself
// costs, without the scheduling of a process of its own.
func BenchmarkForwarding(b *testing.B) {
	ctx := ns(context.Background())
	level := log.L.Logger.GetLevel()
	log.SetLevel("error")
	b.Cleanup(func() { log.L.Logger.SetLevel(level) })
	root, dir := b.TempDir(), b.TempDir()
	c, err := sandboxer.New(sandboxer.Options{Root: root, Backend: slot.New(), TaskAddress: "ttrpc+unix:///x", NoSync: true})
	require.NoError(b, err)
	_, err = c.Recover(ctx)
	require.NoError(b, err)
	tasks := sandboxer.NewTasks(ctx, c, nil)
	ts, err := sandboxer.NewTaskServer(tasks)
	require.NoError(b, err)
	up := filepath.Join(dir, "up.sock")
	l, err := net.Listen("unix", up)
	require.NoError(b, err)
	go ts.Serve(ctx, l)
	b.Cleanup(func() { ts.Stop(ctx) })
	d := &daemon{ctrl: c}
	d.readySandbox(b, "sb")

	typed := filepath.Join(dir, "typed.sock")
	serveOn(b, typed, func(s *ttrpc.Server) { taskAPI.RegisterTTRPCTaskService(s, typedProxy{clientOf(b, up)}) })
	raw := filepath.Join(dir, "raw.sock")
	p := New(up)
	b.Cleanup(p.Close)
	serveOn(b, raw, p.Register)

	bundlePath := bundle(b, "sb")
	direct := clientOf(b, up)
	_, err = direct.Create(ctx, &taskAPI.CreateTaskRequest{ID: "state", Bundle: bundlePath})
	require.NoError(b, err)
	for _, v := range []struct{ name, sock string }{{"direct", up}, {"typed", typed}, {"raw", raw}} {
		// State alone: a round trip that changes nothing, so what the
		// forwarding costs is most of it.
		b.Run("State/"+v.name, func(b *testing.B) {
			client := clientOf(b, v.sock)
			for range b.N {
				_, err := client.State(ctx, &taskAPI.StateRequest{ID: "state"})
				require.NoError(b, err)
			}
		})
		// A container's life: the calls that change state write it.
		b.Run("Cycle/"+v.name, func(b *testing.B) {
			client := clientOf(b, v.sock)
			for i := range b.N {
				id := fmt.Sprintf("%s-%d", v.name, i)
				_, err := client.Create(ctx, &taskAPI.CreateTaskRequest{ID: id, Bundle: bundlePath})
				require.NoError(b, err)
				_, err = client.Start(ctx, &taskAPI.StartRequest{ID: id})
				require.NoError(b, err)
				_, err = client.State(ctx, &taskAPI.StateRequest{ID: id})
				require.NoError(b, err)
				_, err = client.Kill(ctx, &taskAPI.KillRequest{ID: id, Signal: uint32(syscall.SIGKILL)})
				require.NoError(b, err)
				_, err = client.Wait(ctx, &taskAPI.WaitRequest{ID: id})
				require.NoError(b, err)
				_, err = client.Delete(ctx, &taskAPI.DeleteRequest{ID: id})
				require.NoError(b, err)
			}
		})
	}
}
