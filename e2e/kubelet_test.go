package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// kubeletPod is a static pod of TestKubelet.
type kubeletPod struct {
	name string
	// spec is the pod's spec: and annotations, its metadata.annotations.
	spec, annotations string
	// containers are the names that must run.
	containers []string
	// want is the pod cgroup kubelet must create (ResourceConfigForPod),
	// worked out by hand: it checks kubelet as much as the sandboxer.
	want podCgroupValues
	// wantEffective, when set, are the top-level values of
	// resource_info.json (an annotation overrides the pod cgroup).
	wantEffective *podCgroupValues
}

// podCgroupValues are the values a pod cgroup has (-1: none) and
// resource_info.json reports.
type podCgroupValues struct {
	shares        uint64
	quota, period int64
	memory, pids  int64
}

func (v podCgroupValues) String() string {
	f := func(n int64) string {
		if n < 0 {
			return "-"
		}
		return strconv.FormatInt(n, 10)
	}
	return fmt.Sprintf("shares %d, quota %s/%s, memory %s, pids %s", v.shares, f(v.quota), f(v.period), f(v.memory), f(v.pids))
}

const mi = 1 << 20

// image is a container of the test image (a simulated container in slot
// mode) for a pod spec.
func image(name, resources string) string { return containerSpec(name, testImage, resources, "") }

// containerSpec is a container of a pod spec; script, when set, is its
// command, run by /bin/sh -c.
func containerSpec(name, img, resources, script string) string {
	s := fmt.Sprintf("  - name: %s\n    image: %s\n    imagePullPolicy: Never\n", name, img)
	if script != "" {
		// A Go quoted string is a YAML double-quoted one (ASCII).
		s += fmt.Sprintf("    command: [/bin/sh, -c, %q]\n", script)
	}
	if resources != "" {
		s += "    resources: " + resources + "\n"
	}
	return s
}

// kubeletPods request 1.8 cores together: kubelet admits no more than the
// node's (2 on the test host) allocatable.
var kubeletPods = []kubeletPod{
	{
		name:       "guaranteed",
		spec:       "  containers:\n" + image("app", "{limits: {cpu: 200m, memory: 256Mi}}"),
		containers: []string{"app"},
		want:       podCgroupValues{shares: 204, quota: 20000, period: 100000, memory: 256 * mi, pids: -1},
	},
	{
		// linux.resources carries 0.3 cores and 128Mi, the limits that
		// are set; the pod cgroup has none: one container has no limit.
		name: "burstable",
		spec: "  containers:\n" +
			image("limited", "{requests: {cpu: 200m, memory: 64Mi}, limits: {cpu: 300m, memory: 128Mi}}") +
			image("unlimited", "{requests: {cpu: 100m, memory: 64Mi}}"),
		containers: []string{"limited", "unlimited"},
		want:       podCgroupValues{shares: 307, quota: -1, period: 100000, memory: -1, pids: -1},
	},
	{
		name:       "besteffort",
		spec:       "  containers:\n" + image("app", ""),
		containers: []string{"app"},
		want:       podCgroupValues{shares: 2, quota: -1, period: 100000, memory: -1, pids: -1},
	},
	{
		// quota 20000 + 25000, 128Mi + 64Mi, shares of 200m + 250m.
		name:       "overhead",
		spec:       "  overhead: {cpu: 250m, memory: 64Mi}\n  containers:\n" + image("app", "{limits: {cpu: 200m, memory: 128Mi}}"),
		containers: []string{"app"},
		want:       podCgroupValues{shares: 460, quota: 45000, period: 100000, memory: 192 * mi, pids: -1},
	},
	{
		// The init container (completing by default: its name says init)
		// is larger than app and sidecar together:
		// limits max(1000m + 100m, 200m + 100m), max(512Mi + 64Mi, 128Mi +
		// 64Mi); requests max(100m + 50m, 200m + 50m).
		name: "init",
		spec: "  initContainers:\n" +
			image("sidecar", "{requests: {cpu: 50m, memory: 32Mi}, limits: {cpu: 100m, memory: 64Mi}}") + "    restartPolicy: Always\n" +
			image("init", "{requests: {cpu: 100m, memory: 64Mi}, limits: {cpu: 1000m, memory: 512Mi}}") +
			"  containers:\n" + image("app", "{limits: {cpu: 200m, memory: 128Mi}}"),
		containers: []string{"sidecar", "app"},
		want:       podCgroupValues{shares: 256, quota: 110000, period: 100000, memory: 576 * mi, pids: -1},
	},
	{
		// An init container named otherwise completes through a pod
		// annotation keyed by its name.
		name:        "prepared",
		annotations: "    exit-after.resource-slot.kuasar.io/prepare: 1s\n",
		spec: "  initContainers:\n" + image("prepare", "{limits: {cpu: 100m, memory: 64Mi}}") +
			"  containers:\n" + image("app", "{limits: {cpu: 200m, memory: 128Mi}}"),
		containers: []string{"app"},
		want:       podCgroupValues{shares: 204, quota: 20000, period: 100000, memory: 128 * mi, pids: -1},
	},
	{
		name: "annotations",
		annotations: "    resources.limits.cpu: \"2\"\n    resources.requests.cpu: \"1\"\n" +
			"    resources.limits.memory: 1Gi\n    resources.limits.pid: \"500\"\n",
		spec:          "  containers:\n" + image("app", "{limits: {cpu: 100m, memory: 64Mi}}"),
		containers:    []string{"app"},
		want:          podCgroupValues{shares: 102, quota: 10000, period: 100000, memory: 64 * mi, pids: -1},
		wantEffective: &podCgroupValues{shares: 1024, quota: 200000, period: 100000, memory: 1 << 30, pids: 500},
	},
	{
		name: "several",
		spec: "  containers:\n" + image("a", "{limits: {cpu: 50m, memory: 64Mi}}") +
			image("b", "{limits: {cpu: 100m, memory: 128Mi}}") + image("c", "{limits: {cpu: 150m, memory: 256Mi}}"),
		containers: []string{"a", "b", "c"},
		want:       podCgroupValues{shares: 307, quota: 30000, period: 100000, memory: 448 * mi, pids: -1},
	},
}

func (p kubeletPod) manifest() string {
	meta := "metadata:\n  name: " + p.name + "\n  namespace: e2e\n"
	if p.annotations != "" {
		meta += "  annotations:\n" + p.annotations
	}
	// Host network: the private containerd has no CNI.
	return "apiVersion: v1\nkind: Pod\n" + meta + "spec:\n  hostNetwork: true\n" + p.spec
}

// TestKubelet runs kubelet v1.36 standalone on static pods against the
// sandboxer through containerd, and checks that resource_info.json
// reports the pod cgroup kubelet itself created, field by field; that
// removing a manifest removes the pod; and that restarting the sandboxer
// (SIGKILL, SIGTERM) and containerd leaves every pod and container as it
// was, kubelet recreating nothing.
func TestKubelet(t *testing.T) {
	start := time.Now()
	n := startKubeletNode(t, slotNode)
	t.Logf("node up in %v", time.Since(start).Round(time.Millisecond))
	for _, p := range kubeletPods {
		n.writeManifest(p.name, p.manifest())
	}
	states := map[string]kubePodState{}
	for _, p := range kubeletPods {
		states[p.name] = n.waitRunning(p.name, p.containers...)
	}
	t.Logf("%d pods running after %v", len(kubeletPods), time.Since(start).Round(time.Millisecond))

	t.Logf("| pod | kubelet sent: linux.resources | linux.overhead | pod cgroup | resource_info.json |")
	for _, p := range kubeletPods {
		t.Run(p.name, func(t *testing.T) { n.checkPodCgroup(t, p, states[p.name].sandboxes[0].Id) })
	}

	// Restarts: every pod keeps its sandbox and containers, kubelet
	// recreates nothing and restarts nothing.
	for _, r := range []struct {
		desc    string
		restart func()
	}{
		{"sandboxer SIGKILL", func() { n.restartSandboxer(syscall.SIGKILL) }},
		{"containerd", n.restartContainerd},
		// Issue 14 item 1: a graceful stop once ended the containers
		// (the task shim passed on Waits the stop cancelled).
		{"sandboxer SIGTERM", func() { n.restartSandboxer(syscall.SIGTERM) }},
	} {
		t.Run("restart "+r.desc, func(t *testing.T) { n.checkRestart(t, kubeletPods, r.restart) })
	}

	t.Run("manifest removed", func(t *testing.T) {
		n.checkManifestRemoved(t, kubeletPods[0].name, sandboxIDs(states[kubeletPods[0].name]))
		// The others are untouched.
		for _, q := range kubeletPods[1:] {
			st, err := n.pod(q.name)
			require.NoError(t, err)
			assert.True(t, st.running(q.containers...), "pod %s runs", q.name)
		}
	})
	t.Logf("kubelet end to end took %v", time.Since(start).Round(time.Second))
}

// checkRestart restarts a neighbour of the pods with restart and checks
// that every pod keeps its sandbox and containers, all running with
// restart count 0: kubelet recreates nothing and restarts nothing.
func (n *kubeletNode) checkRestart(t *testing.T, pods []kubeletPod, restart func()) {
	t.Helper()
	before := map[string]kubePodState{}
	for _, p := range pods {
		st, err := n.pod(p.name)
		require.NoError(t, err)
		require.True(t, st.running(p.containers...), "pod %s runs before the restart", p.name)
		before[p.name] = st
	}
	restart()
	// Long enough for kubelet to notice anything (PLEG relists every
	// second, pods resync every 10 s) and to act on it.
	time.Sleep(30 * time.Second)
	for _, p := range pods {
		st, err := n.pod(p.name)
		require.NoError(t, err)
		assert.True(t, st.running(p.containers...), "pod %s runs", p.name)
		assert.Equal(t, sandboxIDs(before[p.name]), sandboxIDs(st), "pod %s: same sandbox", p.name)
		assert.Equal(t, containerIDs(before[p.name]), containerIDs(st), "pod %s: same containers: %s", p.name, describeContainers(st.containers))
		for _, c := range st.containers {
			assert.Zero(t, c.GetMetadata().GetAttempt(), "pod %s container %s restarted", p.name, c.GetMetadata().GetName())
		}
	}
}

// checkManifestRemoved removes a pod's manifest and waits until kubelet
// has removed the pod; its sandbox directories must be gone with it.
func (n *kubeletNode) checkManifestRemoved(t *testing.T, name string, sandboxes []string) {
	t.Helper()
	st, err := n.pod(name)
	require.NoError(t, err)
	require.NotEmpty(t, st.sandboxes)
	n.removeManifest(name)
	deadline := time.Now().Add(n.podTimeout)
	for {
		st, err := n.pod(name)
		if err == nil && len(st.sandboxes) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod %s still there %v after its manifest was removed: %d sandboxes (%v)", name, n.podTimeout, len(st.sandboxes), err)
		}
		time.Sleep(250 * time.Millisecond)
	}
	for _, sb := range sandboxes {
		_, err := os.Stat(filepath.Join(n.stateDir(), sb))
		assert.True(t, os.IsNotExist(err), "sandbox directory %s removed: %v", sb, err)
	}
}

func sandboxIDs(s kubePodState) []string {
	var ids []string
	for _, sb := range s.sandboxes {
		ids = append(ids, sb.Id)
	}
	return ids
}

func containerIDs(s kubePodState) []string {
	var ids []string
	for _, c := range s.containers {
		ids = append(ids, c.GetMetadata().GetName()+"="+c.Id)
	}
	return ids
}

// sentConfig is the part of the PodSandboxConfig kubelet sent that
// containerd's verbose status shows.
type sentConfig struct {
	Linux struct {
		CgroupParent string         `json:"cgroup_parent"`
		Resources    map[string]any `json:"resources"`
		Overhead     map[string]any `json:"overhead"`
	} `json:"linux"`
}

// checkPodCgroup compares resource_info.json with the pod cgroup kubelet
// created for the sandbox, field by field.
func (n *kubeletNode) checkPodCgroup(t *testing.T, p kubeletPod, id string) {
	resp, err := n.cri.PodSandboxStatus(context.Background(), &runtime.PodSandboxStatusRequest{PodSandboxId: id, Verbose: true})
	require.NoError(t, err)
	var verbose struct {
		Config sentConfig `json:"config"`
	}
	require.NoError(t, json.Unmarshal([]byte(resp.Info["info"]), &verbose), "verbose status: %s", resp.Info["info"])
	sent := verbose.Config.Linux
	require.NotEmpty(t, sent.CgroupParent, "kubelet gives the sandbox its pod cgroup")

	cg := readPodCgroup(t, sent.CgroupParent)
	data, err := os.ReadFile(filepath.Join(n.stateDir(), id, "resource_info.json"))
	require.NoError(t, err)
	var info map[string]any
	require.NoError(t, json.Unmarshal(data, &info))
	podCg, _ := info["pod_cgroup"].(map[string]any)
	require.NotNil(t, podCg, "resource_info.json has the pod cgroup")
	t.Logf("| %s | %s | %s | %s | %s |", p.name, compact(sent.Resources), compact(sent.Overhead), cg, describeInfo(info))

	assert.Equal(t, p.want, cg, "the pod cgroup kubelet created")
	compareCgroup(t, "pod_cgroup", cg, podCg)
	want, top := cg, info
	if p.wantEffective != nil {
		want = *p.wantEffective
		for _, k := range []string{"cpu_limit", "cpu_request", "memory_limit", "pid_limit"} {
			assert.Equal(t, "annotation", info["sources"].(map[string]any)[k], "source of %s", k)
		}
	} else {
		for _, k := range []string{"cpu_limit", "cpu_request", "memory_limit"} {
			if info[k] != nil {
				assert.Equal(t, "linux_resources", info["sources"].(map[string]any)[k], "source of %s", k)
			}
		}
	}
	compareCgroup(t, "effective", want, top)
}

func compact(m map[string]any) string {
	if len(m) == 0 {
		return "-"
	}
	data, _ := json.Marshal(m)
	return strings.ReplaceAll(string(data), `"`, "")
}

func describeInfo(m map[string]any) string {
	f := func(k string) string {
		if m[k] == nil {
			return "null"
		}
		return fmt.Sprint(m[k])
	}
	return fmt.Sprintf("cpu_request %s, cpu_limit %s, memory_limit %s, pid_limit %s (cpu_shares %s, cpu_quota %s)",
		f("cpu_request"), f("cpu_limit"), f("memory_limit"), f("pid_limit"), f("cpu_shares"), f("cpu_quota"))
}

// readPodCgroup reads the pod cgroup of a cgroupfs parent.
func readPodCgroup(t *testing.T, parent string) podCgroupValues {
	num := func(controller, file string) int64 {
		s := readCgroup(t, controller, parent, file)
		if s == "max" {
			return -1
		}
		v, err := strconv.ParseInt(s, 10, 64)
		require.NoError(t, err, "%s/%s", controller, file)
		return v
	}
	v := podCgroupValues{
		shares: uint64(num("cpu", "cpu.shares")),
		quota:  num("cpu", "cpu.cfs_quota_us"),
		period: num("cpu", "cpu.cfs_period_us"),
		memory: num("memory", "memory.limit_in_bytes"),
		pids:   num("pids", "pids.max"),
	}
	// No limit: the largest page-aligned value (PAGE_COUNTER_MAX pages).
	if v.memory >= math.MaxInt64-1<<20 {
		v.memory = -1
	}
	return v
}

// compareCgroup checks resource_info.json values m against a pod cgroup:
// the raw fields equal, the cores and the requests derived as kubelet
// derives them (CPULimitsFromConfig, CPURequestsFromConfig: no request
// for the minimum shares).
func compareCgroup(t *testing.T, what string, cg podCgroupValues, m map[string]any) {
	t.Helper()
	num := func(k string) int64 {
		if m[k] == nil {
			return -1
		}
		return int64(m[k].(float64))
	}
	assert.Equal(t, int64(cg.shares), num("cpu_shares"), "%s cpu_shares", what)
	assert.Equal(t, cg.quota, num("cpu_quota"), "%s cpu_quota", what)
	if cg.quota > 0 {
		assert.Equal(t, cg.period, num("cpu_period"), "%s cpu_period", what)
		assert.Equal(t, float64(cg.quota*1000/cg.period)/1000, m["cpu_limit"], "%s cpu_limit", what)
	} else {
		assert.Nil(t, m["cpu_limit"], "%s cpu_limit", what)
	}
	if cg.shares <= 2 {
		assert.Nil(t, m["cpu_request"], "%s cpu_request", what)
	} else {
		assert.Equal(t, math.Ceil(float64(cg.shares)*1000/1024)/1000, m["cpu_request"], "%s cpu_request", what)
	}
	assert.Equal(t, cg.memory, num("memory_limit"), "%s memory_limit", what)
	assert.Equal(t, cg.pids, num("pid_limit"), "%s pid_limit", what)
}
