package vmm

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// ExitFunc reports that a sandbox's domain stopped by itself. It has the
// shape of sandboxer.ExitFunc; see the package doc of Backend for how the
// two meet.
type ExitFunc = func(code uint32, at time.Time)

// Exit codes passed to ExitFunc.
const (
	// ExitShutdown: the guest powered itself off.
	ExitShutdown uint32 = 0
	// ExitFailed: the domain crashed or QEMU failed.
	ExitFailed uint32 = 1
	// ExitDestroyed: the domain was destroyed from outside (virsh destroy,
	// QEMU killed), as a SIGKILLed process exits with 128+9.
	ExitDestroyed uint32 = 137
)

// Options of a Backend beyond the domain Config.
type Options struct {
	// ReadyTimeout bounds Start's wait for the guest's READY (default 60s).
	ReadyTimeout time.Duration
	// PollInterval is how often the exit watcher double-checks the state of
	// the watched domains besides the lifecycle events (default 5s).
	PollInterval time.Duration
	// QEMUImg is the qemu-img binary (default "qemu-img").
	QEMUImg string
	// PidDir is where libvirt writes <domain>.pid (default /run/libvirt/qemu).
	PidDir string
}

// Backend is the "vm" sandbox backend: one libvirt domain per sandbox. It
// has the methods of sandboxer.Backend (with ExitFunc as above); it is
// safe for concurrent use, and calls for one sandbox are expected to be
// serialized by the caller.
type Backend struct {
	cfg  Config
	opts Options

	connMu sync.Mutex
	conn   *libvirt.Libvirt

	mu        sync.Mutex
	sandboxes map[string]*sandbox // by id
	byName    map[string]*sandbox // by domain name

	stop   context.CancelFunc
	done   chan struct{}
	wakeup chan struct{}
}

type sandbox struct {
	id, dir, name string
	tap, ifb      string
	info          resourceinfo.ResourceInfo
	def           *Domain // the definition as last defined (live tunables split off)
	live          LiveTunables

	// exit watching, guarded by Backend.mu
	exited   ExitFunc
	watching bool

	unenforced []string // guarded by Backend.mu
	// previous CPU sample, for CPUPercent
	lastCPU uint64
	lastAt  time.Time
}

// New connects to libvirtd, decides the accelerator once (cfg.Accel auto:
// kvm when it works, TCG otherwise) and starts the exit watcher. Close
// stops it.
func New(ctx context.Context, cfg Config, opts Options) (*Backend, error) {
	cfg = cfg.WithDefaults()
	if opts.ReadyTimeout == 0 {
		opts.ReadyTimeout = 60 * time.Second
	}
	if opts.PollInterval == 0 {
		opts.PollInterval = 5 * time.Second
	}
	if opts.QEMUImg == "" {
		opts.QEMUImg = "qemu-img"
	}
	if opts.PidDir == "" {
		opts.PidDir = "/run/libvirt/qemu"
	}
	for _, f := range []struct{ name, path string }{{"kernel", cfg.Kernel}, {"initrd", cfg.Initrd}, {"base disk", cfg.BaseDisk}} {
		if f.path == "" {
			return nil, fmt.Errorf("vm backend: no guest %s configured (set GuestDir; see scripts/build-guest.sh): %w", f.name, errdefs.ErrInvalidArgument)
		}
		if _, err := os.Stat(f.path); err != nil {
			return nil, fmt.Errorf("vm backend: guest %s: %w: %w", f.name, err, errdefs.ErrNotFound)
		}
	}
	b := &Backend{
		cfg:       cfg,
		opts:      opts,
		sandboxes: map[string]*sandbox{},
		byName:    map[string]*sandbox{},
		done:      make(chan struct{}),
		wakeup:    make(chan struct{}, 1),
	}
	l, err := b.lv()
	if err != nil {
		return nil, err
	}
	switch cfg.Accel {
	case AccelKVM:
		b.cfg.DomainType = "kvm"
	case AccelTCG:
		b.cfg.DomainType = "qemu"
	case AccelAuto:
		ok, why := probeKVM(l)
		if ok {
			b.cfg.DomainType = "kvm"
		} else {
			b.cfg.DomainType = "qemu"
		}
		log.G(ctx).WithField("kvm", ok).WithField("reason", why).Infof("vm backend: using domain type %q", b.cfg.DomainType)
	default:
		return nil, fmt.Errorf("vm backend: accel %q: %w", cfg.Accel, errdefs.ErrInvalidArgument)
	}
	wctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	b.stop = cancel
	go b.watch(wctx)
	return b, nil
}

// DomainType is the domain type New chose ("kvm" or "qemu", i.e. TCG).
func (b *Backend) DomainType() string { return b.cfg.DomainType }

// Config is the backend's effective configuration.
func (b *Backend) Config() Config { return b.cfg }

// Close stops the exit watcher and disconnects. Domains keep running.
func (b *Backend) Close() error {
	b.stop()
	<-b.done
	b.connMu.Lock()
	defer b.connMu.Unlock()
	if b.conn != nil {
		err := b.conn.Disconnect()
		b.conn = nil
		return err
	}
	return nil
}

// lv returns a connected client, reconnecting after libvirtd went away.
func (b *Backend) lv() (*libvirt.Libvirt, error) {
	b.connMu.Lock()
	defer b.connMu.Unlock()
	if b.conn != nil && b.conn.IsConnected() {
		return b.conn, nil
	}
	l := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(b.cfg.Socket), dialers.WithLocalTimeout(5*time.Second)))
	if err := l.Connect(); err != nil {
		return nil, mapErr("connect to libvirtd at "+b.cfg.Socket, err)
	}
	b.conn = l
	return l, nil
}

// probeKVM decides whether kvm domains can run: /dev/kvm must open and
// create a VM, the host CPU must have vmx/svm (without it, as under some
// nested setups, /dev/kvm exists but guests hang), and libvirt must offer
// the kvm domain type.
func probeKVM(l *libvirt.Libvirt) (bool, string) {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		return false, "cannot open /dev/kvm: " + err.Error()
	}
	defer f.Close()
	const kvmGetAPIVersion, kvmCreateVM = 0xAE00, 0xAE01
	v, _, errno := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), kvmGetAPIVersion, 0)
	if errno != 0 || v != 12 {
		return false, fmt.Sprintf("KVM_GET_API_VERSION = %d (%v)", v, errno)
	}
	vm, _, errno := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), kvmCreateVM, 0)
	if errno != 0 {
		return false, "KVM_CREATE_VM: " + errno.Error()
	}
	syscall.Close(int(vm))
	cpuinfo, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return false, "read /proc/cpuinfo: " + err.Error()
	}
	hasVirt := false
	for _, line := range strings.Split(string(cpuinfo), "\n") {
		if strings.HasPrefix(line, "flags") {
			for _, fl := range strings.Fields(line) {
				if fl == "vmx" || fl == "svm" {
					hasVirt = true
				}
			}
			break
		}
	}
	if !hasVirt {
		return false, "/dev/kvm opens but the host CPU has no vmx/svm flag"
	}
	if _, err := l.ConnectGetDomainCapabilities(nil, libvirt.OptString{"x86_64"}, nil, libvirt.OptString{"kvm"}, 0); err != nil {
		return false, "libvirt has no kvm domain type: " + err.Error()
	}
	return true, "/dev/kvm works"
}

// Mode names the backend.
func (b *Backend) Mode() string { return "vm" }

func (b *Backend) get(id string) (*sandbox, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	sb, ok := b.sandboxes[id]
	if !ok {
		return nil, fmt.Errorf("vm sandbox %q: %w", id, errdefs.ErrNotFound)
	}
	return sb, nil
}

func (b *Backend) put(sb *sandbox) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.sandboxes[sb.id] = sb
	b.byName[sb.name] = sb
}

func (b *Backend) forget(sb *sandbox) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.sandboxes[sb.id] == sb {
		delete(b.sandboxes, sb.id)
	}
	if b.byName[sb.name] == sb {
		delete(b.byName, sb.name)
	}
}

func (b *Backend) newSandbox(id, dir string, info resourceinfo.ResourceInfo) *sandbox {
	sb := &sandbox{id: id, dir: dir, info: info, name: DomainName(b.cfg.NamePrefix, id)}
	if b.cfg.Network == NetworkEthernet {
		sb.tap, sb.ifb = TapName(id), IFBName(id)
	}
	return sb
}

// Create defines the sandbox's domain and creates its overlay disk. On
// failure it leaves nothing behind.
func (b *Backend) Create(ctx context.Context, id, dir string, info resourceinfo.ResourceInfo) (retErr error) {
	logger := log.G(ctx).WithField("sandbox", id)
	if _, err := b.get(id); err == nil {
		return fmt.Errorf("vm sandbox %q: %w", id, errdefs.ErrAlreadyExists)
	}
	d, err := DomainFor(id, dir, info, b.cfg)
	if err != nil {
		return err
	}
	sb := b.newSandbox(id, dir, info)
	sb.live = d.SplitLive()
	sb.def = d
	l, err := b.lv()
	if err != nil {
		return err
	}

	// A domain of that name may be left over (a crash between define and
	// the state write): replace it if it is ours, stopped, for this id.
	if old, err := l.DomainLookupByName(sb.name); err == nil {
		md, _ := domainMetadata(l, old)
		state, _, _ := l.DomainGetState(old, 0)
		if md == nil || md.ID != id || libvirt.DomainState(state) != libvirt.DomainShutoff {
			return fmt.Errorf("vm sandbox %q: domain %s exists: %w", id, sb.name, errdefs.ErrAlreadyExists)
		}
		logger.Warn("replacing a stale stopped domain of this sandbox")
		if err := l.DomainUndefineFlags(old, libvirt.DomainUndefineNvram); err != nil && !libvirt.IsNotFound(err) {
			return mapErr("undefine stale domain "+sb.name, err)
		}
	} else if !libvirt.IsNotFound(err) {
		return mapErr("look up domain "+sb.name, err)
	}

	disk := filepath.Join(dir, DiskFile)
	args := []string{"create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", b.cfg.BaseDisk, disk}
	if s := info.StorageLimit; s != nil && *s > 0 {
		args = append(args, strconv.FormatInt(*s, 10))
	}
	_ = os.Remove(disk)
	if out, err := exec.CommandContext(ctx, b.opts.QEMUImg, args...).CombinedOutput(); err != nil {
		_ = os.Remove(disk)
		return fmt.Errorf("create overlay disk: %s %s: %w: %s: %w", b.opts.QEMUImg, strings.Join(args, " "), err,
			strings.TrimSpace(string(out)), errdefs.ErrInvalidArgument)
	}
	defer func() {
		if retErr != nil {
			_ = os.Remove(disk)
		}
	}()

	xmlDoc, err := d.Marshal()
	if err != nil {
		return err
	}
	dom, err := l.DomainDefineXML(xmlDoc)
	if err != nil {
		return mapErr("define domain "+sb.name, err)
	}
	d.UUID = uuidString(dom.UUID)
	b.put(sb)
	logger.WithField("domain", sb.name).WithField("type", d.Type).Debug("vm sandbox defined")
	return nil
}

// Start boots the domain and returns when the guest reported READY.
func (b *Backend) Start(ctx context.Context, id string, exited ExitFunc) (uint32, error) {
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
	readyPath := filepath.Join(sb.dir, ReadyFile)
	_ = os.Remove(readyPath)
	b.mu.Lock()
	sb.unenforced = nil
	sb.lastCPU, sb.lastAt = 0, time.Time{}
	b.mu.Unlock()

	start := time.Now()
	if err := l.DomainCreate(dom); err != nil {
		return 0, mapErr("start domain "+sb.name, err)
	}
	fail := func(err error) (uint32, error) {
		b.destroy(ctx, l, dom)
		b.unshape(ctx, sb)
		return 0, err
	}
	if err := b.applyLiveMemory(l, dom, sb.live); err != nil {
		return fail(err)
	}
	b.shape(ctx, sb, sb.info)

	if err := b.waitReady(ctx, l, dom, sb); err != nil {
		return fail(err)
	}
	logger.WithField("boot", time.Since(start).Round(time.Millisecond)).Info("vm sandbox ready")

	pid := b.qemuPid(sb.name)
	b.mu.Lock()
	sb.exited, sb.watching = exited, true
	b.mu.Unlock()
	b.poke() // the domain may have stopped between READY and now
	return pid, nil
}

// waitReady waits for the READY line on the readiness channel.
func (b *Backend) waitReady(ctx context.Context, l *libvirt.Libvirt, dom libvirt.Domain, sb *sandbox) error {
	ctx, cancel := context.WithTimeout(ctx, b.opts.ReadyTimeout)
	defer cancel()
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

// consoleTail is the end of the guest's console log, for errors.
func consoleTail(dir string) string {
	const n = 2048
	f, err := os.Open(filepath.Join(dir, ConsoleFile))
	if err != nil {
		return "(no console log: " + err.Error() + ")"
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > n {
		_, _ = f.Seek(st.Size()-n, io.SeekStart)
	}
	data, _ := io.ReadAll(f)
	s := strings.TrimSpace(string(data))
	if s == "" {
		return "(console log empty)"
	}
	return s
}

func (b *Backend) qemuPid(name string) uint32 {
	data, err := os.ReadFile(filepath.Join(b.opts.PidDir, name+".pid"))
	if err != nil {
		return 0
	}
	pid, _ := strconv.ParseUint(strings.TrimSpace(string(data)), 10, 32)
	return uint32(pid)
}

// applyLiveMemory sets memtune hard_limit and swap_hard_limit on the
// running domain; libvirt orders the two as cgroup v1 needs.
func (b *Backend) applyLiveMemory(l *libvirt.Libvirt, dom libvirt.Domain, lt LiveTunables) error {
	unl := uint64(libvirt.DomainMemoryParamUnlimited)
	hard, swap := lt.HardLimitKiB, lt.SwapHardLimitKiB
	if hard == 0 {
		hard = unl
	}
	if swap == 0 {
		swap = unl
	}
	params := []libvirt.TypedParam{
		{Field: libvirt.DomainMemoryHardLimit, Value: *libvirt.NewTypedParamValueUllong(hard)},
		{Field: libvirt.DomainMemorySwapHardLimit, Value: *libvirt.NewTypedParamValueUllong(swap)},
	}
	if err := l.DomainSetMemoryParameters(dom, params, uint32(libvirt.DomainAffectLive)); err != nil {
		return mapErr(fmt.Sprintf("set memtune hard_limit=%dKiB swap_hard_limit=%dKiB", lt.HardLimitKiB, lt.SwapHardLimitKiB), err)
	}
	return nil
}

// shape applies the network limits of info, recording what it could not
// enforce.
func (b *Backend) shape(ctx context.Context, sb *sandbox, info resourceinfo.ResourceInfo) {
	ing, eg := info.NetworkIngressBps, info.NetworkEgressBps
	var notes []string
	if sb.tap == "" {
		for name, v := range map[string]*int64{"network_ingress_bps": ing, "network_egress_bps": eg} {
			if v != nil && *v > 0 {
				notes = append(notes, fmt.Sprintf("%s: unenforced: network mode %q has no host tap to shape", name, b.cfg.Network))
			}
		}
	} else {
		ingErr, egErr := shapeTap(ctx, sb.tap, sb.ifb, ing, eg)
		if ingErr != nil {
			notes = append(notes, "network_ingress_bps: unenforced: "+ingErr.Error())
		}
		if egErr != nil {
			notes = append(notes, "network_egress_bps: unenforced: "+egErr.Error())
		}
	}
	for _, n := range notes {
		log.G(ctx).WithField("sandbox", sb.id).Warn(n)
	}
	b.mu.Lock()
	sb.unenforced = replaceNotes(sb.unenforced, "network_", notes)
	b.mu.Unlock()
}

func (b *Backend) unshape(ctx context.Context, sb *sandbox) {
	if sb.tap != "" {
		unshapeEgress(ctx, sb.tap, sb.ifb)
	}
}

// replaceNotes replaces the notes starting with prefix.
func replaceNotes(old []string, prefix string, notes []string) []string {
	out := make([]string, 0, len(old)+len(notes))
	for _, n := range old {
		if !strings.HasPrefix(n, prefix) {
			out = append(out, n)
		}
	}
	return append(out, notes...)
}

// destroy force-stops a domain; "not running" is fine.
func (b *Backend) destroy(ctx context.Context, l *libvirt.Libvirt, dom libvirt.Domain) {
	if err := l.DomainDestroy(dom); err != nil && !isNotRunning(err) && !libvirt.IsNotFound(err) {
		log.G(ctx).WithError(err).WithField("domain", dom.Name).Warn("destroy domain")
	}
}

// Stop shuts the guest down with an ACPI power button press and destroys
// it if it is still running after timeout.
func (b *Backend) Stop(ctx context.Context, id string, timeout time.Duration) error {
	logger := log.G(ctx).WithField("sandbox", id)
	sb, err := b.get(id)
	if err != nil {
		return err
	}
	b.mu.Lock()
	sb.watching = false // a stop we asked for is not an exit to report
	b.mu.Unlock()
	l, err := b.lv()
	if err != nil {
		return err
	}
	defer b.unshape(ctx, sb)
	dom, err := l.DomainLookupByName(sb.name)
	if libvirt.IsNotFound(err) {
		return nil
	} else if err != nil {
		return mapErr("look up domain "+sb.name, err)
	}
	if timeout > 0 {
		if err := l.DomainShutdown(dom); err != nil {
			if isNotRunning(err) {
				return nil
			}
			logger.WithError(err).Warn("graceful shutdown failed; destroying")
		} else if b.waitShutoff(ctx, l, dom, timeout) {
			logger.Debug("vm sandbox shut down")
			return nil
		} else {
			logger.WithField("timeout", timeout).Warn("guest did not power off in time; destroying")
		}
	}
	if err := l.DomainDestroy(dom); err != nil && !isNotRunning(err) && !libvirt.IsNotFound(err) {
		return mapErr("destroy domain "+sb.name, err)
	}
	return nil
}

func (b *Backend) waitShutoff(ctx context.Context, l *libvirt.Libvirt, dom libvirt.Domain, timeout time.Duration) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		st, _, err := l.DomainGetState(dom, 0)
		if libvirt.IsNotFound(err) || (err == nil && libvirt.DomainState(st) == libvirt.DomainShutoff) {
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

// Update applies changed resources: live on a running domain (schedinfo,
// memtune, balloon, vCPUs, blkiotune, tc) and to the persistent definition
// for the next start. vCPUs and memory can only move within the maximum the
// domain was defined with (Config.MaxVCPUs / MaxMemory); asking for more
// fails with ErrFailedPrecondition and changes nothing. pid_limit,
// cpuset_cpus and storage_limit changes take effect at the next start
// only; Usage lists them as unenforced meanwhile.
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
	newVCPUs := nd.VCPU.Value
	if nd.VCPU.Current != 0 {
		newVCPUs = nd.VCPU.Current
	}
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

	st, _, err := l.DomainGetState(dom, 0)
	if err != nil {
		return mapErr("domain state "+sb.name, err)
	}
	running := libvirt.DomainState(st) == libvirt.DomainRunning || libvirt.DomainState(st) == libvirt.DomainPaused
	if running {
		if err := b.applyLive(ctx, l, dom, nd, live); err != nil {
			return err
		}
		b.shape(ctx, sb, info)
		var notes []string
		r, o := info.Resources, sb.info.Resources
		if !eqPtr(r.PidLimit, o.PidLimit) {
			notes = append(notes, fmt.Sprintf("pid_limit: unenforced: changed to %s while running; the guest applies it at the next start", fmtInt(r.PidLimit)))
		}
		if !eqPtr(r.CPUSetCPUs, o.CPUSetCPUs) {
			notes = append(notes, "cpuset_cpus: unenforced: changed while running; pinning applies at the next start")
		}
		if !eqPtr(r.StorageLimit, o.StorageLimit) {
			notes = append(notes, "storage_limit: unenforced: the disk keeps its size until the sandbox is recreated")
		}
		b.mu.Lock()
		for _, p := range []string{"pid_limit:", "cpuset_cpus:", "storage_limit:"} {
			sb.unenforced = replaceNotes(sb.unenforced, p, nil)
		}
		sb.unenforced = append(sb.unenforced, notes...)
		b.mu.Unlock()
	}
	x, err := nd.Marshal()
	if err != nil {
		return err
	}
	if _, err := l.DomainDefineXML(x); err != nil {
		return mapErr("redefine domain "+sb.name, err)
	}
	b.mu.Lock()
	sb.info, sb.def, sb.live = info, nd, live
	b.mu.Unlock()
	logger.WithField("running", running).Debug("vm sandbox updated")
	return nil
}

func (b *Backend) applyLive(ctx context.Context, l *libvirt.Libvirt, dom libvirt.Domain, nd *Domain, live LiveTunables) error {
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

// Usage samples the domain: CPU time (and percent since the previous
// sample), the balloon's memory statistics, disk and network counters, the
// limits the usage exceeds and the limits that are not enforced.
//
// Violations: memory_usage (guest memory in use: available - usable)
// above memory_limit, and CPU use above cpu_limit by more than 10% (CFS
// lets a quota overshoot within a period).
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

	r := info.Resources
	if r.MemoryLimit != nil && u.MemoryUsage != nil && *u.MemoryUsage > uint64(*r.MemoryLimit) {
		u.Violations = append(u.Violations, fmt.Sprintf("memory_usage %s > memory_limit %s",
			fmtBytes(*u.MemoryUsage), fmtBytes(uint64(*r.MemoryLimit))))
	}
	if r.CPULimit != nil && u.CPUPercent != nil && *u.CPUPercent > *r.CPULimit*100*1.1 {
		u.Violations = append(u.Violations, fmt.Sprintf("cpu_percent %.1f > cpu_limit %.3g cores", *u.CPUPercent, *r.CPULimit))
	}
	if r.CPUSetMems != nil && *r.CPUSetMems != "" {
		u.Unenforced = append(u.Unenforced, "cpuset_mems: unenforced: the vm backend does not set NUMA placement")
	}
	if len(r.HugepageLimits) > 0 {
		u.Unenforced = append(u.Unenforced, "hugepage_limits: unenforced: guests are not backed by hugepages")
	}
	return u, nil
}

// Recover re-attaches to a sandbox after a restart of the daemon.
func (b *Backend) Recover(ctx context.Context, id, dir string, info resourceinfo.ResourceInfo, running bool, exited ExitFunc) (bool, error) {
	logger := log.G(ctx).WithField("sandbox", id)
	sb := b.newSandbox(id, dir, info)
	if d, err := DomainFor(id, dir, info, b.cfg); err == nil {
		sb.live = d.SplitLive()
	}
	l, err := b.lv()
	if err != nil {
		return false, err
	}
	dom, err := l.DomainLookupByName(sb.name)
	if libvirt.IsNotFound(err) {
		b.put(sb)
		logger.Info("vm sandbox has no domain")
		return false, nil
	} else if err != nil {
		return false, mapErr("look up domain "+sb.name, err)
	}
	if md, _ := domainMetadata(l, dom); md == nil || md.ID != id {
		return false, fmt.Errorf("domain %s does not belong to sandbox %q: %w", sb.name, id, errdefs.ErrFailedPrecondition)
	}
	if x, err := l.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive); err == nil {
		if d, err := ParseDomain(x); err == nil {
			sb.def = d
		}
	}
	st, _, err := l.DomainGetState(dom, 0)
	if err != nil {
		return false, mapErr("domain state "+sb.name, err)
	}
	alive := libvirt.DomainState(st) == libvirt.DomainRunning || libvirt.DomainState(st) == libvirt.DomainPaused ||
		libvirt.DomainState(st) == libvirt.DomainBlocked
	b.put(sb)
	if !alive {
		b.unshape(ctx, sb)
		logger.WithField("expected_running", running).Info("vm sandbox domain is not running")
		return false, nil
	}
	if !running {
		logger.Warn("vm sandbox domain runs although the state says stopped")
	}
	b.shape(ctx, sb, info) // idempotent; restores shaping a crash may have cut short
	b.mu.Lock()
	sb.exited, sb.watching = exited, true
	b.mu.Unlock()
	b.poke()
	logger.Info("vm sandbox recovered")
	return true, nil
}

// Delete destroys and undefines the domain and removes the files the
// backend created in the sandbox directory.
func (b *Backend) Delete(ctx context.Context, id string) error {
	b.mu.Lock()
	sb, ok := b.sandboxes[id]
	if ok {
		sb.watching = false
	}
	b.mu.Unlock()
	l, err := b.lv()
	if err != nil {
		return err
	}
	name := DomainName(b.cfg.NamePrefix, id)
	dir := ""
	if ok {
		dir = sb.dir
	}
	dom, err := l.DomainLookupByName(name)
	switch {
	case err == nil:
		md, _ := domainMetadata(l, dom)
		if md != nil && md.ID != id {
			return fmt.Errorf("domain %s does not belong to sandbox %q: %w", name, id, errdefs.ErrFailedPrecondition)
		}
		if dir == "" && md != nil {
			dir = md.Dir
		}
		if err := b.removeDomain(ctx, l, dom); err != nil {
			return err
		}
	case libvirt.IsNotFound(err):
	default:
		return mapErr("look up domain "+name, err)
	}
	unshapeEgress(ctx, "", IFBName(id))
	if dir != "" {
		removeFiles(dir)
	}
	if ok {
		b.forget(sb)
	}
	return nil
}

func (b *Backend) removeDomain(ctx context.Context, l *libvirt.Libvirt, dom libvirt.Domain) error {
	if err := l.DomainDestroy(dom); err != nil && !isNotRunning(err) && !libvirt.IsNotFound(err) {
		return mapErr("destroy domain "+dom.Name, err)
	}
	if err := l.DomainUndefineFlags(dom, libvirt.DomainUndefineNvram); err != nil && !libvirt.IsNotFound(err) {
		return mapErr("undefine domain "+dom.Name, err)
	}
	return nil
}

func removeFiles(dir string) {
	for _, f := range []string{DiskFile, ConsoleFile, ReadyFile} {
		_ = os.Remove(filepath.Join(dir, f))
	}
}

// Cleanup destroys and undefines every domain that carries the
// sandboxer's metadata but whose sandbox id is not in known, removes its
// files and ifb device, and returns the ids it removed. Domains without
// our metadata are never touched.
func (b *Backend) Cleanup(ctx context.Context, known map[string]bool) ([]string, error) {
	l, err := b.lv()
	if err != nil {
		return nil, err
	}
	doms, _, err := l.ConnectListAllDomains(1, 0)
	if err != nil {
		return nil, mapErr("list domains", err)
	}
	var removed []string
	var errs []error
	for _, dom := range doms {
		md, err := domainMetadata(l, dom)
		if err != nil || md == nil || known[md.ID] {
			continue
		}
		log.G(ctx).WithField("sandbox", md.ID).WithField("domain", dom.Name).Info("removing domain of unknown sandbox")
		if err := b.removeDomain(ctx, l, dom); err != nil {
			errs = append(errs, err)
			continue
		}
		unshapeEgress(ctx, "", IFBName(md.ID))
		if md.Dir != "" && filepath.IsAbs(md.Dir) {
			removeFiles(md.Dir)
		}
		b.mu.Lock()
		if sb, ok := b.sandboxes[md.ID]; ok {
			sb.watching = false
			delete(b.sandboxes, md.ID)
			delete(b.byName, sb.name)
		}
		b.mu.Unlock()
		removed = append(removed, md.ID)
	}
	return removed, errors.Join(errs...)
}

// domainMetadata returns our metadata element of dom, nil if it has none.
func domainMetadata(l *libvirt.Libvirt, dom libvirt.Domain) (*SandboxMetadata, error) {
	x, err := l.DomainGetMetadata(dom, int32(libvirt.DomainMetadataElement), libvirt.OptString{MetadataNamespace}, 0)
	if err != nil {
		if isCode(err, libvirt.ErrNoDomainMetadata) {
			return nil, nil
		}
		return nil, err
	}
	var m SandboxMetadata
	if err := xml.Unmarshal([]byte(x), &m); err != nil {
		return nil, err
	}
	return &m, nil
}

// --- exit watching -------------------------------------------------------

// poke makes the watcher re-check the watched domains now.
func (b *Backend) poke() {
	select {
	case b.wakeup <- struct{}{}:
	default:
	}
}

// watch turns lifecycle events (and, as a safety net, a periodic state
// poll and a poll after every reconnection) into ExitFunc calls.
func (b *Backend) watch(ctx context.Context) {
	defer close(b.done)
	tick := time.NewTicker(b.opts.PollInterval)
	defer tick.Stop()
	for ctx.Err() == nil {
		var events <-chan libvirt.DomainEventLifecycleMsg
		evctx, cancel := context.WithCancel(ctx)
		if l, err := b.lv(); err == nil {
			events, err = l.LifecycleEvents(evctx)
			if err != nil {
				log.G(ctx).WithError(err).Warn("vm backend: lifecycle events unavailable; polling")
			}
		}
		b.pollAll(ctx)
	loop:
		for {
			select {
			case <-ctx.Done():
				break loop
			case ev, ok := <-events:
				if !ok {
					events = nil
					break loop // reconnect and resubscribe
				}
				b.onEvent(ctx, ev)
			case <-tick.C:
				b.pollAll(ctx)
				if events == nil {
					break loop // try to subscribe again
				}
			case <-b.wakeup:
				b.pollAll(ctx)
			}
		}
		cancel()
		if ctx.Err() == nil {
			select {
			case <-ctx.Done():
			case <-time.After(500 * time.Millisecond):
			}
		}
	}
}

func (b *Backend) onEvent(ctx context.Context, ev libvirt.DomainEventLifecycleMsg) {
	if libvirt.DomainEventType(ev.Event) != libvirt.DomainEventStopped {
		return
	}
	code := ExitFailed
	switch libvirt.DomainEventStoppedDetailType(ev.Detail) {
	case libvirt.DomainEventStoppedShutdown:
		code = ExitShutdown
	case libvirt.DomainEventStoppedDestroyed:
		code = ExitDestroyed
	}
	b.exitedByName(ctx, ev.Dom.Name, code)
}

func (b *Backend) pollAll(ctx context.Context) {
	b.mu.Lock()
	var names []string
	for name, sb := range b.byName {
		if sb.watching {
			names = append(names, name)
		}
	}
	b.mu.Unlock()
	if len(names) == 0 {
		return
	}
	l, err := b.lv()
	if err != nil {
		return
	}
	for _, name := range names {
		dom, err := l.DomainLookupByName(name)
		if libvirt.IsNotFound(err) {
			b.exitedByName(ctx, name, ExitDestroyed)
			continue
		} else if err != nil {
			continue
		}
		st, reason, err := l.DomainGetState(dom, 0)
		if err != nil || libvirt.DomainState(st) != libvirt.DomainShutoff {
			continue
		}
		code := ExitFailed
		switch libvirt.DomainShutoffReason(reason) {
		case libvirt.DomainShutoffShutdown:
			code = ExitShutdown
		case libvirt.DomainShutoffDestroyed:
			code = ExitDestroyed
		}
		b.exitedByName(ctx, name, code)
	}
}

// exitedByName calls the sandbox's ExitFunc once, unless Stop or Delete
// was called for it.
func (b *Backend) exitedByName(ctx context.Context, name string, code uint32) {
	b.mu.Lock()
	sb, ok := b.byName[name]
	if !ok || !sb.watching {
		b.mu.Unlock()
		return
	}
	sb.watching = false
	f := sb.exited
	sb.exited = nil
	b.mu.Unlock()
	log.G(ctx).WithField("sandbox", sb.id).WithField("code", code).Info("vm sandbox exited")
	b.unshape(ctx, sb)
	if f != nil {
		f(code, time.Now())
	}
}

// --- small helpers -------------------------------------------------------

func uuidString(u libvirt.UUID) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

func nonNeg(v int64) *uint64 {
	if v < 0 {
		return nil
	}
	return ptr(uint64(v))
}

// eqPtr reports whether two optional values are both unset or equal.
func eqPtr[T comparable](a, b *T) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

func fmtInt(p *int64) string {
	if p == nil {
		return "unlimited"
	}
	return strconv.FormatInt(*p, 10)
}

func fmtBytes(v uint64) string {
	switch {
	case v >= 1<<30 && v%(1<<30) == 0:
		return fmt.Sprintf("%dGi", v>>30)
	case v >= 1<<20:
		return fmt.Sprintf("%.0fMi", float64(v)/(1<<20))
	default:
		return strconv.FormatUint(v, 10)
	}
}
