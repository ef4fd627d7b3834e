package slotctl_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/sandbox"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/admin"
	"github.com/kuasar-io/resource-slot-sandboxer/admin/api"
	"github.com/kuasar-io/resource-slot-sandboxer/capacity"
	"github.com/kuasar-io/resource-slot-sandboxer/cost"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/httpserve"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/unixsock"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
	"github.com/kuasar-io/resource-slot-sandboxer/slotctl"
)

type env struct {
	sock  string
	ctrl  *sandboxer.Controller
	tasks *sandboxer.Tasks
}

// newEnv serves the admin API of a real controller (slot mode, capacity
// of 4 cores enforced) on a unix socket.
func newEnv(t *testing.T) *env {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	adm, err := capacity.New(capacity.Config{CPU: 4, Memory: 8 << 30, Pids: 1000, Policy: capacity.Enforce})
	require.NoError(t, err)
	ctrl, err := sandboxer.New(sandboxer.Options{Root: t.TempDir(), Backend: slot.New(), Admitter: adm})
	require.NoError(t, err)
	e := &env{sock: filepath.Join(t.TempDir(), "admin.sock"), ctrl: ctrl, tasks: sandboxer.NewTasks(ctx, ctrl, nil)}
	lis, err := unixsock.Listen(e.sock)
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		httpserve.Serve(ctx, lis, admin.Handler(admin.Options{Controller: ctrl, Admitter: adm,
			Prices: cost.Prices{CPUCoreHour: 0.05, Currency: "USD"}}))
	}()
	t.Cleanup(func() { cancel(); <-done; e.tasks.Close() })
	return e
}

func (e *env) create(t *testing.T, id string, a map[string]string) {
	t.Helper()
	require.NoError(t, e.ctrl.Create(context.Background(), sandbox.Sandbox{ID: id}, sandbox.WithAnnotations(a)))
	_, err := e.ctrl.Start(context.Background(), id)
	require.NoError(t, err)
}

// run runs slotctl against the env's socket.
func (e *env) run(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	return runCtx(context.Background(), append([]string{"--socket", e.sock}, args...)...)
}

func runCtx(ctx context.Context, args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := slotctl.Main(ctx, args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestList(t *testing.T) {
	e := newEnv(t)
	code, out, errOut := e.run(t, "list")
	require.Equal(t, 0, code, errOut)
	assert.Equal(t, "ID  MODE  PHASE  CREATED  STARTED  CPU  CPU-REQ  MEMORY  MEMORY-REQ  PIDS  CONTAINERS\n", out)

	e.create(t, "pod-a", map[string]string{
		resourceinfo.AnnotationCPULimit: "2", resourceinfo.AnnotationCPURequest: "500m",
		resourceinfo.AnnotationMemoryLimit: "2Gi", resourceinfo.AnnotationPidLimit: "1000",
	})
	code, out, _ = e.run(t, "list")
	require.Equal(t, 0, code)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 2)
	assert.Regexp(t, `^pod-a\s+slot\s+ready\s+\d+s\s+\d+s\s+2\s+0.5\s+2Gi\s+-\s+1000\s+0$`, lines[1])

	// -o json, before or after the command.
	for _, args := range [][]string{{"-o", "json", "list"}, {"list", "-o", "json"}, {"list", "--output=json"}} {
		code, out, errOut = e.run(t, args...)
		require.Equal(t, 0, code, errOut)
		var list []api.Sandbox
		require.NoError(t, json.Unmarshal([]byte(out), &list), out)
		require.Len(t, list, 1)
		assert.Equal(t, "pod-a", list[0].ID)
		assert.Equal(t, 2.0, *list[0].Limits.CPU)
	}
}

func TestResources(t *testing.T) {
	e := newEnv(t)
	e.create(t, "pod-a", map[string]string{resourceinfo.AnnotationCPULimit: "1", resourceinfo.AnnotationMemoryLimit: "1Gi"})

	code, out, errOut := e.run(t, "resources", "limits", "pod-a")
	require.Equal(t, 0, code, errOut)
	assert.Regexp(t, `(?m)^cpu\s+1\s+-\s+annotation$`, out)
	assert.Regexp(t, `(?m)^memory\s+1Gi\s+-\s+annotation$`, out)
	assert.Regexp(t, `(?m)^pids\s+-\s+-\s+-$`, out)

	// set, with flags after the ID
	code, out, errOut = e.run(t, "resources", "set", "pod-a", "--cpu", "2", "--memory", "2Gi", "--pids", "500", "--cpu-request", "250m", "--memory-request=512Mi")
	require.Equal(t, 0, code, errOut)
	assert.Regexp(t, `(?m)^cpu\s+2\s+0.25\s+annotation$`, out)
	assert.Regexp(t, `(?m)^memory\s+2Gi\s+512Mi\s+annotation$`, out)
	assert.Regexp(t, `(?m)^pids\s+500\s+-\s+annotation$`, out)
	ri, err := sandboxer.ReadResourceInfo(e.ctrl.Dir("pod-a"))
	require.NoError(t, err)
	assert.Equal(t, 2.0, *ri.CPULimit)
	assert.Equal(t, int64(2<<30), *ri.MemoryLimit)
	assert.Equal(t, int64(500), *ri.PidLimit)

	code, out, _ = e.run(t, "-o", "json", "resources", "set", "pod-a", "--pids", "none")
	require.Equal(t, 0, code)
	var l api.Limits
	require.NoError(t, json.Unmarshal([]byte(out), &l))
	assert.Nil(t, l.Limits.Pids)

	// usage, with a simulated container
	k := sandboxer.TaskKey{Namespace: "k8s.io", ID: "c1"}
	_, err = e.tasks.Create(context.Background(), sandboxer.TaskSpec{Key: k, SandboxID: "pod-a",
		Spec: &specs.Spec{Annotations: map[string]string{slot.AnnotationCPUUsage: "500m", slot.AnnotationMemoryUsage: "512Mi"}}})
	require.NoError(t, err)
	_, err = e.tasks.Start(context.Background(), k, "")
	require.NoError(t, err)
	code, out, errOut = e.run(t, "resources", "usage", "pod-a")
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, "sandbox pod-a: ready, slot mode, simulated usage at ")
	assert.Regexp(t, `(?m)^cpu \(cores\)\s+0.5\s+2\s+25%$`, out)
	assert.Regexp(t, `(?m)^memory\s+512Mi\s+2Gi\s+25%$`, out)
	assert.Regexp(t, `(?m)^pids\s+1\s+-\s+-$`, out)
	code, out, _ = e.run(t, "resources", "usage", "pod-a", "-o", "json")
	require.Equal(t, 0, code)
	var u api.Usage
	require.NoError(t, json.Unmarshal([]byte(out), &u))
	assert.Equal(t, uint64(512<<20), *u.MemoryBytes)
}

func TestCapacityAndCost(t *testing.T) {
	e := newEnv(t)
	e.create(t, "pod-a", map[string]string{resourceinfo.AnnotationCPULimit: "3", resourceinfo.AnnotationMemoryLimit: "1Gi"})

	code, out, errOut := e.run(t, "capacity")
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, "policy enforce, 1 sandboxes hold resources")
	assert.Regexp(t, `(?m)^cpu\s+4\s+1\s+4\s+3\s+0\s+3\s+0\s+1\s+75%$`, out)
	assert.Regexp(t, `(?m)^memory\s+8Gi\s+1\s+8Gi\s+1Gi\s+0\s+1Gi\s+0\s+7Gi\s+12.5%$`, out)
	assert.Regexp(t, `(?m)^pids\s+1000\s+1\s+1000\s+0\s+-\s+0\s+1\s+1000\s+0%$`, out)

	// A resize that does not fit: one line, exit 1.
	code, _, errOut = e.run(t, "resources", "set", "pod-a", "--cpu", "5")
	assert.Equal(t, 1, code)
	assert.Equal(t, "slotctl: sandbox pod-a does not fit the node: cpu: request 5 cores exceeds the free 4 of 4 (capacity 4 × overcommit 1): resource exhausted\n", errOut)
	code, out, _ = e.run(t, "capacity")
	require.Equal(t, 0, code)
	assert.Regexp(t, `(?m)^REJECTED\s+POLICY\s+COUNT\n^cpu\s+enforce\s+1$`, out)

	code, out, _ = e.run(t, "capacity", "-o", "json")
	require.Equal(t, 0, code)
	var c api.Capacity
	require.NoError(t, json.Unmarshal([]byte(out), &c))
	assert.Equal(t, 3.0, c.Resources[0].Allocated)

	code, out, errOut = e.run(t, "cost")
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, "prices per hour (USD): cpu core 0.05, memory GiB 0, pid 0, storage GiB 0")
	assert.Regexp(t, `(?m)^SANDBOX\s+PHASE\s+CPU-CORE-H\s+MEMORY-GIB-H\s+PID-H\s+STORAGE-GIB-H\s+COST \(USD\)$`, out)
	assert.Regexp(t, `(?m)^pod-a\s+ready\s+[\d.]+\s+[\d.]+\s+0\s+0\s+\d+\.\d{4}$`, out)
	assert.Regexp(t, `(?m)^TOTAL\s+`, out)
	code, out, _ = e.run(t, "cost", "-o", "json")
	require.Equal(t, 0, code)
	var cs api.Cost
	require.NoError(t, json.Unmarshal([]byte(out), &cs))
	assert.Len(t, cs.Sandboxes, 1)
}

func TestErrors(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"resources", "limits", "nope"}, "slotctl: sandbox nope not found\n"},
		{[]string{"resources", "usage", "nope"}, "slotctl: sandbox nope not found\n"},
		{[]string{"resources", "watch", "nope"}, "slotctl: sandbox nope not found\n"},
		{[]string{"resources", "set", "nope", "--cpu", "1"}, "slotctl: sandbox nope not found\n"},
		{[]string{"resources", "set", "nope"}, "slotctl: resources set: give at least one of --cpu, --memory, --pids, --cpu-request, --memory-request, --storage\n"},
		{[]string{"resources", "limits"}, "slotctl: usage: slotctl resources limits ID\n"},
		{[]string{"resources", "limits", "a", "b"}, "slotctl: usage: slotctl resources limits ID\n"},
		{[]string{"resources"}, "slotctl: resources: want limits, usage, watch or set (see slotctl --help)\n"},
		{[]string{"resources", "grow", "a"}, "slotctl: unknown command \"resources grow\" (see slotctl --help)\n"},
		{[]string{"frobnicate"}, "slotctl: unknown command \"frobnicate\" (see slotctl --help)\n"},
		{[]string{"list", "extra"}, "slotctl: unexpected arguments after \"list\": extra\n"},
		{[]string{"list", "--cpu", "1"}, "slotctl: --cpu applies to \"resources set\" only\n"},
		{[]string{"list", "--interval", "1s"}, "slotctl: --interval applies to \"resources watch\" only\n"},
		{[]string{"-o", "yaml", "list"}, "slotctl: -o \"yaml\": want table or json\n"},
		{[]string{"list", "--bogus"}, "slotctl: flag provided but not defined: -bogus (see slotctl --help)\n"},
		{[]string{"resources", "watch", "a", "--interval", "0s"}, "slotctl: --interval 0s must be positive\n"},
		{[]string{}, "slotctl: no command (see slotctl --help)\n"},
	} {
		code, out, errOut := e.run(t, tc.args...)
		assert.Equal(t, 1, code, tc.args)
		assert.Empty(t, out, tc.args)
		assert.Equal(t, tc.want, errOut, tc.args)
	}
	e.create(t, "a", nil)
	code, _, errOut := e.run(t, "resources", "set", "a", "--memory", "2Gigs")
	assert.Equal(t, 1, code)
	assert.True(t, strings.HasPrefix(errOut, `slotctl: invalid argument: resources.limits.memory="2Gigs": not a Kubernetes quantity`), errOut)
	assert.Equal(t, 1, strings.Count(errOut, "\n"))

	// No daemon.
	code, _, errOut = runCtx(context.Background(), "--socket", filepath.Join(t.TempDir(), "absent.sock"), "list")
	assert.Equal(t, 1, code)
	assert.Contains(t, errOut, "absent.sock: no such file or directory (is resource-slot-sandboxer running?")
	assert.Equal(t, 1, strings.Count(errOut, "\n"))

	// The socket from the environment.
	t.Setenv("SLOTCTL_SOCKET", e.sock)
	code, _, errOut = runCtx(context.Background(), "list")
	assert.Equal(t, 0, code, errOut)
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}, {"list", "-h"}} {
		code, out, errOut := runCtx(context.Background(), args...)
		assert.Equal(t, 0, code, args)
		assert.Empty(t, errOut)
		assert.Equal(t, slotctl.Usage, out)
	}
}

// TestWatch: the usage is redrawn in place (cursor home, clear) every
// interval until the context ends.
func TestWatch(t *testing.T) {
	e := newEnv(t)
	e.create(t, "pod-a", map[string]string{resourceinfo.AnnotationCPULimit: "1"})
	ctx, cancel := context.WithTimeout(context.Background(), 350*time.Millisecond)
	defer cancel()
	code, out, errOut := runCtx(ctx, "--socket", e.sock, "resources", "watch", "pod-a", "--interval", "100ms")
	assert.Equal(t, 0, code, errOut)
	frames := strings.Count(out, "\x1b[H\x1b[2J")
	assert.GreaterOrEqual(t, frames, 3)
	assert.LessOrEqual(t, frames, 5)
	assert.Equal(t, frames, strings.Count(out, "Every 100ms: slotctl resources usage pod-a"))
	assert.Contains(t, out, "cpu (cores)")

	// JSON: one object per interval.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 250*time.Millisecond)
	defer cancel2()
	code, out, _ = runCtx(ctx2, "--socket", e.sock, "-o", "json", "resources", "watch", "pod-a", "--interval", "100ms")
	assert.Equal(t, 0, code)
	dec := json.NewDecoder(strings.NewReader(out))
	n := 0
	for dec.More() {
		var u api.Usage
		require.NoError(t, dec.Decode(&u))
		n++
	}
	assert.GreaterOrEqual(t, n, 2)

	// The sandbox goes away: the watch ends with the error.
	ctx3, cancel3 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel3()
	go func() {
		time.Sleep(150 * time.Millisecond)
		e.ctrl.Shutdown(context.Background(), "pod-a")
	}()
	code, _, errOut = runCtx(ctx3, "--socket", e.sock, "resources", "watch", "pod-a", "--interval", "50ms")
	assert.Equal(t, 1, code)
	assert.Equal(t, "slotctl: sandbox pod-a not found\n", errOut)
	assert.NoError(t, ctx3.Err(), "ended by the error, not the timeout")
}

func TestMain(m *testing.M) {
	os.Unsetenv("SLOTCTL_SOCKET")
	os.Exit(m.Run())
}
