package cri

import (
	"context"
	"time"

	"google.golang.org/grpc"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/logsafe"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
)

// usage is a container's (or a pod's summed) usage.
type usage struct {
	cpuNs, nanoCores, mem, rss, pids uint64
}

// podUsage is the backend's usage of a pod, by container; nothing for a
// pod that is not ready.
func (s *Service) podUsage(ctx context.Context, podID string) map[string]resourceinfo.Usage {
	u, _, err := s.ctrl.Usage(ctx, podID)
	if err != nil {
		if !errdefs.IsFailedPrecondition(err) && !errdefs.IsNotFound(err) {
			log.G(ctx).WithError(err).WithField("sandbox", logsafe.String(podID)).Warn("pod usage")
		}
		return nil
	}
	return u.Containers
}

func usageOf(u resourceinfo.Usage, running bool) usage {
	var x usage
	if u.CPUTimeNanos != nil {
		x.cpuNs = *u.CPUTimeNanos
	}
	if u.CPUPercent != nil && running {
		x.nanoCores = uint64(*u.CPUPercent / 100 * 1e9)
	}
	if u.MemoryUsage != nil {
		x.mem = *u.MemoryUsage
	}
	if u.MemoryRSS != nil {
		x.rss = *u.MemoryRSS
	}
	if u.Pids != nil {
		x.pids = *u.Pids
	}
	return x
}

func (u *usage) add(o usage) {
	u.cpuNs += o.cpuNs
	u.nanoCores += o.nanoCores
	u.mem += o.mem
	u.rss += o.rss
	u.pids += o.pids
}

func (u usage) cpu(ts int64) *runtime.CpuUsage {
	return &runtime.CpuUsage{
		Timestamp:            ts,
		UsageCoreNanoSeconds: &runtime.UInt64Value{Value: u.cpuNs},
		UsageNanoCores:       &runtime.UInt64Value{Value: u.nanoCores},
	}
}

// memory reports the usage against limit; available is limit minus the
// working set, 0 without a limit (as containerd reports it).
func (u usage) memory(ts int64, limit *int64) *runtime.MemoryUsage {
	var avail uint64
	if limit != nil && uint64(*limit) > u.mem {
		avail = uint64(*limit) - u.mem
	}
	return &runtime.MemoryUsage{
		Timestamp:       ts,
		WorkingSetBytes: &runtime.UInt64Value{Value: u.mem},
		UsageBytes:      &runtime.UInt64Value{Value: u.mem},
		AvailableBytes:  &runtime.UInt64Value{Value: avail},
		RssBytes:        &runtime.UInt64Value{Value: u.rss},
		PageFaults:      &runtime.UInt64Value{},
		MajorPageFaults: &runtime.UInt64Value{},
	}
}

// containerStats reports a container's usage (from its pod's, by
// container) with its limits; its writable layer is empty (no filesystem
// is created).
func (s *Service) containerStats(c ctr, now time.Time, pod map[string]resourceinfo.Usage) *runtime.ContainerStats {
	ts := now.UnixNano()
	u := usageOf(pod[c.id], hasProcess(c.rec))
	return &runtime.ContainerStats{
		Attributes: &runtime.ContainerAttributes{
			Id: c.id, Metadata: c.metadata(), Labels: c.labels(), Annotations: c.annotations(),
		},
		Cpu:    u.cpu(ts),
		Memory: u.memory(ts, c.c.Resources.MemoryLimit),
		WritableLayer: &runtime.FilesystemUsage{
			Timestamp:  ts,
			FsId:       &runtime.FilesystemIdentifier{Mountpoint: s.dir},
			UsedBytes:  &runtime.UInt64Value{},
			InodesUsed: &runtime.UInt64Value{},
		},
	}
}

func hasProcess(rec *sandboxer.TaskRecord) bool {
	return rec.Status == sandboxer.TaskRunning || rec.Status == sandboxer.TaskPaused
}

// ContainerStats reports one container's usage.
func (s *Service) ContainerStats(ctx context.Context, req *runtime.ContainerStatsRequest) (*runtime.ContainerStatsResponse, error) {
	c, err := s.resolveContainer(req.GetContainerId())
	if err != nil {
		return nil, toGRPC(ctx, "ContainerStats", err)
	}
	return &runtime.ContainerStatsResponse{Stats: s.containerStats(c, time.Now(), s.podUsage(ctx, c.sandboxID))}, nil
}

func (s *Service) listContainerStats(ctx context.Context, f *runtime.ContainerStatsFilter) []*runtime.ContainerStats {
	now := time.Now()
	var items []*runtime.ContainerStats
	pods := map[string]map[string]resourceinfo.Usage{}
	s.listContainers(f.GetId(), f.GetPodSandboxId(), f.GetLabelSelector(), func(_ *sandboxer.State, c ctr) {
		if !hasProcess(c.rec) {
			return
		}
		pod, ok := pods[c.sandboxID]
		if !ok {
			pod = s.podUsage(ctx, c.sandboxID)
			pods[c.sandboxID] = pod
		}
		items = append(items, s.containerStats(c, now, pod))
	})
	return items
}

// ListContainerStats reports the running containers' usage.
func (s *Service) ListContainerStats(ctx context.Context, req *runtime.ListContainerStatsRequest) (*runtime.ListContainerStatsResponse, error) {
	return &runtime.ListContainerStatsResponse{Stats: s.listContainerStats(ctx, req.GetFilter())}, nil
}

func (s *Service) StreamContainerStats(req *runtime.StreamContainerStatsRequest, stream grpc.ServerStreamingServer[runtime.StreamContainerStatsResponse]) error {
	return sendChunks(s.listContainerStats(stream.Context(), req.GetFilter()), func(items []*runtime.ContainerStats) error {
		return stream.Send(&runtime.StreamContainerStatsResponse{ContainerStats: items})
	})
}

// podStats sums the usage of a pod's containers; its memory is reported
// against the pod's effective limit.
func (s *Service) podStats(ctx context.Context, v sandboxer.SandboxView, now time.Time) *runtime.PodSandboxStats {
	ts := now.UnixNano()
	cfg := decodePodConfig(v.State)
	pod := s.podUsage(ctx, v.State.ID)
	var sum usage
	var ctrs []*runtime.ContainerStats
	for _, c := range s.containers(v.State) {
		sum.add(usageOf(pod[c.id], hasProcess(c.rec)))
		if hasProcess(c.rec) {
			ctrs = append(ctrs, s.containerStats(c, now, pod))
		}
	}
	return &runtime.PodSandboxStats{
		Attributes: &runtime.PodSandboxAttributes{
			Id: v.State.ID, Metadata: podMetadata(v.State.ID, cfg), Labels: cfg.GetLabels(), Annotations: cfg.GetAnnotations(),
		},
		Linux: &runtime.LinuxPodSandboxStats{
			Cpu:        sum.cpu(ts),
			Memory:     sum.memory(ts, v.ResourceInfo.MemoryLimit),
			Process:    &runtime.ProcessUsage{Timestamp: ts, ProcessCount: &runtime.UInt64Value{Value: sum.pids}},
			Containers: ctrs,
		},
	}
}

// PodSandboxStats reports a pod's usage: the sum of its containers'.
func (s *Service) PodSandboxStats(ctx context.Context, req *runtime.PodSandboxStatsRequest) (*runtime.PodSandboxStatsResponse, error) {
	v, err := s.resolvePod(req.GetPodSandboxId())
	if err != nil {
		return nil, toGRPC(ctx, "PodSandboxStats", err)
	}
	return &runtime.PodSandboxStatsResponse{Stats: s.podStats(ctx, v, time.Now())}, nil
}

func (s *Service) listPodStats(ctx context.Context, f *runtime.PodSandboxStatsFilter) []*runtime.PodSandboxStats {
	now := time.Now()
	var items []*runtime.PodSandboxStats
	for _, v := range s.ctrl.List() {
		if !matchID(f.GetId(), v.State.ID) || v.State.Phase != sandboxer.PhaseReady {
			continue
		}
		if sel := f.GetLabelSelector(); len(sel) > 0 && !matchLabels(sel, decodePodConfig(v.State).GetLabels()) {
			continue
		}
		items = append(items, s.podStats(ctx, v, now))
	}
	return items
}

// ListPodSandboxStats reports the ready pods' usage.
func (s *Service) ListPodSandboxStats(ctx context.Context, req *runtime.ListPodSandboxStatsRequest) (*runtime.ListPodSandboxStatsResponse, error) {
	return &runtime.ListPodSandboxStatsResponse{Stats: s.listPodStats(ctx, req.GetFilter())}, nil
}

func (s *Service) StreamPodSandboxStats(req *runtime.StreamPodSandboxStatsRequest, stream grpc.ServerStreamingServer[runtime.StreamPodSandboxStatsResponse]) error {
	return sendChunks(s.listPodStats(stream.Context(), req.GetFilter()), func(items []*runtime.PodSandboxStats) error {
		return stream.Send(&runtime.StreamPodSandboxStatsResponse{PodSandboxStats: items})
	})
}
