// Package unixsock creates the daemon's unix sockets safely.
package unixsock

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// Listen listens on a unix socket that only root can use (0600). It
// refuses a path that is a symlink or is owned by another user, and
// replaces a stale socket that nothing answers on.
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o711); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(path); err == nil {
		st, _ := fi.Sys().(*syscall.Stat_t)
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			return nil, fmt.Errorf("refusing to listen on %s: it is a symlink", path)
		case st != nil && int(st.Uid) != os.Geteuid():
			return nil, fmt.Errorf("refusing to listen on %s: owned by uid %d", path, st.Uid)
		case fi.Mode()&os.ModeSocket == 0:
			return nil, fmt.Errorf("refusing to listen on %s: it exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("another process is serving on %s", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, err
		}
	} else if !os.IsNotExist(err) {
		return nil, err
	}
	// The umask makes the socket 0600 from its creation: no window in
	// which another user could connect.
	old := syscall.Umask(0o177)
	lis, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, err
	}
	return lis, nil
}

// Answers reports whether something accepts connections on path.
func Answers(path string) bool {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}
