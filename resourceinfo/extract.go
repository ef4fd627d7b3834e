package resourceinfo

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"k8s.io/apimachinery/pkg/api/resource"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Pod annotation keys. The first five are the reference design's; the rest
// extend it to the limits the vm backend enforces. Kubernetes' own bandwidth
// annotations (used by the CNI bandwidth plugin) are read too.
const (
	AnnotationCPULimit         = "resources.limits.cpu"
	AnnotationMemoryLimit      = "resources.limits.memory"
	AnnotationCPURequest       = "resources.requests.cpu"
	AnnotationMemoryRequest    = "resources.requests.memory"
	AnnotationPidLimit         = "resources.limits.pid"
	AnnotationStorageLimit     = "resources.limits.storage"
	AnnotationNetworkBandwidth = "resources.limits.network-bandwidth"
	AnnotationNetworkIngress   = "resources.limits.network-ingress"
	AnnotationNetworkEgress    = "resources.limits.network-egress"
	AnnotationDiskReadBps      = "resources.limits.disk-read-bps"
	AnnotationDiskWriteBps     = "resources.limits.disk-write-bps"
	AnnotationDiskReadIOPS     = "resources.limits.disk-read-iops"
	AnnotationDiskWriteIOPS    = "resources.limits.disk-write-iops"
	AnnotationK8sIngress       = "kubernetes.io/ingress-bandwidth"
	AnnotationK8sEgress        = "kubernetes.io/egress-bandwidth"
)

// maxShownValue bounds how much of a hostile value an error message repeats.
const maxShownValue = 64

// maxNameLen bounds the container names recorded: Kubernetes' are DNS
// labels of at most 63 characters.
const maxNameLen = 253

// maxQuantityLen bounds the values parsed as quantities: none that anybody
// means is longer, and parsing a long one costs quadratic time.
const maxQuantityLen = 64

// Why a quantity is not a whole int64.
const (
	reasonOutOfRange = "out of range (beyond int64)"
	reasonNotWhole   = "must be a whole number"
)

// FromPodSandboxConfig extracts the pod-level inputs of a sandbox from the
// CRI config containerd passes in CreateSandboxRequest.options.
func FromPodSandboxConfig(cfg *runtime.PodSandboxConfig) (Spec, error) {
	var (
		spec Spec
		err  error
	)
	if cfg == nil {
		return spec, nil
	}
	if spec.Annotations, err = FromAnnotations(cfg.GetAnnotations()); err != nil {
		return Spec{}, err
	}
	if spec.Linux, err = FromLinuxResources("linux.resources", cfg.GetLinux().GetResources()); err != nil {
		return Spec{}, err
	}
	if spec.Overhead, err = FromLinuxResources("linux.overhead", cfg.GetLinux().GetOverhead()); err != nil {
		return Spec{}, err
	}
	spec.QOSClass = QOSFromCgroupParent(cfg.GetLinux().GetCgroupParent())
	return spec, nil
}

// FromAnnotations reads the resources.* annotations. Unknown annotations are
// ignored; a known key with a bad value is an InvalidArgument error.
func FromAnnotations(a map[string]string) (Resources, error) {
	var r Resources
	fields := []struct {
		key   string
		parse func(key, value string) error
	}{
		{AnnotationCPULimit, cpuInto(&r.CPULimit)},
		{AnnotationCPURequest, cpuInto(&r.CPURequest)},
		{AnnotationMemoryLimit, bytesInto(&r.MemoryLimit)},
		{AnnotationMemoryRequest, bytesInto(&r.MemoryRequest)},
		{AnnotationPidLimit, countInto(&r.PidLimit)},
		{AnnotationStorageLimit, bytesInto(&r.StorageLimit)},
		{AnnotationNetworkBandwidth, bandwidthInto(&r.NetworkBandwidth)},
		{AnnotationK8sIngress, bandwidthInto(&r.NetworkIngressBps)},
		{AnnotationK8sEgress, bandwidthInto(&r.NetworkEgressBps)},
		// Ours come after Kubernetes' so they win when both are set.
		{AnnotationNetworkIngress, bandwidthInto(&r.NetworkIngressBps)},
		{AnnotationNetworkEgress, bandwidthInto(&r.NetworkEgressBps)},
		{AnnotationDiskReadBps, bytesInto(&r.DiskReadBps)},
		{AnnotationDiskWriteBps, bytesInto(&r.DiskWriteBps)},
		{AnnotationDiskReadIOPS, countInto(&r.DiskReadIOPS)},
		{AnnotationDiskWriteIOPS, countInto(&r.DiskWriteIOPS)},
	}
	for _, f := range fields {
		v, ok := a[f.key]
		if !ok {
			continue
		}
		if err := f.parse(f.key, v); err != nil {
			return Resources{}, err
		}
	}
	return r, nil
}

// FromLinuxResources converts CRI LinuxContainerResources (a pod's
// linux.resources or linux.overhead, or a container's resources) to
// Resources. where names the field in error messages.
func FromLinuxResources(where string, l *runtime.LinuxContainerResources) (Resources, error) {
	var r Resources
	if l == nil {
		return r, nil
	}
	if err := setCFS(&r, where, l.GetCpuQuota(), l.GetCpuPeriod()); err != nil {
		return Resources{}, err
	}
	if s := l.GetCpuShares(); s < 0 {
		return Resources{}, invalid(where+".cpu_shares", strconv.FormatInt(s, 10), "must not be negative")
	} else if s > 0 {
		setShares(&r, uint64(s))
	}
	if m := l.GetMemoryLimitInBytes(); m < 0 {
		return Resources{}, invalid(where+".memory_limit_in_bytes", strconv.FormatInt(m, 10), "must not be negative")
	} else if m > 0 {
		r.MemoryLimit = ptr(m)
	}
	if err := setSwap(&r, where+".memory_swap_limit_in_bytes", l.GetMemorySwapLimitInBytes()); err != nil {
		return Resources{}, err
	}
	if err := setCPUSet(&r, where, l.GetCpusetCpus(), l.GetCpusetMems()); err != nil {
		return Resources{}, err
	}
	for _, h := range l.GetHugepageLimits() {
		if h.GetPageSize() == "" {
			return Resources{}, invalid(where+".hugepage_limits.page_size", "", "must not be empty")
		}
		if r.HugepageLimits == nil {
			r.HugepageLimits = map[string]uint64{}
		}
		r.HugepageLimits[h.GetPageSize()] = h.GetLimit()
	}
	if err := setUnified(&r, where+".unified", l.GetUnified()); err != nil {
		return Resources{}, err
	}
	return r, nil
}

// FromOCISpec reads a container's resources, and its name, from its OCI
// runtime spec.
func FromOCISpec(s *specs.Spec) (Resources, error) {
	var r Resources
	if s == nil {
		return r, nil
	}
	if n := s.Annotations[AnnotationContainerName]; len(n) <= maxNameLen {
		r.Name = n
	}
	if s.Linux == nil || s.Linux.Resources == nil {
		return r, nil
	}
	lr := s.Linux.Resources
	const where = "linux.resources"
	if c := lr.CPU; c != nil {
		var quota, period int64
		if c.Quota != nil {
			quota = *c.Quota
		}
		if c.Period != nil {
			if *c.Period > math.MaxInt64 {
				return Resources{}, invalid(where+".cpu.period", strconv.FormatUint(*c.Period, 10), "out of range")
			}
			period = int64(*c.Period)
		}
		if err := setCFS(&r, where+".cpu", quota, period); err != nil {
			return Resources{}, err
		}
		if c.Shares != nil && *c.Shares > 0 {
			setShares(&r, *c.Shares)
		}
		if err := setCPUSet(&r, where+".cpu", c.Cpus, c.Mems); err != nil {
			return Resources{}, err
		}
	}
	if m := lr.Memory; m != nil {
		// runc treats 0 as unset and -1 as unlimited.
		if m.Limit != nil {
			if *m.Limit < -1 {
				return Resources{}, invalid(where+".memory.limit", strconv.FormatInt(*m.Limit, 10), "must not be negative")
			}
			if *m.Limit > 0 {
				r.MemoryLimit = ptr(*m.Limit)
			}
		}
		if m.Reservation != nil {
			if *m.Reservation < -1 {
				return Resources{}, invalid(where+".memory.reservation", strconv.FormatInt(*m.Reservation, 10), "must not be negative")
			}
			if *m.Reservation > 0 {
				r.MemoryRequest = ptr(*m.Reservation)
			}
		}
		if m.Swap != nil {
			if err := setSwap(&r, where+".memory.swap", *m.Swap); err != nil {
				return Resources{}, err
			}
		}
	}
	if p := lr.Pids; p != nil && p.Limit != nil {
		// runc: 0 and -1 mean no limit.
		if *p.Limit < -1 {
			return Resources{}, invalid(where+".pids.limit", strconv.FormatInt(*p.Limit, 10), "must not be negative")
		}
		if *p.Limit > 0 {
			r.PidLimit = ptr(*p.Limit)
		}
	}
	for _, h := range lr.HugepageLimits {
		if h.Pagesize == "" {
			return Resources{}, invalid(where+".hugepageLimits.pageSize", "", "must not be empty")
		}
		if r.HugepageLimits == nil {
			r.HugepageLimits = map[string]uint64{}
		}
		r.HugepageLimits[h.Pagesize] = h.Limit
	}
	if err := setUnified(&r, where+".unified", lr.Unified); err != nil {
		return Resources{}, err
	}
	return r, nil
}

// setCFS sets cpu_limit from a CFS quota and period. A quota of 0 or -1
// means no limit (CRI and OCI); any other quota needs a period.
func setCFS(r *Resources, where string, quota, period int64) error {
	if period < 0 {
		return invalid(where+".cpu_period", strconv.FormatInt(period, 10), "must not be negative")
	}
	if quota < -1 {
		return invalid(where+".cpu_quota", strconv.FormatInt(quota, 10), "must be -1 (unlimited) or positive")
	}
	if period > 0 {
		r.CPUPeriod = ptr(uint64(period))
	}
	if quota <= 0 {
		return nil
	}
	if period == 0 {
		return invalid(where+".cpu_quota", strconv.FormatInt(quota, 10), "requires cpu_period")
	}
	r.CPUQuota = ptr(quota)
	r.CPULimit = ptr(QuotaToCores(quota, uint64(period)))
	return nil
}

// setShares records cpu.shares and the request they stand for: none for
// MinShares and below (kubelet's MilliCPUToShares(0)).
func setShares(r *Resources, shares uint64) {
	r.CPUShares = ptr(shares)
	if shares > MinShares {
		r.CPURequest = ptr(SharesToCores(shares))
	}
}

// setSwap records a memory+swap limit: 0 is unset, -1 unlimited.
func setSwap(r *Resources, key string, v int64) error {
	switch {
	case v < -1:
		return invalid(key, strconv.FormatInt(v, 10), "must be -1 (unlimited) or positive")
	case v == -1 || v > 0:
		r.MemorySwapLimit = ptr(v)
	}
	return nil
}

func setCPUSet(r *Resources, where, cpus, mems string) error {
	if cpus != "" {
		if err := validateCPUSet(cpus); err != nil {
			return invalid(where+".cpuset_cpus", cpus, err.Error())
		}
		r.CPUSetCPUs = ptr(cpus)
	}
	if mems != "" {
		if err := validateCPUSet(mems); err != nil {
			return invalid(where+".cpuset_mems", mems, err.Error())
		}
		r.CPUSetMems = ptr(mems)
	}
	return nil
}

// setUnified keeps the cgroup v2 settings and reads from them what has no
// cgroup v1 field: memory.min (kubelet's MemoryQoS request), and pids.max.
// memory.max and cpu.max fill the limits only when the v1 fields did not.
func setUnified(r *Resources, where string, u map[string]string) error {
	if len(u) == 0 {
		return nil
	}
	r.Unified = make(map[string]string, len(u))
	for k, v := range u {
		r.Unified[k] = v
	}
	key := func(k string) string { return where + "." + k }
	if v, ok := u["memory.min"]; ok {
		n, err := parseCgroupInt(v)
		if err != nil {
			return invalid(key("memory.min"), v, err.Error())
		}
		if n > 0 {
			r.MemoryRequest = ptr(n)
		}
	}
	if v, ok := u["memory.max"]; ok && r.MemoryLimit == nil {
		n, err := parseCgroupInt(v)
		if err != nil {
			return invalid(key("memory.max"), v, err.Error())
		}
		if n > 0 {
			r.MemoryLimit = ptr(n)
		}
	}
	if v, ok := u["pids.max"]; ok {
		n, err := parseCgroupInt(v)
		if err != nil {
			return invalid(key("pids.max"), v, err.Error())
		}
		if n > 0 {
			r.PidLimit = ptr(n)
		}
	}
	if v, ok := u["cpu.max"]; ok && r.CPULimit == nil {
		// "max [period]" or "quota [period]".
		f := strings.Fields(v)
		if len(f) == 0 || len(f) > 2 {
			return invalid(key("cpu.max"), v, "want \"quota [period]\"")
		}
		period := int64(DefaultCPUPeriod)
		if len(f) == 2 {
			p, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil || p <= 0 {
				return invalid(key("cpu.max"), v, "period must be a positive integer")
			}
			period = p
		}
		if f[0] != "max" {
			q, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil || q <= 0 {
				return invalid(key("cpu.max"), v, "quota must be \"max\" or a positive integer")
			}
			if err := setCFS(r, where, q, period); err != nil {
				return err
			}
		}
	}
	return nil
}

// parseCgroupInt parses a cgroup v2 integer file value; "max" is 0 (no limit).
func parseCgroupInt(v string) (int64, error) {
	if v == "max" {
		return 0, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("want an integer or \"max\"")
	}
	if n < 0 {
		return 0, fmt.Errorf("must not be negative")
	}
	return n, nil
}

// validateCPUSet checks the cpuset list syntax ("0-3,5,7-8").
func validateCPUSet(s string) error {
	for _, part := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.ParseUint(lo, 10, 16)
		if err != nil {
			return fmt.Errorf("want a list such as 0-3,5")
		}
		if isRange {
			b, err := strconv.ParseUint(hi, 10, 16)
			if err != nil || b < a {
				return fmt.Errorf("want a list such as 0-3,5")
			}
		}
	}
	return nil
}

func cpuInto(dst **float64) func(key, value string) error {
	return func(key, value string) error {
		q, err := parseQuantity(key, value)
		if err != nil {
			return err
		}
		// MilliValue saturates; reject what cannot be represented exactly.
		if q.Cmp(resource.MustParse("9223372036854775")) > 0 {
			return invalid(key, value, "out of range")
		}
		*dst = ptr(float64(q.MilliValue()) / 1000)
		return nil
	}
}

func bytesInto(dst **int64) func(key, value string) error {
	return func(key, value string) error {
		n, err := parseInt64Quantity(key, value)
		if err != nil {
			return err
		}
		*dst = ptr(n)
		return nil
	}
}

// countInto parses a count (pids, IOPS): a quantity that must be whole.
func countInto(dst **int64) func(key, value string) error {
	return bytesInto(dst)
}

func bandwidthInto(dst **int64) func(key, value string) error {
	return func(key, value string) error {
		n, err := ParseBandwidth(value)
		if err != nil {
			return invalid(key, value, err.Error())
		}
		*dst = ptr(n)
		return nil
	}
}

func parseQuantity(key, value string) (resource.Quantity, error) {
	if len(value) > maxQuantityLen {
		return resource.Quantity{}, invalid(key, value, "too long")
	}
	if !hasNumber(value) {
		return resource.Quantity{}, invalid(key, value, "not a Kubernetes quantity (e.g. 2, 500m, 2Gi, 1G, 1e9)")
	}
	if hugeExponent(value) {
		return resource.Quantity{}, invalid(key, value, "exponent out of range")
	}
	q, err := resource.ParseQuantity(value)
	if err != nil {
		return q, invalid(key, value, "not a Kubernetes quantity (e.g. 2, 500m, 2Gi, 1G, 1e9)")
	}
	if q.Sign() < 0 {
		return q, invalid(key, value, "must not be negative")
	}
	return q, nil
}

// parseInt64Quantity parses a non-negative quantity that must be a whole
// number fitting int64.
func parseInt64Quantity(key, value string) (int64, error) {
	q, err := parseQuantity(key, value)
	if err != nil {
		return 0, err
	}
	n, reason := wholeInt64(q, math.MaxInt64)
	if reason != "" {
		return 0, invalid(key, value, reason)
	}
	return n, nil
}

// wholeInt64 returns q, not negative, as an int64 if it is a whole number no
// larger than limit, or the reason it is not. Quantity.AsInt64 does not do:
// it fails for every value kept as an inf.Dec (19 digits or more, or a
// fraction of a binary unit such as 0.5Ki), whole or not.
func wholeInt64(q resource.Quantity, limit int64) (int64, string) {
	if q.Cmp(*resource.NewQuantity(limit, resource.DecimalSI)) > 0 {
		return 0, reasonOutOfRange
	}
	// ParseQuantity caps a binary value beyond int64 ("8Ei", "16Ei") at
	// MaxInt64, which is odd and so no binary value.
	if q.Format == resource.BinarySI && q.Cmp(*resource.NewQuantity(math.MaxInt64, resource.DecimalSI)) == 0 {
		return 0, reasonOutOfRange
	}
	n := q.Value() // rounded up, so at most limit
	if q.Cmp(*resource.NewQuantity(n, resource.DecimalSI)) != 0 {
		return 0, reasonNotWhole
	}
	return n, ""
}

// hugeExponent reports whether s ends in a decimal exponent ("e9", "E-3")
// of three digits or more. resource.ParseQuantity truncates an exponent to
// int32 and computes with 10^exponent: "9E27000000000000000" takes minutes
// and gigabytes. Two digits are plenty: int64 ends before 1e19.
func hugeExponent(s string) bool {
	i := strings.LastIndexAny(s, "eE")
	if i < 0 {
		return false
	}
	exp := strings.TrimLeft(strings.TrimLeft(s[i+1:], "+-"), "0")
	return len(exp) > 2 && strings.Trim(exp, "0123456789") == ""
}

// hasNumber reports whether s starts, after a sign, with a digit or with a
// point and a digit: resource.ParseQuantity reads "Gi", "k", "e9", "+" or
// "." as 0.
func hasNumber(s string) bool {
	s = strings.TrimPrefix(strings.TrimLeft(s, "+-"), ".")
	return s != "" && s[0] >= '0' && s[0] <= '9'
}

// ParseBandwidth parses a bandwidth in bits per second: "100Mbps", "1Gbps",
// "1.5Gbps", "800kbps", "10MBps" (bytes per second, times 8), or a bare
// Kubernetes quantity of bits per second as in kubernetes.io/ingress-bandwidth
// ("10M"). SI prefixes are decimal; Ki/Mi/Gi are binary.
func ParseBandwidth(s string) (int64, error) {
	if len(s) > maxQuantityLen {
		return 0, fmt.Errorf("too long")
	}
	num, mult := s, int64(1)
	switch {
	case strings.HasSuffix(s, "bps"):
		num = strings.TrimSuffix(s, "bps")
	case strings.HasSuffix(s, "Bps"):
		num, mult = strings.TrimSuffix(s, "Bps"), 8
	}
	// Quantities spell kilo "k"; bandwidths are commonly written "Kbps".
	if strings.HasSuffix(num, "K") {
		num = strings.TrimSuffix(num, "K") + "k"
	}
	if !hasNumber(num) {
		return 0, fmt.Errorf("want a bandwidth such as 100Mbps or 1Gbps")
	}
	if hugeExponent(num) {
		return 0, fmt.Errorf("exponent out of range")
	}
	q, err := resource.ParseQuantity(num)
	if err != nil {
		return 0, fmt.Errorf("want a bandwidth such as 100Mbps or 1Gbps")
	}
	if q.Sign() < 0 {
		return 0, fmt.Errorf("must not be negative")
	}
	n, reason := wholeInt64(q, math.MaxInt64/mult)
	switch reason {
	case "":
		return n * mult, nil
	case reasonNotWhole:
		return 0, fmt.Errorf("%s of bits per second", reason)
	default:
		return 0, fmt.Errorf("%s", reason)
	}
}

// invalid is the InvalidArgument error for a bad input, naming it.
func invalid(key, value, reason string) error {
	return fmt.Errorf("%w: %s=%s: %s", errdefs.ErrInvalidArgument, key, quoteShort(value), reason)
}

// quoteShort quotes value, cut on a rune boundary so that the quoted text
// stays within maxShownValue bytes (plus the quotes) however much the value
// escapes: a NUL is 4 bytes quoted.
func quoteShort(value string) string {
	for end := 0; end < len(value); {
		_, size := utf8.DecodeRuneInString(value[end:])
		if len(strconv.Quote(value[:end+size])) > maxShownValue+2 {
			return strconv.Quote(value[:end]) + "…"
		}
		end += size
	}
	return strconv.Quote(value)
}
