package sandboxer

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	eventsapi "github.com/containerd/containerd/api/services/ttrpc/events/v1"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"

	cg1 "github.com/containerd/cgroups/v3/cgroup1/stats"
	cg2 "github.com/containerd/cgroups/v3/cgroup2/stats"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/publisher"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

// eventSink stands in for containerd's events service: it records what the
// task server forwards, as containerd's ttrpc server would receive it.
type eventSink struct {
	mu     sync.Mutex
	topics []string
	got    chan string
}

func (s *eventSink) Forward(_ context.Context, req *eventsapi.ForwardRequest) (*emptypb.Empty, error) {
	s.mu.Lock()
	s.topics = append(s.topics, req.GetEnvelope().GetTopic())
	s.mu.Unlock()
	s.got <- req.GetEnvelope().GetTopic()
	return &emptypb.Empty{}, nil
}

type taskEnv struct {
	ctrl   *Controller
	client taskAPI.TTRPCTaskService
	events *eventSink
	root   string
}

func newTaskEnv(t testing.TB, root string) *taskEnv {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	sink := &eventSink{got: make(chan string, 100)}
	evSrv, err := ttrpc.NewServer()
	require.NoError(t, err)
	eventsapi.RegisterTTRPCEventsService(evSrv, sink)
	evSock := filepath.Join(dir, "events.sock")
	evL, err := net.Listen("unix", evSock)
	require.NoError(t, err)
	go evSrv.Serve(ctx, evL)
	t.Cleanup(func() { evSrv.Close() })

	c := newController(t, root, slot.New())
	_, err = c.Recover(ctx)
	require.NoError(t, err)
	// The daemon's queue, as in production.
	tasks := NewTasks(ctx, c, publisher.New(evSock, publisher.Options{}))
	t.Cleanup(tasks.Close)
	ts, err := NewTaskServer(tasks)
	require.NoError(t, err)
	sock := filepath.Join(dir, "task.sock")
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	go ts.Serve(ctx, l)
	t.Cleanup(func() { ts.Stop(context.Background()) })
	conn, err := net.Dial("unix", sock)
	require.NoError(t, err)
	client := ttrpc.NewClient(conn)
	t.Cleanup(func() { client.Close() })
	return &taskEnv{ctrl: c, client: taskAPI.NewTTRPCTaskClient(client), events: sink, root: root}
}

// bundle writes a bundle whose config.json puts the container in sandboxID.
func bundle(t testing.TB, sandboxID string, res *specs.LinuxResources, annotations map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	a := map[string]string{annotationSandboxID: sandboxID}
	for k, v := range annotations {
		a[k] = v
	}
	data, err := json.Marshal(&specs.Spec{Version: specs.Version, Annotations: a, Linux: &specs.Linux{Resources: res}})
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "config.json"), data, 0o600))
	return dir
}

// procSpec is an exec's process spec as containerd sends it.
func procSpec(t *testing.T) *anypb.Any {
	t.Helper()
	a, err := typeurl.MarshalAnyToProto(&specs.Process{Args: []string{"true"}, Cwd: "/"})
	require.NoError(t, err)
	return a
}

// fifo makes a FIFO and opens its read end, as containerd does for stdout.
func mkfifo(t *testing.T) (string, *os.File) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "stdout")
	require.NoError(t, syscall.Mkfifo(p, 0o600))
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	require.NoError(t, err)
	require.NoError(t, syscall.SetNonblock(int(f.Fd()), false))
	t.Cleanup(func() { f.Close() })
	return p, f
}

func (e *taskEnv) waitTopic(t *testing.T, topic string) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case got := <-e.events.got:
			if got == topic {
				return
			}
		case <-deadline:
			t.Fatalf("no %s event; got %v", topic, e.events.topics)
		}
	}
}

func ns(ctx context.Context) context.Context { return namespaces.WithNamespace(ctx, "k8s.io") }

func readySandbox(t testing.TB, e *taskEnv, id string) {
	t.Helper()
	ctx := context.Background()
	require.NoError(t, create(ctx, e.ctrl, id, nil))
	_, err := e.ctrl.Start(ctx, id)
	require.NoError(t, err)
}

func TestTaskLifecycle(t *testing.T) {
	ctx := ns(context.Background())
	e := newTaskEnv(t, t.TempDir())
	readySandbox(t, e, "sb")

	quota, period, shares := int64(50000), uint64(100000), uint64(256)
	mem := int64(256 << 20)
	stdout, out := mkfifo(t)
	_, err := e.client.Create(ctx, &taskAPI.CreateTaskRequest{
		ID:     "c1",
		Bundle: bundle(t, "sb", &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: &quota, Period: &period, Shares: &shares}, Memory: &specs.LinuxMemory{Limit: &mem}}, nil),
		Stdout: stdout,
	})
	require.NoError(t, err)
	e.waitTopic(t, "/tasks/create")
	m := readInfo(t, e.root, "sb")
	assert.Equal(t, 0.5, m["cpu_limit"], "the container's limits flow into the sandbox")
	assert.Equal(t, float64(mem), m["memory_limit"])

	st, err := e.client.State(ctx, &taskAPI.StateRequest{ID: "c1"})
	require.NoError(t, err)
	assert.Equal(t, task.Status_CREATED, st.Status)
	assert.GreaterOrEqual(t, st.Pid, uint32(1<<22), "simulated pids are above PID_MAX_LIMIT")

	start, err := e.client.Start(ctx, &taskAPI.StartRequest{ID: "c1"})
	require.NoError(t, err)
	assert.Equal(t, st.Pid, start.Pid)
	e.waitTopic(t, "/tasks/start")
	line, err := bufio.NewReader(out).ReadString('\n')
	require.NoError(t, err)
	assert.Contains(t, line, "simulated container c1")
	assert.Contains(t, line, "cpu_limit=0.5")

	stats, err := e.client.Stats(ctx, &taskAPI.StatsRequest{ID: "c1"})
	require.NoError(t, err)
	v, err := typeurl.UnmarshalAny(stats.Stats)
	require.NoError(t, err)
	switch m := v.(type) {
	case *cg1.Metrics:
		assert.Equal(t, uint64(mem), m.Memory.Usage.Limit)
	case *cg2.Metrics:
		assert.Equal(t, uint64(mem), m.Memory.UsageLimit)
	default:
		t.Fatalf("stats of type %T", v)
	}

	newMem := int64(512 << 20)
	res, err := typeurl.MarshalAnyToProto(&specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &newMem}})
	require.NoError(t, err)
	_, err = e.client.Update(ctx, &taskAPI.UpdateTaskRequest{ID: "c1", Resources: res})
	require.NoError(t, err)
	m = readInfo(t, e.root, "sb")
	assert.Equal(t, float64(newMem), m["memory_limit"])
	assert.Nil(t, m["cpu_limit"], "the update replaced the container's resources")

	waited := make(chan *taskAPI.WaitResponse, 1)
	go func() {
		w, err := e.client.Wait(ctx, &taskAPI.WaitRequest{ID: "c1"})
		assert.NoError(t, err)
		waited <- w
	}()
	_, err = e.client.Kill(ctx, &taskAPI.KillRequest{ID: "c1", Signal: uint32(syscall.SIGWINCH)})
	require.NoError(t, err, "an ignored signal")
	_, err = e.client.Kill(ctx, &taskAPI.KillRequest{ID: "c1", Signal: uint32(syscall.SIGTERM)})
	require.NoError(t, err)
	select {
	case w := <-waited:
		assert.Equal(t, uint32(143), w.ExitStatus)
	case <-time.After(5 * time.Second):
		t.Fatal("Wait did not return after SIGTERM")
	}
	e.waitTopic(t, "/tasks/exit")
	_, err = out.Read(make([]byte, 1))
	assert.Error(t, err, "stdout is closed when the task exits")
	_, err = e.client.Kill(ctx, &taskAPI.KillRequest{ID: "c1", Signal: uint32(syscall.SIGKILL)})
	assert.True(t, errdefs.IsNotFound(errgrpc.ToNative(err)), "kill after exit: %v", err)

	del, err := e.client.Delete(ctx, &taskAPI.DeleteRequest{ID: "c1"})
	require.NoError(t, err)
	assert.Equal(t, uint32(143), del.ExitStatus)
	e.waitTopic(t, "/tasks/delete")
	m = readInfo(t, e.root, "sb")
	assert.Nil(t, m["memory_limit"], "totals drop when the container goes")
	_, err = e.client.State(ctx, &taskAPI.StateRequest{ID: "c1"})
	assert.True(t, errdefs.IsNotFound(errgrpc.ToNative(err)))
}

func TestTaskSimulationAndErrors(t *testing.T) {
	ctx := ns(context.Background())
	e := newTaskEnv(t, t.TempDir())
	readySandbox(t, e, "sb")

	_, err := e.client.Create(ctx, &taskAPI.CreateTaskRequest{ID: "job", Bundle: bundle(t, "sb", nil, map[string]string{
		slot.AnnotationExitAfter: "100ms", slot.AnnotationExitCode: "3", slot.AnnotationCPUUsage: "250m", slot.AnnotationMemoryUsage: "64Mi",
	})})
	require.NoError(t, err)
	_, err = e.client.Start(ctx, &taskAPI.StartRequest{ID: "job"})
	require.NoError(t, err)
	w, err := e.client.Wait(ctx, &taskAPI.WaitRequest{ID: "job"})
	require.NoError(t, err)
	assert.Equal(t, uint32(3), w.ExitStatus)
	st, err := e.client.State(ctx, &taskAPI.StateRequest{ID: "job"})
	require.NoError(t, err)
	assert.Equal(t, task.Status_STOPPED, st.Status)

	for _, tc := range []struct {
		desc string
		call func() error
		want func(error) bool
	}{
		{"unknown task", func() error { _, err := e.client.State(ctx, &taskAPI.StateRequest{ID: "nope"}); return err }, errdefs.IsNotFound},
		{"path id", func() error { _, err := e.client.State(ctx, &taskAPI.StateRequest{ID: "../x"}); return err }, errdefs.IsInvalidArgument},
		{"exec without a spec", func() error {
			_, err := e.client.Exec(ctx, &taskAPI.ExecProcessRequest{ID: "job", ExecID: "e"})
			return err
		}, errdefs.IsInvalidArgument},
		{"exec in exited", func() error {
			_, err := e.client.Exec(ctx, &taskAPI.ExecProcessRequest{ID: "job", ExecID: "e", Spec: procSpec(t)})
			return err
		}, errdefs.IsFailedPrecondition},
		{"exec simulated", func() error {
			_, err := e.client.Create(ctx, &taskAPI.CreateTaskRequest{ID: "runner", Bundle: bundle(t, "sb", nil, nil)})
			require.NoError(t, err)
			_, err = e.client.Start(ctx, &taskAPI.StartRequest{ID: "runner"})
			require.NoError(t, err)
			defer func() {
				e.client.Kill(ctx, &taskAPI.KillRequest{ID: "runner", Signal: 9})
				e.client.Wait(ctx, &taskAPI.WaitRequest{ID: "runner"})
				e.client.Delete(ctx, &taskAPI.DeleteRequest{ID: "runner"})
			}()
			_, err = e.client.Exec(ctx, &taskAPI.ExecProcessRequest{ID: "runner", ExecID: "e", Spec: procSpec(t)})
			return err
		}, errdefs.IsNotImplemented},
		{"checkpoint", func() error {
			_, err := e.client.Checkpoint(ctx, &taskAPI.CheckpointTaskRequest{ID: "job"})
			return err
		}, errdefs.IsNotImplemented},
		{"create twice", func() error {
			_, err := e.client.Create(ctx, &taskAPI.CreateTaskRequest{ID: "job", Bundle: bundle(t, "sb", nil, nil)})
			return err
		}, errdefs.IsAlreadyExists},
		{"no sandbox annotation", func() error {
			_, err := e.client.Create(ctx, &taskAPI.CreateTaskRequest{ID: "lone", Bundle: bundle(t, "", nil, nil)})
			return err
		}, errdefs.IsFailedPrecondition},
		{"unknown sandbox", func() error {
			_, err := e.client.Create(ctx, &taskAPI.CreateTaskRequest{ID: "x", Bundle: bundle(t, "missing", nil, nil)})
			return err
		}, errdefs.IsNotFound},
		{"bad limits", func() error {
			q := int64(5000)
			_, err := e.client.Create(ctx, &taskAPI.CreateTaskRequest{ID: "y", Bundle: bundle(t, "sb", &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: &q}}, nil)})
			return err
		}, errdefs.IsInvalidArgument},
		{"bad simulation", func() error {
			_, err := e.client.Create(ctx, &taskAPI.CreateTaskRequest{ID: "z", Bundle: bundle(t, "sb", nil, map[string]string{slot.AnnotationExitCode: "300"})})
			return err
		}, errdefs.IsInvalidArgument},
		{"relative bundle", func() error {
			_, err := e.client.Create(ctx, &taskAPI.CreateTaskRequest{ID: "w", Bundle: "rel"})
			return err
		}, errdefs.IsInvalidArgument},
		{"start exited", func() error { _, err := e.client.Start(ctx, &taskAPI.StartRequest{ID: "job"}); return err }, errdefs.IsFailedPrecondition},
		{"pause exited", func() error { _, err := e.client.Pause(ctx, &taskAPI.PauseRequest{ID: "job"}); return err }, errdefs.IsFailedPrecondition},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			err := errgrpc.ToNative(tc.call())
			require.Error(t, err)
			assert.True(t, tc.want(err), "got %v", err)
		})
	}
	v, err := e.ctrl.Get("sb")
	require.NoError(t, err)
	assert.Len(t, v.State.Containers, 1, "failed creates leave nothing")
}

func TestTasksSurviveRestartAndDieWithSandbox(t *testing.T) {
	ctx := ns(context.Background())
	root := t.TempDir()
	e := newTaskEnv(t, root)
	readySandbox(t, e, "sb")
	for _, id := range []string{"a", "b"} {
		_, err := e.client.Create(ctx, &taskAPI.CreateTaskRequest{ID: id, Bundle: bundle(t, "sb", nil, nil)})
		require.NoError(t, err)
		_, err = e.client.Start(ctx, &taskAPI.StartRequest{ID: id})
		require.NoError(t, err)
	}
	_, err := e.client.Create(ctx, &taskAPI.CreateTaskRequest{ID: "later", Bundle: bundle(t, "sb", nil, map[string]string{slot.AnnotationExitAfter: "300ms"})})
	require.NoError(t, err)
	_, err = e.client.Start(ctx, &taskAPI.StartRequest{ID: "later"})
	require.NoError(t, err)
	_, err = e.client.Kill(ctx, &taskAPI.KillRequest{ID: "b", Signal: uint32(syscall.SIGKILL)})
	require.NoError(t, err)

	// A new daemon on the same state.
	e2 := newTaskEnv(t, root)
	st, err := e2.client.State(ctx, &taskAPI.StateRequest{ID: "a"})
	require.NoError(t, err)
	assert.Equal(t, task.Status_RUNNING, st.Status)
	st, err = e2.client.State(ctx, &taskAPI.StateRequest{ID: "b"})
	require.NoError(t, err)
	assert.Equal(t, task.Status_STOPPED, st.Status)
	assert.Equal(t, uint32(137), st.ExitStatus)
	w, err := e2.client.Wait(ctx, &taskAPI.WaitRequest{ID: "later"})
	require.NoError(t, err, "a self-exiting task keeps its timer across restarts")
	assert.Equal(t, uint32(0), w.ExitStatus)

	// Stopping the sandbox ends its tasks, as killing a pod's cgroup would.
	waited := make(chan *taskAPI.WaitResponse, 1)
	go func() {
		w, err := e2.client.Wait(ctx, &taskAPI.WaitRequest{ID: "a"})
		assert.NoError(t, err)
		waited <- w
	}()
	require.NoError(t, e2.ctrl.Stop(ctx, "sb"))
	select {
	case w := <-waited:
		assert.Equal(t, uint32(137), w.ExitStatus)
	case <-time.After(5 * time.Second):
		t.Fatal("task did not end with its sandbox")
	}
	e2.waitTopic(t, "/tasks/exit")
	_, err = e2.client.Delete(ctx, &taskAPI.DeleteRequest{ID: "a"})
	require.NoError(t, err)
	require.NoError(t, e2.ctrl.Shutdown(ctx, "sb"))
	_, err = e2.client.State(ctx, &taskAPI.StateRequest{ID: "b"})
	assert.True(t, errdefs.IsNotFound(errgrpc.ToNative(err)), "tasks go with their sandbox")
}
