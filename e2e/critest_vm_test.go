package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestCritestVM runs the critest (cri-tools v1.36.0) specs that pass in vm
// mode, listed in scripts/critest-pass-vm.txt, against the harness's
// containerd and vm daemon (scripts/critest.sh --reuse --vm: critest's
// image names from the busybox image, the resource-vm handler), and fails
// if any of them does not pass. make critest-vm runs the whole suite; the
// README's vm critest section has its results.
func TestCritestVM(t *testing.T) {
	needVM(t)
	if _, err := exec.LookPath("critest"); err != nil {
		if os.Getenv("RSS_E2E") != "" {
			t.Fatal("critest not installed (scripts/install-containerd.sh)")
		}
		t.Skip("critest not installed (scripts/install-containerd.sh)")
	}
	cniBin := os.Getenv("CTRD_CNI_BIN_DIR")
	if cniBin == "" {
		cniBin = "/usr/lib/cni"
	}
	if _, err := os.Stat(filepath.Join(cniBin, "bridge")); err != nil {
		if os.Getenv("RSS_E2E") != "" {
			t.Fatalf("no CNI plugins in %s (scripts/install-test-tools.sh)", cniBin)
		}
		t.Skipf("no CNI plugins in %s: apt-get install -y --no-install-recommends containernetworking-plugins", cniBin)
	}
	want := passList(t, filepath.Join(h.root, "scripts", "critest-pass-vm.txt"))

	reports := t.TempDir()
	start := time.Now()
	out, err := h.script("critest.sh", "--reuse", "--vm", "--pass-list", "--parallel", "1",
		"--timeout", "30m", "--report-dir", reports)
	t.Logf("critest.sh --reuse --vm --pass-list: %d specs in %s", len(want), time.Since(start).Round(time.Second))
	if err != nil {
		t.Errorf("critest.sh: %v", err)
	}
	if summary, err := os.ReadFile(filepath.Join(reports, "summary.txt")); err == nil {
		t.Logf("%s", strings.SplitN(string(summary), "\n", 2)[0])
	}
	got := specStates(t, filepath.Join(reports, "critest.json"))
	failed := false
	for _, name := range want {
		if s, ok := got[name]; !ok || s.State != "passed" {
			failed = true
			state := "not run (renamed in critest? update scripts/critest-pass-vm.txt)"
			if ok {
				state = s.State + ": " + s.Failure.Message
			}
			t.Errorf("critest %q: %s", name, state)
		}
	}
	if failed || err != nil {
		t.Logf("critest.sh output:\n%s", tail(out, 200))
	}
}
