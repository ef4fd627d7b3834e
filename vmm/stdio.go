package vmm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
	"github.com/kuasar-io/resource-slot-sandboxer/backend"
)

// Stdio of a process in the guest, seen from the host.
//
// containerd created the process's FIFOs on the host and reads stdout and
// stderr, and writes stdin, until it sees their end. The agent buffers the
// process's output in the guest; a copier per stream pulls it with
// ReadStdio from the offset after what it has written to the FIFO (so
// output is delivered at least once across a restart of the daemon, and
// the agent releases what was delivered), and a copier pushes what
// containerd writes to stdin with WriteStdin.
//
// containerd takes the end of the FIFO's writers for the end of the
// output: if the daemon held the only write ends, a daemon restart would
// end every container's log. So a keeper, a process of its own (sleep
// with the FIFOs as extra files, argv[0] naming the process), holds a
// second write end of stdout and stderr and a read end of stdin (which
// never reads: stdin written meanwhile waits in the pipe) from the
// process's creation until its output ended; the daemon finds the keepers
// again after a restart by their argv[0].

// keeperPrefix starts a keeper's argv[0]; the process's key follows.
const keeperPrefix = "rss-stdio-keeper/"

// keeperBinary is what a keeper runs: GNU sleep, "infinity".
var keeperBinary = "/bin/sleep"

// procKey names a process for keepers and logs: sandbox/container/exec.
func procKey(p backend.Process) string { return p.SandboxID + "/" + p.ContainerID + "/" + p.ExecID }

// hostStdio holds the host ends of a process's FIFOs: stdout and stderr
// opened read-write (a FIFO opened so never blocks, and never sees the
// loss of its reader: the output waits in the pipe while containerd
// restarts), stdin opened for reading before the keeper's end, so that a
// writer that comes, writes and goes before the copier runs is seen to
// go. Every file is non-blocking, so closing it ends a copy that waits on
// it.
type hostStdio struct {
	stdout, stderr *os.File
	stdin          *stdinFIFO
	keep           []*os.File // the same FIFOs again, for the keeper
}

func openHostStdio(io_ backend.IO) (_ *hostStdio, retErr error) {
	h := &hostStdio{}
	defer func() {
		if retErr != nil {
			h.close()
		}
	}()
	open := func(path string, flag int) (*os.File, error) {
		fd, err := unix.Open(path, flag|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", path, err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
			unix.Close(fd)
			return nil, fmt.Errorf("stdio %s is not a FIFO: %w", path, errdefs.ErrInvalidArgument)
		}
		return os.NewFile(uintptr(fd), path), nil
	}
	outputs := []struct {
		path string
		dst  **os.File
	}{{io_.Stdout, &h.stdout}}
	if !io_.Terminal {
		outputs = append(outputs, struct {
			path string
			dst  **os.File
		}{io_.Stderr, &h.stderr})
	}
	for _, o := range outputs {
		if o.path == "" {
			continue
		}
		f, err := open(o.path, unix.O_RDWR)
		if err != nil {
			return nil, err
		}
		*o.dst = f
		k, err := open(o.path, unix.O_RDWR)
		if err != nil {
			return nil, err
		}
		h.keep = append(h.keep, k)
	}
	if io_.Stdin != "" {
		in, err := open(io_.Stdin, unix.O_RDONLY)
		if err != nil {
			return nil, err
		}
		// The stdin reader is read with poll(2), not the runtime poller.
		fd, err := unix.Dup(int(in.Fd()))
		in.Close()
		if err != nil {
			return nil, fmt.Errorf("stdin %s: %w", io_.Stdin, err)
		}
		unix.CloseOnExec(fd)
		h.stdin = &stdinFIFO{fd: fd, closed: make(chan struct{})}
		k, err := open(io_.Stdin, unix.O_RDONLY)
		if err != nil {
			return nil, err
		}
		h.keep = append(h.keep, k)
	}
	return h, nil
}

func (h *hostStdio) close() {
	for _, f := range []*os.File{h.stdout, h.stderr} {
		if f != nil {
			f.Close()
		}
	}
	if h.stdin != nil {
		h.stdin.release()
	}
	h.closeKeep()
}

func (h *hostStdio) closeKeep() {
	for _, f := range h.keep {
		f.Close()
	}
	h.keep = nil
}

// stdinFIFO is the host's read end of a stdin FIFO, read with poll(2)
// rather than the runtime's poller: a non-blocking FIFO reader reads "end
// of file" while no writer has come yet, which poll tells apart (it
// reports a hang-up only once a writer came and went, and data whenever
// there is some: what containerd wrote and closed before the daemon opened
// its end waits in the pipe, which the keeper holds open).
type stdinFIFO struct {
	fd     int
	closed chan struct{}
	once   sync.Once
}

// Read returns data, io.EOF once every writer that came has gone and the
// pipe is empty, or os.ErrClosed after Close.
func (f *stdinFIFO) Read(b []byte) (int, error) {
	for {
		select {
		case <-f.closed:
			return 0, os.ErrClosed
		default:
		}
		fds := []unix.PollFd{{Fd: int32(f.fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 100)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return 0, err
		}
		if n == 0 {
			continue
		}
		re := fds[0].Revents
		if re&unix.POLLIN != 0 {
			m, err := unix.Read(f.fd, b)
			switch {
			case m > 0:
				return m, nil
			case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EINTR):
				continue
			case err != nil:
				return 0, err
			default:
				return 0, io.EOF
			}
		}
		if re&(unix.POLLHUP|unix.POLLERR) != 0 {
			return 0, io.EOF
		}
	}
}

// Close ends a Read in progress and closes the FIFO.
func (f *stdinFIFO) Close() {
	f.once.Do(func() { close(f.closed) })
}

func (f *stdinFIFO) release() { unix.Close(f.fd) }

// startKeeper starts the keeper of process key holding files, in a session
// of its own so that it outlives the daemon.
func startKeeper(key string, files []*os.File) (*exec.Cmd, error) {
	if len(files) == 0 {
		return nil, nil
	}
	cmd := &exec.Cmd{
		Path:        keeperBinary,
		Args:        []string{keeperPrefix + key, "infinity"},
		ExtraFiles:  files,
		SysProcAttr: &syscall.SysProcAttr{Setsid: true},
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the stdio keeper of %s: %w", key, err)
	}
	go cmd.Wait() //nolint:errcheck // reaps it once it is killed
	return cmd, nil
}

// findKeepers returns the pids of the running keepers by process key,
// for the keys keep accepts.
func findKeepers(match func(key string) bool) map[string]int {
	out := map[string]int{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return out
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if key, ok := keeperKey(pid); ok && match(key) {
			out[key] = pid
		}
	}
	return out
}

// keeperKey reads the process key of pid if pid is a keeper.
func keeperKey(pid int) (string, bool) {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	if err != nil || !bytes.HasPrefix(data, []byte(keeperPrefix)) {
		return "", false
	}
	arg0, _, _ := bytes.Cut(data, []byte{0})
	return strings.TrimPrefix(string(arg0), keeperPrefix), true
}

// killKeeper ends the keeper of key with pid, after checking that pid is
// still that keeper.
func killKeeper(key string, pid int) {
	if k, ok := keeperKey(pid); ok && k == key {
		_ = unix.Kill(pid, unix.SIGKILL)
	}
}

// stdioCopier copies one process's stdio between the host FIFOs and the
// guest. Its goroutines end when the output ended (eof from the agent),
// the process was released in the guest, or stop was called.
type stdioCopier struct {
	g    *guestConn
	p    backend.Process
	host *hostStdio

	ctx    context.Context
	cancel context.CancelFunc
	outWG  sync.WaitGroup // the output copiers
	inWG   sync.WaitGroup // the stdin copier

	mu       sync.Mutex
	stdin    *stdinFIFO
	keeper   *exec.Cmd
	keeperID int // pid of a keeper found after a restart
	outLeft  int // output copiers still running
	outputs  int // output streams
	finished int // output streams that ended in the guest
}

// startCopier starts copying p's stdio. keeperPid is the pid of p's
// keeper found after a restart; with recovering false a keeper is started.
func (b *Backend) startCopier(g *guestConn, p backend.Process, io_ backend.IO, keeperPid int, recovering bool) (*stdioCopier, error) {
	host, err := openHostStdio(io_)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(b.bgctx)
	c := &stdioCopier{g: g, p: p, host: host, ctx: ctx, cancel: cancel, keeperID: keeperPid}
	if !recovering {
		k, err := startKeeper(procKey(p), host.keep)
		if err != nil {
			cancel()
			host.close()
			return nil, err
		}
		c.keeper = k
	}
	host.closeKeep() // the keeper has its own copies
	type output struct {
		w      *os.File
		stream api.Stream
	}
	var outs []output
	for _, o := range []output{{host.stdout, api.Stream_STDOUT}, {host.stderr, api.Stream_STDERR}} {
		if o.w != nil {
			outs = append(outs, o)
		}
	}
	c.outLeft, c.outputs = len(outs), len(outs)
	if host.stdin != nil {
		c.stdin = host.stdin
	}
	if len(outs) == 0 && host.stdin == nil {
		c.releaseKeeper()
	}
	for _, o := range outs {
		c.outWG.Add(1)
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			defer c.outWG.Done()
			c.copyOut(o.w, o.stream)
		}()
	}
	if host.stdin != nil {
		c.inWG.Add(1)
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			defer c.inWG.Done()
			c.copyIn(host.stdin)
		}()
	}
	return c, nil
}

// copyOut pulls one output stream from the agent into its FIFO.
func (c *stdioCopier) copyOut(w *os.File, stream api.Stream) {
	logger := log.G(c.ctx).WithField("process", procKey(c.p)).WithField("stream", stream.String())
	// finished: the stream ended in the guest (eof, or the process was
	// released); only then may the keeper let containerd see its end.
	finished := false
	defer func() {
		w.Close()
		c.mu.Lock()
		c.outLeft--
		last := c.outLeft == 0 && finished
		if finished {
			c.finished++
		}
		all := c.finished == c.outputs
		c.mu.Unlock()
		if last && all {
			c.releaseKeeper()
		}
	}()
	// -1: the oldest output the agent kept, which after a restart is what
	// was not yet acknowledged.
	offset := int64(-1)
	pause := reconnectMin
	for c.ctx.Err() == nil {
		_, agent, err := c.g.clients(c.ctx)
		if err == nil {
			ctx, cancel := context.WithTimeout(c.ctx, pollWait+callTimeout)
			var resp *api.ReadStdioResponse
			resp, err = agent.ReadStdio(ctx, &api.ReadStdioRequest{
				ContainerId: c.p.ContainerID, ExecId: c.p.ExecID, Stream: stream,
				Offset: offset, MaxBytes: 64 << 10, WaitMs: uint32(pollWait / time.Millisecond),
			})
			cancel()
			err = guestErr(c.p.SandboxID, "read stdio", err)
			if err == nil {
				pause = reconnectMin
				if data := resp.GetData(); len(data) > 0 {
					if _, err := w.Write(data); err != nil {
						if c.ctx.Err() == nil {
							logger.WithError(err).Warn("write container output to containerd's FIFO")
						}
						return
					}
				}
				offset = resp.GetOffset() + int64(len(resp.GetData()))
				if resp.GetEof() {
					finished = true
					return
				}
				continue
			}
		}
		if errdefs.IsNotFound(err) {
			logger.WithError(err).Debug("stdio released in the guest")
			finished = true
			return
		}
		if c.ctx.Err() != nil {
			return
		}
		logger.WithError(err).Debug("read stdio; retrying")
		select {
		case <-c.ctx.Done():
			return
		case <-time.After(pause):
		}
		pause = min(pause*2, reconnectMax)
	}
}

// copyIn pushes what containerd writes to stdin into the guest, and closes
// the process's stdin when containerd closes its end.
func (c *stdioCopier) copyIn(r *stdinFIFO) {
	defer r.release()
	buf := make([]byte, 32<<10)
	for {
		n, rerr := r.Read(buf)
		if errors.Is(rerr, os.ErrClosed) {
			return // closeStdin or stop: they close the guest's stdin
		}
		if n > 0 || rerr != nil {
			eof := rerr != nil
			if !c.writeStdin(buf[:n], eof) || eof {
				return
			}
		}
	}
}

// writeStdin sends data (and the close) to the guest, retrying while the
// guest is unreachable; false when the process's stdin is gone or the
// copier stopped.
func (c *stdioCopier) writeStdin(data []byte, closeIt bool) bool {
	pause := reconnectMin
	for c.ctx.Err() == nil {
		_, agent, err := c.g.clients(c.ctx)
		if err == nil {
			ctx, cancel := context.WithTimeout(c.ctx, callTimeout)
			var resp *api.WriteStdinResponse
			resp, err = agent.WriteStdin(ctx, &api.WriteStdinRequest{
				ContainerId: c.p.ContainerID, ExecId: c.p.ExecID, Data: data, Close: closeIt,
			})
			cancel()
			err = guestErr(c.p.SandboxID, "write stdin", err)
			if err == nil {
				if int(resp.GetWritten()) >= len(data) {
					return true
				}
				data = data[resp.GetWritten():]
				continue
			}
		}
		if errdefs.IsNotFound(err) || errdefs.IsFailedPrecondition(err) {
			return false
		}
		select {
		case <-c.ctx.Done():
			return false
		case <-time.After(pause):
		}
		pause = min(pause*2, reconnectMax)
	}
	return false
}

// closeStdin closes the process's stdin (the task API's CloseIO): what
// containerd wrote before is forwarded first (for up to a second), then
// the guest's stdin is closed.
func (c *stdioCopier) closeStdin() {
	if c.host.stdin == nil {
		return
	}
	done := make(chan struct{})
	go func() { c.inWG.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(time.Second):
		c.mu.Lock()
		if c.stdin != nil {
			c.stdin.Close()
		}
		c.mu.Unlock()
		<-done
	}
	c.writeStdin(nil, true)
}

// releaseKeeper ends the keeper once the output is delivered, so that
// containerd sees the end of the FIFOs.
func (c *stdioCopier) releaseKeeper() {
	c.mu.Lock()
	k, pid := c.keeper, c.keeperID
	c.keeper, c.keeperID = nil, 0
	c.mu.Unlock()
	if k != nil {
		_ = k.Process.Kill()
	}
	if pid != 0 {
		killKeeper(procKey(c.p), pid)
	}
}

// stop ends the copier: it waits up to wait for the output to end by
// itself, then stops copying and closes the host FIFOs. With release, the
// keeper ends too (the process is gone); without (the daemon is shutting
// down), it keeps the FIFOs open for the next daemon.
func (c *stdioCopier) stop(wait time.Duration, release bool) {
	done := make(chan struct{})
	go func() { c.outWG.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(wait):
	}
	c.cancel()
	c.mu.Lock()
	if c.stdin != nil {
		c.stdin.Close()
	}
	for _, f := range []*os.File{c.host.stdout, c.host.stderr} {
		if f != nil {
			f.SetWriteDeadline(time.Unix(1, 0)) //nolint:errcheck // ends a write waiting for containerd
		}
	}
	c.mu.Unlock()
	<-done
	c.inWG.Wait()
	if release {
		c.releaseKeeper()
	}
}
