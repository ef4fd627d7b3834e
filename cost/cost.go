// Package cost estimates what sandboxes cost: prices per hour times what
// each sandbox held while it ran, as its Ledger of resource-seconds
// records it (each segment charged at the allocation it had, across
// resizes and restarts of the daemon).
package cost

import (
	"sort"
	"time"

	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
)

const (
	gib         = 1 << 30
	secsPerHour = 3600
)

// Prices are per hour of one unit held.
type Prices struct {
	CPUCoreHour    float64 `json:"cpu_core_hour"`
	MemoryGiBHour  float64 `json:"memory_gib_hour"`
	PidHour        float64 `json:"pid_hour"`
	StorageGiBHour float64 `json:"storage_gib_hour"`
	Currency       string  `json:"currency"`
}

// Free reports whether every price is zero.
func (p Prices) Free() bool {
	return p.CPUCoreHour == 0 && p.MemoryGiBHour == 0 && p.PidHour == 0 && p.StorageGiBHour == 0
}

// Estimate is what was held and what it costs.
type Estimate struct {
	CPUCoreHours    float64 `json:"cpu_core_hours"`
	MemoryGiBHours  float64 `json:"memory_gib_hours"`
	PidHours        float64 `json:"pid_hours"`
	StorageGiBHours float64 `json:"storage_gib_hours"`
	// Per resource and in total, in the prices' currency.
	CPU     float64 `json:"cpu"`
	Memory  float64 `json:"memory"`
	Pids    float64 `json:"pids"`
	Storage float64 `json:"storage"`
	Total   float64 `json:"total"`
}

// Of prices a ledger (closed: use Ledger.At for a running sandbox).
func (p Prices) Of(l sandboxer.Ledger) Estimate {
	e := Estimate{
		CPUCoreHours:    l.CPUCoreSeconds / secsPerHour,
		MemoryGiBHours:  l.MemoryByteSeconds / gib / secsPerHour,
		PidHours:        l.PidSeconds / secsPerHour,
		StorageGiBHours: l.StorageByteSecs / gib / secsPerHour,
	}
	e.CPU = e.CPUCoreHours * p.CPUCoreHour
	e.Memory = e.MemoryGiBHours * p.MemoryGiBHour
	e.Pids = e.PidHours * p.PidHour
	e.Storage = e.StorageGiBHours * p.StorageGiBHour
	e.Total = e.CPU + e.Memory + e.Pids + e.Storage
	return e
}

// Sandbox prices a sandbox as of now: its ledger with the open segment
// (while it runs) charged at its current allocation.
func (p Prices) Sandbox(v sandboxer.SandboxView, now time.Time) Estimate {
	return p.Of(v.State.Ledger.At(v.ResourceInfo.Allocation(), now))
}

// SandboxCost is one sandbox's estimate.
type SandboxCost struct {
	ID    string          `json:"id"`
	Phase sandboxer.Phase `json:"phase"`
	Estimate
}

// Report is the cost of every sandbox the daemon knows (until removed)
// and their total.
type Report struct {
	Prices    Prices        `json:"prices"`
	At        time.Time     `json:"at"`
	Sandboxes []SandboxCost `json:"sandboxes"`
	Total     Estimate      `json:"total"`
}

// Report prices the sandboxes, sorted by ID, as of now.
func (p Prices) Report(views []sandboxer.SandboxView, now time.Time) Report {
	r := Report{Prices: p, At: now.UTC(), Sandboxes: make([]SandboxCost, 0, len(views))}
	for _, v := range views {
		e := p.Sandbox(v, now)
		r.Sandboxes = append(r.Sandboxes, SandboxCost{ID: v.State.ID, Phase: v.State.Phase, Estimate: e})
		t := &r.Total
		t.CPUCoreHours += e.CPUCoreHours
		t.MemoryGiBHours += e.MemoryGiBHours
		t.PidHours += e.PidHours
		t.StorageGiBHours += e.StorageGiBHours
		t.CPU += e.CPU
		t.Memory += e.Memory
		t.Pids += e.Pids
		t.Storage += e.Storage
		t.Total += e.Total
	}
	sort.Slice(r.Sandboxes, func(i, j int) bool { return r.Sandboxes[i].ID < r.Sandboxes[j].ID })
	return r
}
