// Package systemd holds the systemd units; this test installs them with
// `make install` into a temporary root and checks them with
// `systemd-analyze verify` (scripts/install-test-tools.sh installs it).
package systemd

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/testenv"
)

var units = []string{"kuasar-resource-slot.service", "kuasar-resource-vm.service"}

func TestUnitsVerify(t *testing.T) {
	analyze := testenv.NeedTool(t, "systemd-analyze", "scripts/install-test-tools.sh installs it")
	mk := testenv.NeedTool(t, "make", "apt-get install make")
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	dest := t.TempDir()
	// BIN: build into the temp root, not over bin/, which other tests use.
	install := exec.Command(mk, "-C", root, "install", "DESTDIR="+dest, "BIN="+filepath.Join(dest, "build"))
	if out, err := install.CombinedOutput(); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	for _, f := range []string{
		"usr/local/bin/resource-slot-sandboxer", "usr/local/bin/containerd-shim-resource-slot-v1", "usr/local/bin/slotctl",
		"etc/kuasar-resource-slot/config.toml", "etc/kuasar-resource-vm/config.toml",
	} {
		if _, err := os.Stat(filepath.Join(dest, f)); err != nil {
			t.Errorf("make install did not install %s: %v", f, err)
		}
	}

	// The units as installed, their ExecStart pointing into the temp root
	// (verify checks that the command exists and is executable).
	var paths []string
	for _, u := range units {
		data, err := os.ReadFile(filepath.Join(dest, "etc/systemd/system", u))
		if err != nil {
			t.Fatalf("make install did not install %s: %v", u, err)
		}
		text := string(data)
		if !strings.Contains(text, "ExecStart=/usr/local/bin/resource-slot-sandboxer ") {
			t.Fatalf("%s: no ExecStart of /usr/local/bin/resource-slot-sandboxer", u)
		}
		text = strings.ReplaceAll(text, "=/usr/local/bin/", "="+filepath.Join(dest, "usr/local/bin")+"/")
		p := filepath.Join(t.TempDir(), u)
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	cmd := exec.Command(analyze, append([]string{"verify"}, paths...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	// Warnings (an unknown key, a bad value) do not fail verify: any
	// output is a failure here.
	if err != nil || strings.TrimSpace(out.String()) != "" {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out.String())
	}

	// A broken unit is caught, so the check above means something.
	bad := filepath.Join(t.TempDir(), "bad.service")
	os.WriteFile(bad, []byte("[Service]\nType=notify\nExecStart=/nonexistent/resource-slot-sandboxer\n"), 0o644)
	if out, err := exec.Command(analyze, "verify", bad).CombinedOutput(); err == nil && len(bytes.TrimSpace(out)) == 0 {
		t.Fatal("systemd-analyze verify accepts a unit whose command does not exist")
	}
}

// TestVMUnit: the vm unit runs vm mode on its own sockets and directory.
func TestVMUnit(t *testing.T) {
	data, err := os.ReadFile("kuasar-resource-vm.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"--mode vm", "--listen /run/resource-vm-sandboxer.sock", "--dir /var/lib/kuasar-resource-vm",
		"Type=notify", "WatchdogSec=", "KillMode=process",
	} {
		if !bytes.Contains(data, []byte(want)) {
			t.Errorf("kuasar-resource-vm.service lacks %q", want)
		}
	}
}
