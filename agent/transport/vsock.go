package transport

import (
	"errors"
	"net"
	"os"
	"time"

	"github.com/containerd/log"
	"github.com/mdlayher/vsock"
)

// VsockDevice is present in a guest with a virtio-vsock device.
const VsockDevice = "/dev/vsock"

// HasVsock reports whether the guest has a vsock device.
func HasVsock() bool {
	_, err := os.Stat(VsockDevice)
	return err == nil
}

// vsockListener is the guest side over AF_VSOCK: every host connection is
// its own stream, so there are no stale bytes, but the handshake is the
// same as over virtio-serial.
type vsockListener struct {
	net.Listener
	version string
}

// ListenVsock listens on the guest's vsock port, answering handshakes with
// version.
func ListenVsock(port uint32, version string) (net.Listener, error) {
	if !validVersion(version) {
		return nil, errors.New("transport: invalid agent version")
	}
	l, err := vsock.Listen(port, nil)
	if err != nil {
		return nil, err
	}
	return &vsockListener{Listener: l, version: version}, nil
}

// vsockHandshakeTimeout bounds the wait for a new connection's HELLO.
const vsockHandshakeTimeout = 10 * time.Second

func (l *vsockListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if err := ServerHandshake(c, l.version, time.Now().Add(vsockHandshakeTimeout)); err != nil {
			log.L.WithError(err).Warn("transport: vsock handshake")
			c.Close()
			continue
		}
		return c, nil
	}
}

// ServerHandshake reads a stream connection until the host's HELLO (the
// last thing it sent) and answers it; for transports where every host
// connection is a new stream.
func ServerHandshake(c net.Conn, version string, deadline time.Time) error {
	if err := c.SetDeadline(deadline); err != nil {
		return err
	}
	var sc helloScanner
	b := make([]byte, 512)
	for {
		n, err := c.Read(b)
		if n > 0 {
			if nonce, ok := sc.feed(b[:n]); ok {
				if _, err := c.Write(ollehLine(nonce, version)); err != nil {
					return err
				}
				return c.SetDeadline(time.Time{})
			}
		}
		if err != nil {
			return err
		}
	}
}
