package resourceinfo

import (
	"fmt"
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
)

// The conversions follow kubelet's pkg/kubelet/cm/helpers_linux.go
// (v1.36.3); the known values are those of its tests
// (cm/helpers_linux_test.go TestMilliCPUToQuota,
// kuberuntime/helpers_linux_test.go TestSharesToMilliCPU, TestQuotaToMilliCPU).

func TestMilliCPUToQuota(t *testing.T) {
	for _, tc := range []struct {
		milli  int64
		period uint64
		quota  int64
	}{
		// cm.TestMilliCPUToQuota
		{0, 0, 0},
		{0, DefaultCPUPeriod, 0},
		{5, DefaultCPUPeriod, MinQuotaPeriod},
		{9, DefaultCPUPeriod, MinQuotaPeriod},
		{10, DefaultCPUPeriod, MinQuotaPeriod},
		{11, DefaultCPUPeriod, 1100},
		{200, DefaultCPUPeriod, 20000},
		{500, DefaultCPUPeriod, 50000},
		{1000, DefaultCPUPeriod, 100000},
		{1500, DefaultCPUPeriod, 150000},
		// Other periods (the CPUCFSQuotaPeriod feature gate).
		{1500, 50000, 75000},
		{100, 5000, MinQuotaPeriod},
		// Beyond kubelet: no wrap-around.
		{-1, DefaultCPUPeriod, 0},
		{math.MaxInt64, DefaultCPUPeriod, math.MaxInt64},
		{math.MaxInt64 / DefaultCPUPeriod, DefaultCPUPeriod, math.MaxInt64 / DefaultCPUPeriod * DefaultCPUPeriod / 1000},
		{1, math.MaxUint64, int64(float64(math.MaxUint64) / 1000)},
	} {
		t.Run(fmt.Sprintf("%dm/%d", tc.milli, tc.period), func(t *testing.T) {
			assert.Equal(t, tc.quota, MilliCPUToQuota(tc.milli, tc.period))
		})
	}
}

func TestQuotaToMilliCPU(t *testing.T) {
	for _, tc := range []struct {
		name   string
		quota  int64
		period uint64
		milli  int64
	}{
		// kuberuntime.TestQuotaToMilliCPU
		{"50m", 5000, 100000, 50},
		{"750m", 75000, 100000, 750},
		{"1000m", 100000, 100000, 1000},
		{"1500m", 150000, 100000, 1500},
		// The kernel's minimum quota is kubelet's MinMilliCPULimit.
		{"minimum quota", MinQuotaPeriod, DefaultCPUPeriod, 10},
		{"truncated", 33333, 100000, 333},
		{"unlimited", -1, 100000, 0},
		{"unset", 0, 100000, 0},
		{"no period", 1000, 0, 0},
		{"short period", 25000, 50000, 500},
		{"saturates", math.MaxInt64, 1, math.MaxInt64},
		{"largest exact", math.MaxInt64, DefaultCPUPeriod, math.MaxInt64 / 100},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.milli, QuotaToMilliCPU(tc.quota, tc.period))
		})
	}
}

func TestMilliCPUToShares(t *testing.T) {
	// The boundaries, in the style of opencontainers/cgroups'
	// TestConvertCPUSharesToCgroupV2Value.
	for milli, want := range map[int64]uint64{
		-1:                              MinShares,
		0:                               MinShares,
		1:                               MinShares,
		2:                               MinShares,
		3:                               3,
		1000:                            SharesPerCPU,
		MaxShares * 1000 / SharesPerCPU: MaxShares,
		MaxShares*1000/SharesPerCPU + 1: MaxShares,
		math.MaxInt64 / SharesPerCPU:    MaxShares,
		math.MaxInt64:                   MaxShares,
		// 255999 * 1024 / 1000 = 262142.976, truncated.
		255999: MaxShares - 2,
		1001:   1025,
	} {
		assert.Equal(t, want, MilliCPUToShares(milli), "MilliCPUToShares(%d)", milli)
	}
}

func TestSharesToMilliCPU(t *testing.T) {
	// kuberuntime.TestSharesToMilliCPU: its known values, and the round
	// trip over 0..2000 (here up to the largest shares).
	known := map[int64]uint64{
		0: 2, 1: 2, 2: 2, 3: 3, 4: 4, 32: 32, 64: 65, 100: 102, 250: 256,
		500: 512, 1000: 1024, 1500: 1536, 2000: 2048,
	}
	for milli := int64(0); milli <= MaxShares*1000/SharesPerCPU; milli++ {
		shares := MilliCPUToShares(milli)
		if want, ok := known[milli]; ok && shares != want {
			t.Errorf("MilliCPUToShares(%d) = %d, want %d", milli, shares, want)
		}
		wantMilli := max(milli, MinShares)
		if got := SharesToMilliCPU(shares); got != wantMilli {
			t.Fatalf("SharesToMilliCPU(%d) = %d, want %d", shares, got, wantMilli)
		}
		// What the sandboxer reads as a request: none at MinShares.
		wantReq := milli
		if milli <= MinShares {
			wantReq = 0
		}
		if got := requestMilliCPU(shares); got != wantReq {
			t.Fatalf("requestMilliCPU(%d) = %d, want %d", shares, got, wantReq)
		}
	}
	for shares, want := range map[uint64]int64{
		0: 0, 1: 0, MinShares: 2, MaxShares: 256000, MaxShares + 1: 256000, math.MaxUint64: 256000,
	} {
		assert.Equal(t, want, SharesToMilliCPU(shares), "SharesToMilliCPU(%d)", shares)
	}
}

func TestQuotaRoundTripMilli(t *testing.T) {
	// Every limit of MinMilliCPULimit (10m) and more survives
	// MilliCPUToQuota and QuotaToMilliCPU; below it the kernel's minimum
	// quota reads back as 10m, which is what is enforced.
	for _, period := range []uint64{DefaultCPUPeriod, 50000, 10000, 1000000} {
		for milli := int64(1); milli <= 64000; milli++ {
			q := MilliCPUToQuota(milli, period)
			want := milli
			if q == MinQuotaPeriod {
				want = MinQuotaPeriod * 1000 / int64(period)
			}
			if got := QuotaToMilliCPU(q, period); got != want {
				t.Fatalf("period %d: %dm -> quota %d -> %dm, want %dm", period, milli, q, got, want)
			}
		}
	}
}

func TestQOSFromCgroupParent(t *testing.T) {
	for parent, want := range map[string]string{
		"":                                   "",
		"/":                                  "",
		"/kubepods/besteffort/pod1234":       QOSBestEffort,
		"/kubepods/burstable/pod1234":        QOSBurstable,
		"/kubepods/pod1234":                  QOSGuaranteed,
		"/custom-root/kubepods/burstable/p1": QOSBurstable,
		"kubepods-besteffort-pod12_34.slice": QOSBestEffort,
		"kubepods-burstable-pod12_34.slice":  QOSBurstable,
		"kubepods-pod12_34.slice":            QOSGuaranteed,
		"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice": QOSBurstable,
		// Not kubelet's: no QoS class.
		"/besteffort/pod1": "",
		"/system.slice":    "",
		"/machine/vm1":     "",
	} {
		assert.Equal(t, want, QOSFromCgroupParent(parent), "QOSFromCgroupParent(%q)", parent)
	}
}
