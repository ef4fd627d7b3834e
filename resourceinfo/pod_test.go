package resourceinfo

import (
	"fmt"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// q is a container's CPU (millicores) and memory (bytes); -1 is unset,
// and so is the zero q.
type q struct{ cpu, mem int64 }

func (v q) orUnset() q {
	if v == (q{}) {
		return unset
	}
	return v
}

var unset = q{-1, -1}

// kubeContainer is a container of a pod spec, as kubelet sees it.
type kubeContainer struct {
	name      string
	req, lim  q
	init      bool // an init container
	sidecar   bool // an init container with restartPolicy Always
	exitAfter bool // an app container that completes (exit 0) on its own
}

// kubePod is the part of a pod spec that sizes its cgroup.
type kubePod struct {
	containers []kubeContainer
	overhead   *q
	qos        string
}

func (c kubeContainer) requests() q {
	// SetDefaults_Pod: a request defaults to its limit.
	r, lim := c.req.orUnset(), c.lim.orUnset()
	if r.cpu < 0 && lim.cpu >= 0 {
		r.cpu = lim.cpu
	}
	if r.mem < 0 && lim.mem >= 0 {
		r.mem = lim.mem
	}
	return r
}

// sums is what component-helpers' AggregateContainerRequests/Limits give,
// without the overhead (kubelet's calculateSandboxResources has
// ExcludeOverhead), for one of q's fields: the larger of the app
// containers plus sidecars and of each init container plus the sidecars
// before it. Unset values add nothing; found is whether any was set.
func (p kubePod) sums(field func(kubeContainer) int64) (sum int64, found bool) {
	var apps, sidecars, inits int64
	for _, c := range p.containers {
		v := field(c)
		if v >= 0 {
			found = true
		}
		v = max(v, 0)
		switch {
		case c.sidecar:
			apps += v
			sidecars += v
			inits = max(inits, sidecars)
		case c.init:
			inits = max(inits, v+sidecars)
		default:
			apps += v
		}
	}
	return max(apps, inits), found
}

// sandboxConfig is what kubelet sends in RunPodSandbox (applySandboxResources).
func (p kubePod) sandboxConfig() *runtime.PodSandboxConfig {
	req, reqFound := p.sums(func(c kubeContainer) int64 { return c.requests().cpu })
	lim, _ := p.sums(func(c kubeContainer) int64 { return c.lim.orUnset().cpu })
	mem, _ := p.sums(func(c kubeContainer) int64 { return c.lim.orUnset().mem })
	if !reqFound {
		// calculateLinuxResources: no request but a limit: shares from it.
		req = lim
	}
	res := &runtime.LinuxContainerResources{
		CpuShares: int64(MilliCPUToShares(req)), CpuPeriod: DefaultCPUPeriod,
		CpuQuota: MilliCPUToQuota(lim, DefaultCPUPeriod), MemoryLimitInBytes: mem,
	}
	cfg := &runtime.PodSandboxConfig{Linux: &runtime.LinuxPodSandboxConfig{Resources: res}}
	if p.overhead != nil {
		o := *p.overhead
		cfg.Linux.Overhead = &runtime.LinuxContainerResources{
			CpuShares: int64(MilliCPUToShares(o.cpu)), CpuPeriod: DefaultCPUPeriod,
			CpuQuota: MilliCPUToQuota(o.cpu, DefaultCPUPeriod), MemoryLimitInBytes: max(o.mem, 0),
		}
	}
	switch p.qos {
	case QOSGuaranteed:
		cfg.Linux.CgroupParent = "/kubepods/podu1"
	case QOSBurstable:
		cfg.Linux.CgroupParent = "/kubepods/burstable/podu1"
	case QOSBestEffort:
		cfg.Linux.CgroupParent = "/kubepods/besteffort/podu1"
	}
	return cfg
}

// ociSpec is what containerd makes of kubelet's ContainerConfig for c
// (calculateLinuxResources; containerd copies the resources and names the
// container).
func (c kubeContainer) ociSpec() *specs.Spec {
	shares := MilliCPUToShares(max(c.requests().cpu, 0))
	cpu := &specs.LinuxCPU{Shares: &shares, Period: ptr(uint64(DefaultCPUPeriod))}
	if c.lim.cpu > 0 {
		cpu.Quota = ptr(MilliCPUToQuota(c.lim.cpu, DefaultCPUPeriod))
	}
	r := &specs.LinuxResources{CPU: cpu}
	if c.lim.mem > 0 {
		r.Memory = &specs.LinuxMemory{Limit: ptr(c.lim.mem)}
	}
	return &specs.Spec{
		Annotations: map[string]string{AnnotationContainerName: c.name},
		Linux:       &specs.Linux{Resources: r},
	}
}

// sandbox is the sandboxer's side: the pod spec it was created with, the
// containers present (by ID) and their history, as the controller keeps
// them.
type sandbox struct {
	t       *testing.T
	spec    Spec
	present map[string]Observed
	n       int
}

func newSandbox(t *testing.T, cfg *runtime.PodSandboxConfig) *sandbox {
	spec, err := FromPodSandboxConfig(cfg)
	require.NoError(t, err)
	return &sandbox{t: t, spec: spec, present: map[string]Observed{}}
}

func (s *sandbox) observe() ResourceInfo {
	s.spec.Pod, _ = s.spec.Pod.Observe(s.present)
	cs := map[string]Resources{}
	for id, o := range s.present {
		cs[id] = o.Resources
	}
	return Compute(s.spec, cs)
}

func (s *sandbox) create(c kubeContainer) string {
	r, err := FromOCISpec(c.ociSpec())
	require.NoError(s.t, err)
	s.n++
	id := fmt.Sprintf("%s-%d", c.name, s.n)
	s.present[id] = Observed{Resources: r}
	s.observe()
	return id
}

// exit ends a container and deletes it, as containerd does right away.
func (s *sandbox) exit(id string, status uint32) {
	o := s.present[id]
	o.Exited, o.ExitStatus = true, status
	s.present[id] = o
	s.observe()
	delete(s.present, id)
	s.observe()
}

// run starts the pod's containers in kubelet's order (computePodActions):
// init containers one by one, each exiting 0 before the next; sidecars
// left running; then the app containers.
func (s *sandbox) run(p kubePod) ResourceInfo {
	for _, c := range p.containers {
		if c.init || c.sidecar {
			id := s.create(c)
			if !c.sidecar {
				s.exit(id, 0)
			}
		}
	}
	var done []string
	for _, c := range p.containers {
		if !c.init && !c.sidecar {
			id := s.create(c)
			if c.exitAfter {
				done = append(done, id)
			}
		}
	}
	for _, id := range done {
		s.exit(id, 0)
	}
	return s.observe()
}

// cgroup is a pod cgroup as ResourceConfigForPod sizes it: cpu.shares,
// cpu.cfs_quota_us (-1: none), memory.limit_in_bytes (-1: none).
type cgroup struct {
	shares uint64
	quota  int64
	memory int64
}

func cgroupOf(r *Resources) cgroup {
	if r == nil {
		return cgroup{}
	}
	c := cgroup{quota: -1, memory: -1}
	if r.CPUShares != nil {
		c.shares = *r.CPUShares
	}
	if r.CPUQuota != nil {
		c.quota = *r.CPUQuota
	}
	if r.MemoryLimit != nil {
		c.memory = *r.MemoryLimit
	}
	return c
}

const mi = 1 << 20

// TestKubeletPods sizes pods the way kubelet does and checks the pod
// cgroup (pod_cgroup, and the effective values) against what kubelet's
// ResourceConfigForPod (pkg/kubelet/cm/helpers_linux.go) writes, worked
// out by hand below for each pod.
func TestKubeletPods(t *testing.T) {
	for _, tc := range []struct {
		desc string
		pod  kubePod
		// want is the pod cgroup kubelet creates.
		want cgroup
		// wantRequest and wantLimit are the effective cores (0: null).
		wantRequest, wantLimit float64
	}{
		{
			// Guaranteed: shares, quota and memory from the sums.
			desc: "guaranteed",
			pod: kubePod{qos: QOSGuaranteed, containers: []kubeContainer{
				{name: "app", lim: q{500, 256 * mi}},
			}},
			want:        cgroup{shares: 512, quota: 50000, memory: 256 * mi},
			wantRequest: 0.5, wantLimit: 0.5,
		},
		{
			// The pod: linux.resources carries 0.3 cores and 128Mi
			// (the limits that are set); one container has none, so
			// ResourceConfigForPod sets neither (cpuLimitsDeclared,
			// memoryLimitsDeclared false). Shares from 300m of requests.
			desc: "burstable with partial limits",
			pod: kubePod{qos: QOSBurstable, containers: []kubeContainer{
				{name: "limited", req: q{200, 64 * mi}, lim: q{300, 128 * mi}},
				{name: "unlimited", req: q{100, 64 * mi}, lim: unset},
			}},
			want:        cgroup{shares: 307, quota: -1, memory: -1},
			wantRequest: 0.3,
		},
		{
			desc: "burstable with every limit",
			pod: kubePod{qos: QOSBurstable, containers: []kubeContainer{
				{name: "a", req: q{100, 64 * mi}, lim: q{200, 128 * mi}},
				{name: "b", req: q{100, 64 * mi}, lim: q{400, 256 * mi}},
			}},
			want:        cgroup{shares: 204, quota: 60000, memory: 384 * mi},
			wantRequest: 0.2, wantLimit: 0.6,
		},
		{
			desc: "burstable with cpu limits only",
			pod: kubePod{qos: QOSBurstable, containers: []kubeContainer{
				{name: "a", req: q{100, -1}, lim: q{200, -1}},
			}},
			want:        cgroup{shares: 102, quota: 20000, memory: -1},
			wantRequest: 0.1, wantLimit: 0.2,
		},
		{
			// BestEffort: MinShares, nothing else; cpu_request null.
			desc: "besteffort",
			pod: kubePod{qos: QOSBestEffort, containers: []kubeContainer{
				{name: "app", req: unset, lim: unset},
			}},
			want: cgroup{shares: MinShares, quota: -1, memory: -1},
		},
		{
			// The overhead does not count for a BestEffort pod: its
			// branch of ResourceConfigForPod sets MinShares only.
			desc: "besteffort with overhead",
			pod: kubePod{qos: QOSBestEffort, overhead: &q{250, 64 * mi}, containers: []kubeContainer{
				{name: "app", req: unset, lim: unset},
			}},
			want: cgroup{shares: MinShares, quota: -1, memory: -1},
		},
		{
			// The pod: quota 20000 + 25000 = 45000, 128Mi + 64Mi;
			// shares MilliCPUToShares(200 + 250).
			desc: "spec.overhead",
			pod: kubePod{qos: QOSGuaranteed, overhead: &q{250, 64 * mi}, containers: []kubeContainer{
				{name: "app", lim: q{200, 128 * mi}},
			}},
			want:        cgroup{shares: 460, quota: 45000, memory: 192 * mi},
			wantRequest: 0.45, wantLimit: 0.45,
		},
		{
			// Overhead adds to a limit only where there is one (PodLimits).
			desc: "overhead with partial limits",
			pod: kubePod{qos: QOSBurstable, overhead: &q{100, 32 * mi}, containers: []kubeContainer{
				{name: "a", req: q{100, -1}, lim: q{200, 64 * mi}},
				{name: "b", req: q{100, -1}, lim: unset},
			}},
			want:        cgroup{shares: 307, quota: -1, memory: -1},
			wantRequest: 0.3,
		},
		{
			// Init containers: max(init, sum of apps) per resource.
			desc: "init container larger than the apps",
			pod: kubePod{qos: QOSBurstable, containers: []kubeContainer{
				{name: "init", init: true, req: q{500, 64 * mi}, lim: q{1000, 512 * mi}},
				{name: "app", req: q{100, 64 * mi}, lim: q{200, 128 * mi}},
			}},
			want:        cgroup{shares: 512, quota: 100000, memory: 512 * mi},
			wantRequest: 0.5, wantLimit: 1,
		},
		{
			// An init container without limits leaves the pod cgroup
			// without any (ContainerFn sees it), although linux.resources
			// has the app's, and although it is gone when the app runs.
			desc: "init container without limits",
			pod: kubePod{qos: QOSBurstable, containers: []kubeContainer{
				{name: "init", init: true, req: q{100, -1}, lim: unset},
				{name: "app", lim: q{200, 128 * mi}},
			}},
			want:        cgroup{shares: 204, quota: -1, memory: -1},
			wantRequest: 0.2,
		},
		{
			// An init container after a sidecar uses itself plus the
			// sidecar (AggregateContainerLimits): its missing limit is
			// the sidecar's, so every limit is declared.
			desc: "sidecar and an init container without limits",
			pod: kubePod{qos: QOSBurstable, containers: []kubeContainer{
				{name: "sidecar", sidecar: true, req: q{50, 32 * mi}, lim: q{100, 64 * mi}},
				{name: "init", init: true, req: q{10, -1}, lim: unset},
				{name: "app", lim: q{200, 128 * mi}},
			}},
			want:        cgroup{shares: 256, quota: 30000, memory: 192 * mi},
			wantRequest: 0.25, wantLimit: 0.3,
		},
		{
			desc: "several containers and init containers",
			pod: kubePod{qos: QOSGuaranteed, overhead: &q{100, 16 * mi}, containers: []kubeContainer{
				{name: "init-1", init: true, lim: q{300, 64 * mi}},
				{name: "init-2", init: true, lim: q{800, 32 * mi}},
				{name: "a", lim: q{100, 64 * mi}},
				{name: "b", lim: q{200, 128 * mi}},
				{name: "c", lim: q{300, 256 * mi}},
			}},
			// cpu max(800, 600) + 100; memory max(64Mi, 448Mi) + 16Mi.
			want:        cgroup{shares: 921, quota: 90000, memory: 464 * mi},
			wantRequest: 0.9, wantLimit: 0.9,
		},
		{
			// An app container that completed is still one of the pod's:
			// without limits, it keeps the pod cgroup unlimited.
			desc: "completed app container without limits",
			pod: kubePod{qos: QOSBurstable, containers: []kubeContainer{
				{name: "a", lim: q{200, 64 * mi}},
				{name: "job", req: q{100, -1}, lim: unset, exitAfter: true},
			}},
			want:        cgroup{shares: 307, quota: -1, memory: -1},
			wantRequest: 0.3,
		},
		{
			// Below the kernel's minimums: MilliCPUToQuota gives at least
			// 1 ms (read back as 10m), MilliCPUToShares at least 2 (no
			// request).
			desc: "kernel minimums",
			pod: kubePod{qos: QOSGuaranteed, containers: []kubeContainer{
				{name: "tiny", lim: q{2, 4 * mi}},
			}},
			want:      cgroup{shares: MinShares, quota: MinQuotaPeriod, memory: 4 * mi},
			wantLimit: 0.01,
		},
		{
			// Without a cgroup parent that names the QoS class (the
			// kubelet's cgroupsPerQOS off), BestEffort is read from
			// linux.resources and the containers.
			desc: "besteffort without cgroup parent",
			pod: kubePod{overhead: &q{250, 64 * mi}, containers: []kubeContainer{
				{name: "app", req: unset, lim: unset},
			}},
			want: cgroup{shares: MinShares, quota: -1, memory: -1},
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			s := newSandbox(t, tc.pod.sandboxConfig())
			info := s.run(tc.pod)
			require.NotNil(t, info.PodCgroup)
			assert.Equal(t, tc.want, cgroupOf(info.PodCgroup), "pod cgroup")
			assert.Equal(t, tc.want, cgroupOf(&info.Resources), "effective")
			if tc.want.quota > 0 {
				assert.Equal(t, uint64(DefaultCPUPeriod), *info.CPUPeriod)
			}
			if tc.wantRequest == 0 {
				assert.Nil(t, info.CPURequest, "cpu_request")
			} else if assert.NotNil(t, info.CPURequest, "cpu_request") {
				assert.Equal(t, tc.wantRequest, *info.CPURequest, "cpu_request")
			}
			if tc.wantLimit == 0 {
				assert.Nil(t, info.CPULimit, "cpu_limit")
			} else if assert.NotNil(t, info.CPULimit, "cpu_limit") {
				assert.Equal(t, tc.wantLimit, *info.CPULimit, "cpu_limit")
			}
			assert.Nil(t, info.MemoryRequest, "kubelet sends no memory request on cgroup v1")
			if tc.pod.qos != "" {
				assert.Equal(t, tc.pod.qos, *info.QOSClass)
			}
			// What was declared stays visible.
			require.NotNil(t, info.LinuxResources)
			assert.Equal(t, s.spec.Linux, *info.LinuxResources)
			if tc.pod.overhead != nil {
				assert.Equal(t, s.spec.Overhead, *info.Overhead)
			}
			// And the history survives a restart of the daemon: the same
			// state computes the same.
			again := Compute(s.spec, info.Containers)
			again.UpdatedAt = info.UpdatedAt
			assert.Equal(t, info, again)
		})
	}
}

// TestKubeletPodLifecycle follows one pod's values while kubelet creates
// its containers: until a container says otherwise, the limits of
// linux.resources stand.
func TestKubeletPodLifecycle(t *testing.T) {
	pod := kubePod{qos: QOSBurstable, containers: []kubeContainer{
		{name: "init", init: true, req: q{100, -1}, lim: q{100, 32 * mi}},
		{name: "limited", req: q{200, 64 * mi}, lim: q{300, 128 * mi}},
		{name: "unlimited", req: q{100, 64 * mi}, lim: unset},
	}}
	s := newSandbox(t, pod.sandboxConfig())
	step := func(what string, want cgroup) {
		t.Helper()
		assert.Equal(t, want, cgroupOf(s.observe().PodCgroup), what)
	}
	step("no container yet", cgroup{shares: 307, quota: 30000, memory: 128 * mi})
	id := s.create(pod.containers[0])
	step("init running", cgroup{shares: 307, quota: 30000, memory: 128 * mi})
	s.exit(id, 0)
	step("init done", cgroup{shares: 307, quota: 30000, memory: 128 * mi})
	s.create(pod.containers[1])
	step("first app", cgroup{shares: 307, quota: 30000, memory: 128 * mi})
	info := s.observe()
	assert.Contains(t, info.InitContainers, "init", "the completed container counts as an init container")
	s.create(pod.containers[2])
	step("app without limits", cgroup{shares: 307, quota: -1, memory: -1})
}

func TestPodObserve(t *testing.T) {
	res := func(name string, cpu float64) Resources {
		return Resources{Name: name, CPULimit: ptr(cpu)}
	}
	t.Run("idempotent", func(t *testing.T) {
		present := map[string]Observed{"a1": {Resources: res("a", 1)}}
		p, changed := Pod{}.Observe(present)
		assert.True(t, changed)
		again, changed := p.Observe(present)
		assert.False(t, changed)
		assert.Equal(t, p, again)
	})
	t.Run("does not modify its receiver", func(t *testing.T) {
		p, _ := Pod{}.Observe(map[string]Observed{"a1": {Resources: res("a", 1)}})
		before := fmt.Sprint(p)
		p.Observe(map[string]Observed{"a1": {Resources: res("a", 2), Exited: true}, "b1": {Resources: res("b", 1)}})
		assert.Equal(t, before, fmt.Sprint(p))
	})
	t.Run("nothing is no change", func(t *testing.T) {
		_, changed := Pod{}.Observe(nil)
		assert.False(t, changed)
	})
	t.Run("completed before a new name is an init container", func(t *testing.T) {
		p, _ := Pod{}.Observe(map[string]Observed{"i1": {Resources: res("init", 1)}})
		p, _ = p.Observe(map[string]Observed{"i1": {Resources: res("init", 1), Exited: true}})
		assert.True(t, p.Containers["init"].Completed)
		assert.False(t, p.Containers["init"].Init)
		p, _ = p.Observe(nil) // containerd deleted it
		p, _ = p.Observe(map[string]Observed{"a1": {Resources: res("app", 1)}})
		assert.True(t, p.Containers["init"].Init)
		assert.False(t, p.Containers["app"].Init)
	})
	t.Run("a failed container is no init container", func(t *testing.T) {
		p, _ := Pod{}.Observe(map[string]Observed{"i1": {Resources: res("init", 1)}})
		p, _ = p.Observe(map[string]Observed{"i1": {Resources: res("init", 1), Exited: true, ExitStatus: 1}})
		p, _ = p.Observe(map[string]Observed{"a1": {Resources: res("app", 1)}})
		assert.False(t, p.Containers["init"].Init)
	})
	t.Run("a restart of the same name is no new name", func(t *testing.T) {
		p, _ := Pod{}.Observe(map[string]Observed{"a1": {Resources: res("a", 1)}, "b1": {Resources: res("b", 1)}})
		p, _ = p.Observe(map[string]Observed{"a1": {Resources: res("a", 1), Exited: true}, "b1": {Resources: res("b", 1)}})
		p, _ = p.Observe(map[string]Observed{"b1": {Resources: res("b", 1)}})
		p, _ = p.Observe(map[string]Observed{"b2": {Resources: res("b", 1)}})
		assert.False(t, p.Containers["a"].Init, "b restarted: no new container name appeared")
		assert.Equal(t, "b2", p.Containers["b"].ID)
		assert.Equal(t, uint64(3), p.Seq)
	})
	t.Run("an init container restarted after it failed", func(t *testing.T) {
		p, _ := Pod{}.Observe(map[string]Observed{"i1": {Resources: res("init", 1), Exited: true}})
		p, _ = p.Observe(map[string]Observed{"i2": {Resources: res("init", 1)}})
		assert.False(t, p.Containers["init"].Completed, "the new one has not completed")
	})
	t.Run("sidecars run alongside", func(t *testing.T) {
		p, _ := Pod{}.Observe(map[string]Observed{"s1": {Resources: res("sidecar", 0.5)}})
		p, _ = p.Observe(map[string]Observed{"s1": {Resources: res("sidecar", 0.5)}, "i1": {Resources: res("init", 1)}})
		require.NotNil(t, p.Containers["init"].Alongside)
		assert.Equal(t, ptr(int64(500)), p.Containers["init"].Alongside.CPULimit)
		assert.Nil(t, p.Containers["sidecar"].Alongside)
	})
	t.Run("an update without a name is the same container", func(t *testing.T) {
		p, _ := Pod{}.Observe(map[string]Observed{"a1": {Resources: res("a", 1)}})
		p, changed := p.Observe(map[string]Observed{"a1": {Resources: Resources{CPULimit: ptr(2.0)}}})
		assert.True(t, changed)
		assert.Len(t, p.Containers, 1)
		assert.Equal(t, ptr(int64(2000)), p.Containers["a"].Own.CPULimit)
		assert.Equal(t, uint64(1), p.Seq, "no new container")
	})
	t.Run("unnamed containers are forgotten when gone", func(t *testing.T) {
		p, _ := Pod{}.Observe(map[string]Observed{"x": {Resources: Resources{CPULimit: ptr(1.0)}}})
		assert.Contains(t, p.Containers, "#x")
		p, _ = p.Observe(nil)
		assert.Empty(t, p.Containers)
	})
	t.Run("bounded", func(t *testing.T) {
		var p Pod
		for i := range maxPodContainers + 50 {
			p, _ = p.Observe(map[string]Observed{fmt.Sprint(i): {Resources: res(fmt.Sprint("c", i), 1)}})
		}
		assert.Len(t, p.Containers, maxPodContainers)
		assert.Contains(t, p.Containers, fmt.Sprint("c", maxPodContainers+49), "the present one stays")
		assert.NotContains(t, p.Containers, "c0", "the oldest goes")
	})
}
