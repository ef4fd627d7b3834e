package e2e

// The fault-injection suite: what the daemon's neighbours and its callers
// can do to it (a graceful stop, a dead or stopped task shim, an
// unreachable events socket, a second daemon, a hostile socket directory,
// malformed messages), each through a real containerd.

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	taskapi "github.com/containerd/containerd/api/runtime/task/v3"
	eventsapi "github.com/containerd/containerd/api/services/events/v1"
	sbapi "github.com/containerd/containerd/api/services/sandbox/v1"
	apitypes "github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/hostile"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/unixsock"
)

// exitWatch records the task exit events containerd publishes.
type exitWatch struct {
	mu     sync.Mutex
	exits  map[string]string // container ID -> the event, as text
	cancel context.CancelFunc
}

// watchExits subscribes to containerd's /tasks/exit events in the CRI's
// namespace until the test ends.
func (x *harness) watchExits(t *testing.T) *exitWatch {
	t.Helper()
	ctx, cancel := context.WithCancel(namespaces.WithNamespace(context.Background(), "k8s.io"))
	w := &exitWatch{exits: map[string]string{}, cancel: cancel}
	t.Cleanup(cancel)
	stream, err := eventsapi.NewEventsClient(x.conn).Subscribe(ctx, &eventsapi.SubscribeRequest{Filters: []string{`topic=="/tasks/exit"`}})
	require.NoError(t, err)
	ready := make(chan struct{})
	go func() {
		close(ready)
		for {
			ev, err := stream.Recv()
			if err != nil {
				return
			}
			// The envelope's event is a TaskExit; its text names the
			// container ID, enough to match.
			text := fmt.Sprint(ev.GetEvent())
			w.mu.Lock()
			w.exits[text] = text
			w.mu.Unlock()
		}
	}()
	<-ready
	return w
}

// exited reports the exit events seen that name one of ids.
func (w *exitWatch) exited(ids ...string) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for text := range w.exits {
		for _, id := range ids {
			if strings.Contains(text, id) {
				out = append(out, text)
			}
		}
	}
	return out
}

// runContainers starts a pod with n running containers through
// containerd and returns the pod's and the containers' IDs.
func (x *harness) runContainers(t *testing.T, name string, n int) (string, []string) {
	t.Helper()
	ctx := context.Background()
	pod := podConfig(name, nil, nil)
	pod.LogDirectory = t.TempDir()
	resp, err := x.cri.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: pod, RuntimeHandler: "resource-slot"})
	require.NoError(t, err)
	t.Cleanup(func() {
		x.cri.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: resp.PodSandboxId})
		x.cri.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: resp.PodSandboxId})
	})
	var ids []string
	for i := range n {
		c, err := x.cri.CreateContainer(ctx, &runtime.CreateContainerRequest{
			PodSandboxId: resp.PodSandboxId, Config: containerConfig(fmt.Sprintf("c%d", i), nil, nil), SandboxConfig: pod,
		})
		require.NoError(t, err)
		_, err = x.cri.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: c.ContainerId})
		require.NoError(t, err)
		ids = append(ids, c.ContainerId)
	}
	return resp.PodSandboxId, ids
}

// containerStates is the CRI state of each container, as containerd
// reports it.
func (x *harness) containerStates(t *testing.T, ids []string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, id := range ids {
		st, err := x.cri.ContainerStatus(context.Background(), &runtime.ContainerStatusRequest{ContainerId: id})
		require.NoError(t, err)
		out[id] = fmt.Sprintf("%s exit=%d", st.Status.State, st.Status.ExitCode)
	}
	return out
}

func allRunning(ids []string) map[string]string {
	out := map[string]string{}
	for _, id := range ids {
		out[id] = "CONTAINER_RUNNING exit=0"
	}
	return out
}

// TestGracefulStopKeepsContainers: a graceful stop (SIGTERM, what
// systemctl stop and restart send) of the daemon ends no container:
// containerd's Waits through the task shim outlive it, and containerd
// publishes no exit.
func TestGracefulStopKeepsContainers(t *testing.T) {
	w := h.watchExits(t)
	_, ids := h.runContainers(t, "graceful", 3)
	require.Equal(t, allRunning(ids), h.containerStates(t, ids))

	logStart := h.logSize(t)
	for range 2 {
		start := time.Now()
		require.NoError(t, h.stopSandboxer(syscall.SIGTERM))
		t.Logf("SIGTERM to exit: %s", time.Since(start).Round(time.Millisecond))
		// containerd would see a Wait end here; give it the time to
		// report the exits it takes from that.
		time.Sleep(time.Second)
		require.NoError(t, h.startSandboxer())
		h.waitContainerdReconnects(t)
	}
	// containerd handles the exit it takes from a failed Wait
	// asynchronously, retrying for seconds: give it the time to.
	time.Sleep(3 * time.Second)
	assert.Equal(t, allRunning(ids), h.containerStates(t, ids), "the containers run on after graceful stops")
	assert.Empty(t, w.exited(ids...), "containerd saw no container exit")
	assert.NotContains(t, h.logSince(t, logStart), "level=error", "a graceful stop is no error")

	// The Waits still work: stopping a container ends its Wait with the
	// signal's status.
	_, err := h.cri.StopContainer(context.Background(), &runtime.StopContainerRequest{ContainerId: ids[0], Timeout: 5})
	require.NoError(t, err)
	eventually(t, "containerd to see the stopped container exit", func() bool {
		return h.containerStates(t, ids[:1])[ids[0]] == "CONTAINER_EXITED exit=143"
	})
	assert.Len(t, w.exited(ids[0]), 1)
}

// logSize is the size of the sandboxer's log, for logSince.
func (x *harness) logSize(t *testing.T) int64 {
	t.Helper()
	fi, err := os.Stat(x.sbLog)
	require.NoError(t, err)
	return fi.Size()
}

// logSince is what the sandboxer logged after offset.
func (x *harness) logSince(t *testing.T, offset int64) string {
	t.Helper()
	data, err := os.ReadFile(x.sbLog)
	require.NoError(t, err)
	return string(data[offset:])
}

// timed runs fn with a deadline it is not expected to come near, and
// returns how long it took (for the log: tests do not time things).
func timed(t *testing.T, what string, fn func(ctx context.Context) error) time.Duration {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	err := fn(ctx)
	d := time.Since(start)
	require.NoError(t, err, "%s (after %s)", what, d.Round(time.Millisecond))
	return d
}

// TestUnreachableEvents: with containerd's events socket unreachable (a
// wrong containerd_address: nothing there, or a socket that accepts and
// never answers, as a hung or restarting containerd), the pod and
// container calls through containerd and a graceful stop complete: no
// call waits for the delivery of its events. The address is logged once.
func TestUnreachableEvents(t *testing.T) {
	for _, tc := range []struct {
		desc   string
		listen bool
	}{{"nothing at the address", false}, {"a socket that never answers", true}} {
		t.Run(tc.desc, func(t *testing.T) {
			addr := filepath.Join(h.base, "no-events.sock")
			if tc.listen {
				l, err := net.Listen("unix", addr)
				require.NoError(t, err)
				defer l.Close()
				accepted := make(chan struct{})
				var conns []net.Conn // held, never read
				defer func() {
					l.Close()
					<-accepted
					for _, c := range conns {
						c.Close()
					}
				}()
				go func() {
					defer close(accepted)
					for {
						c, err := l.Accept()
						if err != nil {
							return
						}
						conns = append(conns, c)
					}
				}()
			}
			logStart := h.logSize(t)
			h.withConfig(t, fmt.Sprintf("containerd_address = %q\n", addr), func() {
				h.waitContainerdReconnects(t)
				pod := podConfig("events-"+strings.ReplaceAll(tc.desc, " ", "-"), nil, nil)
				pod.LogDirectory = t.TempDir()
				var podID string
				runp := timed(t, "RunPodSandbox", func(ctx context.Context) error {
					r, err := h.cri.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: pod, RuntimeHandler: "resource-slot"})
					if err == nil {
						podID = r.PodSandboxId
					}
					return err
				})
				var ids []string
				var create, start time.Duration
				for i := range 3 {
					create += timed(t, "CreateContainer", func(ctx context.Context) error {
						c, err := h.cri.CreateContainer(ctx, &runtime.CreateContainerRequest{PodSandboxId: podID, Config: containerConfig(fmt.Sprintf("c%d", i), nil, nil), SandboxConfig: pod})
						if err == nil {
							ids = append(ids, c.ContainerId)
						}
						return err
					})
					start += timed(t, "StartContainer", func(ctx context.Context) error {
						_, err := h.cri.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: ids[i]})
						return err
					})
				}
				stop := timed(t, "StopContainer", func(ctx context.Context) error {
					_, err := h.cri.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: ids[0], Timeout: 10})
					return err
				})
				rm := timed(t, "RemoveContainer", func(ctx context.Context) error {
					_, err := h.cri.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: ids[0]})
					return err
				})
				stopp := timed(t, "StopPodSandbox with 2 containers", func(ctx context.Context) error {
					_, err := h.cri.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: podID})
					return err
				})
				timed(t, "RemovePodSandbox", func(ctx context.Context) error {
					_, err := h.cri.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: podID})
					return err
				})
				begin := time.Now()
				require.NoError(t, h.stopSandboxer(syscall.SIGTERM))
				t.Logf("events unreachable (%s): RunPodSandbox %s, CreateContainer %s, StartContainer %s (mean of 3), StopContainer %s, RemoveContainer %s, StopPodSandbox %s, SIGTERM to exit %s",
					tc.desc, roundMS(runp), roundMS(create/3), roundMS(start/3), roundMS(stop), roundMS(rm), roundMS(stopp), roundMS(time.Since(begin)))
			})
			logs := h.logSince(t, logStart)
			assert.Equal(t, 1, strings.Count(logs, "cannot forward task events"), "the address is logged once:\n%s", logs)
			assert.Contains(t, logs, addr)
			h.waitContainerdReconnects(t)
		})
	}
}

func roundMS(d time.Duration) string { return d.Round(time.Millisecond).String() }

// TestSecondDaemon: a second daemon on the state directory of the
// running one refuses to start with a clear error and changes nothing;
// the first serves on.
func TestSecondDaemon(t *testing.T) {
	id := h.runp(t, podConfig("second-daemon", nil, nil))
	defer h.removePod(t, id)
	base := t.TempDir()
	cfg := filepath.Join(base, "second.toml")
	require.NoError(t, os.WriteFile(cfg, []byte(fmt.Sprintf("listen = %q\ndir = %q\n", filepath.Join(base, "second.sock"), h.StateDir())), 0o600))
	out, err := exec.Command(filepath.Join(h.bin, "resource-slot-sandboxer"), "--config", cfg).CombinedOutput()
	require.Error(t, err, "%s", out)
	assert.Contains(t, string(out), "state directory in use")
	assert.Contains(t, string(out), h.StateDir())
	assert.Contains(t, string(out), fmt.Sprintf("pid %d", h.sandboxer.Process.Pid))
	_, err = os.Stat(filepath.Join(base, "second.sock"))
	assert.True(t, os.IsNotExist(err))
	assert.Equal(t, "SANDBOX_READY", h.podState(t, id))
	_, err = os.Stat(filepath.Join(h.StateDir(), id))
	assert.NoError(t, err, "the pod's state is untouched")
}

// TestHostileSocketDirectory: the daemon refuses to listen in a directory
// another user may write to (who could rename its socket away and listen
// in its place), and a graceful stop does not remove a socket another
// process put in the place of one of its own.
func TestHostileSocketDirectory(t *testing.T) {
	base := t.TempDir()
	shared := filepath.Join(base, "shared")
	require.NoError(t, os.Mkdir(shared, 0o777))
	require.NoError(t, os.Chmod(shared, 0o777))
	require.NoError(t, os.Chown(shared, 65534, 65534))
	cfg := filepath.Join(base, "hostile.toml")
	require.NoError(t, os.WriteFile(cfg, []byte(fmt.Sprintf("listen = %q\ndir = %q\ncontainerd_address = \"\"\n", filepath.Join(shared, "sb.sock"), filepath.Join(base, "state"))), 0o600))
	out, err := exec.Command(filepath.Join(h.bin, "resource-slot-sandboxer"), "--config", cfg).CombinedOutput()
	require.Error(t, err, "%s", out)
	assert.Contains(t, string(out), "owned by uid 65534")
	assert.Contains(t, string(out), "allow_shared_socket_dir")
	assert.NotContains(t, string(out), "sandboxes recovered", "refused before anything is done")
	entries, _ := os.ReadDir(shared)
	assert.Empty(t, entries)

	// A daemon of its own, in a private directory; an impostor renames
	// its listen socket away and listens in its place before SIGTERM.
	private := filepath.Join(base, "private")
	listen := filepath.Join(private, "sb.sock")
	require.NoError(t, os.WriteFile(cfg, []byte(fmt.Sprintf("listen = %q\ndir = %q\ncontainerd_address = \"\"\n", listen, filepath.Join(base, "state"))), 0o600))
	logPath := filepath.Join(base, "daemon.log")
	cmd, err := startDaemon(h.bin, cfg, logPath, listen, filepath.Join(private, "sb-task.sock"))
	require.NoError(t, err)
	defer killShimOf(t, logPath)
	require.NoError(t, os.Rename(listen, filepath.Join(private, "moved.sock")))
	impostor, err := net.Listen("unix", listen)
	require.NoError(t, err)
	impostor.(*net.UnixListener).SetUnlinkOnClose(false)
	defer impostor.Close()
	require.NoError(t, stopDaemon(cmd, syscall.SIGTERM))
	_, err = os.Lstat(listen)
	assert.NoError(t, err, "the impostor's socket is left")
	_, err = os.Lstat(filepath.Join(private, "sb-admin.sock"))
	assert.True(t, os.IsNotExist(err), "the daemon's own sockets are removed")
}

// killShimOf ends the task shim a daemon logged it started.
func killShimOf(t *testing.T, logPath string) {
	data, _ := os.ReadFile(logPath)
	for _, line := range strings.Split(string(data), "\n") {
		if !strings.Contains(line, "started the task shim") {
			continue
		}
		for _, f := range strings.Fields(line) {
			if pid, ok := strings.CutPrefix(f, "pid="); ok {
				var n int
				if _, err := fmt.Sscan(pid, &n); err == nil && n > 0 {
					syscall.Kill(n, syscall.SIGKILL)
				}
			}
		}
	}
}

// shimPIDs are the task shims serving (or having served) sock.
func shimPIDs(sock string) []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		data, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(data), "\x00"), "\x00")
		for i, a := range args {
			if a == "--socket" && i+1 < len(args) && args[i+1] == sock && strings.HasSuffix(args[0], "containerd-shim-resource-slot-v1") {
				out = append(out, pid)
			}
		}
	}
	return out
}

func alive(pid int) bool {
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	return err == nil && !strings.Contains(string(data), ") Z ")
}

// TestDeadShimReplaced: when the task shim dies (SIGKILL), containerd
// reports its containers exited (255); the daemon starts a new shim, so
// that containers start again node-wide, and ends and removes those
// containers as containerd did, instead of counting them as running.
func TestDeadShimReplaced(t *testing.T) {
	podID, ids := h.runContainers(t, "dead-shim", 3)
	logStart := h.logSize(t)
	old, err := unixsock.ServingPID(h.TaskSock())
	require.NoError(t, err)
	require.NoError(t, syscall.Kill(old, syscall.SIGKILL))

	eventually(t, "containerd to report the containers exited", func() bool {
		for _, s := range h.containerStates(t, ids) {
			if !strings.HasPrefix(s, "CONTAINER_EXITED") {
				return false
			}
		}
		return true
	})
	t.Logf("containerd: %v", h.containerStates(t, ids))
	eventually(t, "a new task shim", func() bool {
		pid, err := unixsock.ServingPID(h.TaskSock())
		return err == nil && pid != old
	})
	eventually(t, "the daemon to drop the dead shim's containers", func() bool {
		ctrs, _ := h.resourceInfo(t, podID)["containers"].(map[string]any)
		for _, id := range ids {
			if _, ok := ctrs[id]; ok {
				return false
			}
		}
		return true
	})
	// The log is written out by a goroutine of its own: it may come a
	// moment after the change.
	assert.Eventually(t, func() bool {
		return strings.Contains(h.logSince(t, logStart), "ended the containers containerd ran through the task shim that is gone")
	}, 10*time.Second, 10*time.Millisecond)

	// Containers start again in the same pod.
	pod := podConfig("dead-shim", nil, nil)
	pod.LogDirectory = t.TempDir()
	ctx := context.Background()
	c, err := h.cri.CreateContainer(ctx, &runtime.CreateContainerRequest{PodSandboxId: podID, Config: containerConfig("after", nil, nil), SandboxConfig: pod})
	require.NoError(t, err)
	_, err = h.cri.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: c.ContainerId})
	require.NoError(t, err, "StartContainer through the new shim")
	assert.Equal(t, allRunning([]string{c.ContainerId}), h.containerStates(t, []string{c.ContainerId}))
	assert.Len(t, shimPIDs(h.TaskSock()), 1, "one shim per task socket")
}

// TestStoppedShim: a stopped task shim (SIGSTOP) holds containerd's task
// calls, not the daemon: it serves its own API and restarts (reusing the
// stopped shim rather than starting a second one); once the shim
// continues, the containers are as they were.
func TestStoppedShim(t *testing.T) {
	podID, ids := h.runContainers(t, "stopped-shim", 2)
	pid, err := unixsock.ServingPID(h.TaskSock())
	require.NoError(t, err)
	logStart := h.logSize(t)
	require.NoError(t, syscall.Kill(pid, syscall.SIGSTOP))
	defer syscall.Kill(pid, syscall.SIGCONT)

	other := h.runp(t, podConfig("stopped-shim-other", nil, nil))
	defer h.removePod(t, other)
	require.NoError(t, h.stopSandboxer(syscall.SIGTERM))
	require.NoError(t, h.startSandboxer())
	assert.Equal(t, "SANDBOX_READY", h.podState(t, other))
	eventually(t, "the daemon to log the stopped shim", func() bool {
		return strings.Contains(h.logSince(t, logStart), "the task shim is stopped")
	})
	assert.Equal(t, []int{pid}, shimPIDs(h.TaskSock()), "no second shim")

	require.NoError(t, syscall.Kill(pid, syscall.SIGCONT))
	h.waitContainerdReconnects(t)
	assert.Equal(t, allRunning(ids), h.containerStates(t, ids))
	_, err = h.cri.StopContainer(context.Background(), &runtime.StopContainerRequest{ContainerId: ids[0], Timeout: 5})
	require.NoError(t, err)
	eventually(t, "the stopped container to exit", func() bool {
		return h.containerStates(t, ids[:1])[ids[0]] == "CONTAINER_EXITED exit=143"
	})
	ctrs, _ := h.resourceInfo(t, podID)["containers"].(map[string]any)
	assert.Contains(t, ctrs, ids[1], "the other container is still the daemon's")
}

// TestOrphanShims: a shim whose task socket was removed notices it and
// exits once containerd holds nothing through it (it must not keep
// forwarding to the daemon that took over the path), the daemon starts
// one in its place, and a shim whose daemon is gone for good exits after
// the orphan timeout: one shim per task socket, none without a daemon.
func TestOrphanShims(t *testing.T) {
	base := t.TempDir()
	sockDir := filepath.Join(base, "run")
	listen, taskSock := filepath.Join(sockDir, "sb.sock"), filepath.Join(sockDir, "sb-task.sock")
	cfg := filepath.Join(base, "orphans.toml")
	require.NoError(t, os.WriteFile(cfg, []byte(fmt.Sprintf("listen = %q\ndir = %q\ncontainerd_address = \"\"\nshim_orphan_timeout = \"8s\"\n", listen, filepath.Join(base, "state"))), 0o600))
	logPath := filepath.Join(base, "daemon.log")
	defer func() {
		for _, pid := range shimPIDs(taskSock) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}()
	cmd, err := startDaemon(h.bin, cfg, logPath, listen, taskSock)
	require.NoError(t, err)
	// cmd changes with the restarts: the last one is stopped.
	defer func() { stopDaemon(cmd, syscall.SIGKILL) }()
	first, err := unixsock.ServingPID(taskSock)
	require.NoError(t, err)

	// Restarts reuse the shim.
	for range 2 {
		require.NoError(t, stopDaemon(cmd, syscall.SIGTERM))
		cmd, err = startDaemon(h.bin, cfg, logPath, listen, taskSock)
		require.NoError(t, err)
	}
	assert.Equal(t, []int{first}, shimPIDs(taskSock), "restarts reuse the one shim")

	// The socket is removed from under the shim, which holds a
	// connection (as containerd holds one per task): it serves it on,
	// and exits once it is closed.
	conn, err := net.Dial("unix", taskSock)
	require.NoError(t, err)
	held := ttrpc.NewClient(conn)
	defer held.Close()
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	_, err = taskapi.NewTTRPCTaskClient(held).State(ctx, &taskapi.StateRequest{ID: "none"})
	require.True(t, errdefs.IsNotFound(errgrpc.ToNative(err)), "the daemon's answer through the shim: %v", err)
	require.NoError(t, os.Remove(taskSock))
	eventually(t, "a new shim on the task socket", func() bool {
		pid, err := unixsock.ServingPID(taskSock)
		return err == nil && pid != first
	})
	time.Sleep(2 * time.Second) // the orphan's checks run every second
	if !alive(first) {
		data, _ := os.ReadFile(filepath.Join(base, "state", "shim.log"))
		t.Fatalf("the orphan exited although it holds a connection:\n%s", data)
	}
	_, err = taskapi.NewTTRPCTaskClient(held).State(ctx, &taskapi.StateRequest{ID: "none"})
	assert.True(t, errdefs.IsNotFound(errgrpc.ToNative(err)), "the orphan still forwards on its open connection: %v", err)
	held.Close()
	eventually(t, "the orphaned shim to exit", func() bool { return !alive(first) })
	pids := shimPIDs(taskSock)
	require.Len(t, pids, 1, "one shim per task socket")

	// The daemon goes for good: its shim exits after the orphan timeout.
	require.NoError(t, stopDaemon(cmd, syscall.SIGTERM))
	eventually(t, "the shim of a daemon gone for good to exit", func() bool { return !alive(pids[0]) })
	data, _ := os.ReadFile(filepath.Join(base, "state", "shim.log"))
	assert.Contains(t, string(data), "the task socket was removed or replaced")
	assert.Contains(t, string(data), "resource-slot-sandboxer is gone; the task shim exits")
}

// TestHostileCalls: random, malformed and hostile messages (package
// hostile) to every method of a real daemon's sandbox API and CRI, and of
// the task API through its task shim: no call panics or fails as Unknown
// or Internal (the panic paths found so: a sandbox without its runtime
// in Create and Update), and the daemon and the shim live on. A daemon
// of its own: the CRI resolves ID prefixes, which must not find the other
// tests' pods.
func TestHostileCalls(t *testing.T) {
	base := t.TempDir()
	listen, taskSock := filepath.Join(base, "sb.sock"), filepath.Join(base, "sb-task.sock")
	cfg := filepath.Join(base, "hostile.toml")
	require.NoError(t, os.WriteFile(cfg, []byte(fmt.Sprintf("listen = %q\ndir = %q\ncontainerd_address = \"\"\nfsync = false\n", listen, filepath.Join(base, "state"))), 0o600))
	logPath := filepath.Join(base, "daemon.log")
	cmd, err := startDaemon(h.bin, cfg, logPath, listen, taskSock)
	require.NoError(t, err)
	defer func() {
		stopDaemon(cmd, syscall.SIGTERM)
		for _, pid := range shimPIDs(taskSock) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}()
	shim, err := unixsock.ServingPID(taskSock)
	require.NoError(t, err)

	gc, err := grpc.NewClient("unix://"+listen, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer gc.Close()
	conn, err := net.Dial("unix", taskSock)
	require.NoError(t, err)
	tc := ttrpc.NewClient(conn)
	defer tc.Close()
	c := hostile.Clients{GRPC: gc, TTRPC: tc}
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	g := hostile.New(7)

	// The panic paths, one by one.
	ctrl := sbapi.NewControllerClient(gc)
	_, err = ctrl.Create(ctx, &sbapi.ControllerCreateRequest{SandboxID: "no-runtime", Sandbox: &apitypes.Sandbox{SandboxID: "no-runtime"}})
	require.NoError(t, err, "a sandbox without its runtime")
	_, err = ctrl.Update(ctx, &sbapi.ControllerUpdateRequest{SandboxID: "no-runtime", Sandbox: &apitypes.Sandbox{}})
	require.NoError(t, err, "an update without the runtime")

	tasks := taskapi.NewTTRPCTaskClient(tc)
	cri := runtime.NewRuntimeServiceClient(gc)
	for i := range 3 {
		id := fmt.Sprintf("sb%d", i)
		g.IDs = append(g.IDs, id, fmt.Sprintf("ctr%d", i))
		dir := t.TempDir()
		require.NoError(t, hostile.PlainBundle(dir, id))
		g.Bundles = append(g.Bundles, dir)
		dir = t.TempDir()
		require.NoError(t, g.Bundle(dir, id))
		g.Bundles = append(g.Bundles, dir)
	}
	logDir := t.TempDir()
	attempt := uint32(0)
	populate := func() {
		for i := range 3 {
			id := fmt.Sprintf("sb%d", i)
			ctrl.Create(ctx, &sbapi.ControllerCreateRequest{SandboxID: id})
			ctrl.Start(ctx, &sbapi.ControllerStartRequest{SandboxID: id})
			tasks.Create(ctx, &taskapi.CreateTaskRequest{ID: fmt.Sprintf("ctr%d", i), Bundle: g.Bundles[2*i]})
			tasks.Start(ctx, &taskapi.StartRequest{ID: fmt.Sprintf("ctr%d", i)})
		}
		attempt++
		pod, err := cri.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: &runtime.PodSandboxConfig{
			Metadata: &runtime.PodSandboxMetadata{Name: "pod", Uid: "pod", Namespace: "ns", Attempt: attempt}, LogDirectory: logDir,
		}})
		if err == nil {
			g.IDs = append(g.IDs, pod.PodSandboxId)
			if c, err := cri.CreateContainer(ctx, &runtime.CreateContainerRequest{PodSandboxId: pod.PodSandboxId,
				Config: &runtime.ContainerConfig{Metadata: &runtime.ContainerMetadata{Name: "c"}, Image: &runtime.ImageSpec{Image: "busybox"}, LogPath: "c.log"}}); err == nil {
				g.IDs = append(g.IDs, c.ContainerId)
			}
		}
	}
	rep, err := hostile.Run(ctx, c, g, 1000, populate)
	require.NoError(t, err)
	for k, v := range rep.Bad {
		t.Errorf("%s: %s", k, v)
	}
	_, err = cri.Version(ctx, &runtime.VersionRequest{})
	require.NoError(t, err, "the daemon serves on")
	assert.True(t, alive(cmd.Process.Pid))
	now, err := unixsock.ServingPID(taskSock)
	require.NoError(t, err)
	assert.Equal(t, shim, now, "the same task shim serves")
	data, _ := os.ReadFile(logPath)
	assert.NotContains(t, string(data), "call panicked")
	shimLog, _ := os.ReadFile(filepath.Join(base, "state", "shim.log"))
	assert.NotContains(t, string(shimLog), "call panicked")
}
