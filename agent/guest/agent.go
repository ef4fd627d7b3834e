// Package guest is the guest agent of vm mode: PID 1 of the sandbox VM. On
// every host session (package agent/transport) it serves two ttrpc
// services:
//
//   - containerd.task.v3.Task: containerd's own runc task service
//     (containerd-shim-runc-v2's task package) driving runc in the guest;
//   - rss.agent.v1.Agent (agent/api): the pod's setup, cgroup and stats,
//     bundles and stdio, events and shutdown.
//
// Sessions come and go (the host daemon restarts) while containers keep
// running: the task service, the event queue and the stdio buffers belong
// to the Agent, not to a session.
package guest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"sync"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/task"
	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	ptypes "github.com/containerd/containerd/v2/pkg/protobuf/types"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
)

// Paths below Config.RunDir.
const (
	sharedDir  = "shared"  // the virtio-fs share
	nsDir      = "ns"      // the pod's namespaces: ns/ipc, ns/uts, ns/pid
	bundlesDir = "bundles" // bundles/<container-id>
)

// Config configures an Agent.
type Config struct {
	// Version is announced in the handshake and by Info.
	Version string
	// RunDir holds the share, the pod's namespaces and the bundles
	// (default /run/rss).
	RunDir string
	// CgroupRoot is the cgroup v2 mount (default /sys/fs/cgroup); the pod
	// cgroup is CgroupRoot/pod.
	CgroupRoot string
	// BootPidsMax is pids.max of the pod cgroup from the kernel command
	// line (rss.pids=N), the default when PodResources leave it unset.
	BootPidsMax int64
	// NoPivotRoot makes every container use runc's --no-pivot: the guest's
	// root is an initramfs, where pivot_root fails.
	NoPivotRoot bool
	// EventQueueSize and StreamBuffer bound the events and the output kept
	// for the host (defaults DefaultEventQueueSize, DefaultStreamBuffer).
	EventQueueSize int
	StreamBuffer   int
	// PowerOff ends the guest once Shutdown has stopped everything; nil
	// when not PID 1 (the agent then only stops the containers).
	PowerOff func()
	// ModulesLoaded, when set, is closed once the modules loaded after
	// READY (virtiofs among them) are in: SetupSandbox waits for it.
	ModulesLoaded <-chan struct{}
}

// Agent is the guest agent's state: it outlives host sessions.
type Agent struct {
	cfg    Config
	podDir string
	task   *taskService
	events *eventQueue
	booted time.Time

	// setupMu serializes SetupSandbox, UpdateSandbox and Shutdown.
	setupMu sync.Mutex
	sandbox sandboxState

	mu         sync.Mutex
	containers map[string]*container

	shutdownOnce sync.Once
	shutdownDone chan struct{}
}

// container is a container the host prepared (PrepareContainer).
type container struct {
	id     string
	bundle string
	// cgroup is the container's cgroup directory (from the spec's
	// cgroupsPath).
	cgroup string
	io     *procIO
	execs  map[string]*procIO
	// Set from the task service's answers.
	namespace string
	created   bool
	liveExecs map[string]bool
}

// New creates the agent and the runc task service. The cgroup v2 hierarchy
// must be mounted (the task service picks its OOM watcher by it).
func New(ctx context.Context, cfg Config) (*Agent, error) {
	if cfg.RunDir == "" {
		cfg.RunDir = "/run/rss"
	}
	if cfg.CgroupRoot == "" {
		cfg.CgroupRoot = "/sys/fs/cgroup"
	}
	if cfg.StreamBuffer <= 0 {
		cfg.StreamBuffer = DefaultStreamBuffer
	}
	a := &Agent{
		cfg:          cfg,
		podDir:       filepath.Join(cfg.CgroupRoot, "pod"),
		containers:   map[string]*container{},
		booted:       time.Now(),
		shutdownDone: make(chan struct{}),
	}
	for _, d := range []string{sharedDir, nsDir, bundlesDir} {
		if err := os.MkdirAll(filepath.Join(cfg.RunDir, d), 0o711); err != nil {
			return nil, err
		}
	}
	if err := a.setupPodCgroup(); err != nil {
		return nil, err
	}
	a.events = newEventQueue(cfg.EventQueueSize, a.namespaceOf)
	// The task service's shutdown service is never triggered: the task
	// service lives as long as the guest (its Shutdown RPC is a no-op).
	tctx, sd := shutdown.WithShutdown(ctx)
	ts, err := task.NewTaskService(tctx, a.events, sd)
	if err != nil {
		return nil, fmt.Errorf("runc task service: %w", err)
	}
	a.task = &taskService{TTRPCTaskService: ts, a: a}
	return a, nil
}

// setupPodCgroup creates the pod cgroup with the controllers enabled for
// it and its children, and pids.max from the boot.
func (a *Agent) setupPodCgroup() error {
	if err := enableControllers(a.cfg.CgroupRoot); err != nil {
		return err
	}
	if err := os.MkdirAll(a.podDir, 0o755); err != nil {
		return err
	}
	if err := enableControllers(a.podDir); err != nil {
		return err
	}
	if a.cfg.BootPidsMax > 0 {
		if err := os.WriteFile(filepath.Join(a.podDir, "pids.max"), []byte(fmt.Sprint(a.cfg.BootPidsMax)), 0); err != nil {
			return fmt.Errorf("pids.max %d: %w", a.cfg.BootPidsMax, err)
		}
	}
	return nil
}

func (a *Agent) namespaceOf(id string) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if c := a.containers[id]; c != nil {
		return c.namespace
	}
	return ""
}

// NewServer returns a ttrpc server with both services of the agent. Serve
// it on any number of listeners; it holds no state of its own.
func (a *Agent) NewServer() (*ttrpc.Server, error) {
	srv, err := ttrpc.NewServer(ttrpc.WithUnaryServerInterceptor(unaryInterceptor))
	if err != nil {
		return nil, err
	}
	taskAPI.RegisterTTRPCTaskService(srv, a.task)
	api.RegisterAgentService(srv, &agentService{a: a})
	return srv, nil
}

// unaryInterceptor recovers a handler's panic and converts errors to gRPC
// status at the edge.
func unaryInterceptor(ctx context.Context, u ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, m ttrpc.Method) (resp interface{}, err error) {
	defer func() {
		if r := recover(); r != nil {
			log.G(ctx).WithField("method", info.FullMethod).Errorf("panic: %v\n%s", r, debug.Stack())
			resp, err = nil, errgrpc.ToGRPCf(errdefs.ErrInternal, "panic in %s: %v", info.FullMethod, r)
		}
	}()
	resp, err = m(ctx, u)
	if err != nil {
		log.G(ctx).WithError(err).WithField("method", info.FullMethod).Debug("call failed")
		err = errgrpc.ToGRPC(err)
	}
	return resp, err
}

func (a *Agent) bundleDir(id string) string {
	return filepath.Join(a.cfg.RunDir, bundlesDir, id)
}

// containerIDs are the containers the task service has.
func (a *Agent) containerIDs() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var ids []string
	for id, c := range a.containers {
		if c.created {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	return ids
}

// taskService is containerd's runc task service with what the agent adds:
// it checks that a container was prepared, records what the task service
// has (for Info, Release and the events' namespace), forces --no-pivot
// where the root is an initramfs, and makes Shutdown a no-op (the guest's
// task service lives as long as the guest; Agent.Shutdown powers it off).
type taskService struct {
	taskAPI.TTRPCTaskService
	a *Agent
}

func (t *taskService) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	if err := identifiers.Validate(r.ID); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	ns, _ := namespaces.Namespace(ctx)
	t.a.mu.Lock()
	c := t.a.containers[r.ID]
	t.a.mu.Unlock()
	if c == nil {
		return nil, errgrpc.ToGRPCf(errdefs.ErrFailedPrecondition, "container %s was not prepared (PrepareContainer)", r.ID)
	}
	if r.Bundle != c.bundle {
		return nil, errgrpc.ToGRPCf(errdefs.ErrInvalidArgument, "bundle %q: container %s is prepared at %s", r.Bundle, r.ID, c.bundle)
	}
	if t.a.cfg.NoPivotRoot {
		o, err := withNoPivotRoot(r.Options)
		if err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
		r.Options = o
	}
	// The namespace first: the task service publishes TaskCreate before
	// it returns.
	t.a.mu.Lock()
	c.namespace = ns
	t.a.mu.Unlock()
	resp, err := t.TTRPCTaskService.Create(ctx, r)
	if err == nil {
		t.a.mu.Lock()
		c.created = true
		t.a.mu.Unlock()
	}
	return resp, err
}

// withNoPivotRoot sets NoPivotRoot in the task's runc options.
func withNoPivotRoot(a *anypb.Any) (*anypb.Any, error) {
	opts := &options.Options{}
	if a.GetValue() != nil || a.GetTypeUrl() != "" {
		v, err := typeurl.UnmarshalAny(a)
		if err != nil {
			return nil, fmt.Errorf("task options: %v: %w", err, errdefs.ErrInvalidArgument)
		}
		o, ok := v.(*options.Options)
		if !ok {
			return nil, fmt.Errorf("task options are %T, not runc options: %w", v, errdefs.ErrInvalidArgument)
		}
		opts = o
	}
	opts.NoPivotRoot = true
	return typeurl.MarshalAnyToProto(opts)
}

func (t *taskService) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*ptypes.Empty, error) {
	if err := identifiers.Validate(r.ExecID); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	resp, err := t.TTRPCTaskService.Exec(ctx, r)
	if err == nil {
		t.a.mu.Lock()
		if c := t.a.containers[r.ID]; c != nil {
			c.liveExecs[r.ExecID] = true
		}
		t.a.mu.Unlock()
	}
	return resp, err
}

func (t *taskService) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	resp, err := t.TTRPCTaskService.Delete(ctx, r)
	if err == nil {
		t.a.mu.Lock()
		if c := t.a.containers[r.ID]; c != nil {
			if r.ExecID == "" {
				c.created = false
				c.liveExecs = map[string]bool{}
			} else {
				delete(c.liveExecs, r.ExecID)
			}
		}
		t.a.mu.Unlock()
	}
	return resp, err
}

// Shutdown is a no-op: the runc task service would close its platform.
func (t *taskService) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*ptypes.Empty, error) {
	return &ptypes.Empty{}, nil
}
