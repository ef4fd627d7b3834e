package sandboxer

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/testenv"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

// smallFS mounts a tmpfs of size bytes for a test's state directory.
func smallFS(t *testing.T, size string) string {
	t.Helper()
	testenv.NeedRoot(t) // to mount a tmpfs
	root := t.TempDir()
	err := syscall.Mount("tmpfs", root, "tmpfs", 0, "size="+size)
	testenv.Need(t, err == nil, "cannot mount a tmpfs here: %v", err)
	t.Cleanup(func() { syscall.Unmount(root, syscall.MNT_DETACH) })
	return root
}

// fill fills the file system of root and returns the filler's path.
func fill(t *testing.T, root string) string {
	t.Helper()
	path := filepath.Join(root, "filler")
	f, err := os.Create(path)
	require.NoError(t, err)
	defer f.Close()
	buf := make([]byte, 4096)
	for {
		if _, err := f.Write(buf); err != nil {
			require.ErrorIs(t, err, syscall.ENOSPC)
			return path
		}
	}
}

func freeBytes(t *testing.T, root string) uint64 {
	t.Helper()
	var st syscall.Statfs_t
	require.NoError(t, syscall.Statfs(root, &st))
	return st.Bfree * uint64(st.Bsize)
}

// TestDiskFull persists on a tiny tmpfs that fills up: the call that
// cannot be saved fails with ResourceExhausted naming the path, and what
// was saved before is intact.
func TestDiskFull(t *testing.T) {
	ctx := context.Background()
	root := smallFS(t, "512k")
	c := newController(t, root, slot.New())
	require.NoError(t, create(ctx, c, "sb", podConfig(map[string]string{resourceinfo.AnnotationCPULimit: "1"}, nil)))
	_, err := c.Start(ctx, "sb")
	require.NoError(t, err)
	before, err := os.ReadFile(filepath.Join(root, "sb", ResourceInfoFile))
	require.NoError(t, err)
	filler := fill(t, root)

	// A change whose resource_info.json does not fit.
	big := &resourceinfo.Resources{Unified: map[string]string{"x": strings.Repeat("y", 16<<10)}}
	err = c.SetContainer(ctx, "sb", "c1", big)
	require.Error(t, err)
	assert.True(t, errdefs.IsResourceExhausted(err), "ENOSPC is ResourceExhausted: %v", err)
	assert.Contains(t, err.Error(), filepath.Join(root, "sb"), "the error names the path")
	assert.Contains(t, err.Error(), "no space left")
	// A new sandbox does not fit either.
	err = create(ctx, c, "new", nil)
	assert.True(t, errdefs.IsResourceExhausted(err), "got %v", err)
	assert.Contains(t, err.Error(), root)

	after, err := os.ReadFile(filepath.Join(root, "sb", ResourceInfoFile))
	require.NoError(t, err)
	assert.Equal(t, string(before), string(after))
	entries, err := os.ReadDir(filepath.Join(root, "sb"))
	require.NoError(t, err)
	assert.Len(t, entries, 1, "no temp file is left")
	v, err := c.Get("sb")
	require.NoError(t, err)
	assert.Empty(t, v.State.Containers, "memory agrees with disk")

	// Room again: the same call succeeds.
	require.NoError(t, os.Remove(filler))
	require.NoError(t, c.SetContainer(ctx, "sb", "c1", big))
	c2, rep := reopen(t, c, slot.New())
	assert.Equal(t, 1, rep.Loaded)
	v, err = c2.Get("sb")
	require.NoError(t, err)
	assert.Contains(t, v.State.Containers, "c1")
}

// TestDiskFullStopAndRemove is the regression test of issue 14 item 4:
// with no space left, ready pods could be neither stopped nor removed, so
// the kubelet could not evict its way out. A stop is recorded in space the
// journal holds ahead (nothing grows), a removal frees space, and both are
// durable.
func TestDiskFullStopAndRemove(t *testing.T) {
	ctx := context.Background()
	root := smallFS(t, "2m")
	// Segments of 256 KiB keep 32 KiB for stops and removals.
	c := newTestController(t, Options{Root: root, Backend: slot.New(), JournalSegmentSize: 256 << 10})
	const pods = 20
	for i := range pods {
		id := fmt.Sprintf("pod%d", i)
		require.NoError(t, create(ctx, c, id, podConfig(map[string]string{resourceinfo.AnnotationCPULimit: "1"}, nil)))
		_, err := c.Start(ctx, id)
		require.NoError(t, err)
	}
	fill(t, root)

	// Changes that grow the journal use it up to what it keeps for stops
	// and removals, and are then refused.
	var err error
	for n := 0; err == nil; n++ {
		require.Less(t, n, 10000, "the journal is bounded")
		err = c.UpdateSpec(ctx, "pod0", func(s *resourceinfo.Spec) error { return nil })
	}
	assert.True(t, errdefs.IsResourceExhausted(err), "got %v", err)
	assert.Contains(t, err.Error(), filepath.Join(root, JournalDir))

	free := freeBytes(t, root)
	for i := range pods {
		require.NoError(t, c.Stop(ctx, fmt.Sprintf("pod%d", i)), "a ready pod stops on a full disk")
	}
	assert.Equal(t, free, freeBytes(t, root), "stopping allocated nothing")
	for i := range pods / 2 {
		require.NoError(t, c.Shutdown(ctx, fmt.Sprintf("pod%d", i)), "and is removed")
	}
	// The directories go at once; their space, in the background.
	require.Eventually(t, func() bool { return freeBytes(t, root) > free }, 10*time.Second, 10*time.Millisecond, "removal frees space")

	// All of it durable.
	c2, rep := reopen(t, c, slot.New())
	assert.Equal(t, pods/2, rep.Loaded)
	assert.Zero(t, rep.Ready)
	for i := range pods {
		_, err := c2.Get(fmt.Sprintf("pod%d", i))
		assert.Equal(t, i < pods/2, errdefs.IsNotFound(err), "pod%d", i)
	}
}

// TestDiskFullCompaction: a compaction that cannot write the sandboxes'
// state.json on a full disk fails and keeps the journal's segments; what
// they hold survives a crash, and the compaction succeeds once there is
// room again.
func TestDiskFullCompaction(t *testing.T) {
	ctx := context.Background()
	root := smallFS(t, "2m")
	c := newTestController(t, Options{Root: root, Backend: slot.New(), JournalSegmentSize: 256 << 10})
	for i := range 5 {
		id := fmt.Sprintf("pod%d", i)
		require.NoError(t, create(ctx, c, id, nil))
		_, err := c.Start(ctx, id)
		require.NoError(t, err)
	}
	filler := fill(t, root)
	err := c.Compact(ctx)
	require.Error(t, err, "no room for the first state.json")
	assert.True(t, errdefs.IsResourceExhausted(err), "got %v", err)
	assert.Positive(t, c.journal.SealedCount(), "the segments are kept")
	require.NoError(t, c.Stop(ctx, "pod0"), "and the journal takes a stop meanwhile")

	// A crash now loses nothing.
	c2, rep := reopen(t, c, slot.New())
	assert.Equal(t, 5, rep.Loaded)
	v, err := c2.Get("pod0")
	require.NoError(t, err)
	assert.Equal(t, PhaseStopped, v.State.Phase)

	require.NoError(t, os.Remove(filler))
	require.NoError(t, c2.Compact(ctx))
	c3, rep := reopen(t, c2, slot.New())
	assert.Equal(t, 5, rep.Loaded)
	assert.Equal(t, 4, rep.Ready)
	_ = c3
}
