package sandboxer

import (
	"context"
	"net"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/ttrpc"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

// upstream runs a controller and its task server on sock, as one daemon
// instance; stop ends it the way a restart does.
func upstream(t *testing.T, root, sock string) (c *Controller, stop func()) {
	t.Helper()
	ctx := context.Background()
	c = newController(t, root, slot.New())
	_, err := c.Recover(ctx)
	require.NoError(t, err)
	tasks := NewTasks(ctx, c, nil)
	ts, err := NewTaskServer(tasks)
	require.NoError(t, err)
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	go ts.Serve(ctx, l)
	return c, func() {
		c.BeginShutdown()
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		ts.Stop(sctx)
		tasks.Close()
		// The daemon's process ends: its journal with it.
		c.abandon()
	}
}

// TestProxyOutlivesDaemon restarts the daemon behind the proxy while a
// containerd-like client waits on a task through one proxy connection.
func TestProxyOutlivesDaemon(t *testing.T) {
	ctx := ns(context.Background())
	root, dir := t.TempDir(), t.TempDir()
	up := filepath.Join(dir, "up.sock")
	c, stop := upstream(t, root, up)
	readySandbox(t, &taskEnv{ctrl: c}, "sb")

	srv, err := ttrpc.NewServer()
	require.NoError(t, err)
	p := NewTaskProxy(up)
	p.Register(srv)
	front := filepath.Join(dir, "front.sock")
	l, err := net.Listen("unix", front)
	require.NoError(t, err)
	go srv.Serve(ctx, l)
	t.Cleanup(func() { srv.Close(); p.Close() })
	conn, err := net.Dial("unix", front)
	require.NoError(t, err)
	tc := ttrpc.NewClient(conn)
	t.Cleanup(func() { tc.Close() })
	client := taskAPI.NewTTRPCTaskClient(tc)

	_, err = client.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c", Bundle: bundle(t, "sb", nil, nil)})
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
	stop()
	sctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = client.State(sctx, &taskAPI.StateRequest{ID: "c"})
	cancel()
	require.Error(t, err, "no answer without the daemon")
	assert.Greater(t, p.Unreachable(), time.Duration(0))

	// A new daemon on the same state: the same client connection sees the
	// task running, and the Wait ends when it is killed.
	_, stop2 := upstream(t, root, up)
	t.Cleanup(stop2)
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
	root, dir := t.TempDir(), t.TempDir()
	up := filepath.Join(dir, "up.sock")
	c, stop := upstream(t, root, up)
	readySandbox(t, &taskEnv{ctrl: c}, "sb")
	p := NewTaskProxy(up)
	t.Cleanup(p.Close)
	_, err := p.Create(ctx, &taskAPI.CreateTaskRequest{ID: "before", Bundle: bundle(t, "sb", nil, nil)})
	require.NoError(t, err)

	stop()
	_, stop2 := upstream(t, root, up)
	t.Cleanup(stop2)
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
	_, err = p.Create(ctx, &taskAPI.CreateTaskRequest{ID: "after", Bundle: bundle(t, "sb", nil, nil)})
	require.NoError(t, err)
}
