package sandboxer

import (
	"io"
	"os"
	"testing"

	"github.com/containerd/log"
	"github.com/stretchr/testify/require"
)

func TestMain(m *testing.M) {
	// Lifecycle logs are noise in test output; failures say what matters.
	if os.Getenv("RSS_TEST_LOGS") == "" {
		log.L.Logger.SetOutput(io.Discard)
	}
	os.Exit(m.Run())
}

// testSegmentSize keeps the journals of tests small.
const testSegmentSize = 64 << 10

// newTestController is New with small journal segments; the controller is
// abandoned (as by a killed daemon) when the test ends. A test that opens
// a second controller on the same directory abandons the first before.
func newTestController(t testing.TB, opts Options) *Controller {
	t.Helper()
	if opts.JournalSegmentSize == 0 {
		opts.JournalSegmentSize = testSegmentSize
	}
	c, err := New(opts)
	require.NoError(t, err)
	t.Cleanup(c.abandon)
	return c
}
