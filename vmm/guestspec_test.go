package vmm

import (
	"strconv"
	"testing"

	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/vmm/mounts"
)

// criSpec is a spec as containerd's CRI writes it for a container of a
// pod with pod IPC and UTS, a container pid namespace and a network
// namespace.
func criSpec() *specs.Spec {
	return &specs.Spec{
		Version:  "1.2.1",
		Hostname: "pod1",
		Root:     &specs.Root{Path: "rootfs"},
		Process: &specs.Process{
			Args:            []string{"sh", "-c", "echo hi"},
			Cwd:             "/",
			ApparmorProfile: "cri-containerd.apparmor.d",
			SelinuxLabel:    "system_u:system_r:container_t:s0:c1,c2",
		},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"nosuid", "noexec", "nodev", "relatime", "ro"}},
			{Destination: "/etc/hosts", Type: "bind", Source: "/var/lib/containerd/sandboxes/s1/hosts", Options: []string{"rbind", "rprivate", "rw"}},
			{Destination: "/dev/shm", Type: "bind", Source: "/run/containerd/sandboxes/s1/shm", Options: []string{"rbind", "rprivate", "rw"}},
			{Destination: "/data", Source: "/var/lib/kubelet/pods/p/volumes/v", Options: []string{"rbind", "ro", "nosuid"}},
			{Destination: "/dev/termination-log", Type: "bind", Source: "/var/lib/kubelet/pods/p/containers/c/x", Options: []string{"bind", "rw"}},
		},
		Hooks: &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/usr/bin/nvidia-container-runtime-hook"}}},
		Linux: &specs.Linux{
			CgroupsPath: "kubepods-besteffort-podp.slice:cri-containerd:c1",
			MountLabel:  "system_u:object_r:container_file_t:s0",
			Sysctl:      map[string]string{"net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1"},
			Devices:     []specs.LinuxDevice{{Path: "/dev/kvm", Type: "c", Major: 10, Minor: 232}},
			Resources: &specs.LinuxResources{
				CPU:            &specs.LinuxCPU{Quota: p(int64(50000)), Period: p(uint64(100000))},
				Memory:         &specs.LinuxMemory{Limit: p(int64(64 << 20))},
				Pids:           &specs.LinuxPids{Limit: p(int64(64))},
				BlockIO:        &specs.LinuxBlockIO{Weight: p(uint16(100))},
				HugepageLimits: []specs.LinuxHugepageLimit{{Pagesize: "2MB", Limit: 0}},
				Devices:        []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}},
			},
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace},
				{Type: specs.IPCNamespace, Path: "/proc/4242/ns/ipc"},
				{Type: specs.UTSNamespace, Path: "/proc/4242/ns/uts"},
				{Type: specs.MountNamespace},
				{Type: specs.NetworkNamespace, Path: "/var/run/netns/cni-1"},
			},
			MaskedPaths: []string{"/proc/kcore"},
		},
	}
}

func TestGuestSpec(t *testing.T) {
	podNS := func(t specs.LinuxNamespaceType, name string) specs.LinuxNamespace {
		return specs.LinuxNamespace{Type: t, Path: "/run/rss/ns/" + name}
	}
	newNS := func(t specs.LinuxNamespaceType) specs.LinuxNamespace { return specs.LinuxNamespace{Type: t} }
	base := []specs.LinuxNamespace{newNS(specs.PIDNamespace), podNS(specs.IPCNamespace, "ipc"), podNS(specs.UTSNamespace, "uts"),
		newNS(specs.MountNamespace), newNS(specs.CgroupNamespace)}

	cases := []struct {
		desc   string
		edit   func(*specs.Spec)
		binds  int // shared binds
		ns     []specs.LinuxNamespace
		mounts func(*testing.T, []specs.Mount)
	}{
		{desc: "CRI container", binds: 3, ns: base, mounts: func(t *testing.T, ms []specs.Mount) {
			assert.Equal(t, specs.Mount{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}}, ms[0])
			assert.Equal(t, "cgroup", ms[2].Type)
			assert.Equal(t, specs.Mount{Destination: "/etc/hosts", Type: "bind", Source: "/run/rss/shared/c1/mounts/3",
				Options: []string{"rbind", "rprivate", "rw"}}, ms[3])
			assert.Equal(t, specs.Mount{Destination: "/dev/shm", Type: "tmpfs", Source: "shm",
				Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}}, ms[4], "the pod's shm becomes a guest tmpfs")
			assert.Equal(t, "/run/rss/shared/c1/mounts/5", ms[5].Source)
			assert.Equal(t, []string{"rbind", "ro", "nosuid"}, ms[5].Options)
			assert.Equal(t, "/run/rss/shared/c1/mounts/6", ms[6].Source)
		}},
		{desc: "shared pid namespace", edit: func(s *specs.Spec) {
			s.Linux.Namespaces[0].Path = "/proc/4242/ns/pid"
		}, binds: 3, ns: append([]specs.LinuxNamespace{podNS(specs.PIDNamespace, "pid")}, base[1:]...)},
		{desc: "host namespaces (hostPID, hostIPC, hostNetwork)", edit: func(s *specs.Spec) {
			s.Linux.Namespaces = []specs.LinuxNamespace{newNS(specs.MountNamespace)}
		}, binds: 3, ns: base},
		{desc: "new ipc and uts of its own", edit: func(s *specs.Spec) {
			s.Linux.Namespaces[1].Path, s.Linux.Namespaces[2].Path = "", ""
		}, binds: 3, ns: append([]specs.LinuxNamespace{base[0], newNS(specs.IPCNamespace), newNS(specs.UTSNamespace)}, base[3:]...)},
		{desc: "user and time namespaces lose their host paths", edit: func(s *specs.Spec) {
			s.Linux.Namespaces = append(s.Linux.Namespaces,
				specs.LinuxNamespace{Type: specs.UserNamespace, Path: "/proc/1/ns/user"}, newNS(specs.TimeNamespace),
				specs.LinuxNamespace{Type: specs.CgroupNamespace, Path: "/proc/1/ns/cgroup"})
			s.Linux.UIDMappings = []specs.LinuxIDMapping{{ContainerID: 0, HostID: 100000, Size: 65536}}
		}, binds: 3, ns: append(append([]specs.LinuxNamespace(nil), base...), newNS(specs.UserNamespace), newNS(specs.TimeNamespace))},
		{desc: "no binds", edit: func(s *specs.Spec) { s.Mounts = s.Mounts[:3] }, binds: 0, ns: base},
		{desc: "no linux section", edit: func(s *specs.Spec) { s.Linux = nil }, binds: 3, ns: base},
	}
	for _, tc := range cases {
		t.Run(tc.desc, func(t *testing.T) {
			host := criSpec()
			if tc.edit != nil {
				tc.edit(host)
			}
			before, err := cloneSpec(host)
			require.NoError(t, err)
			binds, idx := sharedBinds(host)
			require.Len(t, binds, tc.binds)
			prep := &mounts.Prepared{GuestRootfs: "/run/rss/shared/c1/rootfs"}
			for _, i := range idx {
				prep.GuestBinds = append(prep.GuestBinds, "/run/rss/shared/c1/mounts/"+strconv.Itoa(i))
			}
			g, err := guestSpec(host, "c1", prep, idx)
			require.NoError(t, err)
			assert.Equal(t, before, host, "the host spec is not modified")

			assert.Equal(t, "/run/rss/shared/c1/rootfs", g.Root.Path)
			assert.Equal(t, "/pod/c1", g.Linux.CgroupsPath)
			assert.Equal(t, tc.ns, g.Linux.Namespaces)
			assert.Nil(t, g.Hooks, "hooks name host binaries")
			assert.Empty(t, g.Process.ApparmorProfile)
			assert.Empty(t, g.Process.SelinuxLabel)
			assert.Empty(t, g.Linux.MountLabel)
			assert.Empty(t, g.Linux.Devices, "host device nodes")
			assert.Equal(t, "pod1", g.Hostname)
			assert.Equal(t, host.Process.Args, g.Process.Args)
			if tc.mounts != nil {
				tc.mounts(t, g.Mounts)
			}
			if host.Linux != nil {
				assert.Equal(t, map[string]string{"kernel.shm_rmid_forced": "1"}, g.Linux.Sysctl, "net.* sysctls dropped")
				r := g.Linux.Resources
				assert.Equal(t, host.Linux.Resources.CPU, r.CPU)
				assert.Equal(t, host.Linux.Resources.Memory, r.Memory)
				assert.Equal(t, host.Linux.Resources.Pids, r.Pids)
				assert.Equal(t, host.Linux.Resources.Devices, r.Devices)
				assert.Nil(t, r.BlockIO)
				assert.Nil(t, r.HugepageLimits)
				assert.Equal(t, host.Linux.MaskedPaths, g.Linux.MaskedPaths)
				assert.Equal(t, host.Linux.UIDMappings, g.Linux.UIDMappings)
			}
		})
	}
}

func TestSharedBinds(t *testing.T) {
	binds, idx := sharedBinds(criSpec())
	assert.Equal(t, []int{3, 5, 6}, idx)
	assert.Equal(t, []mounts.Bind{
		{Source: "/var/lib/containerd/sandboxes/s1/hosts", Recursive: true},
		{Source: "/var/lib/kubelet/pods/p/volumes/v", ReadOnly: true, Recursive: true, NoSuid: true},
		{Source: "/var/lib/kubelet/pods/p/containers/c/x"},
	}, binds)
}

func TestGuestSpecInvalid(t *testing.T) {
	_, err := guestSpec(nil, "c1", &mounts.Prepared{}, nil)
	assert.True(t, errdefs.IsInvalidArgument(err), "%v", err)
	_, err = guestSpec(criSpec(), "c1", &mounts.Prepared{}, []int{3})
	assert.True(t, errdefs.IsInvalidArgument(err), "%v", err)
	_, err = guestExecSpec(nil)
	assert.True(t, errdefs.IsInvalidArgument(err), "%v", err)
}

func TestGuestExecSpec(t *testing.T) {
	host := &specs.Process{Args: []string{"cat", "/proc/version"}, Terminal: true, ApparmorProfile: "x", SelinuxLabel: "y",
		Env: []string{"PATH=/bin"}}
	g, err := guestExecSpec(host)
	require.NoError(t, err)
	assert.Equal(t, &specs.Process{Args: []string{"cat", "/proc/version"}, Terminal: true, Env: []string{"PATH=/bin"}}, g)
	assert.Equal(t, "x", host.ApparmorProfile, "the host's spec is not modified")
}

func TestGuestRuncOptions(t *testing.T) {
	a, err := guestRuncOptions()
	require.NoError(t, err)
	v, err := typeurl.UnmarshalAny(a)
	require.NoError(t, err)
	o, ok := v.(*runcoptions.Options)
	require.True(t, ok, "%T", v)
	assert.True(t, o.NoPivotRoot, "the guest's rootfs is an initramfs")
	assert.False(t, o.SystemdCgroup)
}

func TestSharedBindsRecursiveReadOnly(t *testing.T) {
	s := &specs.Spec{Mounts: []specs.Mount{{Destination: "/data", Type: "bind", Source: "/v", Options: []string{"rbind", "rro"}}}}
	binds, _ := sharedBinds(s)
	assert.Equal(t, []mounts.Bind{{Source: "/v", Recursive: true, RecursiveReadOnly: true}}, binds)
}
