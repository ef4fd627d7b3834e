package guest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/pkg/sys/reaper"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/transport"
)

// Defaults of the kernel command line.
const (
	DefaultReadyPort = "org.kuasar.rss.ready"
	DefaultAgentPort = "org.kuasar.rss.agent"
	DefaultVsockPort = 1024
)

// BootConfig is what the kernel command line tells the agent.
type BootConfig struct {
	// PidsMax (rss.pids=N) is pids.max of the pod cgroup from boot on.
	PidsMax int64
	// ReadyPort (rss.port=NAME) is the virtio-serial port READY goes to.
	ReadyPort string
	// AgentPort (rss.agent_port=NAME) is the agent's virtio-serial port.
	AgentPort string
	// VsockPort (rss.vsock_port=N) is the agent's vsock port, served in
	// addition when the guest has /dev/vsock.
	VsockPort uint32
	// Debug (rss.debug=1) logs at debug level and runs acpid verbosely.
	Debug bool
}

// ParseCmdline reads the rss.* parameters of a kernel command line; bad
// values are reported and left at their defaults.
func ParseCmdline(cmdline string) (BootConfig, []error) {
	bc := BootConfig{ReadyPort: DefaultReadyPort, AgentPort: DefaultAgentPort, VsockPort: DefaultVsockPort}
	var errs []error
	for _, f := range strings.Fields(cmdline) {
		k, v, ok := strings.Cut(f, "=")
		if !ok || !strings.HasPrefix(k, "rss.") {
			continue
		}
		switch k {
		case "rss.pids":
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n <= 0 {
				errs = append(errs, fmt.Errorf("rss.pids=%q: not a positive number", v))
				continue
			}
			bc.PidsMax = n
		case "rss.port":
			bc.ReadyPort = v
		case "rss.agent_port":
			bc.AgentPort = v
		case "rss.vsock_port":
			n, err := strconv.ParseUint(v, 10, 32)
			if err != nil {
				errs = append(errs, fmt.Errorf("rss.vsock_port=%q: not a port", v))
				continue
			}
			bc.VsockPort = uint32(n)
		case "rss.debug":
			bc.Debug = v == "1" || v == "true"
		default:
			errs = append(errs, fmt.Errorf("unknown parameter %s", k))
		}
	}
	return bc, errs
}

type mountPoint struct {
	src, dst, fstype string
	flags            uintptr
	data             string
}

var bootMounts = []mountPoint{
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"},
	{"shm", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
	{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "nsdelegate,memory_recursiveprot"},
}

// Boot does what PID 1 of the guest does before the agent starts: mounts
// the kernel filesystems and cgroup v2, puts stdio on the console, loads
// the modules listed in /lib/modules/load.order and brings every CPU
// online. It returns the kernel command line's settings.
func Boot() (BootConfig, error) {
	var errs []error
	for _, m := range bootMounts {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := unix.Mount(m.src, m.dst, m.fstype, m.flags, m.data); err != nil && !errors.Is(err, unix.EBUSY) {
			errs = append(errs, fmt.Errorf("mount %s at %s: %w", m.fstype, m.dst, err))
		}
		if m.dst == "/dev" {
			setConsole()
		}
	}
	for name, target := range map[string]string{"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
		"stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"} {
		os.Symlink(target, "/dev/"+name)
	}
	os.Setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	if err := protectRunc(RuncPath); err != nil {
		errs = append(errs, err)
	}
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		errs = append(errs, err)
	}
	bc, perrs := ParseCmdline(string(cmdline))
	errs = append(errs, perrs...)
	if bc.Debug {
		log.SetLevel("debug")
	}
	start := time.Now()
	n, merrs := LoadModules(ModulesDir, BootModules)
	errs = append(errs, merrs...)
	log.L.WithFields(log.Fields{"modules": n, "took": time.Since(start).Round(time.Millisecond)}).Debug("boot modules loaded")
	OnlineCPUs()
	return bc, errors.Join(errs...)
}

// RuncPath is runc in the guest.
const RuncPath = "/usr/sbin/runc"

// protectRunc bind-mounts runc read-only onto itself. runc 1.1 copies its
// binary into a sealed memfd on every run (so that a container cannot
// overwrite it through /proc/self/exe) unless the binary is on a
// read-only mount and _LIBCONTAINER_CLONED_BINARY is set, its documented
// alternative; copying 9 MB per run is a good part of a runc call under
// TCG.
func protectRunc(path string) error {
	if _, err := os.Stat(path); err != nil {
		return nil
	}
	if err := unix.Mount(path, path, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s: %w", path, err)
	}
	if err := unix.Mount("", path, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		unix.Unmount(path, unix.MNT_DETACH)
		return fmt.Errorf("remount %s read-only: %w", path, err)
	}
	return os.Setenv("_LIBCONTAINER_CLONED_BINARY", "1")
}

// setConsole puts stdin, stdout and stderr on /dev/console.
func setConsole() {
	f, err := os.OpenFile("/dev/console", os.O_RDWR, 0)
	if err != nil {
		return
	}
	for fd := 0; fd <= 2; fd++ {
		unix.Dup3(int(f.Fd()), fd, 0)
	}
	f.Close()
}

// The guest's modules (scripts/build-guest.sh): those the agent needs
// before READY, and the others, loaded right after.
const (
	ModulesDir   = "/lib/modules"
	BootModules  = "load.order"
	LaterModules = "load.later"
)

// LoadModules loads the modules listed, in order, in dir/list (one name a
// line, dir/<name>.ko).
func LoadModules(dir, list string) (int, []error) {
	f, err := os.Open(filepath.Join(dir, list))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return 0, nil
		}
		return 0, []error{err}
	}
	defer f.Close()
	var errs []error
	n := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name := strings.TrimSpace(sc.Text())
		if name == "" || strings.ContainsAny(name, "/.") {
			continue
		}
		m, err := os.Open(filepath.Join(dir, name+".ko"))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		err = unix.FinitModule(int(m.Fd()), "", 0)
		m.Close()
		if err != nil && !errors.Is(err, unix.EEXIST) {
			errs = append(errs, fmt.Errorf("load module %s: %w", name, err))
			continue
		}
		n++
	}
	return n, errs
}

// OnlineCPUs brings every offline CPU online (vCPUs the host hot-plugs
// arrive offline: there is no udev to do it).
func OnlineCPUs() {
	files, _ := filepath.Glob("/sys/devices/system/cpu/cpu[0-9]*/online")
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil && strings.TrimSpace(string(b)) != "1" {
			if err := os.WriteFile(f, []byte("1"), 0); err != nil {
				log.L.WithError(err).WithField("cpu", filepath.Base(filepath.Dir(f))).Warn("bring CPU online")
			} else {
				log.L.WithField("cpu", filepath.Base(filepath.Dir(f))).Info("CPU online")
			}
		}
	}
}

// WatchHotplug brings hot-plugged CPUs online as the kernel announces them
// (uevents), until ctx ends.
func WatchHotplug(ctx context.Context) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		return err
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1}); err != nil {
		unix.Close(fd)
		return err
	}
	f := os.NewFile(uintptr(fd), "uevent")
	go func() {
		<-ctx.Done()
		f.Close()
	}()
	go func() {
		b := make([]byte, 16<<10)
		for {
			n, err := f.Read(b)
			if err != nil {
				return
			}
			msg := string(b[:n])
			if strings.HasPrefix(msg, "add@/devices/system/cpu/") || strings.HasPrefix(msg, "online@/devices/system/cpu/") {
				OnlineCPUs()
			}
		}
	}()
	return nil
}

// SignalReady writes READY to the virtio-serial port named port (the host
// waits for it) and to the console. The port may take a moment to appear
// after its module loaded.
func SignalReady(port string) error {
	var dev string
	var err error
	for i := 0; i < 50; i++ {
		if dev, err = transport.FindPort(port); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Fprintln(os.Stdout, "READY")
	if err != nil {
		return err
	}
	f, err := os.OpenFile(dev, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.WriteString("READY\n")
	return err
}

// StartACPID runs busybox acpid, which runs /etc/acpi/PWRF/00000080 when
// the ACPI power button is pressed; that script asks PID 1 to power off
// (SIGUSR2, as busybox poweroff does).
func StartACPID(debug bool) error {
	args := []string{"acpid", "-f", "-c", "/etc/acpi", "-p", "/run/acpid.pid", "-l", "/run/acpid.log"}
	if debug {
		args = []string{"acpid", "-d", "-c", "/etc/acpi", "-p", "/run/acpid.pid"}
	}
	cmd := exec.Command("/bin/busybox", args...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	ec, err := reaper.Default.Start(cmd)
	if err != nil {
		return err
	}
	go func() {
		status, err := reaper.Default.Wait(cmd, ec)
		log.L.WithError(err).WithField("status", status).Error("acpid exited: the power button no longer stops the guest")
	}()
	return nil
}

// Uptime is the guest's uptime.
func Uptime() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// PowerOff syncs and powers the guest off.
func PowerOff() {
	unix.Sync()
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
		log.L.WithError(err).Error("power off")
	}
}
