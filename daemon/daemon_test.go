package daemon

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	taskapi "github.com/containerd/containerd/api/runtime/task/v3"
	sbapi "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/config"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/dirlock"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/testenv"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/unixsock"
)

// TestSecondDaemonRefused: a second daemon on the state directory of a
// running one refuses to start, whatever its sockets, and touches
// nothing.
func TestSecondDaemonRefused(t *testing.T) {
	cfg := testDaemon(t, nil)
	before, err := os.ReadDir(cfg.Dir)
	require.NoError(t, err)

	second := cfg
	base := t.TempDir()
	second.Listen = filepath.Join(base, "other.sock")
	err = Run(context.Background(), second, func() { t.Error("the second daemon served") })
	require.Error(t, err)
	assert.True(t, errors.Is(err, dirlock.ErrLocked), "%v", err)
	assert.Contains(t, err.Error(), cfg.Dir)
	_, err = os.Stat(second.Listen)
	assert.True(t, os.IsNotExist(err), "the second daemon listens nowhere")
	after, err := os.ReadDir(cfg.Dir)
	require.NoError(t, err)
	assert.Equal(t, len(before), len(after))
}

// runDaemon runs the daemon in this process until the returned stop is
// called; stop returns Run's error.
func runDaemon(t *testing.T, cfg config.Config) (stop func() error) {
	t.Helper()
	superviseShim = false
	t.Cleanup(func() { superviseShim = true })
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg, func() { close(ready) }) }()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		t.Fatalf("daemon: %v", err)
	}
	return func() error {
		cancel()
		return <-done
	}
}

func testConfig(t *testing.T, sockDir string) config.Config {
	t.Helper()
	cfg := config.Default()
	cfg.Listen = filepath.Join(sockDir, "sb.sock")
	cfg.Dir = filepath.Join(t.TempDir(), "state")
	cfg.ContainerdAddress = ""
	cfg.Fsync = false
	return cfg
}

// TestHostileSocketDirectory: a listen socket in a directory that another
// user may write to is refused (that user could rename the socket away
// and listen in its place), unless allow_shared_socket_dir says so.
func TestHostileSocketDirectory(t *testing.T) {
	testenv.NeedRoot(t)
	dir := filepath.Join(t.TempDir(), "shared")
	require.NoError(t, os.Mkdir(dir, 0o777))
	require.NoError(t, os.Chmod(dir, 0o777))
	require.NoError(t, os.Chown(dir, 65534, 65534))
	cfg := testConfig(t, dir)
	err := Run(context.Background(), cfg, func() { t.Error("served in a hostile directory") })
	require.Error(t, err)
	assert.True(t, errors.Is(err, unixsock.ErrSharedDir), "%v", err)
	entries, _ := os.ReadDir(dir)
	assert.Empty(t, entries, "no socket created")

	cfg.AllowSharedSocketDir = true
	require.NoError(t, runDaemon(t, cfg)())
}

// TestStopRemovesOnlyItsSockets: on a graceful stop the daemon removes
// its sockets, and not a socket another process put in the place of one.
func TestStopRemovesOnlyItsSockets(t *testing.T) {
	dir, err := os.MkdirTemp("", "rss-sock-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg := testConfig(t, dir)
	stop := runDaemon(t, cfg)
	// An impostor renames the listen socket away and listens in its
	// place.
	require.NoError(t, os.Rename(cfg.Listen, filepath.Join(dir, "moved.sock")))
	impostor, err := net.Listen("unix", cfg.Listen)
	require.NoError(t, err)
	impostor.(*net.UnixListener).SetUnlinkOnClose(false)
	defer impostor.Close()
	require.NoError(t, stop())
	_, err = os.Lstat(cfg.Listen)
	assert.NoError(t, err, "the impostor's socket is left")
	for _, p := range []string{cfg.TaskUpstreamPath(), cfg.AdminSocketPath()} {
		_, err := os.Lstat(p)
		assert.True(t, os.IsNotExist(err), "%s is removed", p)
	}
}

// TestHugeIDsNotLogged: calls refused for an ID of megabytes (through the
// sandbox API, the CRI and the task API) log a few lines of normal size,
// not the ID, even at debug level.
func TestHugeIDsNotLogged(t *testing.T) {
	buf := testenv.CaptureLog(t)
	cfg := testDaemon(t, func(c *config.Config) { c.LogLevel = "debug" })
	c := dial(t, cfg)
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	huge := strings.Repeat("x", 3<<20)

	ctrl := sbapi.NewControllerClient(c.GRPC)
	_, err := ctrl.Status(ctx, &sbapi.ControllerStatusRequest{SandboxID: huge})
	assert.Equal(t, codes.InvalidArgument, status.Code(err))
	_, err = ctrl.Create(ctx, &sbapi.ControllerCreateRequest{SandboxID: huge})
	assert.Equal(t, codes.InvalidArgument, status.Code(err))
	cri := runtime.NewRuntimeServiceClient(c.GRPC)
	_, err = cri.PodSandboxStatus(ctx, &runtime.PodSandboxStatusRequest{PodSandboxId: huge})
	assert.Error(t, err)
	_, err = cri.ContainerStatus(ctx, &runtime.ContainerStatusRequest{ContainerId: huge})
	assert.Error(t, err)
	_, err = cri.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: huge})
	assert.Equal(t, codes.InvalidArgument, status.Code(err))
	tasks := taskapi.NewTTRPCTaskClient(c.TTRPC)
	_, err = tasks.State(ctx, &taskapi.StateRequest{ID: huge})
	assert.Error(t, err)
	_, err = tasks.Create(ctx, &taskapi.CreateTaskRequest{ID: huge, Bundle: "/" + huge})
	assert.Error(t, err)

	logged := buf.String()
	assert.Less(t, len(logged), 64<<10, "the log of the refused calls: %.2000s", logged)
	assert.NotContains(t, logged, strings.Repeat("x", 2000))
}

// TestMetricsAddressWarning: metrics on an address other than loopback
// are served, with a warning that they have no authentication.
func TestMetricsAddressWarning(t *testing.T) {
	for _, tc := range []struct {
		addr string
		warn bool
	}{{"127.0.0.1:0", false}, {"[::1]:0", false}, {"0.0.0.0:0", true}} {
		t.Run(tc.addr, func(t *testing.T) {
			buf := testenv.CaptureLog(t)
			cfg := testConfig(t, t.TempDir())
			cfg.MetricsAddress = tc.addr
			level := log.L.Logger.GetLevel()
			require.NoError(t, log.SetLevel("warn"))
			defer log.L.Logger.SetLevel(level)
			require.NoError(t, runDaemon(t, cfg)())
			assert.Equal(t, tc.warn, strings.Contains(buf.String(), "without authentication"), "%s", buf.String())
		})
	}
}
