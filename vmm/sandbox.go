package vmm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/digitalocean/go-libvirt"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/vmm/mounts"
)

// GuestNamespaces are the namespaces the agent holds for the pod's
// containers to share (SetupSandbox).
var GuestNamespaces = []string{"ipc", "uts", "pid"}

// curVCPUs is the number of vCPUs d runs with.
func curVCPUs(d *Domain) uint {
	if d == nil {
		return 0
	}
	if d.VCPU.Current != 0 {
		return d.VCPU.Current
	}
	return d.VCPU.Value
}

// Start boots the domain, waits for the guest's READY, connects to its
// agent and sets the pod up in the guest (shared directory, pod cgroup
// with the pod's limits, shared namespaces).
func (b *Backend) Start(ctx context.Context, id string, exited ExitFunc) (_ uint32, retErr error) {
	logger := log.G(ctx).WithField("sandbox", id)
	sb, err := b.get(id)
	if err != nil {
		return 0, err
	}
	l, err := b.lv()
	if err != nil {
		return 0, err
	}
	dom, err := l.DomainLookupByName(sb.name)
	if err != nil {
		return 0, mapErr("look up domain "+sb.name, err)
	}
	if st, _, err := l.DomainGetState(dom, 0); err == nil && libvirt.DomainState(st) != libvirt.DomainShutoff {
		return 0, fmt.Errorf("vm sandbox %q is already running: %w", id, errdefs.ErrFailedPrecondition)
	}
	pr, err := podResources(sb.info.Resources, curVCPUs(sb.def))
	if err != nil {
		return 0, err
	}
	// The shared directory is a shared mount before virtiofsd copies the
	// mount table.
	if err := mounts.Setup(sb.dir); err != nil {
		return 0, fmt.Errorf("vm sandbox %q: %w", id, err)
	}
	defer func() {
		if retErr != nil {
			if err := mounts.Teardown(sb.dir); err != nil {
				log.G(ctx).WithError(err).WithField("sandbox", id).Warn("unmount the shared directory of a sandbox that failed to start")
			}
		}
	}()
	if sock := AgentSocketPath(sb.dir, b.cfg.SocketDir); filepath.Dir(sock) != sb.dir {
		if err := os.MkdirAll(filepath.Dir(sock), 0o700); err != nil {
			return 0, fmt.Errorf("vm sandbox %q: agent socket dir: %w", id, err)
		}
	}
	_ = os.Remove(filepath.Join(sb.dir, ReadyFile))
	b.mu.Lock()
	sb.unenforced, sb.gone = nil, false
	sb.lastCPU, sb.lastAt = 0, time.Time{}
	sb.lastCtr, sb.lastPod = nil, cpuSample{}
	b.mu.Unlock()

	start := time.Now()
	if err := l.DomainCreate(dom); err != nil {
		return 0, mapErr("start domain "+sb.name, err)
	}
	defer func() {
		if retErr != nil {
			// Often the start's context ended it: the cleanup's must not
			// (tc runs as a command of it).
			cctx := context.WithoutCancel(ctx)
			b.guestGone(sb)
			b.destroy(cctx, l, dom)
			b.unshape(cctx, sb)
		}
	}()
	if err := b.applyLiveMemory(l, dom, sb.live); err != nil {
		return 0, err
	}
	b.shape(ctx, sb, sb.info)

	rctx, cancel := context.WithTimeout(ctx, b.opts.ReadyTimeout)
	defer cancel()
	if err := b.waitReady(rctx, l, dom, sb); err != nil {
		return 0, err
	}
	ready := time.Since(start)
	g := b.startGuest(sb)
	if err := b.setupGuest(rctx, sb, g, pr); err != nil {
		return 0, err
	}
	logger.WithField("ready", ready.Round(time.Millisecond)).WithField("agent", time.Since(start).Round(time.Millisecond)).
		Info("vm sandbox ready")

	pid := b.qemuPid(sb.name)
	b.mu.Lock()
	sb.exited, sb.watching = exited, true
	b.mu.Unlock()
	b.poke() // the domain may have stopped between READY and now
	return pid, nil
}

// setupGuest waits for the agent and calls SetupSandbox.
func (b *Backend) setupGuest(ctx context.Context, sb *sandbox, g *guestConn, pr *api.PodResources) error {
	for {
		_, agent, err := g.clients(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("vm sandbox %q: no answer from the guest agent within %s (%v); console:\n%s: %w",
					sb.id, b.opts.ReadyTimeout, err, consoleTail(sb.dir), context.DeadlineExceeded)
			}
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, callTimeout)
		_, err = agent.SetupSandbox(cctx, &api.SetupSandboxRequest{
			SandboxId: sb.id, Resources: pr, SharedTag: b.cfg.SharedTag, Namespaces: GuestNamespaces,
			Hostname: sb.pod.Hostname, Sysctls: sb.pod.Sysctls,
		})
		cancel()
		if err != nil {
			return guestErr(sb.id, "set up the sandbox", err)
		}
		return nil
	}
}

// startGuest starts the connection to the sandbox's agent and its event
// watcher, which run until the VM stops (guestGone) or the backend closes.
func (b *Backend) startGuest(sb *sandbox) *guestConn {
	b.mu.Lock()
	defer b.mu.Unlock()
	if sb.guest != nil {
		return sb.guest
	}
	ctx, cancel := context.WithCancel(b.bgctx)
	g := newGuestConn(sb.id, b.opts.Dialer(sb.dir))
	g.onConnect = func(ctx context.Context, _ taskAPI.TTRPCTaskService, _ api.AgentService, _ *api.InfoResponse) {
		b.reconcile(ctx, sb)
	}
	sb.guest, sb.guestCancel = g, cancel
	b.wg.Add(2)
	go func() {
		defer b.wg.Done()
		g.run(ctx)
	}()
	go func() {
		defer b.wg.Done()
		b.watchEvents(ctx, sb, g)
	}()
	return g
}

// guestGone ends the guest connection of a sandbox whose VM stopped and
// stops its stdio copiers. Its processes went with it: they count as
// exited here, and the controller records their end with the sandbox's
// (a backend reports nothing from within a Sandboxes call).
func (b *Backend) guestGone(sb *sandbox) {
	b.mu.Lock()
	cancel := sb.guestCancel
	sb.guest, sb.guestCancel, sb.gone = nil, nil, true
	procs := sb.allProcs()
	copiers := make([]*stdioCopier, len(procs))
	for i, pr := range procs {
		copiers[i] = pr.copier
	}
	b.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	for i := range procs {
		if copiers[i] != nil {
			copiers[i].stop(0, true)
		}
	}
	b.mu.Lock()
	for _, pr := range procs {
		pr.exited = true
	}
	b.mu.Unlock()
}

// guestAlive reports whether the sandbox's VM runs (it has a guest
// connection, up or being re-established).
func (b *Backend) guestAlive(sb *sandbox) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return sb.guest != nil
}

// allProcs returns every process of the sandbox's containers; b.mu held.
func (sb *sandbox) allProcs() []*proc {
	var out []*proc
	for _, k := range sb.containers {
		out = append(out, k.procs()...)
	}
	return out
}

// waitReady waits for the READY line on the readiness channel.
func (b *Backend) waitReady(ctx context.Context, l lvClient, dom libvirt.Domain, sb *sandbox) error {
	path := filepath.Join(sb.dir, ReadyFile)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for n := 0; ; n++ {
		if data, err := os.ReadFile(path); err == nil && bytes.Contains(data, []byte("READY")) {
			return nil
		}
		if n%10 == 0 {
			st, _, err := l.DomainGetState(dom, 0)
			if err != nil || libvirt.DomainState(st) == libvirt.DomainShutoff || libvirt.DomainState(st) == libvirt.DomainCrashed {
				return fmt.Errorf("vm sandbox %q stopped while booting (state %d, %v); console:\n%s: %w",
					sb.id, st, err, consoleTail(sb.dir), errdefs.ErrUnavailable)
			}
		}
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("vm sandbox %q: guest not ready after %s; console:\n%s: %w",
					sb.id, b.opts.ReadyTimeout, consoleTail(sb.dir), context.DeadlineExceeded)
			}
			return fmt.Errorf("vm sandbox %q: waiting for the guest: %w", sb.id, ctx.Err())
		case <-tick.C:
		}
	}
}

// Stop stops the sandbox: it asks the agent to shut the guest down (stop
// every container, SIGKILL after half the timeout, sync, power off),
// presses the ACPI power button when the agent cannot be reached or the
// guest still runs three quarters into the timeout, and destroys the
// domain once the timeout has passed. The sandbox's exit
// watching ends only when the domain is known to be off: a Stop that
// fails leaves a later crash to be reported.
func (b *Backend) Stop(ctx context.Context, id string, timeout time.Duration) (retErr error) {
	logger := log.G(ctx).WithField("sandbox", id)
	sb, err := b.get(id)
	if err != nil {
		return err
	}
	b.mu.Lock()
	sb.stopping = true
	g := sb.guest
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		sb.stopping = false
		if retErr == nil {
			sb.watching, sb.exited = false, nil
		}
		b.mu.Unlock()
		if retErr == nil {
			b.guestGone(sb)
			b.unshape(ctx, sb)
		} else {
			b.poke() // if the domain stopped meanwhile, the watcher reports it
		}
	}()
	l, err := b.lv()
	if err != nil {
		return err
	}
	dom, err := l.DomainLookupByName(sb.name)
	if libvirt.IsNotFound(err) {
		return nil
	} else if err != nil {
		return mapErr("look up domain "+sb.name, err)
	}
	if off, err := b.isOff(l, dom); err != nil {
		return err
	} else if off {
		return nil
	}
	if timeout > 0 {
		deadline := time.Now().Add(timeout)
		graceful := false
		if g != nil && g.connected() {
			// The agent gives the containers most of the timeout, then
			// powers off; it may not answer before it does.
			_, agent, err := g.clients(ctx)
			if err == nil {
				cctx, cancel := context.WithTimeout(ctx, min(timeout, callTimeout))
				_, err = agent.Shutdown(cctx, &api.ShutdownRequest{TimeoutMs: uint32(timeout / 2 / time.Millisecond)})
				cancel()
				graceful = err == nil || errdefs.IsUnavailable(guestErr(id, "", err)) || errdefs.IsDeadlineExceeded(guestErr(id, "", err))
				if !graceful {
					logger.WithError(err).Warn("guest agent refused to shut down; pressing the ACPI power button")
				}
			}
		}
		acpi := func() {
			if err := l.DomainShutdown(dom); err != nil && !isNotRunning(err) {
				logger.WithError(err).Warn("ACPI shutdown failed")
			}
		}
		if !graceful {
			acpi()
		} else if !b.waitShutoff(ctx, l, dom, time.Until(deadline)-timeout/4) {
			// The agent took the request but the guest still runs: the
			// power button, for the rest of the timeout.
			logger.Warn("guest still runs after the agent's shutdown; pressing the ACPI power button")
			acpi()
		}
		if b.waitShutoff(ctx, l, dom, time.Until(deadline)) {
			logger.WithField("graceful", graceful).Debug("vm sandbox shut down")
			return nil
		}
		logger.WithField("timeout", timeout).Warn("guest did not power off in time; destroying")
	}
	if err := l.DomainDestroy(dom); err != nil && !isNotRunning(err) && !libvirt.IsNotFound(err) {
		return mapErr("destroy domain "+sb.name, err)
	}
	return nil
}

func (b *Backend) isOff(l lvClient, dom libvirt.Domain) (bool, error) {
	st, _, err := l.DomainGetState(dom, 0)
	if libvirt.IsNotFound(err) {
		return true, nil
	} else if err != nil {
		return false, mapErr("domain state "+dom.Name, err)
	}
	return libvirt.DomainState(st) == libvirt.DomainShutoff, nil
}

func (b *Backend) waitShutoff(ctx context.Context, l lvClient, dom libvirt.Domain, timeout time.Duration) bool {
	deadline := time.NewTimer(max(timeout, 0))
	defer deadline.Stop()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if off, err := b.isOff(l, dom); err == nil && off {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-deadline.C:
			return false
		case <-tick.C:
		}
	}
}

// Update applies changed resources to the guest's pod cgroup and to the
// domain, together: both are validated first (vCPUs and memory can only
// move within the maxima the domain was defined with, Config.MaxVCPUs /
// MaxMemory; the pod cgroup's values within the kernel's bounds), then the
// guest is updated, then the domain's persistent definition and its live
// values (schedinfo, memtune, balloon, vCPUs, blkiotune, tc). When a later
// step fails, the earlier ones are undone: a refused change changes
// neither. cpuset_cpus and storage_limit changes take effect on the host
// at the next start only; Usage lists them as unenforced meanwhile.
func (b *Backend) Update(ctx context.Context, id string, info resourceinfo.ResourceInfo) error {
	logger := log.G(ctx).WithField("sandbox", id)
	sb, err := b.get(id)
	if err != nil {
		return err
	}
	nd, err := DomainFor(id, sb.dir, info, b.cfg)
	if err != nil {
		return err
	}
	live := nd.SplitLive()
	l, err := b.lv()
	if err != nil {
		return err
	}
	dom, err := l.DomainLookupByName(sb.name)
	if err != nil {
		return mapErr("look up domain "+sb.name, err)
	}
	old := sb.def
	if old == nil { // recovered: read the definition back
		x, err := l.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive)
		if err != nil {
			return mapErr("read domain "+sb.name, err)
		}
		if old, err = ParseDomain(x); err != nil {
			return err
		}
	}
	// Keep the maxima the domain runs with; grow only the current values.
	newVCPUs := curVCPUs(nd)
	if newVCPUs > old.VCPU.Value {
		return fmt.Errorf("vm sandbox %q: %d vCPUs exceed the domain's maximum of %d (raise MaxVCPUs; applies to new sandboxes): %w",
			id, newVCPUs, old.VCPU.Value, errdefs.ErrFailedPrecondition)
	}
	if nd.CurrentMemory.Value > old.Memory.Value {
		return fmt.Errorf("vm sandbox %q: %d KiB of memory exceed the domain's maximum of %d KiB (raise MaxMemory; applies to new sandboxes): %w",
			id, nd.CurrentMemory.Value, old.Memory.Value, errdefs.ErrFailedPrecondition)
	}
	nd.VCPU.Value = old.VCPU.Value
	nd.VCPU.Current = newVCPUs
	if nd.VCPU.Current == nd.VCPU.Value {
		nd.VCPU.Current = 0
	}
	if nd.CPUTune != nil && len(nd.CPUTune.VCPUPins) > 0 {
		set := nd.CPUTune.VCPUPins[0].CPUSet
		nd.CPUTune.VCPUPins = nil
		for v := uint(0); v < nd.VCPU.Value; v++ {
			nd.CPUTune.VCPUPins = append(nd.CPUTune.VCPUPins, CPUTunePin{VCPU: v, CPUSet: set})
		}
	}
	nd.Memory = old.Memory
	nd.UUID = old.UUID
	if nd.UUID == "" {
		nd.UUID = uuidString(dom.UUID)
	}
	newXML, err := nd.Marshal()
	if err != nil {
		return err
	}
	oldXML, err := old.Marshal()
	if err != nil {
		return err
	}
	newPod, err := podResources(info.Resources, newVCPUs)
	if err != nil {
		return err
	}
	oldPod, err := podResources(sb.info.Resources, curVCPUs(old))
	if err != nil {
		oldPod = &api.PodResources{}
	}

	off, err := b.isOff(l, dom)
	if err != nil {
		return err
	}
	b.mu.Lock()
	g := sb.guest
	oldLive := sb.live
	b.mu.Unlock()
	running := !off
	guestDone := false
	undo := func(cause error) error {
		var errs []error
		if running {
			if err := b.applyLive(ctx, l, dom, old, oldLive); err != nil {
				errs = append(errs, fmt.Errorf("restore the live values: %w", err))
			}
		}
		if _, err := l.DomainDefineXML(oldXML); err != nil {
			errs = append(errs, mapErr("restore the definition", err))
		}
		if guestDone {
			if err := b.updateGuest(ctx, sb, g, oldPod); err != nil {
				errs = append(errs, fmt.Errorf("restore the pod cgroup: %w", err))
			}
		}
		if err := errors.Join(errs...); err != nil {
			logger.WithError(err).Error("vm sandbox update failed and could not be undone completely")
			return fmt.Errorf("%w (undo: %v)", cause, err)
		}
		return cause
	}
	if running && g != nil {
		if err := b.updateGuest(ctx, sb, g, newPod); err != nil {
			return err
		}
		guestDone = true
	}
	if _, err := l.DomainDefineXML(newXML); err != nil {
		return undo(mapErr("redefine domain "+sb.name, err))
	}
	if running {
		if err := b.applyLive(ctx, l, dom, nd, live); err != nil {
			return undo(err)
		}
		b.shape(ctx, sb, info)
		var notes []string
		r, o := info.Resources, sb.info.Resources
		if !eqPtr(r.CPUSetCPUs, o.CPUSetCPUs) {
			notes = append(notes, "cpuset_cpus: unenforced: changed while running; pinning applies at the next start")
		}
		if !eqPtr(r.StorageLimit, o.StorageLimit) {
			notes = append(notes, "storage_limit: unenforced: the disk keeps its size until the sandbox is recreated")
		}
		b.mu.Lock()
		for _, p := range []string{"cpuset_cpus:", "storage_limit:"} {
			sb.unenforced = replaceNotes(sb.unenforced, p, nil)
		}
		sb.unenforced = append(sb.unenforced, notes...)
		b.mu.Unlock()
	}
	b.mu.Lock()
	sb.info, sb.def, sb.live = info, nd, live
	b.mu.Unlock()
	logger.WithField("running", running).Debug("vm sandbox updated")
	return nil
}

// applyLive sets nd's tunables on the running domain.
func (b *Backend) applyLive(ctx context.Context, l lvClient, dom libvirt.Domain, nd *Domain, live LiveTunables) error {
	live32 := uint32(libvirt.DomainAffectLive)
	// CPU: shares, global period/quota (-1: unlimited).
	shares := uint64(resourceinfo.SharesPerCPU)
	period, quota := uint64(resourceinfo.DefaultCPUPeriod), int64(-1)
	if ct := nd.CPUTune; ct != nil {
		if ct.Shares != nil {
			shares = *ct.Shares
		}
		if ct.GlobalQuota != nil {
			period, quota = *ct.GlobalPeriod, *ct.GlobalQuota
		}
	}
	sched := []libvirt.TypedParam{
		{Field: libvirt.DomainSchedulerCPUShares, Value: *libvirt.NewTypedParamValueUllong(shares)},
		{Field: libvirt.DomainSchedulerGlobalPeriod, Value: *libvirt.NewTypedParamValueUllong(period)},
		{Field: libvirt.DomainSchedulerGlobalQuota, Value: *libvirt.NewTypedParamValueLlong(quota)},
	}
	if err := l.DomainSetSchedulerParametersFlags(dom, sched, live32); err != nil {
		return mapErr("set schedinfo", err)
	}
	// Memory: soft limit, then hard and swap hard together.
	soft := uint64(libvirt.DomainMemoryParamUnlimited)
	if nd.MemTune != nil && nd.MemTune.SoftLimit != nil {
		soft = nd.MemTune.SoftLimit.Value
	}
	if err := l.DomainSetMemoryParameters(dom, []libvirt.TypedParam{
		{Field: libvirt.DomainMemorySoftLimit, Value: *libvirt.NewTypedParamValueUllong(soft)},
	}, live32); err != nil {
		return mapErr("set memtune soft_limit", err)
	}
	if err := b.applyLiveMemory(l, dom, live); err != nil {
		return err
	}
	// Balloon.
	if err := l.DomainSetMemoryFlags(dom, nd.CurrentMemory.Value, live32); err != nil {
		return mapErr(fmt.Sprintf("set balloon to %d KiB", nd.CurrentMemory.Value), err)
	}
	// vCPUs.
	want := nd.VCPU.Value
	if nd.VCPU.Current != 0 {
		want = nd.VCPU.Current
	}
	if cur, err := l.DomainGetVcpusFlags(dom, live32); err == nil && uint(cur) != want {
		if err := l.DomainSetVcpusFlags(dom, uint32(want), live32); err != nil {
			if uint(cur) < want {
				return mapErr(fmt.Sprintf("set vcpus %d -> %d", cur, want), err)
			}
			// The vCPUs the domain booted with are not hot-unpluggable;
			// the global quota already holds the VM to its cpu_limit, so
			// keeping the extra vCPU online only loses parallelism limits.
			log.G(ctx).WithField("domain", dom.Name).WithError(err).
				Infof("keeping %d vCPUs (cannot unplug to %d); the CPU quota still applies", cur, want)
		}
	}
	// Disk I/O.
	io := IOTune{}
	for _, d := range nd.Devices.Disks {
		if d.Target.Dev == DiskDev && d.IOTune != nil {
			io = *d.IOTune
		}
	}
	params := []libvirt.TypedParam{
		{Field: libvirt.DomainBlockIotuneReadBytesSec, Value: *libvirt.NewTypedParamValueUllong(io.ReadBytesSec)},
		{Field: libvirt.DomainBlockIotuneWriteBytesSec, Value: *libvirt.NewTypedParamValueUllong(io.WriteBytesSec)},
		{Field: libvirt.DomainBlockIotuneReadIopsSec, Value: *libvirt.NewTypedParamValueUllong(io.ReadIOPSSec)},
		{Field: libvirt.DomainBlockIotuneWriteIopsSec, Value: *libvirt.NewTypedParamValueUllong(io.WriteIOPSSec)},
	}
	if err := l.DomainSetBlockIOTune(dom, DiskDev, params, live32); err != nil {
		return mapErr("set blkdeviotune", err)
	}
	return nil
}

func (b *Backend) updateGuest(ctx context.Context, sb *sandbox, g *guestConn, pr *api.PodResources) error {
	_, agent, err := g.clients(ctx)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	_, err = agent.UpdateSandbox(cctx, &api.UpdateSandboxRequest{Resources: pr})
	return guestErr(sb.id, "update the pod cgroup", err)
}

// Recover re-attaches to a sandbox after a restart of the daemon: it
// reports whether its domain runs and, when it does, watches it and
// reconnects to its agent in the background (the containers keep running
// in the guest). It returns an error wrapping errdefs.ErrNotFound only
// when the domain is known to be gone (undefined, or replaced by a domain
// of another sandbox); other errors (libvirtd unreachable) are transient.
func (b *Backend) Recover(ctx context.Context, id, dir string, info resourceinfo.ResourceInfo, running bool, exited ExitFunc) (bool, error) {
	logger := log.G(ctx).WithField("sandbox", id)
	sb := b.newSandbox(id, dir, info)
	if d, err := DomainFor(id, dir, info, b.cfg); err == nil {
		sb.live = d.SplitLive()
	}
	if rec, err := readPodRecord(dir); err != nil {
		// The guest of a later Start gets no hostname or sysctls; the
		// pod's files are on disk still.
		logger.WithError(err).Warn("vm sandbox: unreadable pod record")
	} else {
		sb.pod = rec
	}
	l, err := b.lv()
	if err != nil {
		return false, err
	}
	// The record is kept whatever happens below, with its directory, so
	// that the containers can be recovered and everything deleted later.
	if old, err := b.get(id); err == nil {
		// Recovered before (a retry): keep the record, with its containers.
		b.mu.Lock()
		old.info, old.live, old.pod = sb.info, sb.live, sb.pod
		b.mu.Unlock()
		sb = old
	} else {
		b.put(sb)
	}
	gone := func(err error) (bool, error) {
		b.mu.Lock()
		sb.gone = true
		b.mu.Unlock()
		return false, err
	}
	dom, err := l.DomainLookupByName(sb.name)
	if libvirt.IsNotFound(err) {
		return gone(fmt.Errorf("vm sandbox %q has no domain %s: %w", id, sb.name, errdefs.ErrNotFound))
	} else if err != nil {
		return false, mapErr("look up domain "+sb.name, err)
	}
	md, err := domainMetadata(l, dom)
	if err != nil {
		return false, mapErr("metadata of domain "+sb.name, err)
	}
	if md == nil || md.ID != id {
		return gone(fmt.Errorf("domain %s does not belong to sandbox %q: %w", sb.name, id, errdefs.ErrNotFound))
	}
	x, err := l.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive)
	if err != nil {
		return false, mapErr("read domain "+sb.name, err)
	}
	if d, err := ParseDomain(x); err == nil {
		b.mu.Lock()
		sb.def = d
		b.mu.Unlock()
	}
	st, _, err := l.DomainGetState(dom, 0)
	if err != nil {
		return false, mapErr("domain state "+sb.name, err)
	}
	alive := libvirt.DomainState(st) == libvirt.DomainRunning || libvirt.DomainState(st) == libvirt.DomainPaused ||
		libvirt.DomainState(st) == libvirt.DomainBlocked
	if !alive {
		b.unshape(ctx, sb)
		logger.WithField("expected_running", running).Info("vm sandbox domain is not running")
		return gone(nil)
	}
	if !running {
		logger.Warn("vm sandbox domain runs although the record says stopped")
	}
	b.shape(ctx, sb, info) // idempotent; restores shaping a crash may have cut short
	b.startGuest(sb)
	b.mu.Lock()
	sb.exited, sb.watching, sb.gone = exited, true, false
	b.mu.Unlock()
	b.attachCopiers(ctx, sb) // the containers recovered before a retry
	b.poke()
	logger.Info("vm sandbox recovered")
	return true, nil
}
