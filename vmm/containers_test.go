package vmm

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/digitalocean/go-libvirt"
	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
	"github.com/kuasar-io/resource-slot-sandboxer/backend"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// Unit tests of the vm backend's sandboxes and containers against a fake
// libvirtd (fakeLibvirt) and fake guest agents (fakeAgent). They mount for
// real (the shared directory, the containers' files): root only.

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("RSS_E2E") != "" {
			t.Fatal("the vm backend's unit tests mount: they need root")
		}
		t.Skip("the vm backend's unit tests mount: they need root")
	}
}

// recEvents records what the backend reports.
type recEvents struct {
	mu     sync.Mutex
	exits  map[string][]uint32
	ooms   map[string]int
	notify chan struct{}
}

func newRecEvents() *recEvents {
	return &recEvents{exits: map[string][]uint32{}, ooms: map[string]int{}, notify: make(chan struct{}, 100)}
}

func (r *recEvents) Exited(p backend.Process, status uint32, _ time.Time) {
	r.mu.Lock()
	r.exits[procKey(p)] = append(r.exits[procKey(p)], status)
	r.mu.Unlock()
	r.notify <- struct{}{}
}

func (r *recEvents) OOM(p backend.Process) {
	r.mu.Lock()
	r.ooms[procKey(p)]++
	r.mu.Unlock()
	r.notify <- struct{}{}
}

func (r *recEvents) exitsOf(p backend.Process) []uint32 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]uint32(nil), r.exits[procKey(p)]...)
}

func (r *recEvents) waitExit(t *testing.T, p backend.Process) uint32 {
	t.Helper()
	deadline := time.After(180 * time.Second)
	for {
		if e := r.exitsOf(p); len(e) > 0 {
			return e[0]
		}
		select {
		case <-r.notify:
		case <-deadline:
			t.Fatalf("no exit reported for %s", procKey(p))
		}
	}
}

type unitEnv struct {
	t      *testing.T
	lv     *fakeLibvirt
	agents sync.Map // sandbox dir -> *fakeAgent
	b      *Backend
	ctrs   backend.Containers
	ev     *recEvents
	guest  string
}

func newUnitEnv(t *testing.T) *unitEnv {
	t.Helper()
	needRoot(t)
	e := &unitEnv{t: t, lv: newFakeLibvirt(), guest: t.TempDir()}
	e.lv.onCreate = func(d *fakeDom) {
		_ = os.WriteFile(filepath.Join(d.def.Metadata.Sandbox.Dir, ReadyFile), []byte("READY\n"), 0o600)
	}
	e.restart()
	return e
}

// restart starts a new backend on the same libvirtd and agents, as a
// restarted daemon would (the old one must be closed).
func (e *unitEnv) restart() {
	cfg := fakeGuestFiles(e.guest)
	qemuImg := filepath.Join(e.guest, "qemu-img")
	require.NoError(e.t, os.WriteFile(qemuImg, []byte("#!/bin/sh\nfor a; do last=$a; done\n: > \"$last\"\n"), 0o755))
	b, err := newBackend(context.Background(), cfg, Options{
		ReadyTimeout: 5 * time.Second, PollInterval: 50 * time.Millisecond, QEMUImg: qemuImg,
		Dialer: func(dir string) Dialer {
			if a, ok := e.agents.Load(dir); ok {
				return a.(*fakeAgent).dialer()
			}
			return fakeDialer(filepath.Join(dir, "no-agent.sock"))
		},
	}, func() (lvClient, error) { return e.lv, nil })
	require.NoError(e.t, err)
	e.b = b
	e.ev = newRecEvents()
	e.ctrs = b.Containers(e.ev)
	e.t.Cleanup(func() { _ = b.Close() })
}

type exitRec struct {
	mu    sync.Mutex
	codes []uint32
}

func (x *exitRec) fn(code uint32, _ time.Time) {
	x.mu.Lock()
	x.codes = append(x.codes, code)
	x.mu.Unlock()
}
func (x *exitRec) get() []uint32 {
	x.mu.Lock()
	defer x.mu.Unlock()
	return append([]uint32(nil), x.codes...)
}

func podInfo() resourceinfo.ResourceInfo {
	return resourceinfo.Compute(resourceinfo.Spec{Annotations: resourceinfo.Resources{
		CPULimit: p(1.0), MemoryLimit: p(int64(256 << 20)), PidLimit: p(int64(64)),
	}}, nil)
}

// sandbox creates and starts sandbox id with its own fake agent.
func (e *unitEnv) sandbox(id string) (string, *fakeAgent, *exitRec) {
	e.t.Helper()
	return e.sandboxPod(id, backend.Pod{})
}

// sandboxPod is sandbox of a pod with that configuration.
func (e *unitEnv) sandboxPod(id string, pod backend.Pod) (string, *fakeAgent, *exitRec) {
	e.t.Helper()
	dir := e.t.TempDir()
	a := newFakeAgent(e.t)
	e.agents.Store(dir, a)
	ctx := context.Background()
	require.NoError(e.t, e.b.Create(ctx, id, dir, podInfo(), pod))
	x := &exitRec{}
	_, err := e.b.Start(ctx, id, x.fn)
	require.NoError(e.t, err)
	e.t.Cleanup(func() {
		_ = e.b.Delete(context.Background(), id)
		ms, _ := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
		for i := len(ms) - 1; i >= 0; i-- {
			_ = unix.Unmount(ms[i].Mountpoint, unix.MNT_DETACH)
		}
	})
	return dir, a, x
}

// fifoReader is containerd's end of an output FIFO: it reads until the
// end of the FIFO.
type fifoReader struct {
	path string
	mu   sync.Mutex
	data []byte
	eof  chan struct{}
}

func newFIFO(t *testing.T, dir, name string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	require.NoError(t, unix.Mkfifo(p, 0o600))
	return p
}

func readFIFO(t *testing.T, dir, name string) *fifoReader {
	t.Helper()
	r := &fifoReader{path: newFIFO(t, dir, name), eof: make(chan struct{})}
	// containerd's fifo package: an open that waits for a writer, then
	// reads until the last writer closed.
	go func() {
		defer close(r.eof)
		f, err := os.OpenFile(r.path, os.O_RDONLY, 0)
		if err != nil {
			return
		}
		defer f.Close()
		buf := make([]byte, 4096)
		for {
			n, err := f.Read(buf)
			r.mu.Lock()
			r.data = append(r.data, buf[:n]...)
			r.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return r
}

func (r *fifoReader) String() string { r.mu.Lock(); defer r.mu.Unlock(); return string(r.data) }

func (r *fifoReader) waitFor(t *testing.T, s string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(r.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: no %q in %q", r.path, s, r.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (r *fifoReader) waitEOF(t *testing.T) {
	t.Helper()
	select {
	case <-r.eof:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: no end of output (got %q)", r.path, r.String())
	}
}

func (r *fifoReader) ended() bool {
	select {
	case <-r.eof:
		return true
	default:
		return false
	}
}

// bundle is a container's bundle on the host: a rootfs and a spec with a
// bind of a host file.
func bundle(t *testing.T) (string, *specs.Spec) {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "rootfs", "bin"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "rootfs", "bin", "sh"), []byte("#!"), 0o755))
	hosts := filepath.Join(t.TempDir(), "hosts")
	require.NoError(t, os.WriteFile(hosts, []byte("127.0.0.1 localhost\n"), 0o644))
	s := criSpec()
	s.Mounts = append(s.Mounts[:3], specs.Mount{Destination: "/etc/hosts", Type: "bind", Source: hosts, Options: []string{"rbind", "ro"}})
	return dir, s
}

func TestContainerLifecycle(t *testing.T) {
	e := newUnitEnv(t)
	ctx := context.Background()
	dir, agent, _ := e.sandbox("sb1")

	// SetupSandbox got the pod's limits.
	agent.mu.Lock()
	setup := agent.setup
	agent.mu.Unlock()
	require.NotNil(t, setup)
	assert.Equal(t, "sb1", setup.GetSandboxId())
	assert.Equal(t, DefaultSharedTag, setup.GetSharedTag())
	assert.Equal(t, int64(100000), setup.GetResources().GetCpuQuota())
	assert.Equal(t, int64(256<<20), setup.GetResources().GetMemoryMax())
	assert.Equal(t, int64(64), setup.GetResources().GetPidsMax())
	assert.ElementsMatch(t, []string{"ipc", "uts", "pid"}, setup.GetNamespaces())

	io1 := t.TempDir()
	out, errOut := readFIFO(t, io1, "stdout"), readFIFO(t, io1, "stderr")
	bdir, spec := bundle(t)
	c1 := backend.Process{Namespace: "k8s.io", SandboxID: "sb1", ContainerID: "c1"}
	created, err := e.ctrs.Create(ctx, &backend.Container{Process: c1, Bundle: bdir, Spec: spec,
		IO: backend.IO{Stdout: out.path, Stderr: errOut.path}})
	require.NoError(t, err)
	assert.NotZero(t, created.Pid)
	assert.JSONEq(t, `{"bundle":"/run/rss/bundles/c1"}`, string(created.Private))
	_, err = e.ctrs.Create(ctx, &backend.Container{Process: c1, Bundle: bdir, Spec: spec})
	assert.True(t, errdefs.IsAlreadyExists(err), "%v", err)

	// The guest got the rewritten spec; the host shares the files.
	agent.mu.Lock()
	gs := agent.specs["c1"]
	agent.mu.Unlock()
	require.NotNil(t, gs)
	assert.Equal(t, "/run/rss/shared/c1/rootfs", gs.Root.Path)
	assert.Equal(t, "/run/rss/shared/c1/mounts/0", gs.Mounts[3].Source, "the first shared bind")
	assert.Equal(t, "/pod/c1", gs.Linux.CgroupsPath)
	_, err = os.Stat(filepath.Join(dir, "shared", "c1", "rootfs", "bin", "sh"))
	assert.NoError(t, err, "the rootfs is exported")
	data, err := os.ReadFile(filepath.Join(dir, "shared", "c1", "mounts", "0"))
	require.NoError(t, err)
	assert.Equal(t, "127.0.0.1 localhost\n", string(data))

	pid, err := e.ctrs.Start(ctx, c1)
	require.NoError(t, err)
	assert.Equal(t, created.Pid, pid)
	agent.print("c1", "", api.Stream_STDOUT, "hello\n")
	agent.print("c1", "", api.Stream_STDERR, "oops\n")
	out.waitFor(t, "hello\n")
	errOut.waitFor(t, "oops\n")

	// An exec with its own output and an exit of its own.
	e1 := c1
	e1.ExecID = "e1"
	io2 := t.TempDir()
	eout := readFIFO(t, io2, "stdout")
	require.NoError(t, e.ctrs.Exec(ctx, e1, &specs.Process{Args: []string{"cat", "/proc/version"}, ApparmorProfile: "x"}, backend.IO{Stdout: eout.path}))
	ep := agent.proc("c1", "e1")
	require.NotNil(t, ep)
	assert.Empty(t, ep.execSpec.ApparmorProfile)
	_, err = e.ctrs.Start(ctx, e1)
	require.NoError(t, err)
	agent.print("c1", "e1", api.Stream_STDOUT, "Linux version 6.1.0\n")
	agent.exit("c1", "e1", 0)
	assert.Equal(t, uint32(0), e.ev.waitExit(t, e1))
	eout.waitEOF(t)
	assert.Equal(t, "Linux version 6.1.0\n", eout.String())
	require.NoError(t, e.ctrs.Delete(ctx, e1))

	// Stats, pids, update, pause pass through.
	st, err := e.ctrs.Stats(ctx, c1, resourceinfo.Resources{})
	require.NoError(t, err)
	assert.Contains(t, st.GetTypeUrl(), "io.containerd.cgroups.v2.Metrics")
	pids, err := e.ctrs.Pids(ctx, c1)
	require.NoError(t, err)
	assert.Equal(t, []uint32{pid}, pids)
	require.NoError(t, e.ctrs.Update(ctx, c1, &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: p(int64(25000))}, BlockIO: &specs.LinuxBlockIO{}}))
	if r := agent.proc("c1", "").resources; assert.NotNil(t, r) {
		assert.Equal(t, int64(25000), *r.CPU.Quota)
		assert.Nil(t, r.BlockIO)
	}
	require.NoError(t, e.ctrs.Pause(ctx, c1))
	require.NoError(t, e.ctrs.Resume(ctx, c1))

	// An OOM kill and the init's exit are reported; its output ends.
	agent.oom("c1")
	require.NoError(t, e.ctrs.Signal(ctx, c1, syscall.SIGTERM, false))
	assert.Equal(t, uint32(143), e.ev.waitExit(t, c1))
	e.ev.mu.Lock()
	assert.Equal(t, 1, e.ev.ooms[procKey(c1)])
	e.ev.mu.Unlock()
	out.waitEOF(t)
	errOut.waitEOF(t)
	assert.Equal(t, "hello\n", out.String())
	err = e.ctrs.Signal(ctx, c1, syscall.SIGKILL, false)
	assert.True(t, errdefs.IsNotFound(err), "signal to an exited process: %v", err)

	require.NoError(t, e.ctrs.Delete(ctx, c1))
	require.NoError(t, e.ctrs.Delete(ctx, c1), "Delete is idempotent")
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(filepath.Join(dir, "shared.rw", "c1")))
	require.NoError(t, err)
	assert.Empty(t, ms, "the container's mounts are gone")
	assert.Nil(t, agent.proc("c1", ""), "released in the guest")
	assert.Empty(t, findKeepers(func(k string) bool { return strings.HasPrefix(k, "sb1/") }), "no stdio keeper left")
	assert.Equal(t, []uint32{143}, e.ev.exitsOf(c1), "one exit, once")

	require.NoError(t, e.b.Stop(ctx, "sb1", time.Second))
	require.NoError(t, e.b.Delete(ctx, "sb1"))
	ms, err = mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	require.NoError(t, err)
	assert.Empty(t, ms, "nothing of the sandbox stays mounted")
}

func TestContainerStdin(t *testing.T) {
	e := newUnitEnv(t)
	ctx := context.Background()
	_, agent, _ := e.sandbox("sb1")
	io1 := t.TempDir()
	out := readFIFO(t, io1, "stdout")
	stdin := newFIFO(t, io1, "stdin")
	bdir, spec := bundle(t)
	c1 := backend.Process{Namespace: "k8s.io", SandboxID: "sb1", ContainerID: "c1"}
	_, err := e.ctrs.Create(ctx, &backend.Container{Process: c1, Bundle: bdir, Spec: spec, IO: backend.IO{Stdin: stdin, Stdout: out.path}})
	require.NoError(t, err)
	_, err = e.ctrs.Start(ctx, c1)
	require.NoError(t, err)

	// containerd writes stdin (its open waits for our reader).
	w, err := os.OpenFile(stdin, os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = io.WriteString(w, "echo hello\n")
	require.NoError(t, err)
	require.NoError(t, w.Close())
	deadline := time.Now().Add(10 * time.Second)
	for {
		pr := agent.proc("c1", "")
		agent.mu.Lock()
		got, closed := string(pr.stdin), pr.stdinClosed
		agent.mu.Unlock()
		if got == "echo hello\n" && closed {
			break
		}
		require.True(t, time.Now().Before(deadline), "stdin in the guest: %q closed=%v", got, closed)
		time.Sleep(5 * time.Millisecond)
	}
	require.NoError(t, e.ctrs.CloseStdin(ctx, c1))
}

// A restart of the daemon (a new backend) keeps containerd's FIFOs open,
// delivers the output written meanwhile and reports an exit that happened
// while it was down.
func TestContainerRecover(t *testing.T) {
	e := newUnitEnv(t)
	ctx := context.Background()
	dir, agent, _ := e.sandbox("sb1")
	io1 := t.TempDir()
	out := readFIFO(t, io1, "stdout")
	bdir, spec := bundle(t)
	c1 := backend.Process{Namespace: "k8s.io", SandboxID: "sb1", ContainerID: "c1"}
	created, err := e.ctrs.Create(ctx, &backend.Container{Process: c1, Bundle: bdir, Spec: spec, IO: backend.IO{Stdout: out.path}})
	require.NoError(t, err)
	_, err = e.ctrs.Start(ctx, c1)
	require.NoError(t, err)
	agent.print("c1", "", api.Stream_STDOUT, "one\n")
	out.waitFor(t, "one\n")

	// The daemon goes away; the container writes and exits meanwhile.
	require.NoError(t, e.b.Close())
	agent.print("c1", "", api.Stream_STDOUT, "two\n")
	agent.exit("c1", "", 3)
	time.Sleep(100 * time.Millisecond)
	assert.False(t, out.ended(), "containerd saw the end of the output while the daemon was down")
	require.Len(t, findKeepers(func(k string) bool { return k == "sb1/c1/" }), 1, "the keeper outlives the daemon")

	e.restart()
	alive, err := e.b.Recover(ctx, "sb1", dir, podInfo(), true, func(uint32, time.Time) {})
	require.NoError(t, err)
	require.True(t, alive)
	require.NoError(t, e.ctrs.Recover(ctx, &backend.Container{Process: c1, Bundle: bdir, Spec: spec,
		IO: backend.IO{Stdout: out.path}, Private: created.Private, Status: backend.StatusRunning}))
	assert.Equal(t, uint32(3), e.ev.waitExit(t, c1))
	out.waitEOF(t)
	assert.True(t, strings.HasPrefix(out.String(), "one\n") && strings.HasSuffix(out.String(), "two\n"), "output %q", out.String())
	time.Sleep(100 * time.Millisecond)
	assert.Equal(t, []uint32{3}, e.ev.exitsOf(c1), "reported once")
	require.NoError(t, e.ctrs.Delete(ctx, c1))
	assert.Empty(t, findKeepers(func(k string) bool { return strings.HasPrefix(k, "sb1/") }))

	// Cleanup after a restart unmounts what no recorded container owns.
	_, err = e.ctrs.Create(ctx, &backend.Container{Process: backend.Process{Namespace: "k8s.io", SandboxID: "sb1", ContainerID: "c2"},
		Bundle: bdir, Spec: spec})
	require.NoError(t, err)
	require.NoError(t, e.b.Close())
	e.restart()
	_, err = e.b.Recover(ctx, "sb1", dir, podInfo(), true, func(uint32, time.Time) {})
	require.NoError(t, err)
	// c2's record was lost (a crash during its removal): nothing recovers it.
	_, err = e.b.Cleanup(ctx, map[string]bool{"sb1": true})
	require.NoError(t, err)
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(filepath.Join(dir, "shared.rw", "c2")))
	require.NoError(t, err)
	assert.Empty(t, ms)
}

// A VM that stops under its containers is reported as the sandbox's exit
// (the controller ends its processes with it); their output ends.
func TestSandboxCrashEndsContainers(t *testing.T) {
	e := newUnitEnv(t)
	ctx := context.Background()
	_, _, exits := e.sandbox("sb1")
	io1 := t.TempDir()
	out := readFIFO(t, io1, "stdout")
	bdir, spec := bundle(t)
	c1 := backend.Process{Namespace: "k8s.io", SandboxID: "sb1", ContainerID: "c1"}
	_, err := e.ctrs.Create(ctx, &backend.Container{Process: c1, Bundle: bdir, Spec: spec, IO: backend.IO{Stdout: out.path}})
	require.NoError(t, err)
	_, err = e.ctrs.Start(ctx, c1)
	require.NoError(t, err)
	e.lv.stop(DomainName("rss-unit-", "sb1"), libvirt.DomainEventStoppedCrashed)
	require.Eventually(t, func() bool { return len(exits.get()) == 1 }, 5*time.Second, 10*time.Millisecond)
	assert.Equal(t, []uint32{ExitFailed}, exits.get())
	out.waitEOF(t)
	assert.Empty(t, e.ev.exitsOf(c1), "no process exit from the backend: the controller ends them with the sandbox")
	err = e.ctrs.Signal(ctx, c1, syscall.SIGKILL, false)
	assert.Error(t, err)
	require.NoError(t, e.ctrs.Delete(ctx, c1), "delete after the VM is gone")
}

// A guest that does not answer fails its own calls within bounds and
// blocks nobody else's.
func TestUnreachableGuest(t *testing.T) {
	old := [...]time.Duration{connectWait, callTimeout}
	connectWait, callTimeout = 300*time.Millisecond, 500*time.Millisecond
	t.Cleanup(func() { connectWait, callTimeout = old[0], old[1] })
	e := newUnitEnv(t)
	ctx := context.Background()
	_, slow, _ := e.sandbox("slow")
	e.sandbox("fast")
	bdir, spec := bundle(t)
	slow.mu.Lock()
	slow.unresponsive = true
	slow.mu.Unlock()

	var wg sync.WaitGroup
	var slowErr error
	var slowTook time.Duration
	wg.Add(1)
	go func() {
		defer wg.Done()
		t0 := time.Now()
		_, slowErr = e.ctrs.Create(ctx, &backend.Container{Process: backend.Process{SandboxID: "slow", ContainerID: "c1"}, Bundle: bdir, Spec: spec})
		slowTook = time.Since(t0)
	}()
	t0 := time.Now()
	fast := backend.Process{SandboxID: "fast", ContainerID: "c1"}
	_, err := e.ctrs.Create(ctx, &backend.Container{Process: fast, Bundle: bdir, Spec: spec})
	require.NoError(t, err)
	_, err = e.ctrs.Start(ctx, fast)
	require.NoError(t, err)
	fastTook := time.Since(t0)
	wg.Wait()
	require.Error(t, slowErr)
	assert.True(t, errdefs.IsDeadlineExceeded(slowErr) || errdefs.IsUnavailable(slowErr), "%v", slowErr)
	t.Logf("the unreachable guest's Create failed after %s; the other sandbox's Create+Start took %s", slowTook, fastTook)
	_, err = e.b.Usage(ctx, "slow")
	assert.NoError(t, err, "usage of an unreachable guest falls back to libvirt's figures")
	// Close joins every background loop, the hung guest's too.
	done := make(chan struct{})
	go func() { _ = e.b.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
}

// Issue 14 item 11: a Stop that fails does not stop the watching, so a
// crash after it is still reported.
func TestStopFailureKeepsWatching(t *testing.T) {
	e := newUnitEnv(t)
	ctx := context.Background()
	_, agent, exits := e.sandbox("sb1")
	agent.mu.Lock()
	agent.onShut = nil // the guest does not power off
	agent.mu.Unlock()
	e.lv.onShutdown = func(*fakeDom) {} // nor on ACPI
	boom := libvirt.Error{Code: uint32(libvirt.ErrInternalError), Message: "destroy failed"}
	e.lv.setFail("DomainDestroy", boom)
	err := e.b.Stop(ctx, "sb1", 200*time.Millisecond)
	require.Error(t, err)
	e.lv.setFail("DomainDestroy", nil)

	e.lv.stop(DomainName("rss-unit-", "sb1"), libvirt.DomainEventStoppedCrashed)
	require.Eventually(t, func() bool { return len(exits.get()) == 1 }, 5*time.Second, 10*time.Millisecond,
		"the crash after a failed Stop is reported")

	// And a Stop that works reports nothing.
	_, err = e.b.Start(ctx, "sb1", exits.fn)
	require.NoError(t, err)
	e.lv.onShutdown = nil
	require.NoError(t, e.b.Stop(ctx, "sb1", time.Second))
	time.Sleep(200 * time.Millisecond)
	assert.Len(t, exits.get(), 1, "a Stop asked for is no exit")
}

// Stop asks the agent first; the ACPI button only when it cannot.
func TestStopAsksTheAgent(t *testing.T) {
	e := newUnitEnv(t)
	ctx := context.Background()
	name := DomainName("rss-unit-", "sb1")
	_, agent, _ := e.sandbox("sb1")
	agent.mu.Lock()
	agent.onShut = func() { e.lv.stop(name, libvirt.DomainEventStoppedShutdown) }
	agent.mu.Unlock()
	require.NoError(t, e.b.Stop(ctx, "sb1", 4*time.Second))
	agent.mu.Lock()
	sd := agent.shutdown
	agent.mu.Unlock()
	require.NotNil(t, sd, "the agent was asked to shut down")
	assert.Equal(t, uint32(2000), sd.GetTimeoutMs())
	e.lv.mu.Lock()
	calls := strings.Join(e.lv.calls, ",")
	e.lv.mu.Unlock()
	assert.NotContains(t, calls, "DomainShutdown,", "no ACPI press when the agent shut down")
}

// Issue 14 item 11 and issue 11: a change refused by the guest changes
// nothing; a change the domain refuses is undone in the guest, and live
// and persistent definitions stay together.
func TestUpdateTogetherOrNothing(t *testing.T) {
	e := newUnitEnv(t)
	ctx := context.Background()
	name := DomainName("rss-unit-", "sb1")
	_, agent, _ := e.sandbox("sb1")
	d := e.lv.get(name)
	e.lv.mu.Lock()
	oldXML, oldQuota := d.xml, d.quota
	e.lv.mu.Unlock()
	require.Equal(t, int64(100000), oldQuota)

	half := podInfo()
	half.CPULimit, half.CPUQuota = p(0.5), p(int64(50000))

	// The guest refuses: nothing changes.
	agent.setFail("UpdateSandbox", errors.New("cpu.max: invalid argument"))
	require.Error(t, e.b.Update(ctx, "sb1", half))
	e.lv.mu.Lock()
	assert.Equal(t, oldXML, d.xml)
	assert.Equal(t, oldQuota, d.quota)
	e.lv.mu.Unlock()

	// The domain refuses a live value: the definition, the live values and
	// the guest are restored.
	e.lv.failOnce("DomainSetMemoryFlags", libvirt.Error{Code: uint32(libvirt.ErrInternalError), Message: "balloon"})
	require.Error(t, e.b.Update(ctx, "sb1", half))
	e.lv.mu.Lock()
	assert.Contains(t, d.xml, "<global_quota>100000</global_quota>", "persistent definition restored")
	assert.Equal(t, oldQuota, d.quota, "live quota restored")
	e.lv.mu.Unlock()
	agent.mu.Lock()
	require.Len(t, agent.updates, 2)
	assert.Equal(t, int64(50000), agent.updates[0].GetCpuQuota())
	assert.Equal(t, int64(100000), agent.updates[1].GetCpuQuota(), "the guest is set back")
	agent.mu.Unlock()

	// The domain refuses the definition: the guest is set back.
	e.lv.failOnce("DomainDefineXML", libvirt.Error{Code: uint32(libvirt.ErrInternalError), Message: "define"})
	require.Error(t, e.b.Update(ctx, "sb1", half))
	agent.mu.Lock()
	assert.Equal(t, int64(100000), agent.pod.GetCpuQuota())
	agent.mu.Unlock()

	// Both accept.
	require.NoError(t, e.b.Update(ctx, "sb1", half))
	e.lv.mu.Lock()
	assert.Contains(t, d.xml, "<global_quota>50000</global_quota>")
	assert.Equal(t, int64(50000), d.quota)
	e.lv.mu.Unlock()
	agent.mu.Lock()
	assert.Equal(t, int64(50000), agent.pod.GetCpuQuota())
	agent.mu.Unlock()
}

// Issue 14 item 11: Recover says NotFound only when the domain is known
// gone.
func TestRecoverErrors(t *testing.T) {
	e := newUnitEnv(t)
	ctx := context.Background()
	nop := func(uint32, time.Time) {}
	_, err := e.b.Recover(ctx, "gone", t.TempDir(), podInfo(), true, nop)
	assert.True(t, errdefs.IsNotFound(err), "no domain: %v", err)

	dir, _, _ := e.sandbox("sb1")
	e.lv.setFail("DomainLookupByName", libvirt.Error{Code: uint32(libvirt.ErrRPC), Message: "connection reset"})
	_, err = e.b.Recover(ctx, "sb1", dir, podInfo(), true, nop)
	require.Error(t, err)
	assert.False(t, errdefs.IsNotFound(err), "a libvirt hiccup is transient: %v", err)
	assert.True(t, errdefs.IsUnavailable(err), "%v", err)
	e.lv.setFail("DomainLookupByName", nil)

	// A domain of that name that belongs to another sandbox.
	d := e.lv.get(DomainName("rss-unit-", "sb1"))
	e.lv.mu.Lock()
	d.def.Metadata.Sandbox.ID = "other"
	e.lv.mu.Unlock()
	_, err = e.b.Recover(ctx, "sb1", dir, podInfo(), true, nop)
	assert.True(t, errdefs.IsNotFound(err), "foreign domain: %v", err)
	e.lv.mu.Lock()
	d.def.Metadata.Sandbox.ID = "sb1"
	e.lv.mu.Unlock()

	// A stopped domain: not alive, no error.
	e.lv.stop(d.dom.Name, libvirt.DomainEventStoppedShutdown)
	alive, err := e.b.Recover(ctx, "sb1", dir, podInfo(), true, nop)
	assert.NoError(t, err)
	assert.False(t, alive)
}

// Issue 14 item 11: a qemu-img failure is what it is, never the caller's
// invalid argument.
func TestQemuImgErrors(t *testing.T) {
	e := newUnitEnv(t)
	ctx := context.Background()
	for _, tc := range []struct {
		desc   string
		script string // "" : a missing binary
		is     func(error) bool
	}{
		{desc: "missing qemu-img", is: errdefs.IsFailedPrecondition},
		{desc: "full disk", script: "echo \"qemu-img: x: Could not create 'x': No space left on device\" >&2; exit 1", is: errdefs.IsResourceExhausted},
		{desc: "missing base image", script: "echo \"qemu-img: Could not open backing file: No such file or directory\" >&2; exit 1", is: errdefs.IsFailedPrecondition},
		{desc: "anything else", script: "echo boom >&2; exit 1", is: errdefs.IsUnknown},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			bin := filepath.Join(t.TempDir(), "qemu-img")
			if tc.script != "" {
				require.NoError(t, os.WriteFile(bin, []byte("#!/bin/sh\n"+tc.script+"\n"), 0o755))
			}
			e.b.opts.QEMUImg = bin
			err := e.b.Create(ctx, "q1", t.TempDir(), podInfo(), backend.Pod{})
			require.Error(t, err)
			assert.True(t, tc.is(err), "%v", err)
			assert.False(t, errdefs.IsInvalidArgument(err), "%v", err)
			assert.Nil(t, e.lv.get(DomainName("rss-unit-", "q1")), "no domain defined")
		})
	}
}

func TestUsageFromTheGuest(t *testing.T) {
	e := newUnitEnv(t)
	ctx := context.Background()
	_, _, _ = e.sandbox("sb1")
	bdir, spec := bundle(t)
	c1 := backend.Process{Namespace: "k8s.io", SandboxID: "sb1", ContainerID: "c1"}
	_, err := e.ctrs.Create(ctx, &backend.Container{Process: c1, Bundle: bdir, Spec: spec})
	require.NoError(t, err)
	u, err := e.b.Usage(ctx, "sb1")
	require.NoError(t, err)
	require.NotNil(t, u.MemoryUsage)
	assert.Equal(t, uint64(10<<20), *u.MemoryUsage, "the pod cgroup's memory")
	assert.Equal(t, uint64(3), *u.Pids)
	require.Contains(t, u.Containers, "c1")
	assert.Equal(t, uint64(500_000), *u.Containers["c1"].CPUTimeNanos)
	assert.Equal(t, uint64(5<<20), *u.Containers["c1"].MemoryUsage)
}

// A sandbox whose recovery fails for a passing reason keeps its
// containers: they are not reported dead, and a later Recover reattaches
// them.
func TestRecoverTransientThenRetry(t *testing.T) {
	e := newUnitEnv(t)
	ctx := context.Background()
	dir, agent, _ := e.sandbox("sb1")
	io1 := t.TempDir()
	out := readFIFO(t, io1, "stdout")
	bdir, spec := bundle(t)
	c1 := backend.Process{Namespace: "k8s.io", SandboxID: "sb1", ContainerID: "c1"}
	created, err := e.ctrs.Create(ctx, &backend.Container{Process: c1, Bundle: bdir, Spec: spec, IO: backend.IO{Stdout: out.path}})
	require.NoError(t, err)
	_, err = e.ctrs.Start(ctx, c1)
	require.NoError(t, err)
	require.NoError(t, e.b.Close())

	e.restart()
	e.lv.failOnce("DomainLookupByName", libvirt.Error{Code: uint32(libvirt.ErrRPC), Message: "libvirtd restarting"})
	nop := func(uint32, time.Time) {}
	_, err = e.b.Recover(ctx, "sb1", dir, podInfo(), true, nop)
	require.Error(t, err)
	assert.False(t, errdefs.IsNotFound(err))
	rec := &backend.Container{Process: c1, Bundle: bdir, IO: backend.IO{Stdout: out.path}, Private: created.Private, Status: backend.StatusRunning}
	require.NoError(t, e.ctrs.Recover(ctx, rec))
	time.Sleep(100 * time.Millisecond)
	assert.Empty(t, e.ev.exitsOf(c1), "a passing failure is no death")

	alive, err := e.b.Recover(ctx, "sb1", dir, podInfo(), true, nop)
	require.NoError(t, err)
	require.True(t, alive)
	agent.print("c1", "", api.Stream_STDOUT, "after\n")
	out.waitFor(t, "after\n")
	agent.exit("c1", "", 0)
	assert.Equal(t, uint32(0), e.ev.waitExit(t, c1))
	out.waitEOF(t)
}

// An agent that takes the shutdown but does not power off gets the ACPI
// button, then the domain is destroyed at the timeout.
func TestStopAgentThenACPIThenDestroy(t *testing.T) {
	e := newUnitEnv(t)
	ctx := context.Background()
	name := DomainName("rss-unit-", "sb1")
	_, agent, exits := e.sandbox("sb1")
	agent.mu.Lock()
	agent.onShut = nil // takes the request, never powers off
	agent.mu.Unlock()
	acpi := make(chan struct{}, 1)
	e.lv.onShutdown = func(*fakeDom) { acpi <- struct{}{} } // ignored by the guest
	t0 := time.Now()
	require.NoError(t, e.b.Stop(ctx, "sb1", 800*time.Millisecond))
	took := time.Since(t0)
	select {
	case <-acpi:
	default:
		t.Error("no ACPI press after the agent's shutdown did not power off")
	}
	assert.GreaterOrEqual(t, took, 800*time.Millisecond, "the guest had the whole timeout")
	assert.Equal(t, libvirt.DomainShutoff, e.lv.get(name).state, "destroyed at the timeout")
	time.Sleep(100 * time.Millisecond)
	assert.Empty(t, exits.get(), "a Stop is no exit")
}

// A Start that fails leaves nothing mounted.
func TestStartFailureUnmounts(t *testing.T) {
	e := newUnitEnv(t)
	ctx := context.Background()
	for _, fail := range []string{"DomainCreate", "DomainSetMemoryParameters"} {
		t.Run(fail, func(t *testing.T) {
			dir := t.TempDir()
			id := "sb-" + strings.ToLower(fail)
			require.NoError(t, e.b.Create(ctx, id, dir, podInfo(), backend.Pod{}))
			t.Cleanup(func() { _ = e.b.Delete(context.Background(), id) })
			e.lv.failOnce(fail, libvirt.Error{Code: uint32(libvirt.ErrInternalError), Message: "boom"})
			_, err := e.b.Start(ctx, id, func(uint32, time.Time) {})
			require.Error(t, err)
			ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
			require.NoError(t, err)
			assert.Empty(t, ms, "mounts left by a failed Start")
		})
	}
}

// Cleanup removes only the domains of its own daemon (owner), not those
// of another daemon sharing the libvirtd.
func TestCleanupOnlyOwnDomains(t *testing.T) {
	e := newUnitEnv(t)
	ctx := context.Background()
	dir := t.TempDir()
	require.NoError(t, e.b.Create(ctx, "mine", dir, podInfo(), backend.Pod{}))
	other := e.b.cfg
	other.Owner = "/var/lib/another-daemon"
	d, err := DomainFor("theirs", t.TempDir(), podInfo(), other)
	require.NoError(t, err)
	x, err := d.Marshal()
	require.NoError(t, err)
	_, err = e.lv.DomainDefineXML(x)
	require.NoError(t, err)
	removed, err := e.b.Cleanup(ctx, map[string]bool{})
	require.NoError(t, err)
	assert.Equal(t, []string{"mine"}, removed)
	assert.NotNil(t, e.lv.get(DomainName("rss-unit-", "theirs")), "another daemon's domain is left alone")
}

// The pod's hostname and sysctls reach SetupSandbox, also after a
// restart; its /etc files are bound into each container unless the
// container mounts its own, read-only with a read-only root; Delete
// removes them; a pod the guest would refuse is refused on Create.
func TestPodConfigReachesTheGuest(t *testing.T) {
	fakeHost(t, "node-1")
	e := newUnitEnv(t)
	ctx := context.Background()
	pod := backend.Pod{
		Hostname: "test-hostname",
		DNS:      &backend.DNS{Servers: []string{"8.8.8.8"}, Searches: []string{"google.com"}, Options: []string{"timeout:1"}},
		Sysctls:  map[string]string{"kernel.shm_rmid_forced": "1", "fs/mqueue/msg_max": "100"},
	}
	dir, agent, _ := e.sandboxPod("sb1", pod)
	agent.mu.Lock()
	setup := agent.setup
	agent.mu.Unlock()
	require.NotNil(t, setup)
	assert.Equal(t, "test-hostname", setup.GetHostname())
	assert.Equal(t, map[string]string{"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "100"}, setup.GetSysctls())

	// c1 brings its own /etc/hosts (bundle); c2 has a read-only root.
	bdir, spec := bundle(t)
	c1 := backend.Process{Namespace: "k8s.io", SandboxID: "sb1", ContainerID: "c1"}
	_, err := e.ctrs.Create(ctx, &backend.Container{Process: c1, Bundle: bdir, Spec: spec})
	require.NoError(t, err)
	bdir2, spec2 := bundle(t)
	spec2.Mounts = spec2.Mounts[:3]
	spec2.Root.Readonly = true
	c2 := backend.Process{Namespace: "k8s.io", SandboxID: "sb1", ContainerID: "c2"}
	_, err = e.ctrs.Create(ctx, &backend.Container{Process: c2, Bundle: bdir2, Spec: spec2})
	require.NoError(t, err)
	assert.Len(t, spec2.Mounts, 3, "the container's spec is not modified")

	agent.mu.Lock()
	gs1, gs2 := agent.specs["c1"], agent.specs["c2"]
	agent.mu.Unlock()
	require.NotNil(t, gs1)
	require.NotNil(t, gs2)
	byDest := func(s *specs.Spec) map[string]specs.Mount {
		m := map[string]specs.Mount{}
		for _, x := range s.Mounts {
			m[x.Destination] = x
		}
		return m
	}
	m1, m2 := byDest(gs1), byDest(gs2)
	assert.Equal(t, "/run/rss/shared/c1/mounts/0", m1["/etc/hosts"].Source, "c1's own /etc/hosts")
	want := map[string]string{
		"/etc/hostname":    "test-hostname\n",
		"/etc/hosts":       "127.0.0.1 localhost\n::1 localhost\n",
		"/etc/resolv.conf": "search google.com\nnameserver 8.8.8.8\noptions timeout:1\n",
	}
	for dest, content := range want {
		for _, c := range []struct {
			id string
			m  map[string]specs.Mount
			ro bool
		}{{"c1", m1, false}, {"c2", m2, true}} {
			if c.id == "c1" && dest == "/etc/hosts" {
				continue
			}
			mnt, ok := c.m[dest]
			if !assert.True(t, ok, "%s has %s", c.id, dest) {
				continue
			}
			rel, ok := strings.CutPrefix(mnt.Source, "/run/rss/shared/")
			require.True(t, ok, "%s %s from the shared directory: %s", c.id, dest, mnt.Source)
			data, err := os.ReadFile(filepath.Join(dir, "shared", rel))
			require.NoError(t, err)
			assert.Equal(t, content, string(data), "%s %s", c.id, dest)
			assert.Equal(t, c.ro, slices.Contains(mnt.Options, "ro"), "%s %s read-only: %v", c.id, dest, mnt.Options)
			err = unix.Access(filepath.Join(dir, "shared.rw", rel), unix.W_OK)
			if c.ro {
				assert.Error(t, err, "%s %s is read-only on the host too", c.id, dest)
			} else {
				assert.NoError(t, err, "%s %s is writable", c.id, dest)
			}
		}
	}
	require.NoError(t, e.ctrs.Delete(ctx, c1))
	require.NoError(t, e.ctrs.Delete(ctx, c2))

	// A restarted daemon starts the recovered sandbox with the same
	// hostname and sysctls.
	require.NoError(t, e.b.Stop(ctx, "sb1", 0))
	require.NoError(t, e.b.Close())
	e.restart()
	_, err = e.b.Recover(ctx, "sb1", dir, podInfo(), false, nil)
	require.NoError(t, err)
	agent.mu.Lock()
	agent.setup = nil
	agent.mu.Unlock()
	_, err = e.b.Start(ctx, "sb1", func(uint32, time.Time) {})
	require.NoError(t, err)
	agent.mu.Lock()
	setup = agent.setup
	agent.mu.Unlock()
	require.NotNil(t, setup)
	assert.Equal(t, "test-hostname", setup.GetHostname())
	assert.Len(t, setup.GetSysctls(), 2)

	require.NoError(t, e.b.Delete(ctx, "sb1"))
	for _, f := range []string{EtcDir, PodFile} {
		_, err := os.Stat(filepath.Join(dir, f))
		assert.True(t, os.IsNotExist(err), "Delete left %s: %v", f, err)
	}

	// Refused before anything is made.
	dir2 := t.TempDir()
	err = e.b.Create(ctx, "sb2", dir2, podInfo(), backend.Pod{Sysctls: map[string]string{"vm.swappiness": "1"}})
	assert.True(t, errdefs.IsInvalidArgument(err), "%v", err)
	ents, err := os.ReadDir(dir2)
	require.NoError(t, err)
	assert.Empty(t, ents)
	assert.Nil(t, e.lv.get(DomainName(e.b.cfg.NamePrefix, "sb2")))
}
