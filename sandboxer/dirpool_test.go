package sandboxer

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/statefile"
)

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	fi, err := os.Stat(path)
	require.NoError(t, err)
	return fi.Sys().(*syscall.Stat_t).Ino
}

// TestDirPool: a sandbox directory appears with its resource_info.json; a
// removed one is gone at once, emptied in the background, and reused,
// its file overwritten.
func TestDirPool(t *testing.T) {
	root := t.TempDir()
	p, err := newDirPool(root)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	a := filepath.Join(root, "a")
	require.NoError(t, p.make(a, []byte(`{"first":true}`)))
	data, err := os.ReadFile(filepath.Join(a, ResourceInfoFile))
	require.NoError(t, err)
	assert.Equal(t, `{"first":true}`, string(data))
	ino := inode(t, filepath.Join(a, ResourceInfoFile))
	// What the sandbox left: its state, other files, a directory.
	require.NoError(t, os.WriteFile(filepath.Join(a, StateFile), []byte("{}"), 0o600))
	stateIno := inode(t, filepath.Join(a, StateFile))
	require.NoError(t, os.WriteFile(filepath.Join(a, UsageFile), []byte("{}"), 0o600))
	require.NoError(t, os.MkdirAll(filepath.Join(a, "disk", "x"), 0o700))
	// An earlier version's temp file, which recovery leaves.
	require.NoError(t, os.WriteFile(filepath.Join(a, statefile.TempPrefix+StateFile), []byte("{"), 0o600))
	// A resource change leaves the previous resource_info.json as the spare.
	require.NoError(t, statefile.Replace(a, ResourceInfoFile, []byte(`{"second":true}`)))
	spareIno := inode(t, filepath.Join(a, statefile.SpareName(ResourceInfoFile)))
	assert.Equal(t, ino, spareIno, "the exchange keeps the old file as the spare")
	ino = inode(t, filepath.Join(a, ResourceInfoFile))

	require.NoError(t, p.remove(a))
	_, err = os.Stat(a)
	assert.True(t, os.IsNotExist(err), "removed at once")
	if lowSpace(root) {
		t.Skip("the test's file system is nearly full: nothing is kept for reuse")
	}
	require.Eventually(t, func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return len(p.ready) == 1
	}, 10*time.Second, time.Millisecond)

	b := filepath.Join(root, "b")
	require.NoError(t, p.make(b, []byte(`{"b":1}`)))
	data, err = os.ReadFile(filepath.Join(b, ResourceInfoFile))
	require.NoError(t, err)
	assert.Equal(t, `{"b":1}`, string(data), "overwritten whole, shorter than before")
	assert.Equal(t, ino, inode(t, filepath.Join(b, ResourceInfoFile)), "the file is reused")
	entries, err := os.ReadDir(b)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	assert.ElementsMatch(t, []string{ResourceInfoFile, statefile.SpareName(StateFile), statefile.SpareName(ResourceInfoFile)}, names, "what the removed sandbox left is gone")
	assert.Equal(t, stateIno, inode(t, filepath.Join(b, statefile.SpareName(StateFile))), "its state.json's file is kept for the next")
	assert.Equal(t, spareIno, inode(t, filepath.Join(b, statefile.SpareName(ResourceInfoFile))), "so is the spare")
	require.NoError(t, os.Remove(filepath.Join(b, statefile.SpareName(StateFile))))
	require.NoError(t, os.Remove(filepath.Join(b, statefile.SpareName(ResourceInfoFile))))

	// A directory in the way.
	require.NoError(t, os.WriteFile(filepath.Join(b, UsageFile), nil, 0o600))
	err = p.make(b, []byte("{}"))
	assert.True(t, errdefs.IsAlreadyExists(err), "got %v", err)
}
