package sandboxer

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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
	// Annotations are the Create request's annotations, when the pod's
	// resources come from them: the PodSandboxConfig has none (not a CRI
	// caller). A CRI pod's annotations are in Config.
	Annotations map[string]string `json:"annotations,omitempty"`
	// Config is the PodSandboxConfig (encoding/json), shown by verbose Status.
	Config json.RawMessage `json:"config,omitempty"`
	// Spec holds the pod-level resource inputs. It is shared between
	// sandboxes with the same one (internSpec) and never changed in
	// place: a change replaces it.
	Spec *resourceinfo.Spec `json:"spec"`
	// Containers holds each container's resources, by container ID.
	Containers map[string]*Container `json:"containers"`
	// Ledger accrues what the sandbox held while it ran.
	Ledger Ledger `json:"ledger"`
	// ResourcesUpdatedAt is when the effective resources last changed:
	// resource_info.json's updated_at, kept here so that the file is a
	// function of the state.
	ResourcesUpdatedAt time.Time `json:"resources_updated_at,omitzero"`
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
// replaces s.Spec, which may be shared with other sandboxes and is never
// changed in place, only when the history changed.
func (s *State) ResourceInfo() resourceinfo.ResourceInfo {
	if len(s.Containers) == 0 && (s.Spec == nil || len(s.Spec.Pod.Containers) == 0) {
		// A function of the spec alone: computed once per shared spec.
		if e := sharedSpec(s.Spec); e != nil {
			return e.resources()
		}
	}
	var cs map[string]resourceinfo.Resources
	obs := make(map[string]resourceinfo.Observed, len(s.Containers))
	if len(s.Containers) > 0 {
		cs = make(map[string]resourceinfo.Resources, len(s.Containers))
		for id, c := range s.Containers {
			cs[id] = c.Resources
			o := resourceinfo.Observed{Resources: c.Resources}
			o.Exited, o.ExitStatus = exitOf(c)
			obs[id] = o
		}
	}
	var spec resourceinfo.Spec
	if s.Spec != nil {
		spec = *s.Spec
	}
	if pod, changed := spec.Pod.Observe(obs); changed {
		spec.Pod = pod
		s.Spec = internSpec(&spec)
	}
	ri := resourceinfo.Compute(spec, cs)
	ri.Sources = internSources(ri.Sources)
	return ri
}

// exitOf is whether a container's process has exited, and its status:
// what of its task the pod's history records.
func exitOf(c *Container) (bool, uint32) {
	if c.Task != nil && c.Task.Status == TaskStopped {
		return true, c.Task.ExitStatus
	}
	return false, 0
}

// clone copies a state for a change: the copy's maps of containers, its
// containers, their task records and exec records are its own, so a
// change to it leaves
// the original (a snapshot readers may hold) as it was, and a failed change
// is dropped with the copy.
//
// What a state reaches beyond that is shared, and never changed in place:
// a change replaces a pointer, a map or a slice (a new time, new
// resources, new annotations), it never writes through one. That is what
// lets a clone cost a few allocations, and lets commit tell unchanged
// resources by the identity of their values (sameResourceInputs).
func (s *State) clone() *State {
	c := *s
	if s.Containers != nil {
		c.Containers = make(map[string]*Container, len(s.Containers))
		for id, ctr := range s.Containers {
			c.Containers[id] = ctr.clone()
		}
	}
	return &c
}

func (c *Container) clone() *Container {
	cc := *c
	if c.Task != nil {
		t := *c.Task
		if c.Task.Execs != nil {
			// Changed in place (their status, pid and exit).
			t.Execs = make(map[string]*ExecRecord, len(c.Task.Execs))
			for id, e := range c.Task.Execs {
				ec := *e
				t.Execs[id] = &ec
			}
		}
		cc.Task = &t
	}
	return &cc
}

// ValidateID rejects sandbox and container IDs that are not safe as one
// path element (containerd's identifier rules: no "/", "..", NUL, at most
// 76 characters of [A-Za-z0-9._-], starting with a letter or digit).
func ValidateID(kind, id string) error {
	if isIdentifier(id) {
		return nil
	}
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

// isIdentifier is identifiers.Validate's rule without its regexp, which
// cost 3% of a pod cycle's CPU: 1-76 characters, runs of letters and
// digits joined by single '.', '_' or '-'.
func isIdentifier(s string) bool {
	if len(s) == 0 || len(s) > 76 {
		return false
	}
	sep := true // at the start, as after a separator
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
			sep = false
		case c == '.' || c == '_' || c == '-':
			if sep {
				return false
			}
			sep = true
		default:
			return false
		}
	}
	return !sep
}

// encodeState is a state as the journal records it: compact JSON without
// its null members (most of the Resources' fields are null), which halves
// a record. The config (compact JSON already) and a shared spec (whose
// encoding is kept) are put in after the rest, as they are: encoding/json
// would scan the one and reflect over the 66 fields of the other again.
func encodeState(s *State) ([]byte, error) {
	spec := sharedEncoding(s.Spec)
	// The fixed members (names, times, ledger) take some 450 bytes: a
	// buffer that holds the record whole is allocated once.
	size := 512 + 2*len(s.ID) + len(s.NetNSPath) + len(s.Config) + len(spec)
	if out, ok := appendPodState(make([]byte, 0, size), s, spec); ok {
		return out, nil
	}
	return encodeStateJSON(s, spec)
}

// encodeStateJSON is encodeState through encoding/json; spec is the
// shared spec's encoding, or nil.
func encodeStateJSON(s *State, spec []byte) ([]byte, error) {
	cfg := s.Config
	c := *s
	c.Config = nil
	if spec != nil {
		c.Spec = nil
	}
	data, err := json.Marshal(&c)
	if err != nil {
		return nil, fmt.Errorf("encode state of %s: %w", s.ID, err)
	}
	data = stripNulls(data)
	if len(cfg) == 0 && spec == nil {
		return data, nil
	}
	out := make([]byte, 0, len(data)+len(cfg)+len(spec)+20)
	out = append(out, data[:len(data)-1]...)
	if len(cfg) > 0 {
		out = append(append(out, `,"config":`...), cfg...)
	}
	if spec != nil {
		out = append(append(out, `,"spec":`...), spec...)
	}
	return append(out, '}'), nil
}

// stripNulls removes the members whose value is null from compact JSON
// (json.Marshal's output), in place. Decoding gives the same value: a
// missing member leaves a pointer, map or slice nil, as null does.
func stripNulls(in []byte) []byte {
	out := in[:0]
	inString, escaped := false, false
	key := -1 // where the last string began in out
	for i := 0; i < len(in); i++ {
		c := in[i]
		if inString {
			out = append(out, c)
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
			continue
		}
		switch {
		case c == '"':
			inString = true
			key = len(out)
			out = append(out, c)
		case c == ':' && i+5 < len(in) && string(in[i+1:i+5]) == "null" && (in[i+5] == ',' || in[i+5] == '}'):
			// Drop `"key":null` and one comma around it.
			sep := out[key-1]
			out = out[:key]
			i += 4
			if in[i+1] == ',' {
				i++
			} else if sep == ',' {
				out = out[:len(out)-1]
			}
		default:
			out = append(out, c)
		}
	}
	return out
}

// decodeState reads a state the journal recorded, or state.json: strictly
// (unknown fields and trailing data are damage). The spec, which
// encodeState puts last, is looked up by its encoding among the shared
// ones before it is decoded: recovering many sandboxes of few specs
// decodes few specs.
func decodeState(data []byte, id string) (*State, error) {
	data = bytes.TrimRight(data, "\n")
	var s State
	if rest, spec, ok := splitSpec(data); ok {
		if err := decodeStrict(rest, &s); err == nil && s.Spec == nil {
			if s.Spec, err = internSpecJSON(spec); err == nil {
				return &s, checkState(&s, id)
			}
		}
		s = State{}
	}
	if err := decodeStrict(data, &s); err != nil {
		return nil, err
	}
	s.Spec = internSpec(s.Spec)
	return &s, checkState(&s, id)
}

// splitSpec splits off the last member of a JSON object when it is the
// spec: `{...,"spec":{...}}` is `{...}` and `{...}`. A split that is not
// the top-level member fails to decode, and the caller decodes it whole.
func splitSpec(data []byte) (rest, spec []byte, ok bool) {
	const member = `,"spec":`
	i := bytes.LastIndex(data, []byte(member))
	if i < 0 || len(data) < 2 || data[len(data)-1] != '}' {
		return nil, nil, false
	}
	rest = append(append(make([]byte, 0, i+1), data[:i]...), '}')
	return rest, data[i+len(member) : len(data)-1], true
}

func decodeStrict(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("decode state: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("decode state: trailing data")
	}
	return nil
}

// encodeInfo is resource_info.json of a state whose effective resources
// are ri.
func encodeInfo(s *State, ri resourceinfo.ResourceInfo) ([]byte, error) {
	if len(s.Containers) == 0 {
		if e := sharedSpec(s.Spec); e != nil {
			return e.info(s.ResourcesUpdatedAt)
		}
	}
	ri.UpdatedAt = s.ResourcesUpdatedAt
	return statefile.EncodeJSON(ri)
}

// loadState reads and checks a sandbox's state.json.
func loadState(dir, id string) (*State, error) {
	path := filepath.Join(dir, StateFile)
	data, err := statefile.ReadSmall(path, nil)
	if err != nil {
		return nil, err
	}
	st, err := decodeState(data, id)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return st, nil
}

func checkState(s *State, id string) error {
	switch {
	case s.Version != stateVersion:
		return fmt.Errorf("state version %d, want %d", s.Version, stateVersion)
	case s.ID != id:
		return fmt.Errorf("state is for sandbox %q", s.ID)
	case s.Phase != PhaseCreated && s.Phase != PhaseReady && s.Phase != PhaseStopped:
		return fmt.Errorf("unknown phase %q", s.Phase)
	}
	return nil
}

// ReadResourceInfo reads a sandbox's resource_info.json.
func ReadResourceInfo(dir string) (resourceinfo.ResourceInfo, error) {
	var info resourceinfo.ResourceInfo
	err := statefile.ReadJSON(filepath.Join(dir, ResourceInfoFile), &info)
	return info, err
}
