package e2e

import (
	"bufio"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/testenv"
)

// TestCritest runs the critest (cri-tools v1.36.0) specs that pass in slot
// mode, listed in scripts/critest-pass.txt, against the harness's containerd
// and sandboxer (scripts/critest.sh --reuse: it imports critest's image names
// and gives the containerd a bridge network for the run), and fails if any
// of them does not pass. The README's "## critest" section has the whole
// suite.
func TestCritest(t *testing.T) {
	runCritestPassList(t, "critest-pass.txt", "10m")
}

// runCritestPassList runs the specs listed in scripts/<list> with
// scripts/critest.sh --reuse and the extra flags, and fails the test for
// each of them that does not pass.
func runCritestPassList(t *testing.T, list, timeout string, flags ...string) {
	t.Helper()
	testenv.NeedTool(t, "critest", "scripts/install-containerd.sh")
	cniBin := os.Getenv("CTRD_CNI_BIN_DIR")
	if cniBin == "" {
		cniBin = "/usr/lib/cni"
	}
	_, err := os.Stat(filepath.Join(cniBin, "bridge"))
	testenv.Need(t, err == nil, "no CNI plugins in %s: apt-get install -y --no-install-recommends containernetworking-plugins (scripts/install-test-tools.sh)", cniBin)
	want := passList(t, filepath.Join(h.root, "scripts", list))

	reports := t.TempDir()
	start := time.Now()
	args := append([]string{"--reuse"}, flags...)
	args = append(args, "--pass-list", "--parallel", "1", "--timeout", timeout, "--report-dir", reports)
	out, err := h.script("critest.sh", args...)
	t.Logf("critest.sh %s: %d specs in %s", strings.Join(args[:len(flags)+2], " "), len(want), time.Since(start).Round(time.Second))
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
			state := "not run (renamed in critest? update scripts/" + list + ")"
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

func passList(t *testing.T, path string) []string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var names []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if line := sc.Text(); line != "" && !strings.HasPrefix(line, "#") {
			names = append(names, line)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if len(names) == 0 {
		t.Fatalf("%s lists no spec", path)
	}
	return names
}

// specReport is the part of a ginkgo JSON report's spec that the test reads.
type specReport struct {
	ContainerHierarchyTexts []string
	LeafNodeText            string
	LeafNodeType            string
	State                   string
	Failure                 struct{ Message string }
}

// specStates maps each spec's full name to its report.
func specStates(t *testing.T, path string) map[string]specReport {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("no critest report: %v", err)
	}
	var suites []struct{ SpecReports []specReport }
	if err := json.Unmarshal(data, &suites); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	m := map[string]specReport{}
	for _, s := range suites {
		for _, r := range s.SpecReports {
			if r.LeafNodeType == "It" {
				m[strings.Join(append(r.ContainerHierarchyTexts, r.LeafNodeText), " ")] = r
			}
		}
	}
	return m
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// TestCritestDirect runs critest's PodSandbox and Idempotence specs against
// the daemon's own CRI endpoint (direct mode, no containerd). The sysctl
// specs exec sysctl in a container, which slot containers cannot do.
func TestCritestDirect(t *testing.T) {
	testenv.NeedTool(t, "critest", "scripts/install-containerd.sh")
	report := filepath.Join(t.TempDir(), "critest.json")
	ep := "unix://" + h.SandboxerSock()
	out, err := exec.Command("critest", "--runtime-endpoint", ep, "--image-endpoint", ep,
		"--ginkgo.focus", "PodSandbox|Idempotence", "--ginkgo.skip", "sysctls",
		"--ginkgo.no-color", "--ginkgo.timeout", "5m", "--ginkgo.json-report", report).CombinedOutput()
	if err != nil {
		t.Fatalf("critest against the direct endpoint: %v\n%s", err, tail(string(out), 100))
	}
	passed := 0
	for _, s := range specStates(t, report) {
		if s.State == "passed" {
			passed++
		}
	}
	t.Logf("critest on the direct endpoint: %d specs passed", passed)
	if passed < 11 {
		t.Errorf("only %d PodSandbox/Idempotence specs passed, want 11\n%s", passed, tail(string(out), 100))
	}
}
