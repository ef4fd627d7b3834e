// Package transport carries ttrpc between the host and the guest agent of
// a vm-mode sandbox: over a virtio-serial port (QEMU's chardev socket on
// the host, /dev/vportNpM in the guest), or over AF_VSOCK where the host
// has /dev/vhost-vsock.
//
// A virtio-serial port is one byte stream that outlives host connections:
// bytes the host wrote before the guest opened the port are queued, bytes
// of a connection the host gave up on may still arrive, and the guest may
// miss the end of a connection when the host reconnects at once. So every
// connection starts with a handshake that names it:
//
//	host  -> guest: RSS-HELLO <nonce>\n          (nonce: 16 lowercase hex, new per connection)
//	guest -> host:  RSS-OLLEH <nonce> <version>\n
//
// then both speak ttrpc. The guest reads and discards until a complete
// HELLO line that is the last thing it has received (the host sends
// nothing after HELLO until it has the OLLEH, so anything after a HELLO
// makes that HELLO stale). The host reads and discards until the OLLEH
// line with its own nonce, and never reads past it; without one within
// its timeout it closes and reconnects with a new nonce.
package transport

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

const (
	helloPrefix = "RSS-HELLO "
	ollehPrefix = "RSS-OLLEH "
	nonceLen    = 16
	// helloLen is a complete HELLO line with its newline.
	helloLen = len(helloPrefix) + nonceLen + 1
	// MaxVersionLen bounds the agent version in the OLLEH line.
	MaxVersionLen = 64
)

// ErrHandshake is returned when the peer did not complete the handshake.
var ErrHandshake = errors.New("transport: no handshake from the agent")

// NewNonce returns a fresh nonce: 16 lowercase hex characters.
func NewNonce() string {
	var b [nonceLen / 2]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("transport: crypto/rand: %v", err))
	}
	return hex.EncodeToString(b[:])
}

func isNonce(b []byte) bool {
	if len(b) != nonceLen {
		return false
	}
	for _, c := range b {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// validVersion: printable ASCII without spaces, 1..MaxVersionLen bytes.
func validVersion(v string) bool {
	if v == "" || len(v) > MaxVersionLen {
		return false
	}
	for i := 0; i < len(v); i++ {
		if v[i] <= ' ' || v[i] > '~' {
			return false
		}
	}
	return true
}

// helloScanner finds the host's HELLO in what the guest reads. Its buffer
// stays bounded whatever precedes the HELLO.
type helloScanner struct {
	buf []byte
}

// feed adds data and reports the nonce of a complete HELLO line that is the
// last thing received. A HELLO followed by more bytes is stale and skipped.
func (s *helloScanner) feed(data []byte) (nonce string, ok bool) {
	s.buf = append(s.buf, data...)
	for {
		i := indexHello(s.buf)
		if i < 0 {
			break
		}
		n := string(s.buf[i+len(helloPrefix) : i+helloLen-1])
		rest := s.buf[i+helloLen:]
		if len(rest) == 0 {
			s.buf = s.buf[:0]
			return n, true
		}
		s.buf = append(s.buf[:0], rest...)
	}
	// Keep only what may be the start of a HELLO line.
	if keep := helloLen - 1; len(s.buf) > keep {
		s.buf = append(s.buf[:0], s.buf[len(s.buf)-keep:]...)
	}
	return "", false
}

// indexHello returns the offset of the first complete, well-formed HELLO
// line in b, or -1.
func indexHello(b []byte) int {
	off := 0
	for {
		i := bytes.Index(b[off:], []byte(helloPrefix))
		if i < 0 {
			return -1
		}
		i += off
		if len(b)-i < helloLen {
			return -1
		}
		if isNonce(b[i+len(helloPrefix):i+helloLen-1]) && b[i+helloLen-1] == '\n' {
			return i
		}
		off = i + 1
	}
}

func helloLine(nonce string) []byte { return []byte(helloPrefix + nonce + "\n") }

func ollehLine(nonce, version string) []byte {
	return []byte(ollehPrefix + nonce + " " + version + "\n")
}

// clientHandshake writes HELLO on c and reads until the OLLEH with nonce,
// within timeout. It returns the agent's version and the connection to
// speak ttrpc on, which hands on anything read past the OLLEH line.
func clientHandshake(c net.Conn, nonce string, deadline time.Time) (*Conn, error) {
	if err := c.SetDeadline(deadline); err != nil {
		return nil, err
	}
	if _, err := c.Write(helloLine(nonce)); err != nil {
		return nil, fmt.Errorf("write hello: %w", err)
	}
	want := []byte(ollehPrefix + nonce + " ")
	br := bufio.NewReaderSize(c, 4096)
	var carry []byte
	for {
		chunk, err := br.ReadSlice('\n')
		if len(chunk) > 0 {
			line := append(carry, chunk...)
			carry = nil
			if line[len(line)-1] == '\n' {
				if i := bytes.Index(line, want); i >= 0 {
					v := string(line[i+len(want) : len(line)-1])
					if !validVersion(v) {
						return nil, fmt.Errorf("%w: bad agent version %q", ErrHandshake, v)
					}
					if err := c.SetDeadline(time.Time{}); err != nil {
						return nil, err
					}
					return &Conn{Conn: c, br: br, version: v}, nil
				}
			} else if keep := len(want) + MaxVersionLen; len(line) > keep {
				carry = append(carry, line[len(line)-keep:]...)
			} else {
				carry = append(carry, line...)
			}
		}
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return nil, fmt.Errorf("%w (nonce %s): %v", ErrHandshake, nonce, err)
			}
			if errors.Is(err, io.EOF) {
				return nil, fmt.Errorf("%w (nonce %s): connection closed", ErrHandshake, nonce)
			}
			return nil, fmt.Errorf("read olleh: %w", err)
		}
	}
}

// Conn is a host connection to the agent after the handshake.
type Conn struct {
	net.Conn
	br      *bufio.Reader
	version string
}

// AgentVersion is the version the agent announced in its OLLEH line.
func (c *Conn) AgentVersion() string { return c.version }

// Read returns what the handshake buffered past the OLLEH line first.
func (c *Conn) Read(p []byte) (int, error) {
	if c.br != nil {
		if c.br.Buffered() > 0 {
			return c.br.Read(p)
		}
		c.br = nil
	}
	return c.Conn.Read(p)
}
