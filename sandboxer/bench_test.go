package sandboxer

import (
	"context"
	"fmt"
	"testing"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

// BenchmarkLifecycle is the controller alone, in process: Create, Start,
// Stop and Shutdown of one sandbox, with its state on the test's disk;
// durable (the default) and with fsync = false.
func BenchmarkLifecycle(b *testing.B) {
	for _, bc := range []struct {
		name   string
		noSync bool
	}{{"fsync", false}, {"nofsync", true}} {
		b.Run(bc.name, func(b *testing.B) {
			ctx := context.Background()
			c, err := New(Options{Root: b.TempDir(), Backend: slot.New(), NoSync: bc.noSync})
			if err != nil {
				b.Fatal(err)
			}
			cfg := podConfig(map[string]string{resourceinfo.AnnotationCPULimit: "2", resourceinfo.AnnotationMemoryLimit: "2Gi"}, nil)
			b.ResetTimer()
			for i := range b.N {
				id := fmt.Sprintf("sb%d", i)
				if err := create(ctx, c, id, cfg); err != nil {
					b.Fatal(err)
				}
				if _, err := c.Start(ctx, id); err != nil {
					b.Fatal(err)
				}
				if err := c.Stop(ctx, id); err != nil {
					b.Fatal(err)
				}
				if err := c.Shutdown(ctx, id); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
