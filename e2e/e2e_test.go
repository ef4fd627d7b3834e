package e2e

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

const testImage = "localhost/resource-slot-test:latest"

var demoAnnotations = map[string]string{
	"resources.limits.cpu":      "2",
	"resources.limits.memory":   "2Gi",
	"resources.limits.pid":      "1000",
	"resources.requests.cpu":    "500m",
	"resources.requests.memory": "1Gi",
}

func TestRunPodResources(t *testing.T) {
	cfg := podConfig("resources", demoAnnotations, &runtime.LinuxContainerResources{
		CpuPeriod: 100000, CpuQuota: 300000, CpuShares: 2048, MemoryLimitInBytes: 4 << 30, CpusetCpus: "0-1",
	})
	cfg.Linux.Overhead = &runtime.LinuxContainerResources{MemoryLimitInBytes: 64 << 20, CpuPeriod: 100000, CpuQuota: 10000}
	id := h.runp(t, cfg)
	defer h.removePod(t, id)

	m := h.resourceInfo(t, id)
	// Annotations win over linux.resources (see the README's table).
	assert.Equal(t, 2.0, m["cpu_limit"])
	assert.Equal(t, 2147483648.0, m["memory_limit"])
	assert.Equal(t, 1000.0, m["pid_limit"])
	assert.Equal(t, 0.5, m["cpu_request"])
	assert.Equal(t, 1073741824.0, m["memory_request"])
	assert.Equal(t, "0-1", m["cpuset_cpus"], "pod cgroup settings come from linux.resources")
	assert.Equal(t, 0.1, m["overhead"].(map[string]any)["cpu_limit"])
	assert.Nil(t, m["storage_limit"], "unset values are null")

	out := h.mustCrictl(t, "pods", "--id", id, "-o", "json")
	assert.Contains(t, out, "SANDBOX_READY")
	var inspect map[string]any
	require.NoError(t, json.Unmarshal([]byte(h.mustCrictl(t, "inspectp", id)), &inspect))
	assert.Equal(t, "SANDBOX_READY", inspect["status"].(map[string]any)["state"])
	ri := inspect["resourceInfo"].(map[string]any)
	assert.Equal(t, 2.0, ri["cpu_limit"])
	assert.Equal(t, 2147483648.0, ri["memory_limit"])
	assert.Equal(t, "slot", inspect["sandboxer"].(map[string]any)["mode"])

	h.mustCrictl(t, "stopp", id)
	assert.Equal(t, "SANDBOX_NOTREADY", h.podState(t, id))
	h.mustCrictl(t, "rmp", id)
	_, err := os.Stat(filepath.Join(h.StateDir(), id))
	assert.True(t, os.IsNotExist(err), "rmp removes the sandbox directory")
}

func TestRunPodInvalidAnnotation(t *testing.T) {
	before, _ := os.ReadDir(h.StateDir())
	_, err := h.crictl("runp", "--runtime", "resource-slot", writeJSON(t, podConfig("invalid", map[string]string{"resources.limits.memory": "2Gigs"}, nil)))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "resources.limits.memory")
	assert.Contains(t, err.Error(), "2Gigs")
	assert.Contains(t, err.Error(), "InvalidArgument")
	after, _ := os.ReadDir(h.StateDir())
	assert.Equal(t, len(before), len(after), "nothing of the failed pod is left on disk")
	out := h.mustCrictl(t, "pods", "--name", "invalid", "-q")
	assert.Empty(t, out, "containerd keeps no pod")
}

func TestPodSurvivesRestarts(t *testing.T) {
	id := h.runp(t, podConfig("restarts", demoAnnotations, nil))
	defer h.removePod(t, id)
	require.Equal(t, "SANDBOX_READY", h.podState(t, id))

	h.restartContainerd(t)
	assert.Equal(t, "SANDBOX_READY", h.podState(t, id), "after a containerd restart")

	h.restartSandboxer(t, syscall.SIGTERM)
	assert.Equal(t, "SANDBOX_READY", h.podState(t, id), "after a sandboxer restart")

	h.restartSandboxer(t, syscall.SIGKILL)
	assert.Equal(t, "SANDBOX_READY", h.podState(t, id), "after the sandboxer was killed")
	var inspect map[string]any
	require.NoError(t, json.Unmarshal([]byte(h.mustCrictl(t, "inspectp", id)), &inspect))
	assert.Equal(t, "SANDBOX_READY", inspect["status"].(map[string]any)["state"])
	assert.Equal(t, 1000.0, h.resourceInfo(t, id)["pid_limit"])

	// The restarted pair can still stop and remove it.
	h.mustCrictl(t, "stopp", id)
	h.mustCrictl(t, "rmp", id)
	_, err := os.Stat(filepath.Join(h.StateDir(), id))
	assert.True(t, os.IsNotExist(err))
}

func TestPodResize(t *testing.T) {
	id := h.runp(t, podConfig("resize", nil, &runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 100000, MemoryLimitInBytes: 1 << 30}))
	defer h.removePod(t, id)
	assert.Equal(t, 1.0, h.resourceInfo(t, id)["cpu_limit"])
	_, err := h.cri.UpdatePodSandboxResources(context.Background(), &runtime.UpdatePodSandboxResourcesRequest{
		PodSandboxId: id,
		Resources:    &runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 250000, MemoryLimitInBytes: 3 << 30},
	})
	require.NoError(t, err)
	m := h.resourceInfo(t, id)
	assert.Equal(t, 2.5, m["cpu_limit"], "in-place pod resize reaches resource_info.json")
	assert.Equal(t, float64(3<<30), m["memory_limit"])
}

func containerConfig(name string, annotations map[string]string, res *runtime.LinuxContainerResources) *runtime.ContainerConfig {
	return &runtime.ContainerConfig{
		Metadata:    &runtime.ContainerMetadata{Name: name},
		Image:       &runtime.ImageSpec{Image: testImage},
		Command:     []string{"/bin/testimage"},
		Annotations: annotations,
		Linux:       &runtime.LinuxContainerConfig{Resources: res},
		LogPath:     name + ".log",
	}
}

func TestContainers(t *testing.T) {
	pod := podConfig("containers", nil, nil)
	pod.LogDirectory = t.TempDir()
	podFile := writeJSON(t, pod)
	id := h.runp(t, pod)
	defer h.removePod(t, id)

	ctrFile := writeJSON(t, containerConfig("app", nil, &runtime.LinuxContainerResources{
		CpuPeriod: 100000, CpuQuota: 50000, CpuShares: 256, MemoryLimitInBytes: 256 << 20,
	}))
	cid := h.mustCrictl(t, "create", id, ctrFile, podFile)
	h.mustCrictl(t, "start", cid)
	assert.Contains(t, h.mustCrictl(t, "ps", "--id", cid, "-o", "json"), "CONTAINER_RUNNING")

	m := h.resourceInfo(t, id)
	assert.Equal(t, 0.5, m["cpu_limit"], "the pod total is the sum of its containers")
	assert.Equal(t, float64(256<<20), m["memory_limit"])
	assert.Equal(t, 0.25, m["cpu_request"])
	assert.Contains(t, m["containers"], cid)

	var inspect map[string]any
	require.NoError(t, json.Unmarshal([]byte(h.mustCrictl(t, "inspect", cid)), &inspect))
	assert.Equal(t, "CONTAINER_RUNNING", inspect["status"].(map[string]any)["state"])
	stats := h.mustCrictl(t, "stats", "-o", "json", "--id", cid)
	assert.Contains(t, stats, `"availableBytes"`)
	assert.Contains(t, stats, "268435456", "stats report the memory limit")
	logs := h.mustCrictl(t, "logs", cid)
	assert.Contains(t, logs, "simulated container "+cid)

	h.mustCrictl(t, "update", "--cpu-period", "100000", "--cpu-quota", "150000", "--memory", "536870912", cid)
	m = h.resourceInfo(t, id)
	assert.Equal(t, 1.5, m["cpu_limit"], "crictl update reaches resource_info.json")
	assert.Equal(t, float64(512<<20), m["memory_limit"])

	// A container that exits by itself with status 3. While it runs, the
	// pod is unlimited: one of its containers is.
	jobFile := writeJSON(t, containerConfig("job", map[string]string{
		"resource-slot.kuasar.io/exit-after": "2s", "resource-slot.kuasar.io/exit-code": "3",
	}, nil))
	job := h.mustCrictl(t, "create", id, jobFile, podFile)
	h.mustCrictl(t, "start", job)
	assert.Nil(t, h.resourceInfo(t, id)["cpu_limit"], "a container without limits makes the pod unlimited")
	eventually(t, "the job to exit", func() bool {
		out, _ := h.crictl("inspect", job)
		return strings.Contains(out, "CONTAINER_EXITED")
	})
	require.NoError(t, json.Unmarshal([]byte(h.mustCrictl(t, "inspect", job)), &inspect))
	assert.Equal(t, 3.0, inspect["status"].(map[string]any)["exitCode"])
	// containerd deletes the task of an exited container: it no longer
	// counts in the pod's totals.
	eventually(t, "the totals to drop the exited job", func() bool {
		return h.resourceInfo(t, id)["cpu_limit"] == 1.5
	})
	h.mustCrictl(t, "rm", job)

	// The same after a sandboxer restart.
	h.restartSandboxer(t, syscall.SIGKILL)
	assert.Contains(t, h.mustCrictl(t, "ps", "--id", cid, "-o", "json"), "CONTAINER_RUNNING")
	h.mustCrictl(t, "stop", "--timeout", "5", cid)
	require.NoError(t, json.Unmarshal([]byte(h.mustCrictl(t, "inspect", cid)), &inspect))
	assert.Equal(t, "CONTAINER_EXITED", inspect["status"].(map[string]any)["state"])
	assert.Equal(t, 143.0, inspect["status"].(map[string]any)["exitCode"], "SIGTERM ends a simulated process with 143")
	h.mustCrictl(t, "rm", cid)
	m = h.resourceInfo(t, id)
	assert.Nil(t, m["cpu_limit"], "totals drop back when the containers go")
	assert.Nil(t, m["containers"])
}
