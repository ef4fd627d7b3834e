package e2e

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestLoad creates 1,000 pods concurrently through containerd (32
// workers), stops and removes them, then runs runp/stopp/rmp cycles
// (1,000; 10,000 with RSS_LONG=1) and checks that nothing leaked: no
// sandbox directory, and the daemon's goroutines and file descriptors back
// to where they started.
func TestLoad(t *testing.T) {
	ctx := context.Background()
	pods, cycles, workers := 1000, 1000, 32
	if os.Getenv("RSS_LONG") != "" {
		cycles = 10000
	}
	runp := func(name string) (string, error) {
		resp, err := h.cri.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{
			Config: podConfig(name, demoAnnotations, nil), RuntimeHandler: "resource-slot",
		})
		if err != nil {
			return "", err
		}
		return resp.PodSandboxId, nil
	}
	remove := func(id string) error {
		if _, err := h.cri.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: id}); err != nil {
			return err
		}
		_, err := h.cri.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: id})
		return err
	}
	parallel := func(n int, fn func(i int) error) []error { return runParallel(n, workers, fn) }
	sandboxDirs := func() int {
		entries, err := os.ReadDir(h.StateDir())
		require.NoError(t, err)
		n := 0
		for _, e := range entries {
			if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
				n++
			}
		}
		return n
	}

	// Warm up, then take the daemon's baseline.
	for i := range 10 {
		id, err := runp(fmt.Sprintf("warm-%d", i))
		require.NoError(t, err)
		require.NoError(t, remove(id))
	}
	dirs0 := sandboxDirs()
	// The baseline, once containerd's calls from earlier tests settled.
	gor0, fds0 := daemonGoroutines(t), daemonFDs(t)
	for range 25 {
		time.Sleep(200 * time.Millisecond)
		g, f := daemonGoroutines(t), daemonFDs(t)
		if g == gor0 && f == fds0 {
			break
		}
		gor0, fds0 = g, f
	}

	ids := make([]string, pods)
	start := time.Now()
	errs := parallel(pods, func(i int) error {
		id, err := runp(fmt.Sprintf("load-%d", i))
		ids[i] = id
		return err
	})
	require.Empty(t, errs, "creating %d pods concurrently", pods)
	created := time.Since(start)
	assert.Equal(t, dirs0+pods, sandboxDirs())
	errs = parallel(pods, func(i int) error { return remove(ids[i]) })
	require.Empty(t, errs, "removing them")
	t.Logf("%d pods created concurrently by %d workers in %s, removed in %s", pods, workers, created.Round(time.Millisecond), (time.Since(start) - created).Round(time.Millisecond))

	start = time.Now()
	errs = parallel(cycles, func(i int) error {
		id, err := runp(fmt.Sprintf("cycle-%d", i))
		if err != nil {
			return err
		}
		return remove(id)
	})
	require.Empty(t, errs)
	t.Logf("%d runp/stopp/rmp cycles in %s", cycles, time.Since(start).Round(time.Millisecond))

	assert.Equal(t, dirs0, sandboxDirs(), "no sandbox directory leaked")
	// Goroutines of finished calls exit promptly but not instantly.
	var gor1, fds1 int
	for range 50 {
		gor1, fds1 = daemonGoroutines(t), daemonFDs(t)
		if gor1 <= gor0+2 && fds1 <= fds0+2 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("daemon goroutines %d -> %d, file descriptors %d -> %d", gor0, gor1, fds0, fds1)
	assert.LessOrEqual(t, gor1, gor0+2, "goroutines leaked")
	assert.LessOrEqual(t, fds1, fds0+2, "file descriptors leaked")
}

var goroutinesRe = regexp.MustCompile(`goroutines=(\d+)`)

// daemonGoroutines asks the daemon for a stack dump (SIGUSR1) and reads
// the count it logs.
func daemonGoroutines(t *testing.T) int {
	t.Helper()
	before, err := os.ReadFile(h.sbLog)
	require.NoError(t, err)
	require.NoError(t, h.sandboxer.Process.Signal(syscall.SIGUSR1))
	for range 100 {
		data, err := os.ReadFile(h.sbLog)
		require.NoError(t, err)
		if m := goroutinesRe.FindAllSubmatch(data[len(before):], -1); len(m) > 0 {
			n, _ := strconv.Atoi(string(m[len(m)-1][1]))
			return n
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("the daemon did not dump its goroutines")
	return 0
}

func daemonFDs(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", h.sandboxer.Process.Pid))
	require.NoError(t, err)
	return len(entries)
}
