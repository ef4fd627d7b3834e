package unixsock

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/testenv"
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
			testenv.NeedRoot(t)
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

// TestHostileDirectory: a socket directory in which another user could
// rename the socket away and listen in its place is refused, unless
// allowed.
func TestHostileDirectory(t *testing.T) {
	testenv.NeedRoot(t)
	base := t.TempDir()
	for _, tc := range []struct {
		desc    string
		mode    os.FileMode
		uid     int
		parent  bool // the mode is the parent's
		wantErr string
	}{
		{"private", 0o700, 0, false, ""},
		{"world-writable", 0o777, 0, false, "writable by every user"},
		{"world-writable parent", 0o777, 0, true, "writable by every user"},
		{"world-writable and sticky (as /tmp)", 0o777 | os.ModeSticky, 0, false, ""},
		{"group-writable, another group", 0o770, 0, false, "writable by group 65534"},
		{"another user's", 0o755, 65534, false, "owned by uid 65534"},
		{"another user's parent", 0o755, 65534, true, "owned by uid 65534"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			parent := filepath.Join(base, strings.ReplaceAll(tc.desc, " ", "-"))
			dir := filepath.Join(parent, "run")
			require.NoError(t, os.MkdirAll(dir, 0o700))
			target := dir
			if tc.parent {
				target = parent
			}
			require.NoError(t, os.Chmod(target, tc.mode))
			gid := 0
			if strings.Contains(tc.desc, "group") {
				gid = 65534
			}
			require.NoError(t, os.Chown(target, tc.uid, gid))
			p := filepath.Join(dir, "s.sock")
			l, err := Listen(p)
			if tc.wantErr == "" {
				require.NoError(t, err)
				l.Close()
				return
			}
			require.Error(t, err)
			assert.True(t, errors.Is(err, ErrSharedDir), "%v", err)
			assert.Contains(t, err.Error(), tc.wantErr)
			assert.Contains(t, err.Error(), "allow_shared_socket_dir")
			_, serr := os.Lstat(p)
			assert.True(t, os.IsNotExist(serr), "nothing created")

			l, err = ListenOptions(p, Options{AllowSharedDir: true})
			require.NoError(t, err, "allowed explicitly")
			l.Close()
		})
	}
}

// TestCloseRemovesOnlyItsOwn: Close removes the socket it created, and
// not one another process put at the path (after renaming ours away).
func TestCloseRemovesOnlyItsOwn(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "s.sock")
	l, err := Listen(p)
	require.NoError(t, err)
	assert.True(t, l.Owned())
	require.NoError(t, l.Close())
	_, err = os.Lstat(p)
	assert.True(t, os.IsNotExist(err), "its own socket is removed")

	l, err = Listen(p)
	require.NoError(t, err)
	require.NoError(t, os.Rename(p, filepath.Join(dir, "moved.sock")))
	other, err := net.Listen("unix", p)
	require.NoError(t, err)
	other.(*net.UnixListener).SetUnlinkOnClose(false)
	defer other.Close()
	assert.False(t, l.Owned())
	require.NoError(t, l.Close())
	assert.True(t, Answers(p), "the other socket is still there and served")

	// Removed from under it: Close removes nothing.
	q := filepath.Join(dir, "q.sock")
	l, err = Listen(q)
	require.NoError(t, err)
	require.NoError(t, os.Remove(q))
	require.NoError(t, os.WriteFile(q, nil, 0o600))
	require.NoError(t, l.Close())
	_, err = os.Lstat(q)
	assert.NoError(t, err, "a file put there since is left")
}

// TestServingPID: the listener's pid comes from the peer credentials.
func TestServingPID(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	l, err := Listen(path)
	require.NoError(t, err)
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	pid, err := ServingPID(path)
	require.NoError(t, err)
	assert.Equal(t, os.Getpid(), pid)
	_, err = ServingPID(filepath.Join(t.TempDir(), "none.sock"))
	assert.Error(t, err)
}
