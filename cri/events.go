package cri

import (
	"context"

	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
)

// FilterEvents wraps the publisher of task events (to containerd) so that
// the events of the containers of this service are dropped: containerd
// does not know these containers and nothing there wants their events
// (they would only fill the publisher's queue when no containerd runs).
// p may be nil.
func FilterEvents(p sandboxer.Publisher) sandboxer.Publisher {
	if p == nil {
		return nil
	}
	return eventFilter{p}
}

type eventFilter struct{ sandboxer.Publisher }

func (f eventFilter) Publish(ctx context.Context, topic string, event any) error {
	if ns, _ := namespaces.Namespace(ctx); ns == Namespace {
		return nil
	}
	return f.Publisher.Publish(ctx, topic, event)
}
