package sandboxer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/statefile"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

// reopen abandons c, as a killed daemon would leave it, and opens a new
// controller on its directory with backend b (recovered).
func reopen(t *testing.T, c *Controller, b Backend) (*Controller, RecoverReport) {
	t.Helper()
	c.abandon()
	c2 := newTestController(t, Options{Root: c.opts.Root, Backend: b, TaskAddress: c.opts.TaskAddress, CreatedGrace: c.opts.CreatedGrace, NoSync: c.opts.NoSync, JournalSegmentSize: c.opts.JournalSegmentSize})
	rep, err := c2.Recover(context.Background())
	require.NoError(t, err)
	return c2, rep
}

func TestRecoverKeepsState(t *testing.T) {
	for _, compacted := range []bool{false, true} {
		t.Run(fmt.Sprintf("compacted=%v", compacted), func(t *testing.T) {
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
			require.NoError(t, create(ctx, c, "removed", nil))
			require.NoError(t, c.Shutdown(ctx, "removed"))
			if compacted {
				require.NoError(t, c.Compact(ctx))
				_, err := os.Stat(filepath.Join(root, "ready", StateFile))
				require.NoError(t, err, "compaction writes state.json")
			}
			before, err := os.ReadFile(filepath.Join(root, "ready", ResourceInfoFile))
			require.NoError(t, err)

			c2, rep := reopen(t, c, slot.New())
			assert.Equal(t, 3, rep.Loaded)
			assert.Equal(t, 1, rep.Ready)
			assert.Empty(t, rep.Quarantined)
			for id, want := range map[string]string{"ready": StateReady, "created": StateNotReady, "stopped": StateNotReady} {
				st, err := c2.Status(ctx, id, false)
				require.NoError(t, err, id)
				assert.Equal(t, want, st.State, id)
			}
			_, err = c2.Status(ctx, "removed", false)
			assert.True(t, errdefs.IsNotFound(err))
			v, err := c2.Get("ready")
			require.NoError(t, err)
			assert.Equal(t, 1.5, *v.ResourceInfo.CPULimit)
			assert.Contains(t, v.State.Containers, "c1")
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
		})
	}
}

// TestRecoverRepairs: state.json (written by compaction) that no longer
// reads back is quarantined, a damaged or missing resource_info.json is
// rewritten, what a crash leaves is finished or removed, and torn spares
// are not read.
func TestRecoverRepairs(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := newController(t, root, slot.New())
	for _, id := range []string{"good", "corrupt", "truncated", "noinfo", "badinfo", "empty", "emptycreated"} {
		require.NoError(t, create(ctx, c, id, podConfig(map[string]string{resourceinfo.AnnotationPidLimit: "100"}, nil)))
		if id != "emptycreated" {
			_, err := c.Start(ctx, id)
			require.NoError(t, err)
		}
	}
	require.NoError(t, c.Compact(ctx))
	c.abandon()
	write := func(path, content string) {
		require.NoError(t, os.WriteFile(path, []byte(content), 0o600))
	}
	write(filepath.Join(root, "corrupt", StateFile), "{not json")
	data, err := os.ReadFile(filepath.Join(root, "truncated", StateFile))
	require.NoError(t, err)
	write(filepath.Join(root, "truncated", StateFile), string(data[:len(data)/2]))
	require.NoError(t, os.Remove(filepath.Join(root, "noinfo", ResourceInfoFile)))
	write(filepath.Join(root, "badinfo", ResourceInfoFile), `{"cpu_limit": "x"}`)
	// state.json is synced before the journal lets go of the records it
	// replaces: an empty one is damage, whatever the phase (issue 14,
	// item 10: it deleted ready pods).
	write(filepath.Join(root, "empty", StateFile), "")
	write(filepath.Join(root, "emptycreated", StateFile), "")
	// What a crash leaves: torn spares, the temp files of an older
	// version, a half-removed sandbox of an older version, a sandbox
	// whose Create never reached its commit point.
	write(filepath.Join(root, "good", statefile.SpareName(StateFile)), `{"version": 1, "id": "good", "phase": "st`)
	write(filepath.Join(root, "good", statefile.SpareName(ResourceInfoFile)), `{"pid_limit": 7`)
	write(filepath.Join(root, "good", ".tmp-state.json"), "partial")
	require.NoError(t, os.MkdirAll(filepath.Join(root, trashPrefix+"42", "sandbox"), 0o700))
	require.NoError(t, os.Mkdir(filepath.Join(root, "uncommitted"), 0o700))
	write(filepath.Join(root, "uncommitted", ResourceInfoFile), "{}")

	c2 := newController(t, root, slot.New())
	rep, err := c2.Recover(ctx)
	require.NoError(t, err)
	assert.ElementsMatch(t, []string{"corrupt", "truncated", "empty", "emptycreated"}, rep.Quarantined)
	assert.Equal(t, 3, rep.Loaded)

	for _, id := range []string{"good", "noinfo", "badinfo"} {
		m := readInfo(t, root, id)
		assert.Equal(t, 100.0, m["pid_limit"], "%s has a valid resource_info.json", id)
	}
	for _, id := range []string{"corrupt", "truncated", "uncommitted", "empty", "emptycreated"} {
		_, err := os.Stat(filepath.Join(root, id))
		assert.True(t, os.IsNotExist(err), "%s moved out of the state dir", id)
		_, err = c2.Status(ctx, id, false)
		assert.True(t, errdefs.IsNotFound(err))
	}
	q, err := os.ReadDir(filepath.Join(root, QuarantineDir))
	require.NoError(t, err)
	assert.Len(t, q, 4, "damaged sandboxes are kept for inspection")
	// Neither spares nor old temp files are read ("good" loaded, and its
	// resource_info.json is whole, above).
	st, err := c2.Status(ctx, "good", false)
	require.NoError(t, err)
	assert.Equal(t, "SANDBOX_READY", st.State)
	for _, name := range sandboxDirs(t, root) {
		assert.False(t, strings.HasPrefix(name, trashPrefix), "half-removed sandboxes are removed")
	}

	// The daemon's next start does not trip on the quarantine.
	_, rep = reopen(t, c2, slot.New())
	assert.Equal(t, 3, rep.Loaded)
	assert.Empty(t, rep.Quarantined)
}

// TestRecoverEmptyStateOfReadySandbox is the regression test of issue 14
// item 10: a zero-length state.json of a ready sandbox deleted the pod.
func TestRecoverEmptyStateOfReadySandbox(t *testing.T) {
	for _, noSync := range []bool{false, true} {
		t.Run(fmt.Sprintf("nosync=%v", noSync), func(t *testing.T) {
			ctx := context.Background()
			root := t.TempDir()
			c := newTestController(t, Options{Root: root, Backend: slot.New(), CreatedGrace: time.Hour, NoSync: noSync})
			require.NoError(t, create(ctx, c, "sb", nil))
			_, err := c.Start(ctx, "sb")
			require.NoError(t, err)
			require.NoError(t, c.Compact(ctx))
			require.NoError(t, os.WriteFile(filepath.Join(root, "sb", StateFile), nil, 0o600))

			_, rep := reopen(t, c, slot.New())
			assert.Zero(t, rep.Loaded)
			assert.Equal(t, []string{"sb"}, rep.Quarantined)
			q, err := filepath.Glob(filepath.Join(root, QuarantineDir, "sb-*", ResourceInfoFile))
			require.NoError(t, err)
			assert.Len(t, q, 1, "the pod's files are kept, not deleted")
		})
	}
}

// TestRecoverFromJournal: every change since the last compaction is in the
// journal only, and recovery brings it all back, including a directory
// that a power loss took and a removal a crash cut short.
func TestRecoverFromJournal(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	// Segments large enough that no compaction runs meanwhile.
	c := newTestController(t, Options{Root: root, Backend: slot.New(), JournalSegmentSize: 4 << 20})
	for i := range 20 {
		id := fmt.Sprintf("sb%d", i)
		require.NoError(t, create(ctx, c, id, podConfig(map[string]string{resourceinfo.AnnotationCPULimit: "1"}, nil)))
		_, err := c.Start(ctx, id)
		require.NoError(t, err)
		require.NoError(t, c.UpdateSpec(ctx, id, func(s *resourceinfo.Spec) error {
			s.Annotations.CPULimit = ptrTo(float64(i + 1))
			return nil
		}))
		if i%3 == 0 {
			require.NoError(t, c.Stop(ctx, id))
		}
	}
	require.NoError(t, create(ctx, c, "gone", nil))
	require.NoError(t, c.Shutdown(ctx, "gone"))
	c.abandon()
	// A power loss took a directory the journal knows, and a removal
	// left its directory behind.
	require.NoError(t, os.RemoveAll(filepath.Join(root, "sb5")))
	require.NoError(t, os.MkdirAll(filepath.Join(root, "gone"), 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(root, "gone", ResourceInfoFile), []byte("{}"), 0o600))

	c2, rep := reopen(t, c, slot.New())
	assert.Equal(t, 20, rep.Loaded)
	assert.Empty(t, rep.Quarantined)
	for i := range 20 {
		id := fmt.Sprintf("sb%d", i)
		v, err := c2.Get(id)
		require.NoError(t, err)
		assert.Equal(t, float64(i+1), *v.ResourceInfo.CPULimit, id)
		assert.Equal(t, float64(i+1), readInfo(t, root, id)["cpu_limit"], id)
		want := PhaseReady
		if i%3 == 0 {
			want = PhaseStopped
		}
		assert.Equal(t, want, v.State.Phase, id)
	}
	_, err := os.Stat(filepath.Join(root, "gone"))
	assert.True(t, os.IsNotExist(err), "a recorded removal is finished")

	// Compacted, the same again from state.json.
	require.NoError(t, c2.Compact(ctx))
	c3, rep := reopen(t, c2, slot.New())
	assert.Equal(t, 20, rep.Loaded)
	v, err := c3.Get("sb7")
	require.NoError(t, err)
	assert.Equal(t, 8.0, *v.ResourceInfo.CPULimit)
}

// TestCompactionInterrupted crashes a compaction at every step and checks
// that recovery finds every sandbox as it was committed, whatever was
// committed while the compaction ran.
func TestCompactionInterrupted(t *testing.T) {
	for _, step := range []string{stepSealed, stepWrote + "#1", stepWrote + "#3", stepSynced, stepReleased} {
		t.Run(step, func(t *testing.T) {
			ctx := context.Background()
			root := t.TempDir()
			c := newController(t, root, slot.New())
			want := map[string]Phase{}
			for i := range 6 {
				id := fmt.Sprintf("sb%d", i)
				require.NoError(t, create(ctx, c, id, nil))
				_, err := c.Start(ctx, id)
				require.NoError(t, err)
				want[id] = PhaseReady
			}
			require.NoError(t, c.Shutdown(ctx, "sb5"))
			delete(want, "sb5")
			var wrote int
			crash := errors.New("crash")
			c.compactHook = func(s string) error {
				name := s
				if s == stepWrote {
					wrote++
					name = fmt.Sprintf("%s#%d", s, wrote)
				}
				if name == step {
					// Changes committed meanwhile go to the new segment.
					require.NoError(t, c.Stop(ctx, "sb0"))
					require.NoError(t, c.Shutdown(ctx, "sb1"))
					return crash
				}
				return nil
			}
			require.ErrorIs(t, c.Compact(ctx), crash)
			want["sb0"] = PhaseStopped
			delete(want, "sb1")

			c2, rep := reopen(t, c, slot.New())
			assert.Empty(t, rep.Quarantined)
			assert.Equal(t, len(want), rep.Loaded)
			for id, phase := range want {
				v, err := c2.Get(id)
				require.NoError(t, err, id)
				assert.Equal(t, phase, v.State.Phase, id)
			}
			for _, id := range []string{"sb1", "sb5"} {
				_, err := os.Stat(filepath.Join(root, id))
				assert.True(t, os.IsNotExist(err), "%s was removed", id)
			}
			// The next compaction completes, and a restart after it finds
			// the same.
			require.NoError(t, c2.Compact(ctx))
			c3, rep := reopen(t, c2, slot.New())
			assert.Equal(t, len(want), rep.Loaded)
			for id, phase := range want {
				v, err := c3.Get(id)
				require.NoError(t, err, id)
				assert.Equal(t, phase, v.State.Phase, id)
			}
		})
	}
}

// TestRecoverDamagedJournalRecord: a record that was synced and no longer
// reads back is the one thing recovery cannot rebuild: its sandbox is
// quarantined (with a copy of the segment), the others load.
func TestRecoverDamagedJournalRecord(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := newController(t, root, slot.New())
	require.NoError(t, create(ctx, c, "victim", nil))
	_, err := c.Start(ctx, "victim")
	require.NoError(t, err)
	require.NoError(t, create(ctx, c, "other", nil))
	_, err = c.Start(ctx, "other")
	require.NoError(t, err)
	c.abandon()
	// The victim's last record is its start: the last occurrence of its
	// phase "ready" before the other's records.
	segs, err := filepath.Glob(filepath.Join(root, JournalDir, "*.seg"))
	require.NoError(t, err)
	damaged := false
	for _, seg := range segs {
		data, err := os.ReadFile(seg)
		require.NoError(t, err)
		other := strings.Index(string(data), `"id":"other"`)
		i := strings.LastIndex(string(data[:max(other, 0)]), `"phase":"ready"`)
		if other < 0 || i < 0 {
			continue
		}
		data[i+3] ^= 0x20
		require.NoError(t, os.WriteFile(seg, data, 0o600))
		damaged = true
	}
	require.True(t, damaged)

	c2 := newController(t, root, slot.New())
	rep, err := c2.Recover(ctx)
	require.NoError(t, err)
	assert.Equal(t, []string{"victim"}, rep.Quarantined)
	assert.Equal(t, 1, rep.Loaded)
	_, err = c2.Status(ctx, "other", false)
	assert.NoError(t, err)
	copies, _ := filepath.Glob(filepath.Join(root, QuarantineDir, "journal-*"))
	assert.Len(t, copies, 1, "the damaged segment is kept for inspection")
	// The quarantine is recorded: the victim's older records do not bring
	// it back.
	_, rep = reopen(t, c2, slot.New())
	assert.Equal(t, 1, rep.Loaded)
	assert.Empty(t, rep.Quarantined)
}

// TestRecoverSymlinkedDirectory is the regression test of issue 14 item
// 10: a sandbox directory replaced by a symbolic link was skipped without
// a word. It is logged, never followed, and moved to the quarantine; a
// sandbox the journal holds is rebuilt in a directory of its own.
func TestRecoverSymlinkedDirectory(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := newController(t, root, slot.New())
	for _, id := range []string{"compacted", "journaled"} {
		require.NoError(t, create(ctx, c, id, nil))
		_, err := c.Start(ctx, id)
		require.NoError(t, err)
		if id == "compacted" {
			require.NoError(t, c.Compact(ctx))
		}
	}
	c.abandon()
	elsewhere := t.TempDir()
	for _, id := range []string{"compacted", "journaled"} {
		target := filepath.Join(elsewhere, id)
		require.NoError(t, os.Rename(filepath.Join(root, id), target))
		require.NoError(t, os.Symlink(target, filepath.Join(root, id)))
	}

	hook := logtest.NewGlobal()
	defer hook.Reset()
	c2 := newController(t, root, slot.New())
	rep, err := c2.Recover(ctx)
	require.NoError(t, err)
	assert.Equal(t, []string{"compacted"}, rep.Quarantined)
	assert.Equal(t, 1, rep.Loaded)
	var logged []string
	for _, e := range hook.AllEntries() {
		if e.Level <= logrus.ErrorLevel && strings.Contains(e.Message, "symbolic link") {
			logged = append(logged, fmt.Sprint(e.Data["path"]))
		}
	}
	assert.ElementsMatch(t, []string{filepath.Join(root, "compacted"), filepath.Join(root, "journaled")}, logged)
	fi, err := os.Lstat(filepath.Join(root, "journaled"))
	require.NoError(t, err)
	assert.True(t, fi.IsDir(), "rebuilt as a directory, not through the link")
	for _, id := range []string{"compacted", "journaled"} {
		// The targets were not written to.
		_, err := os.Stat(filepath.Join(elsewhere, id, StateFile))
		assert.Equal(t, id == "compacted", err == nil, id)
	}
}

func TestRecoverSandboxThatNoLongerRuns(t *testing.T) {
	for _, tc := range []struct {
		desc string
		err  error
	}{
		{"not found", fmt.Errorf("domain is gone: %w", errdefs.ErrNotFound)},
		{"not alive", nil},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			ctx := context.Background()
			c := newController(t, t.TempDir(), slot.New())
			require.NoError(t, create(ctx, c, "sb", nil))
			_, err := c.Start(ctx, "sb")
			require.NoError(t, err)

			b := newFaulty()
			if tc.err != nil {
				b.fail("recover", tc.err)
			} else {
				b.dead = true
			}
			c2, rep := reopen(t, c, b)
			assert.Equal(t, []string{"sb"}, rep.Exited)
			st, err := c2.Status(ctx, "sb", false)
			require.NoError(t, err)
			assert.Equal(t, StateNotReady, st.State)
			es, err := c2.Wait(ctx, "sb")
			require.NoError(t, err)
			assert.Equal(t, uint32(unknownExitCode), es.ExitStatus)
			// Durably: a third start finds it stopped.
			c3, _ := reopen(t, c2, slot.New())
			v, err := c3.Get("sb")
			require.NoError(t, err)
			assert.Equal(t, PhaseStopped, v.State.Phase)
		})
	}
}

// TestRecoverTransientBackendError is the regression test of issue 14
// item 11: any error from Backend.Recover marked the sandbox stopped and
// committed exit 255. Now only a backend that says it is gone stops it;
// otherwise it is unknown (not ready, not stopped on disk) and recovery
// is retried in the background until the backend answers.
func TestRecoverTransientBackendError(t *testing.T) {
	defer func(d time.Duration) { recoverRetry = d }(recoverRetry)
	recoverRetry = 10 * time.Millisecond
	ctx := context.Background()
	c := newController(t, t.TempDir(), slot.New())
	require.NoError(t, create(ctx, c, "sb", nil))
	_, err := c.Start(ctx, "sb")
	require.NoError(t, err)

	b := newFaulty()
	b.fail("recover", errors.New("libvirt: connection reset"))
	c2, rep := reopen(t, c, b)
	assert.Equal(t, []string{"sb"}, rep.Unknown)
	assert.Empty(t, rep.Exited)
	st, err := c2.Status(ctx, "sb", false)
	require.NoError(t, err)
	assert.Equal(t, StateNotReady, st.State, "unknown is not ready")
	v, err := c2.Get("sb")
	require.NoError(t, err)
	assert.Equal(t, PhaseReady, v.State.Phase, "and not stopped")

	// Not stopped on disk either: another daemon, whose backend answers,
	// finds it ready.
	c3, rep := reopen(t, c2, slot.New())
	assert.Equal(t, 1, rep.Ready)
	st, err = c3.Status(ctx, "sb", false)
	require.NoError(t, err)
	assert.Equal(t, StateReady, st.State)

	// The retries: the backend answers after a few failures.
	b = newFaulty()
	b.fail("recover", errors.New("libvirt: connection reset"))
	c4, rep := reopen(t, c3, b)
	assert.Equal(t, []string{"sb"}, rep.Unknown)
	b.waitCalls(t, "recover", 3)
	b.fail("recover", nil)
	require.Eventually(t, func() bool {
		st, err := c4.Status(ctx, "sb", false)
		return err == nil && st.State == StateReady
	}, 10*time.Second, 10*time.Millisecond, "ready once the backend answers")

	// A backend that says, on a retry, that it is gone stops it.
	b = newFaulty()
	b.fail("recover", errors.New("libvirt: connection reset"))
	c5, _ := reopen(t, c4, b)
	b.fail("recover", fmt.Errorf("domain: %w", errdefs.ErrNotFound))
	es, err := c5.Wait(ctx, "sb")
	require.NoError(t, err)
	assert.Equal(t, uint32(unknownExitCode), es.ExitStatus)
}

// TestRecoverUnknownCanBeStopped: a sandbox the backend could not recover
// can still be stopped and removed by the kubelet.
func TestRecoverUnknownCanBeStopped(t *testing.T) {
	ctx := context.Background()
	c := newController(t, t.TempDir(), slot.New())
	require.NoError(t, create(ctx, c, "sb", nil))
	_, err := c.Start(ctx, "sb")
	require.NoError(t, err)
	b := newFaulty()
	b.fail("recover", errors.New("libvirt: connection reset"))
	c2, _ := reopen(t, c, b)
	require.NoError(t, c2.Stop(ctx, "sb"))
	v, err := c2.Get("sb")
	require.NoError(t, err)
	assert.Equal(t, PhaseStopped, v.State.Phase)
	require.NoError(t, c2.Shutdown(ctx, "sb"))
}

// TestRecoverManyInParallel loads many sandboxes (recovery runs them in
// parallel) and checks every one.
func TestRecoverManyInParallel(t *testing.T) {
	ctx := context.Background()
	c := newController(t, t.TempDir(), slot.New())
	const n = 300
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("sb%d", i)
			assert.NoError(t, create(ctx, c, id, podConfig(map[string]string{resourceinfo.AnnotationPidLimit: fmt.Sprint(i + 1)}, nil)))
			if i%2 == 0 {
				_, err := c.Start(ctx, id)
				assert.NoError(t, err)
			}
		}()
	}
	wg.Wait()
	if !assert.NoError(t, c.Compact(ctx)) {
		return
	}
	c2, rep := reopen(t, c, slot.New())
	assert.Equal(t, n, rep.Loaded)
	assert.Equal(t, n/2, rep.Ready)
	for i := range n {
		v, err := c2.Get(fmt.Sprintf("sb%d", i))
		require.NoError(t, err)
		assert.Equal(t, int64(i+1), *v.ResourceInfo.PidLimit)
	}
}

func TestCollectCreated(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := newTestController(t, Options{Root: root, Backend: slot.New(), CreatedGrace: 300 * time.Millisecond})
	require.NoError(t, create(ctx, c, "old", nil))
	require.NoError(t, create(ctx, c, "started", nil))
	_, err := c.Start(ctx, "started")
	require.NoError(t, err)
	time.Sleep(400 * time.Millisecond)
	require.NoError(t, create(ctx, c, "young", nil))

	// Collected on recovery, as after a daemon that was down.
	c2, rep := reopen(t, c, slot.New())
	assert.Equal(t, []string{"old"}, rep.Collected)
	_, err = os.Stat(filepath.Join(root, "old"))
	assert.True(t, os.IsNotExist(err))

	// And by the periodic collector.
	time.Sleep(400 * time.Millisecond)
	assert.Equal(t, []string{"young"}, c2.CollectCreated(ctx))
	_, err = c2.Status(ctx, "started", false)
	assert.NoError(t, err, "started sandboxes are never collected")
}

// TestRecoverTornStateWithRecord: compaction overwrites state.json in
// place, so a crash can tear it; the journal still holds the records it
// was writing, and recovery takes those.
func TestRecoverTornStateWithRecord(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := newController(t, root, slot.New())
	require.NoError(t, create(ctx, c, "sb", nil))
	_, err := c.Start(ctx, "sb")
	require.NoError(t, err)
	require.NoError(t, c.Compact(ctx))
	require.NoError(t, c.Stop(ctx, "sb"))
	// A compaction of the stop, torn by a crash before its sync.
	path := filepath.Join(root, "sb", StateFile)
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, data[:len(data)/3], 0o600))
	c2, rep := reopen(t, c, slot.New())
	assert.Empty(t, rep.Quarantined)
	v, err := c2.Get("sb")
	require.NoError(t, err)
	assert.Equal(t, PhaseStopped, v.State.Phase)
}
