package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/admin/api"
)

// AdminSock is the admin socket: derived from the listen socket.
func (x *harness) AdminSock() string { return filepath.Join(x.base, "sb-admin.sock") }

// slotctl runs bin/slotctl against the sandboxer's admin socket.
func (x *harness) slotctl(args ...string) (stdout, stderr string, code int) {
	cmd := exec.Command(filepath.Join(x.bin, "slotctl"), append([]string{"--socket", x.AdminSock()}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code = cmd.ProcessState.ExitCode()
	if err != nil && code < 0 {
		code = 255
	}
	return out.String(), errb.String(), code
}

func (x *harness) mustSlotctl(t *testing.T, args ...string) string {
	t.Helper()
	out, errOut, code := x.slotctl(args...)
	require.Equal(t, 0, code, "slotctl %s: %s", strings.Join(args, " "), errOut)
	require.Empty(t, errOut)
	return out
}

func (x *harness) slotctlJSON(t *testing.T, v any, args ...string) {
	t.Helper()
	out := x.mustSlotctl(t, append([]string{"-o", "json"}, args...)...)
	require.NoError(t, json.Unmarshal([]byte(out), v), "slotctl %s: %s", strings.Join(args, " "), out)
}

func cpuOf(c api.Capacity) api.ResourceCapacity {
	for _, r := range c.Resources {
		if r.Resource == "cpu" {
			return r
		}
	}
	return api.ResourceCapacity{}
}

// TestOps: with 3 free cores under the enforce policy, a pod that does
// not fit fails through containerd naming the resource; slotctl shows
// the capacity, resizes a pod (resource_info.json follows) so that the
// other fits, lists, watches; Prometheus sees all of it.
func TestOps(t *testing.T) {
	if _, err := os.Stat(filepath.Join(h.bin, "slotctl")); err != nil {
		t.Fatalf("slotctl not built (make build): %v", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	metricsAddr := l.Addr().String()
	l.Close()

	// Sandboxes of earlier tests may still hold cores (created through
	// the sandbox API and never started, until created_grace collects
	// them): the node gets 3 cores on top of those.
	var capa api.Capacity
	h.slotctlJSON(t, &capa, "capacity")
	base := cpuOf(capa).Allocated
	capCPU := base + 3
	num := func(f float64) string { return strconv.FormatFloat(f, 'f', -1, 64) }
	extra := fmt.Sprintf(`metrics_address = %q
[capacity]
cpu = %s
policy = "enforce"
[cost]
cpu_core_hour = 0.05
memory_gib_hour = 0.01
`, metricsAddr, num(capCPU))

	h.withConfig(t, extra, func() {
		h.slotctlJSON(t, &capa, "capacity")
		require.Equal(t, "enforce", capa.Policy)
		require.Equal(t, capCPU, cpuOf(capa).Capacity)
		require.Equal(t, base, cpuOf(capa).Allocated)
		baseRequested := *cpuOf(capa).Requested
		holding := capa.Sandboxes
		exceeds := fmt.Sprintf("cpu: request 2 cores exceeds the free 1 of %s (capacity %s × overcommit 1)", num(capCPU), num(capCPU))

		a := h.runp(t, podConfig("ops-a", map[string]string{
			"resources.limits.cpu": "2", "resources.limits.memory": "2Gi", "resources.requests.cpu": "1",
		}, nil))
		defer h.removePod(t, a)

		// 2 more cores do not fit the 1 free: refused through containerd,
		// leaving nothing on disk.
		dirs := func() []string {
			entries, err := os.ReadDir(h.StateDir())
			require.NoError(t, err)
			var names []string
			for _, e := range entries {
				if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
					names = append(names, e.Name())
				}
			}
			return names
		}
		before := dirs()
		_, err := h.crictl("runp", "--runtime", "resource-slot", writeJSON(t, podConfig("ops-b", map[string]string{"resources.limits.cpu": "2"}, nil)))
		require.Error(t, err)
		assert.Contains(t, err.Error(), exceeds)
		assert.Equal(t, before, dirs())

		out := h.mustSlotctl(t, "capacity")
		assert.Contains(t, out, fmt.Sprintf("policy enforce, %d sandboxes hold resources", holding+1))
		assert.Regexp(t, fmt.Sprintf(`(?m)^cpu\s+%[1]s\s+1\s+%[1]s\s+%[2]s\s+%[3]s\s+`, num(capCPU), num(base+2), num(baseRequested+1)), out)
		assert.Regexp(t, `(?m)^REJECTED\s+POLICY\s+COUNT\n^cpu\s+enforce\s+1$`, out)
		h.slotctlJSON(t, &capa, "capacity")
		assert.Equal(t, base+2, cpuOf(capa).Allocated)
		assert.Equal(t, baseRequested+1, *cpuOf(capa).Requested)
		assert.Equal(t, 1.0, cpuOf(capa).Free)

		// Resize a: resource_info.json follows, and then b fits.
		out = h.mustSlotctl(t, "resources", "set", a, "--cpu", "1", "--memory", "1Gi")
		assert.Regexp(t, `(?m)^cpu\s+1\s+1\s+annotation$`, out)
		ri := h.resourceInfo(t, a)
		assert.Equal(t, 1.0, ri["cpu_limit"])
		assert.Equal(t, 1073741824.0, ri["memory_limit"])
		assert.Equal(t, 100000.0, ri["cpu_quota"], "derived cgroup values follow")
		var inspect map[string]any
		require.NoError(t, json.Unmarshal([]byte(h.mustCrictl(t, "inspectp", a)), &inspect))
		assert.Equal(t, 1.0, inspect["resourceInfo"].(map[string]any)["cpu_limit"])

		b := h.runp(t, podConfig("ops-b", map[string]string{"resources.limits.cpu": "2"}, nil))
		defer h.removePod(t, b)

		// A resize that does not fit is refused and changes nothing.
		_, errOut, code := h.slotctl("resources", "set", a, "--cpu", "2")
		assert.Equal(t, 1, code)
		assert.Contains(t, errOut, exceeds)
		assert.Equal(t, 1.0, h.resourceInfo(t, a)["cpu_limit"])

		var list []api.Sandbox
		h.slotctlJSON(t, &list, "list")
		ids := map[string]api.Sandbox{}
		ready := 0
		for _, s := range list {
			ids[s.ID] = s
			if s.Phase == "ready" {
				ready++
			}
		}
		require.Contains(t, ids, a)
		require.Contains(t, ids, b)
		assert.Equal(t, "ready", ids[a].Phase)
		assert.Equal(t, "slot", ids[a].Mode)
		assert.Equal(t, 1.0, *ids[a].Limits.CPU)
		assert.Equal(t, 2.0, *ids[b].Limits.CPU)
		assert.Regexp(t, `(?m)^`+a+`\s+slot\s+ready\s+`, h.mustSlotctl(t, "list"))

		out = h.mustSlotctl(t, "resources", "usage", a)
		assert.Contains(t, out, "simulated usage")
		var cost api.Cost
		h.slotctlJSON(t, &cost, "cost")
		assert.Equal(t, "USD", cost.Currency)
		assert.Equal(t, 0.05, cost.Prices.CPUCoreHour)
		assert.GreaterOrEqual(t, len(cost.Sandboxes), 2)
		assert.Contains(t, h.mustSlotctl(t, "cost"), "TOTAL")

		_, errOut, code = h.slotctl("resources", "limits", "nope")
		assert.Equal(t, 1, code)
		assert.Equal(t, "slotctl: sandbox nope not found\n", errOut)

		// Prometheus.
		metrics := httpGet(t, "http://"+metricsAddr+"/metrics")
		for _, want := range []string{
			`resource_slot_capacity{resource="cpu"} ` + num(capCPU),
			`resource_slot_allocated{resource="cpu"} ` + num(base+3),
			`resource_slot_admission_rejections_total{policy="enforce",resource="cpu"} 2`,
			fmt.Sprintf(`resource_slot_sandboxes{mode="slot",state="ready"} %d`, ready),
			`resource_slot_operation_duration_seconds_count{code="ResourceExhausted",method="/containerd.services.sandbox.v1.Controller/Create"} 1`,
			`resource_slot_sandbox_usage{resource="memory_bytes",sandbox="` + a + `"} 0`,
			`resource_slot_cost_total{sandbox="` + a + `"}`,
		} {
			assert.Contains(t, metrics, want)
		}
		assert.Regexp(t, `resource_slot_operation_duration_seconds_count\{code="OK",method="/containerd.services.sandbox.v1.Controller/Start"\} [1-9]`, metrics)
		assert.Equal(t, "ok\n", httpGet(t, "http://"+metricsAddr+"/healthz"))

		watchInTmux(t, a)
	})
}

func httpGet(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode, url)
	return string(body)
}

// watchInTmux runs `slotctl resources watch` in a tmux pane: it redraws
// in place (one header on the screen, its time changing) until Ctrl-C,
// which ends it with status 0.
func watchInTmux(t *testing.T, id string) {
	tmux, err := exec.LookPath("tmux")
	if err != nil {
		t.Log("tmux not installed: watch not tested in a terminal (scripts/install-test-tools.sh installs it)")
		return
	}
	server := fmt.Sprintf("rss-e2e-%d", os.Getpid())
	run := func(args ...string) string {
		t.Helper()
		out, err := exec.Command(tmux, append([]string{"-L", server}, args...)...).CombinedOutput()
		require.NoError(t, err, "tmux %s: %s", strings.Join(args, " "), out)
		return string(out)
	}
	defer exec.Command(tmux, "-L", server, "kill-server").Run()
	cmd := fmt.Sprintf("%s --socket %s resources watch %s --interval 300ms; echo slotctl-exit=$?; sleep 60",
		filepath.Join(h.bin, "slotctl"), h.AdminSock(), id)
	run("new-session", "-d", "-s", "watch", "-x", "160", "-y", "40", "env", "TERM=xterm", "bash", "-c", cmd)
	capture := func() string { return run("capture-pane", "-p", "-t", "watch") }

	var first string
	eventually(t, "the watch to draw", func() bool {
		first = capture()
		return strings.Contains(first, "cpu (cores)")
	})
	assert.Equal(t, 1, strings.Count(first, "Every 300ms: slotctl resources usage "+id), first)
	assert.Contains(t, first, "sandbox "+id+": ready, slot mode, simulated usage")
	header := func(s string) string {
		for _, line := range strings.Split(s, "\n") {
			if strings.HasPrefix(line, "Every ") {
				return line
			}
		}
		return ""
	}
	eventually(t, "the watch to redraw", func() bool {
		s := capture()
		return header(s) != "" && header(s) != header(first) && strings.Count(s, "Every 300ms") == 1
	})

	run("send-keys", "-t", "watch", "C-c")
	eventually(t, "slotctl to exit on Ctrl-C", func() bool {
		return strings.Contains(capture(), "slotctl-exit=0")
	})
	time.Sleep(10 * time.Millisecond)
}
