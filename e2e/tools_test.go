package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestInstallTestToolsFails: scripts/install-test-tools.sh fails when a
// tool is missing and cannot be installed (apt-get fails, or no root),
// rather than leaving the tests that need it to skip.
func TestInstallTestToolsFails(t *testing.T) {
	script := filepath.Join(h.root, "scripts", "install-test-tools.sh")
	for _, tc := range []struct {
		desc, id, aptGet string
	}{
		{"apt-get fails", "#!/bin/sh\necho 0\n", "#!/bin/sh\nexit 100\n"},
		{"not root", "#!/bin/sh\necho 1000\n", "#!/bin/sh\nexit 0\n"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			// A PATH with every tool but flock, and fakes of id and
			// apt-get.
			bin := t.TempDir()
			for _, tool := range []string{"systemd-analyze", "tmux"} {
				p, err := exec.LookPath(tool)
				require.NoError(t, err)
				require.NoError(t, os.Symlink(p, filepath.Join(bin, tool)))
			}
			require.NoError(t, os.WriteFile(filepath.Join(bin, "id"), []byte(tc.id), 0o755))
			require.NoError(t, os.WriteFile(filepath.Join(bin, "apt-get"), []byte(tc.aptGet), 0o755))
			bash, err := exec.LookPath("bash")
			require.NoError(t, err)
			cmd := exec.Command(bash, script)
			cmd.Env = []string{"PATH=" + bin}
			out, err := cmd.CombinedOutput()
			assert.Error(t, err, "%s", out)
			assert.Contains(t, string(out), "util-linux")
		})
	}
	out, err := exec.Command(script).CombinedOutput()
	assert.NoError(t, err, "with everything installed it succeeds: %s", out)
}
