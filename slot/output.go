package slot

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/fifo"
	"github.com/containerd/log"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
)

// stdioOpenTimeout bounds waiting for containerd to open a FIFO's other end.
const stdioOpenTimeout = 30 * time.Second

// output is where a simulated process writes: containerd's FIFOs, or a
// CRI log file in direct CRI mode.
type output interface {
	writeLine(string)
	closeStdin()
	Close()
}

func openOutput(ctx context.Context, io backend.IO) output {
	if io.LogPath != "" {
		return &criLog{path: io.LogPath}
	}
	return openFIFOs(ctx, io)
}

// criLog appends to a container log file in the CRI format kubelet and
// crictl read ("<RFC3339Nano> stdout F <line>").
type criLog struct {
	mu   sync.Mutex
	path string
}

func (l *criLog) writeLine(s string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := os.MkdirAll(filepath.Dir(l.path), 0o755); err != nil {
		log.L.WithError(err).WithField("path", l.path).Warn("container log")
		return
	}
	f, err := os.OpenFile(l.path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o640)
	if err != nil {
		log.L.WithError(err).WithField("path", l.path).Warn("container log")
		return
	}
	defer f.Close()
	for _, line := range splitLines(s) {
		fmt.Fprintf(f, "%s stdout F %s\n", time.Now().UTC().Format(time.RFC3339Nano), line)
	}
}

func splitLines(s string) []string {
	var lines []string
	start := 0
	for i := 0; i < len(s); i++ {
		if s[i] == '\n' {
			lines = append(lines, s[start:i])
			start = i + 1
		}
	}
	if start < len(s) {
		lines = append(lines, s[start:])
	}
	return lines
}

func (l *criLog) closeStdin() {}
func (l *criLog) Close()      {}

// fifos holds the FIFOs of a process's stdio. A real process would hold
// them open until it exits; containerd's CRI copies stdout and stderr to
// the container log until it sees their end.
type fifos struct {
	cancel context.CancelFunc
	mu     sync.Mutex
	stdout io.WriteCloser
	stderr io.WriteCloser
	stdin  io.ReadCloser
	closed bool
}

// openFIFOs opens the FIFOs without blocking the caller (O_NONBLOCK: the
// fifo package connects them once containerd has the other end open, and
// gives up after stdioOpenTimeout).
func openFIFOs(ctx context.Context, pio backend.IO) *fifos {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stdioOpenTimeout)
	t := &fifos{cancel: cancel}
	open := func(path string, flag int) io.ReadWriteCloser {
		if path == "" {
			return nil
		}
		f, err := fifo.OpenFifo(ctx, path, flag, 0)
		if err != nil {
			log.G(ctx).WithError(err).WithField("path", path).Warn("open task stdio")
			return nil
		}
		return f
	}
	if f := open(pio.Stdout, syscall.O_WRONLY|syscall.O_NONBLOCK); f != nil {
		t.stdout = f
	}
	if !pio.Terminal {
		if f := open(pio.Stderr, syscall.O_WRONLY|syscall.O_NONBLOCK); f != nil {
			t.stderr = f
		}
	}
	if f := open(pio.Stdin, syscall.O_RDONLY|syscall.O_NONBLOCK); f != nil {
		t.stdin = f
		// Drain what is written to stdin, as a process that reads it would.
		go io.Copy(io.Discard, f) //nolint:errcheck
	}
	return t
}

// writeLine writes to stdout without blocking the caller.
func (t *fifos) writeLine(s string) {
	go func() {
		t.mu.Lock()
		defer t.mu.Unlock()
		if t.closed || t.stdout == nil {
			return
		}
		if _, err := io.WriteString(t.stdout, s); err != nil {
			log.L.WithError(err).Debug("write task stdout")
		}
	}()
}

func (t *fifos) closeStdin() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stdin != nil {
		t.stdin.Close()
		t.stdin = nil
	}
}

// Close closes every FIFO, which containerd sees as the end of the output.
func (t *fifos) Close() {
	go func() {
		t.mu.Lock()
		defer t.mu.Unlock()
		if t.closed {
			return
		}
		t.closed = true
		t.cancel()
		for _, c := range []io.Closer{t.stdout, t.stderr, t.stdin} {
			if c != nil {
				c.Close()
			}
		}
	}()
}
