package transport

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"
)

// fakePort behaves as a virtio-serial port seen from the guest: bytes from
// the host queue up whether or not the guest has the port open, reads
// return io.EOF while no host is connected, and what the guest writes
// while no host is connected is dropped.
type fakePort struct {
	mu        sync.Mutex
	cond      *sync.Cond
	toGuest   []byte
	toHost    []byte
	connected bool
	open      bool
	rdl, wdl  time.Time
	// failOpens: the next Open calls fail with EBUSY.
	failOpens int
	opens     int
}

func newFakePort() *fakePort {
	p := &fakePort{}
	p.cond = sync.NewCond(&p.mu)
	return p
}

// Guest side (port and portOpener).

func (p *fakePort) Open() (port, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.opens++
	if p.failOpens > 0 {
		p.failOpens--
		return nil, syscall.EBUSY
	}
	if p.open {
		return nil, syscall.EBUSY
	}
	p.open = true
	return (*fakeGuestEnd)(p), nil
}

func (p *fakePort) WaitHost(_ port, stop <-chan struct{}) {
	t := time.NewTimer(2 * time.Millisecond)
	defer t.Stop()
	select {
	case <-t.C:
	case <-stop:
	}
}

func (p *fakePort) Close() {}

type fakeGuestEnd fakePort

func (g *fakeGuestEnd) Read(b []byte) (int, error) {
	p := (*fakePort)(g)
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		if !p.open {
			return 0, os.ErrClosed
		}
		if !p.rdl.IsZero() && !time.Now().Before(p.rdl) {
			return 0, os.ErrDeadlineExceeded
		}
		if len(p.toGuest) > 0 {
			n := copy(b, p.toGuest)
			p.toGuest = p.toGuest[n:]
			return n, nil
		}
		if !p.connected {
			return 0, io.EOF
		}
		p.cond.Wait()
	}
}

func (g *fakeGuestEnd) Write(b []byte) (int, error) {
	p := (*fakePort)(g)
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.open {
		return 0, os.ErrClosed
	}
	if !p.wdl.IsZero() && !time.Now().Before(p.wdl) {
		return 0, os.ErrDeadlineExceeded
	}
	if p.connected {
		p.toHost = append(p.toHost, b...)
		p.cond.Broadcast()
	}
	return len(b), nil
}

func (g *fakeGuestEnd) Close() error {
	p := (*fakePort)(g)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.open = false
	p.cond.Broadcast()
	return nil
}

func (g *fakeGuestEnd) setDeadline(d *time.Time, t time.Time) error {
	p := (*fakePort)(g)
	p.mu.Lock()
	*d = t
	p.cond.Broadcast()
	p.mu.Unlock()
	if !t.IsZero() {
		if w := time.Until(t); w > 0 {
			time.AfterFunc(w, func() {
				p.mu.Lock()
				p.cond.Broadcast()
				p.mu.Unlock()
			})
		}
	}
	return nil
}

func (g *fakeGuestEnd) SetReadDeadline(t time.Time) error  { return g.setDeadline(&g.rdl, t) }
func (g *fakeGuestEnd) SetWriteDeadline(t time.Time) error { return g.setDeadline(&g.wdl, t) }

// Host side.

func (p *fakePort) connect() {
	p.mu.Lock()
	p.connected = true
	p.toHost = nil
	p.cond.Broadcast()
	p.mu.Unlock()
}

func (p *fakePort) disconnect() {
	p.mu.Lock()
	p.connected = false
	p.cond.Broadcast()
	p.mu.Unlock()
}

func (p *fakePort) send(s string) {
	p.mu.Lock()
	p.toGuest = append(p.toGuest, s...)
	p.cond.Broadcast()
	p.mu.Unlock()
}

// recv waits up to timeout for n bytes from the guest.
func (p *fakePort) recv(t *testing.T, n int, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	time.AfterFunc(timeout, func() { p.mu.Lock(); p.cond.Broadcast(); p.mu.Unlock() })
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.toHost) < n {
		if !time.Now().Before(deadline) {
			t.Fatalf("guest sent %q, want %d bytes", p.toHost, n)
		}
		p.cond.Wait()
	}
	s := string(p.toHost[:n])
	p.toHost = p.toHost[n:]
	return s
}

// fakeQEMU serves the host side of a fakePort on a unix socket the way
// QEMU's chardev in server mode does: one connection at a time; the guest
// sees the host connect and disconnect (unless missEOF: then the guest
// misses the disconnect, as when the host reconnects at once).
type fakeQEMU struct {
	port    *fakePort
	path    string
	ln      net.Listener
	missEOF bool
	wg      sync.WaitGroup
}

func startFakeQEMU(t *testing.T, p *fakePort, missEOF bool) *fakeQEMU {
	t.Helper()
	path := t.TempDir() + "/agent.sock"
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	q := &fakeQEMU{port: p, path: path, ln: ln, missEOF: missEOF}
	q.wg.Add(1)
	go q.serve()
	t.Cleanup(func() { ln.Close(); q.wg.Wait() })
	return q
}

func (q *fakeQEMU) serve() {
	defer q.wg.Done()
	for {
		c, err := q.ln.Accept()
		if err != nil {
			return
		}
		q.port.connect()
		done := make(chan struct{})
		go func() { // guest -> host
			for {
				q.port.mu.Lock()
				for len(q.port.toHost) == 0 {
					select {
					case <-done:
						q.port.mu.Unlock()
						return
					default:
					}
					q.port.cond.Wait()
				}
				b := append([]byte(nil), q.port.toHost...)
				q.port.toHost = nil
				q.port.mu.Unlock()
				if _, err := c.Write(b); err != nil {
					return
				}
			}
		}()
		b := make([]byte, 4096)
		for {
			n, err := c.Read(b)
			if n > 0 {
				q.port.send(string(b[:n]))
			}
			if err != nil {
				break
			}
		}
		close(done)
		q.port.mu.Lock()
		q.port.cond.Broadcast()
		q.port.mu.Unlock()
		c.Close()
		if !q.missEOF {
			q.port.disconnect()
		}
	}
}

var errTest = errors.New("test")
