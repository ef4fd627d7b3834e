package sandboxer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

func TestRecoverKeepsState(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := newController(t, root, slot.New())
	cfg := podConfig(map[string]string{resourceinfo.AnnotationCPULimit: "1500m"}, nil)
	require.NoError(t, create(ctx, c, "ready", cfg))
	_, err := c.Start(ctx, "ready")
	require.NoError(t, err)
	require.NoError(t, c.SetContainer(ctx, "ready", "c1", &resourceinfo.Resources{MemoryLimit: ptrTo(int64(64 << 20))}))
	require.NoError(t, create(ctx, c, "created", nil))
	require.NoError(t, create(ctx, c, "stopped", nil))
	_, err = c.Start(ctx, "stopped")
	require.NoError(t, err)
	require.NoError(t, c.Stop(ctx, "stopped"))
	before, err := os.ReadFile(filepath.Join(root, "ready", ResourceInfoFile))
	require.NoError(t, err)

	// A new daemon on the same directory.
	c2 := newController(t, root, slot.New())
	rep, err := c2.Recover(ctx)
	require.NoError(t, err)
	assert.Equal(t, 3, rep.Loaded)
	assert.Equal(t, 1, rep.Ready)
	assert.Empty(t, rep.Quarantined)

	for id, want := range map[string]string{"ready": StateReady, "created": StateNotReady, "stopped": StateNotReady} {
		st, err := c2.Status(ctx, id, false)
		require.NoError(t, err, id)
		assert.Equal(t, want, st.State, id)
	}
	after, err := os.ReadFile(filepath.Join(root, "ready", ResourceInfoFile))
	require.NoError(t, err)
	assert.Equal(t, string(before), string(after), "an intact resource_info.json is not rewritten")

	// Wait works on the recovered ready sandbox and returns on Stop.
	done := make(chan error, 1)
	go func() { _, err := c2.Wait(ctx, "ready"); done <- err }()
	select {
	case <-done:
		t.Fatal("Wait on a ready sandbox returned")
	case <-time.After(50 * time.Millisecond):
	}
	require.NoError(t, c2.Stop(ctx, "ready"))
	require.NoError(t, <-done)
	// Wait on a recovered stopped sandbox returns at once.
	_, err = c2.Wait(ctx, "stopped")
	require.NoError(t, err)
}

func TestRecoverRepairs(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := newController(t, root, slot.New())
	for _, id := range []string{"good", "corrupt", "truncated", "noinfo", "badinfo", "powerloss"} {
		require.NoError(t, create(ctx, c, id, podConfig(map[string]string{resourceinfo.AnnotationPidLimit: "100"}, nil)))
	}
	write := func(path, content string) {
		require.NoError(t, os.WriteFile(path, []byte(content), 0o600))
	}
	write(filepath.Join(root, "corrupt", StateFile), "{not json")
	data, err := os.ReadFile(filepath.Join(root, "truncated", StateFile))
	require.NoError(t, err)
	write(filepath.Join(root, "truncated", StateFile), string(data[:len(data)/2]))
	require.NoError(t, os.Remove(filepath.Join(root, "noinfo", ResourceInfoFile)))
	write(filepath.Join(root, "badinfo", ResourceInfoFile), `{"cpu_limit": "x"}`)
	// A created sandbox's state is not synced: a power loss can leave it
	// empty, which is an unfinished runp, not damage.
	write(filepath.Join(root, "powerloss", StateFile), "")
	// What a crash leaves: temp files, a half-removed sandbox, a sandbox
	// whose Create never reached its commit point.
	write(filepath.Join(root, "good", ".tmp-state.json-123"), "partial")
	require.NoError(t, os.MkdirAll(filepath.Join(root, trashPrefix+"42", "sandbox"), 0o700))
	require.NoError(t, os.Mkdir(filepath.Join(root, "uncommitted"), 0o700))
	write(filepath.Join(root, "uncommitted", ResourceInfoFile), "{}")

	c2 := newController(t, root, slot.New())
	rep, err := c2.Recover(ctx)
	require.NoError(t, err)
	assert.ElementsMatch(t, []string{"corrupt", "truncated"}, rep.Quarantined)
	assert.Equal(t, 3, rep.Loaded)

	for _, id := range []string{"good", "noinfo", "badinfo"} {
		m := readInfo(t, root, id)
		assert.Equal(t, 100.0, m["pid_limit"], "%s has a valid resource_info.json", id)
	}
	for _, id := range []string{"corrupt", "truncated", "uncommitted", "powerloss"} {
		_, err := os.Stat(filepath.Join(root, id))
		assert.True(t, os.IsNotExist(err), "%s moved out of the state dir", id)
		_, err = c2.Status(ctx, id, false)
		assert.True(t, errdefs.IsNotFound(err))
	}
	q, err := os.ReadDir(filepath.Join(root, QuarantineDir))
	require.NoError(t, err)
	assert.Len(t, q, 2, "damaged sandboxes are kept for inspection")
	_, err = os.Stat(filepath.Join(root, "good", ".tmp-state.json-123"))
	assert.True(t, os.IsNotExist(err), "temp files are removed")
	entries, err := os.ReadDir(root)
	require.NoError(t, err)
	for _, e := range entries {
		assert.False(t, strings.HasPrefix(e.Name(), trashPrefix), "half-removed sandboxes are removed")
	}

	// The daemon's next start does not trip on the quarantine.
	rep, err = newController(t, root, slot.New()).Recover(ctx)
	require.NoError(t, err)
	assert.Equal(t, 3, rep.Loaded)
	assert.Empty(t, rep.Quarantined)
}

// TestRecoverEmptyState: with fsync on, only a created sandbox (whose
// state is not synced) can be left with an empty state by a power loss, and
// it is removed as an unfinished runp; with fsync = false any sandbox can,
// and an empty state is quarantined like any damage.
func TestRecoverEmptyState(t *testing.T) {
	for _, tc := range []struct {
		noSync      bool
		quarantined bool
	}{{noSync: false}, {noSync: true, quarantined: true}} {
		t.Run(fmt.Sprintf("nosync=%v", tc.noSync), func(t *testing.T) {
			ctx := context.Background()
			root := t.TempDir()
			opts := Options{Root: root, Backend: slot.New(), TaskAddress: "ttrpc+unix:///run/test-task.sock", CreatedGrace: time.Hour, NoSync: tc.noSync}
			c, err := New(opts)
			require.NoError(t, err)
			require.NoError(t, create(ctx, c, "sb", nil))
			require.NoError(t, os.WriteFile(filepath.Join(root, "sb", StateFile), nil, 0o600))

			c2, err := New(opts)
			require.NoError(t, err)
			rep, err := c2.Recover(ctx)
			require.NoError(t, err)
			assert.Zero(t, rep.Loaded)
			if tc.quarantined {
				assert.Equal(t, []string{"sb"}, rep.Quarantined)
			} else {
				assert.Empty(t, rep.Quarantined)
			}
			_, err = os.Stat(filepath.Join(root, "sb"))
			assert.True(t, os.IsNotExist(err))
		})
	}
}

func TestRecoverSandboxThatNoLongerRuns(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := newController(t, root, slot.New())
	require.NoError(t, create(ctx, c, "sb", nil))
	_, err := c.Start(ctx, "sb")
	require.NoError(t, err)

	b := newFaulty()
	b.fail("recover", errors.New("domain is gone"))
	c2 := newController(t, root, b)
	rep, err := c2.Recover(ctx)
	require.NoError(t, err)
	assert.Equal(t, []string{"sb"}, rep.Exited)
	st, err := c2.Status(ctx, "sb", false)
	require.NoError(t, err)
	assert.Equal(t, StateNotReady, st.State)
	es, err := c2.Wait(ctx, "sb")
	require.NoError(t, err)
	assert.Equal(t, uint32(unknownExitCode), es.ExitStatus)
}

func TestCollectCreated(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c, err := New(Options{Root: root, Backend: slot.New(), CreatedGrace: 50 * time.Millisecond})
	require.NoError(t, err)
	require.NoError(t, create(ctx, c, "old", nil))
	require.NoError(t, create(ctx, c, "started", nil))
	_, err = c.Start(ctx, "started")
	require.NoError(t, err)
	time.Sleep(100 * time.Millisecond)
	require.NoError(t, create(ctx, c, "young", nil))

	// Collected on recovery, as after a daemon that was down.
	c2, err := New(Options{Root: root, Backend: slot.New(), CreatedGrace: 50 * time.Millisecond})
	require.NoError(t, err)
	rep, err := c2.Recover(ctx)
	require.NoError(t, err)
	assert.Equal(t, []string{"old"}, rep.Collected)
	_, err = os.Stat(filepath.Join(root, "old"))
	assert.True(t, os.IsNotExist(err))

	// And by the periodic collector.
	time.Sleep(100 * time.Millisecond)
	assert.Equal(t, []string{"young"}, c2.CollectCreated(ctx))
	_, err = c2.Status(ctx, "started", false)
	assert.NoError(t, err, "started sandboxes are never collected")
}
