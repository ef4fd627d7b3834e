package sandboxer

import (
	"io"
	"os"
	"testing"

	"github.com/containerd/log"
)

func TestMain(m *testing.M) {
	// Lifecycle logs are noise in test output; failures say what matters.
	if os.Getenv("RSS_TEST_LOGS") == "" {
		log.L.Logger.SetOutput(io.Discard)
	}
	os.Exit(m.Run())
}
