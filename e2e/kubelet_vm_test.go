package e2e

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kuasar-io/resource-slot-sandboxer/vmm"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// guaranteedVM are the resources of every container of vmKubeletPod:
// requests equal to the limits, the init container included, make the
// pod Guaranteed.
const guaranteedVM = "{limits: {cpu: \"1\", memory: 256Mi}}"

// vmKubeletPod is TestKubeletVM's static pod: Guaranteed, cpu 1 and
// 256Mi; an init container that prints the guest's kernel release and
// exits 0, and an app that prints a line and runs until SIGTERM (a
// shell as a container's PID 1 ignores a signal it does not trap).
var vmKubeletPod = kubeletPod{
	name: "vm",
	spec: "  initContainers:\n" + containerSpec("init", busyboxImage, guaranteedVM, "echo init done in $(uname -r)") +
		"  containers:\n" + containerSpec("app", busyboxImage, guaranteedVM,
		"echo hello from the guest; trap 'exit 0' TERM; while :; do sleep 1; done"),
	containers: []string{"app"},
	// max(init, app) = 1 core and 256Mi (ResourceConfigForPod).
	want: podCgroupValues{shares: 1024, quota: 100000, period: 100000, memory: 256 * mi, pids: -1},
}

// TestKubeletVM runs kubelet v1.36 standalone on a static pod against the
// sandboxer in vm mode (containerd's default runtime resource-vm): the
// pod reaches Running with its init container completed in the guest;
// resource_info.json reports the pod cgroup kubelet created, field by
// field, and the VM is sized from it; the app's line is in kubelet's pod
// log and crictl exec runs in the guest's kernel; restarting the daemon
// (SIGTERM, SIGKILL) leaves the pod and its containers as they were; and
// removing the manifest removes the pod, its VM and its sandbox directory.
func TestKubeletVM(t *testing.T) {
	needVM(t)
	start := time.Now()
	n := startKubeletNode(t, vmNode)
	t.Logf("node up in %v", time.Since(start).Round(time.Millisecond))
	p := vmKubeletPod
	n.writeManifest(p.name, p.manifest())
	st := n.waitRunning(p.name, p.containers...)
	t.Logf("pod running after %v", time.Since(start).Round(time.Millisecond))
	id := st.sandboxes[0].Id
	defer func() {
		if t.Failed() { // the guest's side of the story
			data, _ := os.ReadFile(filepath.Join(n.stateDir(), id, "console.log"))
			t.Logf("guest console:\n%s", data)
		}
	}()
	app, initC := containerNamed(t, st, "app"), containerNamed(t, st, "init")

	t.Run("init completed", func(t *testing.T) {
		resp, err := n.cri.ContainerStatus(context.Background(), &runtime.ContainerStatusRequest{ContainerId: initC.Id})
		require.NoError(t, err)
		s := resp.GetStatus()
		assert.Equal(t, runtime.ContainerState_CONTAINER_EXITED, s.GetState())
		assert.Equal(t, int32(0), s.GetExitCode())
		assert.Equal(t, "Completed", s.GetReason())
	})
	t.Run("pod cgroup", func(t *testing.T) { n.checkPodCgroup(t, p, id) })
	t.Run("VM size", func(t *testing.T) { n.checkVMSize(t, id) })

	t.Run("in the guest", func(t *testing.T) {
		kver := guestKernelRelease(t)
		// kubelet's pod log: <podLogsDir>/<namespace>_<pod>_<uid>/<container>/<restarts>.log.
		logs, err := filepath.Glob(filepath.Join(n.base, "pod-logs", "e2e_"+p.name+"-"+n.hostname+"_*", "app", "0.log"))
		require.NoError(t, err)
		require.Len(t, logs, 1, "kubelet's log of app")
		var data []byte
		deadline := time.Now().Add(time.Minute)
		for !strings.Contains(string(data), "hello from the guest") && time.Now().Before(deadline) {
			time.Sleep(250 * time.Millisecond)
			data, _ = os.ReadFile(logs[0])
		}
		assert.Contains(t, string(data), "stdout F hello from the guest", "kubelet's log of app")
		out, err := n.crictl("logs", initC.Id)
		require.NoError(t, err)
		assert.Equal(t, "init done in "+kver, out, "the init container ran in the guest's kernel")
		out, err = n.crictl("logs", app.Id)
		require.NoError(t, err)
		assert.Equal(t, "hello from the guest", out)

		version, err := n.crictl("exec", app.Id, "cat", "/proc/version")
		require.NoError(t, err)
		hostRelease, err := os.ReadFile("/proc/sys/kernel/osrelease")
		require.NoError(t, err)
		assert.Contains(t, version, "Linux version "+kver+" ", "crictl exec runs in the guest's kernel")
		assert.NotContains(t, version, strings.TrimSpace(string(hostRelease)), "not the host's")
		t.Logf("crictl exec in the guest: %s", version)
		assert.NotEmpty(t, pidsWithArg("rss-stdio-keeper/"+id), "app's stdio keeper holds its FIFOs")
	})

	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		t.Run("restart sandboxer "+unix.SignalName(sig), func(t *testing.T) {
			n.checkRestart(t, []kubeletPod{p}, func() { n.restartSandboxer(sig) })
			// The restarted daemon reaches the guest again.
			out, err := n.crictl("exec", app.Id, "echo", "back")
			require.NoError(t, err)
			assert.Equal(t, "back", out)
		})
	}

	t.Run("manifest removed", func(t *testing.T) {
		domains, err := ownedDomains(n.stateDir())
		require.NoError(t, err)
		require.Len(t, domains, 1, "the pod's VM")
		n.checkManifestRemoved(t, p.name, []string{id})
		domains, err = ownedDomains(n.stateDir())
		require.NoError(t, err)
		assert.Empty(t, domains, "the pod's VM is gone: neither running nor defined")
		// The stdio keepers of its containers went with them.
		eventually(t, "the pod's stdio keepers to exit", func() bool { return len(pidsWithArg("rss-stdio-keeper/"+id)) == 0 })
	})
	t.Logf("kubelet end to end in vm mode took %v", time.Since(start).Round(time.Second))
}

// containerNamed is the pod's container called name.
func containerNamed(t *testing.T, st kubePodState, name string) *runtime.Container {
	t.Helper()
	for _, c := range st.containers {
		if c.GetMetadata().GetName() == name {
			return c
		}
	}
	t.Fatalf("no container %s: %s", name, describeContainers(st.containers))
	return nil
}

// guestKernelRelease is the release of the guest's kernel (kver in the
// guest.version of scripts/build-guest.sh).
func guestKernelRelease(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(os.Getenv("RSS_GUEST_DIR"), "guest.version"))
	require.NoError(t, err)
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "kver="); ok && v != "" {
			return v
		}
	}
	t.Fatalf("no kver in guest.version:\n%s", data)
	return ""
}

// checkVMSize checks the running domain of sandbox id against
// resource_info.json by the sizing rules of vmm.DomainFor with the [vm]
// defaults: vCPUs = ceil(cpu_limit); memory = memory_limit + 64Mi
// (guest_overhead), no balloon headroom (max_memory 0); <cputune> shares
// = cpu_shares, global period/quota = cpu_period and cpu_limit of it;
// memtune hard_limit = memory + QEMU's own: 256Mi (qemu_overhead) and
// under TCG 128Mi (the translation cache) and the boot images (kernel and
// initramfs, rounded up to a MiB).
func (n *kubeletNode) checkVMSize(t *testing.T, id string) {
	data, err := os.ReadFile(filepath.Join(n.stateDir(), id, "resource_info.json"))
	require.NoError(t, err)
	var info struct {
		CPULimit    float64 `json:"cpu_limit"`
		CPUShares   uint64  `json:"cpu_shares"`
		CPUPeriod   uint64  `json:"cpu_period"`
		MemoryLimit uint64  `json:"memory_limit"`
	}
	require.NoError(t, json.Unmarshal(data, &info))
	// The pod's figures, worked out by hand: cpu 1, 256Mi.
	require.Equal(t, 1.0, info.CPULimit)
	require.Equal(t, uint64(256*mi), info.MemoryLimit)

	domains, err := ownedDomains(n.stateDir())
	require.NoError(t, err)
	require.Len(t, domains, 1, "one VM for the pod")
	x, err := exec.Command("virsh", "-c", "qemu:///system", "dumpxml", domains[0]).Output()
	require.NoError(t, err)
	var d vmm.Domain
	require.NoError(t, xml.Unmarshal(x, &d))
	require.NotNil(t, d.Metadata)
	assert.Equal(t, id, d.Metadata.Sandbox.ID, "the domain is the pod's")

	const kib = 1024
	vcpus := uint(math.Ceil(info.CPULimit))
	memKiB := (info.MemoryLimit + 64*mi + mi - 1) / mi * mi / kib
	assert.Equal(t, uint(1), vcpus)
	assert.Equal(t, uint64(320*1024), memKiB)
	assert.Equal(t, vcpus, d.VCPU.Value, "<vcpu>")
	assert.Contains(t, []uint{0, vcpus}, d.VCPU.Current, "<vcpu current>")
	assert.Equal(t, memKiB, kibOf(t, d.Memory), "<memory>")
	require.NotNil(t, d.CurrentMemory)
	assert.Equal(t, memKiB, kibOf(t, *d.CurrentMemory), "<currentMemory>")
	require.NotNil(t, d.CPUTune, "<cputune>")
	require.NotNil(t, d.CPUTune.Shares)
	assert.Equal(t, info.CPUShares, *d.CPUTune.Shares, "<shares>")
	require.NotNil(t, d.CPUTune.GlobalPeriod)
	require.NotNil(t, d.CPUTune.GlobalQuota)
	assert.Equal(t, info.CPUPeriod, *d.CPUTune.GlobalPeriod, "<global_period>")
	assert.Equal(t, int64(info.CPULimit*float64(info.CPUPeriod)), *d.CPUTune.GlobalQuota, "<global_quota>")

	var boot int64
	guest := os.Getenv("RSS_GUEST_DIR")
	for _, f := range [][]string{{"vmlinux", "vmlinuz"}, {"initramfs.img", "initramfs.cpio.gz"}} {
		fi, err := os.Stat(filepath.Join(guest, f[0]))
		if err != nil {
			fi, err = os.Stat(filepath.Join(guest, f[1]))
		}
		require.NoError(t, err)
		boot += fi.Size()
	}
	boot = (boot + mi - 1) / mi * mi
	hard := memKiB + uint64(256*mi+128*mi+boot)/kib
	require.NotNil(t, d.MemTune, "<memtune>")
	require.NotNil(t, d.MemTune.HardLimit)
	assert.Equal(t, hard, kibOf(t, *d.MemTune.HardLimit), "<memtune><hard_limit>")
	t.Logf("domain %s: %d vCPU, %d MiB, shares %d, quota %d/%d, QEMU hard limit %d MiB (boot images %d MiB)",
		domains[0], d.VCPU.Value, kibOf(t, d.Memory)/1024, *d.CPUTune.Shares, *d.CPUTune.GlobalQuota, *d.CPUTune.GlobalPeriod,
		kibOf(t, *d.MemTune.HardLimit)/1024, boot/mi)
}

// kibOf is a libvirt size in KiB (libvirt reports KiB unless told
// otherwise).
func kibOf(t *testing.T, m vmm.Memory) uint64 {
	t.Helper()
	switch m.Unit {
	case "", "KiB", "k", "K":
		return m.Value
	case "MiB", "M":
		return m.Value * 1024
	}
	t.Fatalf("unexpected unit %q", m.Unit)
	return 0
}
