// Package resourceinfo models the resources of a pod sandbox: what the pod
// asked for (pod annotations, the CRI PodSandboxConfig, the containers' OCI
// specs), how those sources combine into one set of effective limits, and how
// that set is persisted as <dir>/<sandbox-id>/resource_info.json.
//
// Every value is a pointer: nil means "not set" (unlimited for a limit, no
// request for a request) and is written as JSON null, never as 0, so a reader
// can tell "no limit" from "limit of zero".
package resourceinfo

import (
	"maps"
	"math"
	"time"
)

// Kubernetes conversion constants (pkg/kubelet/cm/helpers_linux.go).
const (
	// SharesPerCPU is the cgroup v1 cpu.shares value of one core.
	SharesPerCPU = 1024
	// MinShares is what kubelet gives a container without a CPU request.
	MinShares = 2
	// MaxShares is the largest cpu.shares (the kernel's and kubelet's).
	MaxShares = 262144
	// DefaultCPUPeriod is the CFS period kubelet and runc use (100ms).
	DefaultCPUPeriod = 100000
)

// Resources is one view of resource limits: a single source (annotations,
// linux resources, overhead, one container) or the effective sandbox totals.
type Resources struct {
	// Derived values, in the units of the reference design.
	CPULimit      *float64 `json:"cpu_limit"`      // cores
	CPURequest    *float64 `json:"cpu_request"`    // cores
	MemoryLimit   *int64   `json:"memory_limit"`   // bytes
	MemoryRequest *int64   `json:"memory_request"` // bytes
	PidLimit      *int64   `json:"pid_limit"`

	// Raw cgroup values the derived ones came from (or, for derived-only
	// sources such as annotations, the values a cgroup would be given).
	CPUShares       *uint64           `json:"cpu_shares"`
	CPUQuota        *int64            `json:"cpu_quota"`  // microseconds per period
	CPUPeriod       *uint64           `json:"cpu_period"` // microseconds
	CPUSetCPUs      *string           `json:"cpuset_cpus"`
	CPUSetMems      *string           `json:"cpuset_mems"`
	MemorySwapLimit *int64            `json:"memory_swap_limit"` // bytes, memory+swap as in cgroup v1
	HugepageLimits  map[string]uint64 `json:"hugepage_limits"`   // page size ("2MB") -> bytes
	Unified         map[string]string `json:"unified"`           // cgroup v2 key -> value

	// Limits only pods carry (annotations); the vm backend enforces them.
	StorageLimit      *int64 `json:"storage_limit"`       // bytes
	NetworkBandwidth  *int64 `json:"network_bandwidth"`   // bits/s, both directions
	NetworkIngressBps *int64 `json:"network_ingress_bps"` // bits/s
	NetworkEgressBps  *int64 `json:"network_egress_bps"`  // bits/s
	DiskReadBps       *int64 `json:"disk_read_bps"`       // bytes/s
	DiskWriteBps      *int64 `json:"disk_write_bps"`      // bytes/s
	DiskReadIOPS      *int64 `json:"disk_read_iops"`
	DiskWriteIOPS     *int64 `json:"disk_write_iops"`
}

// Spec holds the pod-level inputs of a sandbox, kept apart so the effective
// values can be recomputed whenever a container or a resize changes them.
type Spec struct {
	// Annotations are the values of the resources.* pod annotations.
	Annotations Resources `json:"annotations"`
	// Linux is PodSandboxConfig.linux.resources: the pod cgroup kubelet
	// computed (sum of containers plus overhead, or pod-level resources).
	Linux Resources `json:"linux"`
	// Overhead is PodSandboxConfig.linux.overhead (RuntimeClass overhead).
	Overhead Resources `json:"overhead"`
}

// Source names where an effective value came from.
type Source string

const (
	SourceAnnotation Source = "annotation"
	SourceLinux      Source = "linux_resources"
	SourceContainers Source = "containers"
)

// ResourceInfo is the content of resource_info.json: the effective sandbox
// values at the top level (the reference design's format) plus what they
// were computed from.
type ResourceInfo struct {
	Resources
	Overhead   *Resources           `json:"overhead"`
	Containers map[string]Resources `json:"containers"`
	Sources    map[string]Source    `json:"sources"`
	UpdatedAt  time.Time            `json:"updated_at"`
}

// Compute combines the pod spec and the containers into the effective
// sandbox resources. Per field, the first source that sets it wins:
//
//  1. a resources.* annotation (explicit pod-level resources, like
//     Kubernetes' pod-level resources, which override the containers);
//  2. PodSandboxConfig.linux.resources (the pod cgroup kubelet computed);
//  3. the containers, as kubelet sizes a pod cgroup: a limit is the sum of
//     the containers' limits plus the overhead only if every container has
//     one (one unlimited container makes the pod unlimited); a request is
//     the sum of the requests plus the overhead.
//
// Overhead is added only in case 3: kubelet already includes it in 2, and
// annotations state the pod total.
func Compute(spec Spec, containers map[string]Resources) ResourceInfo {
	agg := aggregate(spec.Overhead, containers)
	info := ResourceInfo{
		Containers: maps.Clone(containers),
		Sources:    map[string]Source{},
		UpdatedAt:  time.Now().UTC(),
	}
	if !spec.Overhead.IsZero() {
		o := spec.Overhead
		info.Overhead = &o
	}
	eff := &info.Resources
	ann, lin := &spec.Annotations, &spec.Linux

	pick(info.Sources, "cpu_limit", &eff.CPULimit, ann.CPULimit, lin.CPULimit, agg.CPULimit)
	pick(info.Sources, "cpu_request", &eff.CPURequest, ann.CPURequest, lin.CPURequest, agg.CPURequest)
	pick(info.Sources, "memory_limit", &eff.MemoryLimit, ann.MemoryLimit, lin.MemoryLimit, agg.MemoryLimit)
	pick(info.Sources, "memory_request", &eff.MemoryRequest, ann.MemoryRequest, lin.MemoryRequest, agg.MemoryRequest)
	pick(info.Sources, "pid_limit", &eff.PidLimit, ann.PidLimit, lin.PidLimit, agg.PidLimit)
	pick(info.Sources, "memory_swap_limit", &eff.MemorySwapLimit, ann.MemorySwapLimit, lin.MemorySwapLimit, nil)
	pick(info.Sources, "storage_limit", &eff.StorageLimit, ann.StorageLimit, nil, nil)
	pick(info.Sources, "network_bandwidth", &eff.NetworkBandwidth, ann.NetworkBandwidth, nil, nil)
	pick(info.Sources, "disk_read_bps", &eff.DiskReadBps, ann.DiskReadBps, nil, nil)
	pick(info.Sources, "disk_write_bps", &eff.DiskWriteBps, ann.DiskWriteBps, nil, nil)
	pick(info.Sources, "disk_read_iops", &eff.DiskReadIOPS, ann.DiskReadIOPS, nil, nil)
	pick(info.Sources, "disk_write_iops", &eff.DiskWriteIOPS, ann.DiskWriteIOPS, nil, nil)
	// A direction without its own limit inherits the total bandwidth.
	pick(info.Sources, "network_ingress_bps", &eff.NetworkIngressBps, firstSet(ann.NetworkIngressBps, ann.NetworkBandwidth), nil, nil)
	pick(info.Sources, "network_egress_bps", &eff.NetworkEgressBps, firstSet(ann.NetworkEgressBps, ann.NetworkBandwidth), nil, nil)

	// cpuset, hugepages and unified are pod cgroup settings: linux only.
	eff.CPUSetCPUs, eff.CPUSetMems = copyPtr(lin.CPUSetCPUs), copyPtr(lin.CPUSetMems)
	eff.HugepageLimits, eff.Unified = maps.Clone(lin.HugepageLimits), maps.Clone(lin.Unified)

	// Raw CPU values: the source's own when the winner had them, otherwise
	// what a cgroup gets for the effective cores.
	eff.CPUPeriod = copyPtr(lin.CPUPeriod)
	if info.Sources["cpu_limit"] != SourceLinux {
		eff.CPUPeriod = nil
	}
	if eff.CPULimit != nil {
		if eff.CPUPeriod == nil {
			eff.CPUPeriod = ptr(uint64(DefaultCPUPeriod))
		}
		if info.Sources["cpu_limit"] == SourceLinux && lin.CPUQuota != nil {
			// As given: the cores are rounded to millicores.
			eff.CPUQuota = copyPtr(lin.CPUQuota)
		} else {
			eff.CPUQuota = ptr(CoresToQuota(*eff.CPULimit, *eff.CPUPeriod))
		}
	}
	if info.Sources["cpu_request"] == SourceLinux {
		eff.CPUShares = copyPtr(lin.CPUShares)
	} else if eff.CPURequest != nil {
		eff.CPUShares = ptr(CoresToShares(*eff.CPURequest))
	}
	return info
}

// pick sets *dst to a copy of the first set of a (annotation), l (linux
// resources) and c (containers), and records that source under name.
func pick[T any](sources map[string]Source, name string, dst **T, a, l, c *T) {
	for _, s := range []struct {
		v   *T
		src Source
	}{{a, SourceAnnotation}, {l, SourceLinux}, {c, SourceContainers}} {
		if s.v != nil {
			*dst, sources[name] = copyPtr(s.v), s.src
			return
		}
	}
}

// aggregate sums the containers plus overhead the way kubelet sizes a pod.
func aggregate(overhead Resources, containers map[string]Resources) Resources {
	var agg Resources
	if len(containers) == 0 {
		return agg
	}
	var (
		cpuLim, cpuReq     = overheadF(overhead.CPULimit), overheadF(overhead.CPURequest)
		memLim, memReq     = overheadI(overhead.MemoryLimit), overheadI(overhead.MemoryRequest)
		pids               int64
		allCPU, allMem     = true, true
		allPids            = true
		anyCPUReq, anyMemR = overhead.CPURequest != nil, overhead.MemoryRequest != nil
	)
	for _, c := range containers {
		if c.CPULimit == nil {
			allCPU = false
		} else {
			cpuLim += *c.CPULimit
		}
		if c.MemoryLimit == nil {
			allMem = false
		} else {
			memLim = addSat(memLim, *c.MemoryLimit)
		}
		if c.PidLimit == nil {
			allPids = false
		} else {
			pids = addSat(pids, *c.PidLimit)
		}
		if c.CPURequest != nil {
			cpuReq += *c.CPURequest
			anyCPUReq = true
		}
		if c.MemoryRequest != nil {
			memReq = addSat(memReq, *c.MemoryRequest)
			anyMemR = true
		}
	}
	if allCPU {
		agg.CPULimit = ptr(roundMilli(cpuLim))
	}
	if allMem {
		agg.MemoryLimit = ptr(memLim)
	}
	if allPids {
		agg.PidLimit = ptr(pids)
	}
	if anyCPUReq {
		agg.CPURequest = ptr(roundMilli(cpuReq))
	}
	if anyMemR {
		agg.MemoryRequest = ptr(memReq)
	}
	return agg
}

// IsZero reports whether no field is set.
func (r Resources) IsZero() bool {
	return r.CPULimit == nil && r.CPURequest == nil && r.MemoryLimit == nil && r.MemoryRequest == nil &&
		r.PidLimit == nil && r.CPUShares == nil && r.CPUQuota == nil && r.CPUPeriod == nil &&
		r.CPUSetCPUs == nil && r.CPUSetMems == nil && r.MemorySwapLimit == nil &&
		len(r.HugepageLimits) == 0 && len(r.Unified) == 0 && r.StorageLimit == nil &&
		r.NetworkBandwidth == nil && r.NetworkIngressBps == nil && r.NetworkEgressBps == nil &&
		r.DiskReadBps == nil && r.DiskWriteBps == nil && r.DiskReadIOPS == nil && r.DiskWriteIOPS == nil
}

// QuotaToCores converts a CFS quota and period to cores, rounded to
// millicores as kubelet does.
func QuotaToCores(quota int64, period uint64) float64 {
	return roundMilli(float64(quota) / float64(period))
}

// CoresToQuota converts cores to a CFS quota for period, saturating at
// MaxInt64.
func CoresToQuota(cores float64, period uint64) int64 {
	q := math.Round(cores * float64(period))
	if q >= math.MaxInt64 { // 2^63 as a float64
		return math.MaxInt64
	}
	return int64(q)
}

// SharesToCores converts cpu.shares to a CPU request in cores, rounding up
// to millicores as kubelet's sharesToMilliCPU does so that it inverts
// CoresToShares. MinShares and below is kubelet's "no request".
func SharesToCores(shares uint64) float64 {
	if shares <= MinShares {
		return 0
	}
	return math.Ceil(float64(shares)*1000/SharesPerCPU) / 1000
}

// CoresToShares converts a CPU request to cpu.shares as kubelet's
// MilliCPUToShares does: milliCPU * 1024 / 1000, truncated, within
// [MinShares, MaxShares].
func CoresToShares(cores float64) uint64 {
	if cores >= MaxShares/SharesPerCPU {
		return MaxShares
	}
	s := int64(math.Round(cores*1000)) * SharesPerCPU / 1000
	if s < MinShares {
		return MinShares
	}
	return uint64(s)
}

func roundMilli(f float64) float64 { return math.Round(f*1000) / 1000 }

func overheadF(p *float64) float64 {
	if p == nil {
		return 0
	}
	return *p
}

func overheadI(p *int64) int64 {
	if p == nil {
		return 0
	}
	return *p
}

// addSat adds two non-negative values, saturating at MaxInt64 so a sum of
// huge limits stays "huge" instead of wrapping negative.
func addSat(a, b int64) int64 {
	if a > math.MaxInt64-b {
		return math.MaxInt64
	}
	return a + b
}

func ptr[T any](v T) *T { return &v }

func firstSet[T any](ps ...*T) *T {
	for _, p := range ps {
		if p != nil {
			return p
		}
	}
	return nil
}

func copyPtr[T any](p *T) *T {
	if p == nil {
		return nil
	}
	v := *p
	return &v
}
