package unixsock

import (
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestListen(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		desc    string
		prepare func(path string)
		wantErr string
	}{
		{"fresh", func(string) {}, ""},
		{"stale socket is replaced", func(p string) {
			l, err := net.Listen("unix", p)
			require.NoError(t, err)
			l.(*net.UnixListener).SetUnlinkOnClose(false)
			l.Close()
		}, ""},
		{"live socket is refused", func(p string) {
			l, err := net.Listen("unix", p)
			require.NoError(t, err)
			t.Cleanup(func() { l.Close() })
		}, "another process is serving"},
		{"symlink is refused", func(p string) {
			require.NoError(t, os.Symlink(filepath.Join(dir, "elsewhere"), p))
		}, "symlink"},
		{"regular file is refused", func(p string) {
			require.NoError(t, os.WriteFile(p, nil, 0o600))
		}, "not a socket"},
		{"another user's socket is refused", func(p string) {
			if os.Geteuid() != 0 {
				t.Skip("chown needs root")
			}
			l, err := net.Listen("unix", p)
			require.NoError(t, err)
			l.(*net.UnixListener).SetUnlinkOnClose(false)
			l.Close()
			require.NoError(t, os.Lchown(p, 65534, 65534))
		}, "owned by uid 65534"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			p := filepath.Join(dir, tc.desc[:5]+".sock")
			tc.prepare(p)
			l, err := Listen(p)
			if tc.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.wantErr)
				return
			}
			require.NoError(t, err)
			defer l.Close()
			fi, err := os.Stat(p)
			require.NoError(t, err)
			assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "only the owner may connect")
			assert.True(t, Answers(p))
		})
	}
}
