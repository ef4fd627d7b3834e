// Package taskproxy is the forwarding of the task shim
// (containerd-shim-resource-slot-v1 serve): the task API containerd talks
// to, passed on call by call to resource-slot-sandboxer's task server.
//
// containerd treats the ttrpc connection of a task as its shim: when it
// closes, containerd cleans up the "dead shim" and reports the container
// exited. The proxy is a small, long-lived process that holds those
// connections so that the sandboxer can be restarted, gracefully or with
// SIGKILL, without containerd noticing: calls that need the sandboxer wait
// for it to come back, and idempotent ones (Wait, State, ...) are re-sent
// on the new connection when the old one broke under them; the others
// (Create, Start, Kill, ...) are not, since the sandboxer may have carried
// them out.
//
// The proxy does not decode what it forwards: a request's payload goes
// upstream as the bytes containerd sent, and the answer comes back the
// same way (both are carried as the unknown fields of an empty message),
// so the shim needs none of the sandboxer's types and each call costs a
// copy, not a decode and an encode, on each side.
package taskproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
)

// Service is the ttrpc service the proxy serves: containerd's task API v3.
const Service = "containerd.task.v3.Task"

// methods are the task API's methods; true marks those that may be sent
// again when the connection broke after they were sent (they change
// nothing, or setting the same value twice is the same as once).
var methods = map[string]bool{
	"State":      true,
	"Create":     false,
	"Start":      false,
	"Delete":     false,
	"Pids":       true,
	"Pause":      false,
	"Resume":     false,
	"Checkpoint": false,
	"Kill":       false,
	"Exec":       false,
	"ResizePty":  true,
	"CloseIO":    true,
	"Update":     true,
	"Wait":       true,
	"Stats":      true,
	"Connect":    true,
	// Shutdown is answered by the proxy itself (see Register).
}

// Proxy forwards the task API to the task server on a unix socket.
type Proxy struct {
	upstream string

	mu     sync.Mutex
	client *ttrpc.Client
	lastOK time.Time
}

// New forwards to the task server listening on the unix socket upstream.
func New(upstream string) *Proxy {
	return &Proxy{upstream: upstream, lastOK: time.Now()}
}

// Register registers the task API on a ttrpc server.
func (p *Proxy) Register(srv *ttrpc.Server) {
	desc := &ttrpc.ServiceDesc{Methods: map[string]ttrpc.Method{}}
	for name, idempotent := range methods {
		desc.Methods[name] = func(ctx context.Context, unmarshal func(any) error) (any, error) {
			var req emptypb.Empty
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return p.forward(ctx, name, idempotent, &req)
		}
	}
	// Shutdown is containerd releasing one task's "shim": the proxy
	// serves every task and stays up.
	desc.Methods["Shutdown"] = func(_ context.Context, unmarshal func(any) error) (any, error) {
		var req emptypb.Empty
		if err := unmarshal(&req); err != nil {
			return nil, err
		}
		return &emptypb.Empty{}, nil
	}
	srv.RegisterService(Service, desc)
}

// Unreachable is how long the upstream has been unreachable (0 when it
// is reachable), for the shim's orphan timeout.
func (p *Proxy) Unreachable() time.Duration {
	if _, err := p.conn(); err == nil {
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return time.Since(p.lastOK)
}

func (p *Proxy) conn() (*ttrpc.Client, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.client != nil {
		return p.client, nil
	}
	c, err := net.DialTimeout("unix", p.upstream, time.Second)
	if err != nil {
		return nil, err
	}
	var client *ttrpc.Client
	client = ttrpc.NewClient(c, ttrpc.WithOnClose(func() {
		// The sandboxer went away (restarted, killed): forget the dead
		// connection now, so that the next call dials the new sandboxer
		// instead of failing on it, which a call that cannot be re-sent
		// (Create, Start) would report as "went away during the call".
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.client == client {
			p.client = nil
		}
	}))
	p.client = client
	p.lastOK = time.Now()
	return p.client, nil
}

// drop forgets a broken connection (unless another call already has).
func (p *Proxy) drop(c *ttrpc.Client) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.client == c {
		c.Close()
		p.client = nil
	}
}

// Close closes the upstream connection.
func (p *Proxy) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.client != nil {
		p.client.Close()
		p.client = nil
	}
}

// maxRetryBackoff caps the wait between attempts to reach the sandboxer.
const maxRetryBackoff = time.Second

// waitRetry is how soon a Wait is sent again when the sandboxer ended it
// without an answer (it shuts down).
const waitRetry = 100 * time.Millisecond

// forward sends one call upstream. A call that could not be sent is
// retried until ctx (containerd's) ends; one whose connection broke after
// it was sent is sent again only if idempotent.
//
// A sandboxer that ends a call without answering it has not answered:
// that must never reach containerd as the call's result. It ends Wait
// calls with Unavailable when it shuts down, and a call it cancels ends
// with Canceled or DeadlineExceeded while containerd's ctx is still live.
// containerd takes a failed Wait for the end of the container (it reports
// it exited with status 255 and kills it), so Wait is sent again until the
// sandboxer answers it. Another idempotent call cancelled upstream is sent
// again; one that cannot be re-sent fails with Unavailable, which says to
// retry it.
func (p *Proxy) forward(ctx context.Context, method string, idempotent bool, req *emptypb.Empty) (*emptypb.Empty, error) {
	backoff := 50 * time.Millisecond
	for {
		c, err := p.conn()
		if err == nil {
			var resp emptypb.Empty
			err = c.Call(ctx, Service, method, req, &resp)
			switch {
			case err == nil:
				return &resp, nil
			case errors.Is(err, ttrpc.ErrClosed):
				p.drop(c)
				if !idempotent {
					return nil, errgrpc.ToGRPCf(errdefs.ErrUnavailable, "resource-slot-sandboxer went away during the call; retry it")
				}
			case ctx.Err() == nil && unanswered(method, err):
				if !idempotent {
					return nil, errgrpc.ToGRPCf(errdefs.ErrUnavailable, "resource-slot-sandboxer ended the call without an answer (%v); retry it", status.Convert(err).Message())
				}
				log.G(ctx).WithError(err).WithField("method", method).Debug("sandboxer ended the call without an answer; sending it again")
				backoff = waitRetry
			default:
				// The sandboxer's answer, or containerd's own deadline.
				return nil, err
			}
		} else {
			log.G(ctx).WithError(err).Debug("sandboxer unreachable; retrying")
		}
		select {
		case <-ctx.Done():
			return nil, errgrpc.ToGRPC(fmt.Errorf("resource-slot-sandboxer is unreachable at %s: %w", p.upstream, errdefs.ErrUnavailable))
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, maxRetryBackoff)
	}
}

// unanswered reports whether an upstream error is the sandboxer ending a
// call rather than answering it: Canceled or DeadlineExceeded (the caller
// checks that containerd's ctx is live), and for Wait Unavailable, with
// which the sandboxer ends Waits when it shuts down.
func unanswered(method string, err error) bool {
	switch status.Code(err) {
	case codes.Canceled, codes.DeadlineExceeded:
		return true
	case codes.Unavailable:
		return method == "Wait"
	}
	return false
}
