// Package resourceinfo models the resources of a pod sandbox: what the pod
// asked for (pod annotations, the CRI PodSandboxConfig, the containers' OCI
// specs), how those sources combine into one set of effective limits, and how
// that set is persisted as <dir>/<sandbox-id>/resource_info.json.
//
// The effective values are what the node enforces on the pod cgroup, by
// kubelet's own rules (k8s.io/kubernetes v1.36.3: pkg/kubelet/cm
// ResourceConfigForPod, pkg/kubelet/kuberuntime applySandboxResources,
// k8s.io/component-helpers/resource PodRequests and PodLimits), unless a
// resources.* pod annotation states a pod-level value explicitly.
//
// Every value is a pointer: nil means "not set" (unlimited for a limit, no
// request for a request) and is written as JSON null, never as 0, so a reader
// can tell "no limit" from "limit of zero".
package resourceinfo

import (
	"maps"
	"math"
	"slices"
	"time"
)

// Resources is one view of resource limits: a single source (annotations,
// linux resources, overhead, one container) or the effective sandbox totals.
type Resources struct {
	// Name is a container's name (its OCI annotation
	// io.kubernetes.cri.container-name); the other views have none.
	Name string `json:"name,omitempty"`

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
	// Linux is PodSandboxConfig.linux.resources as given. Kubelet puts
	// there the sum of the containers' requests and of the limits that are
	// set, without the overhead (calculateSandboxResources,
	// ExcludeOverhead: true), or the pod-level resources.
	Linux Resources `json:"linux"`
	// Overhead is PodSandboxConfig.linux.overhead (the pod's
	// spec.overhead, from its RuntimeClass: convertOverheadToLinuxResources).
	Overhead Resources `json:"overhead"`
	// QOSClass is the pod's QoS class as its cgroup parent names it
	// (QOSFromCgroupParent), "" when it does not.
	QOSClass string `json:"qos_class,omitempty"`
	// Pod is what the sandbox has seen of the pod's containers.
	Pod Pod `json:"pod"`
}

// Source names where an effective value came from.
type Source string

const (
	// SourceAnnotation: a resources.* pod annotation.
	SourceAnnotation Source = "annotation"
	// SourceLinux: the pod cgroup as kubelet sizes it from
	// PodSandboxConfig.linux.resources and linux.overhead.
	SourceLinux Source = "linux_resources"
	// SourceContainers: the containers' own values (their OCI specs).
	SourceContainers Source = "containers"
)

// ResourceInfo is the content of resource_info.json: the effective sandbox
// values at the top level (the reference design's format) plus what they
// were computed from.
type ResourceInfo struct {
	Resources
	// QOSClass is the pod's QoS class the rules went by: from its cgroup
	// parent, or BestEffort when nothing in the pod requests or limits
	// anything.
	QOSClass *string `json:"qos_class"`
	// PodCgroup is the pod cgroup as kubelet sizes it
	// (ResourceConfigForPod), when there is a linux.resources.
	PodCgroup *Resources `json:"pod_cgroup"`
	// Annotations, LinuxResources and Overhead are the declared pod-level
	// values, as given.
	Annotations    *Resources `json:"annotations"`
	LinuxResources *Resources `json:"linux_resources"`
	Overhead       *Resources `json:"overhead"`
	// Containers are each present container's own values, by container ID.
	Containers map[string]Resources `json:"containers"`
	// InitContainers are the containers counted as init containers (see
	// Pod), by name, with the limits and requests they declared.
	InitContainers map[string]Resources `json:"init_containers"`
	Sources        map[string]Source    `json:"sources"`
	UpdatedAt      time.Time            `json:"updated_at"`
}

// Compute combines the pod spec and the containers present now (by ID)
// into the effective sandbox resources. Per field, the first source that
// sets it wins:
//
//  1. a resources.* annotation (explicit pod-level resources, like
//     Kubernetes' pod-level resources, which override the containers);
//  2. the pod cgroup as kubelet sizes it (podCgroup) from
//     linux.resources, linux.overhead, the QoS class and the containers;
//  3. the containers, as kubelet would sum them (fromContainers), when
//     there is no linux.resources for the field.
//
// When kubelet sent linux.resources (cpu_shares set: kubelet always sets
// it), 2 decides cpu and memory alone: a limit it leaves unset is no
// limit, whatever a container says.
func Compute(spec Spec, containers map[string]Resources) ResourceInfo {
	info := ResourceInfo{
		Containers:     maps.Clone(containers),
		Sources:        map[string]Source{},
		UpdatedAt:      time.Now().UTC(),
		Annotations:    nonZero(spec.Annotations),
		LinuxResources: nonZero(spec.Linux),
		Overhead:       nonZero(spec.Overhead),
	}
	kubelet := spec.Linux.CPUShares != nil
	apps, inits := spec.Pod.members(containers, kubelet)
	qos := spec.QOSClass
	if qos == "" && kubelet && bestEffort(spec.Linux, apps, inits) {
		qos = QOSBestEffort
	}
	if qos != "" {
		info.QOSClass = ptr(qos)
	}
	for k, e := range spec.Pod.Containers {
		if e.Init {
			if info.InitContainers == nil {
				info.InitContainers = map[string]Resources{}
			}
			info.InitContainers[k] = e.Own.amount().resources()
		}
	}
	var cg Resources
	if !spec.Linux.IsZero() {
		cg = podCgroup(spec, qos, apps, inits)
		c := cg
		info.PodCgroup = &c
	}
	ctr := fromContainers(spec.Overhead, apps, inits)
	ann := annotationCgroup(spec.Annotations)

	eff := &info.Resources
	src := info.Sources
	// The cgroup values come with their raw fields from the same source.
	switch s := pick(src, "cpu_limit", &eff.CPULimit, ann.CPULimit, cg.CPULimit, kubelet, ctr.CPULimit); s {
	case SourceAnnotation:
		eff.CPUQuota, eff.CPUPeriod = ann.CPUQuota, ann.CPUPeriod
	case SourceLinux:
		eff.CPUQuota, eff.CPUPeriod = cg.CPUQuota, cg.CPUPeriod
	case SourceContainers:
		eff.CPUQuota, eff.CPUPeriod = ctr.CPUQuota, ctr.CPUPeriod
	}
	// cpu_shares decide cpu_request; MinShares is no request.
	switch {
	case ann.CPUShares != nil:
		eff.CPUShares, eff.CPURequest, src["cpu_request"] = ann.CPUShares, ann.CPURequest, SourceAnnotation
	case cg.CPUShares != nil || kubelet:
		eff.CPUShares, eff.CPURequest = cg.CPUShares, cg.CPURequest
		if eff.CPURequest != nil {
			src["cpu_request"] = SourceLinux
		}
	case ctr.CPUShares != nil:
		eff.CPUShares, eff.CPURequest = ctr.CPUShares, ctr.CPURequest
		if eff.CPURequest != nil {
			src["cpu_request"] = SourceContainers
		}
	}
	pick(src, "memory_limit", &eff.MemoryLimit, ann.MemoryLimit, cg.MemoryLimit, kubelet, ctr.MemoryLimit)
	pick(src, "memory_request", &eff.MemoryRequest, ann.MemoryRequest, cg.MemoryRequest, kubelet, ctr.MemoryRequest)
	pick(src, "pid_limit", &eff.PidLimit, ann.PidLimit, cg.PidLimit, false, ctr.PidLimit)
	pick(src, "memory_swap_limit", &eff.MemorySwapLimit, ann.MemorySwapLimit, cg.MemorySwapLimit, false, nil)
	pick(src, "storage_limit", &eff.StorageLimit, ann.StorageLimit, nil, false, nil)
	pick(src, "network_bandwidth", &eff.NetworkBandwidth, ann.NetworkBandwidth, nil, false, nil)
	pick(src, "disk_read_bps", &eff.DiskReadBps, ann.DiskReadBps, nil, false, nil)
	pick(src, "disk_write_bps", &eff.DiskWriteBps, ann.DiskWriteBps, nil, false, nil)
	pick(src, "disk_read_iops", &eff.DiskReadIOPS, ann.DiskReadIOPS, nil, false, nil)
	pick(src, "disk_write_iops", &eff.DiskWriteIOPS, ann.DiskWriteIOPS, nil, false, nil)
	// A direction without its own limit inherits the total bandwidth.
	pick(src, "network_ingress_bps", &eff.NetworkIngressBps, firstSet(ann.NetworkIngressBps, ann.NetworkBandwidth), nil, false, nil)
	pick(src, "network_egress_bps", &eff.NetworkEgressBps, firstSet(ann.NetworkEgressBps, ann.NetworkBandwidth), nil, false, nil)

	// cpuset, hugepages and unified are pod cgroup settings: linux only.
	eff.CPUSetCPUs, eff.CPUSetMems = copyPtr(cg.CPUSetCPUs), copyPtr(cg.CPUSetMems)
	eff.HugepageLimits, eff.Unified = maps.Clone(cg.HugepageLimits), maps.Clone(cg.Unified)
	return info
}

// pick sets *dst to a copy of the first set of a (annotation), l (the pod
// cgroup) and c (containers), and records that source under name.
// lDecides makes l decide even when it is nil (no limit).
func pick[T any](sources map[string]Source, name string, dst **T, a, l *T, lDecides bool, c *T) Source {
	switch {
	case a != nil:
		*dst, sources[name] = copyPtr(a), SourceAnnotation
		return SourceAnnotation
	case l != nil:
		*dst, sources[name] = copyPtr(l), SourceLinux
		return SourceLinux
	case lDecides:
		return ""
	case c != nil:
		*dst, sources[name] = copyPtr(c), SourceContainers
		return SourceContainers
	}
	return ""
}

// annotationCgroup is what the annotations give a cgroup: their values as
// stated, with the raw CPU fields kubelet's conversions give them.
func annotationCgroup(a Resources) Resources {
	r := a
	r.CPUShares, r.CPUQuota, r.CPUPeriod = nil, nil, nil
	if a.CPULimit != nil {
		r.CPUPeriod = ptr(uint64(DefaultCPUPeriod))
		r.CPUQuota = ptr(MilliCPUToQuota(coresToMilli(*a.CPULimit), DefaultCPUPeriod))
	}
	if a.CPURequest != nil {
		r.CPUShares = ptr(MilliCPUToShares(coresToMilli(*a.CPURequest)))
	}
	return r
}

// podCgroup sizes the pod cgroup as kubelet's ResourceConfigForPod
// (pkg/kubelet/cm/helpers_linux.go) does, from what kubelet sent:
//
//   - linux.resources has the containers' requests and the limits that are
//     set, without the overhead; linux.overhead has the overhead, as
//     request and limit (kuberuntime_sandbox_linux.go). The pod cgroup adds
//     them up: ResourceConfigForPod uses PodRequests and PodLimits with the
//     overhead (the overhead adds to a limit only where there is one).
//   - cpu.shares = MilliCPUToShares(requests + overhead); MinShares for a
//     BestEffort pod, overhead or not.
//   - a CFS quota, MilliCPUToQuota(limits + overhead) (at least 1 ms), and a
//     memory limit only when every container has a limit of its own
//     (cpuLimitsDeclared, memoryLimitsDeclared; ContainerFn sees each app
//     container, sidecar, and init container with the sidecars before it),
//     or the pod is Guaranteed. kubelet's linux.resources carries the sum of
//     the limits that are set: with one container without a limit, the pod
//     cgroup has none although linux.resources has one. Until the first
//     container is created the sandboxer cannot tell, and keeps the limit.
//   - the request in cores is SharesToMilliCPU of the shares (kubelet's
//     CPURequestsFromConfig), the limit QuotaToMilliCPU of the quota
//     (CPULimitsFromConfig).
//
// Without cpu_shares, linux.resources did not come from kubelet: its
// limits are then explicit pod values and no container's limit is
// checked; overhead is added all the same.
func podCgroup(spec Spec, qos string, apps, inits []amount) Resources {
	l, o := spec.Linux, spec.Overhead
	kubelet := l.CPUShares != nil
	period := uint64(DefaultCPUPeriod)
	if l.CPUPeriod != nil && *l.CPUPeriod > 0 {
		period = *l.CPUPeriod
	}
	oLimit, oRequest := overheadMilliCPU(o)
	cpuDecl, memDecl, _ := declared(apps, inits)
	if !kubelet || qos == QOSGuaranteed {
		cpuDecl, memDecl = true, true
	}
	var cg Resources
	switch {
	case qos == QOSBestEffort:
		cg.CPUShares = ptr(uint64(MinShares))
	case l.CPUShares != nil && oRequest == 0:
		cg.CPUShares = ptr(min(max(*l.CPUShares, MinShares), MaxShares))
	case l.CPUShares != nil:
		cg.CPUShares = ptr(MilliCPUToShares(addSat(requestMilliCPU(*l.CPUShares), oRequest)))
	}
	if cg.CPUShares != nil && *cg.CPUShares > MinShares {
		cg.CPURequest = ptr(float64(SharesToMilliCPU(*cg.CPUShares)) / MilliCPUToCPU)
	}
	if qos != QOSBestEffort && cpuDecl && l.CPUQuota != nil && *l.CPUQuota > 0 {
		q := max(*l.CPUQuota, MinQuotaPeriod)
		if oLimit > 0 {
			q = MilliCPUToQuota(addSat(QuotaToMilliCPU(*l.CPUQuota, period), oLimit), period)
		}
		cg.CPUQuota, cg.CPUPeriod = ptr(q), ptr(period)
		cg.CPULimit = ptr(float64(QuotaToMilliCPU(q, period)) / MilliCPUToCPU)
	}
	if qos != QOSBestEffort && memDecl && l.MemoryLimit != nil && *l.MemoryLimit > 0 {
		cg.MemoryLimit = ptr(addSat(*l.MemoryLimit, deref(o.MemoryLimit)))
	}
	if l.MemoryRequest != nil {
		// memory.min (MemoryQoS): kubelet's includes the overhead.
		cg.MemoryRequest = ptr(addSat(*l.MemoryRequest, deref(o.MemoryRequest)))
	}
	cg.PidLimit, cg.MemorySwapLimit = copyPtr(l.PidLimit), copyPtr(l.MemorySwapLimit)
	cg.CPUSetCPUs, cg.CPUSetMems = copyPtr(l.CPUSetCPUs), copyPtr(l.CPUSetMems)
	cg.HugepageLimits, cg.Unified = maps.Clone(l.HugepageLimits), maps.Clone(l.Unified)
	return cg
}

// bestEffort reports whether nothing in the pod requests or limits CPU or
// memory (v1qos.GetPodQOS), for a pod whose cgroup parent does not say:
// linux.resources has only the minimum shares, and no container has more.
// A pod whose containers request only memory reads as BestEffort too (on
// cgroup v1 kubelet sends memory requests nowhere), which differs only
// when it has a CPU overhead.
func bestEffort(l Resources, apps, inits []amount) bool {
	if (l.CPUShares != nil && *l.CPUShares > MinShares) || l.CPUQuota != nil || l.MemoryLimit != nil {
		return false
	}
	for _, m := range slices.Concat(apps, inits) {
		if m.hasCPULimit || m.hasMemLimit || m.hasCPURequest || m.hasMemRequest {
			return false
		}
	}
	return true
}

// fromContainers sums the containers as kubelet's PodRequests and
// PodLimits do (the larger of the app containers' sum and each init
// container's use), plus the overhead: a limit only when every container
// has one; a request when any container or the overhead has one. For
// pods without linux.resources (a CRI client other than kubelet).
func fromContainers(o Resources, apps, inits []amount) Resources {
	var r Resources
	if len(apps)+len(inits) == 0 {
		return r
	}
	t := total(apps, inits)
	cpuDecl, memDecl, pidDecl := declared(apps, inits)
	oLimit, oRequest := overheadMilliCPU(o)
	if cpuDecl {
		q := MilliCPUToQuota(addSat(t.cpuLimit, oLimit), DefaultCPUPeriod)
		r.CPUQuota, r.CPUPeriod = ptr(q), ptr(uint64(DefaultCPUPeriod))
		r.CPULimit = ptr(float64(QuotaToMilliCPU(q, DefaultCPUPeriod)) / MilliCPUToCPU)
	}
	if t.hasCPURequest || oRequest > 0 {
		s := MilliCPUToShares(addSat(t.cpuRequest, oRequest))
		r.CPUShares = ptr(s)
		if s > MinShares {
			r.CPURequest = ptr(float64(SharesToMilliCPU(s)) / MilliCPUToCPU)
		}
	}
	if memDecl {
		r.MemoryLimit = ptr(addSat(t.memLimit, deref(o.MemoryLimit)))
	}
	if t.hasMemRequest || o.MemoryRequest != nil {
		r.MemoryRequest = ptr(addSat(t.memRequest, deref(o.MemoryRequest)))
	}
	if pidDecl {
		r.PidLimit = ptr(t.pids)
	}
	return r
}

// overheadMilliCPU is the overhead's CPU as a limit (its quota) and as a
// request (its shares), in millicores. Kubelet sends both for the same
// value (convertOverheadToLinuxResources: "requests == limits").
func overheadMilliCPU(o Resources) (limit, request int64) {
	a := amountOf(o)
	return a.cpuLimit, a.cpuRequest
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

// QuotaToCores converts a CFS quota and period to cores, in whole
// millicores as kubelet's QuotaToMilliCPU truncates them.
func QuotaToCores(quota int64, period uint64) float64 {
	return float64(QuotaToMilliCPU(quota, period)) / MilliCPUToCPU
}

// CoresToQuota converts cores to a CFS quota for period, saturating at
// MaxInt64. Unlike MilliCPUToQuota it keeps fractions of a millicore and
// values below the kernel's minimum.
func CoresToQuota(cores float64, period uint64) int64 {
	q := math.Round(cores * float64(period))
	if q >= math.MaxInt64 { // 2^63 as a float64
		return math.MaxInt64
	}
	return int64(q)
}

// SharesToCores converts cpu.shares to a CPU request in cores, as kubelet's
// SharesToMilliCPU does. MinShares and below is kubelet's "no request": 0.
func SharesToCores(shares uint64) float64 {
	return float64(requestMilliCPU(shares)) / MilliCPUToCPU
}

// CoresToShares converts a CPU request to cpu.shares as kubelet's
// MilliCPUToShares does.
func CoresToShares(cores float64) uint64 {
	return MilliCPUToShares(coresToMilli(cores))
}

func nonZero(r Resources) *Resources {
	if r.IsZero() {
		return nil
	}
	return &r
}

func deref(p *int64) int64 {
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
