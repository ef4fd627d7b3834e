// Command resource-slot-sandboxer is a containerd sandbox controller that
// extracts each pod's resource limits, persists them and simulates (slot
// mode) or enforces (vm mode) them.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"

	"github.com/kuasar-io/resource-slot-sandboxer/config"
	"github.com/kuasar-io/resource-slot-sandboxer/daemon"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/logqueue"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "resource-slot-sandboxer:", err)
		os.Exit(1)
	}
}

// defaultGCPercent is the garbage collector's target unless GOGC is set:
// the daemon keeps many small records alive (one per pod) and allocates
// little per call, so a heap half again its live size, not twice, costs
// little CPU and a third of the memory per pod (README, Performance).
const defaultGCPercent = 50

func run() error {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(defaultGCPercent)
	}
	// Signals first, so none is missed during recovery.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	signal.Ignore(syscall.SIGPIPE)

	var (
		configPath = flag.String("config", "", "TOML configuration file")
		listen     = flag.String("listen", config.DefaultListen, "unix socket of the sandbox controller")
		dir        = flag.String("dir", config.DefaultDir, "state directory")
		logLevel   = flag.String("log-level", "info", "log level: trace, debug, info, warn, error")
		mode       = flag.String("mode", "slot", "backend: slot (simulated) or vm (libvirt)")
	)
	flag.Parse()
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %v", flag.Args())
	}
	cfg := config.Default()
	if *configPath != "" {
		var err error
		if cfg, err = config.Load(*configPath); err != nil {
			return err
		}
	}
	// Flags given on the command line override the file.
	flag.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "listen":
			cfg.Listen = *listen
		case "dir":
			cfg.Dir = *dir
		case "log-level":
			cfg.LogLevel = *logLevel
		case "mode":
			cfg.Mode = *mode
		}
	})
	if err := cfg.Validate(); err != nil {
		return err
	}
	if err := log.SetLevel(cfg.LogLevel); err != nil {
		return err
	}
	if err := log.SetFormat(log.TextFormat); err != nil {
		return err
	}
	// Log lines are written out by a goroutine of their own: a slow or
	// stalled stderr holds no call (logqueue).
	out := logqueue.New(os.Stderr, 0)
	defer out.Close()
	logrus.SetOutput(out)
	logrus.RegisterExitHandler(func() { out.Close() })
	daemon.DumpStacksOnSignal(ctx)
	return daemon.Run(ctx, cfg, nil)
}
