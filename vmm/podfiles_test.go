package vmm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
)

// fakeHost points the pod files' host sources at files of a test.
func fakeHost(t *testing.T, hostname string) {
	t.Helper()
	d := t.TempDir()
	hosts, resolv := filepath.Join(d, "hosts"), filepath.Join(d, "resolv.conf")
	require.NoError(t, os.WriteFile(hosts, []byte("127.0.0.1 localhost\n::1 localhost\n"), 0o644))
	require.NoError(t, os.WriteFile(resolv, []byte("nameserver 192.0.2.53\n"), 0o644))
	oh, or, on := hostHosts, hostResolv, hostHostname
	hostHosts, hostResolv = hosts, resolv
	hostHostname = func() (string, error) { return hostname, nil }
	t.Cleanup(func() { hostHosts, hostResolv, hostHostname = oh, or, on })
}

func TestResolvConf(t *testing.T) {
	for _, tc := range []struct {
		desc string
		dns  backend.DNS
		want string
	}{
		{"empty", backend.DNS{}, ""},
		// critest's "DNS config" pod, and containerd's own test of
		// parseDNSOptions.
		{"critest", backend.DNS{Servers: []string{"8.8.8.8"}, Searches: []string{"google.com"}, Options: []string{"timeout:1"}},
			"search google.com\nnameserver 8.8.8.8\noptions timeout:1\n"},
		{"several", backend.DNS{Servers: []string{"8.8.8.8", "server.google.com"}, Searches: []string{"114.114.114.114", "a.b"}, Options: []string{"timeout:1", "ndots:5"}},
			"search 114.114.114.114 a.b\nnameserver 8.8.8.8\nnameserver server.google.com\noptions timeout:1 ndots:5\n"},
		{"servers only", backend.DNS{Servers: []string{"10.96.0.10"}}, "nameserver 10.96.0.10\n"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			assert.Equal(t, tc.want, resolvConf(&tc.dns))
		})
	}
}

func TestPodFiles(t *testing.T) {
	fakeHost(t, "node-1")
	for _, tc := range []struct {
		desc                     string
		pod                      backend.Pod
		hostname, hosts, resolve string
	}{
		{"none", backend.Pod{}, "node-1\n", "127.0.0.1 localhost\n::1 localhost\n", "nameserver 192.0.2.53\n"},
		{"hostname and dns", backend.Pod{Hostname: "web-0", DNS: &backend.DNS{Servers: []string{"10.96.0.10"}, Searches: []string{"ns.svc.cluster.local"}}},
			"web-0\n", "127.0.0.1 localhost\n::1 localhost\n", "search ns.svc.cluster.local\nnameserver 10.96.0.10\n"},
		// An empty DNSConfig is an empty resolv.conf, as in containerd.
		{"empty dns", backend.Pod{DNS: &backend.DNS{}}, "node-1\n", "127.0.0.1 localhost\n::1 localhost\n", ""},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			dir := t.TempDir()
			rec, err := guestPod(tc.pod)
			require.NoError(t, err)
			require.NoError(t, writePodFiles(dir, tc.pod, rec))
			for name, want := range map[string]string{"hostname": tc.hostname, "hosts": tc.hosts, "resolv.conf": tc.resolve} {
				p := filepath.Join(dir, EtcDir, name)
				data, err := os.ReadFile(p)
				require.NoError(t, err)
				assert.Equal(t, want, string(data), name)
				fi, err := os.Stat(p)
				require.NoError(t, err)
				assert.Equal(t, os.FileMode(0o644), fi.Mode().Perm(), "%s is readable by every user of a container", name)
			}
			got, err := readPodRecord(dir)
			require.NoError(t, err)
			assert.Equal(t, rec, got)
			removePodFiles(dir)
			ents, err := os.ReadDir(dir)
			require.NoError(t, err)
			assert.Empty(t, ents)
		})
	}
	// No record: a sandbox created before there was one.
	rec, err := readPodRecord(t.TempDir())
	require.NoError(t, err)
	assert.Zero(t, rec)
}

func TestPodFilesHugeHostFile(t *testing.T) {
	fakeHost(t, "node-1")
	big := filepath.Join(t.TempDir(), "hosts")
	require.NoError(t, os.WriteFile(big, make([]byte, maxHostFile+1), 0o644))
	hostHosts = big
	dir := t.TempDir()
	err := writePodFiles(dir, backend.Pod{}, podRecord{})
	assert.True(t, errdefs.IsFailedPrecondition(err), "%v", err)
}

func TestGuestPod(t *testing.T) {
	fakeHost(t, "node-1")
	for _, tc := range []struct {
		desc string
		pod  backend.Pod
		want podRecord
	}{
		{"none: the host's hostname", backend.Pod{}, podRecord{Hostname: "node-1"}},
		{"hostname", backend.Pod{Hostname: "test-hostname"}, podRecord{Hostname: "test-hostname"}},
		{"critest's sysctls", backend.Pod{Sysctls: map[string]string{"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "100"}},
			podRecord{Hostname: "node-1", Sysctls: map[string]string{"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "100"}}},
		{"slashes", backend.Pod{Sysctls: map[string]string{"net/ipv4/ip_local_port_range": "1024 65000", "kernel/sem": "250 32000 32 128"}},
			podRecord{Hostname: "node-1", Sysctls: map[string]string{"net.ipv4.ip_local_port_range": "1024 65000", "kernel.sem": "250 32000 32 128"}}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			got, err := guestPod(tc.pod)
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}

	hostHostname = func() (string, error) { return "under_score", nil }
	got, err := guestPod(backend.Pod{})
	require.NoError(t, err)
	assert.Empty(t, got.Hostname, "a host's hostname the guest refuses leaves the guest's own")

	for _, tc := range []struct {
		desc string
		pod  backend.Pod
	}{
		{"hostname with underscore", backend.Pod{Hostname: "a_b"}},
		{"hostname ending in a dot", backend.Pod{Hostname: "a."}},
		{"not namespaced", backend.Pod{Sysctls: map[string]string{"vm.overcommit_memory": "1"}}},
		{"kernel.panic", backend.Pod{Sysctls: map[string]string{"kernel.panic": "1"}}},
		{"upper case", backend.Pod{Sysctls: map[string]string{"NET.ipv4.x": "1"}}},
		{"one component", backend.Pod{Sysctls: map[string]string{"net": "1"}}},
		// The slashed name of eth0.100 keeps a slash in its dotted form,
		// which the guest refuses.
		{"slash in a component", backend.Pod{Sysctls: map[string]string{"net/ipv4/conf/eth0.100/rp_filter": "1"}}},
		{"twice", backend.Pod{Sysctls: map[string]string{"net.ipv4.ip_forward": "1", "net/ipv4/ip_forward": "0"}}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			require.NoError(t, tc.pod.Validate(), "passes the controller's checks")
			_, err := guestPod(tc.pod)
			assert.True(t, errdefs.IsInvalidArgument(err), "%v", err)
		})
	}
}

func TestDottedSysctl(t *testing.T) {
	for in, want := range map[string]string{
		"net.ipv4.ip_forward":              "net.ipv4.ip_forward",
		"net/ipv4/ip_forward":              "net.ipv4.ip_forward",
		"net/ipv4/conf/eth0.100/rp_filter": "net.ipv4.conf.eth0/100.rp_filter",
		"net.ipv4.conf.eth0/100.rp_filter": "net.ipv4.conf.eth0/100.rp_filter",
		"kernel":                           "kernel",
	} {
		assert.Equal(t, want, dottedSysctl(in), in)
	}
}

func TestWithPodFiles(t *testing.T) {
	fakeHost(t, "node-1")
	dir := t.TempDir()
	require.NoError(t, writePodFiles(dir, backend.Pod{Hostname: "web-0"}, podRecord{Hostname: "web-0"}))
	etc := filepath.Join(dir, EtcDir)
	bind := func(dest, name, mode string) specs.Mount {
		return specs.Mount{Destination: dest, Type: "bind", Source: filepath.Join(etc, name), Options: []string{"rbind", "rprivate", mode}}
	}
	base := func() *specs.Spec {
		s := criSpec()
		s.Mounts = s.Mounts[:3] // proc, dev, cgroup: nothing at /etc
		return s
	}
	for _, tc := range []struct {
		desc string
		spec func() *specs.Spec
		want []specs.Mount // after the spec's own
	}{
		{"all three", base, []specs.Mount{bind("/etc/hostname", "hostname", "rw"), bind("/etc/hosts", "hosts", "rw"), bind("/etc/resolv.conf", "resolv.conf", "rw")}},
		{"read-only rootfs", func() *specs.Spec { s := base(); s.Root.Readonly = true; return s },
			[]specs.Mount{bind("/etc/hostname", "hostname", "ro"), bind("/etc/hosts", "hosts", "ro"), bind("/etc/resolv.conf", "resolv.conf", "ro")}},
		{"a volume over /etc/hosts wins", func() *specs.Spec {
			s := base()
			s.Mounts = append(s.Mounts, specs.Mount{Destination: "/etc/hosts/", Type: "bind", Source: "/var/lib/kubelet/pods/p/etc-hosts", Options: []string{"rbind", "rw"}})
			return s
		}, []specs.Mount{bind("/etc/hostname", "hostname", "rw"), bind("/etc/resolv.conf", "resolv.conf", "rw")}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			s := tc.spec()
			own := len(s.Mounts)
			before, err := cloneSpec(s)
			require.NoError(t, err)
			got := withPodFiles(s, dir)
			assert.Equal(t, before, s, "the spec is not modified")
			assert.Equal(t, tc.want, got.Mounts[own:])
			assert.Equal(t, s.Mounts, got.Mounts[:own])

			// They go to the guest as shared binds, read-only with the root.
			binds, idx := sharedBinds(got)
			require.Len(t, binds, len(got.Mounts)-3)
			for k, i := range idx {
				if strings.HasPrefix(got.Mounts[i].Source, etc) {
					assert.Equal(t, s.Root.Readonly, binds[k].ReadOnly, got.Mounts[i].Destination)
				}
			}
		})
	}

	// A sandbox without the files (created by an older daemon) gets none.
	s := base()
	assert.Same(t, s, withPodFiles(s, t.TempDir()))
	assert.Nil(t, withPodFiles(nil, dir))
}
