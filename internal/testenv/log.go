package testenv

import (
	"strings"
	"sync"
	"testing"

	"github.com/containerd/log"
)

// LogBuffer holds what the process logged while a test ran; safe for the
// goroutines that log.
type LogBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *LogBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *LogBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// CaptureLog sends containerd/log's output to a buffer until tb ends.
func CaptureLog(tb testing.TB) *LogBuffer {
	buf := &LogBuffer{}
	out := log.L.Logger.Out
	log.L.Logger.SetOutput(buf)
	tb.Cleanup(func() { log.L.Logger.SetOutput(out) })
	return buf
}
