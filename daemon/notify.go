package daemon

import (
	"context"

	"github.com/containerd/log"
	sd "github.com/coreos/go-systemd/v22/daemon"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/periodic"
)

// notify sends a state to systemd; without NOTIFY_SOCKET it does nothing.
func notify(ctx context.Context, state string) {
	sent, err := sd.SdNotify(false, state)
	if err != nil {
		log.G(ctx).WithError(err).WithField("state", state).Warn("notify systemd")
		return
	}
	log.G(ctx).WithFields(log.Fields{"state": state, "notified": sent}).Debug("notify systemd")
}

// watchdog pings systemd's watchdog at half its interval until ctx ends,
// when the unit sets WatchdogSec.
func watchdog(ctx context.Context) {
	interval, err := sd.SdWatchdogEnabled(false)
	if err != nil || interval <= 0 {
		return
	}
	periodic.Run(ctx, interval/2, func() { notify(ctx, sd.SdNotifyWatchdog) })
}
