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
	"os/exec"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/containerd/log"
	"google.golang.org/grpc"

	"github.com/kuasar-io/resource-slot-sandboxer/config"
	"github.com/kuasar-io/resource-slot-sandboxer/cri"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/unixsock"
	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
)

// shutdownGrace bounds how long in-flight calls may finish on shutdown.
const shutdownGrace = 10 * time.Second

// ShimBinary is the task shim: a long-lived proxy in front of the task
// server, so that containerd's task connections outlive sandboxer restarts.
const ShimBinary = "containerd-shim-resource-slot-v1"

// Run serves until ctx ends, then stops gracefully. ready, if not nil, is
// called once every socket is listening.
func Run(ctx context.Context, cfg config.Config, ready func()) error {
	start := time.Now()
	if err := cfg.Validate(); err != nil {
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
	cleanupOrphans(ctx, backend, ctrl)
	var events sandboxer.Publisher
	if cfg.ContainerdAddress != "" {
		if events, err = sandboxer.NewEventPublisher(cfg.ContainerdAddress); err != nil {
			return err
		}
	}
	tasks := sandboxer.NewTasks(ctx, ctrl, cri.FilterEvents(events))
	defer tasks.Close()
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
	lis, err := unixsock.Listen(cfg.Listen)
	if err != nil {
		return err
	}
	defer os.Remove(cfg.Listen)
	upstream := cfg.TaskUpstreamPath()
	taskLis, err := unixsock.Listen(upstream)
	if err != nil {
		lis.Close()
		return err
	}
	defer os.Remove(upstream)

	// Stream workers: each call would else start on a goroutine of its
	// own and grow its stack (6% of the daemon's CPU in a pod cycle).
	srv := grpc.NewServer(append(ops.grpcOptions(), grpc.NumStreamWorkers(uint32(16*runtime.GOMAXPROCS(0))))...)
	sandboxer.NewService(ctrl).Register(srv)
	criService.Register(srv)
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(lis) }()
	go func() { errc <- taskServer.Serve(ctx, taskLis) }()
	if err := ensureShim(ctx, cfg); err != nil {
		srv.Stop()
		taskServer.Stop(ctx)
		return err
	}
	collectCtx, stopCollector := context.WithCancel(ctx)
	defer stopCollector()
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

// ensureShim starts the task shim unless one already serves the task
// socket (started by a previous run of the daemon, and holding
// containerd's connections).
func ensureShim(ctx context.Context, cfg config.Config) error {
	sock := cfg.TaskSocketPath()
	if unixsock.Answers(sock) {
		log.G(ctx).WithField("task_socket", sock).Info("reusing the running task shim")
		return nil
	}
	bin, err := shimPath()
	if err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(cfg.Dir, "shim.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(bin, "serve", "--socket", sock, "--upstream", cfg.TaskUpstreamPath(),
		"--orphan-timeout", time.Duration(cfg.ShimOrphanTimeout).String(), "--log-level", cfg.LogLevel)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own session: the shim must outlive the daemon, as containerd's
	// shims outlive containerd.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Dir = "/"
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start task shim: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.After(10 * time.Second)
	for !unixsock.Answers(sock) {
		select {
		case err := <-exited:
			return fmt.Errorf("task shim %s exited: %v (see %s)", bin, err, logf.Name())
		case <-deadline:
			cmd.Process.Kill()
			return fmt.Errorf("task shim did not listen on %s", sock)
		case <-time.After(20 * time.Millisecond):
		}
	}
	log.G(ctx).WithFields(log.Fields{"pid": cmd.Process.Pid, "task_socket": sock}).Info("started the task shim")
	return nil
}

// shimPath finds the shim next to the daemon's executable, else on PATH.
func shimPath() (string, error) {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), ShimBinary)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	p, err := exec.LookPath(ShimBinary)
	if err != nil {
		return "", fmt.Errorf("%s is neither next to the daemon nor on PATH: %w", ShimBinary, err)
	}
	return p, nil
}
