// Command slotctl operates resource-slot-sandboxer through its admin
// socket: sandboxes, their resources and usage, node capacity and cost.
// See package slotctl.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/kuasar-io/resource-slot-sandboxer/slotctl"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := slotctl.Main(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
