package config

import (
	"fmt"
	"math"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"unicode"

	"k8s.io/apimachinery/pkg/api/resource"
)

// Admission policies of the [capacity] table.
const (
	PolicyOff     = "off"
	PolicyWarn    = "warn"
	PolicyEnforce = "enforce"
)

// DefaultCurrency labels cost estimates when [cost] names none.
const DefaultCurrency = "USD"

// Capacity is the [capacity] table: the node's capacity that admission
// compares the sandboxes' allocations with.
type Capacity struct {
	// CPU is the node's capacity in cores; 0 is the host's
	// (runtime.NumCPU).
	CPU Cores `toml:"cpu"`
	// Memory in bytes, an integer or a Kubernetes quantity ("64Gi"); 0 is
	// the host's (MemTotal of /proc/meminfo).
	Memory Quantity `toml:"memory"`
	// Pids is the number of processes; 0 is the host's
	// (/proc/sys/kernel/pid_max).
	Pids Quantity `toml:"pids"`
	// Overcommit multiplies the capacity per resource.
	Overcommit Overcommit `toml:"overcommit"`
	// Policy is "off" (account only), "warn" (log and count what does not
	// fit, admit it) or "enforce" (refuse it with ResourceExhausted).
	Policy string `toml:"policy"`
}

// Overcommit is the [capacity.overcommit] table: ratios > 0. Above 1
// admits more than the node has; below 1 keeps part of it for the host.
type Overcommit struct {
	CPU    float64 `toml:"cpu"`
	Memory float64 `toml:"memory"`
	Pids   float64 `toml:"pids"`
}

// Cost is the [cost] table: prices of what the sandboxes hold while they
// run (their allocation: the limit, else the request), per hour.
type Cost struct {
	CPUCoreHour    float64 `toml:"cpu_core_hour"`
	MemoryGiBHour  float64 `toml:"memory_gib_hour"`
	PidHour        float64 `toml:"pid_hour"`
	StorageGiBHour float64 `toml:"storage_gib_hour"`
	Currency       string  `toml:"currency"`
}

// defaultCapacity and defaultCost are the defaults of the tables.
func defaultCapacity() Capacity {
	return Capacity{Overcommit: Overcommit{CPU: 1, Memory: 1, Pids: 1}, Policy: PolicyOff}
}

func defaultCost() Cost { return Cost{Currency: DefaultCurrency} }

// Cores is a number of CPU cores: a TOML number, or a Kubernetes quantity
// string ("3500m", "4").
type Cores float64

// UnmarshalText parses a quantity of cores.
func (c *Cores) UnmarshalText(b []byte) error {
	s := strings.TrimSpace(string(b))
	if f, err := strconv.ParseFloat(s, 64); err == nil {
		*c = Cores(f)
		return nil
	}
	q, err := resource.ParseQuantity(s)
	if err != nil {
		return fmt.Errorf("invalid number of cores %q (want e.g. 4, 2.5 or \"3500m\")", b)
	}
	*c = Cores(float64(q.MilliValue()) / 1000)
	return nil
}

// Quantity is a whole number: a TOML integer, or a Kubernetes quantity
// string ("64Gi", "1e6").
type Quantity int64

// UnmarshalText parses a whole quantity.
func (q *Quantity) UnmarshalText(b []byte) error {
	v, err := resource.ParseQuantity(strings.TrimSpace(string(b)))
	if err != nil {
		return fmt.Errorf("invalid quantity %q (want an integer or e.g. \"64Gi\")", b)
	}
	n, ok := v.AsInt64()
	if !ok {
		return fmt.Errorf("invalid quantity %q: not a whole number within int64", b)
	}
	*q = Quantity(n)
	return nil
}

// AdminSocketPath is the admin API socket, derived from Listen if unset.
func (c Config) AdminSocketPath() string {
	if c.AdminSocket != "" {
		return c.AdminSocket
	}
	return strings.TrimSuffix(c.Listen, ".sock") + "-admin.sock"
}

// validateOps checks the options of the metrics, the admin API, the
// capacity and the cost, and reports every bad value.
func (c Config) validateOps() []error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{key}, args...)...))
	}
	if a := c.MetricsAddress; a != "" {
		host, port, err := net.SplitHostPort(a)
		if err != nil {
			bad("metrics_address", "%q is not host:port (e.g. \"127.0.0.1:9464\")", a)
		} else if n, err := strconv.ParseUint(port, 10, 16); err != nil || (n == 0 && port != "0") {
			bad("metrics_address", "%q: port %q is not a number 0-65535", a, port)
		} else if host != "" && net.ParseIP(host) == nil && !validHostname(host) {
			bad("metrics_address", "%q: %q is neither an IP address nor a host name", a, host)
		}
	}
	admin := c.AdminSocketPath()
	switch {
	case c.AdminSocket == "" && !filepath.IsAbs(c.Listen):
		// Derived from a bad listen, which is reported already.
	case !filepath.IsAbs(admin):
		bad("admin_socket", "%q must be an absolute path", admin)
	case filepath.Clean(admin) == filepath.Clean(c.Listen):
		bad("admin_socket", "must differ from listen")
	case filepath.Clean(admin) == filepath.Clean(c.TaskSocketPath()):
		bad("admin_socket", "must differ from task_socket")
	}

	cp := c.Capacity
	if f := float64(cp.CPU); math.IsNaN(f) || math.IsInf(f, 0) || f < 0 {
		bad("capacity.cpu", "%v must be a number of cores ≥ 0 (0: the host's)", f)
	}
	if cp.Memory < 0 {
		bad("capacity.memory", "%d must be ≥ 0 bytes (0: the host's)", cp.Memory)
	}
	if cp.Pids < 0 {
		bad("capacity.pids", "%d must be ≥ 0 (0: the host's pid_max)", cp.Pids)
	}
	for _, o := range []struct {
		key string
		v   float64
	}{{"cpu", cp.Overcommit.CPU}, {"memory", cp.Overcommit.Memory}, {"pids", cp.Overcommit.Pids}} {
		if math.IsNaN(o.v) || math.IsInf(o.v, 0) || o.v <= 0 {
			bad("capacity.overcommit."+o.key, "%v must be a ratio > 0 (1: no overcommit)", o.v)
		}
	}
	switch cp.Policy {
	case PolicyOff, PolicyWarn, PolicyEnforce:
	default:
		bad("capacity.policy", "%q must be \"off\", \"warn\" or \"enforce\"", cp.Policy)
	}

	for _, p := range []struct {
		key string
		v   float64
	}{
		{"cpu_core_hour", c.Cost.CPUCoreHour}, {"memory_gib_hour", c.Cost.MemoryGiBHour},
		{"pid_hour", c.Cost.PidHour}, {"storage_gib_hour", c.Cost.StorageGiBHour},
	} {
		if math.IsNaN(p.v) || math.IsInf(p.v, 0) || p.v < 0 {
			bad("cost."+p.key, "%v must be a price ≥ 0", p.v)
		}
	}
	if cur := c.Cost.Currency; cur == "" || len(cur) > 16 || strings.IndexFunc(cur, func(r rune) bool {
		return unicode.IsSpace(r) || unicode.IsControl(r)
	}) >= 0 {
		bad("cost.currency", "%q must be a short label without spaces, such as \"USD\"", cur)
	}
	return errs
}

// validHostname accepts letters, digits, '-' and '.'.
func validHostname(h string) bool {
	if len(h) > 253 {
		return false
	}
	for _, r := range h {
		if !(r == '-' || r == '.' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') {
			return false
		}
	}
	return true
}
