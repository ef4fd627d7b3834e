package sandboxer

import (
	"context"
	"time"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// Admitter decides whether a sandbox may hold the resources it asks for
// (node capacity, overcommit, policy). The controller asks it before a
// sandbox is created or resized and tells it when a sandbox lets go.
type Admitter interface {
	// Admit reserves the allocation of r (r.Allocation()) for sandbox id
	// in place of what it held, or refuses with an
	// errdefs.ErrResourceExhausted error. r are the sandbox's effective
	// resources: an admitter may also account for requests and limits.
	Admit(ctx context.Context, id string, r resourceinfo.Resources) error
	// Restore records what a recovered sandbox holds (or, after a failed
	// change, held), without refusing.
	Restore(id string, r resourceinfo.Resources)
	// Release frees what sandbox id held.
	Release(id string)
}

// Ledger accrues what a sandbox held while it ran, in resource-seconds,
// for cost estimation: prices times the ledger is the cost, and it
// survives restarts and resizes (each segment is charged at the
// allocation it had).
type Ledger struct {
	CPUCoreSeconds    float64 `json:"cpu_core_seconds"`
	MemoryByteSeconds float64 `json:"memory_byte_seconds"`
	PidSeconds        float64 `json:"pid_seconds"`
	StorageByteSecs   float64 `json:"storage_byte_seconds"`
	// Since is when the open segment began: set while the sandbox runs.
	Since *time.Time `json:"since,omitempty"`
}

// close charges the open segment at allocation a up to now and, if
// reopen, starts a new one.
func (l *Ledger) close(a resourceinfo.Allocation, now time.Time, reopen bool) {
	if l.Since != nil {
		if d := now.Sub(*l.Since).Seconds(); d > 0 {
			l.CPUCoreSeconds += a.CPU * d
			l.MemoryByteSeconds += float64(a.Memory) * d
			l.PidSeconds += float64(a.Pids) * d
			l.StorageByteSecs += float64(a.Storage) * d
		}
	}
	l.Since = nil
	if reopen {
		t := now.UTC()
		l.Since = &t
	}
}

// At is the ledger as of now, the open segment charged at a.
func (l Ledger) At(a resourceinfo.Allocation, now time.Time) Ledger {
	l.close(a, now, false)
	return l
}

// noAdmission admits everything: the default without capacity limits.
type noAdmission struct{}

func (noAdmission) Admit(context.Context, string, resourceinfo.Resources) error { return nil }
func (noAdmission) Restore(string, resourceinfo.Resources)                      {}
func (noAdmission) Release(string)                                              {}
