package vmm

import (
	"testing"

	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

func TestSharesToWeight(t *testing.T) {
	for shares, want := range map[uint64]uint64{
		0:                             0, // unset
		1:                             minWeight,
		minShares:                     minWeight,
		minShares + 1:                 2,
		512:                           59,
		defaultShares:                 defaultWeight,
		2048:                          174, // computed independently from the curve
		maxShares - 1:                 maxWeight,
		maxShares:                     maxWeight,
		maxShares + 1:                 maxWeight,
		1 << 40:                       maxWeight,
		resourceinfo.SharesPerCPU * 4: 303,
	} {
		if got := sharesToWeight(shares); got != want {
			t.Errorf("sharesToWeight(%d): got %d, want %d", shares, got, want)
		}
	}
	// Monotonic over the whole range.
	prev := uint64(0)
	for s := uint64(2); s <= maxShares; s += 97 {
		w := sharesToWeight(s)
		if w < prev || w < minWeight || w > maxWeight {
			t.Fatalf("sharesToWeight(%d) = %d after %d", s, w, prev)
		}
		prev = w
	}
}

func TestPodResources(t *testing.T) {
	cases := []struct {
		desc  string
		r     resourceinfo.Resources
		vcpus uint
		want  *api.PodResources
	}{
		{desc: "unlimited", want: &api.PodResources{}},
		{desc: "quota and period", r: resourceinfo.Resources{CPULimit: p(0.5), CPUQuota: p(int64(50000)), CPUPeriod: p(uint64(100000))},
			want: &api.PodResources{CpuQuota: p(int64(50000)), CpuPeriod: p(uint64(100000))}},
		{desc: "cores without a quota", r: resourceinfo.Resources{CPULimit: p(1.5)},
			want: &api.PodResources{CpuQuota: p(int64(150000)), CpuPeriod: p(uint64(100000))}},
		{desc: "cores over their own period", r: resourceinfo.Resources{CPULimit: p(0.25), CPUPeriod: p(uint64(20000))},
			want: &api.PodResources{CpuQuota: p(int64(5000)), CpuPeriod: p(uint64(20000))}},
		{desc: "tiny quota raised to the kernel's minimum", r: resourceinfo.Resources{CPUQuota: p(int64(10)), CPUPeriod: p(uint64(100000))},
			want: &api.PodResources{CpuQuota: p(int64(minCPUQuota)), CpuPeriod: p(uint64(100000))}},
		{desc: "shares", r: resourceinfo.Resources{CPUShares: p(uint64(1024))}, want: &api.PodResources{CpuWeight: p(uint64(100))}},
		{desc: "memory", r: resourceinfo.Resources{MemoryLimit: p(int64(256 << 20)), MemoryRequest: p(int64(128 << 20))},
			want: &api.PodResources{MemoryMax: p(int64(256 << 20)), MemoryMin: p(int64(128 << 20))}},
		{desc: "swap", r: resourceinfo.Resources{MemoryLimit: p(int64(256 << 20)), MemorySwapLimit: p(int64(384 << 20))},
			want: &api.PodResources{MemoryMax: p(int64(256 << 20)), MemorySwapMax: p(int64(128 << 20))}},
		{desc: "swap limit equal to memory: no swap", r: resourceinfo.Resources{MemoryLimit: p(int64(256 << 20)), MemorySwapLimit: p(int64(256 << 20))},
			want: &api.PodResources{MemoryMax: p(int64(256 << 20)), MemorySwapMax: p(int64(0))}},
		{desc: "pids", r: resourceinfo.Resources{PidLimit: p(int64(64))}, want: &api.PodResources{PidsMax: p(int64(64))}},
		{desc: "cpuset: every vCPU", r: resourceinfo.Resources{CPUSetCPUs: p("4-5")}, vcpus: 2, want: &api.PodResources{CpusetCpus: p("0-1")}},
		{desc: "cpuset of one vCPU", r: resourceinfo.Resources{CPUSetCPUs: p("7")}, vcpus: 1, want: &api.PodResources{CpusetCpus: p("0")}},
	}
	for _, tc := range cases {
		t.Run(tc.desc, func(t *testing.T) {
			got, err := podResources(tc.r, tc.vcpus)
			require.NoError(t, err)
			assert.True(t, proto.Equal(tc.want, got), "got %v, want %v", got, tc.want)
		})
	}
}

func TestPodResourcesInvalid(t *testing.T) {
	for desc, r := range map[string]resourceinfo.Resources{
		"period too short":    {CPUQuota: p(int64(50000)), CPUPeriod: p(uint64(999))},
		"period too long":     {CPULimit: p(1.0), CPUPeriod: p(uint64(maxCPUPeriod + 1))},
		"request above limit": {MemoryLimit: p(int64(64 << 20)), MemoryRequest: p(int64(128 << 20))},
	} {
		_, err := podResources(r, 1)
		assert.True(t, errdefs.IsInvalidArgument(err), "%s: %v", desc, err)
	}
}
