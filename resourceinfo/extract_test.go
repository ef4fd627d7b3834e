package resourceinfo

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// annotationKind is how FromAnnotations reads the value of a key.
type annotationKind int

const (
	kindCPU       annotationKind = iota // cores, fractions allowed
	kindBytes                           // whole bytes
	kindCount                           // whole count
	kindBandwidth                       // bits per second
)

// annotationKeys lists every key FromAnnotations reads and where it lands.
var annotationKeys = []struct {
	key   string
	kind  annotationKind
	field func(r *Resources) any
}{
	{AnnotationCPULimit, kindCPU, func(r *Resources) any { return r.CPULimit }},
	{AnnotationCPURequest, kindCPU, func(r *Resources) any { return r.CPURequest }},
	{AnnotationMemoryLimit, kindBytes, func(r *Resources) any { return r.MemoryLimit }},
	{AnnotationMemoryRequest, kindBytes, func(r *Resources) any { return r.MemoryRequest }},
	{AnnotationPidLimit, kindCount, func(r *Resources) any { return r.PidLimit }},
	{AnnotationStorageLimit, kindBytes, func(r *Resources) any { return r.StorageLimit }},
	{AnnotationNetworkBandwidth, kindBandwidth, func(r *Resources) any { return r.NetworkBandwidth }},
	{AnnotationNetworkIngress, kindBandwidth, func(r *Resources) any { return r.NetworkIngressBps }},
	{AnnotationNetworkEgress, kindBandwidth, func(r *Resources) any { return r.NetworkEgressBps }},
	{AnnotationK8sIngress, kindBandwidth, func(r *Resources) any { return r.NetworkIngressBps }},
	{AnnotationK8sEgress, kindBandwidth, func(r *Resources) any { return r.NetworkEgressBps }},
	{AnnotationDiskReadBps, kindBytes, func(r *Resources) any { return r.DiskReadBps }},
	{AnnotationDiskWriteBps, kindBytes, func(r *Resources) any { return r.DiskWriteBps }},
	{AnnotationDiskReadIOPS, kindCount, func(r *Resources) any { return r.DiskReadIOPS }},
	{AnnotationDiskWriteIOPS, kindCount, func(r *Resources) any { return r.DiskWriteIOPS }},
}

func TestFromAnnotationsEveryKey(t *testing.T) {
	// Every valid Kubernetes quantity form, read by every key.
	for _, tc := range []struct {
		desc  string
		value string
		cpu   float64 // cores
		whole int64   // bytes, count or bits/s; -1: must be refused (fraction)
	}{
		{desc: "integer", value: "2", cpu: 2, whole: 2},
		{desc: "milli", value: "500m", cpu: 0.5, whole: -1},
		{desc: "binary suffix", value: "2Gi", cpu: 2 << 30, whole: 2 << 30},
		{desc: "decimal suffix", value: "1G", cpu: 1e9, whole: 1e9},
		{desc: "exponent", value: "1e9", cpu: 1e9, whole: 1e9},
		{desc: "decimal fraction", value: "1.5", cpu: 1.5, whole: -1},
		{desc: "zero", value: "0", cpu: 0, whole: 0},
		{desc: "explicit plus sign", value: "+3", cpu: 3, whole: 3},
		{desc: "kilo", value: "1k", cpu: 1000, whole: 1000},
		{desc: "fraction of a binary unit that is whole", value: "0.5Ki", cpu: 512, whole: 512},
		{desc: "fraction of a gibibyte that is whole", value: "1.5Gi", cpu: 1.5 * (1 << 30), whole: 3 << 29},
	} {
		for _, k := range annotationKeys {
			t.Run(tc.desc+"/"+k.key, func(t *testing.T) {
				r, err := FromAnnotations(map[string]string{k.key: tc.value})
				if k.kind != kindCPU && tc.whole < 0 {
					require.Error(t, err)
					assert.True(t, errdefs.IsInvalidArgument(err), "error %v", err)
					assert.Contains(t, err.Error(), k.key)
					assert.Contains(t, err.Error(), strconv.Quote(tc.value))
					assert.Contains(t, err.Error(), "whole")
					return
				}
				require.NoError(t, err)
				var want any
				if k.kind == kindCPU {
					want = ptr(tc.cpu)
				} else {
					want = ptr(tc.whole)
				}
				assert.Equal(t, want, k.field(&r))
				// Only the key's own field is set.
				assert.Equal(t, 1, setFields(r), "%+v", r)
			})
		}
	}
}

// setFields counts the pointer fields of r that are set.
func setFields(r Resources) int {
	n := 0
	for _, set := range []bool{
		r.CPULimit != nil, r.CPURequest != nil, r.MemoryLimit != nil, r.MemoryRequest != nil,
		r.PidLimit != nil, r.CPUShares != nil, r.CPUQuota != nil, r.CPUPeriod != nil,
		r.CPUSetCPUs != nil, r.CPUSetMems != nil, r.MemorySwapLimit != nil, r.StorageLimit != nil,
		r.NetworkBandwidth != nil, r.NetworkIngressBps != nil, r.NetworkEgressBps != nil,
		r.DiskReadBps != nil, r.DiskWriteBps != nil, r.DiskReadIOPS != nil, r.DiskWriteIOPS != nil,
	} {
		if set {
			n++
		}
	}
	return n
}

func TestFromAnnotationsLimits(t *testing.T) {
	for _, tc := range []struct {
		desc    string
		key     string
		value   string
		want    Resources
		wantErr string // reason; "" means success
	}{
		{desc: "largest int64 bytes", key: AnnotationMemoryLimit, value: "9223372036854775807", want: Resources{MemoryLimit: ptr(int64(math.MaxInt64))}},
		{desc: "19-digit bytes", key: AnnotationMemoryLimit, value: "1000000000000000000", want: Resources{MemoryLimit: ptr(int64(1e18))}},
		{desc: "7 exbibytes", key: AnnotationMemoryLimit, value: "7Ei", want: Resources{MemoryLimit: ptr(int64(7) << 60)}},
		{desc: "8 exabytes", key: AnnotationMemoryLimit, value: "8E", want: Resources{MemoryLimit: ptr(int64(8e18))}},
		{desc: "one beyond int64", key: AnnotationMemoryLimit, value: "9223372036854775808", wantErr: "out of range"},
		{desc: "8 exbibytes is 2^63", key: AnnotationMemoryLimit, value: "8Ei", wantErr: "out of range"},
		{desc: "10 exabytes", key: AnnotationMemoryLimit, value: "10E", wantErr: "out of range"},
		{desc: "16 exbibytes is not capped", key: AnnotationMemoryLimit, value: "16Ei", wantErr: "out of range"},
		{desc: "exbibytes beyond int64 with a fraction", key: AnnotationStorageLimit, value: "8.5Ei", wantErr: "out of range"},
		{desc: "1 exbibyte", key: AnnotationStorageLimit, value: "1Ei", want: Resources{StorageLimit: ptr(int64(1) << 60)}},
		{desc: "bandwidth of 16 exbibits is not capped", key: AnnotationNetworkBandwidth, value: "16Ei", wantErr: "out of range"},
		{desc: "bandwidth of 1 exbibyte per second times 8", key: AnnotationNetworkBandwidth, value: "1EiBps", wantErr: "out of range"},
		{desc: "1e19", key: AnnotationPidLimit, value: "1e19", wantErr: "out of range"},
		{desc: "fractional bytes", key: AnnotationMemoryLimit, value: "1.5", wantErr: "whole"},
		{desc: "milli bytes", key: AnnotationMemoryRequest, value: "1n", wantErr: "whole"},
		{desc: "fractional pids", key: AnnotationPidLimit, value: "0.5", wantErr: "whole"},
		{desc: "fraction of kibibyte that is not whole", key: AnnotationStorageLimit, value: "0.0001Ki", wantErr: "whole"},
		// 9223372036854775000 millicores, as close as a float64 gets.
		{desc: "largest cpu", key: AnnotationCPULimit, value: "9223372036854775", want: Resources{CPULimit: ptr(float64(9223372036854775000) / 1000)}},
		{desc: "cpu beyond millicores in int64", key: AnnotationCPULimit, value: "9223372036854776", wantErr: "out of range"},
		{desc: "cpu of 10 exa", key: AnnotationCPURequest, value: "10E", wantErr: "out of range"},
		{desc: "cpu nano rounds up to a millicore", key: AnnotationCPURequest, value: "1n", want: Resources{CPURequest: ptr(0.001)}},
		{desc: "cpu 1e-3", key: AnnotationCPULimit, value: "1e-3", want: Resources{CPULimit: ptr(0.001)}},
		{desc: "bandwidth beyond int64", key: AnnotationNetworkBandwidth, value: "9223372036854775808", wantErr: "out of range"},
		{desc: "bandwidth largest int64", key: AnnotationK8sIngress, value: "9223372036854775807", want: Resources{NetworkIngressBps: ptr(int64(math.MaxInt64))}},
		{desc: "bandwidth fractional bits", key: AnnotationK8sEgress, value: "1.5", wantErr: "whole"},
		{desc: "exponent of two digits", key: AnnotationMemoryLimit, value: "1e18", want: Resources{MemoryLimit: ptr(int64(1e18))}},
		{desc: "exponent with leading zeros", key: AnnotationMemoryLimit, value: "1e0009", want: Resources{MemoryLimit: ptr(int64(1e9))}},
		{desc: "exponent of 99", key: AnnotationMemoryLimit, value: "1e99", wantErr: "out of range"},
		{desc: "tiny exponent", key: AnnotationCPULimit, value: "1e-99", want: Resources{CPULimit: ptr(0.001)}},
		{desc: "exponent of 100", key: AnnotationMemoryLimit, value: "1e100", wantErr: "exponent out of range"},
		{desc: "exponent beyond int32", key: AnnotationCPULimit, value: "9E27000000000000000", wantErr: "exponent out of range"},
		{desc: "exponent that truncates to int32", key: AnnotationPidLimit, value: "1e4294967305", wantErr: "exponent out of range"},
		{desc: "huge negative exponent", key: AnnotationCPURequest, value: "1e-999999999", wantErr: "exponent out of range"},
		{desc: "huge exponent bandwidth", key: AnnotationNetworkBandwidth, value: "9E27000000000000000bps", wantErr: "exponent out of range"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			r, err := FromAnnotations(map[string]string{tc.key: tc.value})
			if tc.wantErr != "" {
				require.Error(t, err)
				assert.True(t, errdefs.IsInvalidArgument(err), "error %v", err)
				assert.Contains(t, err.Error(), tc.key+"="+strconv.Quote(tc.value))
				assert.Contains(t, err.Error(), tc.wantErr)
				assert.Equal(t, Resources{}, r)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, r)
		})
	}
}

func TestFromAnnotationsInvalid(t *testing.T) {
	for _, tc := range []struct {
		desc   string
		value  string
		reason string // in the message; "" = any
	}{
		{desc: "letters", value: "abc"},
		{desc: "empty", value: ""},
		{desc: "leading space", value: " 2"},
		{desc: "trailing space", value: "2 "},
		{desc: "space before unit", value: "2 Gi"},
		{desc: "unknown unit", value: "2x"},
		{desc: "lowercase binary unit", value: "2gi"},
		{desc: "negative", value: "-1", reason: "negative"},
		{desc: "negative with unit", value: "-1Gi", reason: "negative"},
		{desc: "NaN", value: "NaN"},
		{desc: "Inf", value: "Inf"},
		{desc: "+Inf", value: "+Inf"},
		{desc: "beyond int64", value: "9223372036854775808", reason: "out of range"},
		{desc: "10 exa", value: "10E", reason: "out of range"},
		{desc: "fullwidth digit", value: "２"},
		{desc: "arabic-indic digit", value: "٣"},
		{desc: "unit without a number", value: "Gi"},
		{desc: "kilo without a number", value: "k"},
		{desc: "exponent without a number", value: "e9"},
		{desc: "sign alone", value: "+"},
		{desc: "minus alone", value: "-"},
		{desc: "dot alone", value: "."},
		{desc: "two dots", value: "1.2.3"},
		{desc: "hex", value: "0x10"},
		{desc: "NUL byte", value: "1\x00"},
		{desc: "invalid utf-8", value: "\xff"},
	} {
		for _, k := range annotationKeys {
			t.Run(tc.desc+"/"+k.key, func(t *testing.T) {
				r, err := FromAnnotations(map[string]string{
					k.key:          tc.value,
					"unrelated/ok": "x",
				})
				require.Error(t, err, "parsed as %+v", r)
				assert.True(t, errdefs.IsInvalidArgument(err), "error %v", err)
				assert.Contains(t, err.Error(), k.key+"="+strconv.Quote(tc.value))
				if tc.reason != "" {
					assert.Contains(t, err.Error(), tc.reason)
				}
				assert.Equal(t, Resources{}, r)
			})
		}
	}
}

func TestFromAnnotationsHugeValue(t *testing.T) {
	for _, tc := range []struct {
		desc   string
		filler string
	}{
		{desc: "digits", filler: "9"},
		{desc: "digits with a fraction", filler: "1.5"},
		{desc: "letters", filler: "a"},
		{desc: "NUL bytes", filler: "\x00"},
		{desc: "invalid utf-8", filler: "\xff"},
		{desc: "multi-byte runes", filler: "€"},
		{desc: "line separators", filler: "\u2028"},
		{desc: "quotes", filler: `"`},
	} {
		value := strings.Repeat(tc.filler, (1<<20)/len(tc.filler))
		for _, k := range annotationKeys {
			t.Run(tc.desc+"/"+k.key, func(t *testing.T) {
				start := time.Now()
				_, err := FromAnnotations(map[string]string{k.key: value})
				elapsed := time.Since(start)
				require.Error(t, err)
				assert.True(t, errdefs.IsInvalidArgument(err), "error %v", err)
				assert.Less(t, len(err.Error()), 300, "error %q", err)
				assert.Contains(t, err.Error(), k.key)
				assert.Less(t, elapsed, 500*time.Millisecond, "parsing a 1 MiB value")
			})
		}
	}
}

func TestFromAnnotationsUnknownIgnored(t *testing.T) {
	for _, tc := range []struct {
		desc string
		a    map[string]string
		want Resources
	}{
		{desc: "nil", a: nil},
		{desc: "empty", a: map[string]string{}},
		{desc: "other annotations", a: map[string]string{
			"io.kubernetes.cri.sandbox-name": "pod",
			"resources.limits.CPU":           "abc", // keys are case sensitive
			"resources.limits.cpu ":          "abc",
			"resources.limits.gpu":           "abc",
			"resources.limits":               "abc",
		}},
		{desc: "10000 unknown and one known", a: func() map[string]string {
			a := make(map[string]string, 10001)
			for i := range 10000 {
				a[fmt.Sprintf("example.com/annotation-%d", i)] = strings.Repeat("x", i%100)
			}
			a[AnnotationMemoryLimit] = "1Gi"
			return a
		}(), want: Resources{MemoryLimit: ptr(int64(1 << 30))}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			start := time.Now()
			r, err := FromAnnotations(tc.a)
			elapsed := time.Since(start)
			require.NoError(t, err)
			assert.Equal(t, tc.want, r)
			assert.Less(t, elapsed, 500*time.Millisecond)
		})
	}
}

func TestFromAnnotationsAll(t *testing.T) {
	r, err := FromAnnotations(map[string]string{
		AnnotationCPULimit:         "2",
		AnnotationCPURequest:       "250m",
		AnnotationMemoryLimit:      "2Gi",
		AnnotationMemoryRequest:    "1G",
		AnnotationPidLimit:         "1k",
		AnnotationStorageLimit:     "10Gi",
		AnnotationNetworkBandwidth: "1Gbps",
		AnnotationNetworkIngress:   "100Mbps",
		AnnotationNetworkEgress:    "10MBps",
		AnnotationDiskReadBps:      "100Mi",
		AnnotationDiskWriteBps:     "50M",
		AnnotationDiskReadIOPS:     "1000",
		AnnotationDiskWriteIOPS:    "2e3",
	})
	require.NoError(t, err)
	assert.Equal(t, Resources{
		CPULimit:          ptr(2.0),
		CPURequest:        ptr(0.25),
		MemoryLimit:       ptr(int64(2 << 30)),
		MemoryRequest:     ptr(int64(1e9)),
		PidLimit:          ptr(int64(1000)),
		StorageLimit:      ptr(int64(10 << 30)),
		NetworkBandwidth:  ptr(int64(1e9)),
		NetworkIngressBps: ptr(int64(1e8)),
		NetworkEgressBps:  ptr(int64(8e7)),
		DiskReadBps:       ptr(int64(100 << 20)),
		DiskWriteBps:      ptr(int64(50e6)),
		DiskReadIOPS:      ptr(int64(1000)),
		DiskWriteIOPS:     ptr(int64(2000)),
	}, r)
}

func TestFromAnnotationsBandwidthPrecedence(t *testing.T) {
	for _, tc := range []struct {
		desc        string
		a           map[string]string
		wantIngress *int64
		wantEgress  *int64
	}{
		{
			desc: "kubernetes annotations alone",
			a: map[string]string{
				AnnotationK8sIngress: "10M",
				AnnotationK8sEgress:  "20M",
			},
			wantIngress: ptr(int64(10e6)),
			wantEgress:  ptr(int64(20e6)),
		},
		{
			desc: "ours alone",
			a: map[string]string{
				AnnotationNetworkIngress: "30Mbps",
				AnnotationNetworkEgress:  "40Mbps",
			},
			wantIngress: ptr(int64(30e6)),
			wantEgress:  ptr(int64(40e6)),
		},
		{
			desc: "ours win over kubernetes'",
			a: map[string]string{
				AnnotationK8sIngress:     "10M",
				AnnotationK8sEgress:      "20M",
				AnnotationNetworkIngress: "30Mbps",
				AnnotationNetworkEgress:  "40Mbps",
			},
			wantIngress: ptr(int64(30e6)),
			wantEgress:  ptr(int64(40e6)),
		},
		{
			desc: "mixed directions",
			a: map[string]string{
				AnnotationK8sIngress:    "10M",
				AnnotationNetworkEgress: "40Mbps",
			},
			wantIngress: ptr(int64(10e6)),
			wantEgress:  ptr(int64(40e6)),
		},
		{
			desc: "total bandwidth does not fill the directions",
			a: map[string]string{
				AnnotationNetworkBandwidth: "1Gbps",
			},
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			r, err := FromAnnotations(tc.a)
			require.NoError(t, err)
			assert.Equal(t, tc.wantIngress, r.NetworkIngressBps)
			assert.Equal(t, tc.wantEgress, r.NetworkEgressBps)
		})
	}

	t.Run("bad kubernetes value is reported even when ours is set", func(t *testing.T) {
		_, err := FromAnnotations(map[string]string{
			AnnotationK8sIngress:     "fast",
			AnnotationNetworkIngress: "30Mbps",
		})
		require.Error(t, err)
		assert.True(t, errdefs.IsInvalidArgument(err))
		assert.Contains(t, err.Error(), AnnotationK8sIngress)
	})
}

func TestParseBandwidth(t *testing.T) {
	for _, tc := range []struct {
		desc    string
		in      string
		want    int64
		wantErr string
	}{
		{desc: "megabits", in: "100Mbps", want: 1e8},
		{desc: "gigabits", in: "1Gbps", want: 1e9},
		{desc: "fractional gigabits", in: "1.5Gbps", want: 15e8},
		{desc: "kilobits with capital K", in: "800Kbps", want: 8e5},
		{desc: "kilobits with small k", in: "800kbps", want: 8e5},
		{desc: "megabytes per second", in: "10MBps", want: 8e7},
		{desc: "kilobytes per second with capital K", in: "1KBps", want: 8000},
		{desc: "bare quantity of bits", in: "10M", want: 1e7},
		{desc: "bare integer", in: "100", want: 100},
		{desc: "bits per second", in: "100bps", want: 100},
		{desc: "zero", in: "0", want: 0},
		{desc: "binary mebibits", in: "1Mibps", want: 1 << 20},
		{desc: "binary kibibits", in: "1Kibps", want: 1 << 10},
		{desc: "fractional binary that is whole", in: "1.5Gibps", want: 3 << 29},
		{desc: "exponent", in: "1e9bps", want: 1e9},
		{desc: "largest int64 bits", in: "9223372036854775807bps", want: math.MaxInt64},
		{desc: "largest int64 bits bare", in: "9223372036854775807", want: math.MaxInt64},
		{desc: "largest bytes that fit", in: "1152921504606846975Bps", want: math.MaxInt64 - 7},
		{desc: "exabyte per second", in: "1EBps", want: 8e18},
		{desc: "exbibit per second", in: "1Eibps", want: 1 << 60},
		{desc: "binary beyond int64", in: "8Eibps", wantErr: "out of range"},
		{desc: "binary far beyond int64", in: "1000Eibps", wantErr: "out of range"},
		{desc: "empty", in: "", wantErr: "want a bandwidth"},
		{desc: "unit only", in: "bps", wantErr: "want a bandwidth"},
		{desc: "byte unit only", in: "Bps", wantErr: "want a bandwidth"},
		{desc: "prefix without a number", in: "Kbps", wantErr: "want a bandwidth"},
		{desc: "mega prefix without a number", in: "Mbps", wantErr: "want a bandwidth"},
		{desc: "negative", in: "-1Mbps", wantErr: "negative"},
		{desc: "fractional bits", in: "1.5bps", wantErr: "whole"},
		{desc: "milli bits", in: "1mbps", wantErr: "whole"},
		{desc: "beyond int64", in: "9999999Ebps", wantErr: "out of range"},
		{desc: "one beyond int64", in: "9223372036854775808bps", wantErr: "out of range"},
		{desc: "bytes beyond int64 once times 8", in: "1152921504606846976Bps", wantErr: "out of range"},
		{desc: "two exabytes per second", in: "2EBps", wantErr: "out of range"},
		{desc: "words", in: "fast", wantErr: "want a bandwidth"},
		{desc: "space", in: "100 Mbps", wantErr: "want a bandwidth"},
		{desc: "lowercase unit", in: "100MBPS", wantErr: "want a bandwidth"},
		{desc: "bits per second twice", in: "1bpsbps", wantErr: "want a bandwidth"},
		{desc: "NaN", in: "NaNbps", wantErr: "want a bandwidth"},
		{desc: "fullwidth digit", in: "１Mbps", wantErr: "want a bandwidth"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			got, err := ParseBandwidth(tc.in)
			if tc.wantErr != "" {
				require.Error(t, err, "parsed as %d", got)
				assert.Contains(t, err.Error(), tc.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestFromLinuxResources(t *testing.T) {
	for _, tc := range []struct {
		desc    string
		where   string // default linux.resources
		in      *runtime.LinuxContainerResources
		want    Resources
		wantErr string // the key the error must name
	}{
		{desc: "nil", in: nil},
		{desc: "empty", in: &runtime.LinuxContainerResources{}},
		{
			desc: "quota and period",
			in:   &runtime.LinuxContainerResources{CpuQuota: 150000, CpuPeriod: 100000},
			want: Resources{CPULimit: ptr(1.5), CPUQuota: ptr(int64(150000)), CPUPeriod: ptr(uint64(100000))},
		},
		{
			desc: "quota and short period",
			in:   &runtime.LinuxContainerResources{CpuQuota: 25000, CpuPeriod: 50000},
			want: Resources{CPULimit: ptr(0.5), CPUQuota: ptr(int64(25000)), CPUPeriod: ptr(uint64(50000))},
		},
		{
			desc: "quota not on a millicore",
			in:   &runtime.LinuxContainerResources{CpuQuota: 33333, CpuPeriod: 100000},
			want: Resources{CPULimit: ptr(0.333), CPUQuota: ptr(int64(33333)), CPUPeriod: ptr(uint64(100000))},
		},
		{
			desc: "unlimited quota keeps the period",
			in:   &runtime.LinuxContainerResources{CpuQuota: -1, CpuPeriod: 100000},
			want: Resources{CPUPeriod: ptr(uint64(100000))},
		},
		{
			desc: "zero quota is unset",
			in:   &runtime.LinuxContainerResources{CpuQuota: 0, CpuPeriod: 100000},
			want: Resources{CPUPeriod: ptr(uint64(100000))},
		},
		{
			desc: "unlimited quota without period",
			in:   &runtime.LinuxContainerResources{CpuQuota: -1},
		},
		{
			desc:    "quota without period",
			in:      &runtime.LinuxContainerResources{CpuQuota: 50000},
			wantErr: "linux.resources.cpu_quota",
		},
		{
			desc:    "quota without period names the overhead",
			where:   "linux.overhead",
			in:      &runtime.LinuxContainerResources{CpuQuota: 50000},
			wantErr: "linux.overhead.cpu_quota",
		},
		{
			desc:    "quota below -1",
			in:      &runtime.LinuxContainerResources{CpuQuota: -2, CpuPeriod: 100000},
			wantErr: "linux.resources.cpu_quota",
		},
		{
			desc:    "negative period",
			in:      &runtime.LinuxContainerResources{CpuQuota: 50000, CpuPeriod: -1},
			wantErr: "linux.resources.cpu_period",
		},
		{
			desc: "shares 512",
			in:   &runtime.LinuxContainerResources{CpuShares: 512},
			want: Resources{CPURequest: ptr(0.5), CPUShares: ptr(uint64(512))},
		},
		{
			desc: "shares 1024",
			in:   &runtime.LinuxContainerResources{CpuShares: 1024},
			want: Resources{CPURequest: ptr(1.0), CPUShares: ptr(uint64(1024))},
		},
		{
			desc: "minimum shares is no request",
			in:   &runtime.LinuxContainerResources{CpuShares: 2},
			want: Resources{CPUShares: ptr(uint64(2))},
		},
		{
			desc: "shares 102 is 100m",
			in:   &runtime.LinuxContainerResources{CpuShares: 102},
			want: Resources{CPURequest: ptr(0.1), CPUShares: ptr(uint64(102))},
		},
		{
			desc: "shares kubelet gives 30m",
			in:   &runtime.LinuxContainerResources{CpuShares: 30},
			want: Resources{CPURequest: ptr(0.03), CPUShares: ptr(uint64(30))},
		},
		{
			desc: "shares kubelet gives 64m",
			in:   &runtime.LinuxContainerResources{CpuShares: 65},
			want: Resources{CPURequest: ptr(0.064), CPUShares: ptr(uint64(65))},
		},
		{
			desc: "shares 0 is unset",
			in:   &runtime.LinuxContainerResources{CpuShares: 0},
		},
		{
			desc:    "negative shares",
			in:      &runtime.LinuxContainerResources{CpuShares: -1},
			wantErr: "linux.resources.cpu_shares",
		},
		{
			desc: "memory",
			in:   &runtime.LinuxContainerResources{MemoryLimitInBytes: 256 << 20},
			want: Resources{MemoryLimit: ptr(int64(256 << 20))},
		},
		{
			desc:    "negative memory",
			in:      &runtime.LinuxContainerResources{MemoryLimitInBytes: -1},
			wantErr: "linux.resources.memory_limit_in_bytes",
		},
		{
			desc: "unlimited swap is kept",
			in:   &runtime.LinuxContainerResources{MemorySwapLimitInBytes: -1},
			want: Resources{MemorySwapLimit: ptr(int64(-1))},
		},
		{
			desc: "zero swap is unset",
			in:   &runtime.LinuxContainerResources{MemorySwapLimitInBytes: 0},
		},
		{
			desc: "swap",
			in:   &runtime.LinuxContainerResources{MemoryLimitInBytes: 1 << 30, MemorySwapLimitInBytes: 2 << 30},
			want: Resources{MemoryLimit: ptr(int64(1 << 30)), MemorySwapLimit: ptr(int64(2 << 30))},
		},
		{
			desc:    "swap below -1",
			in:      &runtime.LinuxContainerResources{MemorySwapLimitInBytes: -2},
			wantErr: "linux.resources.memory_swap_limit_in_bytes",
		},
		{
			desc: "cpuset",
			in:   &runtime.LinuxContainerResources{CpusetCpus: "0-3,5", CpusetMems: "0"},
			want: Resources{CPUSetCPUs: ptr("0-3,5"), CPUSetMems: ptr("0")},
		},
		{
			desc: "cpuset single and degenerate range",
			in:   &runtime.LinuxContainerResources{CpusetCpus: "7,8-8", CpusetMems: "0-1"},
			want: Resources{CPUSetCPUs: ptr("7,8-8"), CPUSetMems: ptr("0-1")},
		},
		{desc: "empty cpuset is skipped", in: &runtime.LinuxContainerResources{CpusetCpus: "", CpusetMems: ""}},
		{desc: "reversed range", in: &runtime.LinuxContainerResources{CpusetCpus: "3-1"}, wantErr: "linux.resources.cpuset_cpus"},
		{desc: "letters in cpuset", in: &runtime.LinuxContainerResources{CpusetCpus: "a"}, wantErr: "linux.resources.cpuset_cpus"},
		{desc: "open range", in: &runtime.LinuxContainerResources{CpusetCpus: "0-"}, wantErr: "linux.resources.cpuset_cpus"},
		{desc: "empty element", in: &runtime.LinuxContainerResources{CpusetCpus: "0,,1"}, wantErr: "linux.resources.cpuset_cpus"},
		{desc: "negative cpu", in: &runtime.LinuxContainerResources{CpusetCpus: "-1"}, wantErr: "linux.resources.cpuset_cpus"},
		{desc: "spaces in cpuset", in: &runtime.LinuxContainerResources{CpusetCpus: "0, 1"}, wantErr: "linux.resources.cpuset_cpus"},
		{desc: "bad mems", in: &runtime.LinuxContainerResources{CpusetMems: "x"}, wantErr: "linux.resources.cpuset_mems"},
		{
			desc: "hugepages",
			in: &runtime.LinuxContainerResources{HugepageLimits: []*runtime.HugepageLimit{
				{PageSize: "2MB", Limit: 1 << 30},
				{PageSize: "1GB", Limit: 2 << 30},
			}},
			want: Resources{HugepageLimits: map[string]uint64{"2MB": 1 << 30, "1GB": 2 << 30}},
		},
		{
			desc:    "hugepage without page size",
			in:      &runtime.LinuxContainerResources{HugepageLimits: []*runtime.HugepageLimit{{Limit: 1}}},
			wantErr: "linux.resources.hugepage_limits.page_size",
		},
		{
			desc: "unified memory.min is the memory request",
			in:   &runtime.LinuxContainerResources{Unified: map[string]string{"memory.min": "134217728"}},
			want: Resources{MemoryRequest: ptr(int64(128 << 20)), Unified: map[string]string{"memory.min": "134217728"}},
		},
		{
			desc: "unified pids.max",
			in:   &runtime.LinuxContainerResources{Unified: map[string]string{"pids.max": "100"}},
			want: Resources{PidLimit: ptr(int64(100)), Unified: map[string]string{"pids.max": "100"}},
		},
		{
			desc: "unified max values are no limits",
			in: &runtime.LinuxContainerResources{Unified: map[string]string{
				"pids.max": "max", "memory.max": "max", "memory.min": "max", "cpu.max": "max 100000",
			}},
			want: Resources{Unified: map[string]string{
				"pids.max": "max", "memory.max": "max", "memory.min": "max", "cpu.max": "max 100000",
			}},
		},
		{
			desc: "unified memory.max when memory_limit_in_bytes unset",
			in:   &runtime.LinuxContainerResources{Unified: map[string]string{"memory.max": "536870912"}},
			want: Resources{MemoryLimit: ptr(int64(512 << 20)), Unified: map[string]string{"memory.max": "536870912"}},
		},
		{
			desc: "memory_limit_in_bytes wins over unified memory.max",
			in: &runtime.LinuxContainerResources{
				MemoryLimitInBytes: 256 << 20,
				Unified:            map[string]string{"memory.max": "536870912"},
			},
			want: Resources{MemoryLimit: ptr(int64(256 << 20)), Unified: map[string]string{"memory.max": "536870912"}},
		},
		{
			desc: "unified cpu.max",
			in:   &runtime.LinuxContainerResources{Unified: map[string]string{"cpu.max": "50000 100000"}},
			want: Resources{
				CPULimit: ptr(0.5), CPUQuota: ptr(int64(50000)), CPUPeriod: ptr(uint64(100000)),
				Unified: map[string]string{"cpu.max": "50000 100000"},
			},
		},
		{
			desc: "unified cpu.max with the default period",
			in:   &runtime.LinuxContainerResources{Unified: map[string]string{"cpu.max": "200000"}},
			want: Resources{
				CPULimit: ptr(2.0), CPUQuota: ptr(int64(200000)), CPUPeriod: ptr(uint64(DefaultCPUPeriod)),
				Unified: map[string]string{"cpu.max": "200000"},
			},
		},
		{
			desc: "cpu_quota wins over unified cpu.max",
			in: &runtime.LinuxContainerResources{
				CpuQuota: 100000, CpuPeriod: 100000,
				Unified: map[string]string{"cpu.max": "50000 100000"},
			},
			want: Resources{
				CPULimit: ptr(1.0), CPUQuota: ptr(int64(100000)), CPUPeriod: ptr(uint64(100000)),
				Unified: map[string]string{"cpu.max": "50000 100000"},
			},
		},
		{desc: "unified cpu.max letters", in: &runtime.LinuxContainerResources{Unified: map[string]string{"cpu.max": "abc"}}, wantErr: "linux.resources.unified.cpu.max"},
		{desc: "unified cpu.max empty", in: &runtime.LinuxContainerResources{Unified: map[string]string{"cpu.max": ""}}, wantErr: "linux.resources.unified.cpu.max"},
		{desc: "unified cpu.max three fields", in: &runtime.LinuxContainerResources{Unified: map[string]string{"cpu.max": "1 2 3"}}, wantErr: "linux.resources.unified.cpu.max"},
		{desc: "unified cpu.max zero period", in: &runtime.LinuxContainerResources{Unified: map[string]string{"cpu.max": "50000 0"}}, wantErr: "linux.resources.unified.cpu.max"},
		{desc: "unified cpu.max bad period", in: &runtime.LinuxContainerResources{Unified: map[string]string{"cpu.max": "max x"}}, wantErr: "linux.resources.unified.cpu.max"},
		{desc: "unified cpu.max negative quota", in: &runtime.LinuxContainerResources{Unified: map[string]string{"cpu.max": "-1 100000"}}, wantErr: "linux.resources.unified.cpu.max"},
		{desc: "unified cpu.max zero quota", in: &runtime.LinuxContainerResources{Unified: map[string]string{"cpu.max": "0 100000"}}, wantErr: "linux.resources.unified.cpu.max"},
		{desc: "unified memory.min negative", in: &runtime.LinuxContainerResources{Unified: map[string]string{"memory.min": "-1"}}, wantErr: "linux.resources.unified.memory.min"},
		{desc: "unified memory.min quantity", in: &runtime.LinuxContainerResources{Unified: map[string]string{"memory.min": "1Gi"}}, wantErr: "linux.resources.unified.memory.min"},
		{desc: "unified memory.max letters", in: &runtime.LinuxContainerResources{Unified: map[string]string{"memory.max": "lots"}}, wantErr: "linux.resources.unified.memory.max"},
		{desc: "unified pids.max letters", in: &runtime.LinuxContainerResources{Unified: map[string]string{"pids.max": "x"}}, wantErr: "linux.resources.unified.pids.max"},
		{
			desc: "other unified keys are kept",
			in:   &runtime.LinuxContainerResources{Unified: map[string]string{"io.weight": "100", "memory.high": "1000"}},
			want: Resources{Unified: map[string]string{"io.weight": "100", "memory.high": "1000"}},
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			where := tc.where
			if where == "" {
				where = "linux.resources"
			}
			got, err := FromLinuxResources(where, tc.in)
			if tc.wantErr != "" {
				require.Error(t, err, "got %+v", got)
				assert.True(t, errdefs.IsInvalidArgument(err), "error %v", err)
				assert.Contains(t, err.Error(), tc.wantErr+"=")
				assert.Equal(t, Resources{}, got)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestFromLinuxResourcesCopiesUnified(t *testing.T) {
	in := &runtime.LinuxContainerResources{Unified: map[string]string{"memory.high": "1"}}
	got, err := FromLinuxResources("linux.resources", in)
	require.NoError(t, err)
	in.Unified["memory.high"] = "2"
	in.Unified["new"] = "3"
	assert.Equal(t, map[string]string{"memory.high": "1"}, got.Unified)
}

func TestFromOCISpec(t *testing.T) {
	withResources := func(lr specs.LinuxResources) *specs.Spec {
		return &specs.Spec{Linux: &specs.Linux{Resources: &lr}}
	}
	for _, tc := range []struct {
		desc    string
		in      *specs.Spec
		want    Resources
		wantErr string
	}{
		{desc: "nil spec"},
		{desc: "no linux", in: &specs.Spec{}},
		{desc: "no resources", in: &specs.Spec{Linux: &specs.Linux{}}},
		{desc: "empty resources", in: withResources(specs.LinuxResources{})},
		{desc: "empty cpu", in: withResources(specs.LinuxResources{CPU: &specs.LinuxCPU{}})},
		{
			desc: "cpu",
			in: withResources(specs.LinuxResources{CPU: &specs.LinuxCPU{
				Shares: ptr(uint64(512)), Quota: ptr(int64(150000)), Period: ptr(uint64(100000)),
				Cpus: "0-1", Mems: "0",
			}}),
			want: Resources{
				CPULimit: ptr(1.5), CPURequest: ptr(0.5),
				CPUShares: ptr(uint64(512)), CPUQuota: ptr(int64(150000)), CPUPeriod: ptr(uint64(100000)),
				CPUSetCPUs: ptr("0-1"), CPUSetMems: ptr("0"),
			},
		},
		{
			desc: "unlimited quota",
			in:   withResources(specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: ptr(int64(-1)), Period: ptr(uint64(100000))}}),
			want: Resources{CPUPeriod: ptr(uint64(100000))},
		},
		{
			desc: "zero shares is unset",
			in:   withResources(specs.LinuxResources{CPU: &specs.LinuxCPU{Shares: ptr(uint64(0))}}),
		},
		{
			desc:    "quota without period",
			in:      withResources(specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: ptr(int64(50000))}}),
			wantErr: "linux.resources.cpu.cpu_quota",
		},
		{
			desc:    "quota below -1",
			in:      withResources(specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: ptr(int64(-2)), Period: ptr(uint64(100000))}}),
			wantErr: "linux.resources.cpu.cpu_quota",
		},
		{
			desc:    "period beyond int64",
			in:      withResources(specs.LinuxResources{CPU: &specs.LinuxCPU{Period: ptr(uint64(math.MaxInt64) + 1)}}),
			wantErr: "linux.resources.cpu.period",
		},
		{
			desc:    "bad cpus",
			in:      withResources(specs.LinuxResources{CPU: &specs.LinuxCPU{Cpus: "3-1"}}),
			wantErr: "linux.resources.cpu.cpuset_cpus",
		},
		{
			desc:    "bad mems",
			in:      withResources(specs.LinuxResources{CPU: &specs.LinuxCPU{Mems: "zero"}}),
			wantErr: "linux.resources.cpu.cpuset_mems",
		},
		{
			desc: "memory",
			in: withResources(specs.LinuxResources{Memory: &specs.LinuxMemory{
				Limit: ptr(int64(1 << 30)), Reservation: ptr(int64(512 << 20)), Swap: ptr(int64(2 << 30)),
			}}),
			want: Resources{
				MemoryLimit: ptr(int64(1 << 30)), MemoryRequest: ptr(int64(512 << 20)), MemorySwapLimit: ptr(int64(2 << 30)),
			},
		},
		{
			desc: "unlimited memory",
			in: withResources(specs.LinuxResources{Memory: &specs.LinuxMemory{
				Limit: ptr(int64(-1)), Reservation: ptr(int64(-1)), Swap: ptr(int64(-1)),
			}}),
			want: Resources{MemorySwapLimit: ptr(int64(-1))},
		},
		{
			desc: "zero memory is unset",
			in: withResources(specs.LinuxResources{Memory: &specs.LinuxMemory{
				Limit: ptr(int64(0)), Reservation: ptr(int64(0)), Swap: ptr(int64(0)),
			}}),
		},
		{
			desc:    "memory limit below -1",
			in:      withResources(specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: ptr(int64(-2))}}),
			wantErr: "linux.resources.memory.limit",
		},
		{
			desc:    "memory reservation below -1",
			in:      withResources(specs.LinuxResources{Memory: &specs.LinuxMemory{Reservation: ptr(int64(-2))}}),
			wantErr: "linux.resources.memory.reservation",
		},
		{
			desc:    "swap below -1",
			in:      withResources(specs.LinuxResources{Memory: &specs.LinuxMemory{Swap: ptr(int64(-2))}}),
			wantErr: "linux.resources.memory.swap",
		},
		{
			desc: "pids",
			in:   withResources(specs.LinuxResources{Pids: &specs.LinuxPids{Limit: ptr(int64(100))}}),
			want: Resources{PidLimit: ptr(int64(100))},
		},
		{desc: "pids 0 is unlimited", in: withResources(specs.LinuxResources{Pids: &specs.LinuxPids{Limit: ptr(int64(0))}})},
		{desc: "pids -1 is unlimited", in: withResources(specs.LinuxResources{Pids: &specs.LinuxPids{Limit: ptr(int64(-1))}})},
		{desc: "pids without limit", in: withResources(specs.LinuxResources{Pids: &specs.LinuxPids{}})},
		{
			desc:    "pids -2",
			in:      withResources(specs.LinuxResources{Pids: &specs.LinuxPids{Limit: ptr(int64(-2))}}),
			wantErr: "linux.resources.pids.limit",
		},
		{
			desc: "hugepages",
			in: withResources(specs.LinuxResources{HugepageLimits: []specs.LinuxHugepageLimit{
				{Pagesize: "2MB", Limit: 1 << 30}, {Pagesize: "1GB", Limit: 0},
			}}),
			want: Resources{HugepageLimits: map[string]uint64{"2MB": 1 << 30, "1GB": 0}},
		},
		{
			desc:    "hugepage without size",
			in:      withResources(specs.LinuxResources{HugepageLimits: []specs.LinuxHugepageLimit{{Limit: 1}}}),
			wantErr: "linux.resources.hugepageLimits.pageSize",
		},
		{
			desc: "unified",
			in: withResources(specs.LinuxResources{Unified: map[string]string{
				"memory.min": "1024", "memory.max": "4096", "pids.max": "10", "cpu.max": "150000 100000",
			}}),
			want: Resources{
				MemoryRequest: ptr(int64(1024)), MemoryLimit: ptr(int64(4096)), PidLimit: ptr(int64(10)),
				CPULimit: ptr(1.5), CPUQuota: ptr(int64(150000)), CPUPeriod: ptr(uint64(100000)),
				Unified: map[string]string{
					"memory.min": "1024", "memory.max": "4096", "pids.max": "10", "cpu.max": "150000 100000",
				},
			},
		},
		{
			desc:    "bad unified",
			in:      withResources(specs.LinuxResources{Unified: map[string]string{"pids.max": "-5"}}),
			wantErr: "linux.resources.unified.pids.max",
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			got, err := FromOCISpec(tc.in)
			if tc.wantErr != "" {
				require.Error(t, err, "got %+v", got)
				assert.True(t, errdefs.IsInvalidArgument(err), "error %v", err)
				assert.Contains(t, err.Error(), tc.wantErr+"=")
				assert.Equal(t, Resources{}, got)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestFromPodSandboxConfig(t *testing.T) {
	full := func() *runtime.PodSandboxConfig {
		return &runtime.PodSandboxConfig{
			Metadata: &runtime.PodSandboxMetadata{Name: "pod", Namespace: "default", Uid: "uid", Attempt: 1},
			Hostname: "pod",
			Labels:   map[string]string{"app": "demo"},
			Annotations: map[string]string{
				AnnotationCPULimit:                   "2",
				AnnotationMemoryLimit:                "1Gi",
				AnnotationK8sIngress:                 "10M",
				"io.kubernetes.cri.sandbox-log-path": "/var/log/pods",
			},
			Linux: &runtime.LinuxPodSandboxConfig{
				CgroupParent: "/kubepods/burstable/poduid",
				Resources: &runtime.LinuxContainerResources{
					CpuPeriod:          100000,
					CpuQuota:           150000,
					CpuShares:          256,
					MemoryLimitInBytes: 768 << 20,
					CpusetCpus:         "0-3",
					HugepageLimits:     []*runtime.HugepageLimit{{PageSize: "2MB", Limit: 0}},
					Unified:            map[string]string{"memory.min": "268435456"},
				},
				Overhead: &runtime.LinuxContainerResources{
					CpuPeriod:          100000,
					CpuQuota:           25000,
					CpuShares:          256,
					MemoryLimitInBytes: 128 << 20,
				},
			},
		}
	}
	for _, tc := range []struct {
		desc    string
		cfg     *runtime.PodSandboxConfig
		want    Spec
		wantErr string
	}{
		{desc: "nil"},
		{desc: "empty", cfg: &runtime.PodSandboxConfig{}},
		{desc: "linux without resources", cfg: &runtime.PodSandboxConfig{Linux: &runtime.LinuxPodSandboxConfig{}}},
		{
			desc: "full",
			cfg:  full(),
			want: Spec{
				QOSClass: QOSBurstable,
				Annotations: Resources{
					CPULimit:          ptr(2.0),
					MemoryLimit:       ptr(int64(1 << 30)),
					NetworkIngressBps: ptr(int64(10e6)),
				},
				Linux: Resources{
					CPULimit:       ptr(1.5),
					CPURequest:     ptr(0.25),
					MemoryLimit:    ptr(int64(768 << 20)),
					MemoryRequest:  ptr(int64(256 << 20)),
					CPUShares:      ptr(uint64(256)),
					CPUQuota:       ptr(int64(150000)),
					CPUPeriod:      ptr(uint64(100000)),
					CPUSetCPUs:     ptr("0-3"),
					HugepageLimits: map[string]uint64{"2MB": 0},
					Unified:        map[string]string{"memory.min": "268435456"},
				},
				Overhead: Resources{
					CPULimit:    ptr(0.25),
					CPURequest:  ptr(0.25),
					MemoryLimit: ptr(int64(128 << 20)),
					CPUShares:   ptr(uint64(256)),
					CPUQuota:    ptr(int64(25000)),
					CPUPeriod:   ptr(uint64(100000)),
				},
			},
		},
		{
			desc: "bad annotation",
			cfg: func() *runtime.PodSandboxConfig {
				c := full()
				c.Annotations[AnnotationPidLimit] = "many"
				return c
			}(),
			wantErr: AnnotationPidLimit + `="many"`,
		},
		{
			desc: "bad resources",
			cfg: func() *runtime.PodSandboxConfig {
				c := full()
				c.Linux.Resources.CpuPeriod = 0
				return c
			}(),
			wantErr: "linux.resources.cpu_quota=",
		},
		{
			desc: "bad overhead",
			cfg: func() *runtime.PodSandboxConfig {
				c := full()
				c.Linux.Overhead.MemoryLimitInBytes = -5
				return c
			}(),
			wantErr: "linux.overhead.memory_limit_in_bytes=",
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			got, err := FromPodSandboxConfig(tc.cfg)
			if tc.wantErr != "" {
				require.Error(t, err)
				assert.True(t, errdefs.IsInvalidArgument(err), "error %v", err)
				assert.Contains(t, err.Error(), tc.wantErr)
				assert.Equal(t, Spec{}, got)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}
