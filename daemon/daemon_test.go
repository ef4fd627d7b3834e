package daemon

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/dirlock"
)

// TestSecondDaemonRefused: a second daemon on the state directory of a
// running one refuses to start, whatever its sockets, and touches
// nothing.
func TestSecondDaemonRefused(t *testing.T) {
	cfg := testDaemon(t, nil)
	before, err := os.ReadDir(cfg.Dir)
	require.NoError(t, err)

	second := cfg
	base := t.TempDir()
	second.Listen = filepath.Join(base, "other.sock")
	err = Run(context.Background(), second, func() { t.Error("the second daemon served") })
	require.Error(t, err)
	assert.True(t, errors.Is(err, dirlock.ErrLocked), "%v", err)
	assert.Contains(t, err.Error(), cfg.Dir)
	_, err = os.Stat(second.Listen)
	assert.True(t, os.IsNotExist(err), "the second daemon listens nowhere")
	after, err := os.ReadDir(cfg.Dir)
	require.NoError(t, err)
	assert.Equal(t, len(before), len(after))
}
