package sandboxer

import (
	"fmt"
	"strconv"
	"time"

	"github.com/containerd/errdefs"
	"k8s.io/apimachinery/pkg/api/resource"
)

// Container annotations that set what a simulated container does. In
// Kubernetes they are the container's (not the pod's) annotations, which
// containerd copies into the OCI spec.
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

// maxExitAfter keeps timers sane; a year is "never" for a test.
const maxExitAfter = 365 * 24 * time.Hour

// ParseSimulation reads the simulation annotations of a container.
func ParseSimulation(a map[string]string) (Simulation, error) {
	var s Simulation
	bad := func(key, value, reason string) error {
		if len(value) > 64 {
			value = value[:64] + "…"
		}
		return fmt.Errorf("%w: %s=%q: %s", errdefs.ErrInvalidArgument, key, value, reason)
	}
	if v, ok := a[AnnotationExitAfter]; ok {
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
		q, err := resource.ParseQuantity(v)
		if err != nil || q.Sign() < 0 || q.Cmp(resource.MustParse("1M")) > 0 {
			return s, bad(AnnotationCPUUsage, v, "want a non-negative quantity of cores such as 500m")
		}
		s.CPUUsage = float64(q.MilliValue()) / 1000
	}
	if v, ok := a[AnnotationMemoryUsage]; ok {
		q, err := resource.ParseQuantity(v)
		n, isInt := q.AsInt64()
		if err != nil || q.Sign() < 0 || !isInt {
			return s, bad(AnnotationMemoryUsage, v, "want a non-negative quantity of bytes such as 128Mi")
		}
		s.MemoryUsage = n
	}
	return s, nil
}
