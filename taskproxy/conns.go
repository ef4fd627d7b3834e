package taskproxy

import (
	"context"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/unixsock"
)

// Conns is a listener that counts the connections it accepted that are
// still open: containerd holds one per task, so none open means that
// containerd holds no task through this shim.
type Conns struct {
	net.Listener
	open atomic.Int64
}

// CountConns counts the open connections of l (a unix socket listener).
func CountConns(l net.Listener) *Conns { return &Conns{Listener: l} }

// Open is how many accepted connections are open.
func (c *Conns) Open() int64 { return c.open.Load() }

// Accept accepts a connection and counts it until it is closed.
func (c *Conns) Accept() (net.Conn, error) {
	conn, err := c.Listener.Accept()
	if err != nil {
		return nil, err
	}
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		conn.Close()
		return nil, fmt.Errorf("not a unix connection: %T", conn)
	}
	c.open.Add(1)
	return &countedConn{UnixConn: uc, open: &c.open}, nil
}

type countedConn struct {
	*net.UnixConn
	once sync.Once
	open *atomic.Int64
}

func (c *countedConn) Close() error {
	c.once.Do(func() { c.open.Add(-1) })
	return c.UnixConn.Close()
}

// SameUser is the ttrpc handshaker of the shim's server: only a peer of
// this process's user and group (containerd, root) may call, as with
// ttrpc.UnixSocketRequireSameUser, which cannot take a counted connection.
func SameUser() sameUser { return sameUser{uid: uint32(os.Geteuid()), gid: uint32(os.Getegid())} }

type sameUser struct{ uid, gid uint32 }

func (s sameUser) Handshake(_ context.Context, conn net.Conn) (net.Conn, any, error) {
	var uc *net.UnixConn
	switch c := conn.(type) {
	case *countedConn:
		uc = c.UnixConn
	case *net.UnixConn:
		uc = c
	default:
		return nil, nil, fmt.Errorf("task shim: not a unix connection: %T", conn)
	}
	cred, err := unixsock.PeerCred(uc)
	if err != nil {
		return nil, nil, err
	}
	if cred.Uid != s.uid || cred.Gid != s.gid {
		return nil, nil, fmt.Errorf("task shim: peer uid %d gid %d: %w", cred.Uid, cred.Gid, syscall.EPERM)
	}
	return conn, cred, nil
}
