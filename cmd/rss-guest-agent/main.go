// rss-guest-agent is the guest agent of vm mode: PID 1 of the sandbox VM
// (the initramfs's /init). It mounts what the guest needs, loads its
// modules, reaps every process, serves the containers' task API and the
// agent API to the host over virtio-serial (and vsock where the guest has
// it), reports READY, and powers the guest off on the ACPI power button.
//
// Not as PID 1 (debugging) it only serves: -port names the virtio-serial
// port, and the machine's cgroup v2 root must be writable.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/pkg/sys/reaper"
	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/guest"
	"github.com/kuasar-io/resource-slot-sandboxer/agent/transport"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = "dev"

func main() {
	if filepath.Base(os.Args[0]) == guest.HolderArg0 {
		guest.HolderMain()
		return
	}
	// Signals first, so that none is missed while booting.
	sigs := make(chan os.Signal, 64)
	signal.Notify(sigs, unix.SIGCHLD, unix.SIGUSR1, unix.SIGUSR2, unix.SIGTERM, unix.SIGINT, unix.SIGPWR, unix.SIGPIPE)
	pid1 := os.Getpid() == 1
	logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: "15:04:05.000", DisableColors: true})
	if err := run(pid1, sigs); err != nil {
		log.L.WithError(err).Error("rss-guest-agent")
		if pid1 {
			// PID 1 must not exit (the kernel would panic): power off.
			guest.PowerOff()
			select {}
		}
		os.Exit(1)
	}
}

func run(pid1 bool, sigs chan os.Signal) error {
	ctx := context.Background()
	var bc guest.BootConfig
	if pid1 {
		fmt.Fprintf(os.Stdout, "rss: agent %s started at uptime %.2fs\n", version, guest.Uptime().Seconds())
		var err error
		bc, err = guest.Boot()
		if err != nil {
			// Keep going: what failed may not be needed (a module).
			log.L.WithError(err).Warn("boot")
		}
	} else {
		bc, _ = guest.ParseCmdline("")
		flag.StringVar(&bc.AgentPort, "port", bc.AgentPort, "virtio-serial port of the agent")
		flag.StringVar(&bc.ReadyPort, "ready-port", "", "virtio-serial port to write READY to")
		flag.Int64Var(&bc.PidsMax, "pids", 0, "pids.max of the pod cgroup")
		flag.BoolVar(&bc.Debug, "debug", false, "debug logging")
		flag.Parse()
		if bc.Debug {
			log.SetLevel("debug")
		}
	}
	cfg := guest.Config{
		Version:     version,
		BootPidsMax: bc.PidsMax,
		NoPivotRoot: pid1 && rootIsInitramfs(),
	}
	modulesLoaded := make(chan struct{})
	if pid1 {
		cfg.PowerOff = guest.PowerOff
		cfg.ModulesLoaded = modulesLoaded
	}
	log.L.WithField("uptime", guest.Uptime()).Debug("booted")
	agent, err := guest.New(ctx, cfg)
	if err != nil {
		return err
	}
	log.L.WithField("uptime", guest.Uptime()).Debug("task service up")
	srv, err := agent.NewServer()
	if err != nil {
		return err
	}
	l, err := transport.ListenSerial(bc.AgentPort, version)
	if err != nil {
		return err
	}
	go func() {
		if err := srv.Serve(ctx, l); err != nil {
			log.L.WithError(err).Error("serve the agent port")
		}
	}()
	if pid1 {
		if err := guest.WatchHotplug(ctx); err != nil {
			log.L.WithError(err).Warn("watch CPU hotplug")
		}
	}
	fmt.Fprintf(os.Stdout, "rss: agent %s pids.max=%d uptime=%.2fs\n", version, bc.PidsMax, guest.Uptime().Seconds())
	if bc.ReadyPort != "" {
		if err := guest.SignalReady(bc.ReadyPort); err != nil {
			log.L.WithError(err).Warn("signal ready")
		}
	}
	// What is not needed to answer the host comes after READY: the other
	// modules (virtiofs, the power button, vsock), acpid, vsock.
	go func() {
		if pid1 {
			start := time.Now()
			n, errs := guest.LoadModules(guest.ModulesDir, guest.LaterModules)
			for _, err := range errs {
				log.L.WithError(err).Warn("load module")
			}
			log.L.WithFields(log.Fields{"modules": n, "took": time.Since(start).Round(time.Millisecond)}).Debug("modules loaded")
			if err := guest.StartACPID(bc.Debug); err != nil {
				log.L.WithError(err).Warn("start acpid: the power button will not stop the guest")
			}
		}
		close(modulesLoaded)
		if transport.HasVsock() {
			if vl, err := transport.ListenVsock(bc.VsockPort, version); err != nil {
				log.L.WithError(err).Warn("listen on vsock")
			} else if err := srv.Serve(ctx, vl); err != nil {
				log.L.WithError(err).Error("serve vsock")
			}
		}
	}()
	for s := range sigs {
		switch s {
		case unix.SIGCHLD:
			if err := reaper.Reap(); err != nil {
				log.L.WithError(err).Debug("reap")
			}
		case unix.SIGPIPE:
		default:
			log.L.WithField("signal", s).Info("stop requested: stopping the containers and powering off")
			go func() {
				agent.Shutdown(ctx, guest.DefaultStopGrace, true)
				if !pid1 {
					time.Sleep(300 * time.Millisecond)
					os.Exit(0)
				}
			}()
		}
	}
	return nil
}

// rootIsInitramfs reports whether / is the initramfs (rootfs, or a tmpfs or
// ramfs), where pivot_root fails.
func rootIsInitramfs() bool {
	var st unix.Statfs_t
	if err := unix.Statfs("/", &st); err != nil {
		return true
	}
	return st.Type == unix.RAMFS_MAGIC || st.Type == unix.TMPFS_MAGIC
}
