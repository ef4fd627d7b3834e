package vmm

import (
	"context"
	"fmt"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// guestStatsTimeout bounds Usage's wait for the guest's figures.
const guestStatsTimeout = 5 * time.Second

// Usage samples the domain (the VM's CPU time, and percent since the
// previous sample, the balloon's memory statistics, disk and network
// counters) and the guest's cgroups (SandboxStats): the pod cgroup's
// memory in use and processes, and each container's CPU time and percent,
// memory and processes in Containers. Violations come from the guest's
// figures: the pod's memory above memory_limit, its processes above
// pid_limit, its CPU use above cpu_limit by more than 10% (CFS lets a
// quota overshoot within a period). When the guest does not answer
// (within guestStatsTimeout) the VM's figures stand in: memory in use is
// then the guest's (available - usable), CPU the VM's.
func (b *Backend) Usage(ctx context.Context, id string) (resourceinfo.Usage, error) {
	u := resourceinfo.Usage{Timestamp: time.Now().UTC()}
	sb, err := b.get(id)
	if err != nil {
		return u, err
	}
	l, err := b.lv()
	if err != nil {
		return u, err
	}
	dom, err := l.DomainLookupByName(sb.name)
	if err != nil {
		return u, mapErr("look up domain "+sb.name, err)
	}
	state, _, _, _, cpuNs, err := l.DomainGetInfo(dom)
	if err != nil {
		return u, mapErr("domain info "+sb.name, err)
	}
	now := time.Now()
	b.mu.Lock()
	u.Unenforced = append([]string(nil), sb.unenforced...)
	info := sb.info
	b.mu.Unlock()
	if libvirt.DomainState(state) != libvirt.DomainRunning && libvirt.DomainState(state) != libvirt.DomainPaused {
		return u, nil
	}
	u.CPUTimeNanos = ptr(cpuNs)
	b.mu.Lock()
	if !sb.lastAt.IsZero() && cpuNs >= sb.lastCPU && now.After(sb.lastAt) {
		pct := float64(cpuNs-sb.lastCPU) / float64(now.Sub(sb.lastAt).Nanoseconds()) * 100
		u.CPUPercent = ptr(pct)
	}
	sb.lastCPU, sb.lastAt = cpuNs, now
	b.mu.Unlock()

	if stats, err := l.DomainMemoryStats(dom, uint32(libvirt.DomainMemoryStatNr), 0); err == nil {
		m := map[libvirt.DomainMemoryStatTags]uint64{}
		for _, s := range stats {
			m[libvirt.DomainMemoryStatTags(s.Tag)] = s.Val * kib
		}
		if v, ok := m[libvirt.DomainMemoryStatRss]; ok {
			u.MemoryRSS = ptr(v)
		}
		if v, ok := m[libvirt.DomainMemoryStatActualBalloon]; ok {
			u.MemoryActual = ptr(v)
		}
		if v, ok := m[libvirt.DomainMemoryStatAvailable]; ok {
			u.MemoryAvailable = ptr(v)
			free, ok := m[libvirt.DomainMemoryStatUsable]
			if !ok {
				free, ok = m[libvirt.DomainMemoryStatUnused]
			}
			if ok && free <= v {
				u.MemoryUsage = ptr(v - free)
			}
		}
	}
	if rdReq, rdBytes, wrReq, wrBytes, _, err := l.DomainBlockStats(dom, DiskDev); err == nil {
		u.DiskReadBytes, u.DiskWriteBytes = nonNeg(rdBytes), nonNeg(wrBytes)
		u.DiskReadOps, u.DiskWriteOps = nonNeg(rdReq), nonNeg(wrReq)
	}
	if sb.tap != "" {
		if rx, _, _, _, tx, _, _, _, err := l.DomainInterfaceStats(dom, sb.tap); err == nil {
			u.NetRxBytes, u.NetTxBytes = nonNeg(rx), nonNeg(tx)
		}
	}

	cpuPercent := u.CPUPercent
	if gu, ok := b.guestUsage(ctx, sb); ok {
		u.MemoryUsage, u.Pids, u.Containers = gu.MemoryUsage, gu.Pids, gu.Containers
		cpuPercent = gu.CPUPercent
	}

	r := info.Resources
	if r.MemoryLimit != nil && u.MemoryUsage != nil && *u.MemoryUsage > uint64(*r.MemoryLimit) {
		u.Violations = append(u.Violations, fmt.Sprintf("memory_usage %s > memory_limit %s",
			fmtBytes(*u.MemoryUsage), fmtBytes(uint64(*r.MemoryLimit))))
	}
	if r.CPULimit != nil && cpuPercent != nil && *cpuPercent > *r.CPULimit*100*1.1 {
		u.Violations = append(u.Violations, fmt.Sprintf("cpu_percent %.1f > cpu_limit %.3g cores", *cpuPercent, *r.CPULimit))
	}
	if r.PidLimit != nil && u.Pids != nil && *u.Pids > uint64(*r.PidLimit) {
		u.Violations = append(u.Violations, fmt.Sprintf("pids %d > pid_limit %d", *u.Pids, *r.PidLimit))
	}
	if r.CPUSetMems != nil && *r.CPUSetMems != "" {
		u.Unenforced = append(u.Unenforced, "cpuset_mems: unenforced: the vm backend does not set NUMA placement")
	}
	if len(r.HugepageLimits) > 0 {
		u.Unenforced = append(u.Unenforced, "hugepage_limits: unenforced: guests are not backed by hugepages")
	}
	return u, nil
}

// guestUsage reads the pod's and the containers' cgroups in the guest:
// CPUPercent of the result is the pod cgroup's, the rest as in Usage.
func (b *Backend) guestUsage(ctx context.Context, sb *sandbox) (resourceinfo.Usage, bool) {
	var u resourceinfo.Usage
	b.mu.Lock()
	g := sb.guest
	b.mu.Unlock()
	if g == nil || !g.connected() {
		return u, false
	}
	ctx, cancel := context.WithTimeout(ctx, guestStatsTimeout)
	defer cancel()
	_, agent, err := g.clients(ctx)
	if err != nil {
		return u, false
	}
	resp, err := agent.SandboxStats(ctx, &api.SandboxStatsRequest{})
	if err != nil {
		return u, false
	}
	now := time.Now()
	if ts := resp.GetTimestamp(); ts != nil {
		now = ts.AsTime()
	}
	percent := func(last *cpuSample, usec uint64) *float64 {
		var pct *float64
		if !last.at.IsZero() && usec >= last.usec && now.After(last.at) {
			pct = ptr(float64(usec-last.usec) * 1000 / float64(now.Sub(last.at).Nanoseconds()) * 100)
		}
		*last = cpuSample{usec: usec, at: now}
		return pct
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if pod := resp.GetPod(); pod != nil {
		u.MemoryUsage = ptr(pod.GetMemoryCurrent())
		u.Pids = ptr(pod.GetPidsCurrent())
		u.CPUPercent = percent(&sb.lastPod, pod.GetCpuUsageUsec())
	}
	if sb.lastCtr == nil {
		sb.lastCtr = map[string]cpuSample{}
	}
	u.Containers = map[string]resourceinfo.Usage{}
	for id, cs := range resp.GetContainers() {
		if _, ok := sb.containers[id]; !ok {
			continue
		}
		last := sb.lastCtr[id]
		u.Containers[id] = resourceinfo.Usage{
			Timestamp:    now.UTC(),
			CPUTimeNanos: ptr(cs.GetCpuUsageUsec() * 1000),
			CPUPercent:   percent(&last, cs.GetCpuUsageUsec()),
			MemoryUsage:  ptr(cs.GetMemoryCurrent()),
			Pids:         ptr(cs.GetPidsCurrent()),
		}
		sb.lastCtr[id] = last
	}
	for id := range sb.lastCtr {
		if _, ok := resp.GetContainers()[id]; !ok {
			delete(sb.lastCtr, id)
		}
	}
	return u, true
}
