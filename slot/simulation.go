package slot

import (
	"fmt"
	"strconv"
	"time"

	"github.com/containerd/errdefs"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// Container annotations that set what a simulated container does. In
// Kubernetes they are the container's (not the pod's) annotations, which
// containerd copies into the OCI spec when its container_annotations
// allow them.
const (
	// AnnotationExitAfter makes the container exit by itself this long
	// after it starts (a Go duration: "30s", "5m").
	AnnotationExitAfter = "resource-slot.kuasar.io/exit-after"
	// AnnotationExitCode is its exit status then (0-255, default 0).
	AnnotationExitCode = "resource-slot.kuasar.io/exit-code"
	// AnnotationCPUUsage is the CPU it reports using, as a quantity of
	// cores ("500m").
	AnnotationCPUUsage = "resource-slot.kuasar.io/cpu-usage"
	// AnnotationMemoryUsage is the memory it reports using ("128Mi").
	AnnotationMemoryUsage = "resource-slot.kuasar.io/memory-usage"
)

// Simulation is what a simulated container does, set by annotations.
type Simulation struct {
	// ExitAfter makes the container exit by itself this long after start.
	ExitAfter time.Duration `json:"exit_after,omitempty"`
	// ExitCode is the exit status when it does.
	ExitCode uint32 `json:"exit_code,omitempty"`
	// CPUUsage is the CPU the container reports using, in cores.
	CPUUsage float64 `json:"cpu_usage,omitempty"`
	// MemoryUsage is the memory it reports using, in bytes.
	MemoryUsage int64 `json:"memory_usage,omitempty"`
}

// Bounds of the simulation: a year is "never" for a test; a million cores
// and 8 EiB are beyond any node.
const (
	maxExitAfter = 365 * 24 * time.Hour
	maxCPUUsage  = 1e6
	// maxDurationLen bounds a duration's text before it is parsed.
	maxDurationLen = 32
)

// ParseSimulation reads the simulation annotations of a container. Every
// value goes through the guarded parsers of package resourceinfo.
func ParseSimulation(a map[string]string) (Simulation, error) {
	var s Simulation
	bad := func(key, value, reason string) error {
		if len(value) > 64 {
			value = value[:64] + "…"
		}
		return fmt.Errorf("%w: %s=%q: %s", errdefs.ErrInvalidArgument, key, value, reason)
	}
	if v, ok := a[AnnotationExitAfter]; ok {
		if len(v) > maxDurationLen {
			return s, bad(AnnotationExitAfter, v, "too long")
		}
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 || d > maxExitAfter {
			return s, bad(AnnotationExitAfter, v, "want a positive duration such as 30s, at most a year")
		}
		s.ExitAfter = d
	}
	if v, ok := a[AnnotationExitCode]; ok {
		n, err := strconv.ParseUint(v, 10, 8)
		if err != nil {
			return s, bad(AnnotationExitCode, v, "want an exit status 0-255")
		}
		s.ExitCode = uint32(n)
	}
	if v, ok := a[AnnotationCPUUsage]; ok {
		q, err := resourceinfo.ParseQuantity(AnnotationCPUUsage, v)
		if err != nil {
			return s, err
		}
		if q.CmpInt64(maxCPUUsage) > 0 {
			return s, bad(AnnotationCPUUsage, v, "want a quantity of cores such as 500m, at most a million")
		}
		s.CPUUsage = float64(q.MilliValue()) / 1000
	}
	if v, ok := a[AnnotationMemoryUsage]; ok {
		n, err := resourceinfo.ParseWholeQuantity(AnnotationMemoryUsage, v)
		if err != nil {
			return s, err
		}
		s.MemoryUsage = n
	}
	return s, nil
}
