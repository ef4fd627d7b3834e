package daemon

import (
	"context"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"strings"
	"syscall"

	"github.com/containerd/log"
)

// DumpStacksOnSignal logs every goroutine's stack on SIGUSR1, as
// containerd does, to debug a hang (and for leak tests to count them).
func DumpStacksOnSignal(ctx context.Context) {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGUSR1)
	go func() {
		defer signal.Stop(ch)
		for {
			select {
			case <-ctx.Done():
				return
			case <-ch:
				var b strings.Builder
				pprof.Lookup("goroutine").WriteTo(&b, 2)
				log.G(ctx).WithField("goroutines", runtime.NumGoroutine()).Info("=== BEGIN goroutine stack dump ===\n" + b.String() + "=== END goroutine stack dump ===")
			}
		}
	}()
}
