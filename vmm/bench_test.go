package vmm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// BenchmarkCreateToReady compares, in the same run, a sandbox's Create +
// Start through the backend (define, overlay disk, boot, live memtune,
// shaping, wait for READY) with the same domain XML booted directly with
// `virsh create` and its READY awaited the same way; and reports the
// guest's own boot time and the host memory (RSS of QEMU) of an idle VM.
// Needs RSS_VM_TESTS and RSS_GUEST_DIR like the integration tests;
// RSS_BENCH_CYCLES sets the number of boots of each (default 5).
func BenchmarkCreateToReady(b *testing.B) {
	if os.Getenv("RSS_VM_TESTS") == "" {
		b.Skip("set RSS_VM_TESTS=1 and RSS_GUEST_DIR")
	}
	if os.Getenv("RSS_GUEST_DIR") == "" {
		b.Fatal("RSS_VM_TESTS is set but RSS_GUEST_DIR is not")
	}
	ctx := context.Background()
	n := 5
	if v, err := strconv.Atoi(os.Getenv("RSS_BENCH_CYCLES")); err == nil && v > 0 {
		n = v
	}
	be, err := New(ctx, Config{GuestDir: os.Getenv("RSS_GUEST_DIR"), NamePrefix: "rss-bench-"}, Options{ReadyTimeout: 90 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	defer be.Close()
	cpu, mem := 1.0, int64(256<<20)
	info := resourceinfo.ResourceInfo{Resources: resourceinfo.Resources{CPULimit: &cpu, MemoryLimit: &mem}}

	for range b.N {
		var ours, direct, boot time.Duration
		var rss int64
		for i := range n {
			// Through the backend.
			id := fmt.Sprintf("bench-%d-%d", os.Getpid(), i)
			dir := b.TempDir()
			start := time.Now()
			if err := be.Create(ctx, id, dir, info, backend.Pod{}); err != nil {
				b.Fatal(err)
			}
			if _, err := be.Start(ctx, id, func(uint32, time.Time) {}); err != nil {
				b.Fatal(err)
			}
			ours += time.Since(start)
			if i == 0 {
				time.Sleep(3 * time.Second) // let the guest settle: idle RSS
				rss = qemuRSS(b, DomainName(be.Config().NamePrefix, id))
			}
			boot += guestBootTime(b, dir)
			if err := be.Delete(ctx, id); err != nil {
				b.Fatal(err)
			}

			// The same XML with virsh create.
			id = fmt.Sprintf("bench-virsh-%d-%d", os.Getpid(), i)
			dir = b.TempDir()
			d, err := DomainFor(id, dir, info, be.Config())
			if err != nil {
				b.Fatal(err)
			}
			d.SplitLive() // the XML the backend defines: live-only limits apart
			xml, err := d.Marshal()
			if err != nil {
				b.Fatal(err)
			}
			xmlFile := filepath.Join(dir, "domain.xml")
			if err := os.WriteFile(xmlFile, []byte(xml), 0o600); err != nil {
				b.Fatal(err)
			}
			start = time.Now()
			run(b, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", be.Config().BaseDisk, filepath.Join(dir, DiskFile))
			run(b, "virsh", "-c", "qemu:///system", "create", xmlFile)
			waitReady(b, filepath.Join(dir, ReadyFile))
			direct += time.Since(start)
			run(b, "virsh", "-c", "qemu:///system", "destroy", d.Name)
		}
		ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(n) }
		b.ReportMetric(ms(ours), "ms/ready-backend")
		b.ReportMetric(ms(direct), "ms/ready-virsh")
		b.ReportMetric(ms(ours)/ms(direct), "ratio")
		b.ReportMetric(ms(boot), "ms/guest-boot")
		b.ReportMetric(float64(rss)/(1<<20), "MiB-rss-idle")
		fmt.Printf("%s: %d boots each (%s): create->ready %.0f ms through the backend, %.0f ms with virsh create, ratio %.2fx; guest boot %.0f ms; idle VM (256Mi limit) QEMU RSS %.0f MiB\n",
			b.Name(), n, be.DomainType(), ms(ours), ms(direct), ms(ours)/ms(direct), ms(boot), float64(rss)/(1<<20))
	}
}

func run(b *testing.B, name string, args ...string) {
	b.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		b.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

func waitReady(b *testing.B, file string) {
	b.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		if data, err := os.ReadFile(file); err == nil && strings.Contains(string(data), "READY") {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	b.Fatalf("no READY in %s", file)
}

// guestBootTime is the guest kernel's uptime when its /init became ready,
// which it prints on the serial console ("uptime=1.23").
func guestBootTime(b *testing.B, dir string) time.Duration {
	b.Helper()
	data, err := os.ReadFile(filepath.Join(dir, ConsoleFile))
	if err != nil {
		b.Fatal(err)
	}
	for _, f := range strings.Fields(string(data)) {
		if v, ok := strings.CutPrefix(f, "uptime="); ok {
			if s, err := strconv.ParseFloat(v, 64); err == nil {
				return time.Duration(s * float64(time.Second))
			}
		}
	}
	return 0
}

func qemuRSS(b *testing.B, domain string) int64 {
	b.Helper()
	data, err := os.ReadFile(filepath.Join("/run/libvirt/qemu", domain+".pid"))
	if err != nil {
		b.Fatal(err)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%s/status", strings.TrimSpace(string(data))))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}
