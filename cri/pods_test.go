package cri

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/containerd/typeurl/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
)

var demoAnnotations = map[string]string{
	"resources.limits.cpu":    "2",
	"resources.limits.memory": "2Gi",
	"resources.limits.pid":    "1000",
}

func TestVersionStatusRuntimeConfig(t *testing.T) {
	e := newEnv(t)
	v, err := e.rt.Version(ctx, &runtime.VersionRequest{})
	require.NoError(t, err)
	assert.Equal(t, "resource-slot-sandboxer", v.RuntimeName)
	assert.Equal(t, "v1", v.RuntimeApiVersion)
	assert.NotEmpty(t, v.RuntimeVersion)

	st, err := e.rt.Status(ctx, &runtime.StatusRequest{Verbose: true})
	require.NoError(t, err)
	conds := map[string]bool{}
	for _, c := range st.Status.Conditions {
		conds[c.Type] = c.Status
	}
	assert.Equal(t, map[string]bool{runtime.RuntimeReady: true, runtime.NetworkReady: true}, conds)
	require.Contains(t, st.Info, "config")
	assert.Contains(t, st.Info["config"], "host network")
	names := []string{}
	for _, h := range st.RuntimeHandlers {
		names = append(names, h.Name)
	}
	assert.Equal(t, []string{"", "resource-slot"}, names)

	rc, err := e.rt.RuntimeConfig(ctx, &runtime.RuntimeConfigRequest{})
	require.NoError(t, err)
	assert.Equal(t, runtime.CgroupDriver_CGROUPFS, rc.Linux.CgroupDriver)
	_, err = e.rt.UpdateRuntimeConfig(ctx, &runtime.UpdateRuntimeConfigRequest{RuntimeConfig: &runtime.RuntimeConfig{NetworkConfig: &runtime.NetworkConfig{PodCidr: "10.0.0.0/24"}}})
	assert.NoError(t, err)
}

func TestRunPodSandbox(t *testing.T) {
	e := newEnv(t)
	taken := e.runp(podConfig("taken", nil))
	for _, tc := range []struct {
		name    string
		handler string
		cfg     *runtime.PodSandboxConfig
		code    codes.Code
		msg     string
	}{
		{name: "default handler", cfg: podConfig("a", demoAnnotations)},
		{name: "resource-slot handler", handler: "resource-slot", cfg: podConfig("b", nil)},
		{name: "other handler", handler: "runc", cfg: podConfig("c", nil), code: codes.NotFound, msg: `runtime handler "runc"`},
		{name: "no config", code: codes.InvalidArgument, msg: "metadata"},
		{name: "no metadata", cfg: &runtime.PodSandboxConfig{}, code: codes.InvalidArgument, msg: "metadata"},
		{name: "no name", cfg: &runtime.PodSandboxConfig{Metadata: &runtime.PodSandboxMetadata{Uid: "x"}}, code: codes.InvalidArgument, msg: "name"},
		{name: "bad annotation", cfg: podConfig("d", map[string]string{"resources.limits.memory": "2Gigs"}), code: codes.InvalidArgument, msg: `resources.limits.memory="2Gigs"`},
		{name: "bad linux resources", cfg: func() *runtime.PodSandboxConfig {
			c := podConfig("e", nil)
			c.Linux.Resources = &runtime.LinuxContainerResources{CpuQuota: 50000}
			return c
		}(), code: codes.InvalidArgument, msg: "cpu_quota"},
		{name: "name taken", cfg: podConfig("taken", nil), code: codes.AlreadyExists, msg: taken},
		{name: "name taken, next attempt", cfg: func() *runtime.PodSandboxConfig {
			c := podConfig("taken", nil)
			c.Metadata.Attempt = 1
			return c
		}()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, err := os.ReadDir(e.dir)
			require.NoError(t, err)
			resp, err := e.rt.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: tc.cfg, RuntimeHandler: tc.handler})
			if tc.code != codes.OK {
				require.Error(t, err)
				assert.Equal(t, tc.code, code(err), err.Error())
				assert.Contains(t, err.Error(), tc.msg)
				after, err := os.ReadDir(e.dir)
				require.NoError(t, err)
				assert.Equal(t, len(before), len(after), "nothing is left on disk")
				return
			}
			require.NoError(t, err)
			assert.Regexp(t, regexp.MustCompile(`^[0-9a-f]{64}$`), resp.PodSandboxId)
			assert.Equal(t, runtime.PodSandboxState_SANDBOX_READY, e.podStatus(resp.PodSandboxId).Status.State)
		})
	}
}

func TestPodResources(t *testing.T) {
	e := newEnv(t)
	id := e.runp(podConfig("res", demoAnnotations))
	m := e.resourceInfo(id)
	assert.Equal(t, 2.0, m["cpu_limit"])
	assert.Equal(t, float64(2<<30), m["memory_limit"])
	assert.Equal(t, 1000.0, m["pid_limit"])
	assert.Equal(t, "annotation", m["sources"].(map[string]any)["cpu_limit"])

	// Verbose status has the keys containerd's path shows.
	resp, err := e.rt.PodSandboxStatus(ctx, &runtime.PodSandboxStatusRequest{PodSandboxId: id, Verbose: true})
	require.NoError(t, err)
	for _, k := range []string{"info", "resourceInfo", "sandboxer"} {
		assert.Contains(t, resp.Info, k)
	}
	var ri map[string]any
	require.NoError(t, json.Unmarshal([]byte(resp.Info["resourceInfo"]), &ri))
	assert.Equal(t, 2.0, ri["cpu_limit"])
	var sb map[string]any
	require.NoError(t, json.Unmarshal([]byte(resp.Info["sandboxer"]), &sb))
	assert.Equal(t, "slot", sb["mode"])
	assert.Equal(t, filepath.Join(e.dir, id), sb["dir"])

	// In-place resize through the controller's updated-resources path.
	_, err = e.rt.UpdatePodSandboxResources(ctx, &runtime.UpdatePodSandboxResourcesRequest{
		PodSandboxId: id,
		Resources:    &runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 350000, MemoryLimitInBytes: 3 << 30},
		Overhead:     &runtime.LinuxContainerResources{MemoryLimitInBytes: 64 << 20},
	})
	require.NoError(t, err)
	m = e.resourceInfo(id)
	assert.Equal(t, 2.0, m["cpu_limit"], "the annotation still wins")
	assert.Equal(t, float64(64<<20), m["overhead"].(map[string]any)["memory_limit"], "overhead replaced")
	v, err := e.ctrl.Get(id)
	require.NoError(t, err)
	require.NotNil(t, v.State.Spec.Linux.CPULimit)
	assert.Equal(t, 3.5, *v.State.Spec.Linux.CPULimit, "linux.resources replaced")

	_, err = e.rt.UpdatePodSandboxResources(ctx, &runtime.UpdatePodSandboxResourcesRequest{
		PodSandboxId: id, Resources: &runtime.LinuxContainerResources{CpuQuota: 1000},
	})
	assert.Equal(t, codes.InvalidArgument, code(err), "quota without period")
	_, err = e.rt.UpdatePodSandboxResources(ctx, &runtime.UpdatePodSandboxResourcesRequest{PodSandboxId: "nope"})
	assert.Equal(t, codes.NotFound, code(err))
}

func TestPodResizeWithoutAnnotations(t *testing.T) {
	e := newEnv(t)
	cfg := podConfig("resize", nil)
	cfg.Linux.Resources = &runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 100000, MemoryLimitInBytes: 1 << 30}
	id := e.runp(cfg)
	assert.Equal(t, 1.0, e.resourceInfo(id)["cpu_limit"])
	_, err := e.rt.UpdatePodSandboxResources(ctx, &runtime.UpdatePodSandboxResourcesRequest{
		PodSandboxId: id, Resources: &runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 250000, MemoryLimitInBytes: 3 << 30},
	})
	require.NoError(t, err)
	m := e.resourceInfo(id)
	assert.Equal(t, 2.5, m["cpu_limit"])
	assert.Equal(t, float64(3<<30), m["memory_limit"])
}

func TestPodStatusAndLifecycle(t *testing.T) {
	e := newEnv(t)
	cfg := podConfig("life", map[string]string{"note": "x"})
	cfg.Metadata.Attempt = 2
	before := time.Now()
	id := e.runp(cfg)

	st := e.podStatus(id).Status
	assert.Equal(t, id, st.Id)
	assert.Equal(t, "life", st.Metadata.Name)
	assert.Equal(t, "test", st.Metadata.Namespace)
	assert.Equal(t, "life-uid", st.Metadata.Uid)
	assert.Equal(t, uint32(2), st.Metadata.Attempt)
	assert.Equal(t, map[string]string{"app": "life"}, st.Labels)
	assert.Equal(t, map[string]string{"note": "x"}, st.Annotations)
	assert.Equal(t, "resource-slot", st.RuntimeHandler)
	assert.Empty(t, st.Network.Ip, "host network: no pod IP")
	assert.Equal(t, runtime.NamespaceMode_NODE, st.Linux.Namespaces.Options.Network)
	assert.GreaterOrEqual(t, st.CreatedAt, before.UnixNano())

	// A unique prefix finds the pod, as in containerd.
	assert.Equal(t, id, e.podStatus(id[:12]).Status.Id)

	for i := 0; i < 2; i++ {
		_, err := e.rt.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: id})
		require.NoError(t, err, "stop is idempotent")
	}
	assert.Equal(t, runtime.PodSandboxState_SANDBOX_NOTREADY, e.podStatus(id).Status.State)
	_, err := e.rt.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: "0123456789abcdef"})
	assert.NoError(t, err, "stop of an unknown pod succeeds: CRI and critest's idempotence spec")

	for i := 0; i < 2; i++ {
		_, err = e.rt.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: id})
		require.NoError(t, err, "remove is idempotent")
	}
	_, err = os.Stat(filepath.Join(e.dir, id))
	assert.True(t, os.IsNotExist(err), "the directory is gone")
	_, err = e.rt.PodSandboxStatus(ctx, &runtime.PodSandboxStatusRequest{PodSandboxId: id})
	assert.Equal(t, codes.NotFound, code(err))

	// The name is free again.
	e.runp(cfg)
}

func TestRemoveRunningPod(t *testing.T) {
	e := newEnv(t)
	id := e.runp(podConfig("rm", nil))
	c := e.create(id, containerConfig("c", nil, nil))
	e.start(c)
	_, err := e.rt.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: id})
	require.NoError(t, err, "a ready pod is stopped and removed")
	_, err = e.rt.ContainerStatus(ctx, &runtime.ContainerStatusRequest{ContainerId: c})
	assert.Equal(t, codes.NotFound, code(err), "its containers are gone")
	_, err = e.rt.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: c})
	assert.NoError(t, err)
}

func TestListPodSandbox(t *testing.T) {
	e := newEnv(t)
	a := e.runp(podConfig("a", nil))
	b := e.runp(podConfig("b", nil))
	c := e.runp(podConfig("c", nil))
	_, err := e.rt.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: c})
	require.NoError(t, err)
	ready := runtime.PodSandboxState_SANDBOX_READY
	notReady := runtime.PodSandboxState_SANDBOX_NOTREADY
	for _, tc := range []struct {
		name   string
		filter *runtime.PodSandboxFilter
		want   []string
	}{
		{"all", nil, []string{a, b, c}},
		{"id", &runtime.PodSandboxFilter{Id: b}, []string{b}},
		{"id prefix", &runtime.PodSandboxFilter{Id: b[:10]}, []string{b}},
		{"unknown id", &runtime.PodSandboxFilter{Id: "zz"}, nil},
		{"ready", &runtime.PodSandboxFilter{State: &runtime.PodSandboxStateValue{State: ready}}, []string{a, b}},
		{"not ready", &runtime.PodSandboxFilter{State: &runtime.PodSandboxStateValue{State: notReady}}, []string{c}},
		{"label", &runtime.PodSandboxFilter{LabelSelector: map[string]string{"app": "a"}}, []string{a}},
		{"label and state", &runtime.PodSandboxFilter{LabelSelector: map[string]string{"app": "c"}, State: &runtime.PodSandboxStateValue{State: ready}}, nil},
		{"unknown label", &runtime.PodSandboxFilter{LabelSelector: map[string]string{"x": "y"}}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := e.rt.ListPodSandbox(ctx, &runtime.ListPodSandboxRequest{Filter: tc.filter})
			require.NoError(t, err)
			var got []string
			for _, p := range resp.Items {
				got = append(got, p.Id)
				assert.NotNil(t, p.Metadata)
				assert.Equal(t, "resource-slot", p.RuntimeHandler)
			}
			assert.ElementsMatch(t, tc.want, got)

			stream, err := e.rt.StreamPodSandboxes(ctx, &runtime.StreamPodSandboxesRequest{Filter: tc.filter})
			require.NoError(t, err)
			var streamed []string
			for {
				msg, err := stream.Recv()
				if err != nil {
					break
				}
				for _, p := range msg.PodSandboxes {
					streamed = append(streamed, p.Id)
				}
			}
			assert.ElementsMatch(t, tc.want, streamed, "StreamPodSandboxes lists the same")
		})
	}
}

func TestPodsSurviveRestart(t *testing.T) {
	e := newEnv(t)
	id := e.runp(podConfig("persist", demoAnnotations))
	c := e.create(id, containerConfig("app", nil, &runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 50000}))
	e.start(c)

	e = e.restart()
	st := e.podStatus(id).Status
	assert.Equal(t, runtime.PodSandboxState_SANDBOX_READY, st.State)
	assert.Equal(t, "persist", st.Metadata.Name)
	cs := e.status(c)
	assert.Equal(t, runtime.ContainerState_CONTAINER_RUNNING, cs.State)
	assert.Equal(t, "app", cs.Metadata.Name)
	assert.Equal(t, int64(50000), cs.Resources.Linux.CpuQuota)

	_, err := e.rt.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: podConfig("persist", nil)})
	assert.Equal(t, codes.AlreadyExists, code(err), "the name index is rebuilt from the recovered pods")
	_, err = e.rt.CreateContainer(ctx, &runtime.CreateContainerRequest{PodSandboxId: id, Config: containerConfig("app", nil, nil)})
	assert.Equal(t, codes.AlreadyExists, code(err))
}

func TestPodNameFreedWhenRemovedElsewhere(t *testing.T) {
	e := newEnv(t)
	id := e.runp(podConfig("elsewhere", nil))
	// Removed through the sandbox API (containerd's path), not this service.
	require.NoError(t, e.ctrl.Shutdown(ctx, id))
	e.runp(podConfig("elsewhere", nil))
}

// The extension carries the type URL containerd's CRI gives it, which the
// sandboxer registers.
func TestUpdatedResourcesTypeURL(t *testing.T) {
	a, err := updatedResources(nil, &runtime.LinuxContainerResources{CpuShares: 2})
	require.NoError(t, err)
	v, err := typeurl.UnmarshalAny(a)
	require.NoError(t, err)
	assert.Equal(t, "*sandboxer.updatedResources", fmt.Sprintf("%T", v))
}

// A container created before a restart and started after it writes its
// line to its log.
func TestCreatedContainerStartsAfterRestart(t *testing.T) {
	e := newEnv(t)
	pod := podConfig("later", nil)
	pod.LogDirectory = t.TempDir()
	podID := e.runp(pod)
	id := e.create(podID, containerConfig("later", nil, nil))
	e = e.restart()
	e.start(id)
	data, err := os.ReadFile(filepath.Join(pod.LogDirectory, "later/0.log"))
	require.NoError(t, err)
	assert.Contains(t, string(data), "simulated container "+id)
}

// TestListFollowsChanges: the items lists keep encoded are encoded again
// when what they show changes, and a removed pod leaves the list.
func TestListFollowsChanges(t *testing.T) {
	e := newEnv(t)
	list := func() map[string]runtime.PodSandboxState {
		resp, err := e.rt.ListPodSandbox(ctx, &runtime.ListPodSandboxRequest{})
		require.NoError(t, err)
		m := map[string]runtime.PodSandboxState{}
		for _, p := range resp.Items {
			m[p.Id] = p.State
			assert.Equal(t, p.Metadata.Name, p.Labels["app"], "decoded whole")
		}
		return m
	}
	a := e.runp(podConfig("a", nil))
	b := e.runp(podConfig("b", nil))
	assert.Equal(t, map[string]runtime.PodSandboxState{a: runtime.PodSandboxState_SANDBOX_READY, b: runtime.PodSandboxState_SANDBOX_READY}, list())
	_, err := e.rt.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: a})
	require.NoError(t, err)
	assert.Equal(t, runtime.PodSandboxState_SANDBOX_NOTREADY, list()[a])
	_, err = e.rt.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: b})
	require.NoError(t, err)
	assert.Equal(t, map[string]runtime.PodSandboxState{a: runtime.PodSandboxState_SANDBOX_NOTREADY}, list())

	// Containers too.
	c := e.runp(podConfig("c", nil))
	cid := e.create(c, containerConfig("ctr", nil, nil))
	containers := func() map[string]runtime.ContainerState {
		resp, err := e.rt.ListContainers(ctx, &runtime.ListContainersRequest{})
		require.NoError(t, err)
		m := map[string]runtime.ContainerState{}
		for _, c := range resp.Containers {
			m[c.Id] = c.State
			assert.Equal(t, "ctr", c.Metadata.Name)
			assert.Equal(t, "ctr", c.Labels["ctr"])
		}
		return m
	}
	assert.Equal(t, map[string]runtime.ContainerState{cid: runtime.ContainerState_CONTAINER_CREATED}, containers())
	e.start(cid)
	assert.Equal(t, map[string]runtime.ContainerState{cid: runtime.ContainerState_CONTAINER_RUNNING}, containers())
	_, err = e.rt.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: cid})
	require.NoError(t, err)
	assert.Equal(t, map[string]runtime.ContainerState{cid: runtime.ContainerState_CONTAINER_EXITED}, containers())
	_, err = e.rt.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: cid})
	require.NoError(t, err)
	assert.Empty(t, containers())
}

// TestStreamManyPods: more pods than one stream message holds.
func TestStreamManyPods(t *testing.T) {
	defer func(n int) { parallelEncode = n }(parallelEncode)
	parallelEncode = 100 // and the first list encodes them on every core
	e := newEnv(t)
	want := map[string]bool{}
	for i := range streamChunk + 20 {
		want[e.runp(podConfig(fmt.Sprintf("many-%d", i), nil))] = true
	}
	stream, err := e.rt.StreamPodSandboxes(ctx, &runtime.StreamPodSandboxesRequest{})
	require.NoError(t, err)
	got := map[string]bool{}
	msgs := 0
	for {
		msg, err := stream.Recv()
		if err != nil {
			break
		}
		msgs++
		assert.LessOrEqual(t, len(msg.PodSandboxes), streamChunk)
		for _, p := range msg.PodSandboxes {
			got[p.Id] = true
		}
	}
	assert.Equal(t, want, got)
	assert.Equal(t, 2, msgs)
}

func TestPodNameOfState(t *testing.T) {
	for _, tc := range []struct {
		name   string
		config string
		want   podName
		ok     bool
	}{
		{"metadata first", `{"metadata":{"name":"a","uid":"u","namespace":"n","attempt":2},"hostname":"h"}`, podName{"a", "n", "u", 2}, true},
		{"metadata later", `{"hostname":"h","labels":{"x":"y"},"metadata":{"name":"b","uid":"u","namespace":"n"}}`, podName{"b", "n", "u", 0}, true},
		{"no metadata", `{"hostname":"h"}`, podName{}, false},
		{"null metadata", `{"metadata":null}`, podName{}, false},
		{"not an object", `[1]`, podName{}, false},
		{"torn", `{"hostname":"h","metadata":{"name":`, podName{}, false},
		{"empty", ``, podName{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := podNameOfState(&sandboxer.State{Config: json.RawMessage(tc.config)})
			assert.Equal(t, tc.ok, ok)
			assert.Equal(t, tc.want, got)
		})
	}
}
