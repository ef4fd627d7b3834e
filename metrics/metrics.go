// Package metrics exposes the sandboxer to Prometheus: sandboxes by state,
// node capacity and what the sandboxes take of it, admission rejections,
// the duration of every gRPC and ttrpc call, each ready sandbox's usage and
// each sandbox's estimated cost. Everything but the call durations is read
// at scrape time from the controller and the admitter, which keeps the hot
// paths free of metric updates. The README's "Metrics" section lists them.
package metrics

import (
	"context"
	"net/http"
	"sort"
	"time"

	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/kuasar-io/resource-slot-sandboxer/capacity"
	"github.com/kuasar-io/resource-slot-sandboxer/cost"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
)

// Namespace prefixes every metric of the sandboxer.
const Namespace = "resource_slot"

// usageTimeout bounds the usage reads of one scrape: a backend that is
// slow to answer leaves the rest of the sandboxes out, not the scrape.
const usageTimeout = 5 * time.Second

// Options configure the metrics.
type Options struct {
	Controller *sandboxer.Controller
	// Admitter is the capacity admitter; nil leaves out the capacity
	// metrics.
	Admitter *capacity.Admitter
	// Prices of the cost estimate; all zero leaves out
	// resource_slot_cost_total.
	Prices cost.Prices
	// Now is the clock of the cost; nil is time.Now.
	Now func() time.Time
}

// Metrics holds the registry and the call-duration histogram.
type Metrics struct {
	reg       *prometheus.Registry
	durations *prometheus.HistogramVec
}

// New registers the metrics in a registry of their own, with the Go and
// process collectors.
func New(o Options) *Metrics {
	if o.Now == nil {
		o.Now = time.Now
	}
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		durations: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace,
			Name:      "operation_duration_seconds",
			Help:      "Duration of the gRPC (sandbox controller, ...) and ttrpc (task API) calls the sandboxer serves, by full method name and status code. Wait calls last as long as what they wait for.",
			Buckets:   []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"method", "code"}),
	}
	m.reg.MustRegister(
		m.durations,
		newCollector(o),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

// Registry is where the metrics are registered (tests gather from it).
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

func (m *Metrics) observe(method string, err error, start time.Time) {
	code := status.Code(errgrpc.ToGRPC(err)).String()
	m.durations.WithLabelValues(method, code).Observe(time.Since(start).Seconds())
}

// GRPCServerOptions time every call of a gRPC server.
func (m *Metrics) GRPCServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
			start := time.Now()
			resp, err := handler(ctx, req)
			m.observe(info.FullMethod, err, start)
			return resp, err
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
			start := time.Now()
			err := handler(srv, ss)
			m.observe(info.FullMethod, err, start)
			return err
		}),
	}
}

// TTRPCServerOptions time every call of a ttrpc server (the task API).
func (m *Metrics) TTRPCServerOptions() []ttrpc.ServerOpt {
	return []ttrpc.ServerOpt{
		ttrpc.WithChainUnaryServerInterceptor(func(ctx context.Context, unmarshal ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, method ttrpc.Method) (any, error) {
			start := time.Now()
			resp, err := method(ctx, unmarshal)
			m.observe(info.FullMethod, err, start)
			return resp, err
		}),
	}
}

// Handler serves /metrics and /healthz.
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write([]byte("ok\n"))
	})
	return mux
}

// collector reads the controller and the admitter at scrape time.
type collector struct {
	o Options

	sandboxes, capacity, allocated, requested, limited *prometheus.Desc
	rejections, usage, cost                            *prometheus.Desc
}

func newCollector(o Options) *collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(Namespace, "", name), help, labels, nil)
	}
	currency := o.Prices.Currency
	if currency == "" {
		currency = "the configured currency"
	}
	return &collector{
		o:          o,
		sandboxes:  d("sandboxes", "Sandboxes the daemon knows, by state (created, ready, stopped) and mode (slot, vm).", "state", "mode"),
		capacity:   d("capacity", "The node's capacity times the overcommit ratio: what admission lets the sandboxes allocate (cpu in cores, memory in bytes, pids).", "resource"),
		allocated:  d("allocated", "Sum of the allocations (limit, else request) of the sandboxes that hold resources (created or ready).", "resource"),
		requested:  d("requested", "Sum of the requests (cpu, memory) of the sandboxes that hold resources.", "resource"),
		limited:    d("limited", "Sum of the limits of the sandboxes that hold resources.", "resource"),
		rejections: d("admission_rejections_total", "Admissions that did not fit the capacity, by resource and policy: refused under enforce, admitted with a warning under warn.", "resource", "policy"),
		usage:      d("sandbox_usage", "What each ready sandbox uses, by resource: cpu_cores (current), cpu_seconds (cumulative), memory_bytes, memory_rss_bytes, pids, disk_read_bytes, disk_write_bytes, net_rx_bytes, net_tx_bytes (cumulative). Slot mode reports the simulated containers' usage.", "sandbox", "resource"),
		cost:       d("cost_total", "Estimated cost of each sandbox so far, in "+currency+": prices per hour times what it held while ready.", "sandbox"),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.sandboxes, c.capacity, c.allocated, c.requested, c.limited, c.rejections, c.usage, c.cost} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	ctrl := c.o.Controller
	views := ctrl.List()
	sort.Slice(views, func(i, j int) bool { return views[i].State.ID < views[j].State.ID })

	type stateMode struct{ state, mode string }
	counts := map[stateMode]int{}
	for _, p := range []sandboxer.Phase{sandboxer.PhaseCreated, sandboxer.PhaseReady, sandboxer.PhaseStopped} {
		counts[stateMode{string(p), ctrl.Mode()}] = 0
	}
	for _, v := range views {
		counts[stateMode{string(v.State.Phase), v.State.Mode}]++
	}
	for k, n := range counts {
		ch <- prometheus.MustNewConstMetric(c.sandboxes, prometheus.GaugeValue, float64(n), k.state, k.mode)
	}

	if a := c.o.Admitter; a != nil {
		snap := a.Snapshot()
		for _, r := range snap.Resources {
			res := r.Resource.String()
			ch <- prometheus.MustNewConstMetric(c.capacity, prometheus.GaugeValue, r.Allocatable, res)
			ch <- prometheus.MustNewConstMetric(c.allocated, prometheus.GaugeValue, r.Allocated, res)
			ch <- prometheus.MustNewConstMetric(c.limited, prometheus.GaugeValue, r.Limited, res)
			if r.HasRequests {
				ch <- prometheus.MustNewConstMetric(c.requested, prometheus.GaugeValue, r.Requested, res)
			}
		}
		// Every resource and policy that can count, from zero.
		rejections := map[[2]string]uint64{}
		if snap.Policy != capacity.Off {
			for _, r := range capacity.Resources {
				rejections[[2]string{r.String(), string(snap.Policy)}] = 0
			}
		}
		for _, rj := range snap.Rejections {
			rejections[[2]string{rj.Resource.String(), string(rj.Policy)}] = rj.Count
		}
		for k, n := range rejections {
			ch <- prometheus.MustNewConstMetric(c.rejections, prometheus.CounterValue, float64(n), k[0], k[1])
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), usageTimeout)
	defer cancel()
	for _, v := range views {
		if v.State.Phase != sandboxer.PhaseReady || ctx.Err() != nil {
			continue
		}
		u, _, err := ctrl.Usage(ctx, v.State.ID)
		if err != nil {
			log.G(ctx).WithError(err).WithField("sandbox", v.State.ID).Debug("metrics: sandbox usage")
			continue
		}
		for _, s := range usageSamples(u) {
			ch <- prometheus.MustNewConstMetric(c.usage, prometheus.GaugeValue, s.value, v.State.ID, s.resource)
		}
	}

	if !c.o.Prices.Free() {
		now := c.o.Now()
		for _, v := range views {
			ch <- prometheus.MustNewConstMetric(c.cost, prometheus.CounterValue, c.o.Prices.Sandbox(v, now).Total, v.State.ID)
		}
	}
}

type sample struct {
	resource string
	value    float64
}

// usageSamples are the measurements a usage has.
func usageSamples(u resourceinfo.Usage) []sample {
	var out []sample
	if u.CPUPercent != nil {
		out = append(out, sample{"cpu_cores", *u.CPUPercent / 100})
	}
	if u.CPUTimeNanos != nil {
		out = append(out, sample{"cpu_seconds", float64(*u.CPUTimeNanos) / 1e9})
	}
	for _, m := range []struct {
		name string
		v    *uint64
	}{
		{"memory_bytes", u.MemoryUsage}, {"memory_rss_bytes", u.MemoryRSS}, {"pids", u.Pids},
		{"disk_read_bytes", u.DiskReadBytes}, {"disk_write_bytes", u.DiskWriteBytes},
		{"net_rx_bytes", u.NetRxBytes}, {"net_tx_bytes", u.NetTxBytes},
	} {
		if m.v != nil {
			out = append(out, sample{m.name, float64(*m.v)})
		}
	}
	return out
}
