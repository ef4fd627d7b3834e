package logqueue

import (
	"io"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/testenv"
)

func TestLinesReachTheOutputInOrder(t *testing.T) {
	var out testenv.LogBuffer
	w := New(&out, 0)
	var want strings.Builder
	for i := range 1000 {
		line := strings.Repeat("x", i%50) + "\n"
		want.WriteString(line)
		n, err := w.Write([]byte(line))
		require.NoError(t, err)
		assert.Equal(t, len(line), n)
	}
	require.NoError(t, w.Close())
	assert.Equal(t, want.String(), out.String())

	// After Close, straight to the output.
	w.Write([]byte("last\n"))
	assert.True(t, strings.HasSuffix(out.String(), "last\n"))
	require.NoError(t, w.Close(), "twice")
}

// A stalled output (a pipe nobody reads) neither blocks a write nor
// loses more than what does not fit, and the loss is logged.
func TestStalledOutputDropsAndCounts(t *testing.T) {
	r, pw, err := os.Pipe()
	require.NoError(t, err)
	defer r.Close()
	w := New(pw, 4096)
	line := []byte(strings.Repeat("y", 99) + "\n")
	// Fill the pipe (64 KiB) and the queue; the writes return at once.
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 2000 {
			w.Write(line)
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("a write waited for the stalled output")
	}
	// Read everything: the queued lines come, then the count.
	got := make(chan string)
	go func() {
		data, _ := io.ReadAll(r)
		got <- string(data)
	}()
	w.Write([]byte("after\n"))
	require.NoError(t, w.Close())
	pw.Close()
	s := <-got
	assert.Less(t, strings.Count(s, string(line)), 2000, "some lines were dropped")
	assert.GreaterOrEqual(t, strings.Count(s, string(line)), 4096/len(line), "what fit in the queue was kept")
	assert.Regexp(t, `level=warning msg="\d+ log lines dropped`, s)
	assert.Contains(t, s, "after\n")
}

// Writes racing Close neither panic (a wake sent on the closed channel)
// nor lose a line: those accepted before Close are written out by it,
// the later ones directly.
func TestWritesRacingClose(t *testing.T) {
	for range 300 {
		var out testenv.LogBuffer
		w := New(&out, 0)
		var wrote atomic.Int64
		var stop atomic.Bool
		var wg sync.WaitGroup
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for !stop.Load() {
					w.Write([]byte("x\n"))
					wrote.Add(1)
				}
			}()
		}
		for range 20 {
			runtime.Gosched()
		}
		w.Close()
		stop.Store(true)
		wg.Wait()
		assert.Equal(t, int(wrote.Load()), strings.Count(out.String(), "x\n"))
	}
}
