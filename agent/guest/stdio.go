package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
)

// Bounds of the stdio buffers.
const (
	// DefaultStreamBuffer is what the agent keeps of a process's stdout or
	// stderr that the host has not acknowledged. When it is full the agent
	// stops reading the FIFO, so the process blocks on its writes, as
	// with a shim whose reader is slow.
	DefaultStreamBuffer = 256 << 10
	defaultReadBytes    = 64 << 10
	maxReadBytes        = 1 << 20
	maxReadWait         = 5 * time.Minute
	maxStdinWait        = 5 * time.Second
)

// stream is one output stream of a process: the read end of its FIFO and
// the output read from it that the host has not acknowledged. Offsets
// count bytes from the stream's start.
type stream struct {
	path string
	f    *os.File
	max  int

	mu     sync.Mutex
	buf    []byte // output from offset start on
	start  int64
	eof    bool
	closed bool
	wake   chan struct{} // closed and renewed on news (data, eof, release)
}

// openStream creates the FIFO at path and opens its read end without
// blocking, so that the task service's writer opens it at once, and starts
// reading it.
func openStream(path string, max int) (*stream, error) {
	if err := unix.Mkfifo(path, 0o600); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("mkfifo %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	s := &stream{path: path, f: f, max: max, wake: make(chan struct{})}
	go s.run()
	return s, nil
}

func (s *stream) notify() {
	close(s.wake)
	s.wake = make(chan struct{})
}

func (s *stream) run() {
	b := make([]byte, 32<<10)
	for {
		s.mu.Lock()
		for len(s.buf) >= s.max && !s.closed {
			w := s.wake
			s.mu.Unlock()
			<-w
			s.mu.Lock()
		}
		if s.closed {
			s.mu.Unlock()
			return
		}
		room := min(s.max-len(s.buf), len(b))
		s.mu.Unlock()

		n, err := readFIFO(s.f, b[:room])
		s.mu.Lock()
		s.buf = append(s.buf, b[:n]...)
		if err != nil {
			if !errors.Is(err, io.EOF) && !s.closed {
				log.L.WithError(err).WithField("fifo", s.path).Warn("read stdio")
			}
			s.eof = true
		}
		s.notify()
		s.mu.Unlock()
		if err != nil {
			return
		}
	}
}

// readFIFO reads the read end of a FIFO opened with O_NONBLOCK. A FIFO
// without a writer reads as empty; it is at its end only once a writer
// came and went (poll reports POLLHUP), not before the first writer.
func readFIFO(f *os.File, b []byte) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	var (
		n    int
		rerr error
	)
	err = rc.Read(func(fd uintptr) bool {
		n, rerr = unix.Read(int(fd), b)
		switch {
		case errors.Is(rerr, unix.EAGAIN), errors.Is(rerr, unix.EINTR):
			return false
		case rerr == nil && n == 0:
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			if _, err := unix.Poll(pfd, 0); err == nil && pfd[0].Revents&unix.POLLHUP == 0 {
				return false // no writer yet: wait for one
			}
		}
		return true
	})
	switch {
	case err != nil:
		return 0, err
	case rerr != nil:
		return 0, rerr
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// read returns output from offset on (-1: the oldest kept), releasing
// what is before offset, and waits up to wait for some.
func (s *stream) read(ctx context.Context, offset int64, max int, wait time.Duration) (int64, []byte, bool) {
	var timer <-chan time.Time
	if wait > 0 {
		t := time.NewTimer(wait)
		defer t.Stop()
		timer = t.C
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		end := s.start + int64(len(s.buf))
		if offset > s.start {
			k := min(offset, end) - s.start
			if k > 0 {
				s.buf = s.buf[:copy(s.buf, s.buf[k:])]
				s.start += k
				s.notify() // room for the reader
			}
		}
		if offset < s.start {
			offset = s.start
		}
		if offset > end {
			// Past what was produced: the host's offset is not ours
			// (a new guest); give it what there is.
			offset = s.start
		}
		avail := end - offset
		if avail > 0 || s.eof || timer == nil {
			n := min(avail, int64(max))
			data := append([]byte(nil), s.buf[offset-s.start:offset-s.start+n]...)
			return offset, data, s.eof && offset+n == end
		}
		w := s.wake
		s.mu.Unlock()
		select {
		case <-w:
		case <-timer:
			timer = nil
		case <-ctx.Done():
			timer = nil
		}
		s.mu.Lock()
	}
}

func (s *stream) close() {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		s.notify()
	}
	s.mu.Unlock()
	s.f.Close()
}

// procIO is the stdio of one process: FIFOs in dir.
type procIO struct {
	paths          *api.StdioPaths
	stdin          *os.File
	stdinMu        sync.Mutex
	stdout, stderr *stream
}

// newProcIO creates the FIFOs a process asked for, named prefix.stdin etc.
// in dir. A process with any stream gets stdout and stderr both (the runc
// task service copies both or none); with a terminal there is no stderr
// (the terminal carries both).
func newProcIO(dir, prefix string, sio *api.Stdio, bufSize int) (_ *procIO, retErr error) {
	p := &procIO{paths: &api.StdioPaths{}}
	defer func() {
		if retErr != nil {
			p.close()
		}
	}()
	if sio == nil || !(sio.Stdin || sio.Stdout || sio.Stderr) {
		return p, nil
	}
	sio = &api.Stdio{Stdin: sio.Stdin, Stdout: true, Stderr: !sio.Terminal, Terminal: sio.Terminal}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if sio.Stdin {
		path := filepath.Join(dir, prefix+".stdin")
		if err := unix.Mkfifo(path, 0o600); err != nil && !errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("mkfifo %s: %w", path, err)
		}
		// Both ends: opening never blocks, and the process's stdin stays
		// open until the host closes it.
		f, err := os.OpenFile(path, os.O_RDWR|unix.O_NONBLOCK, 0)
		if err != nil {
			return nil, err
		}
		p.stdin = f
		p.paths.Stdin = path
	}
	if sio.Stdout {
		path := filepath.Join(dir, prefix+".stdout")
		s, err := openStream(path, bufSize)
		if err != nil {
			return nil, err
		}
		p.stdout = s
		p.paths.Stdout = path
	}
	if sio.Stderr {
		path := filepath.Join(dir, prefix+".stderr")
		s, err := openStream(path, bufSize)
		if err != nil {
			return nil, err
		}
		p.stderr = s
		p.paths.Stderr = path
	}
	return p, nil
}

func (p *procIO) stream(which api.Stream) (*stream, error) {
	var s *stream
	switch which {
	case api.Stream_STDOUT:
		s = p.stdout
	case api.Stream_STDERR:
		s = p.stderr
	default:
		return nil, fmt.Errorf("stream %v: %w", which, errdefs.ErrInvalidArgument)
	}
	if s == nil {
		return nil, fmt.Errorf("the process has no %v: %w", which, errdefs.ErrNotFound)
	}
	return s, nil
}

// writeStdin writes data (what fits before the deadline) and then closes
// stdin if asked and everything was written.
func (p *procIO) writeStdin(ctx context.Context, data []byte, closeIt bool) (int, error) {
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	if p.stdin == nil {
		if p.paths.Stdin != "" && len(data) == 0 && closeIt {
			return 0, nil // already closed
		}
		if p.paths.Stdin != "" {
			return 0, fmt.Errorf("stdin is closed: %w", errdefs.ErrFailedPrecondition)
		}
		return 0, fmt.Errorf("the process has no stdin: %w", errdefs.ErrNotFound)
	}
	n := 0
	if len(data) > 0 {
		deadline := time.Now().Add(maxStdinWait)
		if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d
		}
		p.stdin.SetWriteDeadline(deadline)
		var err error
		n, err = p.stdin.Write(data)
		p.stdin.SetWriteDeadline(time.Time{})
		if err != nil {
			if n > 0 && errors.Is(err, os.ErrDeadlineExceeded) {
				return n, nil // the rest does not fit now: the host retries
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return 0, fmt.Errorf("stdin is full: %w", errdefs.ErrUnavailable)
			}
			return n, err
		}
	}
	if closeIt {
		p.stdin.Close()
		p.stdin = nil
	}
	return n, nil
}

func (p *procIO) close() {
	p.stdinMu.Lock()
	if p.stdin != nil {
		p.stdin.Close()
		p.stdin = nil
	}
	p.stdinMu.Unlock()
	if p.stdout != nil {
		p.stdout.close()
	}
	if p.stderr != nil {
		p.stderr.close()
	}
}
