package sandboxer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

// faultyBackend is the slot backend with injectable failures, to drive the
// controller's rollback paths.
type faultyBackend struct {
	*slot.Backend
	mu      sync.Mutex
	failOn  map[string]error
	calls   map[string]int
	updates []resourceinfo.ResourceInfo
	pods    []backend.Pod // what Create got
	// startHook, when set, runs in Start and fails it with its error.
	startHook func(ctx context.Context) error
	// dead makes Recover report every sandbox gone.
	dead bool
}

func newFaulty() *faultyBackend {
	return &faultyBackend{Backend: slot.New(), failOn: map[string]error{}, calls: map[string]int{}}
}

func (f *faultyBackend) fail(op string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failOn[op] = err
}

func (f *faultyBackend) err(op string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls[op]++
	return f.failOn[op]
}

// waitCalls waits until op was called at least n times.
func (f *faultyBackend) waitCalls(t *testing.T, op string, n int) {
	t.Helper()
	require.Eventually(t, func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.calls[op] >= n
	}, 10*time.Second, time.Millisecond)
}

func (f *faultyBackend) Create(ctx context.Context, id, dir string, info resourceinfo.ResourceInfo, pod backend.Pod) error {
	if err := f.err("create"); err != nil {
		return err
	}
	f.mu.Lock()
	f.pods = append(f.pods, pod)
	f.mu.Unlock()
	return f.Backend.Create(ctx, id, dir, info, pod)
}

func (f *faultyBackend) Start(ctx context.Context, id string, exited ExitFunc) (uint32, error) {
	if err := f.err("start"); err != nil {
		return 0, err
	}
	if f.startHook != nil {
		if err := f.startHook(ctx); err != nil {
			return 0, err
		}
	}
	return f.Backend.Start(ctx, id, exited)
}

// Delete fails as a backend does whose cleanup needs a live context (a
// command, a guest call), and records that it was called.
func (f *faultyBackend) Delete(ctx context.Context, id string) error {
	if err := f.err("delete"); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("delete %s: %w", id, err)
	}
	return f.Backend.Delete(ctx, id)
}

func (f *faultyBackend) Update(ctx context.Context, id string, info resourceinfo.ResourceInfo) error {
	if err := f.err("update"); err != nil {
		return err
	}
	f.mu.Lock()
	f.updates = append(f.updates, info)
	f.mu.Unlock()
	return f.Backend.Update(ctx, id, info)
}

func (f *faultyBackend) Recover(ctx context.Context, id, dir string, info resourceinfo.ResourceInfo, running bool, exited ExitFunc) (bool, error) {
	if err := f.err("recover"); err != nil {
		return false, err
	}
	f.mu.Lock()
	dead := f.dead
	f.mu.Unlock()
	if dead {
		return false, nil
	}
	return f.Backend.Recover(ctx, id, dir, info, running, exited)
}

func newController(t testing.TB, root string, b Backend) *Controller {
	t.Helper()
	return newTestController(t, Options{Root: root, Backend: b, TaskAddress: "ttrpc+unix:///run/test-task.sock", CreatedGrace: time.Hour})
}

func podConfig(annotations map[string]string, linux *runtime.LinuxContainerResources) *runtime.PodSandboxConfig {
	cfg := &runtime.PodSandboxConfig{
		Metadata:    &runtime.PodSandboxMetadata{Name: "p", Namespace: "ns", Uid: "u"},
		Annotations: annotations,
	}
	if linux != nil {
		cfg.Linux = &runtime.LinuxPodSandboxConfig{Resources: linux}
	}
	return cfg
}

func withPod(cfg *runtime.PodSandboxConfig, f func(*runtime.PodSandboxConfig)) *runtime.PodSandboxConfig {
	f(cfg)
	return cfg
}

func create(ctx context.Context, c *Controller, id string, cfg *runtime.PodSandboxConfig) error {
	var opts []sandbox.CreateOpt
	if cfg != nil {
		opts = append(opts, sandbox.WithOptions(cfg))
	}
	return c.Create(ctx, sandbox.Sandbox{ID: id}, opts...)
}

// sandboxDirs lists the state directory but for its own entries (the
// journal, the quarantine), which start with a dot.
func sandboxDirs(t *testing.T, root string) []string {
	t.Helper()
	entries, err := os.ReadDir(root)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), ".") {
			names = append(names, e.Name())
		}
	}
	return names
}

func readInfo(t *testing.T, root, id string) map[string]any {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(root, id, ResourceInfoFile))
	require.NoError(t, err)
	var m map[string]any
	require.NoError(t, json.Unmarshal(data, &m))
	return m
}

func TestLifecycle(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := newController(t, root, slot.New())

	cfg := podConfig(map[string]string{
		resourceinfo.AnnotationCPULimit:    "2",
		resourceinfo.AnnotationMemoryLimit: "2Gi",
		resourceinfo.AnnotationPidLimit:    "1000",
	}, nil)
	require.NoError(t, create(ctx, c, "sb1", cfg))

	m := readInfo(t, root, "sb1")
	assert.Equal(t, 2.0, m["cpu_limit"])
	assert.Equal(t, 2147483648.0, m["memory_limit"])
	assert.Equal(t, 1000.0, m["pid_limit"])
	assert.Nil(t, m["memory_request"], "unset values are null")

	st, err := c.Status(ctx, "sb1", false)
	require.NoError(t, err)
	assert.Equal(t, StateNotReady, st.State)

	inst, err := c.Start(ctx, "sb1")
	require.NoError(t, err)
	assert.Equal(t, "ttrpc+unix:///run/test-task.sock", inst.Address)
	assert.Equal(t, uint32(3), inst.Version)

	st, err = c.Status(ctx, "sb1", true)
	require.NoError(t, err)
	assert.Equal(t, StateReady, st.State)
	require.Contains(t, st.Info, "resourceInfo")
	assert.Contains(t, st.Info["resourceInfo"], `"cpu_limit":2`)
	assert.Contains(t, st.Info["info"], `"processStatus":"ready"`)

	waited := make(chan sandbox.ExitStatus, 1)
	go func() {
		es, err := c.Wait(ctx, "sb1")
		assert.NoError(t, err)
		waited <- es
	}()
	select {
	case <-waited:
		t.Fatal("Wait returned before Stop")
	case <-time.After(50 * time.Millisecond):
	}
	require.NoError(t, c.Stop(ctx, "sb1"))
	select {
	case es := <-waited:
		assert.False(t, es.ExitedAt.IsZero())
	case <-time.After(5 * time.Second):
		t.Fatal("Wait did not return after Stop")
	}
	require.NoError(t, c.Stop(ctx, "sb1"), "Stop is idempotent")

	_, err = c.Metrics(ctx, "sb1")
	assert.True(t, errdefs.IsFailedPrecondition(err), "no metrics for a stopped slot: %v", err)

	require.NoError(t, c.Shutdown(ctx, "sb1"))
	_, err = os.Stat(filepath.Join(root, "sb1"))
	assert.True(t, os.IsNotExist(err), "Shutdown removes the sandbox directory")
	assert.True(t, errdefs.IsNotFound(c.Shutdown(ctx, "sb1")))
	assert.Empty(t, sandboxDirs(t, root), "nothing left in the state dir")
}

func TestWrongOrderAndUnknownIDs(t *testing.T) {
	ctx := context.Background()
	c := newController(t, t.TempDir(), slot.New())
	for _, tc := range []struct {
		desc string
		call func() error
		want func(error) bool
	}{
		{"start unknown", func() error { _, err := c.Start(ctx, "nope"); return err }, errdefs.IsNotFound},
		{"stop unknown", func() error { return c.Stop(ctx, "nope") }, errdefs.IsNotFound},
		{"status unknown", func() error { _, err := c.Status(ctx, "nope", true); return err }, errdefs.IsNotFound},
		{"wait unknown", func() error { _, err := c.Wait(ctx, "nope"); return err }, errdefs.IsNotFound},
		{"shutdown unknown", func() error { return c.Shutdown(ctx, "nope") }, errdefs.IsNotFound},
		{"metrics unknown", func() error { _, err := c.Metrics(ctx, "nope"); return err }, errdefs.IsNotFound},
		{"platform unknown", func() error { _, err := c.Platform(ctx, "nope"); return err }, errdefs.IsNotFound},
		{"update unknown", func() error { return c.Update(ctx, "nope", sandbox.Sandbox{ID: "nope"}) }, errdefs.IsNotFound},
		{"slash id", func() error { return create(ctx, c, "a/b", nil) }, errdefs.IsInvalidArgument},
		{"dotdot id", func() error { return create(ctx, c, "..", nil) }, errdefs.IsInvalidArgument},
		{"nul id", func() error { return create(ctx, c, "a\x00b", nil) }, errdefs.IsInvalidArgument},
		{"long id", func() error { return create(ctx, c, strings.Repeat("a", 4096), nil) }, errdefs.IsInvalidArgument},
		{"empty id", func() error { return create(ctx, c, "", nil) }, errdefs.IsInvalidArgument},
		{"traversal on status", func() error { _, err := c.Status(ctx, "../etc", false); return err }, errdefs.IsInvalidArgument},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			err := tc.call()
			require.Error(t, err)
			assert.True(t, tc.want(err), "got %v", err)
		})
	}

	require.NoError(t, create(ctx, c, "sb", nil))
	assert.True(t, errdefs.IsAlreadyExists(create(ctx, c, "sb", nil)), "create twice")
	_, err := c.Start(ctx, "sb")
	require.NoError(t, err)
	_, err = c.Start(ctx, "sb")
	assert.True(t, errdefs.IsFailedPrecondition(err), "start twice: %v", err)
	require.NoError(t, c.Stop(ctx, "sb"))
	_, err = c.Start(ctx, "sb")
	assert.True(t, errdefs.IsFailedPrecondition(err), "start after stop: %v", err)
}

func TestCreateInvalidLeavesNothing(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		desc    string
		cfg     *runtime.PodSandboxConfig
		wantMsg []string
	}{
		{"bad quantity", podConfig(map[string]string{resourceinfo.AnnotationMemoryLimit: "2GiB"}, nil), []string{resourceinfo.AnnotationMemoryLimit, "2GiB"}},
		{"negative", podConfig(map[string]string{resourceinfo.AnnotationCPULimit: "-1"}, nil), []string{resourceinfo.AnnotationCPULimit, "-1"}},
		{"beyond int64", podConfig(map[string]string{resourceinfo.AnnotationPidLimit: "9223372036854775808"}, nil), []string{resourceinfo.AnnotationPidLimit}},
		{"quota without period", podConfig(nil, &runtime.LinuxContainerResources{CpuQuota: 50000}), []string{"linux.resources.cpu_quota", "50000"}},
		{"1 MiB value", podConfig(map[string]string{resourceinfo.AnnotationMemoryLimit: strings.Repeat("9", 1<<20)}, nil), []string{resourceinfo.AnnotationMemoryLimit}},
		{"unicode digits", podConfig(map[string]string{resourceinfo.AnnotationCPULimit: "٢"}, nil), []string{resourceinfo.AnnotationCPULimit}},
		{"NaN", podConfig(map[string]string{resourceinfo.AnnotationCPULimit: "NaN"}, nil), []string{resourceinfo.AnnotationCPULimit, "NaN"}},
		{"negative shares", podConfig(nil, &runtime.LinuxContainerResources{CpuShares: -5}), []string{"linux.resources.cpu_shares"}},
		{"hostname with a newline", withPod(podConfig(nil, nil), func(c *runtime.PodSandboxConfig) { c.Hostname = "h\n127.0.0.1 evil" }), []string{"hostname"}},
		{"dns server with a newline", withPod(podConfig(nil, nil), func(c *runtime.PodSandboxConfig) {
			c.DnsConfig = &runtime.DNSConfig{Servers: []string{"8.8.8.8\nnameserver 6.6.6.6" + strings.Repeat("x", 1<<20)}}
		}), []string{"dns_config.servers[0]"}},
		{"sysctl traversal", withPod(podConfig(nil, nil), func(c *runtime.PodSandboxConfig) {
			c.Linux = &runtime.LinuxPodSandboxConfig{Sysctls: map[string]string{"net/../../etc/" + strings.Repeat("x", 200): "1"}}
		}), []string{"linux.sysctls"}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			root := t.TempDir()
			c := newController(t, root, slot.New())
			err := create(ctx, c, "bad", tc.cfg)
			require.Error(t, err)
			assert.True(t, errdefs.IsInvalidArgument(err), "got %v", err)
			for _, s := range tc.wantMsg {
				assert.Contains(t, err.Error(), s)
			}
			assert.Less(t, len(err.Error()), 512, "the error repeats a bounded part of the input")
			assert.Empty(t, sandboxDirs(t, root))
			_, err = c.Status(ctx, "bad", false)
			assert.True(t, errdefs.IsNotFound(err))
		})
	}
}

// The backend gets the pod's hostname, DNS and sysctls from the
// PodSandboxConfig, and a zero Pod from a client that sends none.
func TestCreatePassesThePod(t *testing.T) {
	ctx := context.Background()
	b := newFaulty()
	c := newController(t, t.TempDir(), b)
	cfg := podConfig(nil, nil)
	cfg.Hostname = "test-hostname"
	cfg.DnsConfig = &runtime.DNSConfig{Servers: []string{"8.8.8.8"}, Searches: []string{"google.com"}, Options: []string{"timeout:1"}}
	cfg.Linux = &runtime.LinuxPodSandboxConfig{Sysctls: map[string]string{"kernel.shm_rmid_forced": "1"}}
	require.NoError(t, create(ctx, c, "sb1", cfg))
	require.NoError(t, create(ctx, c, "sb2", nil))
	require.NoError(t, c.CreatePod(ctx, "sb3", podConfig(nil, nil)))
	b.mu.Lock()
	pods := b.pods
	b.mu.Unlock()
	assert.Equal(t, []backend.Pod{{
		Hostname: "test-hostname",
		DNS:      &backend.DNS{Servers: []string{"8.8.8.8"}, Searches: []string{"google.com"}, Options: []string{"timeout:1"}},
		Sysctls:  map[string]string{"kernel.shm_rmid_forced": "1"},
	}, {}, {}}, pods)
	// A copy: the backend may keep it.
	cfg.DnsConfig.Servers[0] = "x"
	cfg.Linux.Sysctls["kernel.shm_rmid_forced"] = "0"
	assert.Equal(t, "8.8.8.8", pods[0].DNS.Servers[0])
	assert.Equal(t, "1", pods[0].Sysctls["kernel.shm_rmid_forced"])
}

// A start that fails, or that its caller cancels (crictl runp timing out
// while a VM boots), removes the sandbox and what the backend holds for
// it: containerd does not ask for a ShutdownSandbox after a failed
// StartSandbox. Its cleanup does not use the cancelled context. A later
// Shutdown is NotFound (containerd takes it for done). When the removal
// fails, the sandbox stays for a Shutdown.
func TestFailedStartRemovesTheSandbox(t *testing.T) {
	root := t.TempDir()
	b := newFaulty()
	c := newController(t, root, b)
	cancelled, cancel := context.WithCancel(context.Background())
	b.startHook = func(ctx context.Context) error {
		cancel() // the client gives up while the VM boots
		<-ctx.Done()
		return fmt.Errorf("waiting for the guest: %w", ctx.Err())
	}
	ctx := context.Background()
	require.NoError(t, create(ctx, c, "sb", podConfig(map[string]string{resourceinfo.AnnotationCPULimit: "1"}, nil)))
	_, err := c.Start(cancelled, "sb")
	require.ErrorIs(t, err, context.Canceled)
	b.mu.Lock()
	deletes := b.calls["delete"]
	b.mu.Unlock()
	assert.Equal(t, 1, deletes, "the backend's sandbox is deleted")
	_, err = c.Status(ctx, "sb", false)
	assert.True(t, errdefs.IsNotFound(err), "%v", err)
	assert.Empty(t, sandboxDirs(t, root), "no directory left")
	assert.Empty(t, c.List())
	assert.True(t, errdefs.IsNotFound(c.Shutdown(ctx, "sb")), "a later Shutdown is NotFound")
	// The ID can be used again.
	b.startHook = nil
	require.NoError(t, create(ctx, c, "sb", nil))
	_, err = c.Start(ctx, "sb")
	require.NoError(t, err)
	require.NoError(t, c.Shutdown(ctx, "sb"))

	// The removal fails: the sandbox stays created, and Shutdown removes
	// it later.
	require.NoError(t, create(ctx, c, "sb2", nil))
	b.fail("start", errors.New("boom"))
	b.fail("delete", errors.New("libvirtd away"))
	_, err = c.Start(ctx, "sb2")
	require.Error(t, err)
	st, err := c.Status(ctx, "sb2", false)
	require.NoError(t, err)
	assert.Equal(t, StateNotReady, st.State)
	b.fail("delete", nil)
	require.NoError(t, c.Shutdown(ctx, "sb2"))
	assert.Empty(t, sandboxDirs(t, root))
}

func TestBackendFailureRollsBack(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	b := newFaulty()
	c := newController(t, root, b)

	b.fail("create", errors.New("boom"))
	require.Error(t, create(ctx, c, "sb", nil))
	assert.Empty(t, sandboxDirs(t, root), "failed create leaves no directory")
	b.fail("create", nil)

	require.NoError(t, create(ctx, c, "sb", nil))
	b.fail("start", errors.New("boom"))
	_, err := c.Start(ctx, "sb")
	require.Error(t, err)
	_, err = c.Status(ctx, "sb", false)
	assert.True(t, errdefs.IsNotFound(err), "a failed start removes the sandbox: %v", err)
	assert.Empty(t, sandboxDirs(t, root), "failed start leaves no directory")
	b.fail("start", nil)
	require.NoError(t, create(ctx, c, "sb", nil))
	_, err = c.Start(ctx, "sb")
	require.NoError(t, err)

	before, err := os.ReadFile(filepath.Join(root, "sb", ResourceInfoFile))
	require.NoError(t, err)
	b.fail("update", errors.New("boom"))
	err = c.SetContainer(ctx, "sb", "c1", &resourceinfo.Resources{CPULimit: ptrTo(1.0)})
	require.Error(t, err)
	after, err := os.ReadFile(filepath.Join(root, "sb", ResourceInfoFile))
	require.NoError(t, err)
	assert.Equal(t, string(before), string(after), "failed update changes nothing on disk")
	v, err := c.Get("sb")
	require.NoError(t, err)
	assert.Empty(t, v.State.Containers, "failed update changes nothing in memory")
}

func ptrTo[T any](v T) *T { return &v }

func TestContainerAggregation(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := newController(t, root, slot.New())
	require.NoError(t, create(ctx, c, "sb", podConfig(nil, nil)))
	_, err := c.Start(ctx, "sb")
	require.NoError(t, err)

	steps := []struct {
		desc    string
		id      string
		res     *resourceinfo.Resources
		wantCPU any
		wantMem any
	}{
		{"one limited", "a", &resourceinfo.Resources{CPULimit: ptrTo(0.5), MemoryLimit: ptrTo(int64(256 << 20))}, 0.5, float64(256 << 20)},
		{"two limited", "b", &resourceinfo.Resources{CPULimit: ptrTo(1.5), MemoryLimit: ptrTo(int64(256 << 20))}, 2.0, float64(512 << 20)},
		{"one unlimited makes the pod unlimited", "c", &resourceinfo.Resources{}, nil, nil},
		{"unlimited removed", "c", nil, 2.0, float64(512 << 20)},
		{"resized", "b", &resourceinfo.Resources{CPULimit: ptrTo(0.5), MemoryLimit: ptrTo(int64(128 << 20))}, 1.0, float64(384 << 20)},
		{"removed", "a", nil, 0.5, float64(128 << 20)},
		{"last removed", "b", nil, nil, nil},
	}
	for _, s := range steps {
		require.NoError(t, c.SetContainer(ctx, "sb", s.id, s.res), s.desc)
		m := readInfo(t, root, "sb")
		assert.Equal(t, s.wantCPU, m["cpu_limit"], s.desc)
		assert.Equal(t, s.wantMem, m["memory_limit"], s.desc)
	}
	assert.True(t, errdefs.IsInvalidArgument(c.SetContainer(ctx, "sb", "../x", &resourceinfo.Resources{})))
}

func TestUpdatedResourcesExtension(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := newController(t, root, slot.New())
	require.NoError(t, create(ctx, c, "sb", podConfig(nil, &runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 100000, MemoryLimitInBytes: 1 << 30})))
	_, err := c.Start(ctx, "sb")
	require.NoError(t, err)
	assert.Equal(t, 1.0, readInfo(t, root, "sb")["cpu_limit"])

	// What containerd's CRI (>= 2.2) sends on UpdatePodSandboxResources.
	ext, err := typeurl.MarshalAny(&updatedResources{
		Resources: &runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 250000, MemoryLimitInBytes: 3 << 30},
		Overhead:  &runtime.LinuxContainerResources{MemoryLimitInBytes: 64 << 20},
	})
	require.NoError(t, err)
	err = c.Update(ctx, "sb", sandbox.Sandbox{ID: "sb", Extensions: map[string]typeurl.Any{UpdatedResourcesKey: ext}}, "extensions")
	require.NoError(t, err)
	m := readInfo(t, root, "sb")
	assert.Equal(t, 2.5, m["cpu_limit"])
	// The pod cgroup holds the overhead on top (ResourceConfigForPod).
	assert.Equal(t, float64(3<<30+64<<20), m["memory_limit"])
	assert.Equal(t, float64(64<<20), m["overhead"].(map[string]any)["memory_limit"])

	bad, err := typeurl.MarshalAny(&updatedResources{Resources: &runtime.LinuxContainerResources{CpuQuota: 5}})
	require.NoError(t, err)
	err = c.Update(ctx, "sb", sandbox.Sandbox{ID: "sb", Extensions: map[string]typeurl.Any{UpdatedResourcesKey: bad}}, "extensions")
	assert.True(t, errdefs.IsInvalidArgument(err), "got %v", err)
	assert.Equal(t, 2.5, readInfo(t, root, "sb")["cpu_limit"], "rejected update changes nothing")

	// Updates that carry no resources are accepted and change nothing.
	require.NoError(t, c.Update(ctx, "sb", sandbox.Sandbox{ID: "sb", Labels: map[string]string{"a": "b"}}, "labels"))
}

func TestConcurrentCallsOnOneSandbox(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := newController(t, root, slot.New())
	require.NoError(t, create(ctx, c, "sb", nil))
	_, err := c.Start(ctx, "sb")
	require.NoError(t, err)

	const n = 50
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res := &resourceinfo.Resources{CPULimit: ptrTo(0.1), MemoryLimit: ptrTo(int64(1 << 20))}
			assert.NoError(t, c.SetContainer(ctx, "sb", fmt.Sprintf("c%d", i), res))
			_, err := c.Status(ctx, "sb", true)
			assert.NoError(t, err)
		}()
	}
	wg.Wait()
	m := readInfo(t, root, "sb")
	assert.InDelta(t, 5.0, m["cpu_limit"], 1e-9, "every concurrent change is counted")
	assert.Equal(t, float64(n<<20), m["memory_limit"])
	assert.Len(t, m["containers"], n)
}

func TestConcurrentCreatesOfOneID(t *testing.T) {
	ctx := context.Background()
	c := newController(t, t.TempDir(), slot.New())
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok, exists := 0, 0
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := create(ctx, c, "same", nil)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok++
			case errdefs.IsAlreadyExists(err):
				exists++
			default:
				t.Errorf("unexpected error %v", err)
			}
		}()
	}
	wg.Wait()
	assert.Equal(t, 1, ok)
	assert.Equal(t, 19, exists)
}

func TestShutdownEndsWaiters(t *testing.T) {
	ctx := context.Background()
	c := newController(t, t.TempDir(), slot.New())
	require.NoError(t, create(ctx, c, "sb", nil))
	_, err := c.Start(ctx, "sb")
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { _, err := c.Wait(ctx, "sb"); done <- err }()
	time.Sleep(100 * time.Millisecond) // let Wait begin: after Shutdown it is NotFound
	require.NoError(t, c.Shutdown(ctx, "sb"))
	select {
	case err := <-done:
		assert.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Wait did not return after Shutdown")
	}

	// BeginShutdown ends Wait with Unavailable, which containerd retries.
	require.NoError(t, create(ctx, c, "sb2", nil))
	go func() { _, err := c.Wait(ctx, "sb2"); done <- err }()
	time.Sleep(20 * time.Millisecond)
	c.BeginShutdown()
	select {
	case err := <-done:
		assert.True(t, errdefs.IsUnavailable(err), "got %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("Wait did not return after BeginShutdown")
	}
}

func TestManyAnnotations(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := newController(t, root, slot.New())
	a := map[string]string{resourceinfo.AnnotationPidLimit: "100"}
	for i := range 10000 {
		a[fmt.Sprintf("example.com/key-%d", i)] = "value"
	}
	require.NoError(t, create(ctx, c, "sb", podConfig(a, nil)))
	assert.Equal(t, 100.0, readInfo(t, root, "sb")["pid_limit"])
}
