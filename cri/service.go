// Package cri serves the Kubernetes CRI (k8s.io/cri-api runtime.v1
// RuntimeService and ImageService) directly on the sandboxer's socket, so
// that crictl and the kubelet can drive slot pods without containerd.
//
// It is an adapter, like the sandbox controller's gRPC service: pods are
// the Controller's sandboxes (created with the same PodSandboxConfig
// extraction and persistence as through containerd), containers are the
// simulated Tasks, whose records carry the CRI metadata in TaskRecord.Meta.
// Nothing of a pod or a container is stored twice: the only state of its
// own is the image list (<dir>/.images.json) and, in memory, an index of
// pod names and the encoded items of lists, both derived from the
// controller's records.
package cri

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"google.golang.org/grpc"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/logsafe"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
)

const (
	// RuntimeName is what Version reports.
	RuntimeName = "resource-slot-sandboxer"
	// RuntimeHandler is the runtime handler of the pods; "" (the default
	// handler) is accepted as the same.
	RuntimeHandler = "resource-slot"
	// Namespace is the task namespace of the containers created through
	// this service; containerd's are in its own ("k8s.io").
	Namespace = "resource-slot-cri"
	// ImagesFile, in the state directory, holds the image list. Sandbox
	// recovery ignores files whose name starts with ".".
	ImagesFile = ".images.json"

	// criAPIVersion is the CRI version served.
	criAPIVersion = "v1"
	// kubeAPIVersion is VersionResponse.version, which the kubelet only
	// prints; CRI implementations report "0.1.0".
	kubeAPIVersion = "0.1.0"
	// streamChunk is how many items a streaming list sends per message.
	streamChunk = 500
	// lockStripes serialize CreateContainer per pod (name uniqueness).
	lockStripes = 64
)

// Options configure the service.
type Options struct {
	Controller *sandboxer.Controller
	Tasks      *sandboxer.Tasks
	// Dir is the state directory; the image list is Dir/.images.json.
	Dir string
	// NoSync makes the image list's writes atomic but not durable, as
	// the sandboxes' are with fsync = false.
	NoSync bool
	// Version is the runtime version reported; default: the module's.
	Version string
}

// Service implements the CRI RuntimeService; Images the ImageService.
type Service struct {
	runtime.UnimplementedRuntimeServiceServer
	ctrl    *sandboxer.Controller
	tasks   *sandboxer.Tasks
	images  *ImageService
	dir     string
	version string

	// names maps pod names (name, namespace, uid, attempt) to sandbox
	// IDs, for the uniqueness the CRI requires of RunPodSandbox. It is an
	// index of the controller's pods, checked against it on conflict.
	namesMu sync.Mutex
	names   map[podName]nameEntry

	// Container metadata, decoded, which never changes once created;
	// and the pods and containers as lists send them, encoded (list.go).
	metas    decodeCache[containerMeta]
	podItems itemCache
	ctrItems itemCache
	// mem gives back the memory of large lists (memory.go).
	mem releaser

	podLocks [lockStripes]sync.Mutex
}

var (
	_ runtime.RuntimeServiceServer = (*Service)(nil)
	_ runtime.ImageServiceServer   = (*ImageService)(nil)
)

// New builds the service over a controller and its tasks (recovered) and
// loads the image list.
func New(ctx context.Context, opts Options) (*Service, error) {
	if opts.Controller == nil || opts.Tasks == nil {
		return nil, fmt.Errorf("cri: a controller and its tasks are required")
	}
	images, err := NewImageService(ctx, opts.Dir, !opts.NoSync)
	if err != nil {
		return nil, err
	}
	s := &Service{
		ctrl:    opts.Controller,
		tasks:   opts.Tasks,
		images:  images,
		dir:     opts.Dir,
		version: opts.Version,
		names:   map[podName]nameEntry{},
	}
	if s.version == "" {
		s.version = moduleVersion()
	}
	for _, st := range s.ctrl.States() {
		if key, ok := podNameOfState(st); ok {
			s.names[key] = nameEntry{id: st.ID}
		}
	}
	return s, nil
}

// Images is the image service.
func (s *Service) Images() *ImageService { return s.images }

// Register registers the runtime and image services on a gRPC server.
func (s *Service) Register(srv *grpc.Server) {
	runtime.RegisterRuntimeServiceServer(srv, s)
	runtime.RegisterImageServiceServer(srv, s.images)
}

func moduleVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}

// newID returns 32 random bytes in hex, as containerd's IDs.
func newID() string {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("crypto/rand: %v", err))
	}
	return hex.EncodeToString(b[:])
}

func withSandbox(ctx context.Context, id string) context.Context {
	return log.WithLogger(ctx, log.G(ctx).WithField("sandbox", logsafe.String(id)))
}

func withContainer(ctx context.Context, id, sandboxID string) context.Context {
	return log.WithLogger(ctx, log.G(ctx).WithFields(log.Fields{"container": logsafe.String(id), "sandbox": logsafe.String(sandboxID)}))
}

// toGRPC logs a failed call and converts its error to a gRPC status; an
// error without an errdefs class is Unknown, and logged as a failure.
func toGRPC(ctx context.Context, method string, err error) error {
	l := log.G(ctx).WithField("error", logsafe.Error(err)).WithField("method", method)
	switch {
	case ctx.Err() != nil && errors.Is(err, ctx.Err()):
		// The caller gave up: no failure here.
		l.Debug("cri call ended by its caller")
	case errdefs.IsNotFound(err), errdefs.IsInvalidArgument(err), errdefs.IsAlreadyExists(err),
		errdefs.IsFailedPrecondition(err), errdefs.IsResourceExhausted(err), errdefs.IsNotImplemented(err):
		l.Debug("cri call refused")
	default:
		l.Error("cri call failed")
	}
	return errgrpc.ToGRPC(err)
}

func invalidf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errdefs.ErrInvalidArgument, fmt.Sprintf(format, args...))
}

// stripe returns the lock that serializes container creation in a pod.
func (s *Service) stripe(podID string) *sync.Mutex {
	h := fnv.New32a()
	h.Write([]byte(podID))
	return &s.podLocks[h.Sum32()%lockStripes]
}

// decodeCache keeps a JSON document decoded per ID. stamp tells apart two
// objects that had the same ID (a removed one and a new one).
type decodeCache[T any] struct{ idCache[decoded[T]] }

type decoded[T any] struct {
	stamp time.Time
	v     *T
}

// get returns raw decoded, from the cache when it holds it for stamp. A
// document that does not decode is logged and nil.
func (c *decodeCache[T]) get(id string, stamp time.Time, raw json.RawMessage) *T {
	if len(raw) == 0 {
		return nil
	}
	if e, ok := c.load(id); ok && e.stamp.Equal(stamp) {
		return e.v
	}
	v := new(T)
	if err := json.Unmarshal(raw, v); err != nil {
		log.L.WithError(err).WithField("id", logsafe.String(id)).Warn("cri: undecodable record metadata; showing it without")
		v = nil
	}
	c.store(id, decoded[T]{stamp: stamp, v: v})
	return v
}

func matchLabels(selector, labels map[string]string) bool {
	for k, v := range selector {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// matchID is how filters match IDs: a prefix, as containerd resolves
// truncated IDs.
func matchID(filter, id string) bool {
	return filter == "" || strings.HasPrefix(id, filter)
}

// sendChunks sends items in messages of at most streamChunk items; none
// when there are none.
func sendChunks[T any](items []T, send func([]T) error) error {
	for len(items) > 0 {
		n := min(len(items), streamChunk)
		if err := send(items[:n]); err != nil {
			return err
		}
		items = items[n:]
	}
	return nil
}

// Version reports the runtime's name and versions.
func (s *Service) Version(context.Context, *runtime.VersionRequest) (*runtime.VersionResponse, error) {
	return &runtime.VersionResponse{
		Version:           kubeAPIVersion,
		RuntimeName:       RuntimeName,
		RuntimeVersion:    s.version,
		RuntimeApiVersion: criAPIVersion,
	}, nil
}

// Status reports the runtime ready. The network is ready too: pods use
// the host's network and get no namespace or IP of their own, so there is
// nothing to wait for; the condition's message says so.
func (s *Service) Status(_ context.Context, req *runtime.StatusRequest) (*runtime.StatusResponse, error) {
	resp := &runtime.StatusResponse{
		Status: &runtime.RuntimeStatus{Conditions: []*runtime.RuntimeCondition{
			{Type: runtime.RuntimeReady, Status: true},
			{Type: runtime.NetworkReady, Status: true, Reason: "HostNetworkOnly",
				Message: "resource-slot pods get no network namespace or IP: they use the host network"},
		}},
		RuntimeHandlers: []*runtime.RuntimeHandler{
			{Name: "", Features: &runtime.RuntimeHandlerFeatures{}},
			{Name: RuntimeHandler, Features: &runtime.RuntimeHandlerFeatures{}},
		},
		Features: &runtime.RuntimeFeatures{},
	}
	if req.GetVerbose() {
		cfg := map[string]any{
			"runtimeName":     RuntimeName,
			"runtimeVersion":  s.version,
			"runtimeHandlers": []string{"", RuntimeHandler},
			"mode":            s.ctrl.Mode(),
			"stateDir":        s.dir,
			"imagesFile":      s.images.path,
			"cgroupDriver":    "cgroupfs",
			"network":         "host network only; no CNI, no pod IPs",
			"containers":      "simulated: no process runs; exec, attach and port-forward are unimplemented",
		}
		data, err := json.Marshal(cfg)
		if err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
		resp.Info = map[string]string{"config": string(data)}
	}
	return resp, nil
}

// RuntimeConfig reports the cgroup driver: cgroupfs (no systemd units are
// created for pods).
func (s *Service) RuntimeConfig(context.Context, *runtime.RuntimeConfigRequest) (*runtime.RuntimeConfigResponse, error) {
	return &runtime.RuntimeConfigResponse{Linux: &runtime.LinuxRuntimeConfiguration{CgroupDriver: runtime.CgroupDriver_CGROUPFS}}, nil
}

// UpdateRuntimeConfig accepts the kubelet's pod CIDR; there is no network
// to configure with it.
func (s *Service) UpdateRuntimeConfig(context.Context, *runtime.UpdateRuntimeConfigRequest) (*runtime.UpdateRuntimeConfigResponse, error) {
	return &runtime.UpdateRuntimeConfigResponse{}, nil
}

func unimplemented(what string) error {
	return errgrpc.ToGRPCf(errdefs.ErrNotImplemented, "%s: resource-slot containers are simulated and run no process", what)
}

func (s *Service) ExecSync(context.Context, *runtime.ExecSyncRequest) (*runtime.ExecSyncResponse, error) {
	return nil, unimplemented("exec")
}

func (s *Service) Exec(context.Context, *runtime.ExecRequest) (*runtime.ExecResponse, error) {
	return nil, unimplemented("exec")
}

func (s *Service) Attach(context.Context, *runtime.AttachRequest) (*runtime.AttachResponse, error) {
	return nil, unimplemented("attach")
}

func (s *Service) PortForward(context.Context, *runtime.PortForwardRequest) (*runtime.PortForwardResponse, error) {
	return nil, errgrpc.ToGRPCf(errdefs.ErrNotImplemented, "port-forward: resource-slot pods have no network namespace to forward into")
}

func (s *Service) CheckpointContainer(context.Context, *runtime.CheckpointContainerRequest) (*runtime.CheckpointContainerResponse, error) {
	return nil, unimplemented("checkpoint")
}

func (s *Service) CheckpointPod(context.Context, *runtime.CheckpointPodRequest) (*runtime.CheckpointPodResponse, error) {
	return nil, unimplemented("checkpoint")
}

func (s *Service) RestorePod(context.Context, *runtime.RestorePodRequest) (*runtime.RestorePodResponse, error) {
	return nil, unimplemented("restore")
}

func (s *Service) GetContainerEvents(*runtime.GetEventsRequest, grpc.ServerStreamingServer[runtime.ContainerEventResponse]) error {
	return errgrpc.ToGRPCf(errdefs.ErrNotImplemented, "container events are not implemented: use ListContainers (generic PLEG)")
}

func (s *Service) ListMetricDescriptors(context.Context, *runtime.ListMetricDescriptorsRequest) (*runtime.ListMetricDescriptorsResponse, error) {
	return nil, errgrpc.ToGRPCf(errdefs.ErrNotImplemented, "pod sandbox metrics are not implemented: use ListPodSandboxStats")
}

func (s *Service) ListPodSandboxMetrics(context.Context, *runtime.ListPodSandboxMetricsRequest) (*runtime.ListPodSandboxMetricsResponse, error) {
	return nil, errgrpc.ToGRPCf(errdefs.ErrNotImplemented, "pod sandbox metrics are not implemented: use ListPodSandboxStats")
}

func (s *Service) StreamPodSandboxMetrics(*runtime.StreamPodSandboxMetricsRequest, grpc.ServerStreamingServer[runtime.StreamPodSandboxMetricsResponse]) error {
	return errgrpc.ToGRPCf(errdefs.ErrNotImplemented, "pod sandbox metrics are not implemented: use ListPodSandboxStats")
}
