package cri

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
)

// containerMeta is the CRI side of a container created through this
// service, kept as TaskRecord.Meta: what ContainerStatus reports and the
// task record does not hold.
type containerMeta struct {
	Name               string            `json:"name"`
	Attempt            uint32            `json:"attempt,omitempty"`
	Image              string            `json:"image,omitempty"`
	UserSpecifiedImage string            `json:"user_specified_image,omitempty"`
	ImageID            string            `json:"image_id,omitempty"`
	ImageRef           string            `json:"image_ref,omitempty"`
	Labels             map[string]string `json:"labels,omitempty"`
	Annotations        map[string]string `json:"annotations,omitempty"`
	CreatedAt          time.Time         `json:"created_at"`
	Command            []string          `json:"command,omitempty"`
	Args               []string          `json:"args,omitempty"`
	WorkingDir         string            `json:"working_dir,omitempty"`
	// LogPath is config.log_path, relative to the pod's log directory;
	// the task record holds the file's full path.
	LogPath string           `json:"log_path,omitempty"`
	Mounts  []*runtime.Mount `json:"mounts,omitempty"`
	Tty     bool             `json:"tty,omitempty"`
	Stdin   bool             `json:"stdin,omitempty"`
	// StopSignal is config.stop_signal; 0 is the default, SIGTERM.
	StopSignal runtime.Signal `json:"stop_signal,omitempty"`
}

// stopSignal is the signal StopContainer sends first.
func (m *containerMeta) stopSignal() (runtime.Signal, syscall.Signal) {
	if m == nil || m.StopSignal == runtime.Signal_SIGNAL_RUNTIME_DEFAULT {
		return runtime.Signal_SIGNAL_SIGTERM, syscall.SIGTERM
	}
	if n := unix.SignalNum(strings.TrimPrefix(m.StopSignal.String(), "SIGNAL_")); n != 0 {
		return m.StopSignal, n
	}
	return runtime.Signal_SIGNAL_SIGTERM, syscall.SIGTERM
}

// ctr is one container as the service sees it.
type ctr struct {
	id        string
	sandboxID string
	rec       *sandboxer.TaskRecord
	c         *sandboxer.Container
	meta      *containerMeta // nil: created through containerd
}

func (c ctr) key() sandboxer.TaskKey { return sandboxer.TaskKey{Namespace: c.rec.Namespace, ID: c.id} }

func (s *Service) meta(id string, rec *sandboxer.TaskRecord) *containerMeta {
	return s.metas.get(id, rec.CreatedAt, rec.Meta)
}

// containers returns the containers (with a task) of a pod.
func (s *Service) containers(st *sandboxer.State) []ctr {
	out := make([]ctr, 0, len(st.Containers))
	for id, c := range st.Containers {
		if c.Task == nil {
			continue
		}
		out = append(out, ctr{id: id, sandboxID: st.ID, rec: c.Task, c: c, meta: s.meta(id, c.Task)})
	}
	return out
}

// resolveContainer finds a container by ID or unique ID prefix: this
// service's first, then any (containerd's, in its namespace).
func (s *Service) resolveContainer(id string) (ctr, error) {
	if id == "" {
		return ctr{}, invalidf("container id is empty")
	}
	rec, c, sandboxID, err := s.tasks.Get(sandboxer.TaskKey{Namespace: Namespace, ID: id})
	if err == nil {
		return ctr{id: id, sandboxID: sandboxID, rec: rec, c: c, meta: s.meta(id, rec)}, nil
	}
	if !errdefs.IsNotFound(err) {
		return ctr{}, err
	}
	var found []ctr
	for _, v := range s.ctrl.List() {
		for cid, c := range v.State.Containers {
			if c.Task == nil || !strings.HasPrefix(cid, id) {
				continue
			}
			x := ctr{id: cid, sandboxID: v.State.ID, rec: c.Task, c: c, meta: s.meta(cid, c.Task)}
			if cid == id {
				return x, nil
			}
			found = append(found, x)
		}
	}
	switch len(found) {
	case 0:
		return ctr{}, fmt.Errorf("container %s: %w", id, errdefs.ErrNotFound)
	case 1:
		return found[0], nil
	}
	return ctr{}, invalidf("container id prefix %s is ambiguous: %d containers match", id, len(found))
}

// annotationContainerName is the OCI annotation in which containerd's CRI
// names a container (internal/cri/annotations.ContainerName).
const annotationContainerName = "io.kubernetes.cri.container-name"

// CreateContainer creates a simulated container in a ready pod: its
// resources come from config.linux.resources, its simulation from its
// annotations, and it writes its output to <log_directory>/<log_path>.
func (s *Service) CreateContainer(ctx context.Context, req *runtime.CreateContainerRequest) (*runtime.CreateContainerResponse, error) {
	cfg := req.GetConfig()
	md := cfg.GetMetadata()
	if md == nil || md.GetName() == "" {
		return nil, toGRPC(ctx, "CreateContainer", invalidf("container config must include metadata with a name"))
	}
	v, err := s.resolvePod(req.GetPodSandboxId())
	if err != nil {
		return nil, toGRPC(ctx, "CreateContainer", err)
	}
	podID := v.State.ID
	id := newID()
	ctx = withContainer(ctx, id, podID)
	res, err := resourceinfo.FromLinuxResources("linux.resources", cfg.GetLinux().GetResources())
	if err != nil {
		return nil, toGRPC(ctx, "CreateContainer", err)
	}
	res.Name = md.GetName()
	var logPath string
	if dir := decodePodConfig(v.State).GetLogDirectory(); dir != "" && cfg.GetLogPath() != "" {
		logPath = filepath.Join(dir, cfg.GetLogPath())
	}
	img := s.images.forContainer(cfg.GetImage())
	meta := containerMeta{
		Name:               md.GetName(),
		Attempt:            md.GetAttempt(),
		Image:              img.display,
		UserSpecifiedImage: cfg.GetImage().GetUserSpecifiedImage(),
		ImageID:            img.id,
		ImageRef:           img.ref,
		Labels:             cfg.GetLabels(),
		Annotations:        cfg.GetAnnotations(),
		CreatedAt:          time.Now().UTC(),
		Command:            cfg.GetCommand(),
		Args:               cfg.GetArgs(),
		WorkingDir:         cfg.GetWorkingDir(),
		LogPath:            cfg.GetLogPath(),
		Mounts:             cfg.GetMounts(),
		Tty:                cfg.GetTty(),
		Stdin:              cfg.GetStdin(),
		StopSignal:         cfg.GetStopSignal(),
	}
	data, err := json.Marshal(meta)
	if err != nil {
		return nil, toGRPC(ctx, "CreateContainer", err)
	}

	lock := s.stripe(podID)
	lock.Lock()
	defer lock.Unlock()
	// Names are unique in a pod (name and attempt), as in containerd.
	cur, err := s.ctrl.Get(podID)
	if err != nil {
		return nil, toGRPC(ctx, "CreateContainer", err)
	}
	for _, c := range s.containers(cur.State) {
		if c.meta != nil && c.meta.Name == meta.Name && c.meta.Attempt == meta.Attempt {
			return nil, toGRPC(ctx, "CreateContainer", fmt.Errorf("container name %q (attempt %d) is already used by %s in pod %s: %w",
				meta.Name, meta.Attempt, c.id, podID, errdefs.ErrAlreadyExists))
		}
	}
	// No bundle: the spec carries what the backend reads of a container
	// created through containerd, its annotations and name.
	spec := &specs.Spec{Annotations: map[string]string{annotationContainerName: md.GetName()}}
	for k, v := range cfg.GetAnnotations() {
		spec.Annotations[k] = v
	}
	if _, err := s.tasks.Create(ctx, sandboxer.TaskSpec{
		Key:       sandboxer.TaskKey{Namespace: Namespace, ID: id},
		SandboxID: podID,
		Spec:      spec,
		Resources: res,
		IO:        backend.IO{LogPath: logPath},
		Meta:      data,
	}); err != nil {
		return nil, toGRPC(ctx, "CreateContainer", err)
	}
	return &runtime.CreateContainerResponse{ContainerId: id}, nil
}

// StartContainer starts a created container.
func (s *Service) StartContainer(ctx context.Context, req *runtime.StartContainerRequest) (*runtime.StartContainerResponse, error) {
	c, err := s.resolveContainer(req.GetContainerId())
	if err != nil {
		return nil, toGRPC(ctx, "StartContainer", err)
	}
	ctx = withContainer(ctx, c.id, c.sandboxID)
	if _, err := s.tasks.Start(ctx, c.key(), ""); err != nil {
		return nil, toGRPC(ctx, "StartContainer", err)
	}
	return &runtime.StartContainerResponse{}, nil
}

// StopContainer sends the stop signal (config.stop_signal, by default
// SIGTERM) and, if the container still runs after the timeout, SIGKILL;
// with no timeout, SIGKILL at once. A simulated process ends on a signal
// whose default action ends a process, SIGTERM's (exit status 143; 137
// for SIGKILL), and ignores the others.
// Stopping a container that is not running succeeds.
func (s *Service) StopContainer(ctx context.Context, req *runtime.StopContainerRequest) (*runtime.StopContainerResponse, error) {
	c, err := s.resolveContainer(req.GetContainerId())
	if errdefs.IsNotFound(err) {
		// CRI: stopping what is gone is not an error (critest checks it).
		return &runtime.StopContainerResponse{}, nil
	}
	if err != nil {
		return nil, toGRPC(ctx, "StopContainer", err)
	}
	ctx = withContainer(ctx, c.id, c.sandboxID)
	if err := s.stop(ctx, c, Seconds(req.GetTimeout())); err != nil {
		return nil, toGRPC(ctx, "StopContainer", err)
	}
	return &runtime.StopContainerResponse{}, nil
}

// Seconds is a timeout in seconds from outside as a duration: none for
// one not above 0, and for one beyond what a Duration holds (292 years)
// the longest it holds, rather than one that overflows into a negative
// duration (which would make StopContainer send SIGKILL at once).
func Seconds(secs int64) time.Duration {
	switch {
	case secs <= 0:
		return 0
	case secs > int64(math.MaxInt64/time.Second):
		return math.MaxInt64
	}
	return time.Duration(secs) * time.Second
}

func (s *Service) stop(ctx context.Context, c ctr, timeout time.Duration) error {
	if st := c.rec.Status; st != sandboxer.TaskRunning && st != sandboxer.TaskPaused {
		return nil
	}
	k := c.key()
	if timeout > 0 {
		_, sig := c.meta.stopSignal()
		if err := s.tasks.Kill(ctx, k, "", sig, false); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		wctx, cancel := context.WithTimeout(ctx, timeout)
		_, err := s.tasks.Wait(wctx, k, "")
		cancel()
		if err == nil || errdefs.IsNotFound(err) {
			return nil
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		log.G(ctx).WithFields(log.Fields{"timeout": timeout, "signal": sig}).Info("container did not stop; killing it")
	}
	if err := s.tasks.Kill(ctx, k, "", syscall.SIGKILL, false); err != nil && !errdefs.IsNotFound(err) {
		return err
	}
	return nil
}

// RemoveContainer kills the container if it runs and removes it; its
// resources leave the pod's totals. Removing an unknown container
// succeeds (CRI).
func (s *Service) RemoveContainer(ctx context.Context, req *runtime.RemoveContainerRequest) (*runtime.RemoveContainerResponse, error) {
	c, err := s.resolveContainer(req.GetContainerId())
	if errdefs.IsNotFound(err) {
		return &runtime.RemoveContainerResponse{}, nil
	}
	if err != nil {
		return nil, toGRPC(ctx, "RemoveContainer", err)
	}
	ctx = withContainer(ctx, c.id, c.sandboxID)
	if err := s.stop(ctx, c, 0); err != nil {
		return nil, toGRPC(ctx, "RemoveContainer", err)
	}
	if _, err := s.tasks.Delete(ctx, c.key(), ""); err != nil && !errdefs.IsNotFound(err) {
		return nil, toGRPC(ctx, "RemoveContainer", err)
	}
	s.metas.forget(c.id)
	s.ctrItems.forget(c.id)
	return &runtime.RemoveContainerResponse{}, nil
}

func containerState(status string) runtime.ContainerState {
	switch status {
	case sandboxer.TaskCreated:
		return runtime.ContainerState_CONTAINER_CREATED
	case sandboxer.TaskRunning, sandboxer.TaskPaused:
		return runtime.ContainerState_CONTAINER_RUNNING
	case sandboxer.TaskStopped:
		return runtime.ContainerState_CONTAINER_EXITED
	}
	return runtime.ContainerState_CONTAINER_UNKNOWN
}

// metadata of a container; one created through containerd (no CRI
// metadata here) is named by its ID.
func (c ctr) metadata() *runtime.ContainerMetadata {
	if c.meta == nil {
		return &runtime.ContainerMetadata{Name: c.id}
	}
	return &runtime.ContainerMetadata{Name: c.meta.Name, Attempt: c.meta.Attempt}
}

func (c ctr) image() (*runtime.ImageSpec, string, string) {
	if c.meta == nil {
		return &runtime.ImageSpec{}, "", ""
	}
	return &runtime.ImageSpec{Image: c.meta.Image, UserSpecifiedImage: c.meta.UserSpecifiedImage}, c.meta.ImageRef, c.meta.ImageID
}

func (c ctr) labels() map[string]string {
	if c.meta == nil {
		return nil
	}
	return c.meta.Labels
}

func (c ctr) annotations() map[string]string {
	if c.meta == nil {
		return nil
	}
	return c.meta.Annotations
}

func (c ctr) toCRI() *runtime.Container {
	img, ref, imgID := c.image()
	return &runtime.Container{
		Id:           c.id,
		PodSandboxId: c.sandboxID,
		Metadata:     c.metadata(),
		Image:        img,
		ImageRef:     ref,
		ImageId:      imgID,
		State:        containerState(c.rec.Status),
		CreatedAt:    c.rec.CreatedAt.UnixNano(),
		Labels:       c.labels(),
		Annotations:  c.annotations(),
	}
}

// listContainers visits the containers selected by ID prefix, pod ID
// prefix and labels.
func (s *Service) listContainers(id, podID string, selector map[string]string, fn func(st *sandboxer.State, c ctr)) {
	states := s.ctrl.States()
	live := 0
	for _, st := range states {
		live += len(st.Containers)
		if !matchID(podID, st.ID) {
			continue
		}
		for cid, c := range st.Containers {
			if c.Task == nil || !matchID(id, cid) {
				continue
			}
			x := ctr{id: cid, sandboxID: st.ID, rec: c.Task, c: c, meta: s.meta(cid, c.Task)}
			if !matchLabels(selector, x.labels()) {
				continue
			}
			fn(st, x)
		}
	}
	if id == "" && podID == "" {
		exists := func(cid string) bool { return s.containerExists(states, cid) }
		s.metas.prune(live, exists)
		s.ctrItems.prune(live, exists)
	}
}

func (s *Service) containerExists(states []*sandboxer.State, id string) bool {
	for _, st := range states {
		if _, ok := st.Containers[id]; ok {
			return true
		}
	}
	return false
}

// filterContainers returns the containers the filter selects, encoded
// (list.go).
func (s *Service) filterContainers(f *runtime.ContainerFilter) *encodedList {
	list := &encodedList{}
	s.listContainers(f.GetId(), f.GetPodSandboxId(), f.GetLabelSelector(), func(_ *sandboxer.State, c ctr) {
		state := containerState(c.rec.Status)
		if f.GetState() != nil && f.GetState().GetState() != state {
			return
		}
		list.add(s.ctrItems.get(c.id, c.rec.CreatedAt, int32(state), func() proto.Message { return c.toCRI() }))
	})
	return list
}

// ListContainers lists the containers of every pod. Containers created
// through containerd are listed too, named by their ID and without image,
// labels or annotations, which containerd keeps.
func (s *Service) ListContainers(_ context.Context, req *runtime.ListContainersRequest) (*runtime.ListContainersResponse, error) {
	resp := &runtime.ListContainersResponse{}
	list := s.filterContainers(req.GetFilter())
	list.setItems(resp, 0, len(list.items))
	s.mem.after(list.size)
	return resp, nil
}

func (s *Service) StreamContainers(req *runtime.StreamContainersRequest, stream grpc.ServerStreamingServer[runtime.StreamContainersResponse]) error {
	return s.filterContainers(req.GetFilter()).chunks(
		func() proto.Message { return &runtime.StreamContainersResponse{} },
		func(m proto.Message) error { return stream.Send(m.(*runtime.StreamContainersResponse)) })
}

// ContainerStatus reports a container; verbose adds its task record,
// simulation, resources and CRI metadata under "info".
func (s *Service) ContainerStatus(ctx context.Context, req *runtime.ContainerStatusRequest) (*runtime.ContainerStatusResponse, error) {
	c, err := s.resolveContainer(req.GetContainerId())
	if err != nil {
		return nil, toGRPC(ctx, "ContainerStatus", err)
	}
	rec := c.rec
	img, ref, imgID := c.image()
	st := &runtime.ContainerStatus{
		Id:          c.id,
		Metadata:    c.metadata(),
		State:       containerState(rec.Status),
		CreatedAt:   rec.CreatedAt.UnixNano(),
		Image:       img,
		ImageRef:    ref,
		ImageId:     imgID,
		Labels:      c.labels(),
		Annotations: c.annotations(),
		LogPath:     rec.LogPath,
		Resources:   &runtime.ContainerResources{Linux: linuxResources(c.c.Resources)},
	}
	st.StopSignal, _ = c.meta.stopSignal()
	if c.meta != nil {
		st.Mounts = c.meta.Mounts
	}
	if rec.StartedAt != nil {
		st.StartedAt = rec.StartedAt.UnixNano()
	}
	if rec.Status == sandboxer.TaskStopped {
		st.ExitCode = int32(rec.ExitStatus)
		if rec.ExitedAt != nil {
			st.FinishedAt = rec.ExitedAt.UnixNano()
		}
		st.Reason = "Completed"
		if rec.ExitStatus != 0 {
			st.Reason = "Error"
		}
	}
	resp := &runtime.ContainerStatusResponse{Status: st}
	if req.GetVerbose() {
		info := struct {
			SandboxID  string                 `json:"sandboxID"`
			Pid        uint32                 `json:"pid"`
			Namespace  string                 `json:"namespace"`
			TaskStatus string                 `json:"taskStatus"`
			Mode       string                 `json:"mode"`
			Backend    json.RawMessage        `json:"backend,omitempty"`
			Resources  resourceinfo.Resources `json:"resources"`
			Config     *containerMeta         `json:"config,omitempty"`
		}{c.sandboxID, rec.Pid, rec.Namespace, rec.Status, s.ctrl.Mode(), rec.Private, c.c.Resources, c.meta}
		data, err := json.Marshal(info)
		if err != nil {
			return nil, toGRPC(ctx, "ContainerStatus", err)
		}
		resp.Info = map[string]string{"info": string(data)}
	}
	return resp, nil
}

// UpdateContainerResources changes a container's resources as
// containerd does: the fields the request sets replace the container's,
// the others stay. The pod's totals are recomputed and persisted.
func (s *Service) UpdateContainerResources(ctx context.Context, req *runtime.UpdateContainerResourcesRequest) (*runtime.UpdateContainerResourcesResponse, error) {
	c, err := s.resolveContainer(req.GetContainerId())
	if err != nil {
		return nil, toGRPC(ctx, "UpdateContainerResources", err)
	}
	ctx = withContainer(ctx, c.id, c.sandboxID)
	if req.GetLinux() == nil {
		return nil, toGRPC(ctx, "UpdateContainerResources", invalidf("no linux resources to update"))
	}
	merged := mergeResources(linuxResources(c.c.Resources), req.GetLinux())
	res, err := resourceinfo.FromLinuxResources("linux", merged)
	if err != nil {
		return nil, toGRPC(ctx, "UpdateContainerResources", err)
	}
	if err := s.tasks.SetResources(ctx, c.key(), res, nil); err != nil {
		return nil, toGRPC(ctx, "UpdateContainerResources", err)
	}
	return &runtime.UpdateContainerResourcesResponse{}, nil
}

// ReopenContainerLog: the log file is opened for each write, so a rotated
// file is picked up by itself; a container that is not running is refused,
// as the CRI asks.
func (s *Service) ReopenContainerLog(ctx context.Context, req *runtime.ReopenContainerLogRequest) (*runtime.ReopenContainerLogResponse, error) {
	c, err := s.resolveContainer(req.GetContainerId())
	if err != nil {
		return nil, toGRPC(ctx, "ReopenContainerLog", err)
	}
	if c.rec.Status != sandboxer.TaskRunning && c.rec.Status != sandboxer.TaskPaused {
		return nil, toGRPC(ctx, "ReopenContainerLog", fmt.Errorf("container %s is not running: %w", c.id, errdefs.ErrFailedPrecondition))
	}
	return &runtime.ReopenContainerLogResponse{}, nil
}

// linuxResources renders recorded resources as CRI LinuxContainerResources.
func linuxResources(r resourceinfo.Resources) *runtime.LinuxContainerResources {
	l := &runtime.LinuxContainerResources{}
	if r.CPUPeriod != nil {
		l.CpuPeriod = int64(*r.CPUPeriod)
	}
	if r.CPUQuota != nil {
		l.CpuQuota = *r.CPUQuota
	}
	if r.CPUShares != nil {
		l.CpuShares = int64(*r.CPUShares)
	}
	if r.MemoryLimit != nil {
		l.MemoryLimitInBytes = *r.MemoryLimit
	}
	if r.MemorySwapLimit != nil {
		l.MemorySwapLimitInBytes = *r.MemorySwapLimit
	}
	if r.CPUSetCPUs != nil {
		l.CpusetCpus = *r.CPUSetCPUs
	}
	if r.CPUSetMems != nil {
		l.CpusetMems = *r.CPUSetMems
	}
	for _, size := range sortedKeys(r.HugepageLimits) {
		l.HugepageLimits = append(l.HugepageLimits, &runtime.HugepageLimit{PageSize: size, Limit: r.HugepageLimits[size]})
	}
	if len(r.Unified) > 0 {
		l.Unified = maps.Clone(r.Unified)
	}
	return l
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// mergeResources applies an update as containerd's CRI does
// (UpdateOCILinuxResource): set fields replace, unset ones stay, unified
// keys are merged.
func mergeResources(cur, upd *runtime.LinuxContainerResources) *runtime.LinuxContainerResources {
	if v := upd.GetCpuPeriod(); v != 0 {
		cur.CpuPeriod = v
	}
	if v := upd.GetCpuQuota(); v != 0 {
		cur.CpuQuota = v
	}
	if v := upd.GetCpuShares(); v != 0 {
		cur.CpuShares = v
	}
	if v := upd.GetCpusetCpus(); v != "" {
		cur.CpusetCpus = v
	}
	if v := upd.GetCpusetMems(); v != "" {
		cur.CpusetMems = v
	}
	if v := upd.GetMemoryLimitInBytes(); v != 0 {
		cur.MemoryLimitInBytes = v
	}
	if v := upd.GetMemorySwapLimitInBytes(); v != 0 {
		cur.MemorySwapLimitInBytes = v
	}
	if len(upd.GetHugepageLimits()) > 0 {
		cur.HugepageLimits = upd.GetHugepageLimits()
	}
	if len(upd.GetUnified()) > 0 {
		if cur.Unified == nil {
			cur.Unified = map[string]string{}
		}
		maps.Copy(cur.Unified, upd.GetUnified())
	}
	return cur
}
