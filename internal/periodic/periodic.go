// Package periodic runs background work on a ticker: the daemon's
// watchdog pings, its collection of created sandboxes and its usage
// monitor all share this loop.
package periodic

import (
	"context"
	"time"
)

// Run calls fn every interval, the first time one interval after Run is
// called, until ctx ends. A call that outlasts the interval delays the next
// one rather than overlapping it.
func Run(ctx context.Context, interval time.Duration, fn func()) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fn()
		}
	}
}
