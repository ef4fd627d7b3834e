package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	api "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/containerd/v2/core/sandbox/proxy"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// crashModel is what a client was told about one sandbox: its last
// acknowledged state and, if a call on it got no answer because the daemon
// was killed, the state that call would have led to.
type crashModel struct {
	exists, ready bool
	cpu           float64 // acknowledged cpu_limit, 0 for none
	pending       *crashModel
}

// updatedResources is what containerd's CRI sends on a pod resize.
type updatedResources struct {
	Overhead  *runtime.LinuxContainerResources
	Resources *runtime.LinuxContainerResources
}

func init() {
	typeurl.Register(&updatedResources{}, "io.containerd.cri.v1", "UpdatedResources")
}

// TestCrashConsistency kills the sandboxer with SIGKILL at random moments
// while sandboxes are created, started, resized and removed through its
// own API and through containerd, restarts it, and checks that every
// sandbox is as the clients were last told (or as the call cut short would
// have left it), that a torn spare is never read and that containerd
// agrees.
func TestCrashConsistency(t *testing.T) {
	rounds, perRound := 20, 10
	if n, err := strconv.Atoi(os.Getenv("RSS_CRASH_ROUNDS")); err == nil && n > 0 {
		rounds = n
	}
	conn, err := grpc.NewClient("unix://"+h.SandboxerSock(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	ctrl := proxy.NewSandboxController(api.NewControllerClient(conn), "resource-slot")

	direct := map[string]*crashModel{}
	viaCRI := map[string]*crashModel{} // by pod ID; only acknowledged ones
	total, torn := 0, 0
	for round := range rounds {
		var wg sync.WaitGroup
		var mu sync.Mutex
		stop := make(chan struct{})
		// Direct API workers: each owns its sandboxes, one call at a time.
		for w := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range perRound {
					id := fmt.Sprintf("crash-r%d-w%d-%d", round, w, i)
					m := &crashModel{}
					mu.Lock()
					direct[id] = m
					mu.Unlock()
					if !crashLifecycle(t, ctrl, id, m, &mu, stop) {
						return
					}
				}
			}()
		}
		// containerd workers.
		for w := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					cfg := podConfig(fmt.Sprintf("crash-%d-%d-%d", round, w, i), map[string]string{"resources.limits.cpu": "3"}, nil)
					resp, err := h.cri.RunPodSandbox(context.Background(), &runtime.RunPodSandboxRequest{Config: cfg, RuntimeHandler: "resource-slot"})
					if err != nil {
						return
					}
					m := &crashModel{exists: true, ready: true, cpu: 3}
					mu.Lock()
					viaCRI[resp.PodSandboxId] = m
					mu.Unlock()
					if i%2 == 0 {
						continue // keep some
					}
					mu.Lock()
					m.pending = &crashModel{exists: true, cpu: 3}
					mu.Unlock()
					if _, err := h.cri.StopPodSandbox(context.Background(), &runtime.StopPodSandboxRequest{PodSandboxId: resp.PodSandboxId}); err != nil {
						return
					}
					mu.Lock()
					*m = crashModel{exists: true, cpu: 3, pending: &crashModel{}}
					mu.Unlock()
					if _, err := h.cri.RemovePodSandbox(context.Background(), &runtime.RemovePodSandboxRequest{PodSandboxId: resp.PodSandboxId}); err != nil {
						return
					}
					mu.Lock()
					*m = crashModel{}
					mu.Unlock()
				}
			}()
		}
		time.Sleep(time.Duration(50+rand.IntN(400)) * time.Millisecond)
		require.NoError(t, h.stopSandboxer(syscall.SIGKILL))
		close(stop)
		wg.Wait()
		// A write the kill interrupted leaves a torn spare (the file the
		// next content of resource_info.json or state.json is written to
		// before it is exchanged with it). Tear every spare: recovery must
		// never read one, and the next write through one must leave a
		// whole file (checked by this round's and the next rounds' reads).
		torn += tearSpares(t)
		require.NoError(t, h.startSandboxer())
		total += 4 * perRound

		mu.Lock()
		checkCrashState(t, round, direct, viaCRI)
		mu.Unlock()
		if t.Failed() {
			return
		}
	}
	t.Logf("%d rounds, %d sandboxes through the sandbox API and %d through containerd, all as acknowledged; %d spares torn", rounds, len(direct), len(viaCRI), torn)
	assert.Positive(t, torn, "no spare was there to tear: the check of torn spares checked nothing")

	// Clean up everything, including what no client was told about (a
	// runp cut short), so later tests start from an empty node.
	ctx := context.Background()
	h.waitContainerdReconnects(t)
	resp, err := h.cri.ListPodSandbox(ctx, &runtime.ListPodSandboxRequest{})
	require.NoError(t, err)
	for _, p := range resp.Items {
		if strings.HasPrefix(p.Metadata.Name, "crash-") {
			h.cri.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: p.Id})
			h.cri.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: p.Id})
		}
	}
	entries, err := os.ReadDir(h.StateDir())
	require.NoError(t, err)
	for _, e := range entries {
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
			if err := ctrl.Shutdown(ctx, e.Name()); err != nil && !errdefs.IsNotFound(err) {
				t.Errorf("clean up %s: %v", e.Name(), err)
			}
		}
	}
}

// crashLifecycle runs create, start, resizes, stop and shutdown of one
// sandbox, recording each acknowledgement; it returns false once the
// daemon is gone.
func crashLifecycle(t *testing.T, ctrl sandbox.Controller, id string, m *crashModel, mu *sync.Mutex, stop <-chan struct{}) bool {
	ctx := context.Background()
	step := func(next crashModel, call func() error) bool {
		select {
		case <-stop:
			return false
		default:
		}
		mu.Lock()
		m.pending = &next
		mu.Unlock()
		err := call()
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			if errdefs.IsUnavailable(err) || strings.Contains(err.Error(), "connection") || strings.Contains(err.Error(), "EOF") {
				return false // the daemon was killed: leave pending set
			}
			t.Errorf("%s: %v", id, err)
			return false
		}
		*m = next
		return true
	}
	cfg := podConfig(id, map[string]string{}, &runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 100000})
	if !step(crashModel{exists: true, cpu: 1}, func() error {
		return ctrl.Create(ctx, sandbox.Sandbox{ID: id}, sandbox.WithOptions(cfg))
	}) {
		return false
	}
	if !step(crashModel{exists: true, ready: true, cpu: 1}, func() error { _, err := ctrl.Start(ctx, id); return err }) {
		return false
	}
	for k := 2; k <= 4; k++ {
		ext, err := typeurl.MarshalAny(&updatedResources{Resources: &runtime.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: int64(k) * 100000}})
		if err != nil {
			t.Error(err)
			return false
		}
		if !step(crashModel{exists: true, ready: true, cpu: float64(k)}, func() error {
			return ctrl.Update(ctx, id, sandbox.Sandbox{ID: id, Extensions: map[string]typeurl.Any{"updated-resources": ext}}, "extensions")
		}) {
			return false
		}
	}
	if rand.IntN(2) == 0 {
		return true // keep it running
	}
	if !step(crashModel{exists: true, cpu: 4}, func() error { return ctrl.Stop(ctx, id) }) {
		return false
	}
	return step(crashModel{}, func() error { return ctrl.Shutdown(ctx, id) })
}

func checkCrashState(t *testing.T, round int, direct, viaCRI map[string]*crashModel) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+h.SandboxerSock(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	ctrl := proxy.NewSandboxController(api.NewControllerClient(conn), "resource-slot")
	matches := func(id string, m crashModel) bool {
		dir := filepath.Join(h.StateDir(), id)
		_, statErr := os.Stat(dir)
		st, err := ctrl.Status(context.Background(), id, false)
		if !m.exists {
			return os.IsNotExist(statErr) && errdefs.IsNotFound(err)
		}
		if err != nil {
			return false
		}
		// resource_info.json is up to date when a call returns.
		data, err := os.ReadFile(filepath.Join(dir, "resource_info.json"))
		if err != nil {
			return false
		}
		var info map[string]any
		if json.Unmarshal(data, &info) != nil {
			return false
		}
		cpu, _ := info["cpu_limit"].(float64)
		return cpu == m.cpu && (st.State == "SANDBOX_READY") == m.ready
	}
	for _, models := range []map[string]*crashModel{direct, viaCRI} {
		for id, m := range models {
			ok := matches(id, *m)
			if !ok && m.pending != nil {
				ok = matches(id, *m.pending)
			}
			if ok && m.pending != nil {
				// Settle the model on what the daemon kept.
				if matches(id, *m.pending) {
					*m = *m.pending
				}
				m.pending = nil
			}
			assert.True(t, ok, "round %d: sandbox %s is not as acknowledged (%+v)", round, id, *m)
		}
	}
	_, err = os.Stat(filepath.Join(h.StateDir(), ".quarantine"))
	assert.True(t, os.IsNotExist(err), "round %d: nothing was quarantined", round)

	// containerd agrees: every pod it lists as ready is ready here. A stop
	// the kill cut short reaches containerd through its Wait, which it
	// re-sends to the new daemon, so agreement comes within moments.
	var disagree []string
	deadline := time.Now().Add(20 * time.Second)
	for {
		disagree = disagree[:0]
		resp, err := h.cri.ListPodSandbox(context.Background(), &runtime.ListPodSandboxRequest{})
		require.NoError(t, err)
		for _, p := range resp.Items {
			if p.State != runtime.PodSandboxState_SANDBOX_READY || p.RuntimeHandler != "resource-slot" {
				continue
			}
			st, err := ctrl.Status(context.Background(), p.Id, false)
			if err != nil || st.State != "SANDBOX_READY" {
				disagree = append(disagree, p.Id)
			}
		}
		if len(disagree) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	assert.Empty(t, disagree, "round %d: containerd lists these ready, the sandboxer does not", round)
}

// tearSpares overwrites every spare in the state directory (sandbox
// directories and pooled ones) with the start of a JSON document that
// would pass for a resource_info.json, cut short, then garbage, longer
// than any real content; it returns how many it tore.
func tearSpares(t *testing.T) int {
	t.Helper()
	torn := append([]byte(`{"cpu_limit": 99, "memory_limit": `), bytes.Repeat([]byte{0xff}, 16<<10)...)
	n := 0
	paths, err := filepath.Glob(filepath.Join(h.StateDir(), "*", ".spare-*"))
	require.NoError(t, err)
	for _, p := range paths {
		require.NoError(t, os.WriteFile(p, torn, 0o600))
		n++
	}
	return n
}
