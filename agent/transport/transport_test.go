package transport

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
)

const (
	nonceA = "0123456789abcdef"
	nonceB = "fedcba9876543210"
)

func TestNewNonce(t *testing.T) {
	a, b := NewNonce(), NewNonce()
	assert.True(t, isNonce([]byte(a)), a)
	assert.NotEqual(t, a, b)
}

func TestHelloScanner(t *testing.T) {
	for _, tc := range []struct {
		desc  string
		feeds []string
		nonce string // "" = none
	}{
		{desc: "plain", feeds: []string{"RSS-HELLO " + nonceA + "\n"}, nonce: nonceA},
		{desc: "stale bytes first", feeds: []string{"\x00\x00\x01garbage\nRSS-HELLO " + nonceA + "\n"}, nonce: nonceA},
		{desc: "stale bytes without newline", feeds: []string{"\x00\x10partialframeRSS-HELLO " + nonceA + "\n"}, nonce: nonceA},
		{desc: "split across reads", feeds: []string{"xxRSS-HEL", "LO 01234567", "89abcdef", "\n"}, nonce: nonceA},
		{desc: "byte by byte", feeds: strings.Split("RSS-HELLO "+nonceA+"\n", ""), nonce: nonceA},
		{desc: "last of two", feeds: []string{"RSS-HELLO " + nonceA + "\nRSS-HELLO " + nonceB + "\n"}, nonce: nonceB},
		{desc: "stale hello then more", feeds: []string{"RSS-HELLO " + nonceA + "\njunk"}},
		{desc: "incomplete", feeds: []string{"RSS-HELLO " + nonceA}},
		{desc: "uppercase nonce", feeds: []string{"RSS-HELLO 0123456789ABCDEF\n"}},
		{desc: "short nonce", feeds: []string{"RSS-HELLO 0123\n"}},
		{desc: "long nonce", feeds: []string{"RSS-HELLO " + nonceA + "0\n"}},
		{desc: "bad then good", feeds: []string{"RSS-HELLO xyz\nRSS-HELLO " + nonceB + "\n"}, nonce: nonceB},
		{desc: "long garbage", feeds: []string{strings.Repeat("RSS-HELLO ", 1000), "RSS-HELLO " + nonceA + "\n"}, nonce: nonceA},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			var s helloScanner
			var got string
			for i, f := range tc.feeds {
				n, ok := s.feed([]byte(f))
				if ok {
					require.Equal(t, len(tc.feeds)-1, i, "hello before the last feed")
					got = n
				}
				assert.LessOrEqual(t, len(s.buf), helloLen)
			}
			assert.Equal(t, tc.nonce, got)
		})
	}
}

// socketpair returns two connected unix stream sockets.
func socketpair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	var cs [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		require.NoError(t, err)
		t.Cleanup(func() { c.Close() })
		cs[i] = c
	}
	return cs[0], cs[1]
}

// readHello reads the host's HELLO line on the guest end of a pair.
func readHello(t *testing.T, br *bufio.Reader) string {
	t.Helper()
	line, err := br.ReadString('\n')
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(line, helloPrefix), line)
	n := strings.TrimSuffix(strings.TrimPrefix(line, helloPrefix), "\n")
	require.True(t, isNonce([]byte(n)), n)
	return n
}

func TestClientHandshake(t *testing.T) {
	for _, tc := range []struct {
		desc   string
		writes func(nonce string) []string
	}{
		{desc: "olleh then ttrpc in one write", writes: func(n string) []string {
			return []string{"RSS-OLLEH " + n + " v1\nTTRPC"}
		}},
		{desc: "stale bytes, wrong nonce, then olleh", writes: func(n string) []string {
			return []string{"\x00\x00\x00\x05\x00\x00\x00\x01\x02\x00stale", "RSS-OLLEH " + nonceA + " old\n",
				"RSS-OLLEH " + n + " v1\n", "TTRPC"}
		}},
		{desc: "olleh split across writes", writes: func(n string) []string {
			return []string{"RSS-OL", "LEH " + n[:5], n[5:] + " v", "1\nTT", "RPC"}
		}},
		{desc: "olleh after a long line", writes: func(n string) []string {
			return []string{strings.Repeat("x", 10000) + "RSS-OLLEH " + n + " v1\nTTRPC"}
		}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			host, guest := socketpair(t)
			nonce := NewNonce()
			go func() {
				br := bufio.NewReader(guest)
				if n := readHello(t, br); n != nonce {
					t.Errorf("nonce %s, want %s", n, nonce)
				}
				for _, w := range tc.writes(nonce) {
					guest.Write([]byte(w))
					time.Sleep(time.Millisecond)
				}
			}()
			c, err := clientHandshake(host, nonce, time.Now().Add(5*time.Second))
			require.NoError(t, err)
			assert.Equal(t, "v1", c.AgentVersion())
			// Nothing past the OLLEH line is lost.
			b := make([]byte, 5)
			_, err = io.ReadFull(c, b)
			require.NoError(t, err)
			assert.Equal(t, "TTRPC", string(b))
		})
	}
}

func TestClientHandshakeRefuses(t *testing.T) {
	for _, tc := range []struct {
		desc  string
		reply func(nonce string) string
		close bool
	}{
		{desc: "wrong nonce", reply: func(string) string { return "RSS-OLLEH " + nonceA + " v1\n" }},
		{desc: "no version", reply: func(n string) string { return "RSS-OLLEH " + n + "\n" }},
		{desc: "closed", reply: func(string) string { return "" }, close: true},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			host, guest := socketpair(t)
			go func() {
				br := bufio.NewReader(guest)
				n := readHello(t, br)
				guest.Write([]byte(tc.reply(n)))
				if tc.close {
					guest.Close()
				}
			}()
			_, err := clientHandshake(host, NewNonce(), time.Now().Add(300*time.Millisecond))
			require.ErrorIs(t, err, ErrHandshake)
		})
	}
}

func TestSerialDialerReconnects(t *testing.T) {
	dir := t.TempDir()
	path := dir + "/agent.sock"
	ln, err := net.Listen("unix", path)
	require.NoError(t, err)
	defer ln.Close()
	nonces := make(chan string, 4)
	go func() {
		for i := 0; ; i++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			br := bufio.NewReader(c)
			line, _ := br.ReadString('\n')
			n := strings.TrimSuffix(strings.TrimPrefix(line, helloPrefix), "\n")
			nonces <- n
			if i == 0 {
				// An agent that does not answer: the dialer gives up
				// and comes back with a new nonce.
				defer c.Close()
				continue
			}
			c.Write(ollehLine(n, "v2"))
			defer c.Close()
		}
	}()
	d := SerialDialer{Path: path, HandshakeTimeout: 200 * time.Millisecond, RetryInterval: 10 * time.Millisecond}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.Dial(ctx)
	require.NoError(t, err)
	defer c.Close()
	assert.Equal(t, "v2", c.(*Conn).AgentVersion())
	first, second := <-nonces, <-nonces
	assert.NotEqual(t, first, second)
}

func TestSerialDialerContext(t *testing.T) {
	path := t.TempDir() + "/missing.sock"
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := SerialDialer{Path: path, RetryInterval: 20 * time.Millisecond}.Dial(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
}

// frame is a ttrpc request frame with payload p.
func frame(stream uint32, p string) string {
	h := make([]byte, frameHeaderLen)
	binary.BigEndian.PutUint32(h[0:], uint32(len(p)))
	binary.BigEndian.PutUint32(h[4:], stream)
	h[8] = 1
	return string(h) + p
}

// accept runs Accept in the background.
func accept(l *SerialListener) <-chan net.Conn {
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			close(ch)
			return
		}
		ch <- c
	}()
	return ch
}

func waitConn(t *testing.T, ch <-chan net.Conn) net.Conn {
	t.Helper()
	select {
	case c, ok := <-ch:
		require.True(t, ok, "Accept failed")
		return c
	case <-time.After(5 * time.Second):
		t.Fatal("no session accepted")
		return nil
	}
}

func readN(t *testing.T, c net.Conn, n int) string {
	t.Helper()
	b := make([]byte, n)
	_, err := io.ReadFull(c, b)
	require.NoError(t, err)
	return string(b)
}

func TestSerialListenerSessions(t *testing.T) {
	p := newFakePort()
	p.failOpens = 3 // the port is busy at first
	l := newSerialListener(p, "test", "v1")
	defer l.Close()

	// A host connected before the guest opened the port: its bytes and
	// stale ones before them are queued.
	p.connect()
	p.send("\x07\x00stale bytes of an earlier session")
	p.send("RSS-HELLO 0123")
	ch := accept(l)
	time.Sleep(10 * time.Millisecond)
	p.send("456789abcdef\n")
	c := waitConn(t, ch)
	assert.Equal(t, "RSS-OLLEH "+nonceA+" v1\n", p.recv(t, len(ollehLine(nonceA, "v1")), 5*time.Second))
	assert.GreaterOrEqual(t, p.opens, 4)

	// ttrpc frames pass through, whatever the read sizes.
	f1, f2 := frame(1, "hello"), frame(3, strings.Repeat("x", 100000))
	p.send(f1 + f2)
	assert.Equal(t, f1, readN(t, c, len(f1)))
	assert.Equal(t, f2, readN(t, c, len(f2)))
	_, err := c.Write([]byte("reply"))
	require.NoError(t, err)
	assert.Equal(t, "reply", p.recv(t, 5, 5*time.Second))

	// The host disconnects: the session sees EOF. A second Accept waits
	// for the session to be closed.
	ch = accept(l)
	p.disconnect()
	_, err = c.Read(make([]byte, 1))
	require.ErrorIs(t, err, io.EOF)
	select {
	case <-ch:
		t.Fatal("accepted while the previous session is open")
	case <-time.After(20 * time.Millisecond):
	}
	require.NoError(t, c.Close())
	// A new host; the port stays open across sessions.
	opens := p.opens
	p.connect()
	p.send("RSS-HELLO " + nonceB + "\n")
	c = waitConn(t, ch)
	assert.Equal(t, string(ollehLine(nonceB, "v1")), p.recv(t, len(ollehLine(nonceB, "v1")), 5*time.Second))
	assert.Equal(t, opens, p.opens)

	// A new host's HELLO arrives in the middle of the session (the guest
	// missed the disconnect): the session ends at the frame boundary and
	// the next session answers the HELLO.
	p.send(frame(1, "abc"))
	assert.Equal(t, frame(1, "abc"), readN(t, c, len(frame(1, "abc"))))
	ch = accept(l)
	p.connect()
	p.send("RSS-HELLO " + nonceA + "\n")
	_, err = c.Read(make([]byte, 1))
	require.ErrorIs(t, err, io.EOF)
	require.NoError(t, c.Close())
	c = waitConn(t, ch)
	assert.Equal(t, string(ollehLine(nonceA, "v1")), p.recv(t, len(ollehLine(nonceA, "v1")), 5*time.Second))

	// Close interrupts a blocked Read.
	done := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 1))
		done <- err
	}()
	time.Sleep(10 * time.Millisecond)
	require.NoError(t, c.Close())
	select {
	case err := <-done:
		require.ErrorIs(t, err, io.EOF)
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not interrupt Read")
	}
	_, err = c.Write([]byte("x"))
	require.ErrorIs(t, err, net.ErrClosed)

	// Closing the listener ends a waiting Accept.
	ch = accept(l)
	time.Sleep(10 * time.Millisecond)
	l.Close()
	select {
	case _, ok := <-ch:
		require.False(t, ok)
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not end Accept")
	}
}

func TestSerialListenerSkipsStaleHellos(t *testing.T) {
	p := newFakePort()
	l := newSerialListener(p, "test", "v1")
	defer l.Close()
	p.connect()
	// Two hosts gave up before the guest opened the port; only the
	// last HELLO is answered.
	p.send("RSS-HELLO " + nonceA + "\nRSS-HELLO " + nonceB + "\n")
	c := waitConn(t, accept(l))
	defer c.Close()
	assert.Equal(t, string(ollehLine(nonceB, "v1")), p.recv(t, len(ollehLine(nonceB, "v1")), 5*time.Second))
	p.mu.Lock()
	assert.Empty(t, p.toHost)
	p.mu.Unlock()
}

// testAgent answers Info; the other methods are not called.
type testAgent struct {
	api.AgentService
	mu    sync.Mutex
	calls int
}

func (a *testAgent) Info(ctx context.Context, _ *api.InfoRequest) (*api.InfoResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.calls++
	return &api.InfoResponse{Version: "test", UptimeNs: uint64(a.calls)}, nil
}

// TestTTRPCSessions runs ttrpc through the SerialDialer, a QEMU-like
// chardev and the SerialListener, across host reconnects, with and
// without the guest seeing the host leave.
func TestTTRPCSessions(t *testing.T) {
	for _, missEOF := range []bool{false, true} {
		t.Run(map[bool]string{false: "guest sees disconnect", true: "guest misses disconnect"}[missEOF], func(t *testing.T) {
			p := newFakePort()
			q := startFakeQEMU(t, p, missEOF)
			l := newSerialListener(p, "test", "agent-1")
			srv, err := ttrpc.NewServer()
			require.NoError(t, err)
			api.RegisterAgentService(srv, &testAgent{})
			served := make(chan error, 1)
			go func() { served <- srv.Serve(context.Background(), l) }()
			defer func() {
				srv.Close()
				<-served
			}()

			d := SerialDialer{Path: q.path, HandshakeTimeout: time.Second, RetryInterval: 20 * time.Millisecond}
			for i := 1; i <= 4; i++ {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				conn, err := d.Dial(ctx)
				require.NoError(t, err, "session %d", i)
				assert.Equal(t, "agent-1", conn.(*Conn).AgentVersion())
				cl := ttrpc.NewClient(conn)
				resp, err := api.NewAgentClient(cl).Info(ctx, &api.InfoRequest{})
				require.NoError(t, err, "session %d", i)
				assert.Equal(t, "test", resp.Version)
				cl.Close()
				cancel()
			}
		})
	}
}

func TestValidFrameHeader(t *testing.T) {
	hello := []byte("RSS-HELLO " + nonceA + "\n")
	_, ok := validFrameHeader(hello[:frameHeaderLen])
	assert.False(t, ok, "a HELLO is no ttrpc frame")
	n, ok := validFrameHeader([]byte(frame(5, "abc")[:frameHeaderLen]))
	assert.True(t, ok)
	assert.Equal(t, 3, n)
	h := []byte(frame(2, "")) // even stream: from a server
	_, ok = validFrameHeader(h)
	assert.False(t, ok)
	assert.False(t, errors.Is(errTest, io.EOF))
}
