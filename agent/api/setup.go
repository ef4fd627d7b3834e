package api

import (
	"regexp"
	"strings"
)

// What SetupSandbox takes of a pod's names: the guest agent refuses
// anything else, and the host checks the same before a VM boots for a pod
// the guest would refuse.
var (
	hostnameRE = regexp.MustCompile(`^[a-zA-Z0-9]([a-zA-Z0-9.-]{0,62}[a-zA-Z0-9])?$`)
	sysctlRE   = regexp.MustCompile(`^[a-z0-9_]+(\.[a-zA-Z0-9_-]+)+$`)
)

// ValidHostname reports whether name can be a guest's hostname: a DNS
// name of at most 64 characters.
func ValidHostname(name string) bool { return hostnameRE.MatchString(name) }

// ValidSysctlName reports whether name is a dotted sysctl name of
// letters, digits, '_' and '-' between its dots.
func ValidSysctlName(name string) bool { return sysctlRE.MatchString(name) }

// SysctlNamespace says which of the pod's namespaces a sysctl belongs
// to: "ipc", "uts" or "net"; "" for one that is not namespaced, which the
// guest does not set.
func SysctlNamespace(name string) string {
	switch {
	case strings.HasPrefix(name, "kernel.shm"), strings.HasPrefix(name, "kernel.msg"),
		name == "kernel.sem", strings.HasPrefix(name, "fs.mqueue."):
		return "ipc"
	case name == "kernel.hostname", name == "kernel.domainname":
		return "uts"
	case strings.HasPrefix(name, "net."):
		return "net"
	}
	return ""
}
