package sandboxer

import (
	"context"
	"path/filepath"
	"slices"
	"time"

	"github.com/containerd/log"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/periodic"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/statefile"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// UsageFile, beside resource_info.json, holds a ready sandbox's last
// measured usage, with the limits it exceeds and those not enforced.
const UsageFile = "usage.json"

// RunMonitor samples the usage of every ready sandbox each interval until
// ctx ends: it writes usage.json and logs the limits a sandbox starts or
// stops exceeding.
func (c *Controller) RunMonitor(ctx context.Context, interval time.Duration) {
	if interval <= 0 {
		return
	}
	last := map[string][]string{}
	periodic.Run(ctx, interval, func() {
		seen := map[string]bool{}
		for _, v := range c.List() {
			if v.State.Phase != PhaseReady {
				continue
			}
			id := v.State.ID
			seen[id] = true
			sctx := log.WithLogger(ctx, log.G(ctx).WithField("sandbox", id))
			u, _, err := c.Usage(sctx, id)
			if err != nil {
				log.G(sctx).WithError(err).Debug("sample usage")
				continue
			}
			c.writeUsage(sctx, id, u)
			if !slices.Equal(u.Violations, last[id]) {
				if len(u.Violations) > 0 {
					log.G(sctx).WithField("violations", u.Violations).Warn("sandbox exceeds its limits")
				} else {
					log.G(sctx).Info("sandbox is back within its limits")
				}
				last[id] = u.Violations
			}
		}
		for id := range last {
			if !seen[id] {
				delete(last, id)
			}
		}
	})
}

// writeUsage replaces usage.json; it is derived and rewritten each sample,
// so it is not synced.
func (c *Controller) writeUsage(ctx context.Context, id string, u resourceinfo.Usage) {
	sb, unlock, err := c.lock(id)
	if err != nil {
		return // removed meanwhile
	}
	defer unlock()
	data, err := statefile.EncodeJSON(u)
	if err == nil {
		err = statefile.Replace(c.Dir(sb.id), UsageFile, data)
	}
	if err != nil {
		log.G(ctx).WithError(err).Warn("write " + filepath.Join(c.Dir(sb.id), UsageFile))
	}
}
