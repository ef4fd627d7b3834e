package cri

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/log"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

func TestMain(m *testing.M) {
	// Lifecycle logs are noise in test output; failures say what matters.
	if os.Getenv("RSS_TEST_LOGS") == "" {
		log.L.Logger.SetOutput(io.Discard)
	}
	os.Exit(m.Run())
}

// env is a real Controller and Tasks on a temp dir, served with the CRI
// service over gRPC on a unix socket, and the CRI Go clients.
type env struct {
	t      testing.TB
	dir    string
	ctrl   *sandboxer.Controller
	tasks  *sandboxer.Tasks
	svc    *Service
	rt     runtime.RuntimeServiceClient
	img    runtime.ImageServiceClient
	stopFn func()
}

func newEnv(t *testing.T) *env {
	t.Helper()
	return startEnv(t, t.TempDir())
}

// startEnv starts the service over the state in dir, recovering it.
func startEnv(t testing.TB, dir string) *env { return startEnvSync(t, dir, false) }

// startEnvSync is startEnv, durable with sync.
func startEnvSync(t testing.TB, dir string, sync bool) *env {
	t.Helper()
	ctx := context.Background()
	ctrl, err := sandboxer.New(sandboxer.Options{Root: dir, Backend: slot.New(), TaskAddress: "ttrpc+unix:///nonexistent-task.sock", NoSync: !sync})
	require.NoError(t, err)
	_, err = ctrl.Recover(ctx)
	require.NoError(t, err)
	tasks := sandboxer.NewTasks(ctx, ctrl, nil)
	svc, err := New(ctx, Options{Controller: ctrl, Tasks: tasks, Dir: dir, NoSync: !sync})
	require.NoError(t, err)

	// Unix socket paths are short (108 bytes): not under t.TempDir().
	sockDir, err := os.MkdirTemp("", "cri-test-")
	require.NoError(t, err)
	sock := filepath.Join(sockDir, "cri.sock")
	lis, err := net.Listen("unix", sock)
	require.NoError(t, err)
	srv := grpc.NewServer()
	svc.Register(srv)
	go srv.Serve(lis)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	e := &env{t: t, dir: dir, ctrl: ctrl, tasks: tasks, svc: svc,
		rt: runtime.NewRuntimeServiceClient(conn), img: runtime.NewImageServiceClient(conn)}
	stopped := false
	e.stopFn = func() {
		if stopped {
			return
		}
		stopped = true
		conn.Close()
		ctrl.BeginShutdown()
		srv.Stop()
		tasks.Close()
		// As the daemon does: the journal is compacted and closed, so a
		// restart opens it alone.
		ctrl.Close(context.Background())
		os.RemoveAll(sockDir)
	}
	t.Cleanup(e.stopFn)
	return e
}

// restart stops the service and starts a new one over the same state.
func (e *env) restart() *env {
	e.stopFn()
	return startEnv(e.t, e.dir)
}

var ctx = context.Background()

func podConfig(name string, annotations map[string]string) *runtime.PodSandboxConfig {
	return &runtime.PodSandboxConfig{
		Metadata:    &runtime.PodSandboxMetadata{Name: name, Namespace: "test", Uid: name + "-uid"},
		Labels:      map[string]string{"app": name},
		Annotations: annotations,
		Linux: &runtime.LinuxPodSandboxConfig{
			SecurityContext: &runtime.LinuxSandboxSecurityContext{
				NamespaceOptions: &runtime.NamespaceOption{Network: runtime.NamespaceMode_NODE},
			},
		},
	}
}

func (e *env) runp(cfg *runtime.PodSandboxConfig) string {
	e.t.Helper()
	resp, err := e.rt.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: cfg})
	require.NoError(e.t, err)
	return resp.PodSandboxId
}

func containerConfig(name string, annotations map[string]string, res *runtime.LinuxContainerResources) *runtime.ContainerConfig {
	return &runtime.ContainerConfig{
		Metadata:    &runtime.ContainerMetadata{Name: name},
		Image:       &runtime.ImageSpec{Image: "busybox"},
		Command:     []string{"/bin/sh"},
		Args:        []string{"-c", "sleep inf"},
		Labels:      map[string]string{"ctr": name},
		Annotations: annotations,
		Linux:       &runtime.LinuxContainerConfig{Resources: res},
		LogPath:     name + "/0.log",
	}
}

func (e *env) create(pod string, cfg *runtime.ContainerConfig) string {
	e.t.Helper()
	resp, err := e.rt.CreateContainer(ctx, &runtime.CreateContainerRequest{PodSandboxId: pod, Config: cfg})
	require.NoError(e.t, err)
	return resp.ContainerId
}

func (e *env) start(id string) {
	e.t.Helper()
	_, err := e.rt.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: id})
	require.NoError(e.t, err)
}

func (e *env) status(id string) *runtime.ContainerStatus {
	e.t.Helper()
	resp, err := e.rt.ContainerStatus(ctx, &runtime.ContainerStatusRequest{ContainerId: id})
	require.NoError(e.t, err)
	return resp.Status
}

func (e *env) podStatus(id string) *runtime.PodSandboxStatusResponse {
	e.t.Helper()
	resp, err := e.rt.PodSandboxStatus(ctx, &runtime.PodSandboxStatusRequest{PodSandboxId: id})
	require.NoError(e.t, err)
	return resp
}

// resourceInfo reads the pod's resource_info.json.
func (e *env) resourceInfo(pod string) map[string]any {
	e.t.Helper()
	data, err := os.ReadFile(filepath.Join(e.dir, pod, sandboxer.ResourceInfoFile))
	require.NoError(e.t, err)
	var m map[string]any
	require.NoError(e.t, json.Unmarshal(data, &m))
	return m
}

func code(err error) codes.Code { return status.Code(err) }

// eventually polls cond until it holds, for at most 5s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
