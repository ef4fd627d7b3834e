package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Direct CRI mode: crictl talks to the sandboxer's own socket (--listen),
// with no containerd in between.

// directCrictl runs crictl against the sandboxer's socket.
func (x *harness) directCrictl(args ...string) (string, error) {
	sock := "unix://" + x.SandboxerSock()
	cmd := exec.Command("crictl", append([]string{"--runtime-endpoint", sock, "--image-endpoint", sock, "--timeout", "30s"}, args...)...)
	cmd.Env = x.env()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("crictl (direct) %s: %v: %s", strings.Join(args, " "), err, stderr.String())
	}
	return strings.TrimSpace(stdout.String()), nil
}

func (x *harness) mustDirect(t *testing.T, args ...string) string {
	t.Helper()
	out, err := x.directCrictl(args...)
	require.NoError(t, err)
	return out
}

func (x *harness) directJSON(t *testing.T, args ...string) map[string]any {
	t.Helper()
	var m map[string]any
	out := x.mustDirect(t, args...)
	require.NoError(t, json.Unmarshal([]byte(out), &m), out)
	return m
}

func TestDirectCRI(t *testing.T) {
	// version, info
	out := h.mustDirect(t, "version")
	assert.Contains(t, out, "RuntimeName:  resource-slot-sandboxer")
	assert.Contains(t, out, "RuntimeApiVersion:  v1")
	info := h.directJSON(t, "info")
	conds := info["status"].(map[string]any)["conditions"].([]any)
	require.Len(t, conds, 2)
	for _, c := range conds {
		assert.Equal(t, true, c.(map[string]any)["status"], c)
	}

	// runp with the reference design's annotations
	pod := podConfig("direct", map[string]string{
		"resources.limits.cpu": "2", "resources.limits.memory": "2Gi", "resources.limits.pid": "1000",
	}, nil)
	pod.LogDirectory = t.TempDir()
	podFile := writeJSON(t, pod)
	id := h.mustDirect(t, "runp", podFile)
	require.Regexp(t, `^[0-9a-f]{64}$`, id)
	defer func() {
		h.directCrictl("stopp", id)
		h.directCrictl("rmp", id)
	}()
	m := h.resourceInfo(t, id)
	assert.Equal(t, 2.0, m["cpu_limit"])
	assert.Equal(t, float64(2<<30), m["memory_limit"])
	assert.Equal(t, 1000.0, m["pid_limit"])

	// pods, inspectp
	assert.Contains(t, h.mustDirect(t, "pods", "--id", id, "-o", "json"), "SANDBOX_READY")
	assert.Contains(t, h.mustDirect(t, "pods", "--name", "direct"), id[:13])
	inspect := h.directJSON(t, "inspectp", id)
	assert.Equal(t, "SANDBOX_READY", inspect["status"].(map[string]any)["state"])
	ri := inspect["resourceInfo"].(map[string]any)
	assert.Equal(t, 2.0, ri["cpu_limit"])
	assert.Equal(t, float64(2<<30), ri["memory_limit"])
	assert.Equal(t, 1000.0, ri["pid_limit"])
	assert.Equal(t, "slot", inspect["sandboxer"].(map[string]any)["mode"])
	assert.NotNil(t, inspect["info"].(map[string]any)["config"], "the pod config, as through containerd")
	// containerd does not know the pod.
	assert.Empty(t, h.mustCrictl(t, "pods", "--id", id, "-q"))

	// pull, images
	assert.Contains(t, h.mustDirect(t, "pull", testImage), "sha256:")
	assert.Contains(t, h.mustDirect(t, "images"), "localhost/resource-slot-test")

	// create, start, ps, inspect
	ctrCfg := containerConfig("app", map[string]string{
		"resource-slot.kuasar.io/cpu-usage": "250m", "resource-slot.kuasar.io/memory-usage": "64Mi",
	}, &runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 50000, MemoryLimitInBytes: 256 << 20})
	cid := h.mustDirect(t, "create", id, writeJSON(t, ctrCfg), podFile)
	require.Regexp(t, `^[0-9a-f]{64}$`, cid)
	h.mustDirect(t, "start", cid)
	assert.Contains(t, h.mustDirect(t, "ps", "--id", cid, "-o", "json"), "CONTAINER_RUNNING")
	assert.Contains(t, h.mustDirect(t, "ps", "--pod", id), "app")
	ci := h.directJSON(t, "inspect", cid)
	status := ci["status"].(map[string]any)
	assert.Equal(t, "CONTAINER_RUNNING", status["state"])
	assert.Equal(t, filepath.Join(pod.LogDirectory, "app.log"), status["logPath"])
	assert.Equal(t, id, ci["info"].(map[string]any)["sandboxID"])
	m = h.resourceInfo(t, id)
	assert.Equal(t, 0.5, m["containers"].(map[string]any)[cid].(map[string]any)["cpu_limit"])

	// stats: the simulated usage against the container's limit
	stats := h.mustDirect(t, "stats", "-o", "json", "--id", cid)
	assert.Contains(t, stats, `"workingSetBytes"`)
	assert.Contains(t, stats, "67108864", "64Mi used")
	assert.Contains(t, stats, "201326592", "available: 256Mi limit minus 64Mi")

	// update reaches resource_info.json
	h.mustDirect(t, "update", "--cpu-period", "100000", "--cpu-quota", "150000", "--memory", "536870912", cid)
	c := h.resourceInfo(t, id)["containers"].(map[string]any)[cid].(map[string]any)
	assert.Equal(t, 1.5, c["cpu_limit"])
	assert.Equal(t, float64(512<<20), c["memory_limit"])

	// logs: the simulated line
	assert.Contains(t, h.mustDirect(t, "logs", cid), "simulated container "+cid)

	// stop, rm
	h.mustDirect(t, "stop", "--timeout", "5", cid)
	status = h.directJSON(t, "inspect", cid)["status"].(map[string]any)
	assert.Equal(t, "CONTAINER_EXITED", status["state"])
	assert.Equal(t, 143.0, status["exitCode"], "SIGTERM ends a simulated process with 143")
	h.mustDirect(t, "rm", cid)
	assert.Empty(t, h.mustDirect(t, "ps", "-a", "--id", cid, "-q"))
	assert.Nil(t, h.resourceInfo(t, id)["containers"])

	// stopp, rmp
	h.mustDirect(t, "stopp", id)
	assert.Contains(t, h.mustDirect(t, "pods", "--id", id, "-o", "json"), "SANDBOX_NOTREADY")
	h.mustDirect(t, "rmp", id)
	_, err := os.Stat(filepath.Join(h.StateDir(), id))
	assert.True(t, os.IsNotExist(err), "rmp removes the sandbox directory")
	assert.Empty(t, h.mustDirect(t, "pods", "--id", id, "-q"))

	// rmi
	h.mustDirect(t, "rmi", testImage)
	assert.NotContains(t, h.mustDirect(t, "images"), "localhost/resource-slot-test")
}

// A pod created through containerd is the same sandbox: the direct
// endpoint lists it, and its containers with their IDs as names.
func TestDirectSeesContainerdPods(t *testing.T) {
	pod := podConfig("via-containerd", nil, nil)
	pod.LogDirectory = t.TempDir()
	// containerd's connection to the sandboxer may still be in its
	// reconnect backoff after the crash test restarted the daemon.
	var id string
	eventually(t, "containerd to reach the sandboxer", func() bool {
		var err error
		id, err = h.crictl("runp", "--runtime", "resource-slot", writeJSON(t, pod))
		return err == nil
	})
	defer h.removePod(t, id)
	cid := h.mustCrictl(t, "create", id, writeJSON(t, containerConfig("app", nil, nil)), writeJSON(t, pod))
	h.mustCrictl(t, "start", cid)

	assert.Contains(t, h.mustDirect(t, "pods", "--id", id, "-o", "json"), "SANDBOX_READY")
	ps := h.mustDirect(t, "ps", "--pod", id, "-o", "json")
	assert.Contains(t, ps, cid)
	assert.Contains(t, ps, "CONTAINER_RUNNING")
	inspect := h.directJSON(t, "inspectp", id)
	assert.Equal(t, "via-containerd", inspect["status"].(map[string]any)["metadata"].(map[string]any)["name"])
}

func TestDirectRunpErrors(t *testing.T) {
	before, _ := os.ReadDir(h.StateDir())
	_, err := h.directCrictl("runp", writeJSON(t, podConfig("direct-invalid", map[string]string{"resources.limits.memory": "2Gigs"}, nil)))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "InvalidArgument")
	assert.Contains(t, err.Error(), "2Gigs")
	_, err = h.directCrictl("runp", "--runtime", "runc", writeJSON(t, podConfig("direct-runc", nil, nil)))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "NotFound")
	after, _ := os.ReadDir(h.StateDir())
	assert.Equal(t, len(before), len(after), "nothing is left on disk")
}

// directClient connects the CRI Go client to the sandboxer's socket; its
// responses may be large (ListPodSandbox of 10,000 pods).
func directClient(tb testing.TB) (runtime.RuntimeServiceClient, func()) {
	tb.Helper()
	conn, err := grpc.NewClient("unix://"+h.SandboxerSock(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(512<<20)))
	if err != nil {
		tb.Fatal(err)
	}
	return runtime.NewRuntimeServiceClient(conn), func() { conn.Close() }
}

// podCycle runs, stops and removes one pod.
func podCycle(ctx context.Context, c runtime.RuntimeServiceClient, handler string) error {
	resp, err := c.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: podConfig(uniq("cycle"), demoAnnotations, nil), RuntimeHandler: handler})
	if err != nil {
		return err
	}
	if _, err := c.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: resp.PodSandboxId}); err != nil {
		return err
	}
	_, err = c.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: resp.PodSandboxId})
	return err
}

// inParallel calls fn(0..n-1) from workers goroutines and returns the
// first error.
func inParallel(n, workers int, fn func(i int) error) error {
	if errs := runParallel(n, workers, fn); len(errs) > 0 {
		return errs[0]
	}
	return nil
}
