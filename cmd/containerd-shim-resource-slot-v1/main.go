// Command containerd-shim-resource-slot-v1 is the task shim of
// resource-slot sandboxes.
//
//	containerd-shim-resource-slot-v1 serve --socket S --upstream U
//
// serves the task API (ttrpc) at S, the address the sandbox controller's
// Start returns, and forwards each call to resource-slot-sandboxer's task
// server at U. containerd holds one connection per task and takes a closed
// connection for a dead shim, so this small process holds them while the
// sandboxer restarts. resource-slot-sandboxer starts it when it is not
// running; it exits when the sandboxer has been unreachable for
// --orphan-timeout.
//
// containerd also resolves the binary of the io.containerd.resource-slot.v1
// runtime type on PATH: "-info" answers its introspection (the features of
// slot containers), and "delete", run to clean up after a shim that died,
// answers with an exited task.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"syscall"
	"time"

	apitypes "github.com/containerd/containerd/api/types"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/opencontainers/runtime-spec/specs-go/features"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/guard"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/unixsock"
	"github.com/kuasar-io/resource-slot-sandboxer/taskproxy"
)

func main() {
	// containerd's shim protocol puts flags (-namespace, -id, ...) before
	// the action.
	for _, a := range os.Args[1:] {
		switch a {
		case "serve":
			if err := serve(os.Args[2:]); err != nil {
				fmt.Fprintln(os.Stderr, "containerd-shim-resource-slot-v1:", err)
				os.Exit(1)
			}
			return
		case "delete":
			// Nothing runs under this binary: report an exited task.
			data, err := deleteResponse(time.Now())
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			os.Stdout.Write(data)
			return
		case "-info", "--info":
			// containerd's introspection of the runtime: what a slot
			// container accepts (it runs nothing, so every mount option and
			// namespace is accepted and recorded).
			if err := writeInfo(); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			return
		case "-v", "--version", "version":
			fmt.Println("containerd-shim-resource-slot-v1: task shim of resource-slot-sandboxer")
			return
		}
	}
	fmt.Fprintln(os.Stderr, "containerd-shim-resource-slot-v1: resource-slot-sandboxer starts this shim itself; containerd reaches it through the sandboxer (runtime sandboxer = \"resource-slot\")")
	os.Exit(1)
}

// deleteResponse encodes containerd's task API DeleteResponse of a task
// killed (exit status 137) at t. Encoded by hand: the task API's Go
// package brings all of gRPC into this binary for one message.
func deleteResponse(t time.Time) ([]byte, error) {
	ts, err := proto.Marshal(timestamppb.New(t))
	if err != nil {
		return nil, err
	}
	var b []byte
	// DeleteResponse: exit_status = 2, exited_at = 3.
	b = protowire.AppendTag(b, 2, protowire.VarintType)
	b = protowire.AppendVarint(b, 128+9)
	b = protowire.AppendTag(b, 3, protowire.BytesType)
	return protowire.AppendBytes(b, ts), nil
}

// The URL containerd gives the features type (core/runtime/typeurl.go),
// under which its introspection decodes them. Registered here: the shim
// does not link containerd's runtime packages, which do it.
func init() {
	typeurl.Register(&features.Features{}, "types.containerd.io", "opencontainers/runtime-spec", strconv.Itoa(specs.VersionMajor), "features", "Features")
}

// writeInfo prints the shim's RuntimeInfo (protobuf) as containerd's
// shims do for -info: the runtime-spec features of slot containers.
func writeInfo() error {
	enabled := true
	f := &features.Features{
		OCIVersionMin: "1.0.0",
		OCIVersionMax: specs.Version,
		MountOptions:  []string{"rbind", "bind", "ro", "rro", "rw", "nosuid", "nodev", "noexec", "idmap", "ridmap"},
		Linux: &features.Linux{
			Namespaces: []string{"cgroup", "ipc", "mount", "network", "pid", "time", "user", "uts"},
			MountExtensions: &features.MountExtensions{
				IDMap: &features.IDMap{Enabled: &enabled},
			},
		},
	}
	fa, err := typeurl.MarshalAnyToProto(f)
	if err != nil {
		return err
	}
	data, err := proto.Marshal(&apitypes.RuntimeInfo{
		Name:     "io.containerd.resource-slot.v1",
		Version:  &apitypes.RuntimeVersion{Version: "resource-slot-sandboxer"},
		Features: fa,
	})
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(data)
	return err
}

func serve(args []string) error {
	// The shim relays calls: one P is enough, and spares the node's
	// cores the scheduler's spinning threads (measured: a fifth to a
	// third of its CPU per container cycle). GOMAXPROCS in the
	// environment still decides.
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	var (
		socket   = fs.String("socket", "", "task API socket containerd connects to")
		upstream = fs.String("upstream", "", "the sandboxer's task server socket")
		orphan   = fs.Duration("orphan-timeout", time.Hour, "exit when the sandboxer has been unreachable this long")
		level    = fs.String("log-level", "info", "log level")
		shared   = fs.Bool("allow-shared-socket-dir", false, "accept a socket directory that other users may write to")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *socket == "" || *upstream == "" || *orphan <= 0 {
		return fmt.Errorf("serve needs --socket, --upstream and a positive --orphan-timeout")
	}
	if err := log.SetLevel(*level); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	signal.Ignore(syscall.SIGPIPE, syscall.SIGHUP)

	l, err := unixsock.ListenOptions(*socket, unixsock.Options{AllowSharedDir: *shared})
	if err != nil {
		return err
	}
	// Removes the socket if it is still the one created.
	defer l.Close()
	conns := taskproxy.CountConns(l)
	srv, err := ttrpc.NewServer(append([]ttrpc.ServerOpt{ttrpc.WithServerHandshaker(taskproxy.SameUser())}, guard.TTRPCServerOptions()...)...)
	if err != nil {
		return err
	}
	proxy := taskproxy.New(*upstream)
	defer proxy.Close()
	proxy.Register(srv)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ctx, conns) }()
	log.G(ctx).WithFields(log.Fields{"socket": *socket, "upstream": *upstream, "pid": os.Getpid()}).Info("task shim serving")

	// Every second: is the socket still ours, and the daemon still there?
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var orphaned time.Time
	for {
		select {
		case <-ctx.Done():
			return shutdown(srv)
		case err := <-errc:
			if !orphaned.IsZero() {
				errc = nil // the listener closed below
				continue
			}
			return err
		case <-tick.C:
		}
		if orphaned.IsZero() && !l.Owned() {
			// The socket was removed or replaced (by a new shim, or a
			// cleanup): containerd can no longer reach this shim, and a
			// new daemon's upstream may be at the same path, so the
			// daemon being reachable says nothing. Serve the connections
			// containerd holds, then go.
			orphaned = time.Now()
			log.G(ctx).WithFields(log.Fields{"socket": *socket, "connections": conns.Open()}).Warn("the task socket was removed or replaced: this shim serves its open connections and exits when they close, or after the orphan timeout")
			l.Close() // accepts no more; removes nothing that is not its own
		}
		switch {
		case !orphaned.IsZero() && conns.Open() == 0:
			log.G(ctx).Info("no connection left to the orphaned task shim; it exits")
			return shutdown(srv)
		case !orphaned.IsZero() && time.Since(orphaned) > *orphan:
			log.G(ctx).WithField("connections", conns.Open()).Warn("the orphaned task shim exits after the orphan timeout")
			return shutdown(srv)
		case orphaned.IsZero():
			if d := proxy.Unreachable(); d > *orphan {
				log.G(ctx).WithField("unreachable_for", d).Warn("resource-slot-sandboxer is gone; the task shim exits")
				return shutdown(srv)
			}
		}
	}
}

func shutdown(srv *ttrpc.Server) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		srv.Close()
	}
	return nil
}
