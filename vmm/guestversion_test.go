package vmm

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestGuestWithoutAgent: a guest of an older scripts/build-guest.sh (no
// agent in its guest.version) is refused when the backend starts, rather
// than every sandbox waiting ready_timeout for an agent that is not there.
func TestGuestWithoutAgent(t *testing.T) {
	for _, tc := range []struct {
		desc    string
		version string // "" : no guest.version
		initrd  string // "" : the guest directory's
		ok      bool
	}{
		{"with an agent", "kernel=linux-image-6.1.0-57-cloud-amd64\nkver=6.1.0-57-cloud-amd64\nagent=2d9c3e935e0ce301\nscript=ce938d729eaa88d2\n", "", true},
		{"without an agent", "kernel=linux-image-6.1.0-57-cloud-amd64\nkver=6.1.0-57-cloud-amd64\nbusybox=1:1.35.0-4+deb12u1+b1\nscript=16d5c0acef00da41\n", "", false},
		{"an empty agent", "kver=6.1.0-57-cloud-amd64\nagent=\n", "", false},
		{"no guest.version", "", "", true},
		{"an initramfs of its own", "kver=6.1.0-57-cloud-amd64\n", "elsewhere", true},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			dir := t.TempDir()
			cfg := fakeGuestFiles(dir)
			if tc.version != "" {
				require.NoError(t, os.WriteFile(filepath.Join(dir, GuestVersionFile), []byte(tc.version), 0o644))
			}
			if tc.initrd != "" {
				other := t.TempDir()
				cfg.Initrd = filepath.Join(other, "initramfs.img")
				require.NoError(t, os.WriteFile(cfg.Initrd, []byte("x"), 0o644))
			}
			dialed := false
			b, err := newBackend(context.Background(), cfg, Options{}, func() (lvClient, error) {
				dialed = true
				return newFakeLibvirt(), nil
			})
			if tc.ok {
				require.NoError(t, err)
				require.NoError(t, b.Close())
				return
			}
			require.Error(t, err)
			assert.True(t, errdefs.IsFailedPrecondition(err), "%v", err)
			assert.Contains(t, err.Error(), "make guest")
			assert.False(t, dialed, "refused before connecting to libvirtd")
		})
	}
}
