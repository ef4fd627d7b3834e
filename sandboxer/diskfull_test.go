package sandboxer

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/testenv"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

// TestDiskFull persists on a tiny tmpfs that fills up: the call that
// cannot be saved fails, and what was saved before is intact.
func TestDiskFull(t *testing.T) {
	testenv.NeedRoot(t) // to mount a tmpfs
	ctx := context.Background()
	root := t.TempDir()
	err := syscall.Mount("tmpfs", root, "tmpfs", 0, "size=256k")
	testenv.Need(t, err == nil, "cannot mount a tmpfs here: %v", err)
	t.Cleanup(func() { syscall.Unmount(root, syscall.MNT_DETACH) })

	c := newController(t, root, slot.New())
	require.NoError(t, create(ctx, c, "sb", podConfig(map[string]string{resourceinfo.AnnotationCPULimit: "1"}, nil)))
	_, err = c.Start(ctx, "sb")
	require.NoError(t, err)
	before, err := os.ReadFile(filepath.Join(root, "sb", ResourceInfoFile))
	require.NoError(t, err)
	stateBefore, err := os.ReadFile(filepath.Join(root, "sb", StateFile))
	require.NoError(t, err)

	// Fill the filesystem.
	filler, err := os.Create(filepath.Join(root, "filler"))
	require.NoError(t, err)
	_, err = filler.Write(make([]byte, 1<<20))
	require.Error(t, err, "the filesystem is full")
	filler.Close()

	// A change whose state does not fit.
	big := &resourceinfo.Resources{Unified: map[string]string{"x": strings.Repeat("y", 64<<10)}}
	err = c.SetContainer(ctx, "sb", "c1", big)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "no space left")

	after, err := os.ReadFile(filepath.Join(root, "sb", ResourceInfoFile))
	require.NoError(t, err)
	assert.Equal(t, string(before), string(after))
	stateAfter, err := os.ReadFile(filepath.Join(root, "sb", StateFile))
	require.NoError(t, err)
	assert.Equal(t, string(stateBefore), string(stateAfter))
	entries, err := os.ReadDir(filepath.Join(root, "sb"))
	require.NoError(t, err)
	assert.Len(t, entries, 2, "no temp file is left")
	v, err := c.Get("sb")
	require.NoError(t, err)
	assert.Empty(t, v.State.Containers, "memory agrees with disk")

	// Room again: the same call succeeds.
	require.NoError(t, os.Remove(filepath.Join(root, "filler")))
	require.NoError(t, c.SetContainer(ctx, "sb", "c1", big))
}
