package guest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/pkg/atomicfile"
	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
)

// agentService serves rss.agent.v1.Agent.
type agentService struct {
	a *Agent
}

var _ api.AgentService = (*agentService)(nil)

const maxSpecBytes = 2 << 20

func (s *agentService) Info(ctx context.Context, _ *api.InfoRequest) (*api.InfoResponse, error) {
	bootID, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	var uts unix.Utsname
	unix.Uname(&uts)
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts)
	s.a.setupMu.Lock()
	id := s.a.sandbox.id
	s.a.setupMu.Unlock()
	return &api.InfoResponse{
		Version:    s.a.cfg.Version,
		BootId:     strings.TrimSpace(string(bootID)),
		Kernel:     unix.ByteSliceToString(uts.Release[:]),
		UptimeNs:   uint64(ts.Nano()),
		SandboxId:  id,
		Containers: s.a.containerIDs(),
	}, nil
}

func (s *agentService) SetupSandbox(ctx context.Context, r *api.SetupSandboxRequest) (*emptypb.Empty, error) {
	if err := s.a.setupSandbox(ctx, r); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func (s *agentService) UpdateSandbox(ctx context.Context, r *api.UpdateSandboxRequest) (*emptypb.Empty, error) {
	limits, err := podLimits(r.GetResources(), s.a.cfg.BootPidsMax)
	if err != nil {
		return nil, err
	}
	s.a.setupMu.Lock()
	defer s.a.setupMu.Unlock()
	if err := applyLimits(s.a.podDir, limits); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func (s *agentService) SandboxStats(ctx context.Context, r *api.SandboxStatsRequest) (*api.SandboxStatsResponse, error) {
	for _, id := range r.ContainerIds {
		if err := identifiers.Validate(id); err != nil {
			return nil, err
		}
	}
	pod, err := readStats(s.a.podDir)
	if err != nil {
		return nil, fmt.Errorf("pod cgroup: %w", err)
	}
	resp := &api.SandboxStatsResponse{Timestamp: timestamppb.Now(), Pod: pod, Containers: map[string]*api.CgroupStats{}}
	s.a.mu.Lock()
	dirs := map[string]string{}
	if len(r.ContainerIds) == 0 {
		for id, c := range s.a.containers {
			dirs[id] = c.cgroup
		}
	} else {
		for _, id := range r.ContainerIds {
			if c := s.a.containers[id]; c != nil {
				dirs[id] = c.cgroup
			}
		}
	}
	s.a.mu.Unlock()
	// A container without a cgroup (not created yet, or deleted) is left
	// out.
	for id, dir := range dirs {
		if st, err := readStats(dir); err == nil {
			resp.Containers[id] = st
		}
	}
	return resp, nil
}

// cgroupDir is where runc puts a container's cgroup for its spec: the
// spec's cgroupsPath below the cgroup root (runc's cgroupfs driver), or
// /<id> without one.
func (a *Agent) cgroupDir(id string, spec *specs.Spec) string {
	p := ""
	if spec.Linux != nil {
		p = spec.Linux.CgroupsPath
	}
	if p == "" {
		p = id
	}
	return filepath.Join(a.cfg.CgroupRoot, path.Clean("/"+p))
}

func (s *agentService) PrepareContainer(ctx context.Context, r *api.PrepareContainerRequest) (_ *api.PrepareContainerResponse, retErr error) {
	if err := identifiers.Validate(r.ContainerId); err != nil {
		return nil, err
	}
	if len(r.Spec) > maxSpecBytes {
		return nil, fmt.Errorf("spec of %d bytes: %w", len(r.Spec), errdefs.ErrInvalidArgument)
	}
	var spec specs.Spec
	if err := json.Unmarshal(r.Spec, &spec); err != nil {
		return nil, fmt.Errorf("spec: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	if spec.Root == nil || spec.Root.Path == "" || spec.Process == nil {
		return nil, fmt.Errorf("spec without root or process: %w", errdefs.ErrInvalidArgument)
	}
	a := s.a
	id := r.ContainerId
	a.mu.Lock()
	old := a.containers[id]
	if old != nil && old.created {
		a.mu.Unlock()
		return nil, fmt.Errorf("container %s exists: %w", id, errdefs.ErrAlreadyExists)
	}
	// Prepared again before Create (the host retried): start over.
	delete(a.containers, id)
	a.mu.Unlock()
	if old != nil {
		old.release()
	}

	bundle := a.bundleDir(id)
	if err := os.MkdirAll(bundle, 0o700); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			os.RemoveAll(bundle)
		}
	}()
	f, err := atomicfile.New(filepath.Join(bundle, "config.json"), 0o600)
	if err != nil {
		return nil, err
	}
	if _, err := f.Write(r.Spec); err != nil {
		f.Cancel()
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	pio, err := newProcIO(filepath.Join(bundle, "io"), "init", r.Stdio, a.cfg.StreamBuffer)
	if err != nil {
		return nil, err
	}
	c := &container{
		id:        id,
		bundle:    bundle,
		cgroup:    a.cgroupDir(id, &spec),
		io:        pio,
		execs:     map[string]*procIO{},
		liveExecs: map[string]bool{},
	}
	a.mu.Lock()
	if a.containers[id] != nil {
		a.mu.Unlock()
		pio.close()
		return nil, fmt.Errorf("container %s prepared concurrently: %w", id, errdefs.ErrAlreadyExists)
	}
	a.containers[id] = c
	a.mu.Unlock()
	log.G(ctx).WithField("container", id).Debug("prepared")
	return &api.PrepareContainerResponse{Bundle: bundle, Stdio: pio.paths}, nil
}

func (c *container) release() {
	if c.io != nil {
		c.io.close()
	}
	for _, p := range c.execs {
		p.close()
	}
}

func (s *agentService) PrepareExec(ctx context.Context, r *api.PrepareExecRequest) (*api.StdioPaths, error) {
	if err := identifiers.Validate(r.ContainerId); err != nil {
		return nil, err
	}
	if err := identifiers.Validate(r.ExecId); err != nil {
		return nil, err
	}
	a := s.a
	a.mu.Lock()
	c := a.containers[r.ContainerId]
	if c == nil {
		a.mu.Unlock()
		return nil, fmt.Errorf("container %s: %w", r.ContainerId, errdefs.ErrNotFound)
	}
	if c.liveExecs[r.ExecId] {
		a.mu.Unlock()
		return nil, fmt.Errorf("exec %s of %s exists: %w", r.ExecId, r.ContainerId, errdefs.ErrAlreadyExists)
	}
	old := c.execs[r.ExecId]
	delete(c.execs, r.ExecId)
	a.mu.Unlock()
	if old != nil {
		old.close()
	}
	dir := filepath.Join(c.bundle, "io")
	prefix := "exec-" + r.ExecId
	for _, ext := range []string{".stdin", ".stdout", ".stderr"} {
		os.Remove(filepath.Join(dir, prefix+ext))
	}
	pio, err := newProcIO(dir, prefix, r.Stdio, a.cfg.StreamBuffer)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	if a.containers[r.ContainerId] != c || c.execs[r.ExecId] != nil {
		a.mu.Unlock()
		pio.close()
		return nil, fmt.Errorf("exec %s of %s changed concurrently: %w", r.ExecId, r.ContainerId, errdefs.ErrAborted)
	}
	c.execs[r.ExecId] = pio
	a.mu.Unlock()
	return pio.paths, nil
}

// procIO returns the stdio of a process.
func (a *Agent) procIO(containerID, execID string) (*procIO, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	c := a.containers[containerID]
	if c == nil {
		return nil, fmt.Errorf("container %s: %w", containerID, errdefs.ErrNotFound)
	}
	if execID == "" {
		return c.io, nil
	}
	p := c.execs[execID]
	if p == nil {
		return nil, fmt.Errorf("exec %s of %s: %w", execID, containerID, errdefs.ErrNotFound)
	}
	return p, nil
}

func (s *agentService) ReadStdio(ctx context.Context, r *api.ReadStdioRequest) (*api.ReadStdioResponse, error) {
	p, err := s.a.procIO(r.ContainerId, r.ExecId)
	if err != nil {
		return nil, err
	}
	st, err := p.stream(r.Stream)
	if err != nil {
		return nil, err
	}
	max := int(r.MaxBytes)
	if max <= 0 {
		max = defaultReadBytes
	}
	max = min(max, maxReadBytes)
	wait := min(time.Duration(r.WaitMs)*time.Millisecond, maxReadWait)
	off, data, eof := st.read(ctx, r.Offset, max, wait)
	return &api.ReadStdioResponse{Offset: off, Data: data, Eof: eof}, nil
}

func (s *agentService) WriteStdin(ctx context.Context, r *api.WriteStdinRequest) (*api.WriteStdinResponse, error) {
	p, err := s.a.procIO(r.ContainerId, r.ExecId)
	if err != nil {
		return nil, err
	}
	n, err := p.writeStdin(ctx, r.Data, r.Close)
	if err != nil {
		return nil, err
	}
	return &api.WriteStdinResponse{Written: uint32(n)}, nil
}

const (
	maxEventsWait  = 5 * time.Minute
	defaultEvents  = 256
	maxEventsBatch = 1024
)

func (s *agentService) Events(ctx context.Context, r *api.EventsRequest) (*api.EventsResponse, error) {
	max := int(r.Max)
	if max <= 0 {
		max = defaultEvents
	}
	max = min(max, maxEventsBatch)
	wait := min(time.Duration(r.WaitMs)*time.Millisecond, maxEventsWait)
	return &api.EventsResponse{Events: s.a.events.get(ctx, r.After, max, wait)}, nil
}

func (s *agentService) Release(ctx context.Context, r *api.ReleaseRequest) (*emptypb.Empty, error) {
	if err := identifiers.Validate(r.ContainerId); err != nil {
		return nil, err
	}
	if r.ExecId != "" {
		if err := identifiers.Validate(r.ExecId); err != nil {
			return nil, err
		}
	}
	a := s.a
	a.mu.Lock()
	c := a.containers[r.ContainerId]
	if c == nil {
		a.mu.Unlock()
		return &emptypb.Empty{}, nil
	}
	if r.ExecId != "" {
		if c.liveExecs[r.ExecId] {
			a.mu.Unlock()
			return nil, fmt.Errorf("exec %s of %s is not deleted: %w", r.ExecId, r.ContainerId, errdefs.ErrFailedPrecondition)
		}
		p := c.execs[r.ExecId]
		delete(c.execs, r.ExecId)
		a.mu.Unlock()
		if p != nil {
			p.close()
			for _, f := range []string{p.paths.Stdin, p.paths.Stdout, p.paths.Stderr} {
				if f != "" {
					os.Remove(f)
				}
			}
		}
		return &emptypb.Empty{}, nil
	}
	if c.created {
		a.mu.Unlock()
		return nil, fmt.Errorf("container %s is not deleted: %w", r.ContainerId, errdefs.ErrFailedPrecondition)
	}
	delete(a.containers, r.ContainerId)
	a.mu.Unlock()
	c.release()
	if err := os.RemoveAll(c.bundle); err != nil {
		log.G(ctx).WithError(err).WithField("container", c.id).Warn("remove bundle")
	}
	return &emptypb.Empty{}, nil
}

func (s *agentService) Shutdown(ctx context.Context, r *api.ShutdownRequest) (*emptypb.Empty, error) {
	timeout := time.Duration(r.TimeoutMs) * time.Millisecond
	if timeout <= 0 {
		timeout = DefaultStopGrace
	}
	timeout = min(timeout, 10*time.Minute)
	s.a.Shutdown(ctx, timeout, true)
	return &emptypb.Empty{}, nil
}
