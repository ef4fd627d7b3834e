package publisher

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	eventsapi "github.com/containerd/containerd/api/services/ttrpc/events/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/testenv"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/emptypb"
)

// sink is containerd's ttrpc events service: it records what it is sent.
type sink struct {
	mu     sync.Mutex
	got    []string // container IDs, in order
	refuse func(id string) error
	hang   chan struct{} // when set, Forward waits on it
}

func (s *sink) Forward(ctx context.Context, r *eventsapi.ForwardRequest) (*emptypb.Empty, error) {
	if s.hang != nil {
		select {
		case <-s.hang:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	v, err := typeurl.UnmarshalAny(r.Envelope.Event)
	if err != nil {
		return nil, err
	}
	id := v.(*eventstypes.TaskStart).ContainerID
	if s.refuse != nil {
		if err := s.refuse(id); err != nil {
			return nil, err
		}
	}
	s.mu.Lock()
	s.got = append(s.got, r.Envelope.Namespace+"/"+id)
	s.mu.Unlock()
	return &emptypb.Empty{}, nil
}

func (s *sink) ids() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.got...)
}

// serveSink serves s on sock until the test ends.
func serveSink(t *testing.T, sock string, s *sink) {
	t.Helper()
	srv, err := ttrpc.NewServer()
	require.NoError(t, err)
	eventsapi.RegisterTTRPCEventsService(srv, s)
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	go srv.Serve(context.Background(), l)
	t.Cleanup(func() { srv.Close() })
}

func publishN(t *testing.T, p *Publisher, from, n int) {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	for i := from; i < from+n; i++ {
		require.NoError(t, p.Publish(ctx, "/tasks/start", &eventstypes.TaskStart{ContainerID: fmt.Sprint(i)}))
	}
}

func want(from, n int) []string {
	var out []string
	for i := from; i < from+n; i++ {
		out = append(out, fmt.Sprintf("k8s.io/%d", i))
	}
	return out
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func sock(t *testing.T) string { return filepath.Join(t.TempDir(), "events.sock") }

func TestDeliversInOrder(t *testing.T) {
	addr := sock(t)
	s := &sink{}
	serveSink(t, addr, s)
	p := New(addr, Options{})
	publishN(t, p, 0, 500)
	waitFor(t, "the events", func() bool { return len(s.ids()) == 500 })
	assert.Equal(t, want(0, 500), s.ids())
	require.NoError(t, p.Close())
	assert.Equal(t, Stats{Delivered: 500}, p.Stats())
	assert.Error(t, p.Publish(namespaces.WithNamespace(context.Background(), "k8s.io"), "/tasks/start", &eventstypes.TaskStart{}))
}

func TestNamespaceRequired(t *testing.T) {
	p := New(sock(t), Options{})
	defer p.Close()
	assert.Error(t, p.Publish(context.Background(), "/tasks/start", &eventstypes.TaskStart{}))
}

// TestUnreachable: with nothing at the address, Publish returns at once
// (the calls complete; how fast is the benchmarks' business), the failure
// is logged once with the address, and when containerd comes up the
// queued events reach it, in order.
func TestUnreachable(t *testing.T) {
	logs := testenv.CaptureLog(t)
	addr := sock(t)
	p := New(addr, Options{MaxBackoff: 50 * time.Millisecond})
	defer p.Close()
	publishN(t, p, 0, 100)
	waitFor(t, "the failure to be logged", func() bool { return strings.Contains(logs.String(), "cannot forward task events") })
	publishN(t, p, 100, 100)
	time.Sleep(200 * time.Millisecond) // more failed attempts
	assert.Equal(t, 1, strings.Count(logs.String(), "cannot forward task events"), "logged once")
	assert.Contains(t, logs.String(), addr)
	assert.Equal(t, 200, p.Queued())

	s := &sink{}
	serveSink(t, addr, s)
	waitFor(t, "the queued events", func() bool { return len(s.ids()) == 200 })
	assert.Equal(t, want(0, 200), s.ids())
	waitFor(t, "the recovery to be logged", func() bool { return strings.Contains(logs.String(), "forwarding task events to containerd again") })
}

// TestHungContainerd: a containerd that accepts and never answers holds
// no Publish; the queue is bounded, the oldest events go first.
func TestHungContainerd(t *testing.T) {
	addr := sock(t)
	s := &sink{hang: make(chan struct{})}
	serveSink(t, addr, s)
	p := New(addr, Options{QueueSize: 50, CallTimeout: 100 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
	defer p.Close()
	publishN(t, p, 0, 1000)
	assert.LessOrEqual(t, p.Queued(), 50)
	assert.GreaterOrEqual(t, p.Stats().DroppedFull, int64(950-1))
	close(s.hang)
	waitFor(t, "the queued events", func() bool { return p.Queued() == 0 })
	// What reaches containerd is the one in flight when the queue
	// overflowed (an older one), then the newest, in order.
	got := s.ids()
	require.Len(t, got, 51)
	first, err := strconv.Atoi(strings.TrimPrefix(got[0], "k8s.io/"))
	require.NoError(t, err)
	assert.Less(t, first, 950)
	assert.Equal(t, want(950, 50), got[1:])
	assert.Equal(t, Stats{Delivered: 51, DroppedFull: 949}, p.Stats())
}

// TestOldEventsDropped: an event containerd does not take within MaxAge
// is dropped.
func TestOldEventsDropped(t *testing.T) {
	addr := sock(t)
	p := New(addr, Options{MaxAge: 100 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
	defer p.Close()
	publishN(t, p, 0, 10)
	waitFor(t, "the old events to be dropped", func() bool { return p.Stats().DroppedOld == 10 })
	s := &sink{}
	serveSink(t, addr, s)
	publishN(t, p, 10, 5)
	waitFor(t, "the new events", func() bool { return len(s.ids()) == 5 })
	assert.Equal(t, want(10, 5), s.ids())
}

// TestRefusedDropped: an event containerd refuses is not sent again and
// does not hold the next ones.
func TestRefusedDropped(t *testing.T) {
	addr := sock(t)
	s := &sink{refuse: func(id string) error {
		if id == "1" {
			return errgrpc.ToGRPCf(errdefs.ErrInvalidArgument, "bad event")
		}
		return nil
	}}
	serveSink(t, addr, s)
	p := New(addr, Options{})
	publishN(t, p, 0, 3)
	waitFor(t, "the events", func() bool { return len(s.ids()) == 2 })
	require.NoError(t, p.Close())
	assert.Equal(t, []string{"k8s.io/0", "k8s.io/2"}, s.ids())
	assert.Equal(t, Stats{Delivered: 2, Refused: 1}, p.Stats())
}

// TestCloseUnreachable: Close does not wait for an unreachable containerd.
func TestCloseUnreachable(t *testing.T) {
	p := New(sock(t), Options{MaxBackoff: time.Hour, FlushTimeout: time.Hour})
	publishN(t, p, 0, 10)
	waitFor(t, "a failed attempt", p.isFailing)
	done := make(chan struct{})
	go func() { p.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close waited for containerd")
	}
}

// TestNotASocket: an address that is no socket is logged at start.
func TestNotASocket(t *testing.T) {
	logs := testenv.CaptureLog(t)
	f := filepath.Join(t.TempDir(), "file")
	require.NoError(t, os.WriteFile(f, nil, 0o600))
	p := New(f, Options{})
	defer p.Close()
	assert.Contains(t, logs.String(), "containerd_address is not a socket")
}

// TestCloseHung: Close waits for a delivery in flight to a containerd
// that does not answer no longer than FlushTimeout, not CallTimeout.
func TestCloseHung(t *testing.T) {
	addr := sock(t)
	s := &sink{hang: make(chan struct{})}
	defer close(s.hang)
	serveSink(t, addr, s)
	p := New(addr, Options{CallTimeout: time.Hour, FlushTimeout: 10 * time.Millisecond})
	publishN(t, p, 0, 3)
	done := make(chan struct{})
	go func() { p.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close waited for the delivery in flight")
	}
	assert.Equal(t, int64(0), p.Stats().Delivered)
}
