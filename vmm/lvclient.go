package vmm

import (
	"context"

	"github.com/digitalocean/go-libvirt"
)

// lvClient is the part of go-libvirt's *libvirt.Libvirt the backend
// calls. Unit tests fake it (fakeLibvirt); everything else uses libvirtd.
type lvClient interface {
	IsConnected() bool
	Disconnect() error
	ConnectGetDomainCapabilities(emulatorbin, arch, machine, virttype libvirt.OptString, flags libvirt.ConnectGetDomainCapabilitiesFlags) (string, error)
	ConnectListAllDomains(needResults int32, flags libvirt.ConnectListAllDomainsFlags) ([]libvirt.Domain, uint32, error)
	LifecycleEvents(ctx context.Context) (<-chan libvirt.DomainEventLifecycleMsg, error)

	DomainLookupByName(name string) (libvirt.Domain, error)
	DomainDefineXML(xml string) (libvirt.Domain, error)
	DomainUndefineFlags(dom libvirt.Domain, flags libvirt.DomainUndefineFlagsValues) error
	DomainGetXMLDesc(dom libvirt.Domain, flags libvirt.DomainXMLFlags) (string, error)
	DomainGetMetadata(dom libvirt.Domain, typ int32, uri libvirt.OptString, flags libvirt.DomainModificationImpact) (string, error)
	DomainCreate(dom libvirt.Domain) error
	DomainShutdown(dom libvirt.Domain) error
	DomainDestroy(dom libvirt.Domain) error
	DomainGetState(dom libvirt.Domain, flags uint32) (int32, int32, error)
	DomainGetInfo(dom libvirt.Domain) (uint8, uint64, uint64, uint16, uint64, error)

	DomainSetSchedulerParametersFlags(dom libvirt.Domain, params []libvirt.TypedParam, flags uint32) error
	DomainSetMemoryParameters(dom libvirt.Domain, params []libvirt.TypedParam, flags uint32) error
	DomainSetMemoryFlags(dom libvirt.Domain, memory uint64, flags uint32) error
	DomainGetVcpusFlags(dom libvirt.Domain, flags uint32) (int32, error)
	DomainSetVcpusFlags(dom libvirt.Domain, nvcpus uint32, flags uint32) error
	DomainSetBlockIOTune(dom libvirt.Domain, disk string, params []libvirt.TypedParam, flags uint32) error

	DomainMemoryStats(dom libvirt.Domain, maxStats uint32, flags uint32) ([]libvirt.DomainMemoryStat, error)
	DomainBlockStats(dom libvirt.Domain, path string) (int64, int64, int64, int64, int64, error)
	DomainInterfaceStats(dom libvirt.Domain, device string) (int64, int64, int64, int64, int64, int64, int64, int64, error)
}

var _ lvClient = (*libvirt.Libvirt)(nil)
