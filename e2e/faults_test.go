package e2e

// The fault-injection suite: what the daemon's neighbours and its callers
// can do to it (a graceful stop, a dead or stopped task shim, an
// unreachable events socket, a second daemon, a hostile socket directory,
// malformed messages), each through a real containerd.

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	eventsapi "github.com/containerd/containerd/api/services/events/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
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
