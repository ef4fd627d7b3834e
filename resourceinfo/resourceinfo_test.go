package resourceinfo

import (
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestComputePrecedence(t *testing.T) {
	for _, tc := range []struct {
		desc        string
		spec        Spec
		containers  map[string]Resources
		want        Resources
		wantSources map[string]Source
	}{
		{
			desc:        "nothing",
			wantSources: map[string]Source{},
		},
		{
			desc:        "overhead alone without containers",
			spec:        Spec{Overhead: Resources{CPULimit: ptr(0.25), MemoryRequest: ptr(int64(64 << 20))}},
			wantSources: map[string]Source{},
		},
		{
			desc: "annotation wins over linux and containers",
			spec: Spec{
				Annotations: Resources{CPULimit: ptr(2.0), MemoryLimit: ptr(int64(1 << 30))},
				Linux: Resources{
					CPULimit: ptr(3.0), CPUQuota: ptr(int64(150000)), CPUPeriod: ptr(uint64(50000)),
					MemoryLimit: ptr(int64(2 << 30)),
				},
			},
			containers: map[string]Resources{"a": {CPULimit: ptr(1.0), MemoryLimit: ptr(int64(4 << 30))}},
			want: Resources{
				CPULimit: ptr(2.0), CPUQuota: ptr(int64(200000)), CPUPeriod: ptr(uint64(DefaultCPUPeriod)),
				MemoryLimit: ptr(int64(1 << 30)),
			},
			wantSources: map[string]Source{"cpu_limit": SourceAnnotation, "memory_limit": SourceAnnotation},
		},
		{
			desc: "linux wins over containers and keeps its raw cpu values",
			spec: Spec{Linux: Resources{
				CPULimit: ptr(0.5), CPUQuota: ptr(int64(25000)), CPUPeriod: ptr(uint64(50000)),
				CPURequest: ptr(0.293), CPUShares: ptr(uint64(300)),
				MemoryLimit: ptr(int64(1 << 30)), MemoryRequest: ptr(int64(512 << 20)), PidLimit: ptr(int64(200)),
			}},
			containers: map[string]Resources{"a": {
				CPULimit: ptr(4.0), CPURequest: ptr(4.0), MemoryLimit: ptr(int64(8 << 30)),
				MemoryRequest: ptr(int64(8 << 30)), PidLimit: ptr(int64(10)),
			}},
			want: Resources{
				CPULimit: ptr(0.5), CPUQuota: ptr(int64(25000)), CPUPeriod: ptr(uint64(50000)),
				CPURequest: ptr(0.293), CPUShares: ptr(uint64(300)),
				MemoryLimit: ptr(int64(1 << 30)), MemoryRequest: ptr(int64(512 << 20)), PidLimit: ptr(int64(200)),
			},
			wantSources: map[string]Source{
				"cpu_limit": SourceLinux, "cpu_request": SourceLinux, "memory_limit": SourceLinux,
				"memory_request": SourceLinux, "pid_limit": SourceLinux,
			},
		},
		{
			desc:        "linux quota not on a millicore is kept as given",
			spec:        Spec{Linux: Resources{CPULimit: ptr(0.333), CPUQuota: ptr(int64(33333)), CPUPeriod: ptr(uint64(100000))}},
			want:        Resources{CPULimit: ptr(0.333), CPUQuota: ptr(int64(33333)), CPUPeriod: ptr(uint64(100000))},
			wantSources: map[string]Source{"cpu_limit": SourceLinux},
		},
		{
			desc: "linux period is dropped when the cpu limit comes from elsewhere",
			spec: Spec{
				Annotations: Resources{CPULimit: ptr(1.0)},
				Linux:       Resources{CPUPeriod: ptr(uint64(50000))},
			},
			want:        Resources{CPULimit: ptr(1.0), CPUQuota: ptr(int64(100000)), CPUPeriod: ptr(uint64(DefaultCPUPeriod))},
			wantSources: map[string]Source{"cpu_limit": SourceAnnotation},
		},
		{
			desc: "annotation cpu request derives shares",
			spec: Spec{
				Annotations: Resources{CPURequest: ptr(0.25)},
				Linux:       Resources{CPURequest: ptr(1.0), CPUShares: ptr(uint64(1024))},
			},
			want:        Resources{CPURequest: ptr(0.25), CPUShares: ptr(uint64(256))},
			wantSources: map[string]Source{"cpu_request": SourceAnnotation},
		},
		{
			desc:        "annotation cpu request of zero gets the minimum shares",
			spec:        Spec{Annotations: Resources{CPURequest: ptr(0.0)}},
			want:        Resources{CPURequest: ptr(0.0), CPUShares: ptr(uint64(MinShares))},
			wantSources: map[string]Source{"cpu_request": SourceAnnotation},
		},
		{
			desc: "containers sum with overhead",
			spec: Spec{Overhead: Resources{
				CPULimit: ptr(0.25), CPURequest: ptr(0.25),
				MemoryLimit: ptr(int64(64 << 20)), MemoryRequest: ptr(int64(64 << 20)),
			}},
			containers: map[string]Resources{
				"a": {CPULimit: ptr(1.0), CPURequest: ptr(0.5), MemoryLimit: ptr(int64(256 << 20)), MemoryRequest: ptr(int64(128 << 20)), PidLimit: ptr(int64(10))},
				"b": {CPULimit: ptr(0.5), CPURequest: ptr(0.1), MemoryLimit: ptr(int64(512 << 20)), MemoryRequest: ptr(int64(256 << 20)), PidLimit: ptr(int64(20))},
			},
			want: Resources{
				CPULimit: ptr(1.75), CPUQuota: ptr(int64(175000)), CPUPeriod: ptr(uint64(DefaultCPUPeriod)),
				CPURequest: ptr(0.85), CPUShares: ptr(uint64(870)),
				MemoryLimit: ptr(int64(832 << 20)), MemoryRequest: ptr(int64(448 << 20)),
				PidLimit: ptr(int64(30)),
			},
			wantSources: map[string]Source{
				"cpu_limit": SourceContainers, "cpu_request": SourceContainers, "memory_limit": SourceContainers,
				"memory_request": SourceContainers, "pid_limit": SourceContainers,
			},
		},
		{
			desc: "one unlimited container makes the pod unlimited",
			spec: Spec{Overhead: Resources{CPULimit: ptr(0.25), MemoryLimit: ptr(int64(64 << 20))}},
			containers: map[string]Resources{
				"a": {CPULimit: ptr(1.0), MemoryLimit: ptr(int64(256 << 20)), PidLimit: ptr(int64(10)), CPURequest: ptr(0.5)},
				"b": {CPURequest: ptr(0.5), MemoryRequest: ptr(int64(1 << 20))},
			},
			want: Resources{
				CPURequest: ptr(1.0), CPUShares: ptr(uint64(1024)), MemoryRequest: ptr(int64(1 << 20)),
			},
			wantSources: map[string]Source{"cpu_request": SourceContainers, "memory_request": SourceContainers},
		},
		{
			desc: "no container request but overhead request",
			spec: Spec{Overhead: Resources{CPURequest: ptr(0.1), MemoryRequest: ptr(int64(32 << 20))}},
			containers: map[string]Resources{
				"a": {},
			},
			want:        Resources{CPURequest: ptr(0.1), CPUShares: ptr(uint64(102)), MemoryRequest: ptr(int64(32 << 20))},
			wantSources: map[string]Source{"cpu_request": SourceContainers, "memory_request": SourceContainers},
		},
		{
			desc: "no container request and no overhead",
			containers: map[string]Resources{
				"a": {CPULimit: ptr(1.0)},
			},
			want:        Resources{CPULimit: ptr(1.0), CPUQuota: ptr(int64(100000)), CPUPeriod: ptr(uint64(DefaultCPUPeriod))},
			wantSources: map[string]Source{"cpu_limit": SourceContainers},
		},
		{
			// kubelet sends linux.resources without the overhead and the
			// overhead apart (calculateSandboxResources, ExcludeOverhead);
			// the pod cgroup has both (ResourceConfigForPod).
			desc: "overhead added to linux values",
			spec: Spec{
				Linux:    Resources{MemoryLimit: ptr(int64(1 << 30)), MemoryRequest: ptr(int64(1 << 29))},
				Overhead: Resources{MemoryLimit: ptr(int64(128 << 20)), MemoryRequest: ptr(int64(128 << 20))},
			},
			containers:  map[string]Resources{"a": {MemoryLimit: ptr(int64(1))}},
			want:        Resources{MemoryLimit: ptr(int64(1<<30 + 128<<20)), MemoryRequest: ptr(int64(1<<29 + 128<<20))},
			wantSources: map[string]Source{"memory_limit": SourceLinux, "memory_request": SourceLinux},
		},
		{
			desc: "overhead not added to annotation values",
			spec: Spec{
				Annotations: Resources{CPULimit: ptr(2.0), MemoryLimit: ptr(int64(1 << 30))},
				Overhead:    Resources{CPULimit: ptr(0.5), MemoryLimit: ptr(int64(128 << 20))},
			},
			want: Resources{
				CPULimit: ptr(2.0), CPUQuota: ptr(int64(200000)), CPUPeriod: ptr(uint64(DefaultCPUPeriod)),
				MemoryLimit: ptr(int64(1 << 30)),
			},
			wantSources: map[string]Source{"cpu_limit": SourceAnnotation, "memory_limit": SourceAnnotation},
		},
		{
			desc: "each field from its own source",
			spec: Spec{
				Annotations: Resources{MemoryLimit: ptr(int64(2 << 30))},
				Linux:       Resources{CPULimit: ptr(1.0), CPUQuota: ptr(int64(100000)), CPUPeriod: ptr(uint64(100000))},
			},
			containers: map[string]Resources{
				"a": {CPURequest: ptr(0.5), MemoryRequest: ptr(int64(1 << 30)), MemoryLimit: ptr(int64(4 << 30))},
			},
			want: Resources{
				CPULimit: ptr(1.0), CPUQuota: ptr(int64(100000)), CPUPeriod: ptr(uint64(100000)),
				CPURequest: ptr(0.5), CPUShares: ptr(uint64(512)),
				MemoryLimit: ptr(int64(2 << 30)), MemoryRequest: ptr(int64(1 << 30)),
			},
			wantSources: map[string]Source{
				"cpu_limit": SourceLinux, "cpu_request": SourceContainers,
				"memory_limit": SourceAnnotation, "memory_request": SourceContainers,
			},
		},
		{
			desc: "network directions inherit the total bandwidth",
			spec: Spec{Annotations: Resources{NetworkBandwidth: ptr(int64(1e9))}},
			want: Resources{
				NetworkBandwidth: ptr(int64(1e9)), NetworkIngressBps: ptr(int64(1e9)), NetworkEgressBps: ptr(int64(1e9)),
			},
			wantSources: map[string]Source{
				"network_bandwidth": SourceAnnotation, "network_ingress_bps": SourceAnnotation, "network_egress_bps": SourceAnnotation,
			},
		},
		{
			desc: "a direction's own limit wins over the total",
			spec: Spec{Annotations: Resources{NetworkBandwidth: ptr(int64(1e9)), NetworkIngressBps: ptr(int64(1e8))}},
			want: Resources{
				NetworkBandwidth: ptr(int64(1e9)), NetworkIngressBps: ptr(int64(1e8)), NetworkEgressBps: ptr(int64(1e9)),
			},
			wantSources: map[string]Source{
				"network_bandwidth": SourceAnnotation, "network_ingress_bps": SourceAnnotation, "network_egress_bps": SourceAnnotation,
			},
		},
		{
			desc:        "a direction alone",
			spec:        Spec{Annotations: Resources{NetworkEgressBps: ptr(int64(5e6))}},
			want:        Resources{NetworkEgressBps: ptr(int64(5e6))},
			wantSources: map[string]Source{"network_egress_bps": SourceAnnotation},
		},
		{
			desc: "annotation-only limits",
			spec: Spec{
				Annotations: Resources{
					StorageLimit: ptr(int64(10 << 30)), DiskReadBps: ptr(int64(1)), DiskWriteBps: ptr(int64(2)),
					DiskReadIOPS: ptr(int64(3)), DiskWriteIOPS: ptr(int64(4)), PidLimit: ptr(int64(5)),
				},
				Linux: Resources{
					StorageLimit: ptr(int64(1)), DiskReadBps: ptr(int64(1)), NetworkBandwidth: ptr(int64(1)),
				},
			},
			want: Resources{
				StorageLimit: ptr(int64(10 << 30)), DiskReadBps: ptr(int64(1)), DiskWriteBps: ptr(int64(2)),
				DiskReadIOPS: ptr(int64(3)), DiskWriteIOPS: ptr(int64(4)), PidLimit: ptr(int64(5)),
			},
			wantSources: map[string]Source{
				"storage_limit": SourceAnnotation, "disk_read_bps": SourceAnnotation, "disk_write_bps": SourceAnnotation,
				"disk_read_iops": SourceAnnotation, "disk_write_iops": SourceAnnotation, "pid_limit": SourceAnnotation,
			},
		},
		{
			desc: "linux-only cgroup settings",
			spec: Spec{
				Annotations: Resources{CPUSetCPUs: ptr("9"), MemorySwapLimit: ptr(int64(5))},
				Linux: Resources{
					CPUSetCPUs: ptr("0-3"), CPUSetMems: ptr("0"), MemorySwapLimit: ptr(int64(-1)),
					HugepageLimits: map[string]uint64{"2MB": 1 << 30}, Unified: map[string]string{"memory.high": "1"},
				},
			},
			containers: map[string]Resources{"a": {
				CPUSetCPUs: ptr("7"), MemorySwapLimit: ptr(int64(7)), HugepageLimits: map[string]uint64{"1GB": 1},
			}},
			want: Resources{
				CPUSetCPUs: ptr("0-3"), CPUSetMems: ptr("0"), MemorySwapLimit: ptr(int64(5)),
				HugepageLimits: map[string]uint64{"2MB": 1 << 30}, Unified: map[string]string{"memory.high": "1"},
			},
			wantSources: map[string]Source{"memory_swap_limit": SourceAnnotation},
		},
		{
			desc:        "linux swap",
			spec:        Spec{Linux: Resources{MemorySwapLimit: ptr(int64(-1))}},
			want:        Resources{MemorySwapLimit: ptr(int64(-1))},
			wantSources: map[string]Source{"memory_swap_limit": SourceLinux},
		},
		{
			desc: "pid limits sum only when every container has one",
			containers: map[string]Resources{
				"a": {PidLimit: ptr(int64(10))},
				"b": {PidLimit: ptr(int64(20))},
				"c": {},
			},
			want:        Resources{},
			wantSources: map[string]Source{},
		},
		{
			desc: "zero limits are limits",
			spec: Spec{Annotations: Resources{MemoryLimit: ptr(int64(0)), PidLimit: ptr(int64(0))}},
			containers: map[string]Resources{
				"a": {MemoryLimit: ptr(int64(0))},
			},
			want:        Resources{MemoryLimit: ptr(int64(0)), PidLimit: ptr(int64(0))},
			wantSources: map[string]Source{"memory_limit": SourceAnnotation, "pid_limit": SourceAnnotation},
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			before := time.Now().UTC()
			info := Compute(tc.spec, tc.containers)
			assert.Equal(t, tc.want, info.Resources)
			assert.Equal(t, tc.wantSources, info.Sources)
			assert.Equal(t, tc.containers, info.Containers)
			if tc.spec.Overhead.IsZero() {
				assert.Nil(t, info.Overhead)
			} else {
				assert.Equal(t, &tc.spec.Overhead, info.Overhead)
			}
			assert.Equal(t, time.UTC, info.UpdatedAt.Location())
			assert.False(t, info.UpdatedAt.Before(before.Add(-time.Second)))
		})
	}
}

func TestComputeDoesNotAlias(t *testing.T) {
	spec := Spec{
		Annotations: Resources{MemoryLimit: ptr(int64(1))},
		Linux: Resources{
			CPUSetCPUs: ptr("0"), HugepageLimits: map[string]uint64{"2MB": 1}, Unified: map[string]string{"k": "v"},
		},
		Overhead: Resources{CPURequest: ptr(0.1)},
	}
	containers := map[string]Resources{"a": {CPURequest: ptr(0.5)}}
	info := Compute(spec, containers)

	*spec.Annotations.MemoryLimit = 2
	*spec.Linux.CPUSetCPUs = "1"
	spec.Linux.HugepageLimits["2MB"] = 2
	spec.Linux.Unified["k"] = "changed"
	*spec.Overhead.CPURequest = 9
	containers["b"] = Resources{}

	assert.Equal(t, int64(1), *info.MemoryLimit)
	assert.Equal(t, "0", *info.CPUSetCPUs)
	assert.Equal(t, map[string]uint64{"2MB": 1}, info.HugepageLimits)
	assert.Equal(t, map[string]string{"k": "v"}, info.Unified)
	assert.Len(t, info.Containers, 1)
	assert.InDelta(t, 0.6, *info.CPURequest, 1e-9)
}

// resourceKeys are the JSON names of every Resources field.
func resourceKeys(t *testing.T) []string {
	t.Helper()
	var keys []string
	rt := reflect.TypeFor[Resources]()
	for i := range rt.NumField() {
		name, opts, _ := strings.Cut(rt.Field(i).Tag.Get("json"), ",")
		require.NotEmpty(t, name, "field %s has no json name", rt.Field(i).Name)
		if opts == "omitempty" {
			continue // a container's name
		}
		keys = append(keys, name)
	}
	require.Len(t, keys, 21)
	return keys
}

func TestComputeJSONNullVersusZero(t *testing.T) {
	for _, tc := range []struct {
		desc     string
		spec     Spec
		notNull  map[string]string // key -> its JSON value
		wantKeys []string          // extra top-level keys with non-null values
	}{
		{
			desc: "nothing set is all null",
		},
		{
			desc: "zero limits are written as zero",
			spec: Spec{Annotations: Resources{MemoryLimit: ptr(int64(0)), PidLimit: ptr(int64(0))}},
			notNull: map[string]string{
				"memory_limit": "0",
				"pid_limit":    "0",
			},
		},
		{
			desc: "cpu limit writes its raw values too",
			spec: Spec{Annotations: Resources{CPULimit: ptr(2.0), MemoryRequest: ptr(int64(1 << 30))}},
			notNull: map[string]string{
				"cpu_limit":      "2",
				"cpu_quota":      "200000",
				"cpu_period":     "100000",
				"memory_request": "1073741824",
			},
		},
		{
			desc: "linux settings",
			spec: Spec{Linux: Resources{
				CPUSetCPUs: ptr("0-1"), MemorySwapLimit: ptr(int64(-1)), HugepageLimits: map[string]uint64{"2MB": 0},
			}},
			notNull: map[string]string{
				"cpuset_cpus":       `"0-1"`,
				"memory_swap_limit": "-1",
				"hugepage_limits":   `{"2MB":0}`,
			},
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			info := Compute(tc.spec, nil)
			data, err := json.Marshal(info)
			require.NoError(t, err)
			text := string(data)
			for _, key := range resourceKeys(t) {
				if v, ok := tc.notNull[key]; ok {
					assert.Contains(t, text, fmt.Sprintf("%q:%s", key, v))
				} else {
					assert.Contains(t, text, fmt.Sprintf("%q:null", key))
					assert.NotContains(t, text, fmt.Sprintf("%q:0", key))
				}
			}
			assert.Contains(t, text, `"overhead":null`)
			assert.Contains(t, text, `"containers":null`)

			// Indented, as the state file is written.
			indented, err := json.MarshalIndent(info, "", "  ")
			require.NoError(t, err)
			if _, ok := tc.notNull["memory_limit"]; !ok {
				assert.Contains(t, string(indented), `"memory_limit": null`)
			}

			// And it reads back the same, nil staying nil.
			var back ResourceInfo
			require.NoError(t, json.Unmarshal(data, &back))
			assert.Equal(t, info.Resources, back.Resources)
			assert.Equal(t, info.Sources, back.Sources)
			assert.True(t, info.UpdatedAt.Equal(back.UpdatedAt))
		})
	}
}

func TestComputeSaturates(t *testing.T) {
	for _, tc := range []struct {
		desc       string
		spec       Spec
		containers map[string]Resources
		check      func(t *testing.T, r Resources)
	}{
		{
			desc: "memory limits",
			spec: Spec{Overhead: Resources{MemoryLimit: ptr(int64(1 << 20))}},
			containers: map[string]Resources{
				"a": {MemoryLimit: ptr(int64(math.MaxInt64 - 10))},
				"b": {MemoryLimit: ptr(int64(math.MaxInt64 - 10))},
				"c": {MemoryLimit: ptr(int64(20))},
			},
			check: func(t *testing.T, r Resources) {
				assert.Equal(t, ptr(int64(math.MaxInt64)), r.MemoryLimit)
			},
		},
		{
			desc: "memory requests",
			containers: map[string]Resources{
				"a": {MemoryRequest: ptr(int64(math.MaxInt64))},
				"b": {MemoryRequest: ptr(int64(1))},
			},
			check: func(t *testing.T, r Resources) {
				assert.Equal(t, ptr(int64(math.MaxInt64)), r.MemoryRequest)
			},
		},
		{
			desc: "pid limits",
			containers: map[string]Resources{
				"a": {PidLimit: ptr(int64(math.MaxInt64))},
				"b": {PidLimit: ptr(int64(math.MaxInt64))},
			},
			check: func(t *testing.T, r Resources) {
				assert.Equal(t, ptr(int64(math.MaxInt64)), r.PidLimit)
			},
		},
		{
			desc: "exactly max",
			containers: map[string]Resources{
				"a": {MemoryLimit: ptr(int64(math.MaxInt64 - 1))},
				"b": {MemoryLimit: ptr(int64(1))},
			},
			check: func(t *testing.T, r Resources) {
				assert.Equal(t, ptr(int64(math.MaxInt64)), r.MemoryLimit)
			},
		},
		{
			desc: "huge annotation cpu gives a positive quota",
			spec: Spec{Annotations: Resources{CPULimit: ptr(9223372036854775.0), CPURequest: ptr(9223372036854775.0)}},
			check: func(t *testing.T, r Resources) {
				assert.Equal(t, ptr(int64(math.MaxInt64)), r.CPUQuota)
				assert.Equal(t, ptr(uint64(MaxShares)), r.CPUShares)
			},
		},
		{
			desc: "huge container cpu gives a positive quota",
			containers: map[string]Resources{
				"a": {CPULimit: ptr(QuotaToCores(math.MaxInt64, 1)), CPURequest: ptr(SharesToCores(math.MaxUint64))},
				"b": {CPULimit: ptr(QuotaToCores(math.MaxInt64, 1)), CPURequest: ptr(SharesToCores(math.MaxUint64))},
			},
			check: func(t *testing.T, r Resources) {
				assert.Equal(t, ptr(int64(math.MaxInt64)), r.CPUQuota)
				assert.Equal(t, ptr(uint64(MaxShares)), r.CPUShares)
				require.NotNil(t, r.CPULimit)
				assert.False(t, math.IsInf(*r.CPULimit, 0) || math.IsNaN(*r.CPULimit))
			},
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			info := Compute(tc.spec, tc.containers)
			tc.check(t, info.Resources)
			checkInvariants(t, info.Resources)
			_, err := json.Marshal(info)
			assert.NoError(t, err)
		})
	}
}

// TestComputeContainersComeAndGo follows a sandbox as its containers are
// created and removed: the pod totals must follow.
func TestComputeContainersComeAndGo(t *testing.T) {
	spec := Spec{Overhead: Resources{
		CPULimit: ptr(0.1), CPURequest: ptr(0.1), MemoryLimit: ptr(int64(10 << 20)), MemoryRequest: ptr(int64(10 << 20)),
	}}
	app := Resources{CPULimit: ptr(1.0), CPURequest: ptr(0.5), MemoryLimit: ptr(int64(256 << 20)), MemoryRequest: ptr(int64(128 << 20))}
	sidecar := Resources{CPULimit: ptr(0.25), CPURequest: ptr(0.1), MemoryLimit: ptr(int64(64 << 20)), MemoryRequest: ptr(int64(32 << 20))}
	debug := Resources{CPURequest: ptr(0.05)} // no limits

	containers := map[string]Resources{}
	for _, tc := range []struct {
		desc       string
		add        map[string]Resources
		remove     string
		cpuLimit   *float64
		cpuRequest *float64
		memLimit   *int64
		memRequest *int64
	}{
		{desc: "0 containers"},
		{
			desc: "1 container", add: map[string]Resources{"app": app},
			cpuLimit: ptr(1.1), cpuRequest: ptr(0.6), memLimit: ptr(int64(266 << 20)), memRequest: ptr(int64(138 << 20)),
		},
		{
			desc: "2 containers", add: map[string]Resources{"sidecar": sidecar},
			cpuLimit: ptr(1.35), cpuRequest: ptr(0.7), memLimit: ptr(int64(330 << 20)), memRequest: ptr(int64(170 << 20)),
		},
		{
			desc: "3 containers, one unlimited", add: map[string]Resources{"debug": debug},
			cpuRequest: ptr(0.75), memRequest: ptr(int64(170 << 20)),
		},
		{
			desc: "back to 2", remove: "debug",
			cpuLimit: ptr(1.35), cpuRequest: ptr(0.7), memLimit: ptr(int64(330 << 20)), memRequest: ptr(int64(170 << 20)),
		},
		{
			desc: "back to 1", remove: "app",
			cpuLimit: ptr(0.35), cpuRequest: ptr(0.2), memLimit: ptr(int64(74 << 20)), memRequest: ptr(int64(42 << 20)),
		},
		{desc: "back to 0", remove: "sidecar"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			maps.Copy(containers, tc.add)
			delete(containers, tc.remove)
			info := Compute(spec, containers)
			assert.Equal(t, tc.cpuLimit, info.CPULimit, "cpu_limit")
			assert.Equal(t, tc.cpuRequest, info.CPURequest, "cpu_request")
			assert.Equal(t, tc.memLimit, info.MemoryLimit, "memory_limit")
			assert.Equal(t, tc.memRequest, info.MemoryRequest, "memory_request")
			if tc.cpuLimit != nil {
				assert.Equal(t, ptr(CoresToQuota(*tc.cpuLimit, DefaultCPUPeriod)), info.CPUQuota)
			} else {
				assert.Nil(t, info.CPUQuota)
				assert.Nil(t, info.CPUPeriod)
			}
			if tc.cpuRequest != nil {
				assert.Equal(t, ptr(CoresToShares(*tc.cpuRequest)), info.CPUShares)
			} else {
				assert.Nil(t, info.CPUShares)
			}
			assert.Len(t, info.Containers, len(containers))
		})
	}
}

func TestCoresToShares(t *testing.T) {
	// kubelet's MilliCPUToShares (pkg/kubelet/cm/helpers_linux.go) and
	// the known values of its tests.
	for _, tc := range []struct {
		cores float64
		want  uint64
	}{
		{0, MinShares},
		{0.001, MinShares},
		{0.002, MinShares},
		{0.003, 3},
		{0.004, 4},
		{0.032, 32},
		{0.064, 65},
		{0.1, 102},
		{0.25, 256},
		{0.5, 512},
		{1, 1024},
		{1.5, 1536},
		{2, 2048},
		{256, MaxShares},
		{300, MaxShares},
		{1e18, MaxShares},
		{math.MaxFloat64, MaxShares},
	} {
		t.Run(fmt.Sprint(tc.cores), func(t *testing.T) {
			assert.Equal(t, tc.want, CoresToShares(tc.cores))
		})
	}
}

func TestSharesToCores(t *testing.T) {
	for _, tc := range []struct {
		shares uint64
		want   float64
	}{
		{0, 0},
		{1, 0},
		{MinShares, 0},
		{3, 0.003},
		{32, 0.032},
		{65, 0.064},
		{102, 0.1},
		{256, 0.25},
		{512, 0.5},
		{1024, 1},
		{MaxShares, 256},
		// The kernel caps cpu.shares at MaxShares.
		{MaxShares + 1, 256},
		{math.MaxUint64, 256},
	} {
		t.Run(fmt.Sprint(tc.shares), func(t *testing.T) {
			assert.Equal(t, tc.want, SharesToCores(tc.shares))
		})
	}
}

func TestSharesRoundTrip(t *testing.T) {
	for milli := int64(1); milli <= 64000; milli++ {
		cores := float64(milli) / 1000
		shares := CoresToShares(cores)
		// kubelet: (milliCPU * 1024) / 1000, at least MinShares.
		want := uint64(max(milli*SharesPerCPU/1000, MinShares))
		if !assert.Equal(t, want, shares, "%dm", milli) {
			continue
		}
		wantCores := cores
		if milli <= MinShares {
			wantCores = 0 // MinShares is kubelet's "no request"
		}
		assert.Equal(t, wantCores, SharesToCores(shares), "%dm -> %d shares", milli, shares)
	}
}

func TestQuotaRoundTrip(t *testing.T) {
	for _, period := range []uint64{DefaultCPUPeriod, 50000, 10000, 1000000} {
		t.Run(fmt.Sprint(period), func(t *testing.T) {
			for milli := int64(1); milli <= 64000; milli++ {
				cores := float64(milli) / 1000
				quota := CoresToQuota(cores, period)
				if !assert.Equal(t, milli*int64(period)/1000, quota, "%dm", milli) {
					continue
				}
				assert.Equal(t, cores, QuotaToCores(quota, period), "%dm -> quota %d", milli, quota)
			}
		})
	}
}

func TestQuotaConversions(t *testing.T) {
	for _, tc := range []struct {
		desc   string
		quota  int64
		period uint64
		cores  float64
	}{
		{desc: "one core", quota: 100000, period: 100000, cores: 1},
		{desc: "half a core on a short period", quota: 25000, period: 50000, cores: 0.5},
		{desc: "rounded to millicores", quota: 33333, period: 100000, cores: 0.333},
		// kubelet's QuotaToMilliCPU truncates.
		{desc: "below a millicore truncates", quota: 60, period: 100000, cores: 0},
		{desc: "just below a millicore", quota: 199, period: 100000, cores: 0.001},
		{desc: "unlimited", quota: -1, period: 100000, cores: 0},
		{desc: "no period", quota: 1000, period: 0, cores: 0},
		{desc: "largest quota saturates in millicores", quota: math.MaxInt64, period: 1, cores: math.MaxInt64 / 1000},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			assert.Equal(t, tc.cores, QuotaToCores(tc.quota, tc.period))
		})
	}
	for _, tc := range []struct {
		desc   string
		cores  float64
		period uint64
		quota  int64
	}{
		{desc: "zero", cores: 0, period: DefaultCPUPeriod, quota: 0},
		{desc: "two cores", cores: 2, period: DefaultCPUPeriod, quota: 200000},
		{desc: "large", cores: 1 << 40, period: DefaultCPUPeriod, quota: 109951162777600000},
		{desc: "saturates", cores: 1e18, period: DefaultCPUPeriod, quota: math.MaxInt64},
		{desc: "saturates at the largest float", cores: math.MaxFloat64, period: math.MaxUint64, quota: math.MaxInt64},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			assert.Equal(t, tc.quota, CoresToQuota(tc.cores, tc.period))
		})
	}
}

func TestIsZero(t *testing.T) {
	assert.True(t, Resources{}.IsZero())
	assert.True(t, Resources{HugepageLimits: map[string]uint64{}, Unified: map[string]string{}}.IsZero())
	// Every field on its own makes Resources non-zero.
	rt := reflect.TypeFor[Resources]()
	for i := range rt.NumField() {
		f := rt.Field(i)
		if f.Name == "Name" {
			continue // a container's name is no resource
		}
		t.Run(f.Name, func(t *testing.T) {
			var r Resources
			v := reflect.ValueOf(&r).Elem().Field(i)
			switch f.Type.Kind() {
			case reflect.Pointer:
				v.Set(reflect.New(f.Type.Elem()))
			case reflect.Map:
				m := reflect.MakeMap(f.Type)
				m.SetMapIndex(reflect.Zero(f.Type.Key()), reflect.Zero(f.Type.Elem()))
				v.Set(m)
			default:
				t.Fatalf("unexpected kind %s", f.Type.Kind())
			}
			assert.False(t, r.IsZero())
		})
	}
}

// checkInvariants asserts what every Resources must satisfy: no negative
// values (swap may be -1, unlimited) and finite, non-negative cores.
func checkInvariants(t *testing.T, r Resources) {
	t.Helper()
	for name, p := range map[string]*float64{"cpu_limit": r.CPULimit, "cpu_request": r.CPURequest} {
		if p != nil && (math.IsNaN(*p) || math.IsInf(*p, 0) || *p < 0) {
			t.Errorf("%s = %v", name, *p)
		}
	}
	for name, p := range map[string]*int64{
		"memory_limit": r.MemoryLimit, "memory_request": r.MemoryRequest, "pid_limit": r.PidLimit,
		"cpu_quota": r.CPUQuota, "storage_limit": r.StorageLimit, "network_bandwidth": r.NetworkBandwidth,
		"network_ingress_bps": r.NetworkIngressBps, "network_egress_bps": r.NetworkEgressBps,
		"disk_read_bps": r.DiskReadBps, "disk_write_bps": r.DiskWriteBps,
		"disk_read_iops": r.DiskReadIOPS, "disk_write_iops": r.DiskWriteIOPS,
	} {
		if p != nil && *p < 0 {
			t.Errorf("%s = %d", name, *p)
		}
	}
	if r.MemorySwapLimit != nil && *r.MemorySwapLimit < -1 {
		t.Errorf("memory_swap_limit = %d", *r.MemorySwapLimit)
	}
	if r.CPUPeriod != nil && *r.CPUPeriod == 0 {
		t.Errorf("cpu_period = 0")
	}
}
