package vmm

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
	"github.com/kuasar-io/resource-slot-sandboxer/backend"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/statefile"
)

// The pod's files: containerd's CRI writes a runc pod's /etc/hostname,
// /etc/hosts and /etc/resolv.conf itself (its podsandbox controller,
// setupSandboxFiles) and binds them into every container, but leaves them
// to an external sandbox controller. The vm backend writes them on Create
// into the sandbox directory, as containerd 2.4 does:
//
//	<dir>/etc/hostname     the pod's hostname (the host's when it has none) and a newline
//	<dir>/etc/hosts        a copy of the host's /etc/hosts (containerd adds no line of the pod's)
//	<dir>/etc/resolv.conf  from the pod's DNSConfig ("search", "nameserver" lines, "options"),
//	                       a copy of the host's when it has none
//
// and each container's spec gets a bind of each onto its /etc path before
// the spec is shared with the guest (withPodFiles), read-only when the
// container's root is, unless the spec mounts something there already
// (a user volume, kubelet's own /etc/hosts): then that wins, as in
// containerd's linuxContainerMounts. The binds then take the way of every
// other bind (package mounts): the guest sees them through virtio-fs, and
// a read-write one is writable, shared by the pod's containers.
//
// The pod record, <dir>/pod.json, keeps the hostname and sysctls the
// guest gets in SetupSandbox, for a Start after a daemon restart.
const (
	// EtcDir holds the pod's files in the sandbox directory.
	EtcDir = "etc"
	// PodFile is the backend's record of the pod's configuration.
	PodFile = "pod.json"
)

// podFileNames are the files of EtcDir, by the /etc path containers see
// them at.
var podFileNames = []struct{ dest, name string }{
	{"/etc/hostname", "hostname"},
	{"/etc/hosts", "hosts"},
	{"/etc/resolv.conf", "resolv.conf"},
}

// hostFiles are the host files the pod's are made from; variables for
// tests.
var (
	hostHosts    = "/etc/hosts"
	hostResolv   = "/etc/resolv.conf"
	hostHostname = os.Hostname
)

// maxHostFile bounds the host files copied into a pod.
const maxHostFile = 1 << 20

// podRecord is PodFile.
type podRecord struct {
	// Hostname is the hostname the guest gets ("" : the guest keeps its
	// own).
	Hostname string `json:"hostname,omitempty"`
	// Sysctls are the pod's sysctls in the dotted form the agent takes.
	Sysctls map[string]string `json:"sysctls,omitempty"`
}

// guestPod checks what the guest gets of a pod and returns it. The
// pod has passed backend.Pod.Validate.
func guestPod(pod backend.Pod) (podRecord, error) {
	rec := podRecord{Hostname: pod.Hostname}
	if rec.Hostname != "" && !api.ValidHostname(rec.Hostname) {
		return podRecord{}, fmt.Errorf("hostname %q is not a DNS name the guest can take: %w", rec.Hostname, errdefs.ErrInvalidArgument)
	}
	if rec.Hostname == "" {
		// containerd's runc pod has the host's hostname; a host's
		// that the guest would refuse leaves the guest's own.
		if h, err := hostHostname(); err == nil && api.ValidHostname(h) {
			rec.Hostname = h
		}
	}
	for k, v := range pod.Sysctls {
		name := dottedSysctl(k)
		if !api.ValidSysctlName(name) {
			return podRecord{}, fmt.Errorf("sysctl %q: the guest takes letters, digits, '_' and '-' between dots: %w", k, errdefs.ErrInvalidArgument)
		}
		if api.SysctlNamespace(name) == "" {
			return podRecord{}, fmt.Errorf("sysctl %q is not namespaced (kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.*, net.*): %w", k, errdefs.ErrInvalidArgument)
		}
		if rec.Sysctls == nil {
			rec.Sysctls = map[string]string{}
		}
		if _, dup := rec.Sysctls[name]; dup {
			return podRecord{}, fmt.Errorf("sysctl %q given twice (with dots and slashes): %w", name, errdefs.ErrInvalidArgument)
		}
		rec.Sysctls[name] = v
	}
	return rec, nil
}

// dottedSysctl is a sysctl name with dots as separators. A name whose
// first separator is a slash uses slashes as separators and may have
// dots in a component (net/ipv4/conf/eth0.100/rp_filter): the two swap,
// as kubelet's ConvertSysctlVariableToDotsSeparator does.
func dottedSysctl(name string) string {
	i := strings.IndexAny(name, "./")
	if i < 0 || name[i] == '.' {
		return name
	}
	return strings.Map(func(r rune) rune {
		switch r {
		case '/':
			return '.'
		case '.':
			return '/'
		}
		return r
	}, name)
}

// resolvConf is a resolv.conf of a pod's DNS configuration, in
// containerd's format (podsandbox parseDNSOptions).
func resolvConf(d *backend.DNS) string {
	var b strings.Builder
	if len(d.Searches) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(d.Searches, " "))
	}
	if len(d.Servers) > 0 {
		fmt.Fprintf(&b, "nameserver %s\n", strings.Join(d.Servers, "\nnameserver "))
	}
	if len(d.Options) > 0 {
		fmt.Fprintf(&b, "options %s\n", strings.Join(d.Options, " "))
	}
	return b.String()
}

// podFiles returns the content of the pod's files, by name in EtcDir.
func podFiles(pod backend.Pod) (map[string][]byte, error) {
	files := map[string][]byte{}
	hostname := pod.Hostname
	if hostname == "" {
		h, err := hostHostname()
		if err != nil {
			return nil, fmt.Errorf("host's hostname: %w", err)
		}
		hostname = h
	}
	files["hostname"] = []byte(hostname + "\n")
	hosts, err := readHostFile(hostHosts)
	if err != nil {
		return nil, err
	}
	files["hosts"] = hosts
	if pod.DNS != nil {
		files["resolv.conf"] = []byte(resolvConf(pod.DNS))
	} else {
		r, err := readHostFile(hostResolv)
		if err != nil {
			return nil, err
		}
		files["resolv.conf"] = r
	}
	return files, nil
}

func readHostFile(p string) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, fmt.Errorf("host file for the pod: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxHostFile+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", p, err)
	}
	if len(data) > maxHostFile {
		return nil, fmt.Errorf("host file %s is larger than %d bytes: %w", p, maxHostFile, errdefs.ErrFailedPrecondition)
	}
	return data, nil
}

// writePodFiles writes the pod's files (EtcDir, mode 0644: containers
// read them as any user) and its record (PodFile), durably.
func writePodFiles(dir string, pod backend.Pod, rec podRecord) error {
	files, err := podFiles(pod)
	if err != nil {
		return err
	}
	etc := filepath.Join(dir, EtcDir)
	if err := os.Mkdir(etc, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("pod files: %w", err)
	}
	for _, f := range podFileNames {
		if err := writeReadable(etc, f.name, files[f.name]); err != nil {
			return err
		}
	}
	if err := statefile.SyncDir(etc); err != nil {
		return err
	}
	return statefile.WriteJSON(filepath.Join(dir, PodFile), rec)
}

// writeReadable atomically and durably replaces dir/name with data, mode
// 0644.
func writeReadable(dir, name string, data []byte) (retErr error) {
	f, err := os.CreateTemp(dir, statefile.TempPrefix+name+"-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	defer func() {
		f.Close()
		if retErr != nil {
			os.Remove(f.Name())
		}
	}()
	if err := f.Chmod(0o644); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", name, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", name, err)
	}
	return os.Rename(f.Name(), filepath.Join(dir, name))
}

// readPodRecord reads PodFile; a sandbox created before there was one
// has the zero record.
func readPodRecord(dir string) (podRecord, error) {
	var rec podRecord
	err := statefile.ReadJSON(filepath.Join(dir, PodFile), &rec)
	if errors.Is(err, os.ErrNotExist) {
		return podRecord{}, nil
	}
	return rec, err
}

// removePodFiles removes what writePodFiles wrote.
func removePodFiles(dir string) {
	_ = os.RemoveAll(filepath.Join(dir, EtcDir))
	_ = os.Remove(filepath.Join(dir, PodFile))
}

// withPodFiles returns s with a bind of each of the pod's files in
// <dir>/EtcDir onto its /etc path, after the spec's own mounts, unless a
// mount of the spec has that destination or the file does not exist (a
// sandbox created before the backend wrote them, as containerd skips a
// missing file). The binds are read-only when the root is. s is not
// modified; the result shares everything with s but its Mounts.
func withPodFiles(s *specs.Spec, dir string) *specs.Spec {
	if s == nil {
		return nil
	}
	have := map[string]bool{}
	for _, m := range s.Mounts {
		have[path.Clean(m.Destination)] = true
	}
	mode := "rw"
	if s.Root != nil && s.Root.Readonly {
		mode = "ro"
	}
	var add []specs.Mount
	for _, f := range podFileNames {
		src := filepath.Join(dir, EtcDir, f.name)
		if have[f.dest] {
			continue
		}
		if fi, err := os.Lstat(src); err != nil || !fi.Mode().IsRegular() {
			continue
		}
		// containerd's CRI mounts are binds with "rbind", "rprivate".
		add = append(add, specs.Mount{Destination: f.dest, Type: "bind", Source: src, Options: []string{"rbind", "rprivate", mode}})
	}
	if len(add) == 0 {
		return s
	}
	c := *s
	c.Mounts = append(append(make([]specs.Mount, 0, len(s.Mounts)+len(add)), s.Mounts...), add...)
	return &c
}
