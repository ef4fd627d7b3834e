package transport

import (
	"context"
	"fmt"
	"net"
	"time"

	"github.com/mdlayher/vsock"
)

// Dialer connects the host to a guest agent. The connection it returns has
// completed the handshake: speak ttrpc on it (ttrpc.NewClient). It is a
// *Conn, whose AgentVersion names the agent.
type Dialer interface {
	Dial(ctx context.Context) (net.Conn, error)
}

// Default timings of the dialers.
const (
	DefaultHandshakeTimeout = 3 * time.Second
	DefaultRetryInterval    = 200 * time.Millisecond
)

// SerialDialer dials the agent's virtio-serial port through QEMU's chardev
// socket (server mode: QEMU listens at Path). One host connection at a
// time reaches the guest: QEMU accepts the next one when the current one
// closes.
//
// Dial retries (a refused connection, a handshake that did not complete)
// until ctx ends, waiting RetryInterval before each new attempt, so that
// the guest sees the end of the previous connection before the next
// begins. A caller that closes a connection and dials again at once gets
// the same pause from the first retry if the guest missed the close.
type SerialDialer struct {
	// Path is the chardev's unix socket.
	Path string
	// HandshakeTimeout bounds each attempt's wait for the OLLEH
	// (default DefaultHandshakeTimeout).
	HandshakeTimeout time.Duration
	// RetryInterval is the pause before a new attempt (default
	// DefaultRetryInterval).
	RetryInterval time.Duration
}

// Dial implements Dialer.
func (d SerialDialer) Dial(ctx context.Context) (net.Conn, error) {
	var nd net.Dialer
	return dialLoop(ctx, "serial "+d.Path, d.HandshakeTimeout, d.RetryInterval, func(ctx context.Context) (net.Conn, error) {
		return nd.DialContext(ctx, "unix", d.Path)
	})
}

// VsockDialer dials the agent over AF_VSOCK (hosts with /dev/vhost-vsock).
// The handshake is the same as over virtio-serial.
type VsockDialer struct {
	CID, Port        uint32
	HandshakeTimeout time.Duration
	RetryInterval    time.Duration
}

// Dial implements Dialer.
func (d VsockDialer) Dial(ctx context.Context) (net.Conn, error) {
	return dialLoop(ctx, fmt.Sprintf("vsock %d:%d", d.CID, d.Port), d.HandshakeTimeout, d.RetryInterval, func(ctx context.Context) (net.Conn, error) {
		type result struct {
			c   net.Conn
			err error
		}
		ch := make(chan result, 1)
		go func() {
			c, err := vsock.Dial(d.CID, d.Port, nil)
			if err != nil {
				ch <- result{nil, err}
				return
			}
			ch <- result{c, nil}
		}()
		select {
		case r := <-ch:
			return r.c, r.err
		case <-ctx.Done():
			// The kernel's connect timeout (2s) ends the goroutine.
			go func() {
				if r := <-ch; r.c != nil {
					r.c.Close()
				}
			}()
			return nil, ctx.Err()
		}
	})
}

func dialLoop(ctx context.Context, what string, timeout, retry time.Duration, dial func(context.Context) (net.Conn, error)) (net.Conn, error) {
	if timeout <= 0 {
		timeout = DefaultHandshakeTimeout
	}
	if retry <= 0 {
		retry = DefaultRetryInterval
	}
	var last error
	for attempt := 0; ; attempt++ {
		if attempt > 0 {
			t := time.NewTimer(retry)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil, fmt.Errorf("dial agent (%s): %w; last attempt: %v", what, ctx.Err(), last)
			case <-t.C:
			}
		}
		c, err := dialOnce(ctx, timeout, dial)
		if err == nil {
			return c, nil
		}
		last = err
		if ctx.Err() != nil {
			return nil, fmt.Errorf("dial agent (%s): %w; last attempt: %v", what, ctx.Err(), last)
		}
	}
}

func dialOnce(ctx context.Context, timeout time.Duration, dial func(context.Context) (net.Conn, error)) (_ net.Conn, retErr error) {
	c, err := dial(ctx)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			c.Close()
		}
	}()
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	// A cancelled ctx ends the handshake at once.
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	hc, err := clientHandshake(c, NewNonce(), deadline)
	if !stop() {
		if err == nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("%w: %v", ctx.Err(), err)
	}
	if err != nil {
		return nil, err
	}
	return hc, nil
}
