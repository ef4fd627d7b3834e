package dirlock

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestExclusive(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	l, err := Acquire(dir)
	require.NoError(t, err)
	fi, err := os.Stat(dir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())

	// flock is per open file: a second Acquire, even in this process, is
	// refused, naming the holder.
	_, err = Acquire(dir)
	require.Error(t, err)
	assert.True(t, errors.Is(err, ErrLocked))
	assert.Contains(t, err.Error(), fmt.Sprintf("pid %d", os.Getpid()))
	assert.Contains(t, err.Error(), dir)

	require.NoError(t, l.Release())
	l2, err := Acquire(dir)
	require.NoError(t, err, "free once released")
	l2.Release()
}

// TestOtherProcess: the lock holds against another process, and goes
// with the process that held it (a killed daemon leaves none).
func TestOtherProcess(t *testing.T) {
	if _, err := exec.LookPath("flock"); err != nil {
		t.Fatalf("flock(1) (util-linux) is needed: %v", err)
	}
	dir := t.TempDir()
	l, err := Acquire(dir)
	require.NoError(t, err)
	out, err := exec.Command("flock", "-n", "-E", "42", filepath.Join(dir, File), "true").CombinedOutput()
	assert.Equal(t, 42, exitCode(err), "another process cannot take it: %s", out)
	l.Release()
	out, err = exec.Command("flock", "-n", filepath.Join(dir, File), "true").CombinedOutput()
	assert.NoError(t, err, "%s", out)

	// Held by another process that then dies.
	// One process that holds it (flock(1) would leave it to its child);
	// it waits for the lock, which the probes below hold for an instant.
	cmd := exec.Command("sh", "-c", `exec 9>>"$1" && flock 9 && exec sleep 60`, "sh", filepath.Join(dir, File))
	require.NoError(t, cmd.Start())
	waitLocked(t, dir)
	_, err = Acquire(dir)
	require.Error(t, err)
	assert.True(t, strings.Contains(err.Error(), "another process") || strings.Contains(err.Error(), "pid"))
	cmd.Process.Kill()
	cmd.Wait()
	l, err = Acquire(dir)
	require.NoError(t, err, "a dead holder leaves no lock")
	l.Release()
}

func waitLocked(t *testing.T, dir string) {
	t.Helper()
	for range 500 {
		if exec.Command("flock", "-n", filepath.Join(dir, File), "true").Run() != nil {
			return
		}
		exec.Command("sleep", "0.01").Run()
	}
	t.Fatal("flock(1) did not take the lock")
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err == nil {
		return 0
	}
	return -1
}
