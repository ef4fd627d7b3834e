package sandboxer

import (
	"context"
	"errors"
	"fmt"
	"time"

	api "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/logsafe"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Service is the gRPC containerd.services.sandbox.v1.Controller that
// containerd's sandbox proxy plugin calls. It converts requests, tags the
// context with the sandbox ID and converts errors to gRPC codes; the work is
// the Controller's.
type Service struct {
	api.UnimplementedControllerServer
	ctrl *Controller
}

var _ api.ControllerServer = (*Service)(nil)

// NewService wraps a controller.
func NewService(ctrl *Controller) *Service { return &Service{ctrl: ctrl} }

// Register registers the service on a gRPC server.
func (s *Service) Register(srv *grpc.Server) { api.RegisterControllerServer(srv, s) }

// withSandbox tags the log of a call with its sandbox, as sent (an ID
// from outside, unchecked yet: cut to a loggable length).
func withSandbox(ctx context.Context, id string) context.Context {
	return log.WithLogger(ctx, log.G(ctx).WithField("sandbox", logsafe.String(id)))
}

func (s *Service) Create(ctx context.Context, req *api.ControllerCreateRequest) (*api.ControllerCreateResponse, error) {
	ctx = withSandbox(ctx, req.GetSandboxID())
	// Only the ID is needed; a request without the sandbox is one.
	info := fromProto(req.GetSandbox())
	info.ID = req.GetSandboxID()
	opts := []sandbox.CreateOpt{
		sandbox.WithRootFS(mount.FromProto(req.GetRootfs())),
		sandbox.WithNetNSPath(req.GetNetnsPath()),
		sandbox.WithAnnotations(req.GetAnnotations()),
	}
	if o := req.GetOptions(); o != nil {
		opts = append(opts, withOptionsAny(o))
	}
	if err := s.ctrl.Create(ctx, info, opts...); err != nil {
		return nil, toGRPC(ctx, "create", err)
	}
	return &api.ControllerCreateResponse{SandboxID: req.GetSandboxID()}, nil
}

// withOptionsAny passes the options through without re-marshalling them
// (sandbox.WithOptions would marshal an already-marshalled Any again).
func withOptionsAny(o *anypb.Any) sandbox.CreateOpt {
	return func(co *sandbox.CreateOptions) error {
		co.Options = o
		return nil
	}
}

func (s *Service) Start(ctx context.Context, req *api.ControllerStartRequest) (*api.ControllerStartResponse, error) {
	ctx = withSandbox(ctx, req.GetSandboxID())
	inst, err := s.ctrl.Start(ctx, req.GetSandboxID())
	if err != nil {
		return nil, toGRPC(ctx, "start", err)
	}
	return &api.ControllerStartResponse{
		SandboxID: inst.SandboxID,
		Pid:       inst.Pid,
		CreatedAt: timestamppb.New(inst.CreatedAt),
		Labels:    inst.Labels,
		Address:   inst.Address,
		Version:   inst.Version,
	}, nil
}

func (s *Service) Platform(ctx context.Context, req *api.ControllerPlatformRequest) (*api.ControllerPlatformResponse, error) {
	ctx = withSandbox(ctx, req.GetSandboxID())
	p, err := s.ctrl.Platform(ctx, req.GetSandboxID())
	if err != nil {
		return nil, toGRPC(ctx, "platform", err)
	}
	return &api.ControllerPlatformResponse{Platform: &types.Platform{OS: p.OS, Architecture: p.Architecture, Variant: p.Variant}}, nil
}

func (s *Service) Stop(ctx context.Context, req *api.ControllerStopRequest) (*api.ControllerStopResponse, error) {
	ctx = withSandbox(ctx, req.GetSandboxID())
	var opts []sandbox.StopOpt
	if t := req.GetTimeoutSecs(); t > 0 {
		opts = append(opts, sandbox.WithTimeout(time.Duration(t)*time.Second))
	}
	if err := s.ctrl.Stop(ctx, req.GetSandboxID(), opts...); err != nil {
		return nil, toGRPC(ctx, "stop", err)
	}
	return &api.ControllerStopResponse{}, nil
}

func (s *Service) Wait(ctx context.Context, req *api.ControllerWaitRequest) (*api.ControllerWaitResponse, error) {
	ctx = withSandbox(ctx, req.GetSandboxID())
	es, err := s.ctrl.Wait(ctx, req.GetSandboxID())
	if err != nil {
		return nil, toGRPC(ctx, "wait", err)
	}
	return &api.ControllerWaitResponse{ExitStatus: es.ExitStatus, ExitedAt: timestamppb.New(es.ExitedAt)}, nil
}

func (s *Service) Status(ctx context.Context, req *api.ControllerStatusRequest) (*api.ControllerStatusResponse, error) {
	ctx = withSandbox(ctx, req.GetSandboxID())
	st, err := s.ctrl.Status(ctx, req.GetSandboxID(), req.GetVerbose())
	if err != nil {
		return nil, toGRPC(ctx, "status", err)
	}
	resp := &api.ControllerStatusResponse{
		SandboxID: st.SandboxID,
		Pid:       st.Pid,
		State:     st.State,
		Info:      st.Info,
		CreatedAt: timestamppb.New(st.CreatedAt),
		Address:   st.Address,
		Version:   st.Version,
	}
	if !st.ExitedAt.IsZero() {
		resp.ExitedAt = timestamppb.New(st.ExitedAt)
	}
	return resp, nil
}

func (s *Service) Shutdown(ctx context.Context, req *api.ControllerShutdownRequest) (*api.ControllerShutdownResponse, error) {
	ctx = withSandbox(ctx, req.GetSandboxID())
	if err := s.ctrl.Shutdown(ctx, req.GetSandboxID()); err != nil {
		return nil, toGRPC(ctx, "shutdown", err)
	}
	return &api.ControllerShutdownResponse{}, nil
}

func (s *Service) Metrics(ctx context.Context, req *api.ControllerMetricsRequest) (*api.ControllerMetricsResponse, error) {
	ctx = withSandbox(ctx, req.GetSandboxID())
	m, err := s.ctrl.Metrics(ctx, req.GetSandboxID())
	if err != nil {
		return nil, toGRPC(ctx, "metrics", err)
	}
	return &api.ControllerMetricsResponse{Metrics: m}, nil
}

func (s *Service) Update(ctx context.Context, req *api.ControllerUpdateRequest) (*api.ControllerUpdateResponse, error) {
	ctx = withSandbox(ctx, req.GetSandboxID())
	if req.GetSandbox() == nil {
		return nil, toGRPC(ctx, "update", fmt.Errorf("%w: update without a sandbox", errdefs.ErrInvalidArgument))
	}
	if err := s.ctrl.Update(ctx, req.GetSandboxID(), fromProto(req.GetSandbox()), req.GetFields()...); err != nil {
		return nil, toGRPC(ctx, "update", err)
	}
	return &api.ControllerUpdateResponse{}, nil
}

// fromProto is sandbox.FromProto for any message from outside: that one
// dereferences the runtime, which a caller can leave out (and a nil
// sandbox is an empty one).
func fromProto(pb *types.Sandbox) sandbox.Sandbox {
	if pb == nil {
		return sandbox.Sandbox{}
	}
	if pb.GetRuntime() == nil {
		pb = proto.CloneOf(pb)
		pb.Runtime = &types.Sandbox_Runtime{}
	}
	return sandbox.FromProto(pb)
}

// toGRPC logs a failed call and converts its error to a gRPC status.
// Errors that carry no errdefs class are internal.
func toGRPC(ctx context.Context, method string, err error) error {
	l := log.G(ctx).WithField("error", logsafe.Error(err)).WithField("method", method)
	if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		// The caller gave up (a Wait it cancelled): no failure here.
		l.Debug("sandbox call ended by its caller")
	} else if errdefs.IsUnavailable(err) && errors.Is(err, errShuttingDown) {
		// Every pending Wait ends so on a graceful stop: containerd's
		// proxy calls it again on the next instance.
		l.Debug("sandbox call ended by the shutdown")
	} else if errdefs.IsNotFound(err) {
		// containerd asks for the status and metrics of sandboxes it has
		// just removed: routine, not worth an info line per pod.
		l.Debug("sandbox call refused")
	} else if errdefs.IsInvalidArgument(err) || errdefs.IsAlreadyExists(err) ||
		errdefs.IsFailedPrecondition(err) || errdefs.IsResourceExhausted(err) {
		l.Info("sandbox call refused")
	} else {
		l.Error("sandbox call failed")
	}
	return errgrpc.ToGRPC(err)
}
