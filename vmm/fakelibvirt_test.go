package vmm

import (
	"context"
	"crypto/sha256"
	"encoding/xml"
	"os"
	"path/filepath"
	"sync"

	"github.com/digitalocean/go-libvirt"
)

// fakeLibvirt is an in-memory libvirtd for unit tests: domains with their
// persistent XML, state and live values, lifecycle events, and failures
// to inject per method.
type fakeLibvirt struct {
	mu     sync.Mutex
	doms   map[string]*fakeDom
	fail   map[string]error // method -> error, until cleared
	once   map[string]error // method -> error of its next call
	events chan libvirt.DomainEventLifecycleMsg
	// onCreate runs when a domain starts (writes READY for the fake guest).
	onCreate func(d *fakeDom)
	// onShutdown runs on an ACPI press; by default the domain powers off.
	onShutdown func(d *fakeDom)
	calls      []string
}

type fakeDom struct {
	dom    libvirt.Domain
	xml    string
	def    *Domain
	state  libvirt.DomainState
	reason int32
	// live values
	quota   int64
	shares  uint64
	hard    uint64
	soft    uint64
	balloon uint64
	vcpus   int32
	readBps uint64
}

func newFakeLibvirt() *fakeLibvirt {
	return &fakeLibvirt{doms: map[string]*fakeDom{}, fail: map[string]error{}, once: map[string]error{}, events: make(chan libvirt.DomainEventLifecycleMsg, 16)}
}

func (f *fakeLibvirt) call(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, name)
	if err := f.once[name]; err != nil {
		delete(f.once, name)
		return err
	}
	return f.fail[name]
}

func (f *fakeLibvirt) failOnce(name string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.once[name] = err
}

func (f *fakeLibvirt) setFail(name string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		delete(f.fail, name)
	} else {
		f.fail[name] = err
	}
}

func (f *fakeLibvirt) get(name string) *fakeDom {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.doms[name]
}

func noDomain(name string) error {
	return libvirt.Error{Code: uint32(libvirt.ErrNoDomain), Message: "Domain not found: no domain with matching name '" + name + "'"}
}

func notRunning() error {
	return libvirt.Error{Code: uint32(libvirt.ErrOperationInvalid), Message: "Requested operation is not valid: domain is not running"}
}

// stop powers a domain off with a reason, as a crash or a guest poweroff
// would, and sends the lifecycle event.
func (f *fakeLibvirt) stop(name string, detail libvirt.DomainEventStoppedDetailType) {
	f.mu.Lock()
	d := f.doms[name]
	if d != nil {
		d.state = libvirt.DomainShutoff
		d.reason = int32(detail)
	}
	f.mu.Unlock()
	if d != nil {
		f.events <- libvirt.DomainEventLifecycleMsg{Dom: d.dom, Event: int32(libvirt.DomainEventStopped), Detail: int32(detail)}
	}
}

func (f *fakeLibvirt) IsConnected() bool { return true }
func (f *fakeLibvirt) Disconnect() error { return nil }
func (f *fakeLibvirt) ConnectGetDomainCapabilities(_, _, _, _ libvirt.OptString, _ libvirt.ConnectGetDomainCapabilitiesFlags) (string, error) {
	return "", libvirt.Error{Code: uint32(libvirt.ErrNoSupport), Message: "no kvm"}
}

func (f *fakeLibvirt) ConnectListAllDomains(int32, libvirt.ConnectListAllDomainsFlags) ([]libvirt.Domain, uint32, error) {
	if err := f.call("ConnectListAllDomains"); err != nil {
		return nil, 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []libvirt.Domain
	for _, d := range f.doms {
		out = append(out, d.dom)
	}
	return out, uint32(len(out)), nil
}

func (f *fakeLibvirt) LifecycleEvents(ctx context.Context) (<-chan libvirt.DomainEventLifecycleMsg, error) {
	out := make(chan libvirt.DomainEventLifecycleMsg)
	go func() {
		defer close(out)
		for {
			select {
			case <-ctx.Done():
				return
			case ev := <-f.events:
				select {
				case out <- ev:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out, nil
}

func (f *fakeLibvirt) DomainLookupByName(name string) (libvirt.Domain, error) {
	if err := f.call("DomainLookupByName"); err != nil {
		return libvirt.Domain{}, err
	}
	if d := f.get(name); d != nil {
		return d.dom, nil
	}
	return libvirt.Domain{}, noDomain(name)
}

func (f *fakeLibvirt) DomainDefineXML(x string) (libvirt.Domain, error) {
	if err := f.call("DomainDefineXML"); err != nil {
		return libvirt.Domain{}, err
	}
	d, err := ParseDomain(x)
	if err != nil {
		return libvirt.Domain{}, libvirt.Error{Code: uint32(libvirt.ErrXMLError), Message: err.Error()}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	fd := f.doms[d.Name]
	if fd == nil {
		fd = &fakeDom{state: libvirt.DomainShutoff}
		fd.dom.Name = d.Name
		copy(fd.dom.UUID[:], func() []byte { h := sha256.Sum256([]byte(d.Name)); return h[:16] }())
		f.doms[d.Name] = fd
	}
	fd.xml, fd.def = x, d
	return fd.dom, nil
}

func (f *fakeLibvirt) DomainUndefineFlags(dom libvirt.Domain, _ libvirt.DomainUndefineFlagsValues) error {
	if err := f.call("DomainUndefineFlags"); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.doms[dom.Name]; !ok {
		return noDomain(dom.Name)
	}
	delete(f.doms, dom.Name)
	return nil
}

func (f *fakeLibvirt) DomainGetXMLDesc(dom libvirt.Domain, _ libvirt.DomainXMLFlags) (string, error) {
	if err := f.call("DomainGetXMLDesc"); err != nil {
		return "", err
	}
	if d := f.get(dom.Name); d != nil {
		return d.xml, nil
	}
	return "", noDomain(dom.Name)
}

func (f *fakeLibvirt) DomainGetMetadata(dom libvirt.Domain, _ int32, _ libvirt.OptString, _ libvirt.DomainModificationImpact) (string, error) {
	if err := f.call("DomainGetMetadata"); err != nil {
		return "", err
	}
	d := f.get(dom.Name)
	if d == nil {
		return "", noDomain(dom.Name)
	}
	if d.def.Metadata == nil || d.def.Metadata.Sandbox == nil {
		return "", libvirt.Error{Code: uint32(libvirt.ErrNoDomainMetadata), Message: "no metadata"}
	}
	b, _ := xml.Marshal(d.def.Metadata.Sandbox)
	return string(b), nil
}

func (f *fakeLibvirt) DomainCreate(dom libvirt.Domain) error {
	if err := f.call("DomainCreate"); err != nil {
		return err
	}
	f.mu.Lock()
	d := f.doms[dom.Name]
	if d == nil {
		f.mu.Unlock()
		return noDomain(dom.Name)
	}
	d.state = libvirt.DomainRunning
	d.balloon = d.def.CurrentMemory.Value
	d.quota, d.shares = -1, 1024
	if ct := d.def.CPUTune; ct != nil {
		if ct.GlobalQuota != nil {
			d.quota = *ct.GlobalQuota
		}
		if ct.Shares != nil {
			d.shares = *ct.Shares
		}
	}
	d.vcpus = int32(curVCPUs(d.def))
	hook := f.onCreate
	f.mu.Unlock()
	if hook != nil {
		hook(d)
	}
	return nil
}

func (f *fakeLibvirt) DomainShutdown(dom libvirt.Domain) error {
	if err := f.call("DomainShutdown"); err != nil {
		return err
	}
	d := f.get(dom.Name)
	if d == nil {
		return noDomain(dom.Name)
	}
	f.mu.Lock()
	hook := f.onShutdown
	f.mu.Unlock()
	if hook != nil {
		hook(d)
		return nil
	}
	f.stop(dom.Name, libvirt.DomainEventStoppedShutdown)
	return nil
}

func (f *fakeLibvirt) DomainDestroy(dom libvirt.Domain) error {
	if err := f.call("DomainDestroy"); err != nil {
		return err
	}
	d := f.get(dom.Name)
	if d == nil {
		return noDomain(dom.Name)
	}
	f.mu.Lock()
	running := d.state != libvirt.DomainShutoff
	f.mu.Unlock()
	if !running {
		return notRunning()
	}
	f.stop(dom.Name, libvirt.DomainEventStoppedDestroyed)
	return nil
}

func (f *fakeLibvirt) DomainGetState(dom libvirt.Domain, _ uint32) (int32, int32, error) {
	if err := f.call("DomainGetState"); err != nil {
		return 0, 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.doms[dom.Name]
	if d == nil {
		return 0, 0, noDomain(dom.Name)
	}
	return int32(d.state), d.reason, nil
}

func (f *fakeLibvirt) DomainGetInfo(dom libvirt.Domain) (uint8, uint64, uint64, uint16, uint64, error) {
	if err := f.call("DomainGetInfo"); err != nil {
		return 0, 0, 0, 0, 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.doms[dom.Name]
	if d == nil {
		return 0, 0, 0, 0, 0, noDomain(dom.Name)
	}
	return uint8(d.state), d.def.Memory.Value, d.balloon, uint16(d.vcpus), 1e9, nil
}

func (f *fakeLibvirt) running(name string) (*fakeDom, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.doms[name]
	if d == nil {
		return nil, noDomain(name)
	}
	if d.state == libvirt.DomainShutoff {
		return nil, notRunning()
	}
	return d, nil
}

func (f *fakeLibvirt) DomainSetSchedulerParametersFlags(dom libvirt.Domain, params []libvirt.TypedParam, _ uint32) error {
	if err := f.call("DomainSetSchedulerParametersFlags"); err != nil {
		return err
	}
	d, err := f.running(dom.Name)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, p := range params {
		switch p.Field {
		case libvirt.DomainSchedulerGlobalQuota:
			d.quota = p.Value.I.(int64)
		case libvirt.DomainSchedulerCPUShares:
			d.shares = p.Value.I.(uint64)
		}
	}
	return nil
}

func (f *fakeLibvirt) DomainSetMemoryParameters(dom libvirt.Domain, params []libvirt.TypedParam, _ uint32) error {
	if err := f.call("DomainSetMemoryParameters"); err != nil {
		return err
	}
	d, err := f.running(dom.Name)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, p := range params {
		switch p.Field {
		case libvirt.DomainMemoryHardLimit:
			d.hard = p.Value.I.(uint64)
		case libvirt.DomainMemorySoftLimit:
			d.soft = p.Value.I.(uint64)
		}
	}
	return nil
}

func (f *fakeLibvirt) DomainSetMemoryFlags(dom libvirt.Domain, memory uint64, _ uint32) error {
	if err := f.call("DomainSetMemoryFlags"); err != nil {
		return err
	}
	d, err := f.running(dom.Name)
	if err != nil {
		return err
	}
	f.mu.Lock()
	d.balloon = memory
	f.mu.Unlock()
	return nil
}

func (f *fakeLibvirt) DomainGetVcpusFlags(dom libvirt.Domain, _ uint32) (int32, error) {
	if err := f.call("DomainGetVcpusFlags"); err != nil {
		return 0, err
	}
	d, err := f.running(dom.Name)
	if err != nil {
		return 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return d.vcpus, nil
}

func (f *fakeLibvirt) DomainSetVcpusFlags(dom libvirt.Domain, n uint32, _ uint32) error {
	if err := f.call("DomainSetVcpusFlags"); err != nil {
		return err
	}
	d, err := f.running(dom.Name)
	if err != nil {
		return err
	}
	f.mu.Lock()
	d.vcpus = int32(n)
	f.mu.Unlock()
	return nil
}

func (f *fakeLibvirt) DomainSetBlockIOTune(dom libvirt.Domain, _ string, params []libvirt.TypedParam, _ uint32) error {
	if err := f.call("DomainSetBlockIOTune"); err != nil {
		return err
	}
	d, err := f.running(dom.Name)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, p := range params {
		if p.Field == libvirt.DomainBlockIotuneReadBytesSec {
			d.readBps = p.Value.I.(uint64)
		}
	}
	return nil
}

func (f *fakeLibvirt) DomainMemoryStats(libvirt.Domain, uint32, uint32) ([]libvirt.DomainMemoryStat, error) {
	return nil, f.call("DomainMemoryStats")
}

func (f *fakeLibvirt) DomainBlockStats(libvirt.Domain, string) (int64, int64, int64, int64, int64, error) {
	return 0, 0, 0, 0, 0, f.call("DomainBlockStats")
}

func (f *fakeLibvirt) DomainInterfaceStats(libvirt.Domain, string) (int64, int64, int64, int64, int64, int64, int64, int64, error) {
	return 0, 0, 0, 0, 0, 0, 0, 0, f.call("DomainInterfaceStats")
}

var _ lvClient = (*fakeLibvirt)(nil)

// fakeGuestFiles are the guest files New checks for, in a temp dir.
func fakeGuestFiles(dir string) Config {
	for _, f := range []string{"vmlinux", "initramfs.cpio.gz", "base.qcow2"} {
		_ = os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o644)
	}
	return Config{GuestDir: dir, Network: NetworkNone, NamePrefix: "rss-unit-"}
}
