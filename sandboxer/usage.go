package sandboxer

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/errdefs"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// UsageSource says where a Usage comes from.
const (
	// UsageSimulated: the sum of the simulated containers' usage (slot
	// mode), as their annotations set it.
	UsageSimulated = "simulated"
	// UsageBackend: the backend's measurement (vm mode).
	UsageBackend = "backend"
)

// Usage is what a ready sandbox uses now, and where that comes from. In
// slot mode it is the sum of its simulated containers' usage (Usage of
// each task record); otherwise it is the backend's measurement. A sandbox
// that is not ready uses nothing and has no usage: FailedPrecondition.
func (c *Controller) Usage(ctx context.Context, id string) (resourceinfo.Usage, string, error) {
	sb, err := c.get(id)
	if err != nil {
		return resourceinfo.Usage{}, "", err
	}
	snap := sb.snap.Load()
	if snap.state.Phase != PhaseReady {
		return resourceinfo.Usage{}, "", fmt.Errorf("sandbox %s is %s, not ready: %w", id, snap.state.Phase, errdefs.ErrFailedPrecondition)
	}
	if c.Mode() != "slot" {
		u, err := c.opts.Backend.Usage(ctx, id)
		return u, UsageBackend, err
	}
	return simulatedUsage(snap.state, snap.info.Resources, c.opts.Now()), UsageSimulated, nil
}

// simulatedUsage adds up the simulated tasks of a sandbox.
func simulatedUsage(st *State, limits resourceinfo.Resources, at time.Time) resourceinfo.Usage {
	var cpuNs, mem, rss, pids uint64
	var cpuPct float64
	at = at.UTC()
	for _, ctr := range st.Containers {
		rec := ctr.Task
		if rec == nil {
			continue
		}
		u := Usage(rec, at)
		cpuNs += *u.CPUTimeNanos
		mem += *u.MemoryUsage
		rss += *u.MemoryRSS
		pids += *u.Pids
		if rec.Status == TaskRunning {
			cpuPct += *u.CPUPercent
		}
	}
	u := resourceinfo.Usage{Timestamp: at, CPUTimeNanos: &cpuNs, CPUPercent: &cpuPct, MemoryUsage: &mem, MemoryRSS: &rss, Pids: &pids}
	if l := limits.MemoryLimit; l != nil && mem > uint64(*l) {
		u.Violations = append(u.Violations, fmt.Sprintf("memory_usage %d > memory_limit %d", mem, *l))
	}
	if l := limits.CPULimit; l != nil && cpuPct/100 > *l+1e-9 {
		u.Violations = append(u.Violations, fmt.Sprintf("cpu_usage %g cores > cpu_limit %g", cpuPct/100, *l))
	}
	if l := limits.PidLimit; l != nil && pids > uint64(*l) {
		u.Violations = append(u.Violations, fmt.Sprintf("pids %d > pid_limit %d", pids, *l))
	}
	return u
}
