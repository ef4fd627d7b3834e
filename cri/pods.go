package cri

import (
	"context"
	"encoding/json"
	"fmt"
	goruntime "runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/logsafe"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
)

// updatedResourcesType is the type URL of the extension containerd's CRI
// sets on UpdatePodSandboxResources; the controller decodes its value.
const updatedResourcesType = "io.containerd.cri.v1/UpdatedResources"

// podName is what the CRI requires to be unique among pods.
type podName struct {
	name, namespace, uid string
	attempt              uint32
}

// String is containerd's form of a pod name.
func (n podName) String() string {
	return fmt.Sprintf("%s_%s_%s_%d", n.name, n.namespace, n.uid, n.attempt)
}

func podNameOf(cfg *runtime.PodSandboxConfig) (podName, bool) {
	md := cfg.GetMetadata()
	if md == nil {
		return podName{}, false
	}
	return podName{md.GetName(), md.GetNamespace(), md.GetUid(), md.GetAttempt()}, true
}

type nameEntry struct {
	id      string
	pending bool // RunPodSandbox in progress
}

// reserveName reserves a pod name for id; done(true) keeps it, done(false)
// releases it.
func (s *Service) reserveName(key podName, id string) (done func(ok bool), err error) {
	s.namesMu.Lock()
	defer s.namesMu.Unlock()
	if e, ok := s.names[key]; ok {
		if e.pending {
			return nil, fmt.Errorf("pod name %q is being created as %s: %w", key, e.id, errdefs.ErrAlreadyExists)
		}
		if _, err := s.ctrl.Get(e.id); err == nil {
			return nil, fmt.Errorf("pod name %q is reserved for %s: %w", key, e.id, errdefs.ErrAlreadyExists)
		}
		// Removed without this service (through containerd): stale.
	}
	s.names[key] = nameEntry{id: id, pending: true}
	return func(ok bool) {
		s.namesMu.Lock()
		defer s.namesMu.Unlock()
		switch {
		case ok:
			s.names[key] = nameEntry{id: id}
		case s.names[key].id == id:
			delete(s.names, key)
		}
	}, nil
}

func (s *Service) releaseName(st *sandboxer.State) {
	key, ok := podNameOfState(st)
	if !ok {
		return
	}
	id := st.ID
	s.namesMu.Lock()
	if s.names[key].id == id {
		delete(s.names, key)
	}
	s.namesMu.Unlock()
}

// resolvePod finds a pod by ID or by a unique prefix of its ID.
func (s *Service) resolvePod(id string) (sandboxer.SandboxView, error) {
	if id == "" {
		return sandboxer.SandboxView{}, invalidf("pod sandbox id is empty")
	}
	v, err := s.ctrl.Get(id)
	if err == nil || !errdefs.IsNotFound(err) {
		return v, err
	}
	var found []sandboxer.SandboxView
	for _, v := range s.ctrl.List() {
		if strings.HasPrefix(v.State.ID, id) {
			found = append(found, v)
		}
	}
	switch len(found) {
	case 0:
		return sandboxer.SandboxView{}, fmt.Errorf("pod sandbox %s: %w", id, errdefs.ErrNotFound)
	case 1:
		return found[0], nil
	}
	return sandboxer.SandboxView{}, invalidf("pod sandbox id prefix %s is ambiguous: %d pods match", id, len(found))
}

func podState(st *sandboxer.State) runtime.PodSandboxState {
	if st.Phase == sandboxer.PhaseReady {
		return runtime.PodSandboxState_SANDBOX_READY
	}
	return runtime.PodSandboxState_SANDBOX_NOTREADY
}

// podMetadata is the pod's metadata; a sandbox created without a CRI
// config is named by its ID.
func podMetadata(id string, cfg *runtime.PodSandboxConfig) *runtime.PodSandboxMetadata {
	if md := cfg.GetMetadata(); md != nil {
		return md
	}
	return &runtime.PodSandboxMetadata{Name: id, Uid: id}
}

func checkHandler(h string) error {
	if h != "" && h != RuntimeHandler {
		return fmt.Errorf("runtime handler %q: this runtime serves only %q (or the default, \"\"): %w", h, RuntimeHandler, errdefs.ErrNotFound)
	}
	return nil
}

// RunPodSandbox creates and starts a pod through the controller, with the
// same extraction and persistence as a pod containerd creates.
func (s *Service) RunPodSandbox(ctx context.Context, req *runtime.RunPodSandboxRequest) (*runtime.RunPodSandboxResponse, error) {
	cfg := req.GetConfig()
	if err := checkHandler(req.GetRuntimeHandler()); err != nil {
		return nil, toGRPC(ctx, "RunPodSandbox", err)
	}
	key, ok := podNameOf(cfg)
	if !ok || key.name == "" {
		return nil, toGRPC(ctx, "RunPodSandbox", invalidf("pod sandbox config must include metadata with a name"))
	}
	id := newID()
	ctx = withSandbox(ctx, id)
	done, err := s.reserveName(key, id)
	if err != nil {
		return nil, toGRPC(ctx, "RunPodSandbox", err)
	}
	created := false
	defer func() { done(created) }()
	if err := s.ctrl.CreatePod(ctx, id, cfg); err != nil {
		return nil, toGRPC(ctx, "RunPodSandbox", err)
	}
	if _, err := s.ctrl.Start(ctx, id); err != nil {
		// The controller removed it already unless that failed.
		if serr := s.ctrl.Shutdown(context.WithoutCancel(ctx), id); serr != nil && !errdefs.IsNotFound(serr) {
			log.G(ctx).WithError(serr).Warn("remove pod that did not start")
		}
		return nil, toGRPC(ctx, "RunPodSandbox", err)
	}
	created = true
	// The controller logged its create and start.
	log.G(ctx).WithField("name", logsafe.String(key.String())).Debug("pod sandbox running (direct CRI)")
	return &runtime.RunPodSandboxResponse{PodSandboxId: id}, nil
}

// StopPodSandbox stops a pod; its containers are killed with it (the
// controller ends their tasks). Stopping a stopped pod succeeds; an
// unknown ID is NotFound, as containerd answers.
func (s *Service) StopPodSandbox(ctx context.Context, req *runtime.StopPodSandboxRequest) (*runtime.StopPodSandboxResponse, error) {
	v, err := s.resolvePod(req.GetPodSandboxId())
	if errdefs.IsNotFound(err) {
		// CRI: "must not return an error if all relevant resources have
		// already been reclaimed" (critest checks it).
		return &runtime.StopPodSandboxResponse{}, nil
	}
	if err != nil {
		return nil, toGRPC(ctx, "StopPodSandbox", err)
	}
	ctx = withSandbox(ctx, v.State.ID)
	if err := s.ctrl.Stop(ctx, v.State.ID); err != nil && !errdefs.IsNotFound(err) {
		return nil, toGRPC(ctx, "StopPodSandbox", err)
	}
	return &runtime.StopPodSandboxResponse{}, nil
}

// RemovePodSandbox stops a pod if needed and removes it with its
// containers and directory. Removing an unknown pod succeeds (CRI).
func (s *Service) RemovePodSandbox(ctx context.Context, req *runtime.RemovePodSandboxRequest) (*runtime.RemovePodSandboxResponse, error) {
	v, err := s.resolvePod(req.GetPodSandboxId())
	if errdefs.IsNotFound(err) {
		return &runtime.RemovePodSandboxResponse{}, nil
	}
	if err != nil {
		return nil, toGRPC(ctx, "RemovePodSandbox", err)
	}
	id := v.State.ID
	ctx = withSandbox(ctx, id)
	if err := s.ctrl.Shutdown(ctx, id); err != nil && !errdefs.IsNotFound(err) {
		return nil, toGRPC(ctx, "RemovePodSandbox", err)
	}
	s.releaseName(v.State)
	s.podItems.forget(id)
	for cid := range v.State.Containers {
		s.metas.forget(cid)
		s.ctrItems.forget(cid)
	}
	return &runtime.RemovePodSandboxResponse{}, nil
}

// PodSandboxStatus reports a pod; verbose adds the controller's verbose
// status, the keys containerd's path shows too ("info", "resourceInfo",
// "sandboxer").
func (s *Service) PodSandboxStatus(ctx context.Context, req *runtime.PodSandboxStatusRequest) (*runtime.PodSandboxStatusResponse, error) {
	v, err := s.resolvePod(req.GetPodSandboxId())
	if err != nil {
		return nil, toGRPC(ctx, "PodSandboxStatus", err)
	}
	st := v.State
	ctx = withSandbox(ctx, st.ID)
	cfg := decodePodConfig(st)
	nsOpts := cfg.GetLinux().GetSecurityContext().GetNamespaceOptions()
	if nsOpts == nil {
		nsOpts = &runtime.NamespaceOption{}
	}
	resp := &runtime.PodSandboxStatusResponse{
		Status: &runtime.PodSandboxStatus{
			Id:        st.ID,
			Metadata:  podMetadata(st.ID, cfg),
			State:     podState(st),
			CreatedAt: st.CreatedAt.UnixNano(),
			// No pod network: a host-network pod has no IP of its own
			// (the kubelet uses the node's), and others get none.
			Network:        &runtime.PodSandboxNetworkStatus{},
			Linux:          &runtime.LinuxPodSandboxStatus{Namespaces: &runtime.Namespace{Options: nsOpts}},
			Labels:         cfg.GetLabels(),
			Annotations:    cfg.GetAnnotations(),
			RuntimeHandler: RuntimeHandler,
		},
		Timestamp: time.Now().UnixNano(),
	}
	if req.GetVerbose() {
		cs, err := s.ctrl.Status(ctx, st.ID, true)
		if err != nil {
			return nil, toGRPC(ctx, "PodSandboxStatus", err)
		}
		resp.Info = cs.Info
	}
	return resp, nil
}

// listPods returns the pods the filter selects, encoded (list.go).
func (s *Service) listPods(f *runtime.PodSandboxFilter) *encodedList {
	states := s.ctrl.States()
	selected := states[:0:0]
	for _, st := range states {
		if !matchID(f.GetId(), st.ID) {
			continue
		}
		if f.GetState() != nil && f.GetState().GetState() != podState(st) {
			continue
		}
		selected = append(selected, st)
	}
	if len(selected) >= parallelEncode {
		// The first list after a start encodes every pod: on every core.
		var next atomic.Int64
		var wg sync.WaitGroup
		for range goruntime.GOMAXPROCS(0) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := next.Add(1) - 1; i < int64(len(selected)); i = next.Add(1) - 1 {
					s.podItem(selected[i])
				}
			}()
		}
		wg.Wait()
	}
	list := &encodedList{items: make([][]byte, 0, len(selected))}
	for _, st := range selected {
		wire := s.podItem(st)
		if sel := f.GetLabelSelector(); len(sel) > 0 && !matchLabels(sel, labelsOf(wire, &runtime.PodSandbox{})) {
			continue
		}
		list.add(wire)
	}
	if f == nil {
		s.prunePods(len(states))
	}
	return list
}

// parallelEncode is how many pods a list must show to encode them on
// every core.
var parallelEncode = 1000

// podItem is a pod as lists show it, encoded.
func (s *Service) podItem(st *sandboxer.State) []byte {
	state := podState(st)
	return s.podItems.get(st.ID, st.CreatedAt, int32(state), func() proto.Message {
		cfg := decodeListed(st)
		return &runtime.PodSandbox{
			Id:             st.ID,
			Metadata:       podMetadata(st.ID, cfg),
			State:          state,
			CreatedAt:      st.CreatedAt.UnixNano(),
			Labels:         cfg.GetLabels(),
			Annotations:    cfg.GetAnnotations(),
			RuntimeHandler: RuntimeHandler,
		}
	})
}

// prunePods drops the items of pods removed behind the service's back
// (through containerd).
func (s *Service) prunePods(live int) {
	s.podItems.prune(live, func(id string) bool {
		_, err := s.ctrl.Get(id)
		return err == nil
	})
}

// ListPodSandbox lists every pod of the sandboxer, including the ones
// created through containerd (same store), filtered by ID prefix, state
// and labels.
func (s *Service) ListPodSandbox(_ context.Context, req *runtime.ListPodSandboxRequest) (*runtime.ListPodSandboxResponse, error) {
	resp := &runtime.ListPodSandboxResponse{}
	list := s.listPods(req.GetFilter())
	list.setItems(resp, 0, len(list.items))
	s.mem.after(list.size)
	return resp, nil
}

func (s *Service) StreamPodSandboxes(req *runtime.StreamPodSandboxesRequest, stream grpc.ServerStreamingServer[runtime.StreamPodSandboxesResponse]) error {
	return s.listPods(req.GetFilter()).chunks(
		func() proto.Message { return &runtime.StreamPodSandboxesResponse{} },
		func(m proto.Message) error { return stream.Send(m.(*runtime.StreamPodSandboxesResponse)) })
}

// UpdatePodSandboxResources is an in-place pod resize: it goes through the
// controller's Update with the "updated-resources" extension, as
// containerd's CRI sends it, so the new linux.resources and overhead are
// decoded, applied and persisted by the same code.
func (s *Service) UpdatePodSandboxResources(ctx context.Context, req *runtime.UpdatePodSandboxResourcesRequest) (*runtime.UpdatePodSandboxResourcesResponse, error) {
	v, err := s.resolvePod(req.GetPodSandboxId())
	if err != nil {
		return nil, toGRPC(ctx, "UpdatePodSandboxResources", err)
	}
	id := v.State.ID
	ctx = withSandbox(ctx, id)
	ext, err := updatedResources(req.GetOverhead(), req.GetResources())
	if err != nil {
		return nil, toGRPC(ctx, "UpdatePodSandboxResources", err)
	}
	info := sandbox.Sandbox{ID: id, Extensions: map[string]typeurl.Any{sandboxer.UpdatedResourcesKey: ext}}
	if err := s.ctrl.Update(ctx, id, info, "extensions."+sandboxer.UpdatedResourcesKey); err != nil {
		return nil, toGRPC(ctx, "UpdatePodSandboxResources", err)
	}
	return &runtime.UpdatePodSandboxResourcesResponse{}, nil
}

// updatedResources encodes the extension as containerd's CRI does
// (podsandbox.UpdatedResources, JSON).
func updatedResources(overhead, resources *runtime.LinuxContainerResources) (*anypb.Any, error) {
	data, err := json.Marshal(struct {
		Overhead  *runtime.LinuxContainerResources
		Resources *runtime.LinuxContainerResources
	}{overhead, resources})
	if err != nil {
		return nil, err
	}
	return &anypb.Any{TypeUrl: updatedResourcesType, Value: data}, nil
}
