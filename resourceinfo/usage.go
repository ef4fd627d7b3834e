package resourceinfo

import "time"

// Usage sources.
const (
	UsageSimulated = "simulated"
	UsageMeasured  = "measured"
)

// Usage is what a sandbox consumes at one instant, as a backend measures it.
// Absent measurements are null.
type Usage struct {
	Timestamp time.Time `json:"timestamp"`
	// Source says where the figures come from: UsageSimulated (slot
	// mode: the simulated containers' annotations) or UsageMeasured (vm
	// mode: the guest's cgroups and the host's view of the VM).
	Source string `json:"source,omitempty"`
	// CPUTimeNanos is the cumulative CPU time used.
	CPUTimeNanos *uint64 `json:"cpu_time_ns"`
	// CPUPercent is the CPU use since the previous sample, in percent of one core.
	CPUPercent *float64 `json:"cpu_percent"`
	// Memory, in bytes.
	MemoryUsage     *uint64 `json:"memory_usage"`
	MemoryRSS       *uint64 `json:"memory_rss"`
	MemoryActual    *uint64 `json:"memory_actual"`
	MemoryAvailable *uint64 `json:"memory_available"`
	Pids            *uint64 `json:"pids"`
	DiskReadBytes   *uint64 `json:"disk_read_bytes"`
	DiskWriteBytes  *uint64 `json:"disk_write_bytes"`
	DiskReadOps     *uint64 `json:"disk_read_ops"`
	DiskWriteOps    *uint64 `json:"disk_write_ops"`
	NetRxBytes      *uint64 `json:"net_rx_bytes"`
	NetTxBytes      *uint64 `json:"net_tx_bytes"`
	// Violations lists limits the usage exceeds, e.g. "memory_usage 300Mi > memory_limit 256Mi".
	Violations []string `json:"violations,omitempty"`
	// Unenforced lists limits the backend could not enforce, with the reason.
	Unenforced []string `json:"unenforced,omitempty"`
	// Containers is each container's own usage, by container ID, where
	// the backend measures (or simulates) it per container.
	Containers map[string]Usage `json:"containers,omitempty"`
}
