package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/admin/api"
	"github.com/kuasar-io/resource-slot-sandboxer/capacity"
	"github.com/kuasar-io/resource-slot-sandboxer/cost"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/httpserve"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/unixsock"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

type fixture struct {
	ctrl *sandboxer.Controller
	srv  *httptest.Server
	now  time.Time
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{now: time.Date(2026, 5, 1, 8, 0, 0, 0, time.UTC)}
	clock := func() time.Time { return f.now }
	adm, err := capacity.New(capacity.Config{CPU: 4, Memory: 8 << 30, Pids: 1000, Policy: capacity.Enforce})
	require.NoError(t, err)
	f.ctrl, err = sandboxer.New(sandboxer.Options{Root: t.TempDir(), Backend: slot.New(), Admitter: adm, Now: clock})
	require.NoError(t, err)
	f.srv = httptest.NewServer(Handler(Options{
		Controller: f.ctrl, Admitter: adm, Now: clock,
		Prices: cost.Prices{CPUCoreHour: 0.1, MemoryGiBHour: 0.01, Currency: "EUR"},
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fixture) create(t *testing.T, id string, a map[string]string, start bool) {
	t.Helper()
	ctx := context.Background()
	require.NoError(t, f.ctrl.Create(ctx, sandbox.Sandbox{ID: id}, sandbox.WithAnnotations(a)))
	if start {
		_, err := f.ctrl.Start(ctx, id)
		require.NoError(t, err)
	}
}

// call sends a request and decodes the answer into out (or an api.Error).
func (f *fixture) call(t *testing.T, method, path, body string, out any) int {
	t.Helper()
	req, err := http.NewRequest(method, f.srv.URL+path, strings.NewReader(body))
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	assert.Equal(t, "application/json", resp.Header.Get("Content-Type"))
	if out != nil {
		require.NoError(t, json.Unmarshal(data, out), "%s", data)
	}
	return resp.StatusCode
}

func TestListAndGet(t *testing.T) {
	f := newFixture(t)
	var list []api.Sandbox
	require.Equal(t, http.StatusOK, f.call(t, "GET", "/v1/sandboxes", "", &list))
	assert.Empty(t, list)
	assert.NotNil(t, list, "an empty list is [], not null")

	f.create(t, "b", map[string]string{resourceinfo.AnnotationCPULimit: "2", resourceinfo.AnnotationMemoryRequest: "1Gi"}, true)
	f.create(t, "a", nil, false)
	require.Equal(t, http.StatusOK, f.call(t, "GET", "/v1/sandboxes", "", &list))
	require.Len(t, list, 2)
	assert.Equal(t, "a", list[0].ID)
	assert.Equal(t, "created", list[0].Phase)
	assert.Nil(t, list[0].StartedAt)
	assert.Nil(t, list[0].Limits.CPU)
	b := list[1]
	assert.Equal(t, "b", b.ID)
	assert.Equal(t, "slot", b.Mode)
	assert.Equal(t, "ready", b.Phase)
	assert.Equal(t, f.now, b.CreatedAt)
	require.NotNil(t, b.StartedAt)
	assert.Equal(t, 2.0, *b.Limits.CPU)
	assert.Equal(t, int64(1<<30), *b.Requests.Memory)
	assert.Nil(t, b.Limits.Memory)

	var one api.Sandbox
	require.Equal(t, http.StatusOK, f.call(t, "GET", "/v1/sandboxes/b", "", &one))
	assert.Equal(t, b, one)

	var e api.Error
	require.Equal(t, http.StatusNotFound, f.call(t, "GET", "/v1/sandboxes/nope", "", &e))
	assert.Equal(t, api.Error{Error: "sandbox nope not found", Code: "NotFound"}, e)
	require.Equal(t, http.StatusBadRequest, f.call(t, "GET", "/v1/sandboxes/..bad", "", &e))
	assert.Equal(t, "InvalidArgument", e.Code)
	require.Equal(t, http.StatusNotFound, f.call(t, "GET", "/v2/whatever", "", &e))
	assert.Contains(t, e.Error, "no such endpoint")
}

func TestLimitsAndUsage(t *testing.T) {
	f := newFixture(t)
	f.create(t, "a", map[string]string{
		resourceinfo.AnnotationCPULimit: "1500m", resourceinfo.AnnotationMemoryLimit: "512Mi",
		resourceinfo.AnnotationNetworkBandwidth: "100Mbps",
	}, false)
	var l api.Limits
	require.Equal(t, http.StatusOK, f.call(t, "GET", "/v1/sandboxes/a/limits", "", &l))
	assert.Equal(t, 1.5, *l.Limits.CPU)
	assert.Equal(t, int64(512<<20), *l.Limits.Memory)
	assert.Equal(t, int64(100_000_000), *l.NetworkIngressBps)
	assert.Equal(t, "annotation", l.Sources["cpu_limit"])
	assert.Nil(t, l.Requests.CPU)

	var e api.Error
	require.Equal(t, http.StatusConflict, f.call(t, "GET", "/v1/sandboxes/a/usage", "", &e))
	assert.Equal(t, "FailedPrecondition", e.Code)
	assert.Contains(t, e.Error, "not ready")

	_, err := f.ctrl.Start(context.Background(), "a")
	require.NoError(t, err)
	var u api.Usage
	require.Equal(t, http.StatusOK, f.call(t, "GET", "/v1/sandboxes/a/usage", "", &u))
	assert.Equal(t, "simulated", u.Source)
	assert.Equal(t, "ready", u.Phase)
	assert.Equal(t, 0.0, *u.CPUCores)
	assert.Equal(t, uint64(0), *u.MemoryBytes)
	assert.Equal(t, 1.5, *u.Limits.CPU)
	require.Equal(t, http.StatusNotFound, f.call(t, "GET", "/v1/sandboxes/nope/usage", "", &e))
	assert.Equal(t, "sandbox nope not found", e.Error)
}

func TestSetResources(t *testing.T) {
	f := newFixture(t)
	f.create(t, "a", map[string]string{resourceinfo.AnnotationCPULimit: "1", resourceinfo.AnnotationMemoryLimit: "1Gi"}, true)
	var l api.Limits
	require.Equal(t, http.StatusOK, f.call(t, "PUT", "/v1/sandboxes/a/resources",
		`{"cpu":"2","memory":"2Gi","pids":"500","cpu_request":"500m","memory_request":"1Gi","storage":"10Gi"}`, &l))
	assert.Equal(t, 2.0, *l.Limits.CPU)
	assert.Equal(t, int64(2<<30), *l.Limits.Memory)
	assert.Equal(t, int64(500), *l.Limits.Pids)
	assert.Equal(t, int64(10<<30), *l.Limits.Storage)
	assert.Equal(t, 0.5, *l.Requests.CPU)
	assert.Equal(t, int64(1<<30), *l.Requests.Memory)

	// Persisted, with the derived cgroup values recomputed.
	ri, err := sandboxer.ReadResourceInfo(f.ctrl.Dir("a"))
	require.NoError(t, err)
	assert.Equal(t, 2.0, *ri.CPULimit)
	assert.Equal(t, int64(200000), *ri.CPUQuota)
	assert.Equal(t, uint64(512), *ri.CPUShares)

	// Absent fields stay; "none" removes.
	require.Equal(t, http.StatusOK, f.call(t, "PUT", "/v1/sandboxes/a/resources", `{"pids":"none","cpu":"1"}`, &l))
	assert.Nil(t, l.Limits.Pids)
	assert.Equal(t, 1.0, *l.Limits.CPU)
	assert.Equal(t, int64(2<<30), *l.Limits.Memory)

	// Errors.
	var e api.Error
	for _, tc := range []struct {
		body   string
		status int
		code   string
		msg    string
	}{
		{`{"cpu":"lots"}`, http.StatusBadRequest, "InvalidArgument", `resources.limits.cpu="lots"`},
		{`{"cpu":"-1"}`, http.StatusBadRequest, "InvalidArgument", "resources.limits.cpu"},
		{`{"cpus":"1"}`, http.StatusBadRequest, "InvalidArgument", `unknown field "cpus"`},
		{`{}`, http.StatusBadRequest, "InvalidArgument", "nothing to set"},
		{`not json`, http.StatusBadRequest, "InvalidArgument", "malformed request body"},
		{`{"cpu":"5"}`, http.StatusTooManyRequests, "ResourceExhausted", "cpu: request 5 cores exceeds the free 4 of 4 (capacity 4 × overcommit 1)"},
		{`{"memory":"9Gi"}`, http.StatusTooManyRequests, "ResourceExhausted", "memory: request 9Gi exceeds the free 8Gi of 8Gi"},
	} {
		assert.Equal(t, tc.status, f.call(t, "PUT", "/v1/sandboxes/a/resources", tc.body, &e), tc.body)
		assert.Equal(t, tc.code, e.Code, tc.body)
		assert.Contains(t, e.Error, tc.msg, tc.body)
	}
	require.Equal(t, http.StatusOK, f.call(t, "GET", "/v1/sandboxes/a/limits", "", &l))
	assert.Equal(t, 1.0, *l.Limits.CPU, "refused changes change nothing")

	assert.Equal(t, http.StatusNotFound, f.call(t, "PUT", "/v1/sandboxes/nope/resources", `{"cpu":"1"}`, &e))
	assert.Equal(t, "sandbox nope not found", e.Error)
	assert.Equal(t, http.StatusMethodNotAllowed, f.call(t, "POST", "/v1/sandboxes/a/resources", `{"cpu":"1"}`, nil))
	assert.Equal(t, http.StatusBadRequest, f.call(t, "PUT", "/v1/sandboxes/a/resources", `{"cpu":"`+strings.Repeat("1", maxBody)+`"}`, &e))

	// A stopped sandbox holds nothing: its resize is not admitted against
	// the capacity, only recorded.
	require.NoError(t, f.ctrl.Stop(context.Background(), "a"))
	require.Equal(t, http.StatusOK, f.call(t, "PUT", "/v1/sandboxes/a/resources", `{"cpu":"64"}`, &l))
}

func TestCapacityAndCost(t *testing.T) {
	f := newFixture(t)
	f.create(t, "a", map[string]string{resourceinfo.AnnotationCPULimit: "2", resourceinfo.AnnotationCPURequest: "1", resourceinfo.AnnotationMemoryLimit: "2Gi"}, true)
	f.create(t, "b", map[string]string{resourceinfo.AnnotationCPULimit: "1"}, false)
	require.Error(t, f.ctrl.Create(context.Background(), sandbox.Sandbox{ID: "c"}, sandbox.WithAnnotations(map[string]string{resourceinfo.AnnotationCPULimit: "2"})))

	var c api.Capacity
	require.Equal(t, http.StatusOK, f.call(t, "GET", "/v1/capacity", "", &c))
	assert.Equal(t, "enforce", c.Policy)
	assert.Equal(t, 2, c.Sandboxes)
	require.Len(t, c.Resources, 3)
	cpu := c.Resources[0]
	assert.Equal(t, "cpu", cpu.Resource)
	assert.Equal(t, "cores", cpu.Unit)
	assert.Equal(t, 4.0, cpu.Capacity)
	assert.Equal(t, 3.0, cpu.Allocated)
	assert.Equal(t, 1.0, *cpu.Requested)
	assert.Equal(t, 3.0, cpu.Limited)
	assert.Equal(t, 1.0, cpu.Free)
	assert.Equal(t, "pids", c.Resources[2].Resource)
	assert.Nil(t, c.Resources[2].Requested)
	assert.Equal(t, 2, c.Resources[2].Unlimited)
	assert.Equal(t, []api.Rejection{{Resource: "cpu", Policy: "enforce", Count: 1}}, c.Rejections)

	f.now = f.now.Add(2 * time.Hour)
	var cost api.Cost
	require.Equal(t, http.StatusOK, f.call(t, "GET", "/v1/cost", "", &cost))
	assert.Equal(t, "EUR", cost.Currency)
	assert.Equal(t, 0.1, cost.Prices.CPUCoreHour)
	require.Len(t, cost.Sandboxes, 2)
	assert.Equal(t, "a", cost.Sandboxes[0].ID)
	assert.InDelta(t, 4.0, cost.Sandboxes[0].CPUCoreHours, 1e-9)
	assert.InDelta(t, 4.0, cost.Sandboxes[0].MemoryGiBHours, 1e-9)
	assert.InDelta(t, 4*0.1+4*0.01, cost.Sandboxes[0].Cost, 1e-9)
	assert.Zero(t, cost.Sandboxes[1].Cost, "created, never started")
	assert.InDelta(t, 0.44, cost.Total.Cost, 1e-9)

	// Without an admitter, capacity is unavailable.
	srv := httptest.NewServer(Handler(Options{Controller: f.ctrl}))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/v1/capacity")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
}

func TestStatus(t *testing.T) {
	for _, tc := range []struct {
		err    error
		status int
		code   string
	}{
		{errdefs.ErrInvalidArgument, 400, "InvalidArgument"},
		{fmt.Errorf("x: %w", errdefs.ErrNotFound), 404, "NotFound"},
		{errdefs.ErrAlreadyExists, 409, "AlreadyExists"},
		{errdefs.ErrFailedPrecondition, 409, "FailedPrecondition"},
		{errdefs.ErrResourceExhausted, 429, "ResourceExhausted"},
		{errdefs.ErrUnavailable, 503, "Unavailable"},
		{errors.New("disk on fire"), 500, "Internal"},
	} {
		status, code := Status(tc.err)
		assert.Equal(t, tc.status, status, tc.err)
		assert.Equal(t, tc.code, code, tc.err)
	}
}

// TestServeUnixSocket: the API on a 0600 unix socket, shut down with its
// context.
func TestServeUnixSocket(t *testing.T) {
	f := newFixture(t)
	sock := filepath.Join(t.TempDir(), "admin.sock")
	lis, err := unixsock.Listen(sock)
	require.NoError(t, err)
	fi, err := os.Stat(sock)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- httpserve.Serve(ctx, lis, Handler(Options{Controller: f.ctrl})) }()
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	resp, err := client.Get("http://admin/v1/sandboxes")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	cancel()
	select {
	case err := <-done:
		assert.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return")
	}
}

// TestPprof: the admin socket serves Go's profiles, as containerd's debug
// socket does.
func TestPprof(t *testing.T) {
	f := newFixture(t)
	resp, err := http.Get(f.srv.URL + "/debug/pprof/goroutine?debug=1")
	require.NoError(t, err)
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Contains(t, string(data), "goroutine profile:")
}
