package vmm

import (
	"encoding/json"
	"fmt"
	"path"
	"slices"
	"strings"

	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/kuasar-io/resource-slot-sandboxer/vmm/mounts"
)

// The OCI spec of a container, as containerd wrote it for the host, is
// rewritten for the guest, where the guest's runc runs it:
//
//   - root.path: the guest path of the rootfs the host mounted below the
//     shared directory (mounts.GuestRoot/<id>/rootfs).
//   - bind mounts: the source becomes the guest path of the host's bind
//     below the shared directory (mounts.GuestRoot/<id>/mounts/<n> for the
//     n-th shared bind); the options stay. A bind of /dev/shm becomes a
//     tmpfs of the container's own (see guestShm): the pod's /dev/shm on the
//     host would be host memory shared over virtio-fs. Other mounts (proc,
//     sysfs, tmpfs, devpts, mqueue, cgroup) are made by the guest's runc as
//     they are.
//   - namespaces: network is dropped (the VM is the pod's network: its
//     interfaces are in the guest's root network namespace); ipc and uts
//     join the pod's, which the agent holds (GuestNamespaceDir/ipc|uts),
//     whether the host spec joined the pod's or, for hostIPC and
//     hostNetwork, had none: the VM is the pod's host; a container that
//     asked for a new one keeps a new one. pid joins the pod's
//     (GuestNamespaceDir/pid) when the host spec joins an existing one
//     (shareProcessNamespace), else the container gets a new one (hostPID
//     too: the guest's own pid namespace is the agent's). mount and cgroup
//     are new; user and time stay, without a path (a path names a host
//     process).
//   - linux.cgroupsPath: /pod/<id>, below the pod cgroup that holds the
//     pod's limits (SetupSandbox); the container's own cgroup holds its
//     spec limits, which the guest's runc converts for cgroup v2.
//
// Dropped, because the guest cannot honour them:
//   - process.apparmorProfile: the guest kernel runs no AppArmor;
//   - process.selinuxLabel, linux.mountLabel: no SELinux in the guest;
//   - hooks: they name host binaries, which the guest does not have;
//   - linux.devices: host device nodes (a privileged container's, CDI's)
//     name host majors and minors; the guest's runc still creates the
//     default devices (null, zero, full, random, urandom, tty, ptmx);
//   - linux.resources.blockIO (host device numbers; disk limits are the
//     VM's iotune), hugepageLimits (the guest has no hugepages), rdma and
//     network (cgroup v1 classid/priorities);
//   - linux.sysctl net.*: the container has no network namespace of its
//     own, and its pod's network is the guest's root namespace;
//   - linux.intelRdt, linux.memoryPolicy, linux.netDevices: host
//     hardware.

// GuestNamespaceDir is where the guest agent bind-mounts the namespaces
// the pod's containers share ("ipc", "uts", "pid").
const GuestNamespaceDir = "/run/rss/ns"

// GuestCgroupParent is the guest cgroup of the pod; each container's
// cgroup is below it.
const GuestCgroupParent = "/pod"

// guestShm is the options of a container's /dev/shm in the guest:
// containerd's defaults for a pod's shm (64 MiB).
var guestShm = []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}

// isBind reports whether m is a bind mount.
func isBind(m specs.Mount) bool {
	if m.Type == "bind" {
		return true
	}
	return slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
}

// sharedBinds returns the binds of the spec the host must mount below the
// shared directory, and the index in s.Mounts of each.
func sharedBinds(s *specs.Spec) ([]mounts.Bind, []int) {
	var binds []mounts.Bind
	var idx []int
	for i, m := range s.Mounts {
		if !isBind(m) || path.Clean(m.Destination) == "/dev/shm" {
			continue
		}
		b := mounts.Bind{Source: m.Source}
		for _, o := range m.Options {
			switch o {
			case "ro":
				b.ReadOnly = true
			case "rro":
				b.RecursiveReadOnly = true
			case "rw":
				b.ReadOnly = false
			case "rbind":
				b.Recursive = true
			case "nosuid":
				b.NoSuid = true
			case "nodev":
				b.NoDev = true
			case "noexec":
				b.NoExec = true
			}
		}
		binds = append(binds, b)
		idx = append(idx, i)
	}
	return binds, idx
}

// guestSpec returns the spec of container id for the guest (see the rules
// above). host is not modified. p is where the host put the container's
// files, bindIdx the spec.mounts index of each of p.GuestBinds.
func guestSpec(host *specs.Spec, id string, p *mounts.Prepared, bindIdx []int) (*specs.Spec, error) {
	if host == nil {
		return nil, fmt.Errorf("container %s has no spec: %w", id, errdefs.ErrInvalidArgument)
	}
	if len(bindIdx) != len(p.GuestBinds) {
		return nil, fmt.Errorf("container %s: %d binds prepared for %d: %w", id, len(p.GuestBinds), len(bindIdx), errdefs.ErrInvalidArgument)
	}
	s, err := cloneSpec(host)
	if err != nil {
		return nil, err
	}
	if s.Root == nil {
		s.Root = &specs.Root{}
	}
	s.Root.Path = p.GuestRootfs
	s.Hooks = nil

	guestSrc := map[int]string{}
	for k, i := range bindIdx {
		guestSrc[i] = p.GuestBinds[k]
	}
	for i := range s.Mounts {
		m := &s.Mounts[i]
		if src, ok := guestSrc[i]; ok {
			m.Source = src
			continue
		}
		if isBind(*m) && path.Clean(m.Destination) == "/dev/shm" {
			m.Type, m.Source, m.Options = "tmpfs", "shm", slices.Clone(guestShm)
		}
	}

	if s.Process != nil {
		guestProcess(s.Process)
	}
	if s.Linux == nil {
		s.Linux = &specs.Linux{}
	}
	l := s.Linux
	l.CgroupsPath = path.Join(GuestCgroupParent, id)
	l.MountLabel = ""
	l.Devices = nil
	l.IntelRdt = nil
	l.MemoryPolicy = nil
	l.NetDevices = nil
	if r := l.Resources; r != nil {
		r.BlockIO = nil
		r.HugepageLimits = nil
		r.Rdma = nil
		r.Network = nil
	}
	for k := range l.Sysctl {
		if strings.HasPrefix(k, "net.") {
			delete(l.Sysctl, k)
		}
	}
	l.Namespaces = guestNamespaces(l.Namespaces)
	return s, nil
}

// guestProcess drops what the guest cannot honour from a process spec
// (an init process's or an exec's).
func guestProcess(p *specs.Process) {
	p.ApparmorProfile = ""
	p.SelinuxLabel = ""
}

// guestNamespaces maps the host spec's namespaces to the guest's.
func guestNamespaces(host []specs.LinuxNamespace) []specs.LinuxNamespace {
	have := map[specs.LinuxNamespaceType]specs.LinuxNamespace{}
	for _, ns := range host {
		have[ns.Type] = ns
	}
	pod := func(t specs.LinuxNamespaceType, name string) specs.LinuxNamespace {
		return specs.LinuxNamespace{Type: t, Path: path.Join(GuestNamespaceDir, name)}
	}
	var out []specs.LinuxNamespace
	// In runc's order: pid first (the others are joined after it).
	if ns, ok := have[specs.PIDNamespace]; ok && ns.Path != "" {
		out = append(out, pod(specs.PIDNamespace, "pid"))
	} else {
		out = append(out, specs.LinuxNamespace{Type: specs.PIDNamespace})
	}
	for _, t := range []struct {
		typ  specs.LinuxNamespaceType
		name string
	}{{specs.IPCNamespace, "ipc"}, {specs.UTSNamespace, "uts"}} {
		if ns, ok := have[t.typ]; ok && ns.Path == "" {
			out = append(out, specs.LinuxNamespace{Type: t.typ})
		} else {
			out = append(out, pod(t.typ, t.name))
		}
	}
	out = append(out, specs.LinuxNamespace{Type: specs.MountNamespace}, specs.LinuxNamespace{Type: specs.CgroupNamespace})
	for _, t := range []specs.LinuxNamespaceType{specs.UserNamespace, specs.TimeNamespace} {
		if _, ok := have[t]; ok {
			out = append(out, specs.LinuxNamespace{Type: t})
		}
	}
	return out
}

// guestExecSpec is an exec process's spec for the guest.
func guestExecSpec(host *specs.Process) (*specs.Process, error) {
	if host == nil {
		return nil, fmt.Errorf("exec has no process spec: %w", errdefs.ErrInvalidArgument)
	}
	b, err := json.Marshal(host)
	if err != nil {
		return nil, fmt.Errorf("exec spec: %w", err)
	}
	var p specs.Process
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("exec spec: %w", err)
	}
	guestProcess(&p)
	return &p, nil
}

func cloneSpec(s *specs.Spec) (*specs.Spec, error) {
	b, err := json.Marshal(s)
	if err != nil {
		return nil, fmt.Errorf("spec: %w", err)
	}
	var c specs.Spec
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("spec: %w", err)
	}
	return &c, nil
}

// guestRuncOptions are the runc options of a task in the guest: the
// rootfs is in an initramfs, where pivot_root cannot work, and the
// guest's runc manages cgroupfs (no systemd in the guest).
func guestRuncOptions() (*anypb.Any, error) {
	return typeurl.MarshalAnyToProto(&runcoptions.Options{NoPivotRoot: true})
}
