package transport

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// VirtioPortsDir lists the guest's virtio-serial ports.
const VirtioPortsDir = "/sys/class/virtio-ports"

// FindPort returns the device (/dev/vportNpM) of the virtio-serial port
// named name, or an error wrapping errdefs.ErrNotFound.
func FindPort(name string) (string, error) {
	names, err := filepath.Glob(filepath.Join(VirtioPortsDir, "*", "name"))
	if err != nil {
		return "", err
	}
	for _, f := range names {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if strings.TrimSpace(string(b)) == name {
			return "/dev/" + filepath.Base(filepath.Dir(f)), nil
		}
	}
	return "", fmt.Errorf("virtio-serial port %q: %w", name, errdefs.ErrNotFound)
}

// devOpener opens the named port's device. The port signals SIGIO when the
// host connects or sends data (O_ASYNC), which wakes WaitHost; a poll every
// hostPoll covers a lost signal.
type devOpener struct {
	name  string
	sigio chan os.Signal
}

const hostPoll = 250 * time.Millisecond

func newDevOpener(name string) (*devOpener, error) {
	o := &devOpener{name: name, sigio: make(chan os.Signal, 1)}
	signal.Notify(o.sigio, syscall.SIGIO)
	return o, nil
}

func (o *devOpener) Open() (port, error) {
	dev, err := FindPort(o.name)
	if err != nil {
		return nil, err
	}
	// A port can be open once at a time: EBUSY is retried by the caller.
	return os.OpenFile(dev, os.O_RDWR, 0)
}

// WaitHost waits for the host to connect to p: the port raises SIGIO
// (O_ASYNC, enabled only while waiting) when the host connects, and
// poll(2) reports POLLHUP while no host is connected.
func (o *devOpener) WaitHost(p port, stop <-chan struct{}) {
	f, ok := p.(*os.File)
	if !ok {
		sleep(hostPoll, stop)
		return
	}
	rc, err := f.SyscallConn()
	if err != nil {
		sleep(hostPoll, stop)
		return
	}
	setAsync := func(on bool) (hup bool) {
		rc.Control(func(fd uintptr) {
			if on {
				unix.FcntlInt(fd, unix.F_SETOWN, os.Getpid())
			}
			if fl, err := unix.FcntlInt(fd, unix.F_GETFL, 0); err == nil {
				if on {
					fl |= unix.O_ASYNC
				} else {
					fl &^= unix.O_ASYNC
				}
				unix.FcntlInt(fd, unix.F_SETFL, fl)
			}
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			if n, err := unix.Poll(pfd, 0); err == nil && n == 1 {
				hup = pfd[0].Revents&unix.POLLHUP != 0 && pfd[0].Revents&unix.POLLIN == 0
			}
		})
		return hup
	}
	defer setAsync(false)
	if !setAsync(true) {
		return // connected meanwhile, or data to read
	}
	t := time.NewTimer(hostPoll)
	defer t.Stop()
	select {
	case <-o.sigio:
	case <-t.C:
	case <-stop:
	}
}

func sleep(d time.Duration, stop <-chan struct{}) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-stop:
	}
}

func (o *devOpener) Close() { signal.Stop(o.sigio) }
