// Package publisher forwards task events to containerd as a shim does,
// without ever making the caller wait for containerd.
//
// Publish only encodes the event and queues it; one goroutine forwards the
// queue to containerd's ttrpc events service, in order, as containerd's
// runc shim forwards its events channel (pkg/shim/publisher.go). An event
// that cannot be delivered (containerd restarting, or a wrong address) is
// retried with a backoff, head of line, so the order holds; the queue is
// bounded (the oldest events are dropped when it is full) and so is the
// age of an event (one older than MaxAge is dropped: containerd, once it
// is back, asks its tasks for their state and does not need old events).
// An event containerd refuses is dropped at once. A failing address is
// logged once, when delivery starts failing, and again when it works.
package publisher

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	eventsapi "github.com/containerd/containerd/api/services/ttrpc/events/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Options tune a Publisher; zero values take the defaults.
type Options struct {
	// QueueSize bounds the events waiting for delivery (4096).
	QueueSize int
	// MaxAge drops an event not delivered this long after it was
	// published (1m).
	MaxAge time.Duration
	// CallTimeout bounds one attempt to deliver an event (5s).
	CallTimeout time.Duration
	// MaxBackoff caps the wait between attempts (2s).
	MaxBackoff time.Duration
	// FlushTimeout bounds how long Close delivers what is queued, when
	// containerd is reachable (1s).
	FlushTimeout time.Duration
}

func (o *Options) defaults() {
	if o.QueueSize <= 0 {
		o.QueueSize = 4096
	}
	if o.MaxAge <= 0 {
		o.MaxAge = time.Minute
	}
	if o.CallTimeout <= 0 {
		o.CallTimeout = 5 * time.Second
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 2 * time.Second
	}
	if o.FlushTimeout <= 0 {
		o.FlushTimeout = time.Second
	}
}

const minBackoff = 50 * time.Millisecond

type item struct {
	env *types.Envelope
	at  time.Time
	seq uint64
}

// Publisher queues task events and forwards them to containerd.
type Publisher struct {
	address string
	opts    Options

	mu    sync.Mutex
	queue []item // queue[head:] waits, oldest first
	head  int
	seq   uint64 // of the last event queued
	// inflight is the seq of the event being delivered (0: none); a full
	// queue may drop it meanwhile.
	inflight uint64
	closed   bool
	failing  bool // delivery fails; logged once
	stats    Stats
	// overflowing is set while the queue is full (logged once per
	// episode).
	overflowing bool

	wake chan struct{}
	stop chan struct{}
	done chan struct{}
	// abort ends a delivery in flight: FlushTimeout after Close, or at
	// once while delivery fails.
	abort context.Context
	hard  context.CancelFunc

	client *ttrpc.Client // owned by the forwarding goroutine
}

// Stats count what became of the events.
type Stats struct {
	Delivered, Refused, DroppedFull, DroppedOld int64
}

// New forwards events to containerd's ttrpc address. Nothing is dialed
// until the first event; an address that exists but is no socket is
// logged now.
func New(address string, opts Options) *Publisher {
	opts.defaults()
	p := &Publisher{
		address: address,
		opts:    opts,
		wake:    make(chan struct{}, 1),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	p.abort, p.hard = context.WithCancel(context.Background())
	if fi, err := os.Stat(address); err == nil && fi.Mode()&os.ModeSocket == 0 {
		log.L.WithField("containerd_address", address).Errorf("containerd_address is not a socket (%s): task events cannot reach containerd", fi.Mode().Type())
	}
	go p.run()
	return p
}

// Publish queues an event of the namespace of ctx; it never waits for
// containerd.
func (p *Publisher) Publish(ctx context.Context, topic string, event any) error {
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return err
	}
	a, err := typeurl.MarshalAnyToProto(event)
	if err != nil {
		return fmt.Errorf("encode %s event: %w", topic, err)
	}
	now := time.Now()
	it := item{env: &types.Envelope{Timestamp: timestamppb.New(now), Namespace: ns, Topic: topic, Event: a}, at: now}
	p.mu.Lock()
	p.seq++
	it.seq = p.seq
	if p.closed {
		p.mu.Unlock()
		return errors.New("event publisher closed")
	}
	if len(p.queue)-p.head >= p.opts.QueueSize {
		// Drop the oldest (the one being delivered may still arrive, and
		// is counted then).
		if p.queue[p.head].seq != p.inflight {
			p.stats.DroppedFull++
		}
		p.head++
		if !p.overflowing {
			p.overflowing = true
			log.L.WithFields(log.Fields{"containerd_address": p.address, "queue_size": p.opts.QueueSize}).Warn("task event queue full: dropping the oldest events until containerd takes them")
		}
	}
	if p.head > len(p.queue)/2 && p.head > 64 {
		p.queue = append(p.queue[:0], p.queue[p.head:]...)
		p.head = 0
	}
	p.queue = append(p.queue, it)
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
	return nil
}

// Stats returns what became of the events so far.
func (p *Publisher) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stats
}

// Queued is how many events wait for delivery.
func (p *Publisher) Queued() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.queue) - p.head
}

// Close stops forwarding. While containerd is reachable it first delivers
// what is queued, for at most FlushTimeout; what is left is dropped.
func (p *Publisher) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		<-p.done
		return nil
	}
	p.closed = true
	failing := p.failing
	p.mu.Unlock()
	close(p.stop)
	if failing {
		p.hard()
	}
	t := time.AfterFunc(p.opts.FlushTimeout, p.hard)
	defer t.Stop()
	<-p.done
	p.hard()
	return nil
}

// peek returns the oldest queued event, dropping those too old first.
func (p *Publisher) peek(now time.Time) (item, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	old := 0
	for p.head < len(p.queue) && now.Sub(p.queue[p.head].at) > p.opts.MaxAge {
		p.head++
		old++
	}
	if old > 0 {
		p.stats.DroppedOld += int64(old)
		log.L.WithFields(log.Fields{"containerd_address": p.address, "events": old, "max_age": p.opts.MaxAge}).Warn("dropped task events containerd did not take in time")
	}
	if p.head == len(p.queue) {
		p.queue, p.head = p.queue[:0], 0
		p.overflowing = false
		p.inflight = 0
		return item{}, false
	}
	p.inflight = p.queue[p.head].seq
	return p.queue[p.head], true
}

// pop removes an event once it is delivered or refused, unless the full
// queue dropped it meanwhile.
func (p *Publisher) pop(it item, delivered bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.head < len(p.queue) && p.queue[p.head].seq == it.seq {
		p.head++
	}
	p.inflight = 0
	if delivered {
		p.stats.Delivered++
	} else {
		p.stats.Refused++
	}
}

func (p *Publisher) run() {
	defer close(p.done)
	defer func() {
		if p.client != nil {
			p.client.Close()
		}
	}()
	backoff := minBackoff
	var flushBy time.Time
	for {
		it, ok := p.peek(time.Now())
		if !ok {
			select {
			case <-p.wake:
				continue
			case <-p.stop:
				return
			}
		}
		select {
		case <-p.stop:
			if flushBy.IsZero() {
				if p.isFailing() {
					p.dropRest("containerd is unreachable")
					return
				}
				flushBy = time.Now().Add(p.opts.FlushTimeout)
			}
		default:
		}
		if !flushBy.IsZero() && (time.Now().After(flushBy) || p.abort.Err() != nil) {
			p.dropRest("the publisher closed")
			return
		}
		err := p.forward(it.env)
		switch {
		case err == nil:
			p.pop(it, true)
			p.recovered()
			backoff = minBackoff
			continue
		case refused(err):
			// containerd answered: sending it again changes nothing.
			p.pop(it, false)
			p.recovered()
			log.L.WithError(err).WithFields(log.Fields{"topic": it.env.Topic, "namespace": it.env.Namespace}).Warn("containerd refused a task event; dropped")
			continue
		}
		p.failed(err)
		if !flushBy.IsZero() {
			p.dropRest("containerd is unreachable")
			return
		}
		select {
		case <-time.After(backoff):
		case <-p.stop:
		}
		backoff = min(backoff*2, p.opts.MaxBackoff)
	}
}

// forward delivers one event on the connection, dialing it first.
func (p *Publisher) forward(env *types.Envelope) error {
	if p.client == nil {
		c, err := net.DialTimeout("unix", p.address, time.Second)
		if err != nil {
			return err
		}
		p.client = ttrpc.NewClient(c)
	}
	ctx, cancel := context.WithTimeout(p.abort, p.opts.CallTimeout)
	defer cancel()
	_, err := eventsapi.NewTTRPCEventsClient(p.client).Forward(ctx, &eventsapi.ForwardRequest{Envelope: env})
	if err != nil && !refused(err) {
		// A broken or hung connection: dial again next time.
		p.client.Close()
		p.client = nil
	}
	return err
}

// refused reports whether containerd answered the call with an error of
// its own, rather than not answering it.
func refused(err error) bool {
	if errors.Is(err, ttrpc.ErrClosed) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return false
	}
	st, ok := status.FromError(err)
	if !ok {
		return false // a dial or transport error
	}
	switch st.Code() {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled, codes.Unknown:
		return false
	}
	return true
}

func (p *Publisher) isFailing() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.failing
}

// failed logs the first failure of a run of them.
func (p *Publisher) failed(err error) {
	p.mu.Lock()
	first := !p.failing
	p.failing = true
	queued := len(p.queue) - p.head
	p.mu.Unlock()
	if first {
		log.L.WithError(err).WithFields(log.Fields{"containerd_address": p.address, "queued": queued}).
			Error("cannot forward task events to containerd: is containerd running, and is containerd_address its ttrpc socket? The events are queued and retried; no call waits for them")
	}
}

// recovered logs the end of a run of failures.
func (p *Publisher) recovered() {
	p.mu.Lock()
	was := p.failing
	p.failing = false
	st, queued := p.stats, len(p.queue)-p.head
	p.mu.Unlock()
	if was {
		log.L.WithFields(log.Fields{
			"containerd_address": p.address, "queued": queued,
			"dropped_full": st.DroppedFull, "dropped_old": st.DroppedOld,
		}).Info("forwarding task events to containerd again")
	}
}

// dropRest drops what is queued when the publisher closes.
func (p *Publisher) dropRest(why string) {
	p.mu.Lock()
	n := len(p.queue) - p.head
	p.queue, p.head = nil, 0
	p.mu.Unlock()
	if n > 0 {
		log.L.WithFields(log.Fields{"containerd_address": p.address, "events": n}).Warnf("dropped the queued task events: %s", why)
	}
}
