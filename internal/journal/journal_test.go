package journal

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const testSegment = 64 << 10

func open(t *testing.T, dir string, opts Options) (*Journal, *Replay) {
	t.Helper()
	if opts.SegmentSize == 0 {
		opts.SegmentSize = testSegment
	}
	j, rep, err := Open(dir, opts)
	require.NoError(t, err)
	t.Cleanup(func() { j.Close() })
	return j, rep
}

func put(t *testing.T, j *Journal, id, payload string) uint64 {
	t.Helper()
	seq, err := j.Append(Entry{Kind: Put, ID: id, Payload: []byte(payload), Durable: true})
	require.NoError(t, err)
	return seq
}

// latest is what a replay leaves of each ID.
func latest(rep *Replay) map[string]string {
	m := map[string]string{}
	for _, r := range rep.Records {
		if r.Kind == Delete {
			delete(m, r.ID)
		} else {
			m[r.ID] = string(r.Payload)
		}
	}
	return m
}

// segments returns the segment files of dir that hold records, by the
// number in their header.
func segments(t *testing.T, dir string) map[uint64]string {
	t.Helper()
	out := map[uint64]string{}
	files, err := filepath.Glob(filepath.Join(dir, "*"+segSuffix))
	require.NoError(t, err)
	for _, f := range files {
		data, err := os.ReadFile(f)
		require.NoError(t, err)
		if h, ok := decodeSegHeader(data); ok && !h.free && len(recordOffsets(t, f)) > 0 {
			out[h.number] = f
		}
	}
	return out
}

// recordOffsets lists where the intact records of a segment file start.
func recordOffsets(t *testing.T, path string) []int64 {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	h, ok := decodeSegHeader(data)
	require.True(t, ok)
	var offs []int64
	for off := int64(headerSize); off+recHeader <= int64(len(data)); {
		_, n, ok := parseHeader(data[off:], h.number)
		if !ok {
			break
		}
		offs = append(offs, off)
		off += n
	}
	return offs
}

func TestAppendReplay(t *testing.T) {
	dir := t.TempDir()
	j, rep := open(t, dir, Options{})
	assert.Empty(t, rep.Records)
	s1 := put(t, j, "a", "one")
	s2 := put(t, j, "b", "two")
	_, err := j.Append(Entry{Kind: Put, ID: "a", Payload: []byte("three")}) // written, not synced
	require.NoError(t, err)
	_, err = j.Append(Entry{Kind: Delete, ID: "b", Durable: true, Frees: true})
	require.NoError(t, err)
	assert.Equal(t, s1+1, s2)
	require.NoError(t, j.Close())

	_, rep = open(t, dir, Options{})
	assert.Empty(t, rep.Damage)
	require.Len(t, rep.Records, 4)
	for i := 1; i < 4; i++ {
		assert.Equal(t, rep.Records[i-1].Seq+1, rep.Records[i].Seq, "seqs follow each other")
	}
	assert.Equal(t, map[string]string{"a": "three"}, latest(rep))
}

// TestReopenKeepsGoing: records written after a reopen follow the old
// ones, and a third open sees them all.
func TestReopenKeepsGoing(t *testing.T) {
	dir := t.TempDir()
	j, _ := open(t, dir, Options{})
	put(t, j, "a", "1")
	j.Close() // no Close would do the same: nothing is kept in memory
	j, _ = open(t, dir, Options{})
	last := put(t, j, "a", "2")
	j.Close()
	_, rep := open(t, dir, Options{})
	assert.Empty(t, rep.Damage, "the segment of the first run was sealed when the second began")
	assert.Equal(t, map[string]string{"a": "2"}, latest(rep))
	assert.Equal(t, last, rep.Records[len(rep.Records)-1].Seq)
}

// TestGroupCommit: concurrent durable appends share syncs, and every one
// acknowledged is there after a reopen.
func TestGroupCommit(t *testing.T) {
	dir := t.TempDir()
	var syncs atomic.Int64
	j, _ := open(t, dir, Options{SegmentSize: 1 << 20, Fault: func(op string) error {
		if op == "sync" {
			syncs.Add(1)
		}
		return nil
	}})
	const clients, each = 32, 50
	var wg sync.WaitGroup
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				_, err := j.Append(Entry{Kind: Put, ID: fmt.Sprintf("c%d", c), Payload: []byte(fmt.Sprint(i)), Durable: true})
				assert.NoError(t, err)
			}
		}()
	}
	wg.Wait()
	t.Logf("%d durable appends, %d syncs", clients*each, syncs.Load())
	assert.Less(t, syncs.Load(), int64(clients*each), "appends share syncs")
	j.Close()
	_, rep := open(t, dir, Options{SegmentSize: 1 << 20})
	assert.Len(t, rep.Records, clients*each)
	for c := range clients {
		assert.Equal(t, fmt.Sprint(each-1), latest(rep)[fmt.Sprintf("c%d", c)])
	}
}

// TestRotateSealRelease: records spill over into new segments; released
// segments no longer count and their files are reused.
func TestRotateSealRelease(t *testing.T) {
	dir := t.TempDir()
	j, _ := open(t, dir, Options{})
	payload := string(make([]byte, 1000))
	for i := range 200 { // ~200 KiB: several 64 KiB segments
		put(t, j, fmt.Sprintf("x%d", i%10), payload)
	}
	select {
	case <-j.Compact():
	default:
		t.Fatal("a rotation asks for a compaction")
	}
	s, err := j.Seal()
	require.NoError(t, err)
	assert.GreaterOrEqual(t, s.Len(), 3)
	assert.Len(t, s.IDs(), 10)
	put(t, j, "after", "seal")
	require.NoError(t, j.Release(s))
	assert.Equal(t, 0, j.SealedCount())
	j.Close()

	_, rep := open(t, dir, Options{})
	assert.Empty(t, rep.Damage)
	assert.Equal(t, map[string]string{"after": "seal"}, latest(rep), "released records no longer count")
	files, _ := filepath.Glob(filepath.Join(dir, "*"+segSuffix))
	assert.LessOrEqual(t, len(files), 2+defaultMaxFree+1, "released files are reused or removed")
}

// TestRecycledSegmentIgnoresOldRecords: a free file reused as a new
// segment still holds its earlier records; they never count.
func TestRecycledSegmentIgnoresOldRecords(t *testing.T) {
	dir := t.TempDir()
	j, _ := open(t, dir, Options{})
	for i := range 30 {
		put(t, j, "old", fmt.Sprint(i))
	}
	s, err := j.Seal()
	require.NoError(t, err)
	require.NoError(t, j.Release(s))
	s, err = j.Seal() // the active one, into which nothing else was written
	require.NoError(t, err)
	require.NoError(t, j.Release(s))
	put(t, j, "new", "1")
	j.Close()
	_, rep := open(t, dir, Options{})
	assert.Equal(t, map[string]string{"new": "1"}, latest(rep))
	assert.Empty(t, rep.Damage)
}

// TestTornTail: a crash mid-write leaves a partial last record (or group):
// it is dropped without a report, and what was before it is intact.
func TestTornTail(t *testing.T) {
	for _, tc := range []struct {
		desc string
		tear func(data []byte, off int64)
	}{
		{"payload cut short", func(data []byte, off int64) { clear(data[off+recHeader+5:]) }},
		{"header cut short", func(data []byte, off int64) { clear(data[off+20:]) }},
		{"garbage over the record", func(data []byte, off int64) {
			for i := off; i < off+200; i++ {
				data[i] = byte(i * 7)
			}
		}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			dir := t.TempDir()
			j, _ := open(t, dir, Options{})
			put(t, j, "a", "kept")
			put(t, j, "b", "the torn one")
			j.Close()
			segs := segments(t, dir)
			path := segs[maxKey(segs)]
			offs := recordOffsets(t, path)
			data, err := os.ReadFile(path)
			require.NoError(t, err)
			tc.tear(data, offs[len(offs)-1])
			require.NoError(t, os.WriteFile(path, data, 0o600))

			j, rep := open(t, dir, Options{})
			assert.Empty(t, rep.Damage, "a torn tail was never acknowledged: not damage")
			assert.Equal(t, map[string]string{"a": "kept"}, latest(rep))
			// And the journal goes on from there.
			put(t, j, "c", "next")
			j.Close()
			_, rep = open(t, dir, Options{})
			assert.Empty(t, rep.Damage)
			assert.Equal(t, map[string]string{"a": "kept", "c": "next"}, latest(rep))
		})
	}
}

// TestTornGroup: a group of records written together but not yet synced
// can reach the disk in any order; a damaged record followed by an intact
// one of the same unsynced stretch is a torn write, not damage.
func TestTornGroup(t *testing.T) {
	dir := t.TempDir()
	j, _ := open(t, dir, Options{NoSync: true})
	put(t, j, "a", "synced? no: nosync")
	put(t, j, "b", "torn")
	put(t, j, "c", "intact after the torn one")
	j.Close()
	segs := segments(t, dir)
	path := segs[maxKey(segs)]
	offs := recordOffsets(t, path)
	flipByte(t, path, offs[1]+recHeader+2)
	_, rep := open(t, dir, Options{})
	assert.Empty(t, rep.Damage, "nothing after the torn record says it was synced")
	assert.Equal(t, map[string]string{"a": "synced? no: nosync", "c": "intact after the torn one"}, latest(rep))
}

// TestCorruptRecord: a record that was synced and then damaged (a later
// record says so) is reported with its ID, and the records around it
// still count.
func TestCorruptRecord(t *testing.T) {
	for _, tc := range []struct {
		desc string
		at   int64 // offset in the record of the byte flipped
		ids  []string
	}{
		{"payload", recHeader + 1 + 3, []string{"b"}},
		{"header", 9, nil},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			dir := t.TempDir()
			j, _ := open(t, dir, Options{})
			put(t, j, "a", "first")
			put(t, j, "b", "damaged later")
			put(t, j, "c", "third")
			j.Close()
			segs := segments(t, dir)
			path := segs[maxKey(segs)]
			offs := recordOffsets(t, path)
			flipByte(t, path, offs[1]+tc.at)
			_, rep := open(t, dir, Options{})
			require.Len(t, rep.Damage, 1)
			assert.Equal(t, tc.ids, rep.Damage[0].IDs)
			assert.Equal(t, offs[1], rep.Damage[0].Offset)
			assert.Equal(t, map[string]string{"a": "first", "c": "third"}, latest(rep))
		})
	}
}

// TestMissingSeal: every segment but the newest ends with a seal record,
// synced before the next segment gets a record; losing it is damage.
func TestMissingSeal(t *testing.T) {
	dir := t.TempDir()
	j, _ := open(t, dir, Options{})
	put(t, j, "a", "1")
	_, err := j.Seal()
	require.NoError(t, err)
	put(t, j, "a", "2")
	j.Close()
	segs := segments(t, dir)
	var nums []uint64
	for n := range segs {
		nums = append(nums, n)
	}
	sort.Slice(nums, func(a, b int) bool { return nums[a] < nums[b] })
	first := segs[nums[0]]
	offs := recordOffsets(t, first)
	data, err := os.ReadFile(first)
	require.NoError(t, err)
	clear(data[offs[len(offs)-1]:]) // the seal
	require.NoError(t, os.WriteFile(first, data, 0o600))
	_, rep := open(t, dir, Options{})
	require.Len(t, rep.Damage, 1)
	assert.Contains(t, rep.Damage[0].Reason, "end of a sealed segment")
	assert.Equal(t, map[string]string{"a": "2"}, latest(rep))
}

// TestDamagedSegmentHeader: a segment whose header no longer reads back
// still gives its records, and the damage is reported.
func TestDamagedSegmentHeader(t *testing.T) {
	dir := t.TempDir()
	j, _ := open(t, dir, Options{})
	put(t, j, "a", "1")
	j.Close()
	segs := segments(t, dir)
	path := segs[maxKey(segs)]
	flipByte(t, path, 10)
	_, rep := open(t, dir, Options{})
	require.Len(t, rep.Damage, 1)
	assert.Contains(t, rep.Damage[0].Reason, "header")
	assert.Equal(t, map[string]string{"a": "1"}, latest(rep))
}

// TestReserve: with no spare segment to rotate to (a full disk), records
// that grow stop short of the end of the segment, and the rest is kept
// for records that free space.
func TestReserve(t *testing.T) {
	dir := t.TempDir()
	full := atomic.Bool{}
	j, _ := open(t, dir, Options{Reserve: 16 << 10, Fault: func(op string) error {
		if op == "prepare" && full.Load() {
			return fmt.Errorf("create segment: %w", syscall.ENOSPC)
		}
		return nil
	}})
	// Use up the spare prepared at open, then fill the disk.
	payload := make([]byte, 1000)
	for i := 0; j.SealedCount() == 0; i++ {
		put(t, j, fmt.Sprintf("g%d", i%5), string(payload))
	}
	waitSpare(t, j)
	full.Store(true)
	prepRetry = 0
	defer func() { prepRetry = defaultPrepRetry }()
	var growErr error
	grown := 0
	for growErr == nil {
		_, growErr = j.Append(Entry{Kind: Put, ID: "grow", Payload: payload, Durable: true})
		grown++
	}
	assert.ErrorIs(t, growErr, syscall.ENOSPC)
	assert.Contains(t, growErr.Error(), dir, "the error names the journal")
	t.Logf("%d growing records fitted before the reserve", grown-1)
	frees := 0
	for range 10 {
		_, err := j.Append(Entry{Kind: Put, ID: "stop", Payload: payload, Frees: true, Durable: true})
		require.NoError(t, err, "a record that frees space uses the reserve")
		frees++
	}
	_, err := j.Append(Entry{Kind: Delete, ID: "stop", Frees: true, Durable: true})
	require.NoError(t, err)
	// Space again: growing records go on in a new segment.
	full.Store(false)
	_, err = j.Append(Entry{Kind: Put, ID: "grow", Payload: payload, Durable: true})
	require.NoError(t, err)
	j.Close()
	_, rep := open(t, dir, Options{})
	assert.Empty(t, rep.Damage)
	_, ok := latest(rep)["stop"]
	assert.False(t, ok)
	assert.Contains(t, latest(rep), "grow")
}

// TestWriteAndSyncFailures: a failed write or sync fails its appends,
// reports their IDs for re-logging, and the journal goes on in a new
// segment.
func TestWriteAndSyncFailures(t *testing.T) {
	for _, op := range []string{"write", "sync"} {
		t.Run(op, func(t *testing.T) {
			dir := t.TempDir()
			var failNext atomic.Bool
			reported := make(chan []string, 4)
			j, _ := open(t, dir, Options{
				OnFailed: func(ids []string) { reported <- ids },
				Fault: func(o string) error {
					if o == op && failNext.CompareAndSwap(true, false) {
						return syscall.EIO
					}
					return nil
				},
			})
			put(t, j, "a", "1")
			failNext.Store(true)
			_, err := j.Append(Entry{Kind: Put, ID: "a", Payload: []byte("2"), Durable: true})
			require.ErrorIs(t, err, syscall.EIO)
			assert.Equal(t, []string{"a"}, <-reported)
			// The owner appends the current state again.
			put(t, j, "a", "1")
			j.Close()
			_, rep := open(t, dir, Options{})
			assert.Equal(t, map[string]string{"a": "1"}, latest(rep))
		})
	}
}

func TestClosed(t *testing.T) {
	j, _ := open(t, t.TempDir(), Options{})
	require.NoError(t, j.Close())
	_, err := j.Append(Entry{Kind: Put, ID: "a"})
	assert.True(t, errors.Is(err, ErrClosed))
}

func waitSpare(t *testing.T, j *Journal) {
	t.Helper()
	require.NoError(t, j.ensureSpare())
}

func maxKey(m map[uint64]string) uint64 {
	var best uint64
	for k := range m {
		best = max(best, k)
	}
	return best
}

func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	data[off] ^= 0x5a
	require.NoError(t, os.WriteFile(path, data, 0o600))
}

// TestLargeRecord: a record larger than a segment gets a segment of its
// own, and the journal goes on in segments of the configured size.
func TestLargeRecord(t *testing.T) {
	dir := t.TempDir()
	j, _ := open(t, dir, Options{})
	put(t, j, "small", "1")
	big := string(make([]byte, 3*testSegment))
	put(t, j, "big", big)
	put(t, j, "small", "2")
	j.Close()
	j, rep := open(t, dir, Options{})
	assert.Empty(t, rep.Damage)
	assert.Equal(t, map[string]string{"small": "2", "big": big}, latest(rep))
	s, err := j.Seal()
	require.NoError(t, err)
	require.NoError(t, j.Release(s))
	files, _ := filepath.Glob(filepath.Join(dir, "*"+segSuffix))
	for _, f := range files {
		fi, err := os.Stat(f)
		require.NoError(t, err)
		assert.Equal(t, int64(testSegment), fi.Size(), "the large segment is removed once released")
	}
}

// TestOpenOnFullDisk: a journal reopened with no space left (the spare
// used up, no file can be made) takes the free file kept for that, and
// records that free space still go in.
func TestOpenOnFullDisk(t *testing.T) {
	dir := t.TempDir()
	var full atomic.Bool
	fault := func(op string) error {
		if op == "prepare" && full.Load() {
			return fmt.Errorf("create segment: %w", syscall.ENOSPC)
		}
		return nil
	}
	j, _ := open(t, dir, Options{Fault: fault})
	put(t, j, "a", "1")
	waitSpare(t, j)
	j.ensureReserve()
	j.Close()
	full.Store(true)
	prepRetry = 0
	defer func() { prepRetry = defaultPrepRetry }()
	// The spare of the first run is reused at the open; then none is
	// left but the reserve.
	j, rep := open(t, dir, Options{Fault: fault})
	assert.Equal(t, map[string]string{"a": "1"}, latest(rep))
	j.Close()
	j, rep = open(t, dir, Options{Fault: fault})
	assert.Equal(t, map[string]string{"a": "1"}, latest(rep))
	_, err := j.Append(Entry{Kind: Delete, ID: "a", Frees: true, Durable: true})
	require.NoError(t, err, "a removal is recorded on a full disk")
	j.Close()
	full.Store(false)
	_, rep = open(t, dir, Options{})
	assert.Empty(t, latest(rep))
}

// TestOpenWithoutSegment: a journal opened with no free file and no
// space to make one opens all the same; its appends fail with ENOSPC
// until a segment can be made.
func TestOpenWithoutSegment(t *testing.T) {
	dir := t.TempDir()
	var full atomic.Bool
	fault := func(op string) error {
		if op == "prepare" && full.Load() {
			return fmt.Errorf("create segment: %w", syscall.ENOSPC)
		}
		return nil
	}
	prepRetry = 0
	defer func() { prepRetry = defaultPrepRetry }()
	full.Store(true)
	j, _ := open(t, dir, Options{Fault: fault})
	_, err := j.Append(Entry{Kind: Put, ID: "a", Payload: []byte("1"), Durable: true, Frees: true})
	assert.ErrorIs(t, err, syscall.ENOSPC)
	full.Store(false)
	put(t, j, "a", "2")
	j.Close()
	_, rep := open(t, dir, Options{})
	assert.Equal(t, map[string]string{"a": "2"}, latest(rep))
}
