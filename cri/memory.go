package cri

import (
	"runtime/debug"
	"sync/atomic"
	"time"
)

// Lists of many pods or containers make responses of megabytes that are
// garbage once sent, and the Go runtime keeps memory it freed up to its
// heap goal: after lists of 10,000 pods the daemon's RSS stayed 1.7 KiB
// per pod above what the pods hold (README, Performance). A list whose
// response is large gives free memory back to the system soon after, in
// the background, at most once every releaseEvery and after the last of
// a burst of lists: a forced collection of the daemon's heap costs tens
// of milliseconds of CPU, not the calls'.
const (
	largeResponse = 1 << 20
	releaseDelay  = time.Second
	releaseEvery  = 3 * time.Second
)

// releaser returns free memory to the system after large responses.
type releaser struct {
	// last is when memory was last released (UnixNano); pending is set
	// while a release is scheduled.
	last    atomic.Int64
	pending atomic.Bool
	// free is debug.FreeOSMemory and delay releaseDelay, but in tests.
	free  func()
	delay time.Duration
}

// after is called with the size of a response about to be sent.
func (r *releaser) after(size int) {
	if size < largeResponse || !r.pending.CompareAndSwap(false, true) {
		return
	}
	free, delay := r.free, r.delay
	if free == nil {
		free, delay = debug.FreeOSMemory, releaseDelay
	}
	// Once the response is written out and is garbage, and not sooner
	// than releaseEvery after the last release.
	if last := r.last.Load(); last != 0 {
		delay = max(delay, time.Duration(last+int64(releaseEvery)-time.Now().UnixNano()))
	}
	time.AfterFunc(delay, func() {
		r.last.Store(time.Now().UnixNano())
		// Lists from now on are garbage this release may not see.
		r.pending.Store(false)
		free()
	})
}
