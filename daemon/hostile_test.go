package daemon

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	taskapi "github.com/containerd/containerd/api/runtime/task/v3"
	sbapi "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/anypb"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/config"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/guard"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/hostile"
)

// testDaemon runs the daemon in this process (slot mode, no task shim,
// no events) and returns its configuration; it stops with the test.
func testDaemon(t *testing.T, extra func(*config.Config)) config.Config {
	t.Helper()
	superviseShim = false
	t.Cleanup(func() { superviseShim = true })
	base, err := os.MkdirTemp("", "rss-daemon-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(base) })
	cfg := config.Default()
	cfg.Listen = filepath.Join(base, "sb.sock")
	cfg.Dir = filepath.Join(base, "state")
	cfg.ContainerdAddress = ""
	cfg.Fsync = false
	cfg.LogLevel = "error"
	if extra != nil {
		extra(&cfg)
	}
	// Run leaves the level to main.
	level := log.L.Logger.GetLevel()
	require.NoError(t, log.SetLevel(cfg.LogLevel))
	t.Cleanup(func() { log.L.Logger.SetLevel(level) })
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
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(30 * time.Second):
			t.Error("the daemon did not stop")
		}
	})
	return cfg
}

// dial connects to the daemon's gRPC socket and its task server (the
// shim's upstream: no shim runs in these tests).
func dial(t *testing.T, cfg config.Config) hostile.Clients {
	t.Helper()
	gc, err := grpc.NewClient("unix://"+cfg.Listen, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(64<<20)))
	require.NoError(t, err)
	t.Cleanup(func() { gc.Close() })
	conn, err := net.Dial("unix", cfg.TaskUpstreamPath())
	require.NoError(t, err)
	tc := ttrpc.NewClient(conn)
	t.Cleanup(func() { tc.Close() })
	return hostile.Clients{GRPC: gc, TTRPC: tc}
}

// TestHostileMessages sends thousands of random, malformed and hostile
// messages to every method of the sandbox controller, the CRI and the
// task API of one daemon: no call may panic (each would be recovered,
// counted and logged by the guard interceptors), fail as Unknown or
// Internal, and the daemon serves on. RSS_HOSTILE_CALLS sets how many
// (default 2000), RSS_HOSTILE_SEED the seed.
func TestHostileMessages(t *testing.T) {
	n, seed := 2000, uint64(1)
	if v, err := strconv.Atoi(os.Getenv("RSS_HOSTILE_CALLS")); err == nil {
		n = v
	}
	if v, err := strconv.ParseUint(os.Getenv("RSS_HOSTILE_SEED"), 10, 64); err == nil {
		seed = v
	}
	cfg := testDaemon(t, nil)
	c := dial(t, cfg)
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	g := hostile.New(seed)

	// Sandboxes, pods and containers for the calls to find, made again
	// and again as the calls stop and remove them.
	ctrl := sbapi.NewControllerClient(c.GRPC)
	tasks := taskapi.NewTTRPCTaskClient(c.TTRPC)
	cri := runtime.NewRuntimeServiceClient(c.GRPC)
	for i := range 3 {
		id := fmt.Sprintf("sb%d", i)
		g.IDs = append(g.IDs, id, fmt.Sprintf("ctr%d", i))
		dir := t.TempDir()
		require.NoError(t, hostile.PlainBundle(dir, id))
		g.Bundles = append(g.Bundles, dir)
		for range 2 {
			dir := t.TempDir()
			require.NoError(t, g.Bundle(dir, id))
			g.Bundles = append(g.Bundles, dir)
		}
	}
	logDir := t.TempDir()
	var podID string
	populate := func() {
		for i := range 3 {
			id := fmt.Sprintf("sb%d", i)
			opts, err := typeurl.MarshalAnyToProto(&runtime.PodSandboxConfig{Metadata: &runtime.PodSandboxMetadata{Name: id, Uid: id, Namespace: "ns"}})
			require.NoError(t, err)
			ctrl.Create(ctx, &sbapi.ControllerCreateRequest{SandboxID: id, Options: &anypb.Any{TypeUrl: opts.GetTypeUrl(), Value: opts.GetValue()}})
			ctrl.Start(ctx, &sbapi.ControllerStartRequest{SandboxID: id})
			cid := fmt.Sprintf("ctr%d", i)
			tasks.Create(ctx, &taskapi.CreateTaskRequest{ID: cid, Bundle: g.Bundles[3*i]})
			tasks.Start(ctx, &taskapi.StartRequest{ID: cid})
		}
		if podID != "" {
			if _, err := cri.PodSandboxStatus(ctx, &runtime.PodSandboxStatusRequest{PodSandboxId: podID}); err == nil {
				return
			}
		}
		pod, err := cri.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: &runtime.PodSandboxConfig{
			Metadata: &runtime.PodSandboxMetadata{Name: "pod", Uid: "pod", Namespace: "ns", Attempt: uint32(len(g.IDs))}, LogDirectory: logDir,
		}})
		require.NoError(t, err)
		ctr, err := cri.CreateContainer(ctx, &runtime.CreateContainerRequest{PodSandboxId: pod.PodSandboxId,
			Config: &runtime.ContainerConfig{Metadata: &runtime.ContainerMetadata{Name: "c"}, Image: &runtime.ImageSpec{Image: "busybox"}, LogPath: "c.log"}})
		require.NoError(t, err)
		podID = pod.PodSandboxId
		g.IDs = append(g.IDs, pod.PodSandboxId, ctr.ContainerId, pod.PodSandboxId[:8])
	}

	before := guard.Panics()
	rep, err := hostile.Run(ctx, c, g, n, populate)
	require.NoError(t, err)
	assert.Equal(t, before, guard.Panics(), "calls panicked; see the log")
	for k, v := range rep.Bad {
		t.Errorf("%s: %s", k, v)
	}
	// The daemon still serves.
	_, err = cri.Version(ctx, &runtime.VersionRequest{})
	require.NoError(t, err)
	if testing.Verbose() {
		t.Logf("%d calls:\n%s", n, rep.Summary())
	}
}
