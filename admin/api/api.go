// Package api is the wire format of the sandboxer's admin API: HTTP+JSON
// on a unix socket (admin_socket, mode 0600), which slotctl uses. It
// depends on the standard library only, so that clients stay small.
//
//	GET  /v1/sandboxes                  []Sandbox, sorted by ID
//	GET  /v1/sandboxes/{id}             Sandbox
//	GET  /v1/sandboxes/{id}/limits      Limits
//	GET  /v1/sandboxes/{id}/usage       Usage
//	PUT  /v1/sandboxes/{id}/resources   SetResources → Limits
//	GET  /v1/capacity                   Capacity
//	GET  /v1/cost                       Cost
//
// Errors are an Error with the HTTP status of its code: 400
// InvalidArgument, 404 NotFound, 409 FailedPrecondition and
// AlreadyExists, 429 ResourceExhausted (as gRPC's RESOURCE_EXHAUSTED maps
// to HTTP), 503 Unavailable, 500 otherwise; a method a path does not take
// is 405 with code InvalidArgument, an unknown path 404.
package api

import "time"

// Paths.
const (
	PathSandboxes = "/v1/sandboxes"
	PathCapacity  = "/v1/capacity"
	PathCost      = "/v1/cost"
)

// SandboxPath is the path of a sandbox, or of one of its parts ("limits",
// "usage", "resources").
func SandboxPath(id, part string) string {
	p := PathSandboxes + "/" + id
	if part != "" {
		p += "/" + part
	}
	return p
}

// Error codes, as containerd's errdefs classes.
const (
	CodeInvalidArgument    = "InvalidArgument"
	CodeNotFound           = "NotFound"
	CodeAlreadyExists      = "AlreadyExists"
	CodeFailedPrecondition = "FailedPrecondition"
	CodeResourceExhausted  = "ResourceExhausted"
	CodeUnavailable        = "Unavailable"
	CodeInternal           = "Internal"
)

// Error is the body of every failed call.
type Error struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

// Resources are the main values of a sandbox; null when not set (no
// limit, no request).
type Resources struct {
	CPU     *float64 `json:"cpu"`    // cores
	Memory  *int64   `json:"memory"` // bytes
	Pids    *int64   `json:"pids"`
	Storage *int64   `json:"storage"` // bytes
}

// Sandbox is one sandbox in a list.
type Sandbox struct {
	ID         string     `json:"id"`
	Mode       string     `json:"mode"`
	Phase      string     `json:"phase"`
	CreatedAt  time.Time  `json:"created_at"`
	StartedAt  *time.Time `json:"started_at"`
	ExitedAt   *time.Time `json:"exited_at"`
	Containers int        `json:"containers"`
	Limits     Resources  `json:"limits"`
	Requests   Resources  `json:"requests"`
}

// Limits are a sandbox's effective resources (resource_info.json's top
// level) and where each came from.
type Limits struct {
	ID       string    `json:"id"`
	Phase    string    `json:"phase"`
	Limits   Resources `json:"limits"`
	Requests Resources `json:"requests"`
	// Network in bits/s, disk in bytes/s and operations/s.
	NetworkIngressBps *int64 `json:"network_ingress_bps"`
	NetworkEgressBps  *int64 `json:"network_egress_bps"`
	DiskReadBps       *int64 `json:"disk_read_bps"`
	DiskWriteBps      *int64 `json:"disk_write_bps"`
	DiskReadIOPS      *int64 `json:"disk_read_iops"`
	DiskWriteIOPS     *int64 `json:"disk_write_iops"`
	// Sources maps resource_info.json's field names (cpu_limit, ...) to
	// annotation, linux_resources or containers.
	Sources   map[string]string `json:"sources"`
	UpdatedAt time.Time         `json:"updated_at"`
}

// Usage is what a ready sandbox uses now. Absent measurements are null.
type Usage struct {
	ID    string `json:"id"`
	Mode  string `json:"mode"`
	Phase string `json:"phase"`
	// Source is "simulated" (slot mode: the sum of the simulated
	// containers) or "backend" (the backend's measurement).
	Source    string    `json:"source"`
	Timestamp time.Time `json:"timestamp"`
	// CPUCores is the current CPU use in cores, CPUSeconds the
	// cumulative CPU time.
	CPUCores       *float64  `json:"cpu_cores"`
	CPUSeconds     *float64  `json:"cpu_seconds"`
	MemoryBytes    *uint64   `json:"memory_bytes"`
	MemoryRSSBytes *uint64   `json:"memory_rss_bytes"`
	Pids           *uint64   `json:"pids"`
	DiskReadBytes  *uint64   `json:"disk_read_bytes"`
	DiskWriteBytes *uint64   `json:"disk_write_bytes"`
	NetRxBytes     *uint64   `json:"net_rx_bytes"`
	NetTxBytes     *uint64   `json:"net_tx_bytes"`
	Limits         Resources `json:"limits"`
	Violations     []string  `json:"violations,omitempty"`
	Unenforced     []string  `json:"unenforced,omitempty"`
}

// SetResources changes a sandbox's pod-level resources, as the
// resources.* pod annotations set them and with their syntax (Kubernetes
// quantities: "2", "500m", "2Gi"). Absent fields are unchanged; "none"
// removes the value, which then comes from linux.resources or the
// containers again.
type SetResources struct {
	CPU           *string `json:"cpu,omitempty"`
	Memory        *string `json:"memory,omitempty"`
	Pids          *string `json:"pids,omitempty"`
	CPURequest    *string `json:"cpu_request,omitempty"`
	MemoryRequest *string `json:"memory_request,omitempty"`
	Storage       *string `json:"storage,omitempty"`
}

// None removes a value in SetResources.
const None = "none"

// Capacity is the node's capacity and what the sandboxes that hold
// resources (created or ready) take of it.
type Capacity struct {
	// Policy is off, warn or enforce.
	Policy    string             `json:"policy"`
	Sandboxes int                `json:"sandboxes"`
	Resources []ResourceCapacity `json:"resources"`
	// Rejections counts the admissions that did not fit (warn admitted
	// them).
	Rejections []Rejection `json:"rejections"`
}

// ResourceCapacity is one resource, in its unit (cores, bytes, count).
type ResourceCapacity struct {
	Resource   string  `json:"resource"`
	Unit       string  `json:"unit"`
	Capacity   float64 `json:"capacity"`
	Overcommit float64 `json:"overcommit"`
	// Allocatable is capacity × overcommit.
	Allocatable float64 `json:"allocatable"`
	// Allocated sums the allocations (limit, else request).
	Allocated float64 `json:"allocated"`
	// Requested sums the requests; null for pids, which have none.
	Requested *float64 `json:"requested"`
	// Limited sums the limits; Unlimited counts sandboxes without one.
	Limited   float64 `json:"limited"`
	Unlimited int     `json:"unlimited"`
	// Free is allocatable − allocated, at least 0.
	Free float64 `json:"free"`
}

// Rejection counts admissions that did not fit a resource under a policy.
type Rejection struct {
	Resource string `json:"resource"`
	Policy   string `json:"policy"`
	Count    uint64 `json:"count"`
}

// Cost is the estimated cost of every sandbox the daemon knows.
type Cost struct {
	Currency  string        `json:"currency"`
	Prices    Prices        `json:"prices"`
	At        time.Time     `json:"at"`
	Sandboxes []SandboxCost `json:"sandboxes"`
	Total     Estimate      `json:"total"`
}

// Prices are per hour.
type Prices struct {
	CPUCoreHour    float64 `json:"cpu_core_hour"`
	MemoryGiBHour  float64 `json:"memory_gib_hour"`
	PidHour        float64 `json:"pid_hour"`
	StorageGiBHour float64 `json:"storage_gib_hour"`
}

// SandboxCost is one sandbox's cost.
type SandboxCost struct {
	ID    string `json:"id"`
	Phase string `json:"phase"`
	Estimate
}

// Estimate is what was held, in unit-hours, and its cost.
type Estimate struct {
	CPUCoreHours    float64 `json:"cpu_core_hours"`
	MemoryGiBHours  float64 `json:"memory_gib_hours"`
	PidHours        float64 `json:"pid_hours"`
	StorageGiBHours float64 `json:"storage_gib_hours"`
	Cost            float64 `json:"cost"`
}
