package sandboxer

import (
	"encoding/json"
	"fmt"
	"math"
	"time"

	"github.com/containerd/cgroups/v3"
	cg1 "github.com/containerd/cgroups/v3/cgroup1/stats"
	cg2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/types/known/timestamppb"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// UpdatedResourcesKey is the sandbox extension containerd's CRI (≥ 2.2)
// sets on UpdatePodSandboxResources (in-place pod resize).
const UpdatedResourcesKey = "updated-resources"

// updatedResources mirrors containerd's internal podsandbox.UpdatedResources,
// which typeurl encodes as JSON.
type updatedResources struct {
	Overhead  *runtime.LinuxContainerResources
	Resources *runtime.LinuxContainerResources
}

func init() {
	// The type URL containerd gives it: io.containerd.cri.v1.UpdatedResources.
	typeurl.Register(&updatedResources{}, "io.containerd.cri.v1", "UpdatedResources")
}

// decodeUpdatedResources returns the new pod resources and overhead; nil
// for a part the update does not carry.
func decodeUpdatedResources(a typeurl.Any) (linux, overhead *resourceinfo.Resources, err error) {
	var u updatedResources
	if err := json.Unmarshal(a.GetValue(), &u); err != nil {
		return nil, nil, fmt.Errorf("%w: malformed %s extension: %v", errdefs.ErrInvalidArgument, UpdatedResourcesKey, err)
	}
	if u.Resources != nil {
		r, err := resourceinfo.FromLinuxResources("updated-resources.resources", u.Resources)
		if err != nil {
			return nil, nil, err
		}
		linux = &r
	}
	if u.Overhead != nil {
		r, err := resourceinfo.FromLinuxResources("updated-resources.overhead", u.Overhead)
		if err != nil {
			return nil, nil, err
		}
		overhead = &r
	}
	return linux, overhead, nil
}

// CgroupMetrics renders usage as the cgroup metrics type of this host
// (v1 or v2), the types containerd's CRI decodes, with the limits set.
func CgroupMetrics(limits resourceinfo.Resources, u resourceinfo.Usage) any {
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

func timestamp(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		t = time.Now()
	}
	return timestamppb.New(t)
}
