package metrics

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	api "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/errdefs"
	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/kuasar-io/resource-slot-sandboxer/capacity"
	"github.com/kuasar-io/resource-slot-sandboxer/cost"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

const gi = 1 << 30

// values gathers every resource_slot_* sample as name{label="value",...}
// → value, labels sorted by name; histograms as _count and _sum.
func values(t *testing.T, g prometheus.Gatherer) map[string]float64 {
	t.Helper()
	mfs, err := g.Gather()
	require.NoError(t, err)
	out := map[string]float64{}
	for _, mf := range mfs {
		if !strings.HasPrefix(mf.GetName(), Namespace+"_") {
			continue
		}
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			sort.Strings(labels)
			key := mf.GetName() + "{" + strings.Join(labels, ",") + "}"
			switch {
			case m.Gauge != nil:
				out[key] = m.GetGauge().GetValue()
			case m.Counter != nil:
				out[key] = m.GetCounter().GetValue()
			case m.Histogram != nil:
				out[strings.Replace(key, "{", "_count{", 1)] = float64(m.GetHistogram().GetSampleCount())
				out[strings.Replace(key, "{", "_sum{", 1)] = m.GetHistogram().GetSampleSum()
			}
		}
	}
	return out
}

type fixture struct {
	ctrl   *sandboxer.Controller
	adm    *capacity.Admitter
	m      *Metrics
	ctl    api.ControllerClient
	tasks  taskAPI.TTRPCTaskService
	now    *time.Time
	prices cost.Prices
}

// newFixture runs a real controller behind a gRPC server and a task
// server, both with the metrics' interceptors, with an injected clock.
func newFixture(t *testing.T) *fixture {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	now := time.Date(2026, 5, 1, 8, 0, 0, 0, time.UTC)
	f := &fixture{now: &now, prices: cost.Prices{CPUCoreHour: 0.04, MemoryGiBHour: 0.01, Currency: "USD"}}
	var err error
	f.adm, err = capacity.New(capacity.Config{CPU: 4, Memory: 8 * gi, Pids: 1000, Policy: capacity.Enforce})
	require.NoError(t, err)
	f.ctrl, err = sandboxer.New(sandboxer.Options{
		Root: t.TempDir(), Backend: slot.New(), Admitter: f.adm, Now: func() time.Time { return *f.now },
	})
	require.NoError(t, err)
	f.m = New(Options{Controller: f.ctrl, Admitter: f.adm, Prices: f.prices, Now: func() time.Time { return *f.now }})

	dir := t.TempDir()
	lis, err := net.Listen("unix", filepath.Join(dir, "grpc.sock"))
	require.NoError(t, err)
	srv := grpc.NewServer(f.m.GRPCServerOptions()...)
	sandboxer.NewService(f.ctrl).Register(srv)
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("unix://"+lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	f.ctl = api.NewControllerClient(conn)

	tasks := sandboxer.NewTasks(ctx, f.ctrl, nil)
	t.Cleanup(tasks.Close)
	ts, err := sandboxer.NewTaskServer(tasks, f.m.TTRPCServerOptions()...)
	require.NoError(t, err)
	tlis, err := net.Listen("unix", filepath.Join(dir, "task.sock"))
	require.NoError(t, err)
	go ts.Serve(ctx, tlis)
	t.Cleanup(func() { ts.Stop(context.Background()) })
	tconn, err := net.Dial("unix", tlis.Addr().String())
	require.NoError(t, err)
	tc := ttrpc.NewClient(tconn)
	t.Cleanup(func() { tc.Close() })
	f.tasks = taskAPI.NewTTRPCTaskClient(tc)
	return f
}

func (f *fixture) create(ctx context.Context, id string, annotations map[string]string) error {
	_, err := f.ctl.Create(ctx, &api.ControllerCreateRequest{SandboxID: id, Annotations: annotations})
	return err
}

// TestScriptedSequence: create, start, resize, refuse, stop against a
// real controller, checking the metrics after each step.
func TestScriptedSequence(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	reg := f.m.Registry()

	// Before anything: zero sandboxes of each state, the capacity.
	require.NoError(t, testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP resource_slot_sandboxes Sandboxes the daemon knows, by state (created, ready, stopped) and mode (slot, vm).
# TYPE resource_slot_sandboxes gauge
resource_slot_sandboxes{mode="slot",state="created"} 0
resource_slot_sandboxes{mode="slot",state="ready"} 0
resource_slot_sandboxes{mode="slot",state="stopped"} 0
`), "resource_slot_sandboxes"))
	v := values(t, reg)
	assert.Equal(t, 4.0, v[`resource_slot_capacity{resource="cpu"}`])
	assert.Equal(t, 8.0*gi, v[`resource_slot_capacity{resource="memory"}`])
	assert.Equal(t, 1000.0, v[`resource_slot_capacity{resource="pids"}`])
	assert.Equal(t, 0.0, v[`resource_slot_admission_rejections_total{policy="enforce",resource="cpu"}`])

	// create
	require.NoError(t, f.create(ctx, "a", map[string]string{
		resourceinfo.AnnotationCPULimit: "2", resourceinfo.AnnotationCPURequest: "1",
		resourceinfo.AnnotationMemoryLimit: "1Gi", resourceinfo.AnnotationPidLimit: "100",
	}))
	v = values(t, reg)
	assert.Equal(t, 1.0, v[`resource_slot_sandboxes{mode="slot",state="created"}`])
	assert.Equal(t, 2.0, v[`resource_slot_allocated{resource="cpu"}`])
	assert.Equal(t, 1.0, v[`resource_slot_requested{resource="cpu"}`])
	assert.Equal(t, 2.0, v[`resource_slot_limited{resource="cpu"}`])
	assert.Equal(t, 1.0*gi, v[`resource_slot_allocated{resource="memory"}`])
	assert.Equal(t, 0.0, v[`resource_slot_requested{resource="memory"}`])
	assert.Equal(t, 100.0, v[`resource_slot_allocated{resource="pids"}`])
	assert.NotContains(t, v, `resource_slot_requested{resource="pids"}`, "pids have no requests")
	assert.Equal(t, 0.0, v[`resource_slot_cost_total{sandbox="a"}`], "created: not charged")
	assert.Equal(t, 1.0, v[`resource_slot_operation_duration_seconds_count{code="OK",method="/containerd.services.sandbox.v1.Controller/Create"}`])

	// start; an hour passes
	_, err := f.ctl.Start(ctx, &api.ControllerStartRequest{SandboxID: "a"})
	require.NoError(t, err)
	*f.now = f.now.Add(time.Hour)
	v = values(t, reg)
	assert.Equal(t, 0.0, v[`resource_slot_sandboxes{mode="slot",state="created"}`])
	assert.Equal(t, 1.0, v[`resource_slot_sandboxes{mode="slot",state="ready"}`])
	assert.Equal(t, 0.0, v[`resource_slot_sandbox_usage{resource="memory_bytes",sandbox="a"}`])
	assert.Equal(t, 0.0, v[`resource_slot_sandbox_usage{resource="cpu_cores",sandbox="a"}`])
	assert.InDelta(t, 2*0.04+1*0.01, v[`resource_slot_cost_total{sandbox="a"}`], 1e-9)

	// resize (in place, as containerd's UpdatePodSandboxResources does)
	require.NoError(t, f.ctrl.UpdateSpec(ctx, "a", func(s *resourceinfo.Spec) error {
		c := 3.0
		s.Annotations.CPULimit = &c
		return nil
	}))
	*f.now = f.now.Add(time.Hour)
	v = values(t, reg)
	assert.Equal(t, 3.0, v[`resource_slot_allocated{resource="cpu"}`])
	assert.Equal(t, 3.0, v[`resource_slot_limited{resource="cpu"}`])
	assert.InDelta(t, (2+3)*0.04+2*0.01, v[`resource_slot_cost_total{sandbox="a"}`], 1e-9)

	// refuse: 2 more cores do not fit the 1 free
	err = f.create(ctx, "b", map[string]string{resourceinfo.AnnotationCPULimit: "2"})
	require.Error(t, err)
	assert.Equal(t, codes.ResourceExhausted, status.Code(err))
	assert.Contains(t, status.Convert(err).Message(), "cpu: request 2 cores exceeds the free 1 of 4 (capacity 4 × overcommit 1)")
	v = values(t, reg)
	assert.Equal(t, 1.0, v[`resource_slot_admission_rejections_total{policy="enforce",resource="cpu"}`])
	assert.Equal(t, 0.0, v[`resource_slot_admission_rejections_total{policy="enforce",resource="memory"}`])
	assert.Equal(t, 1.0, v[`resource_slot_operation_duration_seconds_count{code="ResourceExhausted",method="/containerd.services.sandbox.v1.Controller/Create"}`])
	assert.Equal(t, 3.0, v[`resource_slot_allocated{resource="cpu"}`], "a refusal takes nothing")
	assert.Equal(t, 1.0, v[`resource_slot_sandboxes{mode="slot",state="ready"}`])
	assert.NotContains(t, v, `resource_slot_cost_total{sandbox="b"}`)

	// stop: resources are released, usage is gone, cost stays
	_, err = f.ctl.Stop(ctx, &api.ControllerStopRequest{SandboxID: "a"})
	require.NoError(t, err)
	*f.now = f.now.Add(time.Hour)
	v = values(t, reg)
	assert.Equal(t, 1.0, v[`resource_slot_sandboxes{mode="slot",state="stopped"}`])
	assert.Equal(t, 0.0, v[`resource_slot_sandboxes{mode="slot",state="ready"}`])
	assert.Equal(t, 0.0, v[`resource_slot_allocated{resource="cpu"}`])
	assert.Equal(t, 0.0, v[`resource_slot_limited{resource="memory"}`])
	assert.NotContains(t, v, `resource_slot_sandbox_usage{resource="memory_bytes",sandbox="a"}`)
	assert.InDelta(t, (2+3)*0.04+2*0.01, v[`resource_slot_cost_total{sandbox="a"}`], 1e-9, "stopped: no longer charged")

	// Now b fits.
	require.NoError(t, f.create(ctx, "b", map[string]string{resourceinfo.AnnotationCPULimit: "2"}))

	// Errors are timed with their code; the task API (ttrpc) too.
	_, err = f.ctl.Status(ctx, &api.ControllerStatusRequest{SandboxID: "nope"})
	require.Error(t, err)
	_, err = f.tasks.State(ctx, &taskAPI.StateRequest{ID: "nope"})
	require.Error(t, err)
	assert.True(t, errdefs.IsNotFound(err) || status.Code(err) == codes.NotFound, "%v", err)
	v = values(t, reg)
	assert.Equal(t, 1.0, v[`resource_slot_operation_duration_seconds_count{code="NotFound",method="/containerd.services.sandbox.v1.Controller/Status"}`])
	assert.Equal(t, 1.0, v[`resource_slot_operation_duration_seconds_count{code="NotFound",method="/containerd.task.v3.Task/State"}`])
	assert.Equal(t, 2.0, v[`resource_slot_operation_duration_seconds_count{code="OK",method="/containerd.services.sandbox.v1.Controller/Create"}`])

	n, err := testutil.GatherAndCount(reg, "resource_slot_capacity", "resource_slot_allocated", "resource_slot_requested", "resource_slot_limited")
	require.NoError(t, err)
	assert.Equal(t, 3+3+2+3, n)
	problems, err := testutil.GatherAndLint(reg)
	require.NoError(t, err)
	for _, p := range problems {
		if strings.HasPrefix(p.Metric, Namespace) {
			t.Errorf("lint: %s: %s", p.Metric, p.Text)
		}
	}
}

// TestSimulatedUsage: slot mode reports its containers' simulated usage.
func TestSimulatedUsage(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	require.NoError(t, f.create(ctx, "a", map[string]string{resourceinfo.AnnotationCPULimit: "1"}))
	_, err := f.ctl.Start(ctx, &api.ControllerStartRequest{SandboxID: "a"})
	require.NoError(t, err)
	tasks := sandboxer.NewTasks(ctx, f.ctrl, nil)
	defer tasks.Close()
	k := sandboxer.TaskKey{Namespace: "k8s.io", ID: "c"}
	_, err = tasks.Create(ctx, sandboxer.TaskSpec{Key: k, SandboxID: "a", Spec: &specs.Spec{Annotations: map[string]string{slot.AnnotationCPUUsage: "500m", slot.AnnotationMemoryUsage: "64Mi"}}})
	require.NoError(t, err)
	_, err = tasks.Start(ctx, k, "")
	require.NoError(t, err)
	v := values(t, f.m.Registry())
	assert.Equal(t, 0.5, v[`resource_slot_sandbox_usage{resource="cpu_cores",sandbox="a"}`])
	assert.Equal(t, float64(64<<20), v[`resource_slot_sandbox_usage{resource="memory_bytes",sandbox="a"}`])
	assert.Equal(t, 1.0, v[`resource_slot_sandbox_usage{resource="pids",sandbox="a"}`])
	assert.Contains(t, v, `resource_slot_sandbox_usage{resource="cpu_seconds",sandbox="a"}`)
}

func TestHandler(t *testing.T) {
	f := newFixture(t)
	require.NoError(t, f.create(context.Background(), "a", nil))
	srv := httptest.NewServer(f.m.Handler())
	defer srv.Close()
	get := func(path string) (int, string) {
		resp, err := http.Get(srv.URL + path)
		require.NoError(t, err)
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp.StatusCode, string(body)
	}
	code, body := get("/healthz")
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "ok\n", body)
	code, body = get("/metrics")
	assert.Equal(t, http.StatusOK, code)
	for _, name := range []string{
		"resource_slot_sandboxes", "resource_slot_capacity", "resource_slot_allocated", "resource_slot_requested",
		"resource_slot_limited", "resource_slot_admission_rejections_total", "go_goroutines", "process_open_fds",
	} {
		assert.Contains(t, body, "\n"+name, name)
	}
	assert.Contains(t, body, "# HELP resource_slot_cost_total Estimated cost of each sandbox so far, in USD")
}
