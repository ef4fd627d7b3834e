package vmm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"

	"google.golang.org/grpc/status"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
)

// Dialer connects to a sandbox's guest agent. The connection it returns has
// completed the handshake (agent/transport.SerialDialer over the agent's
// virtio-serial port; VsockDialer where the host has vsock).
type Dialer interface {
	Dial(ctx context.Context) (net.Conn, error)
}

// Bounds of the calls to a guest. A guest that does not answer within them
// fails the call with Unavailable or DeadlineExceeded; it never blocks a
// call for another sandbox. (Variables for tests.)
var (
	// connectWait is how long a call waits for a guest that is not
	// connected (a reconnection in the background).
	connectWait = 10 * time.Second
	// callTimeout bounds an ordinary call: kubelet's default
	// runtime-request-timeout, since runc in a TCG guest on a busy host
	// can take tens of seconds to start a process.
	callTimeout = 2 * time.Minute
	// pollWait is how long a long poll (Events, ReadStdio) waits in the
	// guest; the call itself gets pollWait + callTimeout.
	pollWait = 5 * time.Second
	// reconnectMin and reconnectMax bound the pause between dials.
	reconnectMin = 100 * time.Millisecond
	reconnectMax = 2 * time.Second
)

// guestConn is the host's connection to one sandbox's agent. A goroutine
// (run) keeps it connected: it dials, says hello (Info), runs onConnect,
// and dials again when the connection breaks, until its context ends.
// Calls take the current clients with clients(), waiting a bounded time
// for a connection.
type guestConn struct {
	id     string
	dialer Dialer
	// onConnect runs after every (re)connection, in its own goroutine,
	// with the connection's clients (reconciles the containers' states).
	onConnect func(ctx context.Context, task taskAPI.TTRPCTaskService, agent api.AgentService, info *api.InfoResponse)

	mu     sync.Mutex
	client *ttrpc.Client
	task   taskAPI.TTRPCTaskService
	agent  api.AgentService
	info   *api.InfoResponse
	// up is closed while a connection is up; a new one is made when it
	// breaks.
	up  chan struct{}
	err error // why the last attempt failed, for errors
}

func newGuestConn(id string, d Dialer) *guestConn {
	return &guestConn{id: id, dialer: d, up: make(chan struct{})}
}

// run keeps the guest connected until ctx ends, then closes the
// connection.
func (g *guestConn) run(ctx context.Context) {
	logger := log.G(ctx).WithField("sandbox", g.id)
	pause := reconnectMin
	for ctx.Err() == nil {
		client, broken, err := g.connect(ctx)
		if err != nil {
			g.mu.Lock()
			g.err = err
			g.mu.Unlock()
			if ctx.Err() != nil {
				break
			}
			logger.WithError(err).Debug("guest agent not reachable; retrying")
			select {
			case <-ctx.Done():
			case <-time.After(pause):
			}
			pause = min(pause*2, reconnectMax)
			continue
		}
		pause = reconnectMin
		select {
		case <-ctx.Done():
		case <-broken:
			logger.Info("connection to the guest agent closed; reconnecting")
		}
		g.mu.Lock()
		if g.client == client {
			g.client, g.task, g.agent = nil, nil, nil
			g.up = make(chan struct{})
		}
		g.mu.Unlock()
		client.Close()
	}
}

// connect dials, says hello, and publishes the clients.
func (g *guestConn) connect(ctx context.Context) (*ttrpc.Client, chan struct{}, error) {
	conn, err := g.dialer.Dial(ctx)
	if err != nil {
		return nil, nil, err
	}
	broken := make(chan struct{})
	var once sync.Once
	client := ttrpc.NewClient(conn, ttrpc.WithOnClose(func() { once.Do(func() { close(broken) }) }))
	agent := api.NewAgentClient(client)
	task := taskAPI.NewTTRPCTaskClient(client)
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	info, err := agent.Info(cctx, &api.InfoRequest{})
	cancel()
	if err != nil {
		client.Close()
		return nil, nil, fmt.Errorf("guest agent hello: %w", errgrpc.ToNative(err))
	}
	g.mu.Lock()
	g.client, g.task, g.agent, g.info, g.err = client, task, agent, info, nil
	close(g.up)
	g.mu.Unlock()
	log.G(ctx).WithField("sandbox", g.id).WithField("agent", info.GetVersion()).WithField("boot_id", info.GetBootId()).
		Debug("connected to the guest agent")
	if g.onConnect != nil {
		go g.onConnect(ctx, task, agent, info)
	}
	return client, broken, nil
}

// clients returns the current connection's clients, waiting up to
// connectWait (or ctx's end) for a connection.
func (g *guestConn) clients(ctx context.Context) (taskAPI.TTRPCTaskService, api.AgentService, error) {
	t := time.NewTimer(connectWait)
	defer t.Stop()
	for {
		g.mu.Lock()
		task, agent, up, last := g.task, g.agent, g.up, g.err
		g.mu.Unlock()
		if task != nil {
			return task, agent, nil
		}
		select {
		case <-up:
		case <-ctx.Done():
			return nil, nil, fmt.Errorf("guest agent of sandbox %s: %w", g.id, ctx.Err())
		case <-t.C:
			why := ""
			if last != nil {
				why = ": " + last.Error()
			}
			return nil, nil, fmt.Errorf("guest agent of sandbox %s not reachable for %s%s: %w", g.id, connectWait, why, errdefs.ErrUnavailable)
		}
	}
}

// connected reports whether a connection is up now.
func (g *guestConn) connected() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.task != nil
}

// guestErr converts an error of a guest call to errdefs, naming the
// sandbox. A closed connection is Unavailable.
func guestErr(id, op string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, ttrpc.ErrClosed) {
		return fmt.Errorf("%s in the guest of sandbox %s: %w: %w", op, id, err, errdefs.ErrUnavailable)
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("%s in the guest of sandbox %s: %w", op, id, err)
	}
	if _, ok := status.FromError(err); !ok {
		return fmt.Errorf("%s in the guest of sandbox %s: %w", op, id, err)
	}
	return fmt.Errorf("%s in the guest of sandbox %s: %w", op, id, errgrpc.ToNative(err))
}
