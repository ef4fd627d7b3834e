package config

import (
	"fmt"
	"path/filepath"
	"time"
)

// DefaultGuestDir is where `make install` puts the guest of the vm backend.
const DefaultGuestDir = "/usr/local/lib/resource-slot-sandboxer/guest"

// VM is the [vm] table: the vm backend (mode = "vm"), one libvirt/QEMU
// domain per sandbox.
type VM struct {
	// LibvirtSocket is libvirtd's unix socket.
	LibvirtSocket string `toml:"libvirt_socket"`
	// GuestDir holds the guest built by scripts/build-guest.sh (make guest).
	GuestDir string `toml:"guest_dir"`
	// Accel is "auto" (kvm where it works, else TCG), "kvm" or "tcg".
	Accel string `toml:"accel"`
	// DefaultVCPUs and DefaultMemory size a sandbox without a CPU or a
	// memory limit.
	DefaultVCPUs  uint     `toml:"default_vcpus"`
	DefaultMemory Quantity `toml:"default_memory"`
	// GuestOverhead is added to memory_limit for the guest's own kernel;
	// QEMUOverhead to the guest's size for the memtune hard limit of the
	// whole QEMU process.
	GuestOverhead Quantity `toml:"guest_overhead"`
	QEMUOverhead  Quantity `toml:"qemu_overhead"`
	// MaxVCPUs and MaxMemory are the ceilings of live resizes (0: none
	// beyond the size at start).
	MaxVCPUs  uint     `toml:"max_vcpus"`
	MaxMemory Quantity `toml:"max_memory"`
	// Network is "ethernet" (a tap per VM, shaped with tc), "user" or
	// "none" (network limits are then reported unenforced).
	Network string `toml:"network"`
	// ReadyTimeout bounds a Start's wait for the guest to report ready
	// and for its agent's first answer.
	ReadyTimeout Duration `toml:"ready_timeout"`
	// VirtioFSD is the virtiofsd libvirt starts for a sandbox's shared
	// directory (the containers' rootfs and volumes).
	VirtioFSD string `toml:"virtiofsd"`
	// SocketDir holds the host ends of the agents' virtio-serial ports of
	// sandboxes whose directory is too deep for a unix socket path.
	SocketDir string `toml:"socket_dir"`
}

func defaultVM() VM {
	return VM{
		LibvirtSocket: "/var/run/libvirt/libvirt-sock",
		GuestDir:      DefaultGuestDir,
		Accel:         "auto",
		DefaultVCPUs:  1,
		DefaultMemory: 512 << 20,
		GuestOverhead: 64 << 20,
		QEMUOverhead:  256 << 20,
		Network:       "ethernet",
		ReadyTimeout:  Duration(60 * time.Second),
		VirtioFSD:     "/usr/lib/qemu/virtiofsd",
		SocketDir:     "/run/resource-slot-sandboxer/vm",
	}
}

func (v VM) validate() []error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("vm."+key+": "+format, args...))
	}
	for _, p := range []struct{ key, path string }{{"libvirt_socket", v.LibvirtSocket}, {"guest_dir", v.GuestDir},
		{"virtiofsd", v.VirtioFSD}, {"socket_dir", v.SocketDir}} {
		if !filepath.IsAbs(p.path) {
			bad(p.key, "%q must be an absolute path", p.path)
		}
	}
	switch v.Accel {
	case "auto", "kvm", "tcg":
	default:
		bad("accel", "%q must be \"auto\", \"kvm\" or \"tcg\"", v.Accel)
	}
	switch v.Network {
	case "ethernet", "user", "none":
	default:
		bad("network", "%q must be \"ethernet\", \"user\" or \"none\"", v.Network)
	}
	if v.DefaultVCPUs == 0 {
		bad("default_vcpus", "must be at least 1")
	}
	if v.DefaultMemory < 64<<20 {
		bad("default_memory", "%d bytes is below the guest's minimum of 64Mi", v.DefaultMemory)
	}
	if v.GuestOverhead < 0 || v.QEMUOverhead < 0 || v.MaxMemory < 0 {
		bad("overheads", "guest_overhead, qemu_overhead and max_memory must not be negative")
	}
	if v.ReadyTimeout <= 0 {
		bad("ready_timeout", "%s must be positive", time.Duration(v.ReadyTimeout))
	}
	return errs
}
