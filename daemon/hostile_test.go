package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	taskapi "github.com/containerd/containerd/api/runtime/task/v3"
	sbapi "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/dynamicpb"
	"google.golang.org/protobuf/types/known/anypb"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/config"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/guard"
)

// testDaemon runs the daemon in this process (slot mode, no task shim,
// no events) and returns its configuration; it stops with the test.
func testDaemon(t *testing.T, extra func(*config.Config)) config.Config {
	t.Helper()
	superviseShim = false
	t.Cleanup(func() { superviseShim = true })
	base, err := os.MkdirTemp("", "rss-daemon-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(base) })
	cfg := config.Default()
	cfg.Listen = filepath.Join(base, "sb.sock")
	cfg.Dir = filepath.Join(base, "state")
	cfg.ContainerdAddress = ""
	cfg.Fsync = false
	cfg.LogLevel = "error"
	if extra != nil {
		extra(&cfg)
	}
	// Run leaves the level to main.
	level := log.L.Logger.GetLevel()
	require.NoError(t, log.SetLevel(cfg.LogLevel))
	t.Cleanup(func() { log.L.Logger.SetLevel(level) })
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg, func() { close(ready) }) }()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		t.Fatalf("daemon: %v", err)
	}
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(30 * time.Second):
			t.Error("the daemon did not stop")
		}
	})
	return cfg
}

// clients of the daemon's two APIs.
type clients struct {
	grpc  *grpc.ClientConn
	ttrpc *ttrpc.Client
}

func dial(t *testing.T, cfg config.Config) clients {
	t.Helper()
	gc, err := grpc.NewClient("unix://"+cfg.Listen, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(64<<20)))
	require.NoError(t, err)
	t.Cleanup(func() { gc.Close() })
	conn, err := net.Dial("unix", cfg.TaskUpstreamPath())
	require.NoError(t, err)
	tc := ttrpc.NewClient(conn)
	t.Cleanup(func() { tc.Close() })
	return clients{gc, tc}
}

// call sends req to the method of a service over gRPC (the sandbox
// controller, the CRI) or ttrpc (the task API) and returns the error.
func (c clients) call(ctx context.Context, svc protoreflect.ServiceDescriptor, m protoreflect.MethodDescriptor, req proto.Message) error {
	out := dynamicpb.NewMessage(m.Output())
	if svc.FullName() == "containerd.task.v3.Task" {
		return c.ttrpc.Call(ctx, string(svc.FullName()), string(m.Name()), req, out)
	}
	method := fmt.Sprintf("/%s/%s", svc.FullName(), m.Name())
	if !m.IsStreamingServer() {
		return c.grpc.Invoke(ctx, method, req, out)
	}
	st, err := c.grpc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, method)
	if err != nil {
		return err
	}
	if err := st.SendMsg(req); err != nil {
		return err
	}
	if err := st.CloseSend(); err != nil {
		return err
	}
	for {
		if err := st.RecvMsg(dynamicpb.NewMessage(m.Output())); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

// services are what the daemon serves to its callers.
var services = []protoreflect.FullName{
	"containerd.services.sandbox.v1.Controller",
	"runtime.v1.RuntimeService",
	"runtime.v1.ImageService",
	"containerd.task.v3.Task",
}

func serviceDescriptors(t *testing.T) []protoreflect.ServiceDescriptor {
	t.Helper()
	var out []protoreflect.ServiceDescriptor
	for _, name := range services {
		d, err := protoregistry.GlobalFiles.FindDescriptorByName(name)
		require.NoError(t, err, "%s", name)
		out = append(out, d.(protoreflect.ServiceDescriptor))
	}
	return out
}

// gen makes hostile messages: every field set or not, strings from a pool
// of IDs that exist, paths, huge and malformed values, Anys of the types
// the daemon decodes with garbage or random contents.
type gen struct {
	r       *rand.Rand
	strings []string
	ids     []string // of the sandboxes, pods and containers that exist
	bundles []string
}

var hostileStrings = []string{
	"", "a", "0", "-1", "1e30000000", "9223372036854775808", "NaN", "Inf", "500m", "2Gi", "100Mbps", "30s", "-5s",
	"../../etc/passwd", "/", "/dev/null", "a/b", "\x00", "é", strings.Repeat("x", 77), strings.Repeat("y", 1<<16),
	"unix:///nonexistent.sock", "k8s.io", "resource-slot", "resource-slot-cri", "SANDBOX_READY",
}

var annotationKeys = []string{
	"resources.limits.cpu", "resources.requests.cpu", "resources.limits.memory", "resources.requests.memory",
	"resources.limits.pid", "resources.limits.storage", "resources.limits.network-bandwidth",
	"resources.limits.network-ingress", "resources.limits.disk-read-bps", "kubernetes.io/ingress-bandwidth",
	"resource-slot.kuasar.io/exit-after", "resource-slot.kuasar.io/exit-code",
	"resource-slot.kuasar.io/cpu-usage", "resource-slot.kuasar.io/memory-usage",
	"io.kubernetes.cri.sandbox-id",
}

var anyTypes = []string{
	"type.googleapis.com/runtime.v1.PodSandboxConfig", "runtime.v1.PodSandboxConfig",
	"types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
	"io.containerd.cri.v1.UpdatedResources", "type.googleapis.com/google.protobuf.Empty", "", "garbage/type",
}

func (g *gen) str() string {
	if g.r.IntN(2) == 0 && len(g.strings) > 0 {
		return g.strings[g.r.IntN(len(g.strings))]
	}
	return hostileStrings[g.r.IntN(len(hostileStrings))]
}

func (g *gen) int() int64 {
	switch g.r.IntN(6) {
	case 0:
		return 0
	case 1:
		return -1
	case 2:
		return math.MaxInt64
	case 3:
		return math.MinInt64
	case 4:
		return int64(g.r.IntN(1 << 20))
	}
	return g.r.Int64()
}

func (g *gen) message(m protoreflect.Message, depth int) {
	if depth > 6 {
		return
	}
	if m.Descriptor().FullName() == "google.protobuf.Any" {
		g.any(m, depth)
		return
	}
	fields := m.Descriptor().Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		if g.r.IntN(3) == 0 {
			continue
		}
		switch {
		case fd.IsMap():
			mp := m.Mutable(fd).Map()
			for range g.r.IntN(4) {
				k := g.scalar(fd.MapKey(), m, depth)
				if fd.MapKey().Kind() == protoreflect.StringKind && g.r.IntN(2) == 0 {
					k = protoreflect.ValueOfString(annotationKeys[g.r.IntN(len(annotationKeys))])
				}
				mp.Set(k.MapKey(), g.value(fd.MapValue(), mp.NewValue, depth))
			}
		case fd.IsList():
			l := m.Mutable(fd).List()
			for range g.r.IntN(4) {
				l.Append(g.value(fd, l.NewElement, depth))
			}
		default:
			m.Set(fd, g.value(fd, func() protoreflect.Value { return m.NewField(fd) }, depth))
		}
	}
}

func (g *gen) value(fd protoreflect.FieldDescriptor, newMsg func() protoreflect.Value, depth int) protoreflect.Value {
	if fd.Kind() == protoreflect.MessageKind || fd.Kind() == protoreflect.GroupKind {
		v := newMsg()
		g.message(v.Message(), depth+1)
		return v
	}
	return g.scalar(fd, nil, depth)
}

func (g *gen) scalar(fd protoreflect.FieldDescriptor, _ protoreflect.Message, _ int) protoreflect.Value {
	switch fd.Kind() {
	case protoreflect.BoolKind:
		return protoreflect.ValueOfBool(g.r.IntN(2) == 0)
	case protoreflect.EnumKind:
		return protoreflect.ValueOfEnum(protoreflect.EnumNumber(g.r.IntN(8) - 1))
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		return protoreflect.ValueOfInt32(int32(g.int()))
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		return protoreflect.ValueOfInt64(g.int())
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		return protoreflect.ValueOfUint32(uint32(g.int()))
	case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		return protoreflect.ValueOfUint64(uint64(g.int()))
	case protoreflect.FloatKind:
		return protoreflect.ValueOfFloat32(float32(g.r.NormFloat64() * 1e6))
	case protoreflect.DoubleKind:
		return protoreflect.ValueOfFloat64([]float64{math.NaN(), math.Inf(1), -1, 0, 1e308, g.r.NormFloat64()}[g.r.IntN(6)])
	case protoreflect.StringKind:
		name := string(fd.Name())
		switch {
		case name == "bundle" && len(g.bundles) > 0 && g.r.IntN(3) > 0:
			return protoreflect.ValueOfString(g.bundles[g.r.IntN(len(g.bundles))])
		case name == "exec_id" && g.r.IntN(4) > 0:
			return protoreflect.ValueOfString("")
		case (name == "id" || strings.HasSuffix(name, "_id")) && len(g.ids) > 0 && g.r.IntN(4) > 0:
			return protoreflect.ValueOfString(g.ids[g.r.IntN(len(g.ids))])
		}
		return protoreflect.ValueOfString(g.str())
	case protoreflect.BytesKind:
		b := make([]byte, g.r.IntN(64))
		for i := range b {
			b[i] = byte(g.r.IntN(256))
		}
		return protoreflect.ValueOfBytes(b)
	}
	panic(fmt.Sprintf("kind %s", fd.Kind()))
}

// any fills an Any with one of the types the daemon decodes: garbage,
// a random message of that type, or JSON.
func (g *gen) any(m protoreflect.Message, depth int) {
	url := anyTypes[g.r.IntN(len(anyTypes))]
	var value []byte
	name := url[strings.LastIndex(url, "/")+1:]
	switch mt, err := protoregistry.GlobalTypes.FindMessageByName(protoreflect.FullName(name)); {
	case err == nil && g.r.IntN(4) > 0:
		msg := mt.New()
		g.message(msg, depth+1)
		value, _ = proto.Marshal(msg.Interface())
	case strings.HasSuffix(url, "LinuxResources") || strings.HasSuffix(url, "UpdatedResources"):
		value = []byte([]string{`{"cpu":{"quota":-1,"period":0}}`, `{"memory":{"limit":-9223372036854775808}}`,
			`{"Resources":{"cpu_period":-1,"cpu_quota":9223372036854775807}}`, `null`, `[]`, `{`}[g.r.IntN(6)])
	default:
		value = make([]byte, g.r.IntN(32))
		for i := range value {
			value[i] = byte(g.r.IntN(256))
		}
	}
	fields := m.Descriptor().Fields()
	m.Set(fields.ByName("type_url"), protoreflect.ValueOfString(url))
	m.Set(fields.ByName("value"), protoreflect.ValueOfBytes(value))
}

// bundle writes an OCI bundle of a container in sandboxID, with random
// annotations and resources.
func (g *gen) bundle(t *testing.T, sandboxID string) string {
	dir := t.TempDir()
	a := map[string]string{"io.kubernetes.cri.sandbox-id": sandboxID}
	for range g.r.IntN(4) {
		a[annotationKeys[g.r.IntN(len(annotationKeys))]] = g.str()
	}
	quota, period, shares := g.int(), uint64(g.int()), uint64(g.int())
	limit := g.int()
	pids := g.int()
	spec := &specs.Spec{Version: specs.Version, Annotations: a, Linux: &specs.Linux{Resources: &specs.LinuxResources{
		CPU:    &specs.LinuxCPU{Quota: &quota, Period: &period, Shares: &shares, Cpus: g.str()},
		Memory: &specs.LinuxMemory{Limit: &limit, Reservation: &limit, Swap: &limit},
		Pids:   &specs.LinuxPids{Limit: &pids},
	}}}
	if g.r.IntN(3) == 0 {
		spec.Linux = nil
	}
	data, err := json.Marshal(spec)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "config.json"), data, 0o600))
	return dir
}

// plainBundle writes the bundle of a container in sandboxID, without
// resources.
func plainBundle(t *testing.T, sandboxID string) string {
	dir := t.TempDir()
	data, err := json.Marshal(&specs.Spec{Version: specs.Version, Annotations: map[string]string{"io.kubernetes.cri.sandbox-id": sandboxID}})
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "config.json"), data, 0o600))
	return dir
}

// TestHostileMessages sends thousands of random, malformed and hostile
// messages to every method of the sandbox controller, the CRI and the
// task API of one daemon: no call may panic (each would be recovered,
// counted and logged by the guard interceptors), fail as Unknown or
// Internal, and the daemon serves on. RSS_HOSTILE_CALLS sets how many
// (default 2000), RSS_HOSTILE_SEED the seed.
func TestHostileMessages(t *testing.T) {
	n, seed := 2000, uint64(1)
	if v, err := strconv.Atoi(os.Getenv("RSS_HOSTILE_CALLS")); err == nil {
		n = v
	}
	if v, err := strconv.ParseUint(os.Getenv("RSS_HOSTILE_SEED"), 10, 64); err == nil {
		seed = v
	}
	cfg := testDaemon(t, nil)
	c := dial(t, cfg)
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	g := &gen{r: rand.New(rand.NewPCG(seed, seed))}

	// Sandboxes, pods and containers for the calls to find, made again
	// and again as the calls stop and remove them.
	ctrl := sbapi.NewControllerClient(c.grpc)
	tasks := taskapi.NewTTRPCTaskClient(c.ttrpc)
	cri := runtime.NewRuntimeServiceClient(c.grpc)
	for i := range 3 {
		id := fmt.Sprintf("sb%d", i)
		g.ids = append(g.ids, id, fmt.Sprintf("ctr%d", i))
		g.bundles = append(g.bundles, plainBundle(t, id))
		for range 2 {
			g.bundles = append(g.bundles, g.bundle(t, id))
		}
	}
	logDir := t.TempDir()
	var podID string
	populate := func() {
		for i := range 3 {
			id := fmt.Sprintf("sb%d", i)
			opts, err := typeurl.MarshalAnyToProto(&runtime.PodSandboxConfig{Metadata: &runtime.PodSandboxMetadata{Name: id, Uid: id, Namespace: "ns"}})
			require.NoError(t, err)
			ctrl.Create(ctx, &sbapi.ControllerCreateRequest{SandboxID: id, Options: &anypb.Any{TypeUrl: opts.GetTypeUrl(), Value: opts.GetValue()}})
			ctrl.Start(ctx, &sbapi.ControllerStartRequest{SandboxID: id})
			cid := fmt.Sprintf("ctr%d", i)
			tasks.Create(ctx, &taskapi.CreateTaskRequest{ID: cid, Bundle: g.bundles[3*i]})
			tasks.Start(ctx, &taskapi.StartRequest{ID: cid})
		}
		if podID != "" {
			if _, err := cri.PodSandboxStatus(ctx, &runtime.PodSandboxStatusRequest{PodSandboxId: podID}); err == nil {
				return
			}
		}
		pod, err := cri.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: &runtime.PodSandboxConfig{
			Metadata: &runtime.PodSandboxMetadata{Name: "pod", Uid: "pod", Namespace: "ns", Attempt: uint32(len(g.ids))}, LogDirectory: logDir,
		}})
		require.NoError(t, err)
		ctr, err := cri.CreateContainer(ctx, &runtime.CreateContainerRequest{PodSandboxId: pod.PodSandboxId,
			Config: &runtime.ContainerConfig{Metadata: &runtime.ContainerMetadata{Name: "c"}, Image: &runtime.ImageSpec{Image: "busybox"}, LogPath: "c.log"}})
		require.NoError(t, err)
		podID = pod.PodSandboxId
		g.ids = append(g.ids, pod.PodSandboxId, ctr.ContainerId, pod.PodSandboxId[:8])
	}

	before := guard.Panics()
	codesSeen := map[string]int{}
	bad := map[string]string{}
	svcs := serviceDescriptors(t)
	for i := range n {
		if i%50 == 0 {
			populate()
		}
		svc := svcs[g.r.IntN(len(svcs))]
		m := svc.Methods().Get(g.r.IntN(svc.Methods().Len()))
		mt, err := protoregistry.GlobalTypes.FindMessageByName(m.Input().FullName())
		require.NoError(t, err)
		req := mt.New()
		g.message(req, 0)
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err = c.call(cctx, svc, m, req.Interface())
		timedOut := cctx.Err() != nil
		cancel()
		code := status.Code(err)
		if timedOut && code == codes.Unknown {
			// The client's deadline (a Wait), not the daemon's answer.
			code = codes.DeadlineExceeded
		}
		key := fmt.Sprintf("%s/%s %s", svc.Name(), m.Name(), code)
		codesSeen[key]++
		if code == codes.Internal || code == codes.Unknown {
			if _, ok := bad[key]; !ok {
				text, _ := json.Marshal(req.Interface())
				bad[key] = fmt.Sprintf("call %d: %v\n  request: %.2000s", i, err, text)
			}
		}
	}
	assert.Equal(t, before, guard.Panics(), "calls panicked; see the log")
	var keys []string
	for k := range bad {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		t.Errorf("%s: %s", k, bad[k])
	}
	// The daemon still serves.
	_, err := cri.Version(ctx, &runtime.VersionRequest{})
	require.NoError(t, err)
	if testing.Verbose() {
		var pairs []string
		for k, v := range codesSeen {
			pairs = append(pairs, fmt.Sprintf("%s: %d", k, v))
		}
		sort.Strings(pairs)
		t.Logf("%d calls:\n%s", n, strings.Join(pairs, "\n"))
	}
}
