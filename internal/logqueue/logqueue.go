// Package logqueue takes the daemon's log output off the path of the calls
// it serves: a line is copied into a bounded buffer that one goroutine
// writes out, several lines to a write, so that a log that is slow or
// stalled (a full pipe, a journal that does not read) slows no call. When
// the buffer is full, lines are dropped and counted, and the count is
// logged once the output takes lines again.
package logqueue

import (
	"fmt"
	"io"
	"sync"
	"time"
)

// DefaultLimit is the bound of the lines waiting to be written.
const DefaultLimit = 1 << 20

// Writer is an io.Writer for a logger's output (logrus writes one line
// per Write, under its own lock).
type Writer struct {
	out   io.Writer
	limit int

	mu      sync.Mutex
	buf     []byte
	dropped int
	closed  bool

	wake chan struct{}
	done chan struct{}
}

// New starts writing what it is given to out, holding at most limit bytes
// (DefaultLimit when limit <= 0) that out has not taken yet.
func New(out io.Writer, limit int) *Writer {
	if limit <= 0 {
		limit = DefaultLimit
	}
	w := &Writer{out: out, limit: limit, wake: make(chan struct{}, 1), done: make(chan struct{})}
	go w.run()
	return w
}

// Write queues p, or drops it when limit bytes already wait; it never
// waits for out. After Close it writes to out directly.
func (w *Writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return w.out.Write(p)
	}
	if len(w.buf)+len(p) > w.limit {
		w.dropped++
	} else {
		w.buf = append(w.buf, p...)
	}
	// Under mu: Close closes wake after setting closed under it.
	select {
	case w.wake <- struct{}{}:
	default:
	}
	w.mu.Unlock()
	return len(p), nil
}

// Close writes out what is queued and makes later writes go to out
// directly, for the lines of a shutdown and of a fatal error.
func (w *Writer) Close() error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return nil
	}
	w.closed = true
	w.mu.Unlock()
	close(w.wake)
	<-w.done
	return nil
}

func (w *Writer) run() {
	defer close(w.done)
	var spare []byte
	for {
		_, open := <-w.wake
		w.mu.Lock()
		batch := w.buf
		w.buf = spare[:0]
		dropped := w.dropped
		w.dropped = 0
		w.mu.Unlock()
		if len(batch) > 0 {
			w.out.Write(batch)
		}
		if dropped > 0 {
			fmt.Fprintf(w.out, "time=%q level=warning msg=\"%d log lines dropped: the log output did not take them fast enough\"\n",
				time.Now().Format(time.RFC3339Nano), dropped)
		}
		// A burst's buffer is not kept: the next ones are small.
		if cap(batch) > 64<<10 {
			batch = nil
		}
		spare = batch
		if !open {
			return
		}
	}
}
