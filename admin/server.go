// Package admin serves the admin API (package admin/api) on its own unix
// socket: HTTP+JSON to list sandboxes, read their limits and usage, resize
// them, and read the node's capacity and the sandboxes' cost. slotctl is
// its client.
package admin

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/pprof"
	"sort"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/kuasar-io/resource-slot-sandboxer/admin/api"
	"github.com/kuasar-io/resource-slot-sandboxer/capacity"
	"github.com/kuasar-io/resource-slot-sandboxer/cost"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/logsafe"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
)

// maxBody bounds a request body.
const maxBody = 64 << 10

// updateTimeout bounds a resize: the controller applies it in the backend
// and persists it, and a client that goes away must not cut it short.
const updateTimeout = time.Minute

// Options configure the admin API.
type Options struct {
	Controller *sandboxer.Controller
	// Admitter is the capacity admitter; nil: /v1/capacity is Unavailable.
	Admitter *capacity.Admitter
	Prices   cost.Prices
	// Now is the clock of the cost estimates; nil is time.Now.
	Now func() time.Time
}

type server struct{ Options }

// Handler returns the admin API's HTTP handler.
func Handler(o Options) http.Handler {
	if o.Now == nil {
		o.Now = time.Now
	}
	s := &server{o}
	mux := http.NewServeMux()
	for _, r := range []struct {
		method, path string
		h            http.HandlerFunc
	}{
		{"GET", api.PathSandboxes, s.list},
		{"GET", api.PathSandboxes + "/{id}", s.get},
		{"GET", api.PathSandboxes + "/{id}/limits", s.limits},
		{"GET", api.PathSandboxes + "/{id}/usage", s.usage},
		{"PUT", api.PathSandboxes + "/{id}/resources", s.setResources},
		{"GET", api.PathCapacity, s.capacity},
		{"GET", api.PathCost, s.cost},
	} {
		mux.HandleFunc(r.method+" "+r.path, r.h)
		// Other methods: a JSON 405 rather than the mux's text.
		mux.HandleFunc(r.path, func(w http.ResponseWriter, req *http.Request) {
			w.Header().Set("Allow", r.method)
			writeJSON(w, http.StatusMethodNotAllowed, api.Error{
				Error: fmt.Sprintf("%s %s: method not allowed (want %s)", req.Method, req.URL.Path, r.method),
				Code:  api.CodeInvalidArgument,
			})
		})
	}
	// Go's profiles, as containerd serves them on its debug socket: the
	// admin socket is already the operator's, root only.
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, fmt.Errorf("no such endpoint: %s %s: %w", r.Method, r.URL.Path, errdefs.ErrNotFound))
	})
	return mux
}

func (s *server) list(w http.ResponseWriter, _ *http.Request) {
	views := s.Controller.List()
	sort.Slice(views, func(i, j int) bool { return views[i].State.ID < views[j].State.ID })
	out := make([]api.Sandbox, 0, len(views))
	for _, v := range views {
		out = append(out, sandboxOf(v))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *server) view(w http.ResponseWriter, r *http.Request) (sandboxer.SandboxView, bool) {
	id := r.PathValue("id")
	v, err := s.Controller.Get(id)
	if err != nil {
		writeError(w, sandboxError(id, err))
		return v, false
	}
	return v, true
}

func (s *server) get(w http.ResponseWriter, r *http.Request) {
	if v, ok := s.view(w, r); ok {
		writeJSON(w, http.StatusOK, sandboxOf(v))
	}
}

func (s *server) limits(w http.ResponseWriter, r *http.Request) {
	if v, ok := s.view(w, r); ok {
		writeJSON(w, http.StatusOK, limitsOf(v))
	}
}

func (s *server) usage(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	v, err := s.Controller.Get(id)
	if err != nil {
		writeError(w, sandboxError(id, err))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	u, source, err := s.Controller.Usage(ctx, id)
	if err != nil {
		writeError(w, sandboxError(id, err))
		return
	}
	out := api.Usage{
		ID: id, Mode: v.State.Mode, Phase: string(v.State.Phase), Source: source, Timestamp: u.Timestamp,
		MemoryBytes: u.MemoryUsage, MemoryRSSBytes: u.MemoryRSS, Pids: u.Pids,
		DiskReadBytes: u.DiskReadBytes, DiskWriteBytes: u.DiskWriteBytes, NetRxBytes: u.NetRxBytes, NetTxBytes: u.NetTxBytes,
		Limits:     limitsOfResources(v.ResourceInfo.Resources),
		Violations: u.Violations, Unenforced: u.Unenforced,
	}
	if u.CPUPercent != nil {
		c := *u.CPUPercent / 100
		out.CPUCores = &c
	}
	if u.CPUTimeNanos != nil {
		sec := float64(*u.CPUTimeNanos) / 1e9
		out.CPUSeconds = &sec
	}
	writeJSON(w, http.StatusOK, out)
}

// setResources resizes a sandbox through Controller.UpdateSpec, the path
// of an in-place pod resize: admission, the backend's Update (live in vm
// mode), persistence. The values are pod-level overrides, as the
// resources.* pod annotations are, with their syntax and checks.
func (s *server) setResources(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var req api.SetResources
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, fmt.Errorf("malformed request body: %v: %w", err, errdefs.ErrInvalidArgument))
		return
	}
	given, n := map[string]string{}, 0
	for _, f := range []struct {
		value      *string
		annotation string
	}{
		{req.CPU, resourceinfo.AnnotationCPULimit},
		{req.Memory, resourceinfo.AnnotationMemoryLimit},
		{req.Pids, resourceinfo.AnnotationPidLimit},
		{req.CPURequest, resourceinfo.AnnotationCPURequest},
		{req.MemoryRequest, resourceinfo.AnnotationMemoryRequest},
		{req.Storage, resourceinfo.AnnotationStorageLimit},
	} {
		if f.value == nil {
			continue
		}
		n++
		if *f.value != api.None {
			given[f.annotation] = *f.value
		}
	}
	if n == 0 {
		writeError(w, fmt.Errorf("nothing to set: give cpu, memory, pids, cpu_request, memory_request or storage: %w", errdefs.ErrInvalidArgument))
		return
	}
	parsed, err := resourceinfo.FromAnnotations(given)
	if err != nil {
		writeError(w, err)
		return
	}
	ctx := log.WithLogger(context.WithoutCancel(r.Context()), log.G(r.Context()).WithFields(log.Fields{"sandbox": logsafe.String(id), "via": "admin"}))
	ctx, cancel := context.WithTimeout(ctx, updateTimeout)
	defer cancel()
	err = s.Controller.UpdateSpec(ctx, id, func(spec *resourceinfo.Spec) error {
		a := &spec.Annotations
		set(req.CPU, &a.CPULimit, parsed.CPULimit)
		set(req.Memory, &a.MemoryLimit, parsed.MemoryLimit)
		set(req.Pids, &a.PidLimit, parsed.PidLimit)
		set(req.CPURequest, &a.CPURequest, parsed.CPURequest)
		set(req.MemoryRequest, &a.MemoryRequest, parsed.MemoryRequest)
		set(req.Storage, &a.StorageLimit, parsed.StorageLimit)
		return nil
	})
	if err != nil {
		writeError(w, sandboxError(id, err))
		return
	}
	s.limits(w, r)
}

// set applies one field of SetResources: absent leaves dst, "none"
// clears it, a value sets it to what it parsed to.
func set[T any](value *string, dst **T, parsed *T) {
	switch {
	case value == nil:
	case *value == api.None:
		*dst = nil
	default:
		*dst = parsed
	}
}

func (s *server) capacity(w http.ResponseWriter, _ *http.Request) {
	if s.Admitter == nil {
		writeError(w, fmt.Errorf("no capacity admission configured: %w", errdefs.ErrUnavailable))
		return
	}
	writeJSON(w, http.StatusOK, CapacityOf(s.Admitter.Snapshot()))
}

// CapacityOf converts a capacity snapshot to the wire format.
func CapacityOf(snap capacity.Snapshot) api.Capacity {
	out := api.Capacity{Policy: string(snap.Policy), Sandboxes: snap.Sandboxes, Rejections: []api.Rejection{}}
	for _, r := range snap.Resources {
		rc := api.ResourceCapacity{
			Resource: r.Resource.String(), Unit: r.Resource.Unit(),
			Capacity: r.Capacity, Overcommit: r.Overcommit, Allocatable: r.Allocatable,
			Allocated: r.Allocated, Limited: r.Limited, Unlimited: r.Unlimited, Free: r.Free,
		}
		if r.HasRequests {
			req := r.Requested
			rc.Requested = &req
		}
		out.Resources = append(out.Resources, rc)
	}
	for _, rj := range snap.Rejections {
		out.Rejections = append(out.Rejections, api.Rejection{Resource: rj.Resource.String(), Policy: string(rj.Policy), Count: rj.Count})
	}
	return out
}

func (s *server) cost(w http.ResponseWriter, _ *http.Request) {
	rep := s.Prices.Report(s.Controller.List(), s.Now())
	p := rep.Prices
	out := api.Cost{
		Currency: p.Currency,
		Prices:   api.Prices{CPUCoreHour: p.CPUCoreHour, MemoryGiBHour: p.MemoryGiBHour, PidHour: p.PidHour, StorageGiBHour: p.StorageGiBHour},
		At:       rep.At, Sandboxes: make([]api.SandboxCost, 0, len(rep.Sandboxes)), Total: estimateOf(rep.Total),
	}
	for _, sc := range rep.Sandboxes {
		out.Sandboxes = append(out.Sandboxes, api.SandboxCost{ID: sc.ID, Phase: string(sc.Phase), Estimate: estimateOf(sc.Estimate)})
	}
	writeJSON(w, http.StatusOK, out)
}

func estimateOf(e cost.Estimate) api.Estimate {
	return api.Estimate{
		CPUCoreHours: e.CPUCoreHours, MemoryGiBHours: e.MemoryGiBHours, PidHours: e.PidHours,
		StorageGiBHours: e.StorageGiBHours, Cost: e.Total,
	}
}

func sandboxOf(v sandboxer.SandboxView) api.Sandbox {
	st := v.State
	l := limitsOfResources(v.ResourceInfo.Resources)
	return api.Sandbox{
		ID: st.ID, Mode: st.Mode, Phase: string(st.Phase),
		CreatedAt: st.CreatedAt, StartedAt: st.StartedAt, ExitedAt: st.ExitedAt,
		Containers: len(st.Containers),
		Limits:     l,
		Requests:   requestsOf(v.ResourceInfo.Resources),
	}
}

func limitsOfResources(r resourceinfo.Resources) api.Resources {
	return api.Resources{CPU: r.CPULimit, Memory: r.MemoryLimit, Pids: r.PidLimit, Storage: r.StorageLimit}
}

func requestsOf(r resourceinfo.Resources) api.Resources {
	return api.Resources{CPU: r.CPURequest, Memory: r.MemoryRequest}
}

func limitsOf(v sandboxer.SandboxView) api.Limits {
	ri := v.ResourceInfo
	sources := make(map[string]string, len(ri.Sources))
	for k, s := range ri.Sources {
		sources[k] = string(s)
	}
	return api.Limits{
		ID: v.State.ID, Phase: string(v.State.Phase),
		Limits:            limitsOfResources(ri.Resources),
		Requests:          requestsOf(ri.Resources),
		NetworkIngressBps: ri.NetworkIngressBps, NetworkEgressBps: ri.NetworkEgressBps,
		DiskReadBps: ri.DiskReadBps, DiskWriteBps: ri.DiskWriteBps,
		DiskReadIOPS: ri.DiskReadIOPS, DiskWriteIOPS: ri.DiskWriteIOPS,
		Sources: sources, UpdatedAt: ri.UpdatedAt,
	}
}

// sandboxError words a NotFound about a sandbox as "sandbox X not found".
func sandboxError(id string, err error) error {
	if errdefs.IsNotFound(err) {
		return notFound{id}
	}
	return err
}

type notFound struct{ id string }

func (e notFound) Error() string { return fmt.Sprintf("sandbox %s not found", e.id) }
func (e notFound) Unwrap() error { return errdefs.ErrNotFound }

// Status maps an error's errdefs class to an HTTP status and code.
func Status(err error) (int, string) {
	switch {
	case errdefs.IsInvalidArgument(err):
		return http.StatusBadRequest, api.CodeInvalidArgument
	case errdefs.IsNotFound(err):
		return http.StatusNotFound, api.CodeNotFound
	case errdefs.IsAlreadyExists(err):
		return http.StatusConflict, api.CodeAlreadyExists
	case errdefs.IsFailedPrecondition(err):
		return http.StatusConflict, api.CodeFailedPrecondition
	case errdefs.IsResourceExhausted(err):
		return http.StatusTooManyRequests, api.CodeResourceExhausted
	case errdefs.IsUnavailable(err):
		return http.StatusServiceUnavailable, api.CodeUnavailable
	default:
		return http.StatusInternalServerError, api.CodeInternal
	}
}

func writeError(w http.ResponseWriter, err error) {
	status, code := Status(err)
	writeJSON(w, status, api.Error{Error: err.Error(), Code: code})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	data, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		data, _ = json.Marshal(api.Error{Error: "encode response: " + err.Error(), Code: api.CodeInternal})
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(append(data, '\n'))
}
