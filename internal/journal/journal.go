// Package journal is a write-ahead journal: the commit point of the
// daemon's state changes is one record appended to it, and concurrent
// appends share one write and one sync (group commit: records that arrive
// while a sync is in flight ride the next one).
//
// The journal is a directory of segment files of fixed size, filled with
// zeros when they are created, so that appending to one allocates no
// space and a sync of it writes data only (no file system metadata).
// Records carry a checksum of their header and one of their payload; a
// crash mid-write leaves a tail that fails them and is dropped on Open
// (it was never acknowledged), while damage to data that had been synced
// is reported. The newest segment takes the appends; when it is full the
// next one, prepared ahead, takes over and the full one is sealed.
// Sealed segments are compacted by the owner of the journal (Seal, write
// the state they hold somewhere durable, Release), which frees them for
// reuse.
//
// The end of every segment is kept free for records that let their owner
// free space (a stop, a removal: Entry.Frees), so that with a full disk
// and no segment to rotate to, those can still be recorded.
package journal

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Defaults of Options.
const (
	DefaultSegmentSize = 8 << 20
	minSegmentSize     = 64 << 10
	defaultMaxFree     = 2
	segSuffix          = ".seg"
	tempPrefix         = ".tmp-"
)

// Options configure a journal.
type Options struct {
	// SegmentSize is the size of each segment file (default 8 MiB).
	SegmentSize int64
	// Reserve is the space at the end of a segment that only records
	// with Frees may use when no other segment can be prepared (default
	// an eighth of a segment).
	Reserve int64
	// NoSync makes appends and segment changes not durable: a record
	// survives the process once Append returns, not a power loss.
	NoSync bool
	// MaxFree is how many free segment files are kept for reuse
	// (default 2), besides the one kept for a full disk.
	MaxFree int
	// OnFailed is called, in a goroutine of its own, with the IDs of
	// records whose write or sync failed: the calls that appended them
	// failed, yet the records may still reach the disk, so their owner
	// should append the IDs' current state again.
	OnFailed func(ids []string)
	// Fault, when set, is called before each I/O step ("write",
	// "sync", "prepare", "release") and fails it with the error it
	// returns: fault injection for tests.
	Fault func(op string) error
}

// Entry is what Append records.
type Entry struct {
	Kind    Kind
	ID      string
	Payload []byte
	// Frees marks a record that lets its owner free space (a stop, a
	// removal): it may use the space kept at the end of a segment.
	Frees bool
	// Durable makes Append return once the record is synced; otherwise
	// it returns once it is written (it survives the process, not a
	// power loss).
	Durable bool
}

// ErrClosed is returned by Append after Close.
var ErrClosed = errors.New("journal is closed")

// fullError is the error of a record that does not fit: it matches
// syscall.ENOSPC.
type fullError struct {
	path string
	err  error
}

func (e *fullError) Error() string {
	if e.err != nil {
		return fmt.Sprintf("journal %s: no space left on device: %v", e.path, e.err)
	}
	return fmt.Sprintf("journal %s: no space left on device (the rest of the journal is kept for stopping and removing sandboxes)", e.path)
}

func (e *fullError) Is(target error) bool { return target == syscall.ENOSPC }
func (e *fullError) Unwrap() error        { return e.err }

// Journal is an open journal. Its methods are safe for concurrent use.
type Journal struct {
	dir  string
	opts Options

	mu      sync.Mutex
	cond    *sync.Cond
	queue   []*pending
	waiting []*pending // written, waiting for a sync
	writing bool       // a goroutine holds the writer role
	syncing bool       // a goroutine holds the syncer role
	closed  bool
	// idleWaiters counts Seal and Close waiting for the roles to be
	// free (cond); appends never wait on cond, each is woken alone.
	idleWaiters int

	// Owned by the writer role.
	nextSeq     uint64
	active      *segment
	buf         []byte
	forceRotate bool

	written uint64 // every seq up to it is written
	sealed  []*segment
	spare   *segment
	free    []*segment
	// reserve is a free file that only Open takes, when no other can be
	// had (a full disk): a restarted daemon can record stops and removals.
	reserve   *segment
	maxNumber uint64
	nextFile  int

	prepMu     sync.Mutex
	prepErr    error     // the last failure to prepare a spare
	prepFailed time.Time // when; guarded by prepMu
	compactCh  chan struct{}
}

// prepRetry is how long after a failure to prepare a spare (a full disk)
// the next attempt waits, so that a full disk does not cost an attempt
// per record.
var prepRetry = defaultPrepRetry

const defaultPrepRetry = time.Second

type segment struct {
	path   string
	fd     int
	number uint64
	size   int64
	off    int64 // where the next record goes; writer role
	// Guarded by Journal.mu.
	writtenOff int64
	syncedOff  int64
	dirty      bool
	ids        map[string]struct{}
}

type pending struct {
	Entry
	seq uint64
	err error
	// finished is closed once the record is settled: written, synced
	// (Durable), or failed.
	finished chan struct{}
}

// Replay is what Open found.
type Replay struct {
	// Records are the intact records, oldest first.
	Records []Record
	// Damage lists synced data that no longer reads back.
	Damage []Damage
}

// Open opens the journal in dir, creating it if needed, and returns what
// it holds. The segments it finds are sealed: new records go to a new
// segment, and the old ones stay until they are released.
func Open(dir string, opts Options) (*Journal, *Replay, error) {
	if opts.SegmentSize <= 0 {
		opts.SegmentSize = DefaultSegmentSize
	}
	opts.SegmentSize = max(opts.SegmentSize, minSegmentSize) &^ 4095
	if opts.Reserve <= 0 {
		opts.Reserve = opts.SegmentSize / 8
	}
	opts.Reserve = min(opts.Reserve, opts.SegmentSize/2)
	if opts.MaxFree <= 0 {
		opts.MaxFree = defaultMaxFree
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, err
	}
	j := &Journal{dir: dir, opts: opts, compactCh: make(chan struct{}, 1)}
	j.cond = sync.NewCond(&j.mu)
	rep, err := j.load()
	if err != nil {
		j.closeFiles()
		return nil, nil, err
	}
	// A free file is kept aside as the reserve first: a daemon restarted
	// on a full disk takes it when no other file can be had.
	if len(j.free) > 1 {
		j.takeReserve()
	}
	err = j.ensureSpare()
	if errors.Is(err, syscall.ENOSPC) && j.reserve != nil {
		j.free = append(j.free, j.reserve)
		j.reserve = nil
		j.prepErr = nil
		err = j.ensureSpare()
	}
	switch {
	case err == nil:
		j.active = j.spare
		j.spare = nil
	case errors.Is(err, syscall.ENOSPC):
		// No segment to append to: the journal opens without one, its
		// appends fail with ENOSPC until one can be made (space freed,
		// or segments released by a compaction).
	default:
		j.closeFiles()
		return nil, nil, err
	}
	go func() {
		if j.ensureSpare() == nil {
			j.ensureReserve()
		}
	}()
	if len(j.sealed) > 0 {
		j.signalCompact()
	}
	return j, rep, nil
}

// load reads every segment file.
func (j *Journal) load() (*Replay, error) {
	entries, err := os.ReadDir(j.dir)
	if err != nil {
		return nil, err
	}
	rep := &Replay{}
	type found struct {
		seg  *segment
		data []byte
	}
	var active []found
	for _, e := range entries {
		name := e.Name()
		path := filepath.Join(j.dir, name)
		if strings.HasPrefix(name, tempPrefix) {
			os.Remove(path)
			continue
		}
		if !e.Type().IsRegular() || !strings.HasSuffix(name, segSuffix) {
			continue
		}
		if n, err := strconv.Atoi(strings.TrimSuffix(name, segSuffix)); err == nil && n >= j.nextFile {
			j.nextFile = n + 1
		}
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", path, err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("stat %s: %w", path, err)
		}
		seg := &segment{path: path, fd: fd, size: st.Size}
		head := make([]byte, 64)
		n, _ := unix.Pread(fd, head, 0)
		h, ok := decodeSegHeader(head[:max(n, 0)])
		if ok && h.free && h.size == seg.size {
			// Free: its records do not count, it is not read.
			seg.number = h.number
			j.maxNumber = max(j.maxNumber, h.number)
			j.free = append(j.free, seg)
			continue
		}
		data, err := os.ReadFile(path)
		if err != nil {
			unix.Close(fd)
			return nil, err
		}
		h, ok = decodeSegHeader(data)
		switch {
		case ok && h.size == seg.size:
			seg.number = h.number
			j.maxNumber = max(j.maxNumber, h.number)
			if h.free {
				j.free = append(j.free, seg)
				continue
			}
		default:
			// A damaged header: the file holds records if any record
			// header in it is intact; the newest incarnation's are.
			seg.number = newestRecordNumber(data)
			if seg.number == 0 || seg.size < headerSize {
				j.free = append(j.free, seg)
				continue
			}
			j.maxNumber = max(j.maxNumber, seg.number)
			rep.Damage = append(rep.Damage, Damage{Path: path, Reason: "damaged segment header"})
		}
		active = append(active, found{seg, data})
	}
	sort.Slice(active, func(a, b int) bool { return active[a].seg.number < active[b].seg.number })
	var maxSeq uint64
	lastWithRecords := -1
	scans := make([]scanned, len(active))
	for i, a := range active {
		scans[i] = scanSegment(a.data, a.seg.number, a.seg.path)
		if len(scans[i].records) > 0 {
			lastWithRecords = i
		}
	}
	for i, a := range active {
		sc := scans[i]
		seg := a.seg
		if len(sc.records) == 0 && !sc.sealed && len(sc.damage) == 0 {
			// A spare that was never used.
			j.free = append(j.free, seg)
			continue
		}
		rep.Records = append(rep.Records, sc.records...)
		rep.Damage = append(rep.Damage, sc.damage...)
		if !sc.sealed && i < lastWithRecords {
			// A segment is sealed, and synced, before the next one gets
			// a record: its end was lost.
			rep.Damage = append(rep.Damage, Damage{Path: seg.path, Offset: sc.end, Reason: "the end of a sealed segment is missing"})
		}
		seg.off = max(sc.end, headerSize)
		seg.writtenOff, seg.syncedOff = seg.off, seg.off
		seg.ids = map[string]struct{}{}
		for _, r := range sc.records {
			seg.ids[r.ID] = struct{}{}
			maxSeq = max(maxSeq, r.Seq)
		}
		if n := len(sc.records); n > 0 {
			maxSeq = max(maxSeq, sc.records[n-1].Seq)
		}
		j.sealed = append(j.sealed, seg)
		if !sc.sealed && i == lastWithRecords {
			// Seal the newest before the new segment gets records, so
			// that a missing seal always means damage.
			j.nextSeq = maxSeq + 1
			if err := j.writeSeal(seg); err != nil {
				return nil, err
			}
			maxSeq = j.nextSeq - 1
		}
	}
	j.nextSeq = maxSeq + 1
	j.written = maxSeq
	return rep, nil
}

// newestRecordNumber finds the highest segment number among the intact
// record headers of data.
func newestRecordNumber(data []byte) uint64 {
	var best uint64
	for p := int64(headerSize); p+recHeader <= int64(len(data)); p += 8 {
		if len(data[p:]) < 24 {
			break
		}
		n := uint64(0)
		for i := 0; i < 8; i++ {
			n |= uint64(data[p+16+int64(i)]) << (8 * i)
		}
		if n > best {
			if _, _, ok := parseHeader(data[p:], n); ok {
				best = n
			}
		}
	}
	return best
}

// writeSeal ends seg with a seal record and syncs it; the caller holds
// the writer role (or is Open).
func (j *Journal) writeSeal(seg *segment) error {
	if err := j.fault("write"); err != nil {
		return err
	}
	j.mu.Lock()
	synced := seg.syncedOff
	j.mu.Unlock()
	rec := appendRecord(nil, recHdr{seq: j.nextSeq, segment: seg.number, synced: synced, kind: seal}, nil)
	if _, err := unix.Pwrite(seg.fd, rec, seg.off); err != nil {
		return fmt.Errorf("seal %s: %w", seg.path, err)
	}
	j.nextSeq++
	seg.off += int64(len(rec))
	if err := j.sync(seg); err != nil {
		return err
	}
	j.mu.Lock()
	seg.writtenOff, seg.syncedOff, seg.dirty = seg.off, seg.off, false
	j.mu.Unlock()
	return nil
}

func (j *Journal) fault(op string) error {
	if j.opts.Fault != nil {
		return j.opts.Fault(op)
	}
	return nil
}

func (j *Journal) sync(seg *segment) error {
	if j.opts.NoSync {
		return nil
	}
	if err := j.fault("sync"); err != nil {
		return err
	}
	if err := unix.Fdatasync(seg.fd); err != nil {
		return fmt.Errorf("sync %s: %w", seg.path, err)
	}
	return nil
}

// Append records e and returns its seq once it is written, or synced when
// e.Durable. A record that does not fit fails with an error matching
// syscall.ENOSPC.
func (j *Journal) Append(e Entry) (uint64, error) {
	if len(e.ID) > maxIDLen {
		return 0, fmt.Errorf("journal: id of %d bytes is too long", len(e.ID))
	}
	if len(e.Payload) > MaxPayload {
		return 0, fmt.Errorf("journal: record of %d bytes is too large", len(e.Payload))
	}
	p := &pending{Entry: e, finished: make(chan struct{})}
	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		return 0, ErrClosed
	}
	j.queue = append(j.queue, p)
	if !j.writing {
		// Write what is queued, this record with it; then sync, unless
		// a sync is in flight (it syncs again when it ends).
		j.runWriter()
		if len(j.waiting) > 0 && !j.syncing {
			j.runSync()
		}
	}
	j.mu.Unlock()
	<-p.finished
	return p.seq, p.err
}

// finish settles a record: its caller returns. j.mu is held.
func (p *pending) finish(err error) {
	p.err = err
	close(p.finished)
}

type result struct {
	seq uint64
	err error
	seg *segment
}

// runWriter writes what is queued until the queue is empty. j.mu is held
// on entry and exit. The records that need no sync are settled; the
// others wait in j.waiting.
func (j *Journal) runWriter() {
	j.writing = true
	for len(j.queue) > 0 && !j.closed {
		batch := j.queue
		j.queue = nil
		hasSpare := j.spare != nil
		j.mu.Unlock()
		res, failed := j.write(batch, hasSpare)
		j.mu.Lock()
		for _, s := range j.live() {
			if s.off > s.writtenOff {
				s.writtenOff, s.dirty = s.off, true
			}
		}
		for i, p := range batch {
			p.seq = res[i].seq
			switch {
			case res[i].err != nil:
				p.finish(res[i].err)
			case !p.Durable || j.opts.NoSync:
				j.written = max(j.written, p.seq)
				p.finish(nil)
			default:
				j.written = max(j.written, p.seq)
				j.waiting = append(j.waiting, p)
			}
		}
		if len(failed) > 0 && j.opts.OnFailed != nil {
			go j.opts.OnFailed(failed)
		}
	}
	j.writing = false
	if j.idleWaiters > 0 {
		j.cond.Broadcast()
	}
}

// write encodes and writes a batch: one write per segment it goes to.
func (j *Journal) write(batch []*pending, hasSpare bool) ([]result, []string) {
	res := make([]result, len(batch))
	seg := j.active
	if j.forceRotate || seg == nil {
		next, err := j.rotate(false)
		switch {
		case err == nil:
			seg = next
			j.forceRotate = false
		case seg == nil:
			// No segment at all (opened on a full disk).
			for i := range res {
				res[i].err = err
			}
			return res, nil
		}
	}
	buf := j.buf[:0]
	start := seg.off
	var inBuf []int // indexes of the records in buf
	var failed []string
	var batchErr error
	flush := func() {
		if len(buf) == 0 {
			return
		}
		err := j.fault("write")
		if err == nil {
			_, err = unix.Pwrite(seg.fd, buf, start)
		}
		if err != nil {
			err = fmt.Errorf("write %s: %w", seg.path, err)
			if errors.Is(err, syscall.ENOSPC) {
				err = &fullError{path: j.dir, err: err}
			}
			for _, i := range inBuf {
				res[i].err = err
				failed = append(failed, batch[i].ID)
			}
			// Leave what may be a bad region: the next batch starts a
			// new segment; the rest of this one fails too.
			j.forceRotate = true
			batchErr = err
		} else {
			for _, i := range inBuf {
				seg.ids[batch[i].ID] = struct{}{}
			}
		}
		start += int64(len(buf))
		seg.off = start
		buf, inBuf = buf[:0], inBuf[:0]
	}
	j.mu.Lock()
	synced := seg.syncedOff
	j.mu.Unlock()
	for i, p := range batch {
		if batchErr != nil {
			res[i].err = batchErr
			continue
		}
		n := recordSize(len(p.ID), len(p.Payload))
		if n > j.opts.SegmentSize-headerSize-sealSize-j.opts.Reserve && n > seg.size-sealSize-(start+int64(len(buf))) {
			// Larger than a segment holds: a segment of its own.
			flush()
			if batchErr != nil {
				res[i].err = batchErr
				continue
			}
			next, err := j.rotateLarge(n)
			if err != nil {
				res[i].err = err
				continue
			}
			seg, start, synced, hasSpare = next, next.off, int64(headerSize), false
		}
		for {
			room := seg.size - sealSize - (start + int64(len(buf)))
			if n <= room-j.opts.Reserve || (n <= room && (p.Frees || hasSpare)) {
				break
			}
			flush()
			if batchErr != nil {
				res[i].err = batchErr
				break
			}
			next, err := j.rotate(true)
			if err != nil {
				res[i].err = err
				break
			}
			seg, start, synced, hasSpare = next, next.off, int64(headerSize), false
		}
		if res[i].err != nil {
			continue
		}
		buf = appendRecord(buf, recHdr{seq: j.nextSeq, segment: seg.number, synced: synced, kind: p.Kind, id: p.ID}, p.Payload)
		res[i] = result{seq: j.nextSeq, seg: seg}
		inBuf = append(inBuf, i)
		j.nextSeq++
	}
	flush()
	j.buf = buf[:0]
	if cap(j.buf) > 4<<20 {
		j.buf = nil
	}
	return res, failed
}

// ensureReserve makes sure one free file is kept besides the spare: the
// one a full disk falls back on (ensureSpare).
func (j *Journal) ensureReserve() {
	j.prepMu.Lock()
	defer j.prepMu.Unlock()
	j.mu.Lock()
	have := j.reserve != nil || j.closed
	if !have && len(j.free) > 0 {
		j.takeReserveLocked()
		have = true
	}
	j.mu.Unlock()
	if have || j.fault("prepare") != nil {
		return
	}
	seg, err := j.createFile()
	if err != nil {
		return // tried again after the next rotation
	}
	if err := j.writeHeader(seg, segHeader{number: 0, size: seg.size, free: true}); err != nil {
		unix.Close(seg.fd)
		os.Remove(seg.path)
		return
	}
	j.mu.Lock()
	j.reserve = seg
	j.mu.Unlock()
}

// takeReserve sets a free file of the configured size aside as the
// reserve.
func (j *Journal) takeReserve() {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.takeReserveLocked()
}

func (j *Journal) takeReserveLocked() {
	for i, seg := range j.free {
		if seg.size == j.opts.SegmentSize {
			j.reserve = seg
			j.free = append(j.free[:i], j.free[i+1:]...)
			return
		}
	}
}

// rotate seals the active segment and makes the spare the active one; a
// full segment (full) asks for a compaction. The caller holds the writer
// role.
func (j *Journal) rotate(full bool) (*segment, error) {
	if err := j.ensureSpare(); err != nil {
		return nil, err
	}
	old := j.active
	if old != nil && (old.off > headerSize || old.dirty) {
		if err := j.writeSeal(old); err != nil {
			return nil, err
		}
	}
	j.mu.Lock()
	next := j.spare
	j.spare = nil
	switch {
	case old == nil:
	case old.off > headerSize:
		j.sealed = append(j.sealed, old)
	default:
		j.free = append(j.free, old)
	}
	j.active = next
	j.mu.Unlock()
	if full {
		j.signalCompact()
	}
	go func() {
		if j.ensureSpare() == nil {
			j.ensureReserve()
		}
	}()
	return next, nil
}

// live are the segments that hold records: the sealed ones and the
// active one. j.mu is held.
func (j *Journal) live() []*segment {
	out := make([]*segment, 0, len(j.sealed)+1)
	out = append(out, j.sealed...)
	if j.active != nil {
		out = append(out, j.active)
	}
	return out
}

func (j *Journal) signalCompact() {
	select {
	case j.compactCh <- struct{}{}:
	default:
	}
}

// yieldBelow: a sync of fewer records waiting first yields (runSync).
const yieldBelow = 8

// runSync syncs what is written and settles the records waiting for it,
// again as long as records written meanwhile wait. j.mu is held on entry
// and exit; it is released while the sync runs, so records go on being
// written.
func (j *Journal) runSync() {
	j.syncing = true
	for len(j.waiting) > 0 {
		if len(j.waiting) < yieldBelow {
			// Let the goroutines that are ready to run append first, so
			// that this sync covers their records too: under load a
			// sync costs as much CPU as a call's other work, and 32
			// concurrent callers had 3 records a sync. Alone, a caller
			// finds nothing else to run and goes on at once.
			j.mu.Unlock()
			runtime.Gosched()
			j.mu.Lock()
		}
		waiting := j.waiting
		j.waiting = nil
		var segs []*segment
		var offs []int64
		for _, s := range j.live() {
			if s.dirty {
				segs = append(segs, s)
				offs = append(offs, s.writtenOff)
				s.dirty = false
			}
		}
		j.mu.Unlock()
		var err error
		for _, s := range segs {
			if err = j.sync(s); err != nil {
				break
			}
		}
		j.mu.Lock()
		var failed []string
		if err == nil {
			for i, s := range segs {
				s.syncedOff = max(s.syncedOff, offs[i])
			}
		} else {
			j.forceRotate = true
		}
		for _, p := range waiting {
			p.finish(err)
			if err != nil {
				failed = append(failed, p.ID)
			}
		}
		if len(failed) > 0 && j.opts.OnFailed != nil {
			go j.opts.OnFailed(failed)
		}
	}
	j.syncing = false
	if j.idleWaiters > 0 {
		j.cond.Broadcast()
	}
}

// ensureSpare prepares the segment the next rotation switches to: a free
// file given a new number, or a new file of zeros.
func (j *Journal) ensureSpare() error {
	j.prepMu.Lock()
	defer j.prepMu.Unlock()
	if j.prepErr != nil && time.Since(j.prepFailed) < prepRetry {
		return j.prepErr
	}
	j.mu.Lock()
	if j.spare != nil || j.closed {
		j.mu.Unlock()
		return nil
	}
	var seg *segment
	if n := len(j.free); n > 0 && j.free[n-1].size == j.opts.SegmentSize {
		seg = j.free[n-1]
		j.free = j.free[:n-1]
	}
	number := j.maxNumber + 1
	j.mu.Unlock()
	var err error
	if seg == nil {
		if err = j.fault("prepare"); err == nil {
			seg, err = j.createFile()
		}
	}
	if err == nil {
		err = j.writeHeader(seg, segHeader{number: number, size: seg.size})
	}
	if err != nil {
		if seg != nil {
			j.mu.Lock()
			j.free = append(j.free, seg)
			j.mu.Unlock()
		}
		if errors.Is(err, syscall.ENOSPC) {
			err = &fullError{path: j.dir, err: err}
		}
		j.prepErr, j.prepFailed = err, time.Now()
		return err
	}
	j.prepErr = nil
	j.mu.Lock()
	defer j.mu.Unlock()
	seg.number = number
	seg.off, seg.writtenOff, seg.syncedOff, seg.dirty = headerSize, headerSize, headerSize, false
	seg.ids = map[string]struct{}{}
	j.maxNumber = number
	j.spare = seg
	return nil
}

func (j *Journal) writeHeader(seg *segment, h segHeader) error {
	if _, err := unix.Pwrite(seg.fd, encodeSegHeader(h), 0); err != nil {
		return fmt.Errorf("write %s: %w", seg.path, err)
	}
	return j.sync(seg)
}

// createFile creates a segment file of zeros of the configured size.
func (j *Journal) createFile() (*segment, error) { return j.createFileSize(j.opts.SegmentSize) }

// createFileSize creates a segment file of zeros.
func (j *Journal) createFileSize(size int64) (*segment, error) {
	j.mu.Lock()
	name := fmt.Sprintf("%06d%s", j.nextFile, segSuffix)
	j.nextFile++
	j.mu.Unlock()
	path := filepath.Join(j.dir, name)
	tmp := filepath.Join(j.dir, tempPrefix+name)
	fd, err := unix.Open(tmp, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", tmp, err)
	}
	fail := func(err error) (*segment, error) {
		unix.Close(fd)
		os.Remove(tmp)
		return nil, err
	}
	zeros := make([]byte, 256<<10)
	for off := int64(0); off < size; off += int64(len(zeros)) {
		n := min(int64(len(zeros)), size-off)
		if _, err := unix.Pwrite(fd, zeros[:n], off); err != nil {
			return fail(fmt.Errorf("create %s: %w", tmp, err))
		}
	}
	if !j.opts.NoSync {
		if err := unix.Fsync(fd); err != nil {
			return fail(fmt.Errorf("sync %s: %w", tmp, err))
		}
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(err)
	}
	if !j.opts.NoSync {
		if err := syncDir(j.dir); err != nil {
			unix.Close(fd)
			return nil, err
		}
	}
	return &segment{path: path, fd: fd, size: size}, nil
}

// rotateLarge seals the active segment and makes a new one, large enough
// for a record of n bytes that no segment of the configured size holds,
// the active one. It is released like the others, and then removed.
func (j *Journal) rotateLarge(n int64) (*segment, error) {
	size := (headerSize + n + sealSize + j.opts.Reserve + 1<<20 - 1) &^ (1<<20 - 1)
	if err := j.fault("prepare"); err != nil {
		return nil, err
	}
	seg, err := j.createFileSize(size)
	if err != nil {
		if errors.Is(err, syscall.ENOSPC) {
			err = &fullError{path: j.dir, err: err}
		}
		return nil, err
	}
	old := j.active
	if old.off > headerSize || old.dirty {
		if err := j.writeSeal(old); err != nil {
			unix.Close(seg.fd)
			os.Remove(seg.path)
			return nil, err
		}
	}
	j.prepMu.Lock()
	j.mu.Lock()
	seg.number = j.maxNumber + 1
	j.mu.Unlock()
	if err := j.writeHeader(seg, segHeader{number: seg.number, size: size}); err != nil {
		j.prepMu.Unlock()
		unix.Close(seg.fd)
		os.Remove(seg.path)
		return nil, err
	}
	j.mu.Lock()
	j.maxNumber = seg.number
	if j.spare != nil {
		// Its number is below the new segment's: reuse it as a free
		// file.
		j.free = append(j.free, j.spare)
		j.spare = nil
	}
	seg.off, seg.writtenOff, seg.syncedOff = headerSize, headerSize, headerSize
	seg.ids = map[string]struct{}{}
	if old.off > headerSize {
		j.sealed = append(j.sealed, old)
	} else {
		j.free = append(j.free, old)
	}
	j.active = seg
	j.mu.Unlock()
	j.prepMu.Unlock()
	j.signalCompact()
	go j.ensureSpare() //nolint:errcheck // retried at the next rotation
	return seg, nil
}

func syncDir(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Fsync(fd); err != nil {
		return fmt.Errorf("sync dir %s: %w", dir, err)
	}
	return nil
}

// Sealed is a set of sealed segments, to be released once the state their
// records hold is durable elsewhere.
type Sealed struct {
	segs []*segment
	ids  map[string]struct{}
}

// IDs are the IDs the sealed segments hold records of.
func (s *Sealed) IDs() map[string]struct{} { return s.ids }

// Len is how many segments are sealed.
func (s *Sealed) Len() int { return len(s.segs) }

// Seal seals the active segment if it holds records (new records go to a
// new one) and returns every sealed segment. With no spare to rotate to
// (a full disk) it returns the segments sealed so far, and the error.
func (j *Journal) Seal() (*Sealed, error) {
	j.mu.Lock()
	j.idleWaiters++
	for j.writing && !j.closed {
		j.cond.Wait()
	}
	j.idleWaiters--
	if j.closed {
		j.mu.Unlock()
		return nil, ErrClosed
	}
	j.writing = true
	rotate := j.active != nil && j.active.off > headerSize
	j.mu.Unlock()
	var err error
	if rotate {
		_, err = j.rotate(false)
	}
	j.mu.Lock()
	j.runWriter()
	if len(j.waiting) > 0 && !j.syncing {
		j.runSync()
	}
	s := &Sealed{segs: append([]*segment(nil), j.sealed...), ids: map[string]struct{}{}}
	for _, seg := range s.segs {
		for id := range seg.ids {
			s.ids[id] = struct{}{}
		}
	}
	j.mu.Unlock()
	return s, err
}

// Release frees sealed segments for reuse: their records no longer count.
// The state they held must be durable elsewhere first.
func (j *Journal) Release(s *Sealed) error {
	for _, seg := range s.segs {
		if err := j.fault("release"); err != nil {
			return err
		}
		if err := j.writeHeader(seg, segHeader{number: seg.number, size: seg.size, free: true}); err != nil {
			return err
		}
		j.mu.Lock()
		for i, x := range j.sealed {
			if x == seg {
				j.sealed = append(j.sealed[:i], j.sealed[i+1:]...)
				break
			}
		}
		seg.ids = nil
		var drop *segment
		if len(j.free) >= j.opts.MaxFree || seg.size != j.opts.SegmentSize {
			drop = seg
		} else {
			j.free = append(j.free, seg)
		}
		j.mu.Unlock()
		if drop != nil {
			unix.Close(drop.fd)
			os.Remove(drop.path)
		}
	}
	return nil
}

// Compact is signalled when a segment has been sealed.
func (j *Journal) Compact() <-chan struct{} { return j.compactCh }

// SealedCount is how many segments wait to be released.
func (j *Journal) SealedCount() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return len(j.sealed)
}

// Stats describe the journal.
type Stats struct {
	Segments int   // files
	Sealed   int   // waiting to be released
	Active   int64 // bytes of records in the active segment
}

// Stats returns the journal's current shape.
func (j *Journal) Stats() Stats {
	j.mu.Lock()
	defer j.mu.Unlock()
	st := Stats{Sealed: len(j.sealed), Segments: len(j.sealed) + len(j.free)}
	for _, s := range []*segment{j.active, j.spare, j.reserve} {
		if s != nil {
			st.Segments++
		}
	}
	if j.active != nil {
		st.Active = j.active.writtenOff - headerSize
	}
	return st
}

// Close waits for the writes and syncs in flight and closes the files.
// The segments stay as they are.
func (j *Journal) Close() error {
	j.mu.Lock()
	j.idleWaiters++
	for j.writing || j.syncing {
		j.cond.Wait()
	}
	j.idleWaiters--
	if j.closed {
		j.mu.Unlock()
		return nil
	}
	j.closed = true
	for _, p := range j.queue {
		p.finish(ErrClosed)
	}
	for _, p := range j.waiting {
		p.finish(ErrClosed)
	}
	j.queue, j.waiting = nil, nil
	j.mu.Unlock()
	// Wait for a spare being prepared.
	j.prepMu.Lock()
	defer j.prepMu.Unlock()
	j.closeFiles()
	return nil
}

func (j *Journal) closeFiles() {
	for _, s := range append(append(append([]*segment{}, j.sealed...), j.free...), j.active, j.spare, j.reserve) {
		if s != nil && s.fd > 0 {
			unix.Close(s.fd)
			s.fd = -1
		}
	}
}
