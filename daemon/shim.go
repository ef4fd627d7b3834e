package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/resource-slot-sandboxer/config"
	"github.com/kuasar-io/resource-slot-sandboxer/cri"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/unixsock"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
)

// ShimBinary is the task shim: a long-lived proxy in front of the task
// server, so that containerd's task connections outlive sandboxer restarts.
const ShimBinary = "containerd-shim-resource-slot-v1"

// shimCheckInterval is how often the supervisor checks that the task
// socket still leads to the shim it watches.
const shimCheckInterval = 2 * time.Second

// shim keeps one task shim serving the task socket: it reuses the one
// that serves it (started by an earlier run of the daemon, it holds
// containerd's connections), else starts one, and starts a new one when
// it dies.
//
// containerd takes the closed connections of a dead shim for the end of
// its containers (it reports them exited with status 255, and does not
// come back to them): so do the daemon's records, the moment it finds the
// shim dead or gone (abandon). The containers of the direct CRI service
// do not go through the shim and are left alone.
type shim struct {
	cfg   config.Config
	tasks *sandboxer.Tasks
	ctrl  *sandboxer.Controller

	mu      sync.Mutex
	pid     int
	exited  chan struct{} // closed when the watched shim ends
	stopped bool          // the watched shim is stopped (logged once)
}

// nobodyServes reports whether a dial error means that no process serves
// the socket (rather than one that does not accept now).
func nobodyServes(err error) bool {
	return errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED)
}

// cmdline is a process's arguments.
func cmdline(pid int) ([]string, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return nil, err
	}
	return strings.Split(strings.TrimRight(string(data), "\x00"), "\x00"), nil
}

// flagValue is the value of --name (or -name) in args.
func flagValue(args []string, name string) string {
	for i, a := range args {
		for _, p := range []string{"--" + name, "-" + name} {
			if a == p && i+1 < len(args) {
				return args[i+1]
			}
			if v, ok := strings.CutPrefix(a, p+"="); ok {
				return v
			}
		}
	}
	return ""
}

// isShimOf reports whether args are those of a task shim serving sock.
func isShimOf(args []string, sock string) bool {
	return len(args) > 1 && filepath.Base(args[0]) == ShimBinary && args[1] == "serve" && flagValue(args, "socket") == sock
}

// checkShim makes sure that pid, which serves the task socket, is a task
// shim that forwards to this daemon.
func (s *shim) checkShim(pid int) error {
	sock, upstream := s.cfg.TaskSocketPath(), s.cfg.TaskUpstreamPath()
	args, err := cmdline(pid)
	if err != nil {
		return fmt.Errorf("task socket %s: its server (pid %d): %w", sock, pid, err)
	}
	if !isShimOf(args, sock) {
		return fmt.Errorf("task socket %s is served by pid %d (%s), not by the task shim %s", sock, pid, strings.Join(args, " "), ShimBinary)
	}
	if got := flagValue(args, "upstream"); got != upstream {
		return fmt.Errorf("the task shim on %s (pid %d) forwards to %s, not to this daemon's %s", sock, pid, got, upstream)
	}
	return nil
}

// otherShims are the processes of task shims for sock other than pid:
// orphans of earlier daemons whose socket was removed or replaced. They
// serve what containerd still holds of them and exit when it is closed.
func otherShims(sock string, pid int) []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil || p == pid {
			continue
		}
		if args, err := cmdline(p); err == nil && isShimOf(args, sock) {
			out = append(out, p)
		}
	}
	return out
}

// waitPid returns a channel closed when the process pid (not a child of
// this one) ends, or ctx does: a pidfd, readable once the process has
// exited; where pidfds are missing (Linux < 5.3), kill(pid, 0) polled.
func waitPid(ctx context.Context, pid int) chan struct{} {
	ch := make(chan struct{})
	fd, err := unix.PidfdOpen(pid, 0)
	go func() {
		defer close(ch)
		if err != nil {
			for unix.Kill(pid, 0) == nil {
				select {
				case <-ctx.Done():
					return
				case <-time.After(500 * time.Millisecond):
				}
			}
			return
		}
		defer unix.Close(fd)
		for ctx.Err() == nil {
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			if n, err := unix.Poll(fds, 500); n > 0 || (err != nil && err != unix.EINTR) {
				return
			}
		}
	}()
	return ch
}

// processState is a process's state letter (R, S, T, Z, ...).
func processState(pid int) byte {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(data, ')')
	if i < 0 || i+2 >= len(data) {
		return 0
	}
	return data[i+2]
}

// ensure makes a task shim serve the task socket: the one that serves it,
// else a new one (after ending what containerd ended with the one that
// is gone).
func (s *shim) ensure(ctx context.Context) error {
	sock := s.cfg.TaskSocketPath()
	pid, err := unixsock.ServingPID(sock)
	switch {
	case err == nil:
		if err := s.checkShim(pid); err != nil {
			return err
		}
		s.watch(pid, waitPid(ctx, pid))
		log.G(ctx).WithFields(log.Fields{"pid": pid, "task_socket": sock}).Info("reusing the running task shim")
		s.checkStopped(ctx)
	case nobodyServes(err):
		s.abandon(ctx, "no task shim served "+sock)
		if err := s.spawn(ctx); err != nil {
			return err
		}
	default:
		// Something listens and does not accept (its backlog is full: a
		// stopped shim). Wait for it rather than start a second one.
		log.G(ctx).WithError(err).WithField("task_socket", sock).Error("the task socket does not accept connections; is the task shim stopped? Waiting for it")
	}
	if others := otherShims(sock, s.current()); len(others) > 0 {
		log.G(ctx).WithFields(log.Fields{"pids": others, "task_socket": sock}).Warn("task shims of earlier daemons whose socket was removed or replaced are running; they serve the connections containerd still holds and exit when those close")
	}
	return nil
}

func (s *shim) current() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pid
}

func (s *shim) watch(pid int, exited chan struct{}) {
	s.mu.Lock()
	s.pid, s.exited, s.stopped = pid, exited, false
	s.mu.Unlock()
}

// checkStopped logs, once per stop, a watched shim that is stopped
// (SIGSTOP): containerd's task calls wait until it continues.
func (s *shim) checkStopped(ctx context.Context) {
	s.mu.Lock()
	pid, was := s.pid, s.stopped
	st := processState(pid)
	s.stopped = st == 'T' || st == 't'
	now := s.stopped
	s.mu.Unlock()
	switch {
	case now && !was:
		log.G(ctx).WithField("pid", pid).Warn("the task shim is stopped (SIGSTOP?): containerd's task calls wait until it continues (SIGCONT)")
	case was && !now:
		log.G(ctx).WithField("pid", pid).Info("the task shim runs again")
	}
}

// spawn starts a task shim and waits until it serves the socket.
func (s *shim) spawn(ctx context.Context) error {
	cfg := s.cfg
	sock := cfg.TaskSocketPath()
	bin, err := shimPath()
	if err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(cfg.Dir, "shim.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	args := []string{"serve", "--socket", sock, "--upstream", cfg.TaskUpstreamPath(),
		"--orphan-timeout", time.Duration(cfg.ShimOrphanTimeout).String(), "--log-level", cfg.LogLevel}
	if cfg.AllowSharedSocketDir {
		args = append(args, "--allow-shared-socket-dir")
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own session: the shim must outlive the daemon, as containerd's
	// shims outlive containerd.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Dir = "/"
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start task shim: %w", err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	deadline := time.After(10 * time.Second)
	for {
		if pid, err := unixsock.ServingPID(sock); err == nil && pid == cmd.Process.Pid {
			break
		}
		select {
		case <-exited:
			return fmt.Errorf("task shim %s exited: %v (see %s)", bin, waitErr, logf.Name())
		case <-deadline:
			cmd.Process.Kill()
			return fmt.Errorf("task shim did not listen on %s", sock)
		case <-time.After(20 * time.Millisecond):
		}
	}
	s.watch(cmd.Process.Pid, exited)
	log.G(ctx).WithFields(log.Fields{"pid": cmd.Process.Pid, "task_socket": sock}).Info("started the task shim")
	return nil
}

// supervise keeps a task shim serving until ctx ends: it starts a new one
// when the watched one dies, and follows the task socket when it is
// removed or taken over.
func (s *shim) supervise(ctx context.Context) {
	sock := s.cfg.TaskSocketPath()
	tick := time.NewTicker(shimCheckInterval)
	defer tick.Stop()
	backoff := time.Second
	for {
		s.mu.Lock()
		pid, exited := s.pid, s.exited
		s.mu.Unlock()
		if exited == nil {
			exited = make(chan struct{}) // none watched yet
		}
		select {
		case <-ctx.Done():
			return
		case <-exited:
			log.G(ctx).WithField("pid", pid).Error("the task shim exited: containerd ends the containers it served (exit status 255); ending them here too and starting a new shim")
			s.watch(0, nil)
			s.abandon(ctx, fmt.Sprintf("the task shim (pid %d) exited", pid))
			s.restart(ctx, &backoff)
			continue
		case <-tick.C:
		}
		if st := processState(pid); pid != 0 && (st == 'T' || st == 't') {
			// Stopped: a connection would wait in its backlog until it
			// continues (and fill it, for containerd too).
			s.checkStopped(ctx)
			continue
		}
		now, err := unixsock.ServingPID(sock)
		switch {
		case err == nil && now == pid:
			backoff = time.Second
			s.checkStopped(ctx)
		case err == nil:
			// Another process serves the socket now.
			if cerr := s.checkShim(now); cerr != nil {
				log.G(ctx).WithError(cerr).Error("the task socket was taken over")
				continue
			}
			log.G(ctx).WithFields(log.Fields{"pid": now, "was": pid}).Warn("another task shim serves the task socket; watching it instead")
			s.watch(now, waitPid(ctx, now))
		case nobodyServes(err) && pid != 0:
			// The watched shim lives, but its socket was removed or
			// replaced: it keeps its connections and exits once they
			// close; a new shim serves the path.
			log.G(ctx).WithError(err).WithFields(log.Fields{"pid": pid, "task_socket": sock}).Warn("the task socket no longer leads to the task shim; starting a new one")
			s.restart(ctx, &backoff)
		case nobodyServes(err):
			s.restart(ctx, &backoff)
		}
	}
}

// restart starts a shim, retrying with a backoff until one serves or ctx
// ends.
func (s *shim) restart(ctx context.Context, backoff *time.Duration) {
	for {
		err := s.spawn(ctx)
		if err == nil {
			return
		}
		log.G(ctx).WithError(err).WithField("retry_in", *backoff).Error("start the task shim")
		select {
		case <-ctx.Done():
			return
		case <-time.After(*backoff):
		}
		*backoff = min(*backoff*2, 30*time.Second)
	}
}

// abandon ends and removes the containers containerd ran through the task
// shim that is gone: containerd reported them exited (255) and will not
// ask for them again, so the daemon must not keep them running, nor count
// their resources.
func (s *shim) abandon(ctx context.Context, why string) {
	var ended []string
	for _, v := range s.ctrl.List() {
		for id, c := range v.State.Containers {
			if c.Task == nil || c.Task.Namespace == cri.Namespace {
				continue
			}
			k := sandboxer.TaskKey{Namespace: c.Task.Namespace, ID: id}
			tctx := sandboxer.WithTask(namespaces.WithNamespace(ctx, k.Namespace), k, v.State.ID)
			if err := endTask(tctx, s.tasks, k, c.Task.Status); err != nil {
				log.G(tctx).WithError(err).Error("end a container of the task shim that is gone")
				continue
			}
			ended = append(ended, id)
		}
	}
	if len(ended) > 0 {
		log.G(ctx).WithFields(log.Fields{"containers": ended, "reason": why}).Warn("ended the containers containerd ran through the task shim that is gone, as containerd did")
	}
}

// endTask kills a task's processes if they run, and deletes the task.
func endTask(ctx context.Context, tasks *sandboxer.Tasks, k sandboxer.TaskKey, status string) error {
	if status == sandboxer.TaskRunning || status == sandboxer.TaskPaused {
		if err := tasks.Kill(ctx, k, "", syscall.SIGKILL, true); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := tasks.Wait(wctx, k, "")
		cancel()
		if err != nil && !errdefs.IsNotFound(err) {
			return err
		}
	}
	if _, err := tasks.Delete(ctx, k, ""); err != nil && !errdefs.IsNotFound(err) {
		return err
	}
	return nil
}

// shimPath finds the shim next to the daemon's executable, else on PATH.
func shimPath() (string, error) {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), ShimBinary)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	p, err := exec.LookPath(ShimBinary)
	if err != nil {
		return "", fmt.Errorf("%s is neither next to the daemon nor on PATH: %w", ShimBinary, err)
	}
	return p, nil
}
