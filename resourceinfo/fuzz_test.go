package resourceinfo

import (
	"encoding/json"
	"strconv"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// maxErrorLen bounds an error message whatever the input.
const maxErrorLen = 300

// checkError asserts what every extraction error must be.
func checkError(t *testing.T, err error) {
	t.Helper()
	if !errdefs.IsInvalidArgument(err) {
		t.Errorf("error is not InvalidArgument: %v", err)
	}
	if len(err.Error()) >= maxErrorLen {
		t.Errorf("error of %d bytes: %q", len(err.Error()), err)
	}
}

// checkComputed computes a sandbox from r as each kind of source and checks
// the result's invariants and that it can be written as JSON.
func checkComputed(t *testing.T, r Resources) {
	t.Helper()
	checkInvariants(t, r)
	for _, spec := range []Spec{{Annotations: r}, {Linux: r}, {Overhead: r}} {
		info := Compute(spec, map[string]Resources{"a": r, "b": r})
		checkInvariants(t, info.Resources)
		if _, err := json.Marshal(info); err != nil {
			t.Errorf("marshal: %v", err)
		}
	}
}

func FuzzParseBandwidth(f *testing.F) {
	for _, s := range []string{
		"100Mbps", "1Gbps", "1.5Gbps", "800Kbps", "10MBps", "10M", "1Mibps", "", "bps",
		"-1Mbps", "1.5bps", "9999999Ebps", "9223372036854775807bps", "1152921504606846976Bps", "Kbps",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseBandwidth(s)
		if err != nil {
			if n != 0 {
				t.Errorf("%q: %d with error %v", s, n, err)
			}
			if len(err.Error()) >= maxErrorLen {
				t.Errorf("%q: error of %d bytes", s, len(err.Error()))
			}
			return
		}
		if n < 0 {
			t.Fatalf("%q: negative bandwidth %d", s, n)
		}
		// The value written back as bare bits parses to itself.
		back, err := ParseBandwidth(strconv.FormatInt(n, 10))
		if err != nil || back != n {
			t.Errorf("%q = %d, but %d parses as %d, %v", s, n, n, back, err)
		}
		// And the annotations read it the same way.
		r, err := FromAnnotations(map[string]string{AnnotationNetworkBandwidth: s})
		if err != nil || r.NetworkBandwidth == nil || *r.NetworkBandwidth != n {
			t.Errorf("%q = %d, but annotation gives %+v, %v", s, n, r.NetworkBandwidth, err)
		}
	})
}

func FuzzFromAnnotations(f *testing.F) {
	f.Add("example.com/x", "y", uint8(0), "2")
	f.Add(AnnotationCPULimit, "abc", uint8(2), "2Gi")
	f.Add("", "", uint8(6), "1Gbps")
	f.Add(AnnotationK8sIngress, "10M", uint8(7), "100Mbps")
	f.Add("resources.limits.pid", "1.5", uint8(4), "9223372036854775807")
	f.Add(AnnotationStorageLimit, "0.5Ki", uint8(1), "9223372036854775")
	f.Fuzz(func(t *testing.T, key, value string, known uint8, knownValue string) {
		a := map[string]string{key: value}
		k := annotationKeys[int(known)%len(annotationKeys)].key
		if k != key {
			a[k] = knownValue
		}
		r, err := FromAnnotations(a)
		if err != nil {
			checkError(t, err)
			return
		}
		if r.CPUShares != nil || r.CPUQuota != nil || r.CPUPeriod != nil || r.CPUSetCPUs != nil ||
			r.CPUSetMems != nil || r.MemorySwapLimit != nil || r.HugepageLimits != nil || r.Unified != nil {
			t.Errorf("annotations set a cgroup value: %+v", r)
		}
		checkComputed(t, r)
	})
}

func FuzzFromLinuxResources(f *testing.F) {
	f.Add(int64(150000), int64(100000), int64(512), int64(1<<30), int64(-1), "0-3", "0", "memory.min", "1024")
	f.Add(int64(-1), int64(0), int64(2), int64(0), int64(0), "", "", "cpu.max", "max 100000")
	f.Add(int64(50000), int64(0), int64(-1), int64(-1), int64(-2), "3-1", "a", "pids.max", "x")
	f.Add(int64(9223372036854775807), int64(1), int64(9223372036854775807), int64(9223372036854775807), int64(9223372036854775807), "0-65535", "1,2", "cpu.max", "9223372036854775807 1")
	f.Fuzz(func(t *testing.T, quota, period, shares, memory, swap int64, cpus, mems, unifiedKey, unifiedValue string) {
		in := &runtime.LinuxContainerResources{
			CpuQuota:               quota,
			CpuPeriod:              period,
			CpuShares:              shares,
			MemoryLimitInBytes:     memory,
			MemorySwapLimitInBytes: swap,
			CpusetCpus:             cpus,
			CpusetMems:             mems,
			Unified:                map[string]string{unifiedKey: unifiedValue},
		}
		r, err := FromLinuxResources("linux.resources", in)
		if err != nil {
			checkError(t, err)
			return
		}
		if quota > 0 && r.CPUQuota == nil && r.CPULimit == nil {
			t.Errorf("quota %d/%d lost: %+v", quota, period, r)
		}
		if r.CPUQuota != nil && r.CPUPeriod == nil {
			t.Errorf("quota without period: %+v", r)
		}
		checkComputed(t, r)
	})
}

func FuzzFromOCISpec(f *testing.F) {
	f.Add([]byte(`{"linux":{"resources":{"cpu":{"shares":512,"quota":150000,"period":100000,"cpus":"0-1","mems":"0"},"memory":{"limit":1073741824,"reservation":-1,"swap":-1},"pids":{"limit":100}}}}`))
	f.Add([]byte(`{"linux":{"resources":{"cpu":{"quota":-1},"pids":{"limit":-2}}}}`))
	f.Add([]byte(`{"linux":{"resources":{"hugepageLimits":[{"pageSize":"2MB","limit":1}],"unified":{"cpu.max":"max","memory.min":"1"}}}}`))
	f.Add([]byte(`{"linux":{"resources":{"cpu":{"quota":9223372036854775807,"period":1,"shares":18446744073709551615}}}}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var s specs.Spec
		if err := json.Unmarshal(data, &s); err != nil {
			return
		}
		r, err := FromOCISpec(&s)
		if err != nil {
			checkError(t, err)
			return
		}
		checkComputed(t, r)
	})
}
