package resourceinfo

import (
	"math"
	"strings"
)

// Kubernetes conversion constants, as kubelet names them in
// k8s.io/kubernetes/pkg/kubelet/cm/helpers_linux.go (v1.36.3).
const (
	// SharesPerCPU is the cgroup v1 cpu.shares value of one core.
	SharesPerCPU = 1024
	// MinShares is the kernel's smallest cpu.shares, and what kubelet
	// gives a pod or container without a CPU request
	// (MilliCPUToShares(0)).
	MinShares = 2
	// MaxShares is the kernel's largest cpu.shares.
	MaxShares = 262144
	// MilliCPUToCPU is millicores per core.
	MilliCPUToCPU = 1000
	// DefaultCPUPeriod is the CFS period kubelet and runc use
	// (QuotaPeriod, 100ms).
	DefaultCPUPeriod = 100000
	// MinQuotaPeriod is the kernel's smallest CFS quota, 1ms.
	MinQuotaPeriod = 1000
)

// MilliCPUToQuota converts millicores to a CFS quota for period, as
// kubelet's cm.MilliCPUToQuota does: 0 millicores is no quota (0), and a
// quota is at least MinQuotaPeriod. Unlike kubelet's it saturates at
// MaxInt64 instead of wrapping, and it uses the period it is given (kubelet
// does too with the CPUCFSQuotaPeriod feature gate; without it the period
// is always QuotaPeriod, which is what kubelet sends).
func MilliCPUToQuota(milliCPU int64, period uint64) int64 {
	if milliCPU <= 0 {
		return 0
	}
	q := mulDiv(milliCPU, period, MilliCPUToCPU)
	if q < MinQuotaPeriod {
		return MinQuotaPeriod
	}
	return q
}

// QuotaToMilliCPU converts a CFS quota and period to millicores, as
// kubelet's cm.QuotaToMilliCPU does: truncated, -1 (unlimited) and a zero
// period are 0.
func QuotaToMilliCPU(quota int64, period uint64) int64 {
	if quota <= 0 || period == 0 {
		return 0
	}
	// quota * 1000 / period without overflowing.
	p := int64(min(period, math.MaxInt64))
	whole, rest := quota/p, quota%p
	if whole > math.MaxInt64/MilliCPUToCPU {
		return math.MaxInt64
	}
	return whole*MilliCPUToCPU + mulDiv(rest, MilliCPUToCPU, uint64(p))
}

// MilliCPUToShares converts millicores to cpu.shares as kubelet's
// cm.MilliCPUToShares does: milliCPU * 1024 / 1000, truncated, within
// [MinShares, MaxShares]; 0 millicores is MinShares.
func MilliCPUToShares(milliCPU int64) uint64 {
	if milliCPU <= 0 {
		return MinShares
	}
	if milliCPU >= MaxShares*MilliCPUToCPU/SharesPerCPU+1 {
		return MaxShares
	}
	s := milliCPU * SharesPerCPU / MilliCPUToCPU
	if s < MinShares {
		return MinShares
	}
	return uint64(s)
}

// SharesToMilliCPU converts cpu.shares to millicores as kubelet's
// cm.SharesToMilliCPU does: rounded up, so that it inverts
// MilliCPUToShares for every request of 2m and more.
func SharesToMilliCPU(shares uint64) int64 {
	if shares < MinShares {
		return 0
	}
	shares = min(shares, MaxShares)
	return int64(math.Ceil(float64(shares*MilliCPUToCPU) / SharesPerCPU))
}

// requestMilliCPU is the CPU request that cpu.shares stand for:
// MinShares and below are kubelet's "no request" (MilliCPUToShares(0)),
// so requests of 1m and 2m, which kubelet also turns into MinShares, read
// as none.
func requestMilliCPU(shares uint64) int64 {
	if shares <= MinShares {
		return 0
	}
	return SharesToMilliCPU(shares)
}

// mulDiv is a * b / c for a >= 0, saturating at MaxInt64.
func mulDiv(a int64, b, c uint64) int64 {
	if a <= 0 || b == 0 {
		return 0
	}
	f := float64(a) * float64(b) / float64(c)
	if f >= math.MaxInt64 {
		return math.MaxInt64
	}
	if b <= math.MaxInt64/uint64(a) {
		return int64(uint64(a) * b / c)
	}
	return int64(f)
}

// QOS classes, as k8s.io/api/core/v1 names them.
const (
	QOSGuaranteed = "Guaranteed"
	QOSBurstable  = "Burstable"
	QOSBestEffort = "BestEffort"
)

// QOSFromCgroupParent reads a pod's QoS class from the cgroup parent
// kubelet gives its sandbox (PodSandboxConfig.linux.cgroup_parent: the pod
// cgroup, named after its QoS cgroup by qos_container_manager_linux.go):
// cgroupfs "/kubepods/burstable/pod<uid>", "/kubepods/besteffort/pod<uid>",
// "/kubepods/pod<uid>" (Guaranteed); systemd "kubepods-burstable-pod<uid>.slice",
// "kubepods-pod<uid>.slice". "" when the parent is not a kubelet pod cgroup
// (no cgroup_parent, or cgroupsPerQOS off).
func QOSFromCgroupParent(parent string) string {
	if len(parent) > 4096 {
		return ""
	}
	kubepods := false
	for _, elem := range strings.Split(parent, "/") {
		for _, tok := range strings.Split(strings.TrimSuffix(elem, ".slice"), "-") {
			switch tok {
			case "kubepods":
				kubepods = true
			case "besteffort":
				if kubepods {
					return QOSBestEffort
				}
			case "burstable":
				if kubepods {
					return QOSBurstable
				}
			}
		}
	}
	if kubepods {
		return QOSGuaranteed
	}
	return ""
}
