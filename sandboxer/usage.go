package sandboxer

import (
	"context"
	"fmt"

	"github.com/containerd/errdefs"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// Usage is what a ready sandbox uses now, as its backend reports it, and
// where that comes from (resourceinfo.UsageSimulated or UsageMeasured). A
// sandbox that is not ready uses nothing and has no usage:
// FailedPrecondition.
func (c *Controller) Usage(ctx context.Context, id string) (resourceinfo.Usage, string, error) {
	sb, err := c.get(id)
	if err != nil {
		return resourceinfo.Usage{}, "", err
	}
	if st := sb.snap.Load().state; st.Phase != PhaseReady {
		return resourceinfo.Usage{}, "", fmt.Errorf("sandbox %s is %s, not ready: %w", id, st.Phase, errdefs.ErrFailedPrecondition)
	}
	u, err := c.opts.Backend.Usage(ctx, id)
	return u, u.Source, err
}
