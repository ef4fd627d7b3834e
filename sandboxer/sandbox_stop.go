package sandboxer

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/log"
)

// Stop stops a sandbox. Stopping a stopped sandbox succeeds: kubelet calls
// StopPodSandbox repeatedly and CRI requires it to be idempotent.
func (c *Controller) Stop(ctx context.Context, id string, opts ...sandbox.StopOpt) error {
	var so sandbox.StopOptions
	for _, opt := range opts {
		opt(&so)
	}
	timeout := c.opts.StopTimeout
	if so.Timeout != nil && *so.Timeout > 0 {
		timeout = *so.Timeout
	}
	sb, unlock, err := c.lock(id)
	if err != nil {
		return err
	}
	defer unlock()
	return c.stopLocked(ctx, sb, timeout, 0)
}

// stopLocked moves a sandbox to stopped with the given exit status.
func (c *Controller) stopLocked(ctx context.Context, sb *sandboxEntry, timeout time.Duration, code uint32) error {
	cur := sb.snap.Load().state
	switch cur.Phase {
	case PhaseStopped:
		return nil
	case PhaseReady:
		if err := c.opts.Backend.Stop(ctx, sb.id, timeout); err != nil {
			return fmt.Errorf("%s backend: stop sandbox %s: %w", c.Mode(), sb.id, err)
		}
	}
	if err := c.markStopped(sb, code, c.opts.Now()); err != nil {
		return err
	}
	log.G(ctx).WithField("exit_status", code).Info("sandbox stopped")
	return nil
}

// markStopped records that a sandbox stopped at the given time with the
// given exit status: its tasks end, its allocation is released and its
// waiters return. The caller holds the sandbox's operation lock.
func (c *Controller) markStopped(sb *sandboxEntry, code uint32, at time.Time) error {
	snap := sb.snap.Load()
	st := snap.state.clone()
	at = at.UTC()
	st.Phase, st.ExitedAt, st.ExitStatus, st.Pid = PhaseStopped, &at, code, 0
	st.Ledger.close(snap.info.Allocation(), at, false)
	stopTasks(st, at)
	if err := c.commit(sb, st); err != nil {
		return err
	}
	sb.unknown.Store(false)
	c.opts.Admitter.Release(sb.id)
	sb.closeOnce.Do(func() { close(sb.exited) })
	c.notifyTasks(sb.id)
	return nil
}

// stopTasks ends the processes of a stopping sandbox as SIGKILL would.
func stopTasks(st *State, at time.Time) {
	for _, ctr := range st.Containers {
		t := ctr.Task
		if t == nil {
			continue
		}
		if t.Status != TaskStopped {
			t.Status, t.ExitStatus, t.ExitedAt = TaskStopped, exitCodeKilled, &at
		}
		for _, e := range t.Execs {
			if e.Status != TaskStopped {
				e.Status, e.ExitStatus, e.ExitedAt = TaskStopped, exitCodeKilled, &at
			}
		}
	}
}

// exitCodeKilled is the exit status of a process killed by SIGKILL.
const exitCodeKilled = 128 + 9

// notifyTasks tells the task server that the tasks of a sandbox changed
// outside the task API (the sandbox stopped, exited or was removed).
func (c *Controller) notifyTasks(sandboxID string) {
	if fn := c.taskHook.Load(); fn != nil {
		(*fn)(sandboxID)
	}
}

// exitFunc is how a backend reports that a sandbox stopped by itself.
func (c *Controller) exitFunc(sb *sandboxEntry) ExitFunc {
	return func(code uint32, at time.Time) {
		go func() {
			ctx := log.WithLogger(context.Background(), log.L.WithField("sandbox", sb.id))
			sb.op.Lock()
			defer sb.op.Unlock()
			if sb.gone || sb.snap.Load().state.Phase != PhaseReady {
				return
			}
			if err := c.markStopped(sb, code, at); err != nil {
				log.G(ctx).WithError(err).Error("record sandbox exit")
				return
			}
			log.G(ctx).WithField("exit_status", code).Warn("sandbox exited unexpectedly")
		}()
	}
}
