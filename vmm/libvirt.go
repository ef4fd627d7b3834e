package vmm

import (
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

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/vmm/mounts"
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
	// ReadyTimeout bounds Start's wait for the guest's READY and for its
	// agent's first answer (default 60s).
	ReadyTimeout time.Duration
	// PollInterval is how often the exit watcher double-checks the state of
	// the watched domains besides the lifecycle events (default 5s).
	PollInterval time.Duration
	// QEMUImg is the qemu-img binary (default "qemu-img").
	QEMUImg string
	// PidDir is where libvirt writes <domain>.pid (default /run/libvirt/qemu).
	PidDir string
	// Dialer returns the dialer of the agent of the sandbox in dir
	// (default: agent/transport's SerialDialer on AgentSocketPath).
	Dialer func(dir string) Dialer
}

// Backend is the "vm" sandbox backend: one libvirt domain per sandbox, and
// the containers of its pod in it. It implements backend.Backend; it is
// safe for concurrent use, and calls for one sandbox are expected to be
// serialized by the caller.
type Backend struct {
	cfg  Config
	opts Options
	dial func() (lvClient, error) // connects to libvirtd

	connMu sync.Mutex
	conn   lvClient

	mu        sync.Mutex
	sandboxes map[string]*sandbox // by id
	byName    map[string]*sandbox // by domain name
	events    backend.Events

	// bgctx is the context of the background work (exit watcher, guest
	// connections, stdio copiers); Close cancels it and waits for wg.
	bgctx    context.Context
	bgcancel context.CancelFunc
	wg       sync.WaitGroup
	wakeup   chan struct{}
}

var _ backend.Backend = (*Backend)(nil)

type sandbox struct {
	id, dir, name string
	tap, ifb      string
	info          resourceinfo.ResourceInfo
	pod           podRecord // what SetupSandbox gives the guest (PodFile)
	def           *Domain   // the definition as last defined (live tunables split off)
	live          LiveTunables

	// exit watching, guarded by Backend.mu. stopping: a Stop is under way,
	// its exit is not one to report unless the Stop fails.
	exited   ExitFunc
	watching bool
	stopping bool

	// The guest, guarded by Backend.mu: its connection while the VM runs,
	// and the containers in it.
	guest       *guestConn
	guestCancel context.CancelFunc
	containers  map[string]*ctr
	// gone: Recover found the domain gone or stopped, so the recorded
	// containers died with it.
	gone bool

	unenforced []string // guarded by Backend.mu
	// previous CPU samples, for CPUPercent: the VM's and each container's
	// (guest cgroup time), guarded by Backend.mu
	lastCPU uint64
	lastAt  time.Time
	lastCtr map[string]cpuSample
	lastPod cpuSample
}

type cpuSample struct {
	usec uint64
	at   time.Time
}

// New connects to libvirtd, decides the accelerator once (cfg.Accel auto:
// kvm when it works, TCG otherwise) and starts the exit watcher. Close
// stops it.
func New(ctx context.Context, cfg Config, opts Options) (*Backend, error) {
	cfg = cfg.WithDefaults()
	socket := cfg.Socket
	return newBackend(ctx, cfg, opts, func() (lvClient, error) {
		l := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(socket), dialers.WithLocalTimeout(5*time.Second)))
		if err := l.Connect(); err != nil {
			return nil, mapErr("connect to libvirtd at "+socket, err)
		}
		return l, nil
	})
}

func newBackend(ctx context.Context, cfg Config, opts Options, dial func() (lvClient, error)) (*Backend, error) {
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
	if opts.Dialer == nil {
		socketDir := cfg.SocketDir
		opts.Dialer = func(dir string) Dialer { return serialDialer(AgentSocketPath(dir, socketDir)) }
	}
	cfg.BootImages = 0
	for _, f := range []struct{ name, path string }{{"kernel", cfg.Kernel}, {"initrd", cfg.Initrd}, {"base disk", cfg.BaseDisk}} {
		if f.path == "" {
			return nil, fmt.Errorf("no guest %s configured (set GuestDir; see scripts/build-guest.sh): %w", f.name, errdefs.ErrInvalidArgument)
		}
		fi, err := os.Stat(f.path)
		if err != nil {
			return nil, fmt.Errorf("guest %s: %w: %w", f.name, err, errdefs.ErrNotFound)
		}
		if f.path != cfg.BaseDisk {
			cfg.BootImages += fi.Size()
		}
	}
	// Whole MiB: the kernel rounds memory limits to pages, libvirt
	// reports what it set.
	cfg.BootImages = (cfg.BootImages + mib - 1) / mib * mib
	if err := checkGuestAgent(cfg); err != nil {
		return nil, err
	}
	bgctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	b := &Backend{
		cfg:       cfg,
		opts:      opts,
		dial:      dial,
		sandboxes: map[string]*sandbox{},
		byName:    map[string]*sandbox{},
		bgctx:     bgctx,
		bgcancel:  cancel,
		wakeup:    make(chan struct{}, 1),
	}
	l, err := b.lv()
	if err != nil {
		cancel()
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
		cancel()
		return nil, fmt.Errorf("accel %q: %w", cfg.Accel, errdefs.ErrInvalidArgument)
	}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		b.watch(bgctx)
	}()
	return b, nil
}

// DomainType is the domain type New chose ("kvm" or "qemu", i.e. TCG).
func (b *Backend) DomainType() string { return b.cfg.DomainType }

// Config is the backend's effective configuration.
func (b *Backend) Config() Config { return b.cfg }

// Close stops the background work (the exit watcher, the guest
// connections and event watchers, the stdio copiers), waits for it to end
// and disconnects. Domains and their containers keep running; the stdio
// keepers keep containerd's FIFOs open for the next daemon.
func (b *Backend) Close() error {
	b.bgcancel()
	b.mu.Lock()
	var copiers []*stdioCopier
	for _, sb := range b.sandboxes {
		for _, pr := range sb.allProcs() {
			if pr.copier != nil {
				copiers = append(copiers, pr.copier)
			}
		}
	}
	b.mu.Unlock()
	for _, c := range copiers {
		c.stop(0, false)
	}
	b.wg.Wait()
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
func (b *Backend) lv() (lvClient, error) {
	b.connMu.Lock()
	defer b.connMu.Unlock()
	if b.conn != nil && b.conn.IsConnected() {
		return b.conn, nil
	}
	l, err := b.dial()
	if err != nil {
		return nil, err
	}
	b.conn = l
	return l, nil
}

// probeKVM decides whether kvm domains can run: /dev/kvm must open and
// create a VM, the host CPU must have vmx/svm (without it, as under some
// nested setups, /dev/kvm exists but guests hang), and libvirt must offer
// the kvm domain type.
func probeKVM(l lvClient) (bool, string) {
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
	sb := &sandbox{id: id, dir: dir, info: info, name: DomainName(b.cfg.NamePrefix, id), containers: map[string]*ctr{}}
	if b.cfg.Network == NetworkEthernet {
		sb.tap, sb.ifb = TapName(id), IFBName(id)
	}
	return sb
}

// Create defines the sandbox's domain, creates its overlay disk and
// writes the pod's files and record (see EtcDir). On failure it leaves
// nothing behind.
func (b *Backend) Create(ctx context.Context, id, dir string, info resourceinfo.ResourceInfo, pod backend.Pod) (retErr error) {
	logger := log.G(ctx).WithField("sandbox", id)
	if _, err := b.get(id); err == nil {
		return fmt.Errorf("vm sandbox %q: %w", id, errdefs.ErrAlreadyExists)
	}
	d, err := DomainFor(id, dir, info, b.cfg)
	if err != nil {
		return err
	}
	rec, err := guestPod(pod)
	if err != nil {
		return fmt.Errorf("vm sandbox %q: %w", id, err)
	}
	sb := b.newSandbox(id, dir, info)
	sb.pod = rec
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
		return qemuImgErr(ctx, b.opts.QEMUImg, args, out, err)
	}
	defer func() {
		if retErr != nil {
			_ = os.Remove(disk)
		}
	}()
	if err := writePodFiles(dir, pod, rec); err != nil {
		return fmt.Errorf("vm sandbox %q: %w", id, err)
	}
	defer func() {
		if retErr != nil {
			removePodFiles(dir)
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
func (b *Backend) applyLiveMemory(l lvClient, dom libvirt.Domain, lt LiveTunables) error {
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
func (b *Backend) destroy(ctx context.Context, l lvClient, dom libvirt.Domain) {
	if err := l.DomainDestroy(dom); err != nil && !isNotRunning(err) && !libvirt.IsNotFound(err) {
		log.G(ctx).WithError(err).WithField("domain", dom.Name).Warn("destroy domain")
	}
}

// Delete destroys and undefines the domain, unmounts everything of its
// containers, ends their stdio keepers and removes the files the backend
// created in the sandbox directory. The mounts go before the domain's
// definition, whose metadata names the directory: a crash in between
// leaves a domain that Cleanup finds.
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
	found := false
	switch {
	case err == nil:
		md, _ := domainMetadata(l, dom)
		if md != nil && md.ID != id {
			return fmt.Errorf("domain %s does not belong to sandbox %q: %w", name, id, errdefs.ErrFailedPrecondition)
		}
		if dir == "" && md != nil {
			dir = md.Dir
		}
		if err := l.DomainDestroy(dom); err != nil && !isNotRunning(err) && !libvirt.IsNotFound(err) {
			return mapErr("destroy domain "+dom.Name, err)
		}
		found = true
	case libvirt.IsNotFound(err):
	default:
		return mapErr("look up domain "+name, err)
	}
	if ok {
		b.guestGone(sb)
	}
	b.killKeepers(id, nil)
	if dir != "" {
		if err := mounts.Teardown(dir); err != nil {
			return fmt.Errorf("vm sandbox %q: %w", id, err)
		}
	}
	if found {
		if err := l.DomainUndefineFlags(dom, libvirt.DomainUndefineNvram); err != nil && !libvirt.IsNotFound(err) {
			return mapErr("undefine domain "+dom.Name, err)
		}
	}
	unshapeEgress(ctx, "", IFBName(id))
	if dir != "" {
		removeFiles(dir, b.cfg.SocketDir)
	}
	if ok {
		b.forget(sb)
	}
	return nil
}

// killKeepers ends the stdio keepers of sandbox id whose process keep
// does not want (nil: all of them).
func (b *Backend) killKeepers(id string, keep func(key string) bool) {
	for key, pid := range findKeepers(func(key string) bool { return strings.HasPrefix(key, id+"/") }) {
		if keep == nil || !keep(key) {
			killKeeper(key, pid)
		}
	}
}

func removeFiles(dir, socketDir string) {
	for _, f := range []string{DiskFile, ConsoleFile, ReadyFile} {
		_ = os.Remove(filepath.Join(dir, f))
	}
	_ = os.Remove(AgentSocketPath(dir, socketDir))
	removePodFiles(dir)
}

// Cleanup destroys and undefines every domain that carries the
// sandboxer's metadata with this backend's owner and the name this backend
// gives it but whose sandbox id is not in
// known, unmounts and removes its files and ifb device, and returns the
// ids it removed. Domains without our metadata are never touched. For the
// known sandboxes it unmounts what no recorded container owns and ends
// the stdio keepers of processes that are not recorded (a crash between
// the removal of a record and its cleanup). Call it after the sandboxes
// and their containers were recovered.
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
		// Only our own domains: another daemon (another prefix) may share
		// this libvirtd.
		if err != nil || md == nil || known[md.ID] || dom.Name != DomainName(b.cfg.NamePrefix, md.ID) || md.Owner != b.cfg.Owner {
			continue
		}
		log.G(ctx).WithField("sandbox", md.ID).WithField("domain", dom.Name).Info("removing domain of unknown sandbox")
		if err := l.DomainDestroy(dom); err != nil && !isNotRunning(err) && !libvirt.IsNotFound(err) {
			errs = append(errs, mapErr("destroy domain "+dom.Name, err))
			continue
		}
		b.killKeepers(md.ID, nil)
		if md.Dir != "" && filepath.IsAbs(md.Dir) {
			if err := mounts.Teardown(md.Dir); err != nil {
				errs = append(errs, err)
				continue
			}
		}
		if err := l.DomainUndefineFlags(dom, libvirt.DomainUndefineNvram); err != nil && !libvirt.IsNotFound(err) {
			errs = append(errs, mapErr("undefine domain "+dom.Name, err))
			continue
		}
		unshapeEgress(ctx, "", IFBName(md.ID))
		if md.Dir != "" && filepath.IsAbs(md.Dir) {
			removeFiles(md.Dir, b.cfg.SocketDir)
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
	// What the known sandboxes hold for containers and processes that
	// are not recorded; only once the containers were given back
	// (Containers was called, and its caller recovers them first).
	b.mu.Lock()
	if b.events == nil {
		b.mu.Unlock()
		log.G(ctx).Warn("vm backend: Cleanup before the containers were recovered; not sweeping their mounts")
		return removed, errors.Join(errs...)
	}
	var sbs []*sandbox
	for _, sb := range b.sandboxes {
		if known[sb.id] {
			sbs = append(sbs, sb)
		}
	}
	b.mu.Unlock()
	for _, sb := range sbs {
		b.mu.Lock()
		recorded := map[string]bool{}
		procs := map[string]bool{}
		for id, k := range sb.containers {
			recorded[id] = true
			for _, pr := range k.procs() {
				procs[procKey(pr.p)] = true
			}
		}
		b.mu.Unlock()
		gone, err := mounts.Sweep(sb.dir, func(id string) bool { return recorded[id] })
		if err != nil {
			errs = append(errs, fmt.Errorf("vm sandbox %s: %w", sb.id, err))
		}
		if len(gone) > 0 {
			log.G(ctx).WithField("sandbox", sb.id).WithField("containers", gone).Warn("unmounted the files of containers no record owns")
		}
		b.killKeepers(sb.id, func(key string) bool { return procs[key] })
	}
	return removed, errors.Join(errs...)
}

// domainMetadata returns our metadata element of dom, nil if it has none.
func domainMetadata(l lvClient, dom libvirt.Domain) (*SandboxMetadata, error) {
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
// was called for it. An exit while a Stop is under way is left to the
// Stop: if the Stop fails, it pokes the watcher, whose poll reports it.
func (b *Backend) exitedByName(ctx context.Context, name string, code uint32) {
	b.mu.Lock()
	sb, ok := b.byName[name]
	if !ok || !sb.watching || sb.stopping {
		b.mu.Unlock()
		return
	}
	sb.watching = false
	f := sb.exited
	sb.exited = nil
	b.mu.Unlock()
	log.G(ctx).WithField("sandbox", sb.id).WithField("code", code).Info("vm sandbox exited")
	b.unshape(ctx, sb)
	b.guestGone(sb)
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
