package resourceinfo

import (
	"maps"
	"math"
	"reflect"
	"slices"
)

// AnnotationContainerName is the OCI annotation in which containerd's CRI
// names a container (its ContainerConfig.metadata.name, the name in the
// pod spec).
const AnnotationContainerName = "io.kubernetes.cri.container-name"

// maxPodContainers bounds a sandbox's container history: a pod spec has a
// handful of containers, a CRI client creating ever new names does not get
// to grow the state without end.
const maxPodContainers = 256

// Pod is what a sandbox has seen of its pod's containers over its life,
// by container name. Kubelet sizes a pod cgroup from the whole pod spec,
// init containers included, once; a sandboxer sees containers one at a
// time, and containerd deletes a container's task as soon as it exits. So
// that the pod-level rules can still be applied after a container is
// gone, the sandbox keeps this record in its state.
//
// The CRI tells a runtime nothing about which container is an init
// container: ContainerConfig has no such field, and neither kubelet's
// labels and annotations (kuberuntime/labels.go) nor containerd's say so.
// What does tell is the order kubelet starts them in
// (kuberuntime_manager.go computePodActions): init containers one at a
// time, each only after the one before it exited 0; sidecars (init
// containers with restartPolicy Always) in that order and left running;
// the app containers only once every init container has completed. So a
// container is counted as an init container when it exited with status 0
// before a container of a name not seen before was created. An app
// container that exits 0 is counted as one only if a new container name
// appears after that (an ephemeral debug container, or a CRI client
// creating containers one after another).
type Pod struct {
	Containers map[string]PodContainer `json:"containers,omitempty"`
	// Seq numbers the containers in the order they were created.
	Seq uint64 `json:"seq,omitempty"`
}

// PodContainer is one container of the pod as the sandbox has seen it.
type PodContainer struct {
	// ID is the container (of this name) the sandbox saw last.
	ID string `json:"id"`
	// Seq is when it was created, in the pod's creation order.
	Seq uint64 `json:"seq"`
	// Own are its own amounts, as last created or updated.
	Own Amounts `json:"own"`
	// Alongside sums the amounts of the containers that were running when
	// it was created: for an init container, the sidecars started before
	// it, which kubelet adds to it (component-helpers
	// resource.AggregateContainerLimits).
	Alongside *Amounts `json:"alongside,omitempty"`
	// Completed: it exited with status 0.
	Completed bool `json:"completed,omitempty"`
	// Init: it completed before a new container name appeared, so it is
	// counted as an init container.
	Init bool `json:"init,omitempty"`
}

// Amounts is what a container adds to its pod, as the history keeps it:
// what is unset is left out, so that a pod's record stays small.
type Amounts struct {
	CPULimit      *int64 `json:"cpu_limit_millicores,omitempty"`
	CPURequest    *int64 `json:"cpu_request_millicores,omitempty"`
	MemoryLimit   *int64 `json:"memory_limit,omitempty"`
	MemoryRequest *int64 `json:"memory_request,omitempty"`
	PidLimit      *int64 `json:"pid_limit,omitempty"`
}

// Observed is what the pod history needs to know of a present container.
type Observed struct {
	Resources Resources
	// Exited with ExitStatus: its process ended (its task is not deleted
	// yet).
	Exited     bool
	ExitStatus uint32
}

// key is the name a container is recorded by: its container name, or for
// containers created without one (the task API alone) its ID.
func key(id string, r Resources) string {
	if r.Name != "" {
		return r.Name
	}
	return "#" + id
}

// keyFor is the key of container id in the history: the one it is
// recorded under (an update of its resources may carry no name), else
// key(id, r).
func (p Pod) keyFor(id string, r Resources, byID map[string]string) string {
	if k, ok := byID[id]; ok {
		return k
	}
	return key(id, r)
}

// byID maps each recorded container ID to its key.
func (p Pod) byID() map[string]string {
	m := make(map[string]string, len(p.Containers))
	for k, e := range p.Containers {
		m[e.ID] = k
	}
	return m
}

// Observe records the containers present now (by ID) in the history and
// returns the new history and whether it changed. It is idempotent:
// observing the same containers again changes nothing. p itself is not
// modified.
func (p Pod) Observe(present map[string]Observed) (Pod, bool) {
	next := Pod{Containers: maps.Clone(p.Containers), Seq: p.Seq}
	if next.Containers == nil {
		next.Containers = map[string]PodContainer{}
	}
	ids := slices.Sorted(maps.Keys(present))
	byID := p.byID()
	keys := make(map[string]string, len(ids))
	created := map[string]bool{}
	for _, id := range ids {
		keys[id] = p.keyFor(id, present[id].Resources, byID)
		if e, ok := next.Containers[keys[id]]; !ok || e.ID != id {
			created[id] = true
		}
	}
	// The containers that ran before this observation: the sidecars of a
	// new init container.
	var running amount
	for _, id := range ids {
		if o := present[id]; !created[id] && !o.Exited {
			running = running.plus(amountOf(o.Resources))
		}
	}
	for _, id := range ids {
		o := present[id]
		k := keys[id]
		own := amountOf(o.Resources).amounts()
		if !created[id] {
			e := next.Containers[k]
			if !reflect.DeepEqual(e.Own, own) {
				e.Own = own
			}
			if o.Exited && o.ExitStatus == 0 {
				e.Completed = true
			}
			next.Containers[k] = e
			continue
		}
		if _, seen := next.Containers[k]; !seen {
			// A name not seen before: what completed before it were init
			// containers.
			for ok, e := range next.Containers {
				if e.Completed && !e.Init {
					e.Init = true
					next.Containers[ok] = e
				}
			}
		}
		next.Seq++
		alongside := running
		if e, ok := next.Containers[k]; ok {
			// A restart: the container it replaces did not run alongside.
			if _, was := present[e.ID]; was && !created[e.ID] && !present[e.ID].Exited {
				alongside = alongside.minus(amountOf(present[e.ID].Resources))
			}
		}
		e := PodContainer{ID: id, Seq: next.Seq, Own: own}
		if a := alongside.amounts(); a != (Amounts{}) {
			e.Alongside = &a
		}
		next.Containers[k] = e
	}
	next.prune(present)
	if reflect.DeepEqual(next, p) || (len(next.Containers) == 0 && len(p.Containers) == 0 && next.Seq == p.Seq) {
		return p, false
	}
	return next, true
}

// prune forgets what no rule needs: containers without a name (keyed by
// their ID, so never seen again) that are gone and did not complete, and
// beyond maxPodContainers the oldest of those gone.
func (p *Pod) prune(present map[string]Observed) {
	gone := func(_ string, e PodContainer) bool {
		_, ok := present[e.ID]
		return !ok
	}
	for k, e := range p.Containers {
		if k[0] == '#' && !e.Completed && gone(k, e) {
			delete(p.Containers, k)
		}
	}
	for len(p.Containers) > maxPodContainers {
		oldest, found := "", false
		for k, e := range p.Containers {
			if gone(k, e) && (!found || e.Seq < p.Containers[oldest].Seq) {
				oldest, found = k, true
			}
		}
		if !found {
			return
		}
		delete(p.Containers, oldest)
	}
}

// members are the containers kubelet's ResourceConfigForPod checks for
// limits (its ContainerFn), and the amounts they add up to:
//   - apps: the app containers and sidecars present now (a present
//     container recorded as an init container is not one of them) and,
//     with all set, also those of the history that are gone;
//   - inits: each init container with the sidecars that ran alongside it
//     (AggregateContainerLimits: an init container uses itself plus the
//     restartable init containers before it).
func (p Pod) members(present map[string]Resources, all bool) (apps, inits []amount) {
	initIDs := map[string]bool{}
	for _, k := range slices.Sorted(maps.Keys(p.Containers)) {
		e := p.Containers[k]
		if e.Init {
			initIDs[e.ID] = true
			use := e.Own.amount()
			if e.Alongside != nil {
				use = use.plus(e.Alongside.amount())
			}
			inits = append(inits, use)
		}
	}
	presentKeys := map[string]bool{}
	byID := p.byID()
	for _, id := range slices.Sorted(maps.Keys(present)) {
		r := present[id]
		presentKeys[p.keyFor(id, r, byID)] = true
		if initIDs[id] {
			continue
		}
		apps = append(apps, amountOf(r))
	}
	if all {
		for _, k := range slices.Sorted(maps.Keys(p.Containers)) {
			if e := p.Containers[k]; !e.Init && !presentKeys[k] && k[0] != '#' {
				apps = append(apps, e.Own.amount())
			}
		}
	}
	return apps, inits
}

// amount is the part of Resources that adds up across containers, in
// kubelet's units: millicores and bytes.
type amount struct {
	cpuLimit, cpuRequest       int64 // millicores
	memLimit, memRequest, pids int64
	// A limit is declared when it is set and not zero (kubelet:
	// res.Cpu().IsZero()); a request when it is set.
	hasCPULimit, hasMemLimit, hasPids bool
	hasCPURequest, hasMemRequest      bool
}

// amountOf reads a container's amounts: CPU from its raw cgroup values
// when it has them (kubelet's conversions), else from its cores.
func amountOf(r Resources) amount {
	var a amount
	switch {
	case r.CPUQuota != nil && *r.CPUQuota > 0 && r.CPUPeriod != nil:
		a.cpuLimit, a.hasCPULimit = QuotaToMilliCPU(*r.CPUQuota, *r.CPUPeriod), true
	case r.CPULimit != nil && *r.CPULimit > 0:
		a.cpuLimit, a.hasCPULimit = coresToMilli(*r.CPULimit), true
	}
	switch {
	case r.CPUShares != nil:
		a.cpuRequest = requestMilliCPU(*r.CPUShares)
		a.hasCPURequest = a.cpuRequest > 0
	case r.CPURequest != nil:
		a.cpuRequest, a.hasCPURequest = coresToMilli(*r.CPURequest), true
	}
	if r.MemoryLimit != nil && *r.MemoryLimit > 0 {
		a.memLimit, a.hasMemLimit = *r.MemoryLimit, true
	}
	if r.MemoryRequest != nil {
		a.memRequest, a.hasMemRequest = *r.MemoryRequest, true
	}
	if r.PidLimit != nil && *r.PidLimit > 0 {
		a.pids, a.hasPids = *r.PidLimit, true
	}
	return a
}

func (a amount) plus(b amount) amount { return a.combine(b, addSat) }

// combine joins a and b amount by amount with f; what either has set is set.
func (a amount) combine(b amount, f func(x, y int64) int64) amount {
	return amount{
		cpuLimit: f(a.cpuLimit, b.cpuLimit), cpuRequest: f(a.cpuRequest, b.cpuRequest),
		memLimit: f(a.memLimit, b.memLimit), memRequest: f(a.memRequest, b.memRequest),
		pids:        f(a.pids, b.pids),
		hasCPULimit: a.hasCPULimit || b.hasCPULimit, hasMemLimit: a.hasMemLimit || b.hasMemLimit,
		hasPids: a.hasPids || b.hasPids, hasCPURequest: a.hasCPURequest || b.hasCPURequest,
		hasMemRequest: a.hasMemRequest || b.hasMemRequest,
	}
}

// minus takes b, which is part of a, out of a again.
func (a amount) minus(b amount) amount {
	a.cpuLimit, a.cpuRequest = max(a.cpuLimit-b.cpuLimit, 0), max(a.cpuRequest-b.cpuRequest, 0)
	a.memLimit, a.memRequest = max(a.memLimit-b.memLimit, 0), max(a.memRequest-b.memRequest, 0)
	a.pids = max(a.pids-b.pids, 0)
	a.hasCPULimit, a.hasCPURequest = a.cpuLimit > 0, a.cpuRequest > 0
	a.hasMemLimit, a.hasMemRequest, a.hasPids = a.memLimit > 0, a.memRequest > 0, a.pids > 0
	return a
}

// atLeast is the larger of a and b per amount (kubelet's maxResourceList).
func (a amount) atLeast(b amount) amount {
	return a.combine(b, func(x, y int64) int64 { return max(x, y) })
}

// amounts is a for the record: the declared limits and set requests.
func (a amount) amounts() Amounts {
	var r Amounts
	if a.hasCPULimit {
		r.CPULimit = ptr(a.cpuLimit)
	}
	if a.hasCPURequest {
		r.CPURequest = ptr(a.cpuRequest)
	}
	if a.hasMemLimit {
		r.MemoryLimit = ptr(a.memLimit)
	}
	if a.hasMemRequest {
		r.MemoryRequest = ptr(a.memRequest)
	}
	if a.hasPids {
		r.PidLimit = ptr(a.pids)
	}
	return r
}

func (r Amounts) amount() amount {
	var a amount
	if r.CPULimit != nil {
		a.cpuLimit, a.hasCPULimit = *r.CPULimit, *r.CPULimit > 0
	}
	if r.CPURequest != nil {
		a.cpuRequest, a.hasCPURequest = *r.CPURequest, true
	}
	if r.MemoryLimit != nil {
		a.memLimit, a.hasMemLimit = *r.MemoryLimit, *r.MemoryLimit > 0
	}
	if r.MemoryRequest != nil {
		a.memRequest, a.hasMemRequest = *r.MemoryRequest, true
	}
	if r.PidLimit != nil {
		a.pids, a.hasPids = *r.PidLimit, *r.PidLimit > 0
	}
	return a
}

// resources is a as Resources, for the record.
func (a amount) resources() Resources {
	var r Resources
	if a.hasCPULimit {
		r.CPULimit = ptr(float64(a.cpuLimit) / MilliCPUToCPU)
	}
	if a.hasCPURequest {
		r.CPURequest = ptr(float64(a.cpuRequest) / MilliCPUToCPU)
	}
	if a.hasMemLimit {
		r.MemoryLimit = ptr(a.memLimit)
	}
	if a.hasMemRequest {
		r.MemoryRequest = ptr(a.memRequest)
	}
	if a.hasPids {
		r.PidLimit = ptr(a.pids)
	}
	return r
}

// total is what the containers add up to by kubelet's rule
// (AggregateContainerRequests/Limits): the larger of the sum of the app
// containers and sidecars and of what each init container uses.
func total(apps, inits []amount) amount {
	var sum amount
	for _, a := range apps {
		sum = sum.plus(a)
	}
	for _, i := range inits {
		sum = sum.atLeast(i)
	}
	return sum
}

// declared reports whether every member has a CPU and a memory limit
// (ResourceConfigForPod's cpuLimitsDeclared and memoryLimitsDeclared),
// and a pid limit. With no member at all nothing says otherwise: true.
func declared(apps, inits []amount) (cpu, mem, pids bool) {
	cpu, mem, pids = true, true, true
	for _, a := range slices.Concat(apps, inits) {
		cpu, mem, pids = cpu && a.hasCPULimit, mem && a.hasMemLimit, pids && a.hasPids
	}
	return cpu, mem, pids
}

func coresToMilli(c float64) int64 {
	m := math.Round(c * MilliCPUToCPU)
	if m >= math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(m)
}
