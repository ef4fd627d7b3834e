package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func virsh(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("virsh", append([]string{"-c", "qemu:///system"}, args...)...).CombinedOutput()
	require.NoError(t, err, "virsh %s: %s", strings.Join(args, " "), out)
	return string(out)
}

// TestVMPod runs a pod with the runtime handler resource-vm through
// containerd: the sandboxer in vm mode boots a VM sized from the pod's
// limits, keeps it across a SIGKILL of the daemon, reports it NotReady
// when the VM is destroyed behind its back, and removes it on rmp.
func TestVMPod(t *testing.T) {
	if h.vm == nil {
		if os.Getenv("RSS_VM_TESTS") != "" {
			t.Fatal("RSS_VM_TESTS is set but the vm daemon did not start: RSS_GUEST_DIR is not set")
		}
		t.Skip("set RSS_VM_TESTS=1 and RSS_GUEST_DIR (make test does) to run the vm mode end to end")
	}
	id := h.mustCrictl(t, "runp", "--runtime", "resource-vm", writeJSON(t, podConfig("vm", map[string]string{
		"resources.limits.cpu":    "1500m",
		"resources.limits.memory": "256Mi",
		"resources.limits.pid":    "100",
	}, nil)))
	defer h.removePod(t, id)

	data, err := os.ReadFile(filepath.Join(h.VMStateDir(), id, "resource_info.json"))
	require.NoError(t, err)
	var info map[string]any
	require.NoError(t, json.Unmarshal(data, &info))
	assert.Equal(t, 1.5, info["cpu_limit"])
	assert.Equal(t, float64(256<<20), info["memory_limit"])

	// The VM carries the pod's limits.
	names := virsh(t, "list", "--name")
	var name string
	for _, n := range strings.Fields(names) {
		if strings.Contains(n, id[:12]) {
			name = n
		}
	}
	require.NotEmpty(t, name, "a running domain for the pod among:\n%s", names)
	xml := virsh(t, "dumpxml", name)
	assert.Contains(t, xml, "<vcpu placement='static'>2</vcpu>")
	assert.Contains(t, xml, "<global_quota>150000</global_quota>")
	assert.Contains(t, xml, "rss.pids=100")
	assert.Contains(t, virsh(t, "memtune", name), "hard_limit")

	var inspect map[string]any
	require.NoError(t, json.Unmarshal([]byte(h.mustCrictl(t, "inspectp", id)), &inspect))
	assert.Equal(t, "SANDBOX_READY", inspect["status"].(map[string]any)["state"])
	assert.Equal(t, "vm", inspect["sandboxer"].(map[string]any)["mode"])

	// kill -9 of the daemon: the VM runs on, the pod stays ready.
	require.NoError(t, stopDaemon(h.vm, syscall.SIGKILL))
	require.NoError(t, h.startVM())
	assert.Contains(t, virsh(t, "domstate", name), "running")
	eventually(t, "the pod to be ready through containerd", func() bool {
		out, err := h.crictl("inspectp", id)
		return err == nil && strings.Contains(out, `"state": "SANDBOX_READY"`)
	})

	// A VM destroyed behind the sandboxer's back ends the sandbox.
	virsh(t, "destroy", name)
	eventually(t, "containerd to see the pod NotReady", func() bool {
		return h.podState(t, id) == "SANDBOX_NOTREADY"
	})

	h.mustCrictl(t, "stopp", id)
	h.mustCrictl(t, "rmp", id)
	_, err = os.Stat(filepath.Join(h.VMStateDir(), id))
	assert.True(t, os.IsNotExist(err), "rmp removes the sandbox directory")
	assert.NotContains(t, virsh(t, "list", "--all", "--name"), name, "rmp undefines the domain")
}
