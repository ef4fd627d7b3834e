// Package backend is the seam between the sandbox controller (package
// sandboxer) and what makes its sandboxes real: the slot simulation
// (package slot) and one virtual machine per sandbox (package vmm). It
// holds interfaces and plain types only, so that neither side imports the
// other.
//
// The controller owns the API (containerd's sandbox controller and task
// service, the direct CRI), every sandbox's and container's record, their
// persistence, admission and events. A Backend owns what runs: it starts
// and stops sandboxes, and runs the processes of their containers. The
// same controller code serves both modes: nothing above this seam asks
// which mode it is in, except to name it (Mode) in status and metrics.
//
// Lifecycle rules:
//   - Calls for one sandbox (Sandbox methods) are serialized by the
//     caller; calls for different sandboxes run concurrently.
//   - Calls for one container are serialized by the caller, except Wait-
//     like reads (Stats, Pids), which may run alongside anything.
//   - The caller holds no lock of its own while it calls Containers, so a
//     backend may report to the Events sink from within those calls. It
//     holds the sandbox while it calls Sandboxes methods: a backend must
//     not report to Events from within them (the controller records
//     itself that a stopped sandbox's processes ended), nor make one wait
//     for a goroutine that is reporting.
//   - Delete (of a sandbox) and Delete (of a process) are safe on what
//     never started or is already gone.
//   - Close stops the backend's background work and returns once it has
//     ended; sandboxes and containers keep running.
package backend

import (
	"context"
	"encoding/json"
	"syscall"
	"time"

	"github.com/containerd/containerd/api/types"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// Backend is one mode of the daemon: its sandboxes and their containers.
type Backend interface {
	Sandboxes
	// Mode names the backend ("slot", "vm") in status and metrics.
	Mode() string
	// Containers returns the runtime of the containers of this backend's
	// sandboxes, which reports exits and OOM kills to ev. It is called
	// once, before any container call.
	Containers(ev Events) Containers
	// Cleanup removes what the backend holds for sandboxes whose IDs are
	// not in known (a crash between the backend's Create and the record's
	// commit, a state directory removed by hand), and returns their IDs.
	Cleanup(ctx context.Context, known map[string]bool) ([]string, error)
	// Close stops the backend's background work and waits for it to end.
	Close() error
}

// Sandboxes realizes sandboxes.
type Sandboxes interface {
	// Create prepares a sandbox. dir is its own state directory, already
	// created; the backend may keep files there. pod is what the backend
	// needs of the pod's configuration (validated); a backend that needs
	// it after a restart keeps it itself. Create must leave nothing
	// behind when it fails.
	Create(ctx context.Context, id, dir string, info resourceinfo.ResourceInfo, pod Pod) error
	// Start runs a created sandbox and returns when it is ready to run
	// containers. exited is called at most once, from any goroutine, if
	// the sandbox stops without Stop having been called (a VM crash, a
	// virsh destroy).
	Start(ctx context.Context, id string, exited ExitFunc) (pid uint32, err error)
	// Stop stops a started sandbox, forcefully after timeout, with every
	// container in it. Stopping a stopped sandbox is not an error.
	Stop(ctx context.Context, id string, timeout time.Duration) error
	// Update applies changed resources to a sandbox, live when it runs. A
	// change the backend refuses changes nothing.
	Update(ctx context.Context, id string, info resourceinfo.ResourceInfo) error
	// Usage reports what a ready sandbox and each of its containers use
	// now: measured where something runs, simulated otherwise.
	Usage(ctx context.Context, id string) (resourceinfo.Usage, error)
	// Recover re-attaches to a sandbox after a daemon restart. running is
	// what the record says. Recover reports whether the sandbox still
	// runs and, when it does, arranges for exited to be called as Start
	// does. It returns an error wrapping errdefs.ErrNotFound only when the
	// sandbox is known to be gone; any other error is transient, and the
	// caller retries later rather than declare the sandbox dead.
	Recover(ctx context.Context, id, dir string, info resourceinfo.ResourceInfo, running bool, exited ExitFunc) (alive bool, err error)
	// Delete releases everything the backend holds for the sandbox.
	Delete(ctx context.Context, id string) error
}

// ExitFunc reports that a sandbox stopped by itself.
type ExitFunc = func(code uint32, at time.Time)

// Process names a process: a container's init process (ExecID "") or one
// of its exec processes.
type Process struct {
	// Namespace is containerd's namespace of the task ("k8s.io").
	Namespace   string
	SandboxID   string
	ContainerID string
	ExecID      string
}

// Init is the container's init process.
func (p Process) Init() Process { p.ExecID = ""; return p }

// IO is where a process's stdio goes: the FIFOs containerd created on the
// host, or (direct CRI) a CRI log file.
type IO struct {
	Stdin, Stdout, Stderr string
	Terminal              bool
	// LogPath is a CRI container log file to write instead of the FIFOs
	// (direct CRI, slot mode only).
	LogPath string
}

// Container is what a container is created from, and what the controller
// hands back to Recover after a restart.
type Container struct {
	Process
	// Bundle is the host directory of the OCI bundle containerd prepared.
	Bundle string
	// Spec is the bundle's config.json as containerd wrote it.
	Spec *specs.Spec
	// Rootfs are the snapshot mounts of the root filesystem; empty when
	// containerd mounted it at Bundle/rootfs itself.
	Rootfs []*types.Mount
	IO     IO
	// Options are the runtime options of the task (containerd's runc
	// options type for the runc shim), nil when none.
	Options *anypb.Any
	// Resources are the container's own limits as extracted from Spec
	// (or the last update).
	Resources resourceinfo.Resources
	// PodAnnotations are the annotations of the container's pod.
	PodAnnotations map[string]string
	// Private is the backend's own record of the container, as Create
	// returned it; set only on Recover, as are the fields below. Spec
	// and Rootfs are not set on Recover: what the backend needs of them
	// after a restart belongs in Private.
	Private json.RawMessage
	// Pid and StartedAt are the init process's, as recorded.
	Pid       uint32
	StartedAt *time.Time
	// Execs are the exec processes recorded for the container; set only
	// on Recover.
	Execs map[string]Exec
	// Status is the recorded status of the init process; set only on
	// Recover.
	Status Status
}

// Exec is a recorded exec process: its process spec, stdio, status and
// pid.
type Exec struct {
	Spec   *specs.Process
	IO     IO
	Status Status
	Pid    uint32
}

// Status is a process's status as the task API names it.
type Status string

const (
	StatusCreated Status = "created"
	StatusRunning Status = "running"
	StatusPaused  Status = "paused"
	StatusStopped Status = "stopped"
)

// Created is what Create returns.
type Created struct {
	Pid uint32
	// Private is the backend's own record of the container (JSON), kept
	// by the controller with the container's record and passed back to
	// Recover. Keep it small: it is written with every change of the
	// container.
	Private json.RawMessage
}

// Containers runs the processes of containers: each container's init
// process and its exec processes. The controller keeps every container's
// record (resources, stdio, status, exit) and persists it; a Containers
// runs, or simulates, what the record describes.
type Containers interface {
	// Create creates a container's init process, not started yet.
	Create(ctx context.Context, c *Container) (Created, error)
	// Start starts a created init process or an added exec process, and
	// returns its pid.
	Start(ctx context.Context, p Process) (pid uint32, err error)
	// Exec adds an exec process to a running container, not started yet.
	Exec(ctx context.Context, p Process, spec *specs.Process, io IO) error
	// Signal sends sig to the process, or with all to every process of
	// the container. A signal to a process that has exited is
	// errdefs.ErrNotFound.
	Signal(ctx context.Context, p Process, sig syscall.Signal, all bool) error
	// Delete releases a process that has exited or never started; for an
	// init process, everything the container holds (its mounts, files and
	// exec processes).
	Delete(ctx context.Context, p Process) error
	// Pids lists the processes of a container.
	Pids(ctx context.Context, p Process) ([]uint32, error)
	// Stats returns the container's cgroup metrics as containerd's CRI
	// decodes them (a cgroup v1 or v2 metrics type, typeurl-encoded).
	// limits are the container's resources as recorded.
	Stats(ctx context.Context, p Process, limits resourceinfo.Resources) (*anypb.Any, error)
	// Update applies new resources to a running container.
	Update(ctx context.Context, p Process, res *specs.LinuxResources) error
	// Pause and Resume freeze and thaw every process of the container.
	Pause(ctx context.Context, p Process) error
	Resume(ctx context.Context, p Process) error
	// CloseStdin closes a process's stdin.
	CloseStdin(ctx context.Context, p Process) error
	// ResizePty resizes a process's terminal.
	ResizePty(ctx context.Context, p Process, width, height uint32) error
	// Recover re-attaches to a recorded container (and its exec
	// processes) after a daemon restart, whatever its status: a stopped
	// one is still deleted later. An exit that happened while the daemon
	// was down is reported to Events, with its status, before or after
	// Recover returns.
	Recover(ctx context.Context, c *Container) error
}

// Events receives what happens to processes on their own. Its methods
// may be called from any goroutine, including from within a Containers
// call (see the lifecycle rules for Sandboxes calls). Exited returns once
// the exit is recorded, durably; it may wait for a call in progress on the
// same sandbox to end.
type Events interface {
	// Exited reports that a process ended: by itself, by a signal, or with
	// its sandbox. Reports of a process the controller does not know, or
	// knows to have ended, are dropped.
	Exited(p Process, status uint32, at time.Time)
	// OOM reports that the kernel's OOM killer killed a process of the
	// container of p.
	OOM(p Process)
}
