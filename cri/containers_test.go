package cri

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

func TestContainerLifecycle(t *testing.T) {
	e := newEnv(t)
	pod := podConfig("ctrs", nil)
	pod.LogDirectory = t.TempDir()
	podID := e.runp(pod)
	res := &runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 50000, CpuShares: 256, MemoryLimitInBytes: 256 << 20}
	cfg := containerConfig("app", map[string]string{"a": "b"}, res)
	cfg.Mounts = []*runtime.Mount{{ContainerPath: "/data", HostPath: "/tmp", Readonly: true}}
	before := time.Now()
	id := e.create(podID, cfg)
	assert.Regexp(t, regexp.MustCompile(`^[0-9a-f]{64}$`), id)

	st := e.status(id)
	assert.Equal(t, runtime.ContainerState_CONTAINER_CREATED, st.State)
	assert.Equal(t, "app", st.Metadata.Name)
	assert.Equal(t, "busybox", st.Image.Image, "not pulled: shown as given")
	assert.Regexp(t, `^sha256:[0-9a-f]{64}$`, st.ImageRef)
	assert.Equal(t, map[string]string{"ctr": "app"}, st.Labels)
	assert.Equal(t, map[string]string{"a": "b"}, st.Annotations)
	assert.Equal(t, filepath.Join(pod.LogDirectory, "app/0.log"), st.LogPath)
	assert.Equal(t, "/data", st.Mounts[0].ContainerPath)
	assert.Equal(t, int64(50000), st.Resources.Linux.CpuQuota)
	assert.Equal(t, int64(256<<20), st.Resources.Linux.MemoryLimitInBytes)
	assert.GreaterOrEqual(t, st.CreatedAt, before.UnixNano())
	assert.Zero(t, st.StartedAt)

	m := e.resourceInfo(podID)
	assert.Equal(t, 0.5, m["cpu_limit"], "the pod's total is its container's")
	assert.Contains(t, m["containers"], id)

	e.start(id)
	st = e.status(id)
	assert.Equal(t, runtime.ContainerState_CONTAINER_RUNNING, st.State)
	assert.NotZero(t, st.StartedAt)
	_, err := e.rt.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: id})
	assert.Equal(t, codes.FailedPrecondition, code(err), "start twice")

	// The simulated line, in the CRI log format.
	data, err := os.ReadFile(st.LogPath)
	require.NoError(t, err)
	assert.Regexp(t, `^\S+ stdout F resource-slot: simulated container `+id+` in sandbox `+podID+` .*cpu_limit=0.5`, string(data))

	// Verbose status.
	resp, err := e.rt.ContainerStatus(ctx, &runtime.ContainerStatusRequest{ContainerId: id, Verbose: true})
	require.NoError(t, err)
	var info map[string]any
	require.NoError(t, json.Unmarshal([]byte(resp.Info["info"]), &info))
	assert.Equal(t, podID, info["sandboxID"])
	assert.Equal(t, "app", info["config"].(map[string]any)["name"])
	assert.Equal(t, []any{"/bin/sh"}, info["config"].(map[string]any)["command"])

	// Update merges as containerd does: memory only keeps the CPU values.
	_, err = e.rt.UpdateContainerResources(ctx, &runtime.UpdateContainerResourcesRequest{
		ContainerId: id, Linux: &runtime.LinuxContainerResources{MemoryLimitInBytes: 512 << 20},
	})
	require.NoError(t, err)
	m = e.resourceInfo(podID)
	assert.Equal(t, 0.5, m["cpu_limit"])
	assert.Equal(t, float64(512<<20), m["memory_limit"])
	_, err = e.rt.UpdateContainerResources(ctx, &runtime.UpdateContainerResourcesRequest{
		ContainerId: id, Linux: &runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 150000},
	})
	require.NoError(t, err)
	assert.Equal(t, 1.5, e.resourceInfo(podID)["cpu_limit"])
	assert.Equal(t, int64(150000), e.status(id).Resources.Linux.CpuQuota)
	_, err = e.rt.UpdateContainerResources(ctx, &runtime.UpdateContainerResourcesRequest{ContainerId: id})
	assert.Equal(t, codes.InvalidArgument, code(err))

	// Stop with a timeout: SIGTERM ends a simulated process, 143.
	_, err = e.rt.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: id, Timeout: 10})
	require.NoError(t, err)
	st = e.status(id)
	assert.Equal(t, runtime.ContainerState_CONTAINER_EXITED, st.State)
	assert.Equal(t, int32(143), st.ExitCode)
	assert.Equal(t, "Error", st.Reason)
	assert.NotZero(t, st.FinishedAt)
	_, err = e.rt.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: id})
	assert.NoError(t, err, "stop is idempotent")
	_, err = e.rt.UpdateContainerResources(ctx, &runtime.UpdateContainerResourcesRequest{ContainerId: id, Linux: res})
	assert.Equal(t, codes.FailedPrecondition, code(err), "an exited container cannot be updated")

	for i := 0; i < 2; i++ {
		_, err = e.rt.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: id})
		require.NoError(t, err, "remove is idempotent")
	}
	_, err = e.rt.ContainerStatus(ctx, &runtime.ContainerStatusRequest{ContainerId: id})
	assert.Equal(t, codes.NotFound, code(err))
	m = e.resourceInfo(podID)
	assert.Nil(t, m["cpu_limit"])
	assert.Nil(t, m["containers"])
}

func TestStopContainer(t *testing.T) {
	e := newEnv(t)
	podID := e.runp(podConfig("stop", nil))
	for _, tc := range []struct {
		name    string
		signal  runtime.Signal
		timeout int64
		code    int32
		minTime time.Duration
	}{
		{name: "SIGKILL without timeout", code: 137},
		{name: "SIGTERM with timeout", timeout: 30, code: 143},
		{name: "stop signal SIGINT", signal: runtime.Signal_SIGNAL_SIGINT, timeout: 30, code: 130},
		{name: "ignored stop signal, then SIGKILL", signal: runtime.Signal_SIGNAL_SIGWINCH, timeout: 1, code: 137, minTime: time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := containerConfig(strings.ReplaceAll(tc.name, " ", "-"), nil, nil)
			cfg.StopSignal = tc.signal
			id := e.create(podID, cfg)
			e.start(id)
			start := time.Now()
			_, err := e.rt.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: id, Timeout: tc.timeout})
			require.NoError(t, err)
			assert.GreaterOrEqual(t, time.Since(start), tc.minTime)
			st := e.status(id)
			assert.Equal(t, runtime.ContainerState_CONTAINER_EXITED, st.State)
			assert.Equal(t, tc.code, st.ExitCode)
		})
	}
	t.Run("created container", func(t *testing.T) {
		id := e.create(podID, containerConfig("never-started", nil, nil))
		_, err := e.rt.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: id})
		require.NoError(t, err)
		assert.Equal(t, runtime.ContainerState_CONTAINER_CREATED, e.status(id).State, "nothing to stop")
		_, err = e.rt.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: id})
		require.NoError(t, err)
	})
	t.Run("unknown", func(t *testing.T) {
		_, err := e.rt.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: "feedface"})
		assert.NoError(t, err, "stopping what is gone succeeds (CRI, critest)")
	})
	t.Run("remove running", func(t *testing.T) {
		id := e.create(podID, containerConfig("running", nil, nil))
		e.start(id)
		_, err := e.rt.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: id})
		require.NoError(t, err)
		_, err = e.rt.ContainerStatus(ctx, &runtime.ContainerStatusRequest{ContainerId: id})
		assert.Equal(t, codes.NotFound, code(err))
	})
}

func TestSimulatedExit(t *testing.T) {
	e := newEnv(t)
	podID := e.runp(podConfig("exit", nil))
	for _, tc := range []struct {
		code   string
		want   int32
		reason string
	}{
		{"0", 0, "Completed"},
		{"3", 3, "Error"},
	} {
		id := e.create(podID, containerConfig("job-"+tc.code, map[string]string{
			slot.AnnotationExitAfter: "50ms", slot.AnnotationExitCode: tc.code,
		}, nil))
		e.start(id)
		eventually(t, "the job to exit", func() bool { return e.status(id).State == runtime.ContainerState_CONTAINER_EXITED })
		st := e.status(id)
		assert.Equal(t, tc.want, st.ExitCode)
		assert.Equal(t, tc.reason, st.Reason)
	}
}

func TestCreateContainerErrors(t *testing.T) {
	e := newEnv(t)
	podID := e.runp(podConfig("errs", nil))
	e.create(podID, containerConfig("taken", nil, nil))
	stopped := e.runp(podConfig("stopped", nil))
	_, err := e.rt.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: stopped})
	require.NoError(t, err)
	for _, tc := range []struct {
		name string
		pod  string
		cfg  *runtime.ContainerConfig
		code codes.Code
		msg  string
	}{
		{"unknown pod", "0000", containerConfig("x", nil, nil), codes.NotFound, "0000"},
		{"no pod", "", containerConfig("x", nil, nil), codes.InvalidArgument, "empty"},
		{"no config", podID, nil, codes.InvalidArgument, "metadata"},
		{"no name", podID, &runtime.ContainerConfig{Metadata: &runtime.ContainerMetadata{}}, codes.InvalidArgument, "name"},
		{"name taken", podID, containerConfig("taken", nil, nil), codes.AlreadyExists, `"taken"`},
		{"bad simulation", podID, containerConfig("x", map[string]string{slot.AnnotationExitCode: "300"}, nil), codes.InvalidArgument, slot.AnnotationExitCode},
		{"bad resources", podID, containerConfig("x", nil, &runtime.LinuxContainerResources{CpuShares: -1}), codes.InvalidArgument, "cpu_shares"},
		{"stopped pod", stopped, containerConfig("x", nil, nil), codes.FailedPrecondition, "not ready"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.rt.CreateContainer(ctx, &runtime.CreateContainerRequest{PodSandboxId: tc.pod, Config: tc.cfg})
			require.Error(t, err)
			assert.Equal(t, tc.code, code(err), err.Error())
			assert.Contains(t, err.Error(), tc.msg)
		})
	}
	// The next attempt of a name is another container.
	cfg := containerConfig("taken", nil, nil)
	cfg.Metadata.Attempt = 1
	e.create(podID, cfg)
}

func TestConcurrentCreateSameName(t *testing.T) {
	e := newEnv(t)
	podID := e.runp(podConfig("race", nil))
	const n = 8
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() {
			_, err := e.rt.CreateContainer(ctx, &runtime.CreateContainerRequest{PodSandboxId: podID, Config: containerConfig("same", nil, nil)})
			errs <- err
		}()
	}
	ok := 0
	for i := 0; i < n; i++ {
		if err := <-errs; err == nil {
			ok++
		} else {
			assert.Equal(t, codes.AlreadyExists, code(err))
		}
	}
	assert.Equal(t, 1, ok, "one container gets the name")
}

func TestListContainers(t *testing.T) {
	e := newEnv(t)
	p1 := e.runp(podConfig("p1", nil))
	p2 := e.runp(podConfig("p2", nil))
	a := e.create(p1, containerConfig("a", nil, nil))
	b := e.create(p1, containerConfig("b", nil, nil))
	c := e.create(p2, containerConfig("c", nil, nil))
	e.start(a)
	e.start(c)
	_, err := e.rt.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: c})
	require.NoError(t, err)
	state := func(s runtime.ContainerState) *runtime.ContainerStateValue {
		return &runtime.ContainerStateValue{State: s}
	}
	for _, tc := range []struct {
		name   string
		filter *runtime.ContainerFilter
		want   []string
	}{
		{"all", nil, []string{a, b, c}},
		{"id prefix", &runtime.ContainerFilter{Id: a[:8]}, []string{a}},
		{"pod", &runtime.ContainerFilter{PodSandboxId: p1}, []string{a, b}},
		{"pod prefix", &runtime.ContainerFilter{PodSandboxId: p2[:8]}, []string{c}},
		{"running", &runtime.ContainerFilter{State: state(runtime.ContainerState_CONTAINER_RUNNING)}, []string{a}},
		{"created", &runtime.ContainerFilter{State: state(runtime.ContainerState_CONTAINER_CREATED)}, []string{b}},
		{"exited", &runtime.ContainerFilter{State: state(runtime.ContainerState_CONTAINER_EXITED)}, []string{c}},
		{"label", &runtime.ContainerFilter{LabelSelector: map[string]string{"ctr": "b"}}, []string{b}},
		{"label and pod", &runtime.ContainerFilter{LabelSelector: map[string]string{"ctr": "b"}, PodSandboxId: p2}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := e.rt.ListContainers(ctx, &runtime.ListContainersRequest{Filter: tc.filter})
			require.NoError(t, err)
			var got []string
			for _, c := range resp.Containers {
				got = append(got, c.Id)
				assert.NotEmpty(t, c.Metadata.Name)
				assert.NotEmpty(t, c.PodSandboxId)
			}
			assert.ElementsMatch(t, tc.want, got)
		})
	}
	// Stopping a pod kills its containers.
	_, err = e.rt.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: p1})
	require.NoError(t, err)
	st := e.status(a)
	assert.Equal(t, runtime.ContainerState_CONTAINER_EXITED, st.State)
	assert.Equal(t, int32(137), st.ExitCode)
}

// A container created through containerd (the task API) has no CRI
// metadata here: it is listed by its ID, without image or labels.
func TestContainerdContainerShownMinimal(t *testing.T) {
	e := newEnv(t)
	podID := e.runp(podConfig("mixed", nil))
	limit := int64(64 << 20)
	_, err := e.tasks.Create(ctx, sandboxer.TaskSpec{
		Key: sandboxer.TaskKey{Namespace: "k8s.io", ID: "ctrd-container"}, SandboxID: podID,
		Resources: resourceinfo.Resources{MemoryLimit: &limit},
	})
	require.NoError(t, err)
	resp, err := e.rt.ListContainers(ctx, &runtime.ListContainersRequest{Filter: &runtime.ContainerFilter{PodSandboxId: podID}})
	require.NoError(t, err)
	require.Len(t, resp.Containers, 1)
	assert.Equal(t, "ctrd-container", resp.Containers[0].Metadata.Name)
	assert.Empty(t, resp.Containers[0].Image.Image)
	st := e.status("ctrd-container")
	assert.Equal(t, runtime.ContainerState_CONTAINER_CREATED, st.State)
	assert.Equal(t, limit, st.Resources.Linux.MemoryLimitInBytes)
	// It does not hold a name.
	e.create(podID, containerConfig("ctrd-container", nil, nil))
}

func TestUnimplemented(t *testing.T) {
	e := newEnv(t)
	calls := map[string]func() error{
		"ExecSync": func() error {
			_, err := e.rt.ExecSync(ctx, &runtime.ExecSyncRequest{ContainerId: "x"})
			return err
		},
		"Exec": func() error {
			_, err := e.rt.Exec(ctx, &runtime.ExecRequest{ContainerId: "x"})
			return err
		},
		"Attach": func() error {
			_, err := e.rt.Attach(ctx, &runtime.AttachRequest{ContainerId: "x"})
			return err
		},
		"PortForward": func() error {
			_, err := e.rt.PortForward(ctx, &runtime.PortForwardRequest{PodSandboxId: "x"})
			return err
		},
		"CheckpointContainer": func() error {
			_, err := e.rt.CheckpointContainer(ctx, &runtime.CheckpointContainerRequest{ContainerId: "x"})
			return err
		},
	}
	for name, call := range calls {
		t.Run(name, func(t *testing.T) {
			err := call()
			assert.Equal(t, codes.Unimplemented, code(err))
			assert.Contains(t, err.Error(), "resource-slot")
		})
	}
}

func TestLinuxResourcesRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   *runtime.LinuxContainerResources
	}{
		{"empty", &runtime.LinuxContainerResources{}},
		{"cfs", &runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 150000, CpuShares: 512}},
		{"memory", &runtime.LinuxContainerResources{MemoryLimitInBytes: 1 << 30, MemorySwapLimitInBytes: 2 << 30}},
		{"cpuset", &runtime.LinuxContainerResources{CpusetCpus: "0-1", CpusetMems: "0"}},
		{"hugepages and unified", &runtime.LinuxContainerResources{
			HugepageLimits: []*runtime.HugepageLimit{{PageSize: "1GB", Limit: 1 << 30}, {PageSize: "2MB", Limit: 4 << 20}},
			Unified:        map[string]string{"pids.max": "100", "memory.min": "1048576"},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := resourceinfo.FromLinuxResources("x", tc.in)
			require.NoError(t, err)
			back, err := resourceinfo.FromLinuxResources("x", linuxResources(r))
			require.NoError(t, err)
			assert.Equal(t, r, back)
		})
	}
}

func TestMergeResources(t *testing.T) {
	cur := &runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 50000, MemoryLimitInBytes: 1 << 20, Unified: map[string]string{"a": "1"}}
	got := mergeResources(cur, &runtime.LinuxContainerResources{CpuQuota: 70000, Unified: map[string]string{"b": "2"}})
	assert.Equal(t, int64(100000), got.CpuPeriod)
	assert.Equal(t, int64(70000), got.CpuQuota)
	assert.Equal(t, int64(1<<20), got.MemoryLimitInBytes)
	assert.Equal(t, map[string]string{"a": "1", "b": "2"}, got.Unified)
}

type recordingPublisher struct {
	mu     sync.Mutex
	topics []string
}

func (p *recordingPublisher) Publish(ctx context.Context, topic string, _ any) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	ns, _ := namespaces.Namespace(ctx)
	p.topics = append(p.topics, ns+" "+topic)
	return nil
}

func (p *recordingPublisher) Close() error { return nil }

// The events of direct containers are not forwarded to containerd;
// containerd's own still are.
func TestFilterEvents(t *testing.T) {
	rec := &recordingPublisher{}
	f := FilterEvents(rec)
	require.NoError(t, f.Publish(namespaces.WithNamespace(ctx, Namespace), "/tasks/create", nil))
	require.NoError(t, f.Publish(namespaces.WithNamespace(ctx, "k8s.io"), "/tasks/create", nil))
	assert.Equal(t, []string{"k8s.io /tasks/create"}, rec.topics)
	assert.Nil(t, FilterEvents(nil))
}
