// Package cgmetrics renders usage as the cgroup metrics types containerd's
// CRI decodes (cgroup v1 or v2, whichever this host runs), for what has no
// cgroup of its own to read: a simulated container, a sandbox as a whole.
package cgmetrics

import (
	"math"

	"github.com/containerd/cgroups/v3"
	cg1 "github.com/containerd/cgroups/v3/cgroup1/stats"
	cg2 "github.com/containerd/cgroups/v3/cgroup2/stats"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// From renders usage as the cgroup metrics type of this host (v1 or v2),
// with the limits set.
func From(limits resourceinfo.Resources, u resourceinfo.Usage) any {
	val := func(p *uint64) uint64 {
		if p == nil {
			return 0
		}
		return *p
	}
	memLimit := uint64(math.MaxInt64) // what an unlimited cgroup reports, rounded
	if limits.MemoryLimit != nil {
		memLimit = uint64(*limits.MemoryLimit)
	}
	var pidLimit uint64
	if limits.PidLimit != nil {
		pidLimit = uint64(*limits.PidLimit)
	}
	mem := val(u.MemoryUsage)
	if cgroups.Mode() == cgroups.Unified {
		return &cg2.Metrics{
			Pids:   &cg2.PidsStat{Current: val(u.Pids), Limit: pidLimit},
			CPU:    &cg2.CPUStat{UsageUsec: val(u.CPUTimeNanos) / 1000},
			Memory: &cg2.MemoryStat{Usage: mem, UsageLimit: memLimit, Anon: val(u.MemoryRSS)},
		}
	}
	return &cg1.Metrics{
		Pids: &cg1.PidsStat{Current: val(u.Pids), Limit: pidLimit},
		CPU:  &cg1.CPUStat{Usage: &cg1.CPUUsage{Total: val(u.CPUTimeNanos)}},
		Memory: &cg1.MemoryStat{
			RSS:   val(u.MemoryRSS),
			Usage: &cg1.MemoryEntry{Usage: mem, Limit: memLimit},
		},
	}
}
