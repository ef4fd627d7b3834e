package vmm

import (
	"fmt"
	"math"

	"github.com/containerd/errdefs"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// The pod cgroup in the guest (cgroup v2) holds the pod's ResourceInfo:
//
//	cpu.max         cpu_quota/cpu_period; without a quota, the cpu_limit
//	                cores over cpu_period (default 100ms); unset: max
//	cpu.weight      cpu_shares, converted by sharesToWeight
//	memory.max      memory_limit
//	memory.min      memory_request (a protection, as kubelet's
//	                memory QoS sets it)
//	memory.swap.max memory_swap_limit - memory_limit (the v1 memsw limit
//	                counts memory and swap together)
//	pids.max        pid_limit
//	cpuset.cpus     when the pod has a cpuset: every vCPU of the guest
//	                (the pod's host cpuset pins the vCPUs themselves on the
//	                host; guest CPU numbers are not host CPU numbers)
//
// The VM around it is sized and limited from the same values (DomainFor);
// the guest cgroup is what holds the pod's own processes to them.

// cgroup v2 bounds of cpu.max and cpu.weight.
const (
	minCPUPeriod = 1000    // µs
	maxCPUPeriod = 1000000 // µs
	minCPUQuota  = 1000    // µs
	minWeight    = 1
	maxWeight    = 10000
)

// cgroup v1 cpu.shares bounds and default.
const (
	minShares     = 2
	maxShares     = 262144
	defaultShares = 1024
	defaultWeight = 100
)

// sharesToWeight converts cgroup v1 cpu.shares to a cgroup v2 cpu.weight
// with the log-quadratic curve of opencontainers/cgroups
// ConvertCPUSharesToCgroupV2Value (v0.0.3 and later, Apache-2.0), which
// maps the minimum, the default and the maximum onto each other (2 -> 1,
// 1024 -> 100, 262144 -> 10000). 0 means unset. The runc 1.1 the guest
// runs converts the containers' own shares with the older linear formula
// (1024 -> 39); that only weighs the containers of the pod against each
// other, not the pod against anything.
func sharesToWeight(shares uint64) uint64 {
	if shares == 0 {
		return 0
	}
	if shares <= minShares {
		return minWeight
	}
	if shares >= maxShares {
		return maxWeight
	}
	l := math.Log2(float64(shares))
	exponent := (l*l+125*l)/612.0 - 7.0/34.0
	return uint64(math.Ceil(math.Pow(10, exponent)))
}

// podResources converts a ResourceInfo to the guest pod cgroup's limits
// (see above). vcpus is the guest's CPU count. It refuses values the guest
// kernel would refuse, so a change can be validated before anything is
// applied.
func podResources(r resourceinfo.Resources, vcpus uint) (*api.PodResources, error) {
	bad := func(name string, v any) error {
		return fmt.Errorf("pod cgroup %s %v: %w", name, v, errdefs.ErrInvalidArgument)
	}
	pr := &api.PodResources{}
	period := uint64(resourceinfo.DefaultCPUPeriod)
	if r.CPUPeriod != nil && *r.CPUPeriod > 0 {
		period = *r.CPUPeriod
	}
	var quota *int64
	switch {
	case r.CPUQuota != nil && *r.CPUQuota > 0:
		quota = ptr(*r.CPUQuota)
	case r.CPULimit != nil && *r.CPULimit > 0:
		quota = ptr(resourceinfo.CoresToQuota(*r.CPULimit, period))
	}
	if quota != nil {
		if period < minCPUPeriod || period > maxCPUPeriod {
			return nil, bad("cpu period (µs)", period)
		}
		// A quota below the kernel's minimum is raised to it, as DomainFor
		// does for the VM.
		pr.CpuQuota, pr.CpuPeriod = ptr(max(*quota, minCPUQuota)), ptr(period)
	}
	if r.CPUShares != nil && *r.CPUShares > 0 {
		pr.CpuWeight = ptr(sharesToWeight(*r.CPUShares))
	}
	if r.MemoryLimit != nil && *r.MemoryLimit > 0 {
		pr.MemoryMax = ptr(*r.MemoryLimit)
		if r.MemorySwapLimit != nil && *r.MemorySwapLimit > 0 {
			pr.MemorySwapMax = ptr(max(*r.MemorySwapLimit-*r.MemoryLimit, 0))
		}
	}
	if r.MemoryRequest != nil && *r.MemoryRequest > 0 {
		if r.MemoryLimit != nil && *r.MemoryLimit > 0 && *r.MemoryRequest > *r.MemoryLimit {
			return nil, bad("memory.min above memory.max", *r.MemoryRequest)
		}
		pr.MemoryMin = ptr(*r.MemoryRequest)
	}
	if r.PidLimit != nil && *r.PidLimit > 0 {
		pr.PidsMax = ptr(*r.PidLimit)
	}
	if r.CPUSetCPUs != nil && *r.CPUSetCPUs != "" && vcpus > 0 {
		set := "0"
		if vcpus > 1 {
			set = fmt.Sprintf("0-%d", vcpus-1)
		}
		pr.CpusetCpus = ptr(set)
	}
	return pr, nil
}
