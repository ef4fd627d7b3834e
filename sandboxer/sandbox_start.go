package sandboxer

import (
	"context"
	"fmt"
	goruntime "runtime"
	"time"

	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	imagespec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// Start runs a created sandbox and returns the task API address.
func (c *Controller) Start(ctx context.Context, id string) (sandbox.ControllerInstance, error) {
	sb, unlock, err := c.lock(id)
	if err != nil {
		return sandbox.ControllerInstance{}, err
	}
	defer unlock()
	cur := sb.snap.Load().state
	if cur.Phase != PhaseCreated {
		return sandbox.ControllerInstance{}, fmt.Errorf("sandbox %s is %s, not created: %w", id, cur.Phase, errdefs.ErrFailedPrecondition)
	}
	pid, err := c.opts.Backend.Start(ctx, id, c.exitFunc(sb))
	if err != nil {
		err = fmt.Errorf("%s backend: start sandbox %s: %w", c.Mode(), id, err)
		c.rollbackStart(ctx, sb, err)
		return sandbox.ControllerInstance{}, err
	}
	st := cur.clone()
	now := c.opts.Now().UTC()
	st.Phase, st.StartedAt, st.Pid = PhaseReady, &now, pid
	st.Ledger.close(resourceinfo.Allocation{}, now, true)
	// Durable, and with it the create before it (see commit).
	if err := c.commit(sb, st); err != nil {
		if serr := c.opts.Backend.Stop(context.WithoutCancel(ctx), id, 0); serr != nil {
			log.G(ctx).WithError(serr).Warn("stop sandbox whose start could not be saved")
		}
		return sandbox.ControllerInstance{}, err
	}
	log.G(ctx).WithField("pid", pid).Info("sandbox started")
	return sandbox.ControllerInstance{
		SandboxID: id,
		Pid:       pid,
		CreatedAt: st.CreatedAt,
		Address:   c.opts.TaskAddress,
		Version:   TaskAPIVersion,
		Labels:    map[string]string{"mode": c.Mode()},
	}, nil
}

// startCleanupTimeout bounds the removal of a sandbox whose start failed.
const startCleanupTimeout = 2 * time.Minute

// rollbackStart removes a sandbox whose start failed, with everything the
// backend holds for it (a VM's domain, disk and files). containerd's CRI
// asks for no ShutdownSandbox after a failed StartSandbox (its rollback
// is registered after the start succeeds) and forgets the sandbox: kept,
// it would stay until CollectCreated. The start's context is often what
// ended it (a client that gave up while a VM booted), so the removal has
// a context of its own. A later Shutdown of the ID is NotFound, which
// containerd takes for done. When the removal fails the sandbox stays
// created, for a Shutdown or the collector.
func (c *Controller) rollbackStart(ctx context.Context, sb *sandboxEntry, cause error) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), startCleanupTimeout)
	defer cancel()
	if err := c.shutdownLocked(cctx, sb); err != nil {
		log.G(ctx).WithError(err).WithField("start_error", cause.Error()).Warn("remove sandbox that failed to start; it stays created")
		return
	}
	log.G(ctx).WithField("start_error", cause.Error()).Info("sandbox that failed to start removed")
}

// Platform is the platform the sandbox's containers run on.
func (c *Controller) Platform(_ context.Context, id string) (imagespec.Platform, error) {
	if _, err := c.get(id); err != nil {
		return imagespec.Platform{}, err
	}
	return imagespec.Platform{OS: goruntime.GOOS, Architecture: goruntime.GOARCH}, nil
}
