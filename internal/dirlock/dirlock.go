// Package dirlock gives one process at a time a state directory: two
// daemons on one directory would each take the other's sandboxes for
// their own and diverge.
package dirlock

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// File is the lock file in the directory (recovery skips files).
const File = ".lock"

// Lock is an exclusive lock (flock) on a directory, held until Release or
// the process's end: the kernel releases it with the last descriptor, so
// a killed daemon never leaves it behind.
type Lock struct{ f *os.File }

// ErrLocked is wrapped by Acquire's error when another process holds the
// lock.
var ErrLocked = errors.New("state directory in use")

// Acquire creates dir (0700) if needed and locks it, or fails at once,
// naming the process that holds it, when another one does.
func Acquire(dir string) (*Lock, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, File)
	// O_CLOEXEC (Go's default): no child, the task shim included,
	// inherits the lock.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock state directory: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		holder := "another process"
		if data, rerr := os.ReadFile(path); rerr == nil {
			if pid, perr := strconv.Atoi(strings.TrimSpace(string(data))); perr == nil && pid > 0 {
				holder = fmt.Sprintf("another resource-slot-sandboxer (pid %d)", pid)
			}
		}
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s is used by %s; two daemons on one state directory would each take the other's sandboxes for their own: stop it, or give this one another --dir", ErrLocked, dir, holder)
		}
		return nil, fmt.Errorf("lock state directory %s: %w", dir, err)
	}
	// The holder's pid, for the message above (the lock is the flock,
	// not this content).
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return &Lock{f: f}, nil
}

// Release unlocks the directory.
func (l *Lock) Release() error { return l.f.Close() }
