package slot

import (
	"fmt"
	"strconv"
	"strings"
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

// Pod annotations that set what a simulated container does, one prefix
// per setting and the container's name after the slash, as Kubernetes'
// own per-container pod annotations are keyed
// (container.apparmor.security.beta.kubernetes.io/<container>): a pod
// spec cannot give a container annotations of its own that reach the
// runtime, and containerd copies no pod annotation into a container's
// OCI spec, but the sandbox has its pod's annotations. A container's own
// annotation (AnnotationExitAfter, ...) wins over its pod's.
const (
	PodAnnotationExitAfter   = "exit-after.resource-slot.kuasar.io/"
	PodAnnotationExitCode    = "exit-code.resource-slot.kuasar.io/"
	PodAnnotationCPUUsage    = "cpu-usage.resource-slot.kuasar.io/"
	PodAnnotationMemoryUsage = "memory-usage.resource-slot.kuasar.io/"
)

// Never, as an exit-after value, keeps a container running until it is
// stopped, also one that would complete by default.
const Never = "never"

// DefaultInitExitAfter is when a container named like an init container
// (IsInitName) completes, with status 0, when no annotation says
// otherwise.
const DefaultInitExitAfter = 500 * time.Millisecond

// IsInitName reports whether a container's name has the word "init"
// (init, init-myservice, istio-init, db-init-2): by default such a
// container completes, every other one runs until stopped.
//
// A name is all there is to go by. The CRI says nothing of a container
// being an init container: ContainerConfig has no such field, and neither
// kubelet's labels and annotations (kuberuntime/labels.go,
// generateContainerConfig) nor containerd's tell. Nor does the order of
// calls: until the first container exits, kubelet makes the very same
// calls for a pod with one app container as for a pod whose init
// container has that configuration, and its app containers follow only
// once that exited; yet an app container must not exit (kubelet restarts
// it), and an init container must (kubelet waits for it). A rule of
// timing or of the pod's resources would make some app containers exit
// (those whose pod's next container image pulls slowly) and still leave
// some init containers running for ever (every BestEffort one). The
// Kubernetes documentation names its init containers init-*, and many
// injected ones are *-init (istio-init, linkerd-init); other init
// containers need PodAnnotationExitAfter, an app container named so
// needs it set to Never.
func IsInitName(name string) bool {
	for _, word := range strings.FieldsFunc(name, func(r rune) bool { return r == '-' || r == '_' || r == '.' }) {
		if word == "init" {
			return true
		}
	}
	return false
}

// ParseSimulation reads the simulation annotations of a container.
func ParseSimulation(a map[string]string) (Simulation, error) {
	return SimulationOf("", nil, a)
}

// SimulationOf reads what the container named name does: its own
// annotations, else its pod's keyed by its name, else the default
// (IsInitName).
func SimulationOf(name string, pod, container map[string]string) (Simulation, error) {
	podKey := map[string]string{
		AnnotationExitAfter: PodAnnotationExitAfter, AnnotationExitCode: PodAnnotationExitCode,
		AnnotationCPUUsage: PodAnnotationCPUUsage, AnnotationMemoryUsage: PodAnnotationMemoryUsage,
	}
	lookup := func(key string) (string, string, bool) {
		if v, ok := container[key]; ok {
			return key, v, true
		}
		if name != "" {
			if v, ok := pod[podKey[key]+name]; ok {
				return podKey[key] + name, v, true
			}
		}
		return key, "", false
	}
	_, exitAfter, set := lookup(AnnotationExitAfter)
	if set && exitAfter == Never {
		return parseSimulation(func(key string) (string, string, bool) {
			if key == AnnotationExitAfter {
				return key, "", false
			}
			return lookup(key)
		})
	}
	sim, err := parseSimulation(lookup)
	if err == nil && !set && IsInitName(name) {
		sim.ExitAfter = DefaultInitExitAfter
	}
	return sim, err
}

// parseSimulation reads the simulation settings that lookup finds (by
// their container annotation key), naming the key they were found under
// in errors. Every value goes through the guarded parsers of package
// resourceinfo.
func parseSimulation(lookup func(key string) (found, value string, ok bool)) (Simulation, error) {
	var s Simulation
	bad := func(key, value, reason string) error {
		if len(value) > 64 {
			value = value[:64] + "…"
		}
		return fmt.Errorf("%w: %s=%q: %s", errdefs.ErrInvalidArgument, key, value, reason)
	}
	if k, v, ok := lookup(AnnotationExitAfter); ok {
		if len(v) > maxDurationLen {
			return s, bad(k, v, "too long")
		}
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 || d > maxExitAfter {
			return s, bad(k, v, "want a positive duration such as 30s, at most a year, or never")
		}
		s.ExitAfter = d
	}
	if k, v, ok := lookup(AnnotationExitCode); ok {
		n, err := strconv.ParseUint(v, 10, 8)
		if err != nil {
			return s, bad(k, v, "want an exit status 0-255")
		}
		s.ExitCode = uint32(n)
	}
	if k, v, ok := lookup(AnnotationCPUUsage); ok {
		q, err := resourceinfo.ParseQuantity(k, v)
		if err != nil {
			return s, err
		}
		if q.CmpInt64(maxCPUUsage) > 0 {
			return s, bad(k, v, "want a quantity of cores such as 500m, at most a million")
		}
		s.CPUUsage = float64(q.MilliValue()) / 1000
	}
	if k, v, ok := lookup(AnnotationMemoryUsage); ok {
		n, err := resourceinfo.ParseWholeQuantity(k, v)
		if err != nil {
			return s, err
		}
		s.MemoryUsage = n
	}
	return s, nil
}
