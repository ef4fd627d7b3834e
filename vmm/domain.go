// Package vmm is the "vm" sandbox backend: every pod sandbox runs in its own
// libvirt/QEMU domain sized from the sandbox's ResourceInfo.
//
// This file models the libvirt domain XML with typed encoding/xml structs
// (libvirt.org/go/libvirtxml is not used) and implements the size rules in
// DomainFor. Only the elements the backend writes are modelled; optional
// elements are pointers, values with a unit are chardata plus a unit
// attribute.
package vmm

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/xml"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/vmm/mounts"
)

// MetadataNamespace marks a domain as owned by the sandboxer. Cleanup only
// ever touches domains that carry it.
const MetadataNamespace = "https://github.com/kuasar-io/resource-slot-sandboxer/vm/v1"

// Files the backend keeps in a sandbox directory.
const (
	DiskFile    = "disk.qcow2"  // qcow2 overlay of the base disk
	ConsoleFile = "console.log" // serial console (kernel + init output)
	ReadyFile   = "ready.log"   // host side of the virtio-serial readiness port
	AgentSocket = "agent.sock"  // host side of the agent's virtio-serial port (QEMU listens)
)

// DefaultReadyPort is the virtio-serial port name the guest init announces
// readiness on (scripts/build-guest.sh, rss.port=).
const DefaultReadyPort = "org.kuasar.rss.ready"

// DefaultAgentPort is the virtio-serial port name the guest agent serves
// on (agent/transport).
const DefaultAgentPort = "org.kuasar.rss.agent"

// DefaultSharedTag is the virtio-fs tag of the sandbox's shared directory
// (SetupSandbox mounts it at mounts.GuestRoot).
const DefaultSharedTag = "rss-shared"

// DefaultVirtioFSD is the C virtiofsd of Debian 12's qemu-system-common.
const DefaultVirtioFSD = "/usr/lib/qemu/virtiofsd"

// DiskDev is the guest device name of the sandbox disk.
const DiskDev = "vda"

// Domain is <domain>.
type Domain struct {
	XMLName       xml.Name     `xml:"domain"`
	Type          string       `xml:"type,attr"`
	Name          string       `xml:"name"`
	UUID          string       `xml:"uuid,omitempty"`
	Metadata      *Metadata    `xml:"metadata"`
	MaxMemory     *MaxMemory   `xml:"maxMemory"`
	Memory        Memory       `xml:"memory"`
	CurrentMemory *Memory      `xml:"currentMemory"`
	MemoryBacking *MemBacking  `xml:"memoryBacking"`
	VCPU          VCPU         `xml:"vcpu"`
	CPUTune       *CPUTune     `xml:"cputune"`
	MemTune       *MemTune     `xml:"memtune"`
	OS            OS           `xml:"os"`
	Features      *Features    `xml:"features"`
	CPU           *CPU         `xml:"cpu"`
	OnPoweroff    string       `xml:"on_poweroff,omitempty"`
	OnReboot      string       `xml:"on_reboot,omitempty"`
	OnCrash       string       `xml:"on_crash,omitempty"`
	Devices       Devices      `xml:"devices"`
	Extra         []AnyElement `xml:",any"` // elements libvirt adds that we do not model
}

// AnyElement keeps an unmodelled element on a round trip through dumpxml.
type AnyElement struct {
	XMLName xml.Name
	Attrs   []xml.Attr `xml:",any,attr"`
	Inner   string     `xml:",innerxml"`
}

// Metadata is <metadata>; it holds our own element.
type Metadata struct {
	Sandbox *SandboxMetadata `xml:"https://github.com/kuasar-io/resource-slot-sandboxer/vm/v1 sandbox"`
	Other   []AnyElement     `xml:",any"`
}

// SandboxMetadata is <sandbox xmlns=MetadataNamespace>: which sandbox the
// domain belongs to and where its files are.
type SandboxMetadata struct {
	ID  string `xml:"id"`
	Dir string `xml:"dir"`
	// Owner names the daemon (its state directory, Config.Owner) whose
	// sandbox this is: Cleanup leaves other daemons' domains alone.
	Owner string `xml:"owner,omitempty"`
	// Tap is the host tap device, when the domain has one (tc shaping).
	Tap string `xml:"tap,omitempty"`
}

// Memory is a size with a unit (<memory unit='KiB'>N</memory>).
type Memory struct {
	Value uint64 `xml:",chardata"`
	Unit  string `xml:"unit,attr,omitempty"`
}

// MaxMemory is <maxMemory slots='N' unit='KiB'>: memory hotplug ceiling.
type MaxMemory struct {
	Value uint64 `xml:",chardata"`
	Unit  string `xml:"unit,attr,omitempty"`
	Slots uint   `xml:"slots,attr,omitempty"`
}

// MemBacking is <memoryBacking>: virtio-fs (vhost-user) needs the guest's
// RAM in shared memory, <source type='memfd'/><access mode='shared'/>.
type MemBacking struct {
	Source *MemBackingSource `xml:"source"`
	Access *MemBackingAccess `xml:"access"`
	Extra  []AnyElement      `xml:",any"`
}

// MemBackingSource is <source type='memfd'/>.
type MemBackingSource struct {
	Type string `xml:"type,attr"`
}

// MemBackingAccess is <access mode='shared'/>.
type MemBackingAccess struct {
	Mode string `xml:"mode,attr"`
}

// VCPU is <vcpu current='N'>MAX</vcpu>.
type VCPU struct {
	Placement string `xml:"placement,attr,omitempty"`
	Current   uint   `xml:"current,attr,omitempty"`
	Value     uint   `xml:",chardata"`
}

// CPUTune is <cputune>.
type CPUTune struct {
	Shares       *uint64      `xml:"shares"`
	Period       *uint64      `xml:"period"`
	Quota        *int64       `xml:"quota"`
	GlobalPeriod *uint64      `xml:"global_period"`
	GlobalQuota  *int64       `xml:"global_quota"`
	VCPUPins     []CPUTunePin `xml:"vcpupin"`
	EmulatorPin  *CPUTuneEPin `xml:"emulatorpin"`
	Extra        []AnyElement `xml:",any"`
}

// CPUTunePin is <vcpupin vcpu='N' cpuset='...'/>.
type CPUTunePin struct {
	VCPU   uint   `xml:"vcpu,attr"`
	CPUSet string `xml:"cpuset,attr"`
}

// CPUTuneEPin is <emulatorpin cpuset='...'/>.
type CPUTuneEPin struct {
	CPUSet string `xml:"cpuset,attr"`
}

// MemTune is <memtune>.
type MemTune struct {
	HardLimit     *Memory `xml:"hard_limit"`
	SoftLimit     *Memory `xml:"soft_limit"`
	SwapHardLimit *Memory `xml:"swap_hard_limit"`
}

// OS is <os> with direct kernel boot.
type OS struct {
	Type    OSType `xml:"type"`
	Kernel  string `xml:"kernel,omitempty"`
	Initrd  string `xml:"initrd,omitempty"`
	Cmdline string `xml:"cmdline,omitempty"`
}

// OSType is <type arch='x86_64' machine='q35'>hvm</type>.
type OSType struct {
	Arch    string `xml:"arch,attr,omitempty"`
	Machine string `xml:"machine,attr,omitempty"`
	Value   string `xml:",chardata"`
}

// Features is <features>.
type Features struct {
	ACPI *struct{}   `xml:"acpi"`
	APIC *struct{}   `xml:"apic"`
	TCG  *FeatureTCG `xml:"tcg"`
}

// FeatureTCG is <tcg><tb-cache unit='MiB'>N</tb-cache></tcg>: the size of
// TCG's translation cache (QEMU's default is 1 GiB, which a busy guest
// fills, and which counts against the memtune hard limit of QEMU).
type FeatureTCG struct {
	TBCache *Memory `xml:"tb-cache"`
}

// CPU is <cpu mode='...'/>.
type CPU struct {
	Mode string `xml:"mode,attr,omitempty"`
}

// Devices is <devices>.
type Devices struct {
	Emulator    string       `xml:"emulator,omitempty"`
	Disks       []Disk       `xml:"disk"`
	Filesystems []Filesystem `xml:"filesystem"`
	Interfaces  []Interface  `xml:"interface"`
	Serials     []CharDev    `xml:"serial"`
	Consoles    []CharDev    `xml:"console"`
	Channels    []CharDev    `xml:"channel"`
	MemBalloon  *MemBalloon  `xml:"memballoon"`
	Extra       []AnyElement `xml:",any"`
}

// Disk is <disk type='file' device='disk'>.
type Disk struct {
	Type   string       `xml:"type,attr"`
	Device string       `xml:"device,attr"`
	Driver *DiskDriver  `xml:"driver"`
	Source *DiskSource  `xml:"source"`
	Target DiskTarget   `xml:"target"`
	IOTune *IOTune      `xml:"iotune"`
	Extra  []AnyElement `xml:",any"`
}

// DiskDriver is <driver name='qemu' type='qcow2'/>.
type DiskDriver struct {
	Name string `xml:"name,attr"`
	Type string `xml:"type,attr"`
}

// DiskSource is <source file='...'/>.
type DiskSource struct {
	File string `xml:"file,attr"`
}

// DiskTarget is <target dev='vda' bus='virtio'/>.
type DiskTarget struct {
	Dev string `xml:"dev,attr"`
	Bus string `xml:"bus,attr,omitempty"`
}

// IOTune is <iotune>; zero values are omitted (libvirt: 0 = unlimited).
type IOTune struct {
	TotalBytesSec uint64 `xml:"total_bytes_sec,omitempty"`
	ReadBytesSec  uint64 `xml:"read_bytes_sec,omitempty"`
	WriteBytesSec uint64 `xml:"write_bytes_sec,omitempty"`
	TotalIOPSSec  uint64 `xml:"total_iops_sec,omitempty"`
	ReadIOPSSec   uint64 `xml:"read_iops_sec,omitempty"`
	WriteIOPSSec  uint64 `xml:"write_iops_sec,omitempty"`
}

// Filesystem is <filesystem type='mount' accessmode='passthrough'>: a host
// directory shared with the guest over virtio-fs; libvirt starts the
// virtiofsd of <binary> for it.
type Filesystem struct {
	Type       string            `xml:"type,attr"`
	AccessMode string            `xml:"accessmode,attr,omitempty"`
	Driver     *FilesystemDriver `xml:"driver"`
	Binary     *FilesystemBinary `xml:"binary"`
	Source     *FilesystemSource `xml:"source"`
	Target     *FilesystemTarget `xml:"target"`
	Extra      []AnyElement      `xml:",any"`
}

// FilesystemDriver is <driver type='virtiofs' queue='N'/>.
type FilesystemDriver struct {
	Type  string `xml:"type,attr"`
	Queue uint   `xml:"queue,attr,omitempty"`
}

// FilesystemBinary is <binary path='...'><cache mode='...'/></binary>.
type FilesystemBinary struct {
	Path  string           `xml:"path,attr"`
	Cache *FilesystemCache `xml:"cache"`
	Extra []AnyElement     `xml:",any"`
}

// FilesystemCache is <cache mode='auto|always|none'/>.
type FilesystemCache struct {
	Mode string `xml:"mode,attr"`
}

// FilesystemSource is <source dir='...'/>.
type FilesystemSource struct {
	Dir string `xml:"dir,attr"`
}

// FilesystemTarget is <target dir='TAG'/>: the tag the guest mounts.
type FilesystemTarget struct {
	Dir string `xml:"dir,attr"`
}

// Interface is <interface type='ethernet'|'user'>.
type Interface struct {
	Type   string           `xml:"type,attr"`
	MAC    *InterfaceMAC    `xml:"mac"`
	Target *InterfaceTarget `xml:"target"`
	Model  *InterfaceModel  `xml:"model"`
	Extra  []AnyElement     `xml:",any"`
}

// InterfaceMAC is <mac address='...'/>.
type InterfaceMAC struct {
	Address string `xml:"address,attr"`
}

// InterfaceTarget is <target dev='tap' managed='yes'/>: libvirt creates
// (and removes) the tap with that name, no bridge needed.
type InterfaceTarget struct {
	Dev     string `xml:"dev,attr"`
	Managed string `xml:"managed,attr,omitempty"`
}

// InterfaceModel is <model type='virtio'/>.
type InterfaceModel struct {
	Type string `xml:"type,attr"`
}

// CharDev is <serial>, <console> or <channel>.
type CharDev struct {
	Type   string         `xml:"type,attr"`
	Source *CharDevSource `xml:"source"`
	Target *CharDevTarget `xml:"target"`
	Extra  []AnyElement   `xml:",any"`
}

// CharDevSource is <source path='...'/>.
type CharDevSource struct {
	Path   string `xml:"path,attr,omitempty"`
	Mode   string `xml:"mode,attr,omitempty"`
	Append string `xml:"append,attr,omitempty"`
}

// CharDevTarget is <target type='virtio' name='...' port='0'/>.
type CharDevTarget struct {
	Type string `xml:"type,attr,omitempty"`
	Name string `xml:"name,attr,omitempty"`
	Port *uint  `xml:"port,attr"`
}

// MemBalloon is <memballoon model='virtio'><stats period='N'/></memballoon>.
type MemBalloon struct {
	Model string           `xml:"model,attr"`
	Stats *MemBalloonStats `xml:"stats"`
	Extra []AnyElement     `xml:",any"`
}

// MemBalloonStats is <stats period='N'/>.
type MemBalloonStats struct {
	Period uint `xml:"period,attr"`
}

// Marshal returns the indented XML of d.
func (d *Domain) Marshal() (string, error) {
	b, err := xml.MarshalIndent(d, "", "  ")
	if err != nil {
		return "", fmt.Errorf("marshal domain %q: %w", d.Name, err)
	}
	return string(b) + "\n", nil
}

// ParseDomain parses domain XML (ours or libvirt's dumpxml).
func ParseDomain(s string) (*Domain, error) {
	var d Domain
	if err := xml.Unmarshal([]byte(s), &d); err != nil {
		return nil, fmt.Errorf("parse domain xml: %w", err)
	}
	return &d, nil
}

// LiveTunables are limits libvirt cannot apply when it starts the domain on
// this kind of host and that the backend applies right after (memtune
// hard_limit makes libvirt raise RLIMIT_MEMLOCK, which needs
// CAP_SYS_RESOURCE; a cgroup v1 memsw limit cannot be set below the memory
// limit, so swap_hard_limit goes with it).
type LiveTunables struct {
	HardLimitKiB     uint64 // 0: none
	SwapHardLimitKiB uint64 // 0: none
}

// SplitLive removes the live-only limits from d's memtune and returns them.
func (d *Domain) SplitLive() LiveTunables {
	var lt LiveTunables
	if d.MemTune == nil {
		return lt
	}
	if d.MemTune.HardLimit != nil {
		lt.HardLimitKiB = d.MemTune.HardLimit.Value
		d.MemTune.HardLimit = nil
	}
	if d.MemTune.SwapHardLimit != nil {
		lt.SwapHardLimitKiB = d.MemTune.SwapHardLimit.Value
		d.MemTune.SwapHardLimit = nil
	}
	if d.MemTune.SoftLimit == nil {
		d.MemTune = nil
	}
	return lt
}

// Network modes (Config.Network).
const (
	// NetworkEthernet gives the guest a virtio NIC backed by a tap that
	// libvirt creates (managed, no bridge). The backend shapes it with tc.
	NetworkEthernet = "ethernet"
	// NetworkUser uses QEMU user networking (slirp): no host device, so
	// network limits cannot be enforced.
	NetworkUser = "user"
	// NetworkNone gives the guest no NIC.
	NetworkNone = "none"
)

// Accelerators (Config.Accel).
const (
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// Config sizes and places the domains. Zero values take the defaults that
// WithDefaults fills in.
type Config struct {
	// Socket is libvirtd's socket (default /var/run/libvirt/libvirt-sock).
	Socket string
	// GuestDir holds the guest built by scripts/build-guest.sh; Kernel,
	// Initrd and BaseDisk default to files in it (vmlinux, falling back to
	// vmlinuz; initramfs.img, falling back to initramfs.cpio.gz;
	// base.qcow2).
	GuestDir, Kernel, Initrd, BaseDisk string
	// Emulator is the QEMU binary; empty lets libvirt choose.
	Emulator string
	// Machine is the machine type (default q35).
	Machine string
	// Accel is auto (probe once), kvm or tcg. DomainFor takes the resolved
	// value in DomainType ("kvm" or "qemu").
	Accel      string
	DomainType string
	// DefaultVCPUs and DefaultMemory size a sandbox without a CPU or memory
	// limit (defaults 1 and 512 MiB).
	DefaultVCPUs  uint
	DefaultMemory int64
	// GuestOverhead is added to memory_limit to size the guest: the guest
	// kernel and init need memory the pod's limit does not count
	// (default 64 MiB).
	GuestOverhead int64
	// QEMUOverhead is added to the guest size to get the memtune
	// hard_limit of the whole QEMU process (guest RAM + device emulation +
	// the TCG translation cache; default 256 MiB).
	QEMUOverhead int64
	// MaxVCPUs and MaxMemory are the ceilings for live updates: the domain
	// is defined with max(size, ceiling) so Update can hot-plug vCPUs and
	// deflate the balloon up to them. 0: no headroom.
	MaxVCPUs  uint
	MaxMemory int64
	// Cmdline is the kernel command line; DomainFor appends the rss.*
	// parameters. Default DefaultCmdline.
	Cmdline string
	// ReadyPort is the virtio-serial port name (default DefaultReadyPort).
	ReadyPort string
	// AgentPort is the virtio-serial port of the guest agent (default
	// DefaultAgentPort); its host side is a unix socket QEMU listens on
	// (AgentSocketPath).
	AgentPort string
	// VirtioFSD is the virtiofsd binary libvirt starts for the shared
	// directory (default DefaultVirtioFSD); SharedTag its virtio-fs tag
	// (default DefaultSharedTag).
	VirtioFSD, SharedTag string
	// SocketDir holds the agent sockets of sandboxes whose directory is
	// too deep for a unix socket path (default /run/resource-slot-sandboxer/vm).
	SocketDir string
	// TCGCache is the size of TCG's translation cache of a domain without
	// KVM (default 128 MiB), which counts against QEMU's hard limit.
	TCGCache int64
	// BootImages is the size of the kernel and the initrd, which QEMU
	// keeps mapped (the kernel's loaded image is a private copy) and
	// which count against its hard limit under TCG. New sets it.
	BootImages int64
	// Network is ethernet (default), user or none.
	Network string
	// BalloonStatsPeriod is the guest memory stats period in seconds
	// (default 5): Usage reads the guest's view of its memory from it.
	BalloonStatsPeriod uint
	// NamePrefix prefixes domain names (default "rss-").
	NamePrefix string
	// Owner names the daemon in the domains' metadata (its state
	// directory): Cleanup removes only domains of the same owner, so
	// daemons sharing a libvirtd leave each other's alone.
	Owner string
}

// DefaultCmdline is the lean kernel command line the guest boots with.
// quiet/loglevel keep the (slow, emulated) serial console nearly silent;
// mitigations=off, cryptomgr.notests, no_timer_check and tsc=reliable
// shave boot time under TCG.
const DefaultCmdline = "console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off cryptomgr.notests no_timer_check tsc=reliable"

const (
	kib = 1024
	mib = 1024 * kib
)

// WithDefaults returns c with every zero field set to its default.
func (c Config) WithDefaults() Config {
	if c.Socket == "" {
		c.Socket = "/var/run/libvirt/libvirt-sock"
	}
	if c.Kernel == "" && c.GuestDir != "" {
		c.Kernel = filepath.Join(c.GuestDir, "vmlinux")
		if !fileExists(c.Kernel) {
			c.Kernel = filepath.Join(c.GuestDir, "vmlinuz")
		}
	}
	if c.Initrd == "" && c.GuestDir != "" {
		c.Initrd = filepath.Join(c.GuestDir, "initramfs.img")
		if !fileExists(c.Initrd) {
			c.Initrd = filepath.Join(c.GuestDir, "initramfs.cpio.gz")
		}
	}
	if c.BaseDisk == "" && c.GuestDir != "" {
		c.BaseDisk = filepath.Join(c.GuestDir, "base.qcow2")
	}
	if c.Machine == "" {
		c.Machine = "q35"
	}
	if c.Accel == "" {
		c.Accel = AccelAuto
	}
	if c.DomainType == "" {
		c.DomainType = "qemu"
		if c.Accel == AccelKVM {
			c.DomainType = "kvm"
		}
	}
	if c.DefaultVCPUs == 0 {
		c.DefaultVCPUs = 1
	}
	if c.DefaultMemory == 0 {
		c.DefaultMemory = 512 * mib
	}
	if c.GuestOverhead == 0 {
		c.GuestOverhead = 64 * mib
	}
	if c.QEMUOverhead == 0 {
		c.QEMUOverhead = 256 * mib
	}
	if c.Cmdline == "" {
		c.Cmdline = DefaultCmdline
	}
	if c.ReadyPort == "" {
		c.ReadyPort = DefaultReadyPort
	}
	if c.AgentPort == "" {
		c.AgentPort = DefaultAgentPort
	}
	if c.VirtioFSD == "" {
		c.VirtioFSD = DefaultVirtioFSD
	}
	if c.SharedTag == "" {
		c.SharedTag = DefaultSharedTag
	}
	if c.SocketDir == "" {
		c.SocketDir = "/run/resource-slot-sandboxer/vm"
	}
	if c.TCGCache == 0 {
		c.TCGCache = 128 * mib
	}
	if c.Network == "" {
		c.Network = NetworkEthernet
	}
	if c.BalloonStatsPeriod == 0 {
		c.BalloonStatsPeriod = 5
	}
	if c.NamePrefix == "" {
		c.NamePrefix = "rss-"
	}
	return c
}

// maxSocketPath is the longest unix socket path that fits sun_path (108
// bytes with its NUL), with a margin.
const maxSocketPath = 100

// AgentSocketPath is the host side of the agent's port of the sandbox in
// dir: dir/agent.sock, or, when that is too long for a unix socket,
// socketDir/<hash of dir>.sock.
func AgentSocketPath(dir, socketDir string) string {
	if p := filepath.Join(dir, AgentSocket); len(p) <= maxSocketPath {
		return p
	}
	return filepath.Join(socketDir, shortHash(dir, 24)+".sock")
}

var safeName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// DomainName is the libvirt domain name of sandbox id: prefix+id when the
// id is short and plain (containerd ids are), otherwise prefix + a hash of
// it, so an id never produces an invalid or ambiguous name.
func DomainName(prefix, id string) string {
	if safeName.MatchString(id) {
		return prefix + id
	}
	return prefix + "h-" + shortHash(id, 24)
}

// TapName is the host tap of the sandbox: "rsv" + 10 hex digits of a hash
// of the id (IFNAMSIZ allows 15 characters). IFBName is its ifb twin that
// shapes the guest's egress.
func TapName(id string) string { return "rsv" + shortHash(id, 10) }

// IFBName is the ifb device that shapes what the guest sends.
func IFBName(id string) string { return "rsi" + shortHash(id, 10) }

func shortHash(s string, n int) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])[:n]
}

var cpusetRE = regexp.MustCompile(`^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$`)

// ValidCPUSet reports whether s is a cpuset list such as "0-3,6".
func ValidCPUSet(s string) bool { return cpusetRE.MatchString(s) }

// Size is what DomainFor derived from the limits, for callers and tests.
type Size struct {
	VCPUs, MaxVCPUs   uint
	MemoryKiB, MaxKiB uint64
}

// VCPUsFor returns ceil(cpu_limit), at least 1; def when unlimited.
func VCPUsFor(cpuLimit *float64, def uint) uint {
	if cpuLimit == nil || *cpuLimit <= 0 {
		return def
	}
	// Round to millicores first so 1.0000000001 (float noise) is 1.
	n := math.Ceil(math.Round(*cpuLimit*1000) / 1000)
	if n < 1 {
		n = 1
	}
	return uint(n)
}

// MemoryKiBFor returns memory_limit + overhead in KiB, rounded up to a MiB;
// def when unlimited.
func MemoryKiBFor(memLimit *int64, overhead, def int64) uint64 {
	b := def
	if memLimit != nil && *memLimit > 0 {
		b = *memLimit
		if b > math.MaxInt64-overhead {
			b = math.MaxInt64
		} else {
			b += overhead
		}
	}
	mibs := (uint64(b) + mib - 1) / mib
	return mibs * 1024
}

// DomainFor builds the domain of sandbox id, whose files live in dir, from
// its effective resources. The size rules:
//
//   - vCPUs = ceil(cpu_limit), at least 1; cfg.DefaultVCPUs when
//     unlimited. The maximum (<vcpu>) is max(vCPUs, cfg.MaxVCPUs) so Update
//     can hot-plug up to it; <vcpu current> is the size.
//   - memory = memory_limit + cfg.GuestOverhead (cfg.DefaultMemory when
//     unlimited), rounded up to a MiB. <memory> (the boot size) is
//     max(memory, cfg.MaxMemory) and <currentMemory> the size: the balloon
//     holds the rest, and Update moves it within that maximum.
//   - cputune shares = cpu_shares (cpu_request converted as kubelet does).
//   - cpu_limit is a quota for the whole VM, not per vCPU: global_period
//     = cpu_period (default 100ms), global_quota = cpu_limit * period. A
//     per-vCPU quota of total/vCPUs would cap a single busy vCPU at
//     limit/ceil(limit) of a core (0.75 for 1.5 cores on 2 vCPUs) while the
//     other idles; the global quota is what a pod cgroup does.
//   - cpuset_cpus pins every vCPU and the emulator threads to that set.
//   - memtune: hard_limit = memory + QEMU's own (the whole QEMU process:
//     cfg.QEMUOverhead, plus without KVM the translation cache and the
//     boot images QEMU keeps mapped, cfg.BootImages); soft_limit =
//     memory_request + GuestOverhead;
//     swap_hard_limit = hard_limit + (memory_swap_limit - memory_limit),
//     i.e. the same swap allowance the pod's memsw limit gives. hard and
//     swap_hard are live-only here (see LiveTunables).
//   - disk_read_bps/disk_write_bps/disk_read_iops/disk_write_iops become
//     the disk's iotune (read/write bytes_sec and iops_sec).
//   - memoryBacking is memfd, shared: virtiofsd (vhost-user) maps the
//     guest's RAM.
//   - without KVM, TCG's translation cache is cfg.TCGCache (QEMU's 1 GiB
//     default would grow QEMU past its memtune hard limit).
//
// pid_limit, like every limit of the pod's own processes, is the pod
// cgroup's in the guest (podResources); libvirt has no pids element.
// storage_limit sizes the overlay disk (Create) and network limits are
// applied with tc on the tap (Start); neither is in the XML.
//
// The devices besides the disk and the NIC: the serial console (a file),
// the readiness port (a virtio-serial port whose host side is a file), the
// agent's port (virtio-serial, a unix socket QEMU listens on), and the
// shared directory <dir>/shared (mounts.ExportDir) over virtio-fs.
func DomainFor(id, dir string, info resourceinfo.ResourceInfo, cfg Config) (*Domain, error) {
	cfg = cfg.WithDefaults()
	if id == "" {
		return nil, fmt.Errorf("empty sandbox id: %w", errdefs.ErrInvalidArgument)
	}
	if !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("sandbox dir %q is not absolute: %w", dir, errdefs.ErrInvalidArgument)
	}
	r := info.Resources
	if err := checkLimits(r); err != nil {
		return nil, err
	}
	vcpus := VCPUsFor(r.CPULimit, cfg.DefaultVCPUs)
	maxVCPUs := max(vcpus, cfg.MaxVCPUs)
	memKiB := MemoryKiBFor(r.MemoryLimit, cfg.GuestOverhead, cfg.DefaultMemory)
	maxKiB := max(memKiB, uint64(max(cfg.MaxMemory, 0))/kib)

	d := &Domain{
		Type: cfg.DomainType,
		Name: DomainName(cfg.NamePrefix, id),
		Metadata: &Metadata{Sandbox: &SandboxMetadata{
			ID:    id,
			Dir:   dir,
			Owner: cfg.Owner,
		}},
		Memory:        Memory{Value: maxKiB, Unit: "KiB"},
		CurrentMemory: &Memory{Value: memKiB, Unit: "KiB"},
		VCPU:          VCPU{Placement: "static", Value: maxVCPUs},
		OS: OS{
			Type:   OSType{Arch: "x86_64", Machine: cfg.Machine, Value: "hvm"},
			Kernel: cfg.Kernel,
			Initrd: cfg.Initrd,
		},
		Features:   &Features{ACPI: &struct{}{}, APIC: &struct{}{}},
		OnPoweroff: "destroy",
		OnReboot:   "destroy",
		OnCrash:    "destroy",
	}
	if maxVCPUs != vcpus {
		d.VCPU.Current = vcpus
	}
	if cfg.DomainType == "kvm" {
		d.CPU = &CPU{Mode: "host-passthrough"}
	} else {
		d.Features.TCG = &FeatureTCG{TBCache: &Memory{Value: uint64(max(cfg.TCGCache, mib)) / mib, Unit: "MiB"}}
	}

	// cputune
	ct := &CPUTune{}
	if r.CPUShares != nil {
		ct.Shares = ptr(*r.CPUShares)
	}
	if r.CPULimit != nil && *r.CPULimit > 0 {
		period := uint64(resourceinfo.DefaultCPUPeriod)
		if r.CPUPeriod != nil && *r.CPUPeriod > 0 {
			period = *r.CPUPeriod
		}
		// libvirt accepts periods of 1ms..1s and quotas from 1ms.
		period = min(max(period, 1000), 1000000)
		quota := max(resourceinfo.CoresToQuota(*r.CPULimit, period), 1000)
		ct.GlobalPeriod, ct.GlobalQuota = ptr(period), ptr(quota)
	}
	if r.CPUSetCPUs != nil && *r.CPUSetCPUs != "" {
		set := *r.CPUSetCPUs
		for v := uint(0); v < maxVCPUs; v++ {
			ct.VCPUPins = append(ct.VCPUPins, CPUTunePin{VCPU: v, CPUSet: set})
		}
		ct.EmulatorPin = &CPUTuneEPin{CPUSet: set}
	}
	if ct.Shares != nil || ct.GlobalQuota != nil || len(ct.VCPUPins) > 0 {
		d.CPUTune = ct
	}

	// memtune
	mt := &MemTune{}
	if r.MemoryLimit != nil && *r.MemoryLimit > 0 {
		hard := memKiB + uint64(cfg.qemuOwn())/kib
		mt.HardLimit = &Memory{Value: hard, Unit: "KiB"}
		if r.MemorySwapLimit != nil && *r.MemorySwapLimit > 0 {
			swap := uint64(0)
			if *r.MemorySwapLimit > *r.MemoryLimit {
				swap = uint64(*r.MemorySwapLimit-*r.MemoryLimit) / kib
			}
			mt.SwapHardLimit = &Memory{Value: hard + swap, Unit: "KiB"}
		}
	}
	if r.MemoryRequest != nil && *r.MemoryRequest > 0 {
		soft := MemoryKiBFor(r.MemoryRequest, cfg.GuestOverhead, 0)
		mt.SoftLimit = &Memory{Value: soft, Unit: "KiB"}
	}
	if mt.HardLimit != nil || mt.SoftLimit != nil || mt.SwapHardLimit != nil {
		d.MemTune = mt
	}

	// kernel command line
	cmd := strings.TrimSpace(cfg.Cmdline)
	if cfg.ReadyPort != DefaultReadyPort {
		cmd += " rss.port=" + cfg.ReadyPort
	}
	if cfg.AgentPort != DefaultAgentPort {
		cmd += " rss.agent_port=" + cfg.AgentPort
	}
	if os.Getenv("RSS_GUEST_DEBUG") != "" {
		cmd += " rss.debug=1" // the agent logs at debug level on the console
	}
	d.OS.Cmdline = cmd
	d.MemoryBacking = &MemBacking{Source: &MemBackingSource{Type: "memfd"}, Access: &MemBackingAccess{Mode: "shared"}}

	// devices
	dev := &d.Devices
	dev.Emulator = cfg.Emulator
	disk := Disk{
		Type:   "file",
		Device: "disk",
		Driver: &DiskDriver{Name: "qemu", Type: "qcow2"},
		Source: &DiskSource{File: filepath.Join(dir, DiskFile)},
		Target: DiskTarget{Dev: DiskDev, Bus: "virtio"},
	}
	io := &IOTune{}
	setU := func(dst *uint64, p *int64) {
		if p != nil && *p > 0 {
			*dst = uint64(*p)
		}
	}
	setU(&io.ReadBytesSec, r.DiskReadBps)
	setU(&io.WriteBytesSec, r.DiskWriteBps)
	setU(&io.ReadIOPSSec, r.DiskReadIOPS)
	setU(&io.WriteIOPSSec, r.DiskWriteIOPS)
	if *io != (IOTune{}) {
		disk.IOTune = io
	}
	dev.Disks = []Disk{disk}
	dev.Filesystems = []Filesystem{{
		Type:       "mount",
		AccessMode: "passthrough",
		Driver:     &FilesystemDriver{Type: "virtiofs", Queue: 1024},
		Binary:     &FilesystemBinary{Path: cfg.VirtioFSD},
		Source:     &FilesystemSource{Dir: filepath.Join(dir, mounts.ExportDir)},
		Target:     &FilesystemTarget{Dir: cfg.SharedTag},
	}}

	switch cfg.Network {
	case NetworkEthernet:
		tap := TapName(id)
		d.Metadata.Sandbox.Tap = tap
		dev.Interfaces = []Interface{{
			Type:   "ethernet",
			MAC:    &InterfaceMAC{Address: macFor(id)},
			Target: &InterfaceTarget{Dev: tap, Managed: "yes"},
			Model:  &InterfaceModel{Type: "virtio"},
		}}
	case NetworkUser:
		dev.Interfaces = []Interface{{
			Type:  "user",
			MAC:   &InterfaceMAC{Address: macFor(id)},
			Model: &InterfaceModel{Type: "virtio"},
		}}
	case NetworkNone:
	default:
		return nil, fmt.Errorf("network mode %q: %w", cfg.Network, errdefs.ErrInvalidArgument)
	}

	console := filepath.Join(dir, ConsoleFile)
	dev.Serials = []CharDev{{
		Type:   "file",
		Source: &CharDevSource{Path: console},
		Target: &CharDevTarget{Port: ptr(uint(0))},
	}}
	dev.Consoles = []CharDev{{
		Type:   "file",
		Source: &CharDevSource{Path: console},
		Target: &CharDevTarget{Type: "serial", Port: ptr(uint(0))},
	}}
	dev.Channels = []CharDev{{
		Type:   "file",
		Source: &CharDevSource{Path: filepath.Join(dir, ReadyFile)},
		Target: &CharDevTarget{Type: "virtio", Name: cfg.ReadyPort},
	}, {
		Type:   "unix",
		Source: &CharDevSource{Mode: "bind", Path: AgentSocketPath(dir, cfg.SocketDir)},
		Target: &CharDevTarget{Type: "virtio", Name: cfg.AgentPort},
	}}
	dev.MemBalloon = &MemBalloon{Model: "virtio", Stats: &MemBalloonStats{Period: cfg.BalloonStatsPeriod}}
	return d, nil
}

// qemuOwn is the memory QEMU uses besides the guest's RAM: QEMUOverhead
// (devices, its own heap), and without KVM the translation cache and the
// boot images (measured on Debian 12's QEMU 7.2 under TCG, idle: 122 MiB
// of the guest's RAM touched, 47 MiB of the vmlinux copy, 13 MiB of the
// initramfs, 63 MiB of translated code, 97 MiB anonymous).
func (c Config) qemuOwn() int64 {
	own := c.QEMUOverhead
	if c.DomainType != "kvm" {
		own += max(c.TCGCache, 0) + max(c.BootImages, 0)
	}
	return own
}

// checkLimits rejects values libvirt would refuse with a less clear error.
func checkLimits(r resourceinfo.Resources) error {
	bad := func(name string, v any) error {
		return fmt.Errorf("%s %v: %w", name, v, errdefs.ErrInvalidArgument)
	}
	if r.CPULimit != nil && (*r.CPULimit < 0 || math.IsNaN(*r.CPULimit) || math.IsInf(*r.CPULimit, 0) || *r.CPULimit > 4096) {
		return bad("cpu_limit", *r.CPULimit)
	}
	if r.CPUSetCPUs != nil && *r.CPUSetCPUs != "" && !ValidCPUSet(*r.CPUSetCPUs) {
		return bad("cpuset_cpus", strconv.Quote(*r.CPUSetCPUs))
	}
	for name, p := range map[string]*int64{
		"memory_limit": r.MemoryLimit, "memory_request": r.MemoryRequest, "pid_limit": r.PidLimit,
		"memory_swap_limit": r.MemorySwapLimit, "storage_limit": r.StorageLimit,
		"disk_read_bps": r.DiskReadBps, "disk_write_bps": r.DiskWriteBps,
		"disk_read_iops": r.DiskReadIOPS, "disk_write_iops": r.DiskWriteIOPS,
		"network_ingress_bps": r.NetworkIngressBps, "network_egress_bps": r.NetworkEgressBps,
	} {
		if p != nil && *p < 0 {
			return bad(name, *p)
		}
	}
	return nil
}

// macFor is a stable locally administered MAC (52:54:00 is QEMU's OUI).
func macFor(id string) string {
	h := sha256.Sum256([]byte("mac:" + id))
	return fmt.Sprintf("52:54:00:%02x:%02x:%02x", h[0], h[1], h[2])
}

func ptr[T any](v T) *T { return &v }

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
