package daemon

import (
	"context"
	"fmt"
	"net"
	"sync"

	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"google.golang.org/grpc"

	"github.com/kuasar-io/resource-slot-sandboxer/admin"
	"github.com/kuasar-io/resource-slot-sandboxer/capacity"
	"github.com/kuasar-io/resource-slot-sandboxer/config"
	"github.com/kuasar-io/resource-slot-sandboxer/cost"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/guard"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/guard/grpcguard"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/httpserve"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/unixsock"
	"github.com/kuasar-io/resource-slot-sandboxer/metrics"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
)

// ops is what the daemon offers operators: capacity admission, the
// admin API (slotctl) on its own socket and the Prometheus metrics.
type ops struct {
	cfg      config.Config
	admitter *capacity.Admitter
	prices   cost.Prices
	ctrl     *sandboxer.Controller
	metrics  *metrics.Metrics // nil when metrics_address is ""
}

// newOps builds the admitter from [capacity] (the host's capacity where
// the configuration has none).
func newOps(cfg config.Config) (*ops, error) {
	c := cfg.Capacity
	adm, err := capacity.New(capacity.Config{
		CPU: float64(c.CPU), Memory: int64(c.Memory), Pids: int64(c.Pids),
		CPUOvercommit: c.Overcommit.CPU, MemoryOvercommit: c.Overcommit.Memory, PidsOvercommit: c.Overcommit.Pids,
		Policy: capacity.Policy(c.Policy),
	})
	if err != nil {
		return nil, err
	}
	p := cfg.Cost
	return &ops{cfg: cfg, admitter: adm, prices: cost.Prices{
		CPUCoreHour: p.CPUCoreHour, MemoryGiBHour: p.MemoryGiBHour, PidHour: p.PidHour,
		StorageGiBHour: p.StorageGiBHour, Currency: p.Currency,
	}}, nil
}

// attach gives the controller to the admin API and the metrics.
func (o *ops) attach(ctrl *sandboxer.Controller) {
	o.ctrl = ctrl
	if o.cfg.MetricsAddress != "" {
		o.metrics = metrics.New(metrics.Options{Controller: ctrl, Admitter: o.admitter, Prices: o.prices})
	}
}

// grpcOptions time the calls of the gRPC server when metrics are on, and
// recover each call's panic (innermost, so that the metrics see the
// Internal error it becomes).
func (o *ops) grpcOptions() []grpc.ServerOption {
	var opts []grpc.ServerOption
	if o.metrics != nil {
		opts = o.metrics.GRPCServerOptions()
	}
	return append(opts, grpcguard.GRPCServerOptions()...)
}

// ttrpcOptions are the same for the task server.
func (o *ops) ttrpcOptions() []ttrpc.ServerOpt {
	var opts []ttrpc.ServerOpt
	if o.metrics != nil {
		opts = o.metrics.TTRPCServerOptions()
	}
	return append(opts, guard.TTRPCServerOptions()...)
}

// start listens on the admin socket and the metrics address and serves
// them until stop is called.
func (o *ops) start(ctx context.Context) (stop func(), err error) {
	sock := o.cfg.AdminSocketPath()
	adminLis, err := unixsock.ListenOptions(sock, unixsock.Options{AllowSharedDir: o.cfg.AllowSharedSocketDir})
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	var metricsLis net.Listener
	if o.metrics != nil {
		if metricsLis, err = net.Listen("tcp", o.cfg.MetricsAddress); err != nil {
			adminLis.Close()
			return nil, fmt.Errorf("metrics_address: %w", err)
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		h := admin.Handler(admin.Options{Controller: o.ctrl, Admitter: o.admitter, Prices: o.prices})
		if err := httpserve.Serve(ctx, adminLis, h); err != nil {
			log.G(ctx).WithError(err).Error("admin API stopped")
		}
	}()
	fields := log.Fields{"admin_socket": sock, "policy": o.admitter.Policy()}
	if metricsLis != nil {
		fields["metrics_address"] = metricsLis.Addr().String()
		if !loopback(metricsLis.Addr()) {
			log.G(ctx).WithField("metrics_address", metricsLis.Addr().String()).Warn("metrics_address is not a loopback address: /metrics serves the sandboxes' IDs, limits and usage without authentication to anyone who can reach it; bind it to 127.0.0.1 or a private interface")
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := httpserve.Serve(ctx, metricsLis, o.metrics.Handler()); err != nil {
				log.G(ctx).WithError(err).Error("metrics endpoint stopped")
			}
		}()
	}
	log.G(ctx).WithFields(fields).Info("serving the admin API")
	return func() {
		cancel()
		wg.Wait()
		// Removes the socket if it is still the one created.
		adminLis.Close()
	}, nil
}

// loopback reports whether a listener's address is a loopback one (not
// an unspecified one such as 0.0.0.0, which is every interface).
func loopback(a net.Addr) bool {
	t, ok := a.(*net.TCPAddr)
	return ok && t.IP.IsLoopback()
}
