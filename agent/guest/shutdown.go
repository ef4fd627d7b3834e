package guest

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// DefaultStopGrace is how long the containers get between SIGTERM and
// SIGKILL when the guest stops (the ACPI power button, a Shutdown without
// a timeout).
const DefaultStopGrace = 5 * time.Second

// How long a guest that powers off waits for the host to read the last
// events: until the stopped containers' exits are published, every event
// was read and none arrived for exitsQuiet; exitsLimit at most.
const (
	exitsQuiet = 300 * time.Millisecond
	exitsLimit = 3 * time.Second
)

// Shutdown stops every container: SIGTERM to all their processes, SIGKILL
// to what is left after grace; then syncs and, with powerOff, powers the
// guest off (Config.PowerOff) shortly after returning, so that the RPC
// that asked can still be answered. Concurrent and later calls wait for
// the first.
func (a *Agent) Shutdown(ctx context.Context, grace time.Duration, powerOff bool) {
	first := false
	a.shutdownOnce.Do(func() {
		first = true
		a.setupMu.Lock()
		defer a.setupMu.Unlock()
		if powerOff {
			a.events.expect(a.runningContainers(ctx))
		}
		a.stopAll(ctx, grace)
		unix.Sync()
		close(a.shutdownDone)
	})
	if !first {
		<-a.shutdownDone
	}
	if first && powerOff && a.cfg.PowerOff != nil {
		go func() {
			// The containers' exits are published once their processes
			// are reaped: let the host read them, a little while at most.
			if !a.events.settle(exitsQuiet, exitsLimit) {
				log.G(ctx).Warn("powering off with events the host has not read")
			}
			time.Sleep(200 * time.Millisecond)
			a.cfg.PowerOff()
		}()
	}
}

// runningContainers are the containers whose init process runs, as the
// task service says.
func (a *Agent) runningContainers(ctx context.Context) []string {
	a.mu.Lock()
	type ctr struct{ id, ns string }
	var created []ctr
	for _, c := range a.containers {
		if c.created {
			created = append(created, ctr{c.id, c.namespace})
		}
	}
	a.mu.Unlock()
	var ids []string
	for _, c := range created {
		st, err := a.task.State(namespaces.WithNamespace(ctx, c.ns), &taskAPI.StateRequest{ID: c.id})
		if err == nil && (st.Status == task.Status_RUNNING || st.Status == task.Status_PAUSED) {
			ids = append(ids, c.id)
		}
	}
	return ids
}

// containerCgroups are the cgroups with container processes: the pod's and
// those of containers whose spec put them elsewhere.
func (a *Agent) containerCgroups() []string {
	dirs := []string{a.podDir}
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, c := range a.containers {
		if rel, err := filepath.Rel(a.podDir, c.cgroup); err != nil || strings.HasPrefix(rel, "..") {
			dirs = append(dirs, c.cgroup)
		}
	}
	return dirs
}

func (a *Agent) stopAll(ctx context.Context, grace time.Duration) {
	dirs := a.containerCgroups()
	signalAll := func(sig unix.Signal) int {
		n := 0
		for _, d := range dirs {
			for _, pid := range cgroupProcs(d) {
				if pid != os.Getpid() && unix.Kill(pid, sig) == nil {
					n++
				}
			}
		}
		return n
	}
	busy := func() bool {
		for _, d := range dirs {
			if populated(d) {
				return true
			}
		}
		return false
	}
	n := signalAll(unix.SIGTERM)
	log.G(ctx).WithFields(log.Fields{"processes": n, "grace": grace}).Info("stopping the containers")
	deadline := time.Now().Add(grace)
	for busy() && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if busy() {
		for _, d := range dirs {
			// cgroup.kill kills the whole subtree at once (Linux 5.14).
			if err := os.WriteFile(filepath.Join(d, "cgroup.kill"), []byte("1"), 0); err != nil {
				signalAll(unix.SIGKILL)
			}
		}
		log.G(ctx).Warn("containers still running after the grace period: killed")
		for i := 0; i < 40 && busy(); i++ {
			time.Sleep(50 * time.Millisecond)
		}
	}
}
