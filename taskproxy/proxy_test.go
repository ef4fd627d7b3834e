package taskproxy

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

func ns(ctx context.Context) context.Context { return namespaces.WithNamespace(ctx, "k8s.io") }

// daemon is one instance of the sandboxer's controller and task server
// on a unix socket, over a state directory.
type daemon struct {
	ctrl *sandboxer.Controller
	stop func()
}

// upstream runs a controller and its task server on sock, as one daemon
// instance; stop ends it the way a graceful stop does.
func upstream(t *testing.T, root, sock string) *daemon {
	t.Helper()
	ctx := context.Background()
	c, err := sandboxer.New(sandboxer.Options{Root: root, Backend: slot.New(), TaskAddress: "ttrpc+unix:///run/test-task.sock", CreatedGrace: time.Hour})
	require.NoError(t, err)
	_, err = c.Recover(ctx)
	require.NoError(t, err)
	tasks := sandboxer.NewTasks(ctx, c, nil)
	ts, err := sandboxer.NewTaskServer(tasks)
	require.NoError(t, err)
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	go ts.Serve(ctx, l)
	return &daemon{ctrl: c, stop: func() {
		c.BeginShutdown()
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		ts.Stop(sctx)
		tasks.Close()
		// A graceful stop closes the journal too.
		c.Close(sctx)
	}}
}

func (d *daemon) readySandbox(t testing.TB, id string) {
	t.Helper()
	ctx := context.Background()
	require.NoError(t, d.ctrl.Create(ctx, sandbox.Sandbox{ID: id}))
	_, err := d.ctrl.Start(ctx, id)
	require.NoError(t, err)
}

// bundle writes a container bundle in sandboxID.
func bundle(t testing.TB, sandboxID string) string {
	t.Helper()
	dir := t.TempDir()
	data, err := json.Marshal(&specs.Spec{Version: specs.Version, Annotations: map[string]string{"io.kubernetes.cri.sandbox-id": sandboxID}})
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "config.json"), data, 0o600))
	return dir
}

// front serves p on a socket and returns a task API client of it, as
// containerd holds one.
func front(t *testing.T, p *Proxy) taskAPI.TTRPCTaskService {
	t.Helper()
	srv, err := ttrpc.NewServer()
	require.NoError(t, err)
	p.Register(srv)
	sock := filepath.Join(t.TempDir(), "front.sock")
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	go srv.Serve(context.Background(), l)
	t.Cleanup(func() { srv.Close(); p.Close() })
	conn, err := net.Dial("unix", sock)
	require.NoError(t, err)
	tc := ttrpc.NewClient(conn)
	t.Cleanup(func() { tc.Close() })
	return taskAPI.NewTTRPCTaskClient(tc)
}

// TestProxyOutlivesDaemon restarts the daemon behind the proxy while a
// containerd-like client waits on a task through one proxy connection.
func TestProxyOutlivesDaemon(t *testing.T) {
	ctx := ns(context.Background())
	root := t.TempDir()
	up := filepath.Join(t.TempDir(), "up.sock")
	d := upstream(t, root, up)
	d.readySandbox(t, "sb")
	p := New(up)
	client := front(t, p)

	_, err := client.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c", Bundle: bundle(t, "sb")})
	require.NoError(t, err)
	_, err = client.Start(ctx, &taskAPI.StartRequest{ID: "c"})
	require.NoError(t, err)
	waited := make(chan *taskAPI.WaitResponse, 1)
	go func() {
		w, err := client.Wait(ctx, &taskAPI.WaitRequest{ID: "c"})
		assert.NoError(t, err)
		waited <- w
	}()
	time.Sleep(50 * time.Millisecond)

	// The daemon goes away: calls that cannot reach it fail only when
	// their deadline passes; the pending Wait keeps waiting.
	d.stop()
	sctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = client.State(sctx, &taskAPI.StateRequest{ID: "c"})
	cancel()
	require.Error(t, err, "no answer without the daemon")
	assert.Greater(t, p.Unreachable(), time.Duration(0))

	// A new daemon on the same state: the same client connection sees the
	// task running, and the Wait ends when it is killed.
	d2 := upstream(t, root, up)
	t.Cleanup(d2.stop)
	st, err := client.State(ctx, &taskAPI.StateRequest{ID: "c"})
	require.NoError(t, err)
	assert.Equal(t, task.Status_RUNNING, st.Status)
	assert.Equal(t, time.Duration(0), p.Unreachable())
	select {
	case <-waited:
		t.Fatal("Wait returned while the task runs")
	default:
	}
	_, err = client.Kill(ctx, &taskAPI.KillRequest{ID: "c", Signal: uint32(syscall.SIGKILL)})
	require.NoError(t, err)
	select {
	case w := <-waited:
		assert.Equal(t, uint32(137), w.ExitStatus)
	case <-time.After(10 * time.Second):
		t.Fatal("Wait through the proxy did not return")
	}
	_, err = client.Shutdown(ctx, &taskAPI.ShutdownRequest{ID: "c"})
	assert.NoError(t, err, "the shared shim ignores per-task shutdown")
}

// TestProxyDropsDeadConnection: after the daemon restarts, the first call
// that cannot be re-sent (Create) reaches the new daemon instead of
// failing on the connection to the old one.
func TestProxyDropsDeadConnection(t *testing.T) {
	ctx := ns(context.Background())
	root := t.TempDir()
	up := filepath.Join(t.TempDir(), "up.sock")
	d := upstream(t, root, up)
	d.readySandbox(t, "sb")
	p := New(up)
	client := front(t, p)
	_, err := client.Create(ctx, &taskAPI.CreateTaskRequest{ID: "before", Bundle: bundle(t, "sb")})
	require.NoError(t, err)

	d.stop()
	d2 := upstream(t, root, up)
	t.Cleanup(d2.stop)
	deadline := time.Now().Add(5 * time.Second)
	for {
		p.mu.Lock()
		dropped := p.client == nil
		p.mu.Unlock()
		if dropped {
			break
		}
		require.True(t, time.Now().Before(deadline), "the dead connection was not dropped")
		time.Sleep(10 * time.Millisecond)
	}
	_, err = client.Create(ctx, &taskAPI.CreateTaskRequest{ID: "after", Bundle: bundle(t, "sb")})
	require.NoError(t, err)
}

// fakeUpstream answers every task call with what answer returns, and
// counts the calls per method.
type fakeUpstream struct {
	calls  chan string
	answer func(method string, n int) error
}

func (f *fakeUpstream) serve(t *testing.T, sock string) {
	t.Helper()
	srv, err := ttrpc.NewServer()
	require.NoError(t, err)
	desc := &ttrpc.ServiceDesc{Methods: map[string]ttrpc.Method{}}
	counts := map[string]int{}
	for name := range methods {
		desc.Methods[name] = func(_ context.Context, unmarshal func(any) error) (any, error) {
			var req emptypb.Empty
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			counts[name]++
			f.calls <- name
			if err := f.answer(name, counts[name]); err != nil {
				return nil, err
			}
			return &emptypb.Empty{}, nil
		}
	}
	srv.RegisterService(Service, desc)
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	go srv.Serve(context.Background(), l)
	t.Cleanup(func() { srv.Close() })
}

// TestProxyUnansweredCalls: a call the sandboxer ends without answering
// it (its graceful stop ends Waits with Unavailable; a cancelled handler
// ends with Canceled) never reaches containerd as the call's result: a
// Wait is sent again, a call that cannot be re-sent is Unavailable.
func TestProxyUnansweredCalls(t *testing.T) {
	ctx := ns(context.Background())
	up := filepath.Join(t.TempDir(), "up.sock")
	f := &fakeUpstream{calls: make(chan string, 100), answer: func(method string, n int) error {
		switch {
		case method == "Wait" && n == 1:
			return errgrpc.ToGRPC(errdefs.ErrUnavailable)
		case method == "Wait" && n == 2:
			return errgrpc.ToGRPC(context.Canceled)
		case method == "State" && n == 1:
			return errgrpc.ToGRPC(context.DeadlineExceeded)
		case method == "State" && n == 2:
			return errgrpc.ToGRPC(errdefs.ErrUnavailable)
		case method == "Start":
			return errgrpc.ToGRPC(context.Canceled)
		case method == "Kill":
			return errgrpc.ToGRPCf(errdefs.ErrNotFound, "no such task")
		}
		return nil
	}}
	f.serve(t, up)
	client := front(t, New(up))

	_, err := client.Wait(ctx, &taskAPI.WaitRequest{ID: "c"})
	require.NoError(t, err, "the Wait is sent until the sandboxer answers it")
	assert.Equal(t, []string{"Wait", "Wait", "Wait"}, drain(f.calls))

	_, err = client.State(ctx, &taskAPI.StateRequest{ID: "c"})
	assert.True(t, errdefs.IsUnavailable(errgrpc.ToNative(err)), "State: only a cancelled one is sent again; Unavailable is an answer: %v", err)
	assert.Equal(t, []string{"State", "State"}, drain(f.calls))

	_, err = client.Start(ctx, &taskAPI.StartRequest{ID: "c"})
	assert.True(t, errdefs.IsUnavailable(errgrpc.ToNative(err)), "a cancelled Start is not sent again: %v", err)
	assert.Equal(t, []string{"Start"}, drain(f.calls))

	_, err = client.Kill(ctx, &taskAPI.KillRequest{ID: "c"})
	assert.True(t, errdefs.IsNotFound(errgrpc.ToNative(err)), "the sandboxer's answers pass: %v", err)

	// containerd's own deadline ends a Wait: that is its result.
	f.answer = func(string, int) error { return errgrpc.ToGRPC(errdefs.ErrUnavailable) }
	wctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	_, err = client.Wait(wctx, &taskAPI.WaitRequest{ID: "c"})
	assert.Error(t, err)
}

func drain(ch chan string) []string {
	var out []string
	for {
		select {
		case m := <-ch:
			out = append(out, m)
		default:
			return out
		}
	}
}

// TestConns: the shim's listener counts the open connections, through a
// ttrpc server with its same-user handshake.
func TestConns(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	conns := CountConns(l)
	srv, err := ttrpc.NewServer(ttrpc.WithServerHandshaker(SameUser()))
	require.NoError(t, err)
	New(filepath.Join(t.TempDir(), "none.sock")).Register(srv)
	go srv.Serve(context.Background(), conns)
	defer srv.Close()

	var clients []*ttrpc.Client
	for range 3 {
		c, err := net.Dial("unix", sock)
		require.NoError(t, err)
		tc := ttrpc.NewClient(c)
		clients = append(clients, tc)
		_, err = taskAPI.NewTTRPCTaskClient(tc).Shutdown(ns(context.Background()), &taskAPI.ShutdownRequest{ID: "x"})
		require.NoError(t, err, "the handshake lets this user in")
	}
	assert.Equal(t, int64(3), conns.Open())
	for _, c := range clients {
		c.Close()
	}
	deadline := time.Now().Add(10 * time.Second)
	for conns.Open() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	assert.Equal(t, int64(0), conns.Open(), "closed connections are no longer counted")
}
