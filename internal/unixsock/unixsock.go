// Package unixsock creates the daemon's unix sockets safely.
package unixsock

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Options relax Listen's checks.
type Options struct {
	// AllowSharedDir accepts a socket directory (or a parent of it) that
	// users other than root and this one may write to, which lets them
	// rename the socket away and listen in its place.
	AllowSharedDir bool
}

// Listener is a unix socket listener whose Close removes the socket file
// only if it is still the one Listen created: never one that another
// process put at the path since.
type Listener struct {
	*net.UnixListener
	path     string
	dev, ino uint64
	once     sync.Once
}

// Listen listens on a unix socket that only its owner can use (0600). It
// refuses a directory that others may write to (see CheckDir), a path
// that is a symlink or is owned by another user, and replaces a stale
// socket that nothing answers on.
func Listen(path string) (*Listener, error) { return ListenOptions(path, Options{}) }

// ListenOptions is Listen with options.
func ListenOptions(path string, opts Options) (*Listener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return nil, err
	}
	if !opts.AllowSharedDir {
		if err := CheckDir(dir); err != nil {
			return nil, fmt.Errorf("refusing to listen on %s: %w", path, err)
		}
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
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if err != nil {
		return nil, err
	}
	// Go would unlink whatever is at the path on Close.
	l.SetUnlinkOnClose(false)
	var st syscall.Stat_t
	if err := syscall.Lstat(path, &st); err != nil {
		l.Close()
		return nil, err
	}
	return &Listener{UnixListener: l, path: path, dev: uint64(st.Dev), ino: st.Ino}, nil
}

// Path is where the socket was created.
func (l *Listener) Path() string { return l.path }

// Owned reports whether the path still names the socket Listen created
// (it was not removed, or replaced by another).
func (l *Listener) Owned() bool {
	var st syscall.Stat_t
	if err := syscall.Lstat(l.path, &st); err != nil {
		return false
	}
	return uint64(st.Dev) == l.dev && st.Ino == l.ino
}

// Close stops listening and removes the socket file if it is still the
// one Listen created.
func (l *Listener) Close() error {
	err := l.UnixListener.Close()
	l.once.Do(func() {
		if l.Owned() {
			os.Remove(l.path)
		}
	})
	return err
}

// CheckDir refuses a socket directory in which a user other than root and
// this one could rename or remove the socket and listen in its place: the
// directory or a parent of it is owned by another user, or writable by
// others (or by a group other than root's and this process's) without the
// sticky bit, which keeps others from renaming what they do not own (as
// in /tmp).
func CheckDir(dir string) error {
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return err
	}
	for d := real; ; d = filepath.Dir(d) {
		fi, err := os.Lstat(d)
		if err != nil {
			return err
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return fmt.Errorf("cannot check the owner of %s", d)
		}
		mode := fi.Mode()
		sticky := mode&os.ModeSticky != 0
		switch {
		case st.Uid != 0 && int(st.Uid) != os.Geteuid():
			return fmt.Errorf("%w: %s is owned by uid %d", ErrSharedDir, d, st.Uid)
		case mode.Perm()&0o002 != 0 && !sticky:
			return fmt.Errorf("%w: %s is writable by every user (mode %04o)", ErrSharedDir, d, mode.Perm())
		case mode.Perm()&0o020 != 0 && !sticky && st.Gid != 0 && int(st.Gid) != os.Getegid():
			return fmt.Errorf("%w: %s is writable by group %d (mode %04o)", ErrSharedDir, d, st.Gid, mode.Perm())
		}
		if d == "/" || d == "." {
			return nil
		}
	}
}

// ErrSharedDir is wrapped by CheckDir's errors.
var ErrSharedDir = errors.New("socket directory writable by other users (another user could take the socket's place; set allow_shared_socket_dir = true to accept it)")

// Answers reports whether something accepts connections on path.
func Answers(path string) bool {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// PeerCred is the kernel's record of the process at the other end of c
// (SO_PEERCRED): who connected, or who listens.
func PeerCred(c *net.UnixConn) (*unix.Ucred, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, cerr
}

// ServingPID is the pid of the process that listens on path: the peer
// credentials of a connection to it, which a stopped process answers too.
func ServingPID(path string) (int, error) {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	cred, err := PeerCred(c.(*net.UnixConn))
	if err != nil {
		return 0, err
	}
	return int(cred.Pid), nil
}
