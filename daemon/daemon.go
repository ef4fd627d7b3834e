// Package daemon wires the resource-slot-sandboxer together: it picks the
// backend from the configuration, recovers the sandboxes on disk, serves
// the sandbox controller (gRPC) and the task server (ttrpc, behind the task
// shim that containerd connects to) until its context ends.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/containerd/log"
	"google.golang.org/grpc"

	"github.com/kuasar-io/resource-slot-sandboxer/config"
	"github.com/kuasar-io/resource-slot-sandboxer/cri"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/dirlock"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/publisher"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/unixsock"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
)

// shutdownGrace bounds how long in-flight calls may finish on shutdown.
const shutdownGrace = 10 * time.Second

// Run serves until ctx ends, then stops gracefully. ready, if not nil, is
// called once every socket is listening.
func Run(ctx context.Context, cfg config.Config, ready func()) error {
	start := time.Now()
	if err := cfg.Validate(); err != nil {
		return err
	}
	// First: a second daemon on this directory must not touch it (nor
	// the backend's resources of its sandboxes).
	lock, err := dirlock.Acquire(cfg.Dir)
	if err != nil {
		return err
	}
	defer lock.Release()
	if err := checkSocketDirs(cfg); err != nil {
		return err
	}
	backend, err := newBackend(ctx, cfg)
	if err != nil {
		return err
	}
	defer backend.Close()
	// Capacity admission, the admin API and the metrics (ops.go).
	ops, err := newOps(cfg)
	if err != nil {
		return err
	}
	ctrl, err := sandboxer.New(sandboxer.Options{
		Root:         cfg.Dir,
		Backend:      backend,
		TaskAddress:  "ttrpc+unix://" + cfg.TaskSocketPath(),
		StopTimeout:  time.Duration(cfg.StopTimeout),
		NoSync:       !cfg.Fsync,
		CreatedGrace: time.Duration(cfg.CreatedGrace),
		Admitter:     ops.admitter,
	})
	if err != nil {
		return err
	}
	// Last, once nothing commits any more: compacts the journal so the
	// next start reads the sandboxes' files only.
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownGrace)
		defer cancel()
		if err := ctrl.Close(cctx); err != nil {
			log.G(ctx).WithError(err).Warn("close the sandbox store")
		}
	}()
	ops.attach(ctrl)
	if _, err := ctrl.Recover(ctx); err != nil {
		return fmt.Errorf("recover sandboxes: %w", err)
	}
	// Task events are queued and forwarded by one goroutine: no call
	// waits for containerd (restarting, or at a wrong address).
	var events sandboxer.Publisher
	if cfg.ContainerdAddress != "" {
		events = publisher.New(cfg.ContainerdAddress, publisher.Options{})
	}
	tasks := sandboxer.NewTasks(ctx, ctrl, cri.FilterEvents(events))
	defer tasks.Close()
	// After the containers were re-attached: what no record owns goes.
	cleanupOrphans(ctx, backend, ctrl)
	taskServer, err := sandboxer.NewTaskServer(tasks, ops.ttrpcOptions()...)
	if err != nil {
		return err
	}
	// The CRI runtime and image services for crictl and the kubelet
	// without containerd, on the same socket as the sandbox controller.
	criService, err := cri.New(ctx, cri.Options{Controller: ctrl, Tasks: tasks, Dir: cfg.Dir, NoSync: !cfg.Fsync})
	if err != nil {
		return err
	}

	stopOps, err := ops.start(ctx)
	if err != nil {
		return err
	}
	defer stopOps()
	// Each listener removes its socket when it closes, if the path still
	// names the socket it created (never one put there by another).
	sockOpts := unixsock.Options{AllowSharedDir: cfg.AllowSharedSocketDir}
	lis, err := unixsock.ListenOptions(cfg.Listen, sockOpts)
	if err != nil {
		return err
	}
	defer lis.Close()
	taskLis, err := unixsock.ListenOptions(cfg.TaskUpstreamPath(), sockOpts)
	if err != nil {
		return err
	}
	defer taskLis.Close()

	// Stream workers: each call would else start on a goroutine of its
	// own and grow its stack (6% of the daemon's CPU in a pod cycle).
	srv := grpc.NewServer(append(ops.grpcOptions(), grpc.NumStreamWorkers(uint32(16*runtime.GOMAXPROCS(0))))...)
	sandboxer.NewService(ctrl).Register(srv)
	criService.Register(srv)
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(lis) }()
	// Not ctx: the ttrpc server derives its calls' contexts from the one
	// it serves with, and the signal that ends ctx must not cancel them.
	// A Wait cancelled so would reach containerd, through the task shim,
	// as the end of its container (exit status 255, and containerd kills
	// it); the graceful stop below ends the Waits with Unavailable, which
	// the shim sends again to the next instance.
	go func() { errc <- taskServer.Serve(context.WithoutCancel(ctx), taskLis) }()
	collectCtx, stopCollector := context.WithCancel(ctx)
	defer stopCollector()
	if superviseShim {
		sh := &shim{cfg: cfg, ctrl: ctrl, tasks: tasks}
		if err := sh.ensure(ctx); err != nil {
			srv.Stop()
			taskServer.Stop(ctx)
			return err
		}
		go sh.supervise(collectCtx)
	}
	go ctrl.RunCollector(collectCtx)
	go ctrl.RunMonitor(collectCtx, time.Duration(cfg.UsageInterval))

	log.G(ctx).WithFields(log.Fields{
		"listen": cfg.Listen, "task_socket": cfg.TaskSocketPath(), "dir": cfg.Dir, "mode": backend.Mode(),
		"startup": time.Since(start),
	}).Info("resource-slot-sandboxer serving")
	notify(ctx, "READY=1")
	go watchdog(collectCtx)
	if ready != nil {
		ready()
	}

	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
	}
	log.G(ctx).Info("shutting down")
	notify(ctx, "STOPPING=1")
	ctrl.BeginShutdown()
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(shutdownGrace):
		srv.Stop()
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownGrace)
	defer cancel()
	if err := taskServer.Stop(sctx); err != nil {
		log.G(ctx).WithError(err).Warn("stop task server")
	}
	if serveErr != nil && !errors.Is(serveErr, grpc.ErrServerStopped) {
		return serveErr
	}
	return nil
}

// superviseShim is off in the daemon's own tests, which drive the task
// server directly.
var superviseShim = true

// checkSocketDirs refuses, before anything is done, socket directories
// in which another user could take a socket's place (unixsock.CheckDir).
func checkSocketDirs(cfg config.Config) error {
	if cfg.AllowSharedSocketDir {
		return nil
	}
	for _, p := range []string{cfg.Listen, cfg.TaskSocketPath(), cfg.TaskUpstreamPath(), cfg.AdminSocketPath()} {
		dir := filepath.Dir(p)
		if err := os.MkdirAll(dir, 0o711); err != nil {
			return err
		}
		if err := unixsock.CheckDir(dir); err != nil {
			return fmt.Errorf("socket %s: %w", p, err)
		}
	}
	return nil
}
