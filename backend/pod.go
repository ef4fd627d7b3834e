package backend

import (
	"fmt"
	"strings"

	"github.com/containerd/errdefs"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/logsafe"
)

// Pod is what a backend needs of a pod's configuration besides its
// resources: what containerd's own podsandbox controller sets up for a
// runc pod and leaves to an external sandbox controller (the pod's
// hostname, its /etc/hosts and resolv.conf, its sysctls). The controller
// builds it from the CRI PodSandboxConfig; a sandbox created by another
// client has a zero Pod. A backend that needs it after a restart keeps it
// in its own record (Recover does not get it).
type Pod struct {
	// Hostname is the pod's hostname; "" means the host's (as containerd
	// does for a runc pod).
	Hostname string `json:"hostname,omitempty"`
	// DNS is the pod's resolv.conf; nil means a copy of the host's.
	DNS *DNS `json:"dns,omitempty"`
	// Sysctls are the pod's sysctls (linux.sysctls), by name.
	Sysctls map[string]string `json:"sysctls,omitempty"`
}

// DNS is a pod's DNS configuration (CRI DNSConfig).
type DNS struct {
	Servers  []string `json:"servers,omitempty"`
	Searches []string `json:"searches,omitempty"`
	Options  []string `json:"options,omitempty"`
}

// Bounds of a Pod's values. They are far above what kubelet sends (3
// nameservers, 32 search domains of at most 2048 characters in all, names
// of 253 characters) and keep a hostile client from writing lines of its
// own into a pod's files or sending megabytes into a guest.
const (
	// MaxHostname is the kernel's HOST_NAME_MAX.
	MaxHostname = 64
	// MaxDNSEntries bounds each of the servers, searches and options.
	MaxDNSEntries = 64
	// MaxDNSEntry bounds one server, search domain or option.
	MaxDNSEntry = 256
	// MaxSysctls bounds the number of sysctls.
	MaxSysctls = 256
	// MaxSysctlName and MaxSysctlValue bound one sysctl.
	MaxSysctlName  = 256
	MaxSysctlValue = 1024
)

// Validate checks a Pod for what would break the files and calls made of
// it: control characters, white space in a word, path traversal in a
// sysctl name, and sizes beyond the bounds above. It wraps
// errdefs.ErrInvalidArgument and names the field. A backend may refuse
// more (the vm backend refuses sysctls the guest kernel does not
// namespace).
func (p Pod) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{errdefs.ErrInvalidArgument}, args...)...)
	}
	if len(p.Hostname) > MaxHostname {
		return bad("hostname: %d bytes, at most %d", len(p.Hostname), MaxHostname)
	}
	if i := strings.IndexFunc(p.Hostname, notWordRune); i >= 0 {
		return bad("hostname %q: character %q at %d", p.Hostname, p.Hostname[i], i)
	}
	if d := p.DNS; d != nil {
		for _, l := range []struct {
			name string
			v    []string
		}{{"dns_config.servers", d.Servers}, {"dns_config.searches", d.Searches}, {"dns_config.options", d.Options}} {
			if len(l.v) > MaxDNSEntries {
				return bad("%s: %d entries, at most %d", l.name, len(l.v), MaxDNSEntries)
			}
			for n, s := range l.v {
				if s == "" || len(s) > MaxDNSEntry {
					return bad("%s[%d]: %d bytes, 1 to %d", l.name, n, len(s), MaxDNSEntry)
				}
				if i := strings.IndexFunc(s, notWordRune); i >= 0 {
					return bad("%s[%d] %q: character %q at %d", l.name, n, logsafe.String(s), s[i], i)
				}
			}
		}
	}
	if len(p.Sysctls) > MaxSysctls {
		return bad("linux.sysctls: %d entries, at most %d", len(p.Sysctls), MaxSysctls)
	}
	for k, v := range p.Sysctls {
		if k == "" || len(k) > MaxSysctlName {
			return bad("linux.sysctls: name of %d bytes, 1 to %d", len(k), MaxSysctlName)
		}
		if i := strings.IndexFunc(k, notWordRune); i >= 0 {
			return bad("linux.sysctls: name %q: character %q at %d", logsafe.String(k), k[i], i)
		}
		// Slashes are separators as well as dots (runc and kubelet take
		// both): no component may be empty, so none climbs out of
		// /proc/sys ("..", "/x", "a//b").
		for _, c := range strings.Split(strings.ReplaceAll(k, "/", "."), ".") {
			if c == "" {
				return bad("linux.sysctls: name %q has an empty component", logsafe.String(k))
			}
		}
		if len(v) > MaxSysctlValue {
			return bad("linux.sysctls: %s: value of %d bytes, at most %d", k, len(v), MaxSysctlValue)
		}
		if strings.ContainsAny(v, "\x00\n\r") {
			return bad("linux.sysctls: %s: value %q has a line break or NUL", k, logsafe.String(v))
		}
	}
	return nil
}

// notWordRune reports a rune that may not appear in a hostname, a DNS
// word or a sysctl name: white space, control characters, and anything
// outside printable ASCII.
func notWordRune(r rune) bool { return r <= ' ' || r >= 0x7f }
