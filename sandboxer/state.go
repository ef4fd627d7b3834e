package sandboxer

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/errdefs"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/statefile"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// File names inside <dir>/<sandbox-id>/.
const (
	StateFile        = "state.json"
	ResourceInfoFile = "resource_info.json"
)

// stateVersion is bumped when State changes incompatibly.
const stateVersion = 1

// Phase is where a sandbox is in its lifecycle.
type Phase string

const (
	// PhaseCreated: Create succeeded, Start was not called yet.
	PhaseCreated Phase = "created"
	// PhaseReady: started and running.
	PhaseReady Phase = "ready"
	// PhaseStopped: stopped by Stop, or exited by itself.
	PhaseStopped Phase = "stopped"
)

// State is what the daemon persists of a sandbox in state.json: everything
// needed to rebuild it, and its resource_info.json, after a restart.
type State struct {
	Version    int        `json:"version"`
	ID         string     `json:"id"`
	Mode       string     `json:"mode"`
	Phase      Phase      `json:"phase"`
	CreatedAt  time.Time  `json:"created_at"`
	StartedAt  *time.Time `json:"started_at"`
	ExitedAt   *time.Time `json:"exited_at"`
	ExitStatus uint32     `json:"exit_status"`
	Pid        uint32     `json:"pid"`
	NetNSPath  string     `json:"netns_path,omitempty"`
	// Annotations are the pod annotations (PodSandboxConfig, else the
	// Create request's).
	Annotations map[string]string `json:"annotations,omitempty"`
	// Config is the PodSandboxConfig (encoding/json), shown by verbose Status.
	Config json.RawMessage `json:"config,omitempty"`
	// Spec holds the pod-level resource inputs.
	Spec resourceinfo.Spec `json:"spec"`
	// Containers holds each container's resources, by container ID.
	Containers map[string]*Container `json:"containers"`
	// Ledger accrues what the sandbox held while it ran.
	Ledger Ledger `json:"ledger"`
}

// Container is what the sandbox records of one of its containers.
type Container struct {
	Resources resourceinfo.Resources `json:"resources"`
	// Task is the container's task (its init process and exec
	// processes), when the container was created through the task API.
	Task *TaskRecord `json:"task,omitempty"`
}

// Task statuses, as the task API names them.
const (
	TaskCreated = string(backend.StatusCreated)
	TaskRunning = string(backend.StatusRunning)
	TaskPaused  = string(backend.StatusPaused)
	TaskStopped = string(backend.StatusStopped)
)

// TaskRecord is the persisted state of a container's task: its init
// process, its exec processes, and what the backend keeps of it.
type TaskRecord struct {
	Namespace  string     `json:"namespace"`
	Bundle     string     `json:"bundle"`
	Stdin      string     `json:"stdin,omitempty"`
	Stdout     string     `json:"stdout,omitempty"`
	Stderr     string     `json:"stderr,omitempty"`
	Terminal   bool       `json:"terminal,omitempty"`
	LogPath    string     `json:"log_path,omitempty"`
	Status     string     `json:"status"`
	Pid        uint32     `json:"pid"`
	ExitStatus uint32     `json:"exit_status"`
	CreatedAt  time.Time  `json:"created_at"`
	StartedAt  *time.Time `json:"started_at"`
	ExitedAt   *time.Time `json:"exited_at"`
	// OOMKilled: the kernel's OOM killer killed a process of the
	// container.
	OOMKilled bool `json:"oom_killed,omitempty"`
	// Execs are the exec processes, by exec ID.
	Execs map[string]*ExecRecord `json:"execs,omitempty"`
	// Private is the backend's own record of the container
	// (backend.Created.Private).
	Private json.RawMessage `json:"private,omitempty"`
	// LegacySimulation is the slot simulation as state written before
	// Private existed kept it; it is read once, into Private.
	LegacySimulation json.RawMessage `json:"simulation,omitempty"`
	// Meta is the creator's own metadata (the direct CRI service keeps the
	// container's CRI config there).
	Meta json.RawMessage `json:"meta,omitempty"`
}

// ExecRecord is the persisted state of an exec process.
type ExecRecord struct {
	// Spec is the exec's OCI process spec (JSON).
	Spec       json.RawMessage `json:"spec"`
	Stdin      string          `json:"stdin,omitempty"`
	Stdout     string          `json:"stdout,omitempty"`
	Stderr     string          `json:"stderr,omitempty"`
	Terminal   bool            `json:"terminal,omitempty"`
	Status     string          `json:"status"`
	Pid        uint32          `json:"pid"`
	ExitStatus uint32          `json:"exit_status"`
	ExitedAt   *time.Time      `json:"exited_at"`
}

// ResourceInfo recomputes the effective resources from the state. It first
// records the containers present now in the pod's container history
// (s.Spec.Pod), which kubelet's rules need once a container is gone (init
// containers). Call it on a state no reader shares yet (change and commit
// do, on their copy; so does recovery): the record is idempotent and
// replaces s.Spec.Pod only when the history changed.
func (s *State) ResourceInfo() resourceinfo.ResourceInfo {
	var cs map[string]resourceinfo.Resources
	obs := make(map[string]resourceinfo.Observed, len(s.Containers))
	if len(s.Containers) > 0 {
		cs = make(map[string]resourceinfo.Resources, len(s.Containers))
		for id, c := range s.Containers {
			cs[id] = c.Resources
			o := resourceinfo.Observed{Resources: c.Resources}
			if c.Task != nil && c.Task.Status == TaskStopped {
				o.Exited, o.ExitStatus = true, c.Task.ExitStatus
			}
			obs[id] = o
		}
	}
	if pod, changed := s.Spec.Pod.Observe(obs); changed {
		s.Spec.Pod = pod
	}
	return resourceinfo.Compute(s.Spec, cs)
}

// clone deep-copies a state through JSON, so that a failed change can be
// rolled back and readers never share maps with a writer.
func (s *State) clone() *State {
	data, err := json.Marshal(s)
	if err != nil {
		panic(fmt.Sprintf("state of %s does not encode: %v", s.ID, err))
	}
	var c State
	if err := json.Unmarshal(data, &c); err != nil {
		panic(fmt.Sprintf("state of %s does not decode: %v", s.ID, err))
	}
	return &c
}

// ValidateID rejects sandbox and container IDs that are not safe as one
// path element (containerd's identifier rules: no "/", "..", NUL, at most
// 76 characters of [A-Za-z0-9._-], starting with a letter or digit).
func ValidateID(kind, id string) error {
	if err := identifiers.Validate(id); err != nil {
		shown := id
		if len(shown) > 80 {
			shown = shown[:80] + "…"
		}
		return fmt.Errorf("%w: invalid %s id %q: must be 1-76 characters of letters, digits, '.', '_' and '-', starting with a letter or digit",
			errdefs.ErrInvalidArgument, kind, shown)
	}
	return nil
}

// persist writes resource_info.json (when info is not nil) and then
// state.json, each atomically. state.json is the commit point: it is
// renamed last and, when durable, synced; recovery trusts it and rewrites
// resource_info.json from it when that is missing, damaged or stale, so
// resource_info.json, derived, needs no sync of its own.
func persist(dir string, durable bool, s *State, info *resourceinfo.ResourceInfo) error {
	var files []statefile.File
	if info != nil {
		data, err := statefile.EncodeJSON(info)
		if err != nil {
			return err
		}
		files = append(files, statefile.File{Name: ResourceInfoFile, Data: data, Derived: true})
	}
	data, err := statefile.EncodeJSON(s)
	if err != nil {
		return err
	}
	files = append(files, statefile.File{Name: StateFile, Data: data})
	return statefile.WriteFiles(dir, durable, files...)
}

// loadState reads and checks a sandbox's state.json.
func loadState(dir, id string) (*State, error) {
	var s State
	if err := statefile.ReadJSON(filepath.Join(dir, StateFile), &s); err != nil {
		return nil, err
	}
	switch {
	case s.Version != stateVersion:
		return nil, fmt.Errorf("state version %d, want %d", s.Version, stateVersion)
	case s.ID != id:
		return nil, fmt.Errorf("state is for sandbox %q", s.ID)
	case s.Phase != PhaseCreated && s.Phase != PhaseReady && s.Phase != PhaseStopped:
		return nil, fmt.Errorf("unknown phase %q", s.Phase)
	}
	return &s, nil
}

// ReadResourceInfo reads a sandbox's resource_info.json.
func ReadResourceInfo(dir string) (resourceinfo.ResourceInfo, error) {
	var info resourceinfo.ResourceInfo
	err := statefile.ReadJSON(filepath.Join(dir, ResourceInfoFile), &info)
	return info, err
}

// mkdirSandbox creates a sandbox directory; Create syncs its parent once
// the sandbox is committed.
func mkdirSandbox(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil {
		if os.IsExist(err) {
			return fmt.Errorf("sandbox directory %s exists: %w", dir, errdefs.ErrAlreadyExists)
		}
		return err
	}
	return nil
}
