package sandboxer

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

// TestMonitor samples a sandbox whose simulated container uses more memory
// than the pod's limit: usage.json shows it, with the violation.
func TestMonitor(t *testing.T) {
	ctx := ns(context.Background())
	root := t.TempDir()
	e := newTaskEnv(t, root)
	require.NoError(t, create(ctx, e.ctrl, "sb", podConfig(map[string]string{resourceinfo.AnnotationMemoryLimit: "256Mi"}, nil)))
	_, err := e.ctrl.Start(ctx, "sb")
	require.NoError(t, err)
	_, err = e.client.Create(ctx, &taskAPI.CreateTaskRequest{ID: "hog", Bundle: bundle(t, "sb", nil, map[string]string{slot.AnnotationMemoryUsage: "300Mi"})})
	require.NoError(t, err)
	_, err = e.client.Start(ctx, &taskAPI.StartRequest{ID: "hog"})
	require.NoError(t, err)

	mctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { e.ctrl.RunMonitor(mctx, 20*time.Millisecond); close(done) }()
	// Stopped before the test's directory is removed.
	defer func() { cancel(); <-done }()
	var u resourceinfo.Usage
	require.Eventually(t, func() bool {
		data, err := os.ReadFile(filepath.Join(root, "sb", UsageFile))
		return err == nil && json.Unmarshal(data, &u) == nil
	}, 10*time.Second, 20*time.Millisecond)
	assert.Equal(t, uint64(300<<20), *u.MemoryUsage)
	assert.Equal(t, []string{"memory_usage 314572800 > memory_limit 268435456"}, u.Violations)
}
