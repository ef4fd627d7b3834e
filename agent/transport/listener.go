package transport

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
)

// port is the guest's end of a virtio-serial port: an *os.File on
// /dev/vportNpM. Read returns io.EOF while no host is connected (after
// what the last host sent); deadlines interrupt Read and Write.
type port interface {
	io.ReadWriteCloser
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

// portOpener opens the port and waits for a host to connect.
type portOpener interface {
	// Open opens the port; an error is retried after a pause.
	Open() (port, error)
	// WaitHost returns when a host may have connected to p (a SIGIO from
	// the port, or after a while), or when stop is closed.
	WaitHost(p port, stop <-chan struct{})
	// Close releases what the opener holds (not the port).
	Close()
}

// SerialListener is the guest side of the virtio-serial transport: a
// net.Listener whose Accept returns one connection per host session, after
// the handshake. Sessions come one after another on the same port; Accept
// waits until the previous connection is closed. The port stays open
// across sessions (closing it discards what the host already sent); it is
// reopened only after an error.
type SerialListener struct {
	opener  portOpener
	version string
	addr    serialAddr

	mu      sync.Mutex
	p       port
	pending []byte        // read by an ended session, not yet handled
	busy    bool          // a handshake or a session owns the port
	session bool          // ... and it is a session
	idle    chan struct{} // closed when the owner releases the port
	closed  chan struct{}
	once    sync.Once
}

// ListenSerial listens on the virtio-serial port named name (its
// /sys/class/virtio-ports/*/name), answering handshakes with version.
func ListenSerial(name, version string) (*SerialListener, error) {
	if !validVersion(version) {
		return nil, errors.New("transport: invalid agent version")
	}
	o, err := newDevOpener(name)
	if err != nil {
		return nil, err
	}
	return newSerialListener(o, name, version), nil
}

func newSerialListener(o portOpener, name, version string) *SerialListener {
	return &SerialListener{
		opener:  o,
		version: version,
		addr:    serialAddr(name),
		closed:  make(chan struct{}),
	}
}

type serialAddr string

func (serialAddr) Network() string  { return "virtio-serial" }
func (a serialAddr) String() string { return string(a) }

// Addr implements net.Listener.
func (l *SerialListener) Addr() net.Addr { return l.addr }

// Close stops Accept. A connection already accepted stays usable; the port
// closes when it does.
func (l *SerialListener) Close() error {
	l.once.Do(func() {
		close(l.closed)
		l.mu.Lock()
		if l.p != nil && !l.busy {
			l.p.Close()
			l.p = nil
		} else if l.p != nil && !l.session {
			// Interrupt a handshake in progress; a session is left alone.
			l.p.SetReadDeadline(time.Unix(1, 0))
		}
		l.mu.Unlock()
		l.opener.Close()
	})
	return nil
}

func (l *SerialListener) isClosed() bool {
	select {
	case <-l.closed:
		return true
	default:
		return false
	}
}

// Accept waits for the previous session to end and for a host's HELLO,
// answers it and returns the session's connection.
func (l *SerialListener) Accept() (net.Conn, error) {
	for {
		l.mu.Lock()
		for l.busy {
			idle := l.idle
			l.mu.Unlock()
			select {
			case <-idle:
			case <-l.closed:
				return nil, net.ErrClosed
			}
			l.mu.Lock()
		}
		if l.isClosed() {
			l.mu.Unlock()
			return nil, net.ErrClosed
		}
		l.busy = true
		l.idle = make(chan struct{})
		l.mu.Unlock()

		c, err := l.handshake()
		if err == nil {
			l.mu.Lock()
			l.session = true
			closed := l.isClosed()
			l.mu.Unlock()
			if closed {
				c.Close()
				return nil, net.ErrClosed
			}
			return c, nil
		}
		l.release(!errors.Is(err, net.ErrClosed))
		if l.isClosed() {
			return nil, net.ErrClosed
		}
	}
}

// release gives the port back after a handshake or a session; broken
// closes it so that the next owner reopens it.
func (l *SerialListener) release(broken bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.p != nil && (broken || l.isClosed()) {
		l.p.Close()
		l.p = nil
	}
	l.busy = false
	l.session = false
	close(l.idle)
}

// handshake owns the port: it opens it when needed and reads until a
// HELLO, which it answers. It returns net.ErrClosed when the listener
// closed, another error when the port failed.
func (l *SerialListener) handshake() (*serialConn, error) {
	var sc helloScanner
	l.mu.Lock()
	pending := l.pending
	l.pending = nil
	l.mu.Unlock()
	nonce, ok := sc.feed(pending)
	rb := make([]byte, 4096)
	for !ok {
		if l.isClosed() {
			return nil, net.ErrClosed
		}
		p, err := l.openPort()
		if err != nil {
			return nil, err
		}
		n, err := p.Read(rb)
		if n > 0 {
			nonce, ok = sc.feed(rb[:n])
			continue
		}
		switch {
		case err == nil:
		case errors.Is(err, io.EOF):
			// No host connected: wait for one.
			l.opener.WaitHost(p, l.closed)
		case errors.Is(err, os.ErrDeadlineExceeded) && l.isClosed():
			return nil, net.ErrClosed
		default:
			log.L.WithError(err).Warn("transport: read from the agent port; reopening it")
			return nil, err
		}
	}
	p := l.currentPort()
	p.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := p.Write(ollehLine(nonce, l.version)); err != nil {
		log.L.WithError(err).Warn("transport: answer the host's hello; reopening the port")
		return nil, err
	}
	p.SetWriteDeadline(time.Time{})
	log.L.WithField("nonce", nonce).Debug("transport: new host session")
	return &serialConn{l: l, p: p, rbuf: make([]byte, 64<<10)}, nil
}

func (l *SerialListener) currentPort() port {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.p
}

// openPort returns the open port, opening it (and retrying while it is
// busy or missing) when needed.
func (l *SerialListener) openPort() (port, error) {
	l.mu.Lock()
	p := l.p
	l.mu.Unlock()
	if p != nil {
		return p, nil
	}
	backoff := 10 * time.Millisecond
	for {
		p, err := l.opener.Open()
		if err == nil {
			l.mu.Lock()
			l.p = p
			l.mu.Unlock()
			return p, nil
		}
		log.L.WithError(err).Debug("transport: open the agent port; retrying")
		t := time.NewTimer(backoff)
		select {
		case <-l.closed:
			t.Stop()
			return nil, net.ErrClosed
		case <-t.C:
		}
		backoff = min(2*backoff, 500*time.Millisecond)
	}
}

// ttrpc framing, checked on what the host sends in a session: a 10-byte
// header (length, stream id, type, flags) and at most 4 MiB of payload.
const (
	frameHeaderLen = 10
	frameMaxLen    = 4 << 20
)

func validFrameHeader(h []byte) (length int, ok bool) {
	n := binary.BigEndian.Uint32(h[0:4])
	stream := binary.BigEndian.Uint32(h[4:8])
	typ := h[8]
	// Client streams are odd; requests (1) and data (3) come from clients.
	if n > frameMaxLen || stream%2 != 1 || (typ != 1 && typ != 3) {
		return 0, false
	}
	return int(n), true
}

// serialConn is one host session on the port. Read passes the host's ttrpc
// frames through and ends the session (io.EOF) when the host disconnects or
// when what arrives is not a ttrpc frame: a new host's HELLO arrived
// without the guest having seen the previous host leave. The bytes from
// there on are handed to the next handshake.
type serialConn struct {
	l *SerialListener
	p port

	readMu    sync.Mutex
	rbuf      []byte
	in        []byte // read from the port, not yet checked
	out       []byte // checked, not yet returned
	remaining int    // payload bytes of the current frame not yet checked
	ended     bool
	broken    bool

	writeMu sync.Mutex
	closed  atomic.Bool
	once    sync.Once
}

func (c *serialConn) Read(b []byte) (int, error) {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	if c.ended || c.closed.Load() {
		return 0, io.EOF
	}
	for len(c.out) == 0 {
		if c.remaining > 0 {
			if len(c.in) == 0 {
				if err := c.fill(); err != nil {
					return 0, c.end(err)
				}
			}
			n := min(len(c.in), c.remaining)
			c.out, c.in = c.in[:n], c.in[n:]
			c.remaining -= n
			continue
		}
		for len(c.in) < frameHeaderLen {
			if err := c.fill(); err != nil {
				return 0, c.end(err)
			}
		}
		length, ok := validFrameHeader(c.in[:frameHeaderLen])
		if !ok {
			c.l.mu.Lock()
			c.l.pending = append([]byte(nil), c.in...)
			c.l.mu.Unlock()
			c.ended = true
			log.L.Info("transport: host session ended by a new handshake")
			return 0, io.EOF
		}
		c.out, c.in = c.in[:frameHeaderLen], c.in[frameHeaderLen:]
		c.remaining = length
	}
	n := copy(b, c.out)
	c.out = c.out[n:]
	return n, nil
}

// fill reads more from the port into c.in; only called with c.out empty.
func (c *serialConn) fill() error {
	if len(c.in) > 0 && &c.in[0] != &c.rbuf[0] {
		c.in = c.rbuf[:copy(c.rbuf, c.in)]
	} else if len(c.in) == 0 {
		c.in = c.rbuf[:0]
	}
	for {
		n, err := c.p.Read(c.rbuf[len(c.in):])
		if n > 0 {
			c.in = c.rbuf[:len(c.in)+n]
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// end records why the session ended and returns io.EOF, which ttrpc's
// server takes as the client going away.
func (c *serialConn) end(err error) error {
	c.ended = true
	switch {
	case errors.Is(err, io.EOF):
		log.L.Debug("transport: host disconnected")
	case c.closed.Load() && errors.Is(err, os.ErrDeadlineExceeded):
	default:
		log.L.WithError(err).Warn("transport: read from the agent port")
		c.broken = true
	}
	return io.EOF
}

func (c *serialConn) Write(b []byte) (int, error) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if c.closed.Load() {
		return 0, net.ErrClosed
	}
	return c.p.Write(b)
}

// Close ends the session: it interrupts a Read or Write in progress, waits
// for them, and gives the port to the next Accept.
func (c *serialConn) Close() error {
	c.once.Do(func() {
		c.closed.Store(true)
		past := time.Unix(1, 0)
		c.p.SetReadDeadline(past)
		c.p.SetWriteDeadline(past)
		c.readMu.Lock()
		c.writeMu.Lock()
		c.p.SetReadDeadline(time.Time{})
		c.p.SetWriteDeadline(time.Time{})
		broken := c.broken
		c.writeMu.Unlock()
		c.readMu.Unlock()
		c.l.release(broken)
	})
	return nil
}

func (c *serialConn) LocalAddr() net.Addr  { return c.l.addr }
func (c *serialConn) RemoteAddr() net.Addr { return serialAddr("host") }

func (c *serialConn) SetDeadline(t time.Time) error {
	if err := c.p.SetReadDeadline(t); err != nil {
		return err
	}
	return c.p.SetWriteDeadline(t)
}
func (c *serialConn) SetReadDeadline(t time.Time) error  { return c.p.SetReadDeadline(t) }
func (c *serialConn) SetWriteDeadline(t time.Time) error { return c.p.SetWriteDeadline(t) }
