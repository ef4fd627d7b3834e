package guest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
)

func TestEventQueue(t *testing.T) {
	q := newEventQueue(4, func(id string) string { return "ns-of-" + id })
	ctx := context.Background()
	require.NoError(t, q.Publish(ctx, runtime.TaskCreateEventTopic, &eventstypes.TaskCreate{ContainerID: "c1"}))
	require.NoError(t, q.Publish(namespaces.WithNamespace(ctx, "k8s.io"), runtime.TaskStartEventTopic, &eventstypes.TaskStart{ContainerID: "c1"}))

	evs := q.get(ctx, 0, 10, 0)
	require.Len(t, evs, 2)
	assert.Equal(t, uint64(1), evs[0].Seq)
	assert.Equal(t, "ns-of-c1", evs[0].Namespace, "namespace from the container")
	assert.Equal(t, "k8s.io", evs[1].Namespace, "namespace from the context")
	v, err := typeurl.UnmarshalAny(evs[1].Event)
	require.NoError(t, err)
	assert.Equal(t, "c1", v.(*eventstypes.TaskStart).ContainerID)

	// Not acknowledged: delivered again. Acknowledged: released.
	assert.Len(t, q.get(ctx, 0, 10, 0), 2)
	assert.Len(t, q.get(ctx, 1, 10, 0), 1)
	assert.Len(t, q.get(ctx, 0, 10, 0), 1, "seq 1 was released")
	assert.Empty(t, q.get(ctx, 2, 10, 0))

	// max bounds a batch.
	for i := 0; i < 3; i++ {
		q.Publish(ctx, runtime.TaskExecAddedEventTopic, &eventstypes.TaskExecAdded{ContainerID: "c1", ExecID: fmt.Sprint(i)})
	}
	assert.Len(t, q.get(ctx, 2, 2, 0), 2)

	// A waiting get returns with the next event.
	done := make(chan int)
	go func() { done <- len(q.get(ctx, 5, 10, 10*time.Second)) }()
	time.Sleep(20 * time.Millisecond)
	q.Publish(ctx, runtime.TaskExitEventTopic, &eventstypes.TaskExit{ContainerID: "c1", ExitStatus: 3})
	select {
	case n := <-done:
		assert.Equal(t, 1, n)
	case <-time.After(5 * time.Second):
		t.Fatal("get did not wake up")
	}
	// ... and one that times out returns nothing; a cancelled context
	// ends the wait.
	assert.Empty(t, q.get(ctx, 6, 10, 10*time.Millisecond))
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	assert.Empty(t, q.get(cctx, 6, 10, time.Hour))
}

func TestEventQueueKeepsExits(t *testing.T) {
	q := newEventQueue(3, nil)
	ctx := context.Background()
	q.Publish(ctx, runtime.TaskExitEventTopic, &eventstypes.TaskExit{ContainerID: "a"})
	q.Publish(ctx, runtime.TaskOOMEventTopic, &eventstypes.TaskOOM{ContainerID: "a"})
	q.Publish(ctx, runtime.TaskStartEventTopic, &eventstypes.TaskStart{ContainerID: "b"})
	// Full: the start goes, not the exit or the OOM kill.
	q.Publish(ctx, runtime.TaskExitEventTopic, &eventstypes.TaskExit{ContainerID: "b"})
	evs := q.get(ctx, 0, 10, 0)
	var topics []string
	for _, e := range evs {
		topics = append(topics, e.Topic)
	}
	assert.Equal(t, []string{runtime.TaskExitEventTopic, runtime.TaskOOMEventTopic, runtime.TaskExitEventTopic}, topics)
	// Only exits left: the oldest goes.
	q.Publish(ctx, runtime.TaskExitEventTopic, &eventstypes.TaskExit{ContainerID: "c"})
	evs = q.get(ctx, 0, 10, 0)
	assert.Equal(t, uint64(2), evs[0].Seq)
	seq, kept, dropped := q.stats()
	assert.Equal(t, uint64(5), seq)
	assert.Equal(t, 3, kept)
	assert.Equal(t, uint64(2), dropped)
}

// TestEventQueueSettle: a powering-off guest waits for the host to read
// its last events, and not for a host that never asks.
func TestEventQueueSettle(t *testing.T) {
	ctx := context.Background()
	q := newEventQueue(8, nil)
	assert.True(t, q.settle(time.Millisecond, time.Second), "nothing queued")

	q.Publish(ctx, runtime.TaskExitEventTopic, &eventstypes.TaskExit{ContainerID: "a", ExitStatus: 3})
	assert.False(t, q.settle(time.Millisecond, 50*time.Millisecond), "the host did not read the exit")

	// A host that reads and acknowledges it lets the guest go.
	settled := make(chan bool)
	go func() { settled <- q.settle(10*time.Millisecond, time.Minute) }()
	evs := q.get(ctx, 0, 10, time.Second)
	require.Len(t, evs, 1)
	q.get(ctx, evs[0].Seq, 10, 0)
	select {
	case ok := <-settled:
		assert.True(t, ok)
	case <-time.After(30 * time.Second):
		t.Fatal("settle did not see the acknowledgement")
	}

	// An expected exit not published yet holds it; an exec's exit does
	// not count, the init process's does.
	q.expect([]string{"b"})
	assert.False(t, q.settle(time.Millisecond, 50*time.Millisecond), "b's exit is not published")
	q.Publish(ctx, runtime.TaskExitEventTopic, &eventstypes.TaskExit{ContainerID: "b", ID: "exec-1"})
	assert.False(t, q.settle(time.Millisecond, 50*time.Millisecond), "an exec's exit")
	q.Publish(ctx, runtime.TaskExitEventTopic, &eventstypes.TaskExit{ContainerID: "b", ID: "b", ExitStatus: 143})
	evs = q.get(ctx, evs[0].Seq, 10, 0)
	require.Len(t, evs, 2)
	q.get(ctx, evs[1].Seq, 10, 0)
	assert.True(t, q.settle(time.Millisecond, 5*time.Second))
}

func TestStream(t *testing.T) {
	dir := t.TempDir()
	p, err := newProcIO(dir, "init", &api.Stdio{Stdout: true}, 8)
	require.NoError(t, err)
	defer p.close()
	assert.NotEmpty(t, p.paths.Stdout)
	assert.NotEmpty(t, p.paths.Stderr, "stdout and stderr come together")
	assert.Empty(t, p.paths.Stdin)
	ctx := context.Background()

	// No writer yet: no data and no end, however long.
	off, data, eof := p.stdout.read(ctx, 0, 100, 50*time.Millisecond)
	assert.Equal(t, int64(0), off)
	assert.Empty(t, data)
	assert.False(t, eof)

	// A writer opens without blocking (the read end is open).
	w, err := os.OpenFile(p.paths.Stdout, os.O_WRONLY|unix.O_NONBLOCK, 0)
	require.NoError(t, err)
	_, err = w.Write([]byte("0123456789abcdef"))
	require.NoError(t, err)
	// The buffer holds 8 bytes: the rest waits in the FIFO.
	waitFor(t, func() bool { _, d, _ := p.stdout.read(ctx, 0, 100, 0); return len(d) == 8 })
	off, data, _ = p.stdout.read(ctx, 0, 100, 0)
	assert.Equal(t, "01234567", string(data))
	assert.Equal(t, int64(0), off)
	// Asking from 4 releases 0-3; the reader refills.
	waitFor(t, func() bool { _, d, _ := p.stdout.read(ctx, 4, 100, 0); return string(d) == "456789ab" })
	// max bounds the answer.
	_, data, _ = p.stdout.read(ctx, 4, 3, 0)
	assert.Equal(t, "456", string(data))
	// Below what is kept: from the oldest kept, with its offset.
	off, data, _ = p.stdout.read(ctx, 1, 100, 0)
	assert.Equal(t, int64(4), off)
	assert.Equal(t, "456789ab", string(data))
	// -1: the oldest kept.
	off, _, _ = p.stdout.read(ctx, -1, 100, 0)
	assert.Equal(t, int64(4), off)

	// The writer closes: after the last byte, eof.
	require.NoError(t, w.Close())
	var all strings.Builder
	off = 4
	for {
		o, d, e := p.stdout.read(ctx, off, 100, time.Second)
		all.Write(d)
		off = o + int64(len(d))
		if e {
			break
		}
	}
	assert.Equal(t, "456789abcdef", all.String())
	assert.Equal(t, int64(16), off)
}

func TestStdin(t *testing.T) {
	dir := t.TempDir()
	p, err := newProcIO(dir, "exec-x", &api.Stdio{Stdin: true, Stdout: true}, 1024)
	require.NoError(t, err)
	defer p.close()
	ctx := context.Background()
	// The process's end (the task service opens it when the process
	// starts); writes before that are buffered by the FIFO.
	n, err := p.writeStdin(ctx, []byte("hello"), false)
	require.NoError(t, err)
	assert.Equal(t, 5, n)
	r, err := os.OpenFile(p.paths.Stdin, os.O_RDONLY|unix.O_NONBLOCK, 0)
	require.NoError(t, err)
	defer r.Close()
	b := make([]byte, 10)
	n, err = r.Read(b)
	require.NoError(t, err)
	assert.Equal(t, "hello", string(b[:n]))
	n, err = p.writeStdin(ctx, []byte("!"), true)
	require.NoError(t, err)
	assert.Equal(t, 1, n)
	_, err = p.writeStdin(ctx, []byte("more"), false)
	assert.True(t, errdefs.IsFailedPrecondition(err), "%v", err)
	n, err = p.writeStdin(ctx, nil, true)
	require.NoError(t, err, "closing twice")
	assert.Zero(t, n)

	// A process without stdin.
	q, err := newProcIO(dir, "exec-y", &api.Stdio{Stdout: true}, 1024)
	require.NoError(t, err)
	defer q.close()
	_, err = q.writeStdin(ctx, []byte("x"), false)
	assert.True(t, errdefs.IsNotFound(err))
	_, err = q.stream(api.Stream_STREAM_UNSPECIFIED)
	assert.True(t, errdefs.IsInvalidArgument(err))
}

func TestStdinFull(t *testing.T) {
	p, err := newProcIO(t.TempDir(), "init", &api.Stdio{Stdin: true}, 1024)
	require.NoError(t, err)
	defer p.close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	// Nobody reads: the FIFO (64 KiB) fills; what fits is written.
	n, err := p.writeStdin(ctx, make([]byte, 1<<20), false)
	require.NoError(t, err)
	assert.Greater(t, n, 0)
	assert.Less(t, n, 1<<20)
	_, err = p.writeStdin(ctx, []byte("x"), false)
	assert.True(t, errdefs.IsUnavailable(err), "%v", err)
}

func waitFor(t *testing.T, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func i64(v int64) *int64   { return &v }
func u64(v uint64) *uint64 { return &v }
func str(v string) *string { return &v }

func TestPodLimits(t *testing.T) {
	for _, tc := range []struct {
		desc     string
		res      *api.PodResources
		bootPids int64
		want     map[string]string
		err      bool
	}{
		{desc: "unset is max", res: nil, want: map[string]string{
			"cpu.max": "max 100000", "cpu.weight": "100", "cpuset.cpus": "", "memory.min": "0",
			"memory.max": "max", "memory.swap.max": "max", "pids.max": "max"}},
		{desc: "unset pids is the boot's", res: &api.PodResources{}, bootPids: 64, want: map[string]string{"pids.max": "64"}},
		{desc: "values", res: &api.PodResources{CpuQuota: i64(50000), CpuPeriod: u64(200000), CpuWeight: u64(39),
			MemoryMax: i64(1 << 28), MemoryMin: i64(1 << 20), MemorySwapMax: i64(0), PidsMax: i64(10), CpusetCpus: str("0-1")},
			bootPids: 64, want: map[string]string{"cpu.max": "50000 200000", "cpu.weight": "39", "cpuset.cpus": "0-1",
				"memory.min": "1048576", "memory.max": "268435456", "memory.swap.max": "0", "pids.max": "10"}},
		{desc: "negative is max", res: &api.PodResources{CpuQuota: i64(-1), MemoryMax: i64(-1), PidsMax: i64(-1)}, bootPids: 64,
			want: map[string]string{"cpu.max": "max 100000", "memory.max": "max", "pids.max": "max"}},
		{desc: "bad cpuset", res: &api.PodResources{CpusetCpus: str("0;rm")}, err: true},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			ls, err := podLimits(tc.res, tc.bootPids)
			if tc.err {
				assert.True(t, errdefs.IsInvalidArgument(err), "%v", err)
				return
			}
			require.NoError(t, err)
			got := map[string]string{}
			for _, l := range ls {
				got[l.file] = l.value
			}
			for k, v := range tc.want {
				assert.Equal(t, v, got[k], k)
			}
		})
	}
}

// fakeCgroup is a directory of cgroup files; a file made a directory
// refuses writes.
func fakeCgroup(t *testing.T, files map[string]string) string {
	dir := t.TempDir()
	for f, v := range files {
		require.NoError(t, os.WriteFile(filepath.Join(dir, f), []byte(v+"\n"), 0o644))
	}
	return dir
}

func TestApplyLimitsAllOrNothing(t *testing.T) {
	dir := fakeCgroup(t, map[string]string{"cpu.max": "max 100000", "cpu.weight": "100", "memory.max": "max"})
	// memory.min cannot be written.
	require.NoError(t, os.Mkdir(filepath.Join(dir, "memory.min"), 0o755))
	err := applyLimits(dir, []limit{
		{file: "cpu.max", value: "50000 100000"},
		{file: "cpu.weight", value: "50"},
		{file: "memory.min", value: "1"},
		{file: "memory.max", value: "1000"},
	})
	require.Error(t, err)
	assert.True(t, errdefs.IsInvalidArgument(err) || strings.Contains(err.Error(), "memory.min"), "%v", err)
	for f, want := range map[string]string{"cpu.max": "max 100000", "cpu.weight": "100", "memory.max": "max"} {
		got, _ := readTrim(filepath.Join(dir, f))
		assert.Equal(t, want, got, "%s restored", f)
	}

	// Optional files may be missing; the others are written.
	dir = fakeCgroup(t, map[string]string{"memory.max": "max"})
	require.NoError(t, applyLimits(dir, []limit{{file: "memory.swap.max", value: "0", optional: true}, {file: "memory.max", value: "4096"}}))
	got, _ := readTrim(filepath.Join(dir, "memory.max"))
	assert.Equal(t, "4096", got)
}

func TestReadStats(t *testing.T) {
	dir := fakeCgroup(t, map[string]string{
		"cpu.stat":       "usage_usec 100\nuser_usec 60\nsystem_usec 40\nnr_periods 10\nnr_throttled 3\nthrottled_usec 500",
		"cpu.max":        "50000 100000",
		"memory.current": "4096",
		"memory.peak":    "8192",
		"memory.max":     "max",
		"memory.stat":    "anon 1024\nfile 2048\nkernel 7",
		"memory.events":  "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1",
		"pids.current":   "5",
		"pids.max":       "64",
		"pids.events":    "max 7",
	})
	st, err := readStats(dir)
	require.NoError(t, err)
	assert.Equal(t, &api.CgroupStats{CpuUsageUsec: 100, CpuUserUsec: 60, CpuSystemUsec: 40, NrPeriods: 10, NrThrottled: 3,
		ThrottledUsec: 500, MemoryCurrent: 4096, MemoryPeak: 8192, MemoryMax: 0, MemoryAnon: 1024, MemoryFile: 2048,
		Oom: 1, OomKill: 1, PidsCurrent: 5, PidsMax: 64, CpuQuota: 50000, CpuPeriod: 100000, PidsEventsMax: 7}, st)
	_, err = readStats(filepath.Join(dir, "missing"))
	assert.Error(t, err)
}

func TestParseCmdline(t *testing.T) {
	bc, errs := ParseCmdline("console=ttyS0 quiet rss.pids=64 rss.port=x.ready rss.agent_port=x.agent rss.vsock_port=99 rss.debug=1")
	assert.Empty(t, errs)
	assert.Equal(t, BootConfig{PidsMax: 64, ReadyPort: "x.ready", AgentPort: "x.agent", VsockPort: 99, Debug: true}, bc)
	bc, errs = ParseCmdline("rss.pids=-1 rss.pids=abc rss.burn=2 rss.vsock_port=x")
	assert.Len(t, errs, 4)
	assert.Equal(t, BootConfig{ReadyPort: DefaultReadyPort, AgentPort: DefaultAgentPort, VsockPort: DefaultVsockPort}, bc)
}

func TestValidateSetup(t *testing.T) {
	ok := &api.SetupSandboxRequest{SandboxId: "sb", Hostname: "pod-1", SharedTag: "rss-shared", Namespaces: []string{"ipc", "uts", "pid"},
		Sysctls: map[string]string{"kernel.shm_rmid_forced": "1", "net.ipv4.ip_local_port_range": "1024 65000", "fs.mqueue.msg_max": "20"}}
	require.NoError(t, validateSetup(ok))
	for _, tc := range []struct {
		desc string
		mod  func(r *api.SetupSandboxRequest)
	}{
		{"bad id", func(r *api.SetupSandboxRequest) { r.SandboxId = "../x" }},
		{"bad hostname", func(r *api.SetupSandboxRequest) { r.Hostname = "a b" }},
		{"long hostname", func(r *api.SetupSandboxRequest) { r.Hostname = strings.Repeat("a", 65) }},
		{"bad tag", func(r *api.SetupSandboxRequest) { r.SharedTag = "a,b" }},
		{"bad namespace", func(r *api.SetupSandboxRequest) { r.Namespaces = []string{"net"} }},
		{"namespace twice", func(r *api.SetupSandboxRequest) { r.Namespaces = []string{"ipc", "ipc"} }},
		{"not namespaced sysctl", func(r *api.SetupSandboxRequest) { r.Sysctls = map[string]string{"vm.overcommit_memory": "1"} }},
		{"sysctl path", func(r *api.SetupSandboxRequest) { r.Sysctls = map[string]string{"net/../../etc": "1"} }},
		{"sysctl value", func(r *api.SetupSandboxRequest) { r.Sysctls = map[string]string{"net.x": "1\n2"} }},
		{"bad resources", func(r *api.SetupSandboxRequest) { r.Resources = &api.PodResources{CpusetCpus: str("x")} }},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			r := &api.SetupSandboxRequest{SandboxId: ok.SandboxId}
			tc.mod(r)
			assert.Error(t, validateSetup(r))
		})
	}
}

func TestWithNoPivotRoot(t *testing.T) {
	a, err := withNoPivotRoot(nil)
	require.NoError(t, err)
	v, err := typeurl.UnmarshalAny(a)
	require.NoError(t, err)
	assert.True(t, v.(*options.Options).NoPivotRoot)

	in, err := typeurl.MarshalAnyToProto(&options.Options{BinaryName: "runc", SystemdCgroup: false, IoUid: 5})
	require.NoError(t, err)
	a, err = withNoPivotRoot(in)
	require.NoError(t, err)
	v, err = typeurl.UnmarshalAny(a)
	require.NoError(t, err)
	o := v.(*options.Options)
	assert.True(t, o.NoPivotRoot)
	assert.Equal(t, "runc", o.BinaryName)
	assert.Equal(t, uint32(5), o.IoUid)

	other, err := typeurl.MarshalAnyToProto(&eventstypes.TaskOOM{})
	require.NoError(t, err)
	_, err = withNoPivotRoot(other)
	assert.True(t, errdefs.IsInvalidArgument(err))
}
