package sandboxer

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	api "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/containerd/v2/core/sandbox/proxy"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

// serve runs the gRPC service on a unix socket and returns a client.
func serve(t *testing.T, c *Controller) *grpc.ClientConn {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "sb.sock")
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	srv := grpc.NewServer()
	NewService(c).Register(srv)
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return conn
}

// TestWireContract drives the service with containerd's own proxy client,
// the code containerd runs for a `type = "sandbox"` proxy plugin.
func TestWireContract(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := newController(t, root, slot.New())
	ctrl := proxy.NewSandboxController(api.NewControllerClient(serve(t, c)), "resource-slot")

	cfg := &runtime.PodSandboxConfig{
		Metadata:    &runtime.PodSandboxMetadata{Name: "web", Namespace: "default", Uid: "1"},
		Annotations: map[string]string{resourceinfo.AnnotationCPULimit: "2", resourceinfo.AnnotationMemoryLimit: "2Gi", resourceinfo.AnnotationPidLimit: "1000"},
		Linux: &runtime.LinuxPodSandboxConfig{
			Resources: &runtime.LinuxContainerResources{CpuShares: 1024},
			Overhead:  &runtime.LinuxContainerResources{MemoryLimitInBytes: 32 << 20},
		},
	}
	require.NoError(t, ctrl.Create(ctx, sandbox.Sandbox{ID: "sb1", Sandboxer: "resource-slot"}, sandbox.WithOptions(cfg), sandbox.WithNetNSPath("/var/run/netns/x")))
	m := readInfo(t, root, "sb1")
	assert.Equal(t, 2.0, m["cpu_limit"])
	assert.Equal(t, 1.0, m["cpu_request"])
	assert.Equal(t, 2147483648.0, m["memory_limit"])
	assert.Equal(t, 1000.0, m["pid_limit"])

	inst, err := ctrl.Start(ctx, "sb1")
	require.NoError(t, err)
	assert.Equal(t, "ttrpc+unix:///run/test-task.sock", inst.Address)
	assert.Equal(t, uint32(3), inst.Version)
	assert.False(t, inst.CreatedAt.IsZero())

	p, err := ctrl.Platform(ctx, "sb1")
	require.NoError(t, err)
	assert.Equal(t, "linux", p.OS)

	st, err := ctrl.Status(ctx, "sb1", true)
	require.NoError(t, err)
	assert.Equal(t, "SANDBOX_READY", st.State)
	assert.Equal(t, inst.Address, st.Address)
	assert.Contains(t, st.Info["resourceInfo"], `"memory_limit":2147483648`)
	assert.Contains(t, st.Info["info"], `"name":"web"`, "the pod config is shown as containerd's CRI expects it")

	metrics, err := ctrl.Metrics(ctx, "sb1")
	require.NoError(t, err)
	assert.Equal(t, "sb1", metrics.ID)
	assert.NotNil(t, metrics.Data)

	waited := make(chan error, 1)
	go func() { _, err := ctrl.Wait(ctx, "sb1"); waited <- err }()
	require.NoError(t, ctrl.Stop(ctx, "sb1", sandbox.WithTimeout(time.Second)))
	select {
	case err := <-waited:
		require.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Wait did not return")
	}
	st, err = ctrl.Status(ctx, "sb1", false)
	require.NoError(t, err)
	assert.Equal(t, "SANDBOX_NOTREADY", st.State)
	require.NoError(t, ctrl.Shutdown(ctx, "sb1"))

	// Errors keep their class across the wire.
	_, err = ctrl.Start(ctx, "sb1")
	assert.True(t, errdefs.IsNotFound(err), "got %v", err)
	err = ctrl.Create(ctx, sandbox.Sandbox{ID: "bad"}, sandbox.WithOptions(&runtime.PodSandboxConfig{
		Annotations: map[string]string{resourceinfo.AnnotationMemoryLimit: "lots"},
	}))
	assert.True(t, errdefs.IsInvalidArgument(err), "got %v", err)
	assert.Contains(t, err.Error(), resourceinfo.AnnotationMemoryLimit)
	assert.Contains(t, err.Error(), "lots")
}

func TestServiceRejectsUpdateWithoutSandbox(t *testing.T) {
	c := newController(t, t.TempDir(), slot.New())
	client := api.NewControllerClient(serve(t, c))
	_, err := client.Update(context.Background(), &api.ControllerUpdateRequest{SandboxID: "x"})
	assert.Equal(t, codes.InvalidArgument, status.Code(err))
	_, err = client.Wait(context.Background(), &api.ControllerWaitRequest{SandboxID: "../x"})
	assert.Equal(t, codes.InvalidArgument, status.Code(err))
}

// TestServiceMessagesWithoutRuntime: a sandbox without its runtime in
// Create or Update (sandbox.FromProto dereferences it) is a sandbox
// without runtime options, not a crash of the daemon.
func TestServiceMessagesWithoutRuntime(t *testing.T) {
	ctx := context.Background()
	c := newController(t, t.TempDir(), slot.New())
	client := api.NewControllerClient(serve(t, c))
	for _, tc := range []struct {
		desc string
		call func() error
		code codes.Code
	}{
		{"create, sandbox without runtime", func() error {
			_, err := client.Create(ctx, &api.ControllerCreateRequest{SandboxID: "sb1", Sandbox: &types.Sandbox{SandboxID: "sb1"}})
			return err
		}, codes.OK},
		{"create, no sandbox", func() error {
			_, err := client.Create(ctx, &api.ControllerCreateRequest{SandboxID: "sb2"})
			return err
		}, codes.OK},
		{"update, sandbox without runtime", func() error {
			_, err := client.Update(ctx, &api.ControllerUpdateRequest{SandboxID: "sb1", Sandbox: &types.Sandbox{SandboxID: "sb1"}})
			return err
		}, codes.OK},
		{"update of an unknown sandbox without runtime", func() error {
			_, err := client.Update(ctx, &api.ControllerUpdateRequest{SandboxID: "nope", Sandbox: &types.Sandbox{}})
			return err
		}, codes.NotFound},
		{"update, no sandbox", func() error {
			_, err := client.Update(ctx, &api.ControllerUpdateRequest{SandboxID: "sb1"})
			return err
		}, codes.InvalidArgument},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			assert.Equal(t, tc.code, status.Code(tc.call()))
		})
	}
}

// TestPodSandboxConfigURLs: a PodSandboxConfig in the options is decoded
// under either type URL, and a malformed one is refused under either
// (not ignored, which created the pod without its limits); options of
// another type are ignored.
func TestPodSandboxConfigURLs(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := newController(t, root, slot.New())
	client := api.NewControllerClient(serve(t, c))
	good, err := proto.Marshal(podConfig(map[string]string{resourceinfo.AnnotationCPULimit: "3"}, nil))
	require.NoError(t, err)
	garbage := []byte{0xff, 0xff, 0xff}
	for i, tc := range []struct {
		url   string
		value []byte
		code  codes.Code
		cpu   any
	}{
		{"runtime.v1.PodSandboxConfig", good, codes.OK, 3.0},
		{"type.googleapis.com/runtime.v1.PodSandboxConfig", good, codes.OK, 3.0},
		{"runtime.v1.PodSandboxConfig", garbage, codes.InvalidArgument, nil},
		{"type.googleapis.com/runtime.v1.PodSandboxConfig", garbage, codes.InvalidArgument, nil},
		{"type.googleapis.com/google.protobuf.Empty", nil, codes.OK, nil},
		{"example.com/unknown.Type", garbage, codes.OK, nil},
	} {
		t.Run(fmt.Sprintf("%s %d", tc.url, len(tc.value)), func(t *testing.T) {
			id := fmt.Sprintf("sb%d", i)
			_, err := client.Create(ctx, &api.ControllerCreateRequest{SandboxID: id, Options: &anypb.Any{TypeUrl: tc.url, Value: tc.value}})
			require.Equal(t, tc.code, status.Code(err), "%v", err)
			if tc.code != codes.OK {
				_, err := os.Stat(filepath.Join(root, id))
				assert.True(t, os.IsNotExist(err), "nothing of a refused pod on disk")
				return
			}
			assert.Equal(t, tc.cpu, readInfo(t, root, id)["cpu_limit"])
		})
	}
}
