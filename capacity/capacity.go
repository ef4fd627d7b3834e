// Package capacity admits sandboxes against the node's capacity. It
// implements sandboxer.Admitter: it keeps what every sandbox that holds
// resources (created or ready) was admitted with and, per resource,
// compares the sum of their allocations plus a new one with capacity ×
// overcommit, under a policy: off (account only), warn (admit, log and
// count), enforce (refuse with ResourceExhausted).
package capacity

import (
	"context"
	"fmt"
	"math"
	"sort"
	"strings"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
)

// Policy is what admission does with a sandbox that does not fit.
type Policy string

const (
	// Off accounts only: everything is admitted, nothing is logged.
	Off Policy = "off"
	// Warn admits, logs a warning and counts a rejection.
	Warn Policy = "warn"
	// Enforce refuses with errdefs.ErrResourceExhausted.
	Enforce Policy = "enforce"
)

// Resource is one resource admission accounts for.
type Resource int

const (
	CPU    Resource = iota // cores (kept in millicores)
	Memory                 // bytes
	Pids                   // processes
	numResources
)

// Resources are the resources, in order.
var Resources = []Resource{CPU, Memory, Pids}

func (r Resource) String() string {
	return [...]string{"cpu", "memory", "pids"}[r]
}

// Unit is how the resource is counted.
func (r Resource) Unit() string {
	return [...]string{"cores", "bytes", "count"}[r]
}

// Config configures an Admitter. A zero capacity is read from the host, a
// zero overcommit is 1 and an empty policy is Off.
type Config struct {
	CPU    float64 // cores
	Memory int64   // bytes
	Pids   int64
	// Overcommit ratios, > 0.
	CPUOvercommit, MemoryOvercommit, PidsOvercommit float64
	Policy                                          Policy
}

// vec holds one value per resource: millicores, bytes, count.
type vec [numResources]int64

func (v vec) add(w vec) vec {
	for i := range v {
		v[i] = addSat(v[i], w[i])
	}
	return v
}

func (v vec) sub(w vec) vec {
	for i := range v {
		v[i] = addSat(v[i], -w[i])
	}
	return v
}

// addSat adds without overflowing: hostile limits near int64's range
// must not wrap around to fit.
func addSat(a, b int64) int64 {
	s := a + b
	switch {
	case a > 0 && b > 0 && s < 0:
		return math.MaxInt64
	case a < 0 && b < 0 && s >= 0:
		return math.MinInt64
	}
	return s
}

// holding is what admission keeps of one sandbox.
type holding struct {
	alloc, requests, limits vec
	// hasLimit marks the resources the sandbox has a limit on.
	hasLimit [numResources]bool
}

func millicores(cores float64) int64 {
	m := math.Round(cores * 1000)
	if m >= math.MaxInt64 || math.IsNaN(m) {
		return math.MaxInt64
	}
	return int64(m)
}

func holdingOf(r resourceinfo.Resources) holding {
	a := r.Allocation()
	h := holding{alloc: vec{millicores(a.CPU), a.Memory, a.Pids}}
	if r.CPURequest != nil {
		h.requests[CPU] = millicores(*r.CPURequest)
	}
	if r.MemoryRequest != nil {
		h.requests[Memory] = *r.MemoryRequest
	}
	if r.CPULimit != nil {
		h.limits[CPU], h.hasLimit[CPU] = millicores(*r.CPULimit), true
	}
	if r.MemoryLimit != nil {
		h.limits[Memory], h.hasLimit[Memory] = *r.MemoryLimit, true
	}
	if r.PidLimit != nil {
		h.limits[Pids], h.hasLimit[Pids] = *r.PidLimit, true
	}
	return h
}

// Admitter is a sandboxer.Admitter with capacity, overcommit and policy.
// Its methods are safe for concurrent use; one mutex makes concurrent
// admissions exact.
type Admitter struct {
	policy     Policy
	capacity   vec // millicores, bytes, count
	overcommit [numResources]float64
	bound      vec // capacity × overcommit

	mu         sync.Mutex
	held       map[string]holding
	total      holding
	unlimited  [numResources]int // holding sandboxes without a limit
	rejections map[rejectionKey]uint64
}

type rejectionKey struct {
	resource Resource
	policy   Policy
}

var _ sandboxer.Admitter = (*Admitter)(nil)

// New returns an admitter; a zero capacity is read from the host.
func New(cfg Config) (*Admitter, error) {
	switch cfg.Policy {
	case "":
		cfg.Policy = Off
	case Off, Warn, Enforce:
	default:
		return nil, fmt.Errorf("capacity: unknown policy %q", cfg.Policy)
	}
	if cfg.CPU == 0 || cfg.Memory == 0 || cfg.Pids == 0 {
		host, err := Host()
		if err != nil {
			return nil, fmt.Errorf("capacity: read the host's capacity (set it in [capacity]): %w", err)
		}
		if cfg.CPU == 0 {
			cfg.CPU = host.CPU
		}
		if cfg.Memory == 0 {
			cfg.Memory = host.Memory
		}
		if cfg.Pids == 0 {
			cfg.Pids = host.Pids
		}
	}
	a := &Admitter{
		policy:     cfg.Policy,
		capacity:   vec{millicores(cfg.CPU), cfg.Memory, cfg.Pids},
		overcommit: [numResources]float64{cfg.CPUOvercommit, cfg.MemoryOvercommit, cfg.PidsOvercommit},
		held:       map[string]holding{},
		rejections: map[rejectionKey]uint64{},
	}
	for i := range a.overcommit {
		o := a.overcommit[i]
		if o == 0 {
			o = 1
		}
		if math.IsNaN(o) || math.IsInf(o, 0) || o < 0 {
			return nil, fmt.Errorf("capacity: overcommit of %s must be > 0, not %v", Resource(i), o)
		}
		if a.capacity[i] < 0 {
			return nil, fmt.Errorf("capacity: %s must not be negative", Resource(i))
		}
		a.overcommit[i] = o
		b := math.Round(float64(a.capacity[i]) * o)
		if b >= math.MaxInt64 {
			a.bound[i] = math.MaxInt64
		} else {
			a.bound[i] = int64(b)
		}
	}
	return a, nil
}

// Policy is the admission policy.
func (a *Admitter) Policy() Policy { return a.policy }

// Admit reserves the allocation of r for sandbox id in place of what it
// held. A resource that does not grow is always admitted; one that grows
// past capacity × overcommit is refused (enforce) or admitted with a
// warning (warn).
func (a *Admitter) Admit(ctx context.Context, id string, r resourceinfo.Resources) error {
	h := holdingOf(r)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.policy != Off {
		old := a.held[id]
		others := a.total.alloc.sub(old.alloc)
		var msgs []string
		for _, res := range Resources {
			want := h.alloc[res]
			if want <= old.alloc[res] || addSat(others[res], want) <= a.bound[res] {
				continue
			}
			free := max(a.bound[res]-others[res], 0)
			msg := fmt.Sprintf("%s: request %s exceeds the free %s of %s (capacity %s × overcommit %s)",
				res, FormatQuantity(res, want, true), FormatQuantity(res, free, false), FormatQuantity(res, a.bound[res], false),
				FormatQuantity(res, a.capacity[res], false), formatRatio(a.overcommit[res]))
			msgs = append(msgs, msg)
			a.rejections[rejectionKey{res, a.policy}]++
			if a.policy == Warn {
				log.G(ctx).WithFields(log.Fields{"sandbox": id, "resource": res.String(), "policy": string(a.policy)}).
					Warn("sandbox admitted over capacity: " + msg)
			}
		}
		if len(msgs) > 0 && a.policy == Enforce {
			return fmt.Errorf("sandbox %s does not fit the node: %s: %w", id, strings.Join(msgs, "; "), errdefs.ErrResourceExhausted)
		}
	}
	a.setLocked(id, h)
	return nil
}

// Restore records what sandbox id holds without refusing: a recovered
// sandbox, or one whose failed change is rolled back.
func (a *Admitter) Restore(id string, r resourceinfo.Resources) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.setLocked(id, holdingOf(r))
}

// Release frees what sandbox id held; releasing twice is harmless.
func (a *Admitter) Release(id string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if old, ok := a.held[id]; ok {
		a.untrackLocked(old)
		delete(a.held, id)
	}
}

func (a *Admitter) setLocked(id string, h holding) {
	if old, ok := a.held[id]; ok {
		a.untrackLocked(old)
	}
	a.held[id] = h
	a.total.alloc = a.total.alloc.add(h.alloc)
	a.total.requests = a.total.requests.add(h.requests)
	a.total.limits = a.total.limits.add(h.limits)
	for i, has := range h.hasLimit {
		if !has {
			a.unlimited[i]++
		}
	}
}

func (a *Admitter) untrackLocked(h holding) {
	a.total.alloc = a.total.alloc.sub(h.alloc)
	a.total.requests = a.total.requests.sub(h.requests)
	a.total.limits = a.total.limits.sub(h.limits)
	for i, has := range h.hasLimit {
		if !has {
			a.unlimited[i]--
		}
	}
}

// Snapshot is the state of admission at one instant.
type Snapshot struct {
	Policy Policy
	// Sandboxes is the number of sandboxes that hold resources.
	Sandboxes int
	// Resources, in the order of Resources.
	Resources []ResourceSnapshot
	// Rejections counts admissions that did not fit, by resource and
	// policy (warn counts them too, admitting them).
	Rejections []Rejection
}

// ResourceSnapshot is one resource. Values are in the resource's unit
// (cores, bytes, count).
type ResourceSnapshot struct {
	Resource Resource
	// Capacity is the node's, Overcommit the ratio, Allocatable their
	// product: the bound of the allocations.
	Capacity, Overcommit, Allocatable float64
	// Allocated is the sum of the allocations (limit, else request);
	// Requested the sum of the requests (pids have none); Limited the
	// sum of the limits.
	Allocated, Requested, Limited float64
	// HasRequests is false for a resource without requests (pids).
	HasRequests bool
	// Unlimited counts the sandboxes that hold without a limit on it.
	Unlimited int
	// Free is Allocatable − Allocated, at least 0.
	Free float64
}

// Rejection is a count of admissions that did not fit.
type Rejection struct {
	Resource Resource
	Policy   Policy
	Count    uint64
}

// Snapshot returns the capacity, what is requested, limited, allocated and
// free per resource, and the rejections so far.
func (a *Admitter) Snapshot() Snapshot {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := Snapshot{Policy: a.policy, Sandboxes: len(a.held)}
	for _, r := range Resources {
		s.Resources = append(s.Resources, ResourceSnapshot{
			Resource:    r,
			Capacity:    toUnit(r, a.capacity[r]),
			Overcommit:  a.overcommit[r],
			Allocatable: toUnit(r, a.bound[r]),
			Allocated:   toUnit(r, a.total.alloc[r]),
			Requested:   toUnit(r, a.total.requests[r]),
			Limited:     toUnit(r, a.total.limits[r]),
			HasRequests: r != Pids,
			Unlimited:   a.unlimited[r],
			Free:        toUnit(r, max(a.bound[r]-a.total.alloc[r], 0)),
		})
	}
	for k, n := range a.rejections {
		s.Rejections = append(s.Rejections, Rejection{Resource: k.resource, Policy: k.policy, Count: n})
	}
	sort.Slice(s.Rejections, func(i, j int) bool {
		x, y := s.Rejections[i], s.Rejections[j]
		if x.Resource != y.Resource {
			return x.Resource < y.Resource
		}
		return x.Policy < y.Policy
	})
	return s
}

// toUnit converts the internal value (millicores for CPU) to the unit.
func toUnit(r Resource, v int64) float64 {
	if r == CPU {
		return float64(v) / 1000
	}
	return float64(v)
}

// FormatQuantity writes an internal value for people: "1.5" cores
// ("2 cores" with the unit), memory in binary units ("1.5Gi"), pids as
// an integer.
func FormatQuantity(r Resource, v int64, withUnit bool) string {
	switch r {
	case CPU:
		s := formatRatio(float64(v) / 1000)
		if withUnit {
			if v == 1000 {
				return s + " core"
			}
			return s + " cores"
		}
		return s
	case Memory:
		return FormatBytes(v)
	default:
		return fmt.Sprint(v)
	}
}

func formatRatio(f float64) string {
	return strings.TrimSuffix(strings.TrimRight(fmt.Sprintf("%.3f", f), "0"), ".")
}

// FormatBytes writes bytes in the largest binary unit (Ki, Mi, Gi, Ti,
// Pi, Ei) that keeps the value ≥ 1, with up to two decimals.
func FormatBytes(v int64) string {
	if v < 1024 && v > -1024 {
		return fmt.Sprint(v)
	}
	units := []string{"Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}
	f := float64(v)
	i := -1
	for math.Abs(f) >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	s := strings.TrimSuffix(strings.TrimRight(fmt.Sprintf("%.2f", f), "0"), ".")
	return s + units[i]
}
