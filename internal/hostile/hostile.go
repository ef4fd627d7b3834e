// Package hostile sends random, malformed and hostile messages to every
// method of the daemon's APIs, for the tests that check that no call
// panics or fails unclassified (daemon's, in process, and the e2e fault
// suite, through the real daemon and its task shim). Every field is set
// or not; strings come from a pool of IDs that exist and of huge,
// path-like and malformed values; Anys are of the types the daemon
// decodes, with garbage or random contents; bundles have random
// resources and annotations.
package hostile

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	_ "github.com/containerd/containerd/api/runtime/task/v3"     // the task API's descriptors
	_ "github.com/containerd/containerd/api/services/sandbox/v1" // the sandbox API's
	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/dynamicpb"
	_ "k8s.io/cri-api/pkg/apis/runtime/v1" // the CRI's
)

// Clients of the daemon's two APIs: gRPC (the sandbox controller, the
// CRI) and ttrpc (the task API, of the daemon or of its task shim).
type Clients struct {
	GRPC  *grpc.ClientConn
	TTRPC *ttrpc.Client
}

// Call sends req to the method of a service over gRPC (the sandbox
// controller, the CRI) or ttrpc (the task API) and returns the error.
func (c Clients) Call(ctx context.Context, svc protoreflect.ServiceDescriptor, m protoreflect.MethodDescriptor, req proto.Message) error {
	out := dynamicpb.NewMessage(m.Output())
	if svc.FullName() == "containerd.task.v3.Task" {
		return c.TTRPC.Call(ctx, string(svc.FullName()), string(m.Name()), req, out)
	}
	method := fmt.Sprintf("/%s/%s", svc.FullName(), m.Name())
	if !m.IsStreamingServer() {
		return c.GRPC.Invoke(ctx, method, req, out)
	}
	st, err := c.GRPC.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, method)
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

// Services are what the daemon serves to its callers.
var Services = []protoreflect.FullName{
	"containerd.services.sandbox.v1.Controller",
	"runtime.v1.RuntimeService",
	"runtime.v1.ImageService",
	"containerd.task.v3.Task",
}

// ServiceDescriptors are the descriptors of Services.
func ServiceDescriptors() ([]protoreflect.ServiceDescriptor, error) {
	var out []protoreflect.ServiceDescriptor
	for _, name := range Services {
		d, err := protoregistry.GlobalFiles.FindDescriptorByName(name)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out = append(out, d.(protoreflect.ServiceDescriptor))
	}
	return out, nil
}

// Gen makes hostile messages: every field set or not, strings from a pool
// of IDs that exist, paths, huge and malformed values, Anys of the types
// the daemon decodes with garbage or random contents.
type Gen struct {
	R *rand.Rand
	// IDs of the sandboxes, pods and containers that exist, which ID
	// fields take most of the time.
	IDs []string
	// Bundles of containers, which bundle fields take most of the time.
	Bundles []string
}

// New is a generator seeded with seed.
func New(seed uint64) *Gen { return &Gen{R: rand.New(rand.NewPCG(seed, seed))} }

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

func (g *Gen) str() string {
	if g.R.IntN(3) == 0 && len(g.IDs) > 0 {
		return g.IDs[g.R.IntN(len(g.IDs))]
	}
	return hostileStrings[g.R.IntN(len(hostileStrings))]
}

func (g *Gen) int() int64 {
	switch g.R.IntN(6) {
	case 0:
		return 0
	case 1:
		return -1
	case 2:
		return math.MaxInt64
	case 3:
		return math.MinInt64
	case 4:
		return int64(g.R.IntN(1 << 20))
	}
	return g.R.Int64()
}

// Message fills m at random.
func (g *Gen) Message(m protoreflect.Message) { g.message(m, 0) }

func (g *Gen) message(m protoreflect.Message, depth int) {
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
		if g.R.IntN(3) == 0 {
			continue
		}
		switch {
		case fd.IsMap():
			mp := m.Mutable(fd).Map()
			for range g.R.IntN(4) {
				k := g.scalar(fd.MapKey(), m, depth)
				if fd.MapKey().Kind() == protoreflect.StringKind && g.R.IntN(2) == 0 {
					k = protoreflect.ValueOfString(annotationKeys[g.R.IntN(len(annotationKeys))])
				}
				mp.Set(k.MapKey(), g.value(fd.MapValue(), mp.NewValue, depth))
			}
		case fd.IsList():
			l := m.Mutable(fd).List()
			for range g.R.IntN(4) {
				l.Append(g.value(fd, l.NewElement, depth))
			}
		default:
			m.Set(fd, g.value(fd, func() protoreflect.Value { return m.NewField(fd) }, depth))
		}
	}
}

func (g *Gen) value(fd protoreflect.FieldDescriptor, newMsg func() protoreflect.Value, depth int) protoreflect.Value {
	if fd.Kind() == protoreflect.MessageKind || fd.Kind() == protoreflect.GroupKind {
		v := newMsg()
		g.message(v.Message(), depth+1)
		return v
	}
	return g.scalar(fd, nil, depth)
}

func (g *Gen) scalar(fd protoreflect.FieldDescriptor, _ protoreflect.Message, _ int) protoreflect.Value {
	switch fd.Kind() {
	case protoreflect.BoolKind:
		return protoreflect.ValueOfBool(g.R.IntN(2) == 0)
	case protoreflect.EnumKind:
		return protoreflect.ValueOfEnum(protoreflect.EnumNumber(g.R.IntN(8) - 1))
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		return protoreflect.ValueOfInt32(int32(g.int()))
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		return protoreflect.ValueOfInt64(g.int())
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		return protoreflect.ValueOfUint32(uint32(g.int()))
	case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		return protoreflect.ValueOfUint64(uint64(g.int()))
	case protoreflect.FloatKind:
		return protoreflect.ValueOfFloat32(float32(g.R.NormFloat64() * 1e6))
	case protoreflect.DoubleKind:
		return protoreflect.ValueOfFloat64([]float64{math.NaN(), math.Inf(1), -1, 0, 1e308, g.R.NormFloat64()}[g.R.IntN(6)])
	case protoreflect.StringKind:
		name := string(fd.Name())
		switch {
		case name == "bundle" && len(g.Bundles) > 0 && g.R.IntN(3) > 0:
			return protoreflect.ValueOfString(g.Bundles[g.R.IntN(len(g.Bundles))])
		case name == "exec_id" && g.R.IntN(4) > 0:
			return protoreflect.ValueOfString("")
		case (name == "id" || strings.HasSuffix(name, "_id")) && len(g.IDs) > 0 && g.R.IntN(4) > 0:
			return protoreflect.ValueOfString(g.IDs[g.R.IntN(len(g.IDs))])
		}
		return protoreflect.ValueOfString(g.str())
	case protoreflect.BytesKind:
		b := make([]byte, g.R.IntN(64))
		for i := range b {
			b[i] = byte(g.R.IntN(256))
		}
		return protoreflect.ValueOfBytes(b)
	}
	panic(fmt.Sprintf("kind %s", fd.Kind()))
}

// any fills an Any with one of the types the daemon decodes: garbage,
// a random message of that type, or JSON.
func (g *Gen) any(m protoreflect.Message, depth int) {
	url := anyTypes[g.R.IntN(len(anyTypes))]
	var value []byte
	name := url[strings.LastIndex(url, "/")+1:]
	switch mt, err := protoregistry.GlobalTypes.FindMessageByName(protoreflect.FullName(name)); {
	case err == nil && g.R.IntN(4) > 0:
		msg := mt.New()
		g.message(msg, depth+1)
		value, _ = proto.Marshal(msg.Interface())
	case strings.HasSuffix(url, "LinuxResources") || strings.HasSuffix(url, "UpdatedResources"):
		value = []byte([]string{`{"cpu":{"quota":-1,"period":0}}`, `{"memory":{"limit":-9223372036854775808}}`,
			`{"Resources":{"cpu_period":-1,"cpu_quota":9223372036854775807}}`, `null`, `[]`, `{`}[g.R.IntN(6)])
	default:
		value = make([]byte, g.R.IntN(32))
		for i := range value {
			value[i] = byte(g.R.IntN(256))
		}
	}
	fields := m.Descriptor().Fields()
	m.Set(fields.ByName("type_url"), protoreflect.ValueOfString(url))
	m.Set(fields.ByName("value"), protoreflect.ValueOfBytes(value))
}

// Bundle writes, in dir, the OCI bundle of a container in sandboxID with
// random annotations and resources.
func (g *Gen) Bundle(dir, sandboxID string) error {
	a := map[string]string{"io.kubernetes.cri.sandbox-id": sandboxID}
	for range g.R.IntN(4) {
		a[annotationKeys[g.R.IntN(len(annotationKeys))]] = g.str()
	}
	quota, period, shares := g.int(), uint64(g.int()), uint64(g.int())
	limit := g.int()
	pids := g.int()
	spec := &specs.Spec{Version: specs.Version, Annotations: a, Linux: &specs.Linux{Resources: &specs.LinuxResources{
		CPU:    &specs.LinuxCPU{Quota: &quota, Period: &period, Shares: &shares, Cpus: g.str()},
		Memory: &specs.LinuxMemory{Limit: &limit, Reservation: &limit, Swap: &limit},
		Pids:   &specs.LinuxPids{Limit: &pids},
	}}}
	if g.R.IntN(3) == 0 {
		spec.Linux = nil
	}
	return writeSpec(dir, spec)
}

// PlainBundle writes, in dir, the bundle of a container in sandboxID,
// without resources.
func PlainBundle(dir, sandboxID string) error {
	return writeSpec(dir, &specs.Spec{Version: specs.Version, Annotations: map[string]string{"io.kubernetes.cri.sandbox-id": sandboxID}})
}

func writeSpec(dir string, spec *specs.Spec) error {
	data, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "config.json"), data, 0o600)
}

// Report is what became of the calls of Run.
type Report struct {
	// Codes counts the calls by "Service/Method Code".
	Codes map[string]int
	// Bad holds, by "Service/Method Code", the first call answered with
	// Internal or Unknown (a panic recovered, or an error without a
	// class): the error and the request.
	Bad map[string]string
}

// Run sends n random messages to random methods of every service;
// populate, called every 50 calls, makes again what the calls removed.
// Each call has a deadline of its own; a Wait that reaches it is no
// failure of the daemon's.
func Run(ctx context.Context, c Clients, g *Gen, n int, populate func()) (Report, error) {
	rep := Report{Codes: map[string]int{}, Bad: map[string]string{}}
	svcs, err := ServiceDescriptors()
	if err != nil {
		return rep, err
	}
	for i := range n {
		if populate != nil && i%50 == 0 {
			populate()
		}
		svc := svcs[g.R.IntN(len(svcs))]
		m := svc.Methods().Get(g.R.IntN(svc.Methods().Len()))
		mt, err := protoregistry.GlobalTypes.FindMessageByName(m.Input().FullName())
		if err != nil {
			return rep, err
		}
		req := mt.New()
		g.Message(req)
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err = c.Call(cctx, svc, m, req.Interface())
		timedOut := cctx.Err() != nil
		cancel()
		code := status.Code(err)
		if timedOut && (code == codes.Unknown || code == codes.Unavailable) {
			// The client's deadline (a Wait), not the daemon's answer.
			code = codes.DeadlineExceeded
		}
		key := fmt.Sprintf("%s/%s %s", svc.Name(), m.Name(), code)
		rep.Codes[key]++
		if code == codes.Internal || code == codes.Unknown {
			if _, ok := rep.Bad[key]; !ok {
				text, _ := json.Marshal(req.Interface())
				rep.Bad[key] = fmt.Sprintf("call %d: %v\n  request: %.2000s", i, err, text)
			}
		}
	}
	return rep, nil
}

// Summary lists the codes seen, one "Service/Method Code: count" a line.
func (r Report) Summary() string {
	var pairs []string
	for k, v := range r.Codes {
		pairs = append(pairs, fmt.Sprintf("%s: %d", k, v))
	}
	sort.Strings(pairs)
	return strings.Join(pairs, "\n")
}
