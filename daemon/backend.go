package daemon

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/log"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
	"github.com/kuasar-io/resource-slot-sandboxer/config"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
	"github.com/kuasar-io/resource-slot-sandboxer/vmm"
)

// newBackend builds the backend of the configured mode.
func newBackend(ctx context.Context, cfg config.Config) (sandboxer.Backend, error) {
	switch cfg.Mode {
	case "slot":
		return slot.New(), nil
	case "vm":
		v := cfg.VM
		b, err := vmm.New(ctx, vmm.Config{
			Socket:        v.LibvirtSocket,
			GuestDir:      v.GuestDir,
			Accel:         v.Accel,
			DefaultVCPUs:  v.DefaultVCPUs,
			DefaultMemory: int64(v.DefaultMemory),
			GuestOverhead: int64(v.GuestOverhead),
			QEMUOverhead:  int64(v.QEMUOverhead),
			MaxVCPUs:      v.MaxVCPUs,
			MaxMemory:     int64(v.MaxMemory),
			Network:       v.Network,
		}, vmm.Options{ReadyTimeout: time.Duration(v.ReadyTimeout)})
		if err != nil {
			return nil, fmt.Errorf("vm backend: %w", err)
		}
		// TRANSITIONAL: until the vm backend runs containers in its guest,
		// its containers are the slot simulation's.
		return vmWithSimulatedContainers{b, slot.New()}, nil
	default:
		return nil, fmt.Errorf("unknown mode %q", cfg.Mode)
	}
}

// vmWithSimulatedContainers is TRANSITIONAL: the vm backend's sandboxes
// with the slot simulation's containers.
type vmWithSimulatedContainers struct {
	*vmm.Backend
	sim *slot.Backend
}

func (b vmWithSimulatedContainers) Containers(ev backend.Events) backend.Containers {
	return b.sim.Containers(ev)
}

// cleanupOrphans removes what the backend holds for sandboxes that the
// recovered state does not know (a crash between the backend's create and
// the state's commit, or a removed state directory).
func cleanupOrphans(ctx context.Context, b sandboxer.Backend, ctrl *sandboxer.Controller) {
	known := map[string]bool{}
	for _, v := range ctrl.List() {
		known[v.State.ID] = true
	}
	removed, err := b.Cleanup(ctx, known)
	if err != nil {
		log.G(ctx).WithError(err).Warn("clean up orphans of the backend")
	}
	if len(removed) > 0 {
		log.G(ctx).WithField("sandboxes", removed).Warn("removed what the backend held for unknown sandboxes")
	}
}
