package guest

import (
	"context"
	"sync"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
)

// DefaultEventQueueSize bounds the events kept for the host.
const DefaultEventQueueSize = 4096

// eventQueue is the task service's publisher (shim.Publisher): it keeps
// every event, numbered, until the host acknowledges it (Events.after), so
// that exits and OOM kills that happen while no host is connected are
// delivered when one comes back. It is bounded: when full it drops the
// oldest event that is neither an exit nor an OOM kill (the oldest of all
// when there is none), and counts what it dropped.
type eventQueue struct {
	// nsOf names the containerd namespace of a container (its task
	// service events carry none).
	nsOf func(containerID string) string
	max  int

	mu      sync.Mutex
	seq     uint64
	items   []*api.Event
	dropped uint64
	wake    chan struct{} // closed and renewed when an event arrives
	acked   chan struct{} // closed and renewed when the host releases events
	pushed  time.Time     // when the last event arrived
	// awaiting are containers whose init exit a powering-off guest
	// waits to publish (expect).
	awaiting map[string]bool
}

func newEventQueue(max int, nsOf func(string) string) *eventQueue {
	if max <= 0 {
		max = DefaultEventQueueSize
	}
	return &eventQueue{nsOf: nsOf, max: max, wake: make(chan struct{}), acked: make(chan struct{})}
}

// Publish implements events.Publisher. It never blocks.
func (q *eventQueue) Publish(ctx context.Context, topic string, event events.Event) error {
	a, err := typeurl.MarshalAnyToProto(event)
	if err != nil {
		return err
	}
	if e, ok := event.(*eventstypes.TaskExit); ok && e.ID == e.ContainerID {
		q.mu.Lock()
		delete(q.awaiting, e.ContainerID)
		q.mu.Unlock()
	}
	ns, _ := namespaces.Namespace(ctx)
	if ns == "" && q.nsOf != nil {
		if c, ok := event.(interface{ GetContainerID() string }); ok {
			ns = q.nsOf(c.GetContainerID())
		}
	}
	q.push(&api.Event{
		Timestamp: protobuf.ToTimestamp(time.Now()),
		Namespace: ns,
		Topic:     topic,
		Event:     a,
	})
	return nil
}

// Close implements io.Closer (shim.Publisher); the queue stays usable: the
// task service closes its publisher only when it shuts down.
func (q *eventQueue) Close() error { return nil }

func mustKeep(topic string) bool {
	return topic == runtime.TaskExitEventTopic || topic == runtime.TaskOOMEventTopic
}

func (q *eventQueue) push(e *api.Event) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.seq++
	e.Seq = q.seq
	if len(q.items) >= q.max {
		drop := 0
		for i, it := range q.items {
			if !mustKeep(it.Topic) {
				drop = i
				break
			}
		}
		d := q.items[drop]
		q.items = append(q.items[:drop], q.items[drop+1:]...)
		q.dropped++
		if q.dropped == 1 || q.dropped%100 == 0 {
			log.L.WithFields(log.Fields{"topic": d.Topic, "seq": d.Seq, "dropped": q.dropped}).
				Warn("event queue full (no host for a long time): dropped the oldest event")
		}
	}
	q.items = append(q.items, e)
	q.pushed = time.Now()
	close(q.wake)
	q.wake = make(chan struct{})
}

// get releases the events up to after and returns up to max of those after
// it, waiting up to wait for one.
func (q *eventQueue) get(ctx context.Context, after uint64, max int, wait time.Duration) []*api.Event {
	var timer <-chan time.Time
	if wait > 0 {
		t := time.NewTimer(wait)
		defer t.Stop()
		timer = t.C
	}
	for {
		q.mu.Lock()
		i := 0
		for i < len(q.items) && q.items[i].Seq <= after {
			i++
		}
		if i > 0 {
			q.items = append(q.items[:0], q.items[i:]...)
			close(q.acked)
			q.acked = make(chan struct{})
		}
		if len(q.items) > 0 {
			n := min(len(q.items), max)
			out := append([]*api.Event(nil), q.items[:n]...)
			q.mu.Unlock()
			return out
		}
		wake := q.wake
		q.mu.Unlock()
		if timer == nil {
			return nil
		}
		select {
		case <-wake:
		case <-timer:
			return nil
		case <-ctx.Done():
			return nil
		}
	}
}

// expect makes settle wait for the init exits of these containers too.
func (q *eventQueue) expect(containerIDs []string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.awaiting = map[string]bool{}
	for _, id := range containerIDs {
		q.awaiting[id] = true
	}
}

// settle waits until the exits expect named are published, the host has
// released every event and none has arrived for quiet, or until limit
// passes: a guest that powers off gives the host its containers' last
// exits first, without waiting on a host that does not ask.
func (q *eventQueue) settle(quiet, limit time.Duration) bool {
	deadline := time.Now().Add(limit)
	for {
		q.mu.Lock()
		pending, acked, wake := len(q.items), q.acked, q.wake
		idle := time.Since(q.pushed)
		exits := len(q.awaiting)
		q.mu.Unlock()
		if exits == 0 && pending == 0 && idle >= quiet {
			return true
		}
		left := time.Until(deadline)
		if left <= 0 {
			return false
		}
		wait := left
		if exits == 0 && pending == 0 {
			wait = min(left, quiet-idle)
		}
		t := time.NewTimer(wait)
		select {
		case <-acked:
		case <-wake:
		case <-t.C:
		}
		t.Stop()
	}
}

// stats reports the last sequence number, the events kept and dropped.
func (q *eventQueue) stats() (seq uint64, kept int, dropped uint64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.seq, len(q.items), q.dropped
}
