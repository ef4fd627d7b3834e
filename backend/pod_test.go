package backend

import (
	"fmt"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
)

func TestPodValidate(t *testing.T) {
	many := func(n int, f func(i int) string) []string {
		out := make([]string, n)
		for i := range out {
			out[i] = f(i)
		}
		return out
	}
	sysctls := func(n int) map[string]string {
		m := map[string]string{}
		for i := 0; i < n; i++ {
			m[fmt.Sprintf("net.ipv4.x%d", i)] = "1"
		}
		return m
	}
	for _, tc := range []struct {
		desc string
		pod  Pod
		ok   bool
		msg  string
	}{
		{"zero", Pod{}, true, ""},
		{"kubelet's", Pod{Hostname: "web-0", DNS: &DNS{
			Servers: []string{"10.96.0.10"}, Searches: []string{"ns.svc.cluster.local", "svc.cluster.local", "cluster.local"}, Options: []string{"ndots:5"},
		}, Sysctls: map[string]string{"net.ipv4.ip_local_port_range": "1024 65000", "net/ipv4/conf/eth0.100/rp_filter": "1"}}, true, ""},
		{"at the bounds", Pod{Hostname: strings.Repeat("a", MaxHostname), DNS: &DNS{
			Servers: many(MaxDNSEntries, func(int) string { return strings.Repeat("1", MaxDNSEntry) }),
		}, Sysctls: sysctls(MaxSysctls)}, true, ""},
		{"long hostname", Pod{Hostname: strings.Repeat("a", MaxHostname+1)}, false, "hostname"},
		{"hostname with a newline", Pod{Hostname: "a\n127.0.0.1 evil"}, false, "hostname"},
		{"hostname with a space", Pod{Hostname: "a b"}, false, "hostname"},
		{"hostname not ASCII", Pod{Hostname: "h\u00e9"}, false, "hostname"},
		{"server with a newline", Pod{DNS: &DNS{Servers: []string{"8.8.8.8\nnameserver 6.6.6.6"}}}, false, "dns_config.servers[0]"},
		{"search with a space", Pod{DNS: &DNS{Searches: []string{"a b"}}}, false, "dns_config.searches[0]"},
		{"empty option", Pod{DNS: &DNS{Options: []string{"ndots:5", ""}}}, false, "dns_config.options[1]"},
		{"long option", Pod{DNS: &DNS{Options: []string{strings.Repeat("x", MaxDNSEntry+1)}}}, false, "dns_config.options[0]"},
		{"too many searches", Pod{DNS: &DNS{Searches: many(MaxDNSEntries+1, func(i int) string { return fmt.Sprint("d", i) })}}, false, "dns_config.searches"},
		{"too many sysctls", Pod{Sysctls: sysctls(MaxSysctls + 1)}, false, "linux.sysctls"},
		{"sysctl traversal", Pod{Sysctls: map[string]string{"net/../../../etc/passwd": "x"}}, false, "empty component"},
		{"sysctl traversal with dots", Pod{Sysctls: map[string]string{"net...x": "1"}}, false, "empty component"},
		{"sysctl absolute", Pod{Sysctls: map[string]string{"/proc/sys/net/x": "1"}}, false, "empty component"},
		{"sysctl trailing dot", Pod{Sysctls: map[string]string{"net.": "1"}}, false, "empty component"},
		{"sysctl with a space", Pod{Sysctls: map[string]string{"net.a b": "1"}}, false, "linux.sysctls"},
		{"sysctl empty name", Pod{Sysctls: map[string]string{"": "1"}}, false, "linux.sysctls"},
		{"sysctl long name", Pod{Sysctls: map[string]string{"net." + strings.Repeat("a", MaxSysctlName): "1"}}, false, "linux.sysctls"},
		{"sysctl value with a newline", Pod{Sysctls: map[string]string{"net.x": "1\n2"}}, false, "net.x"},
		{"sysctl value with NUL", Pod{Sysctls: map[string]string{"net.x": "1\x00"}}, false, "net.x"},
		{"sysctl long value", Pod{Sysctls: map[string]string{"net.x": strings.Repeat("1", MaxSysctlValue+1)}}, false, "net.x"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			err := tc.pod.Validate()
			if tc.ok {
				assert.NoError(t, err)
				return
			}
			assert.True(t, errdefs.IsInvalidArgument(err), "%v", err)
			assert.ErrorContains(t, err, tc.msg)
		})
	}
}
