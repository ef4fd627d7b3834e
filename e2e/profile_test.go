package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// BenchmarkCycleProfile breaks a pod cycle down in the daemon, for the
// README's table: wall time, the daemon's CPU (utime + stime), its
// syscalls and syncs per cycle (strace -c of a second run: strace slows
// the daemon, its counts do not change), and the time its syncs took. It
// runs with RSS_PROFILE=1 (it needs strace), not in make bench.
func BenchmarkCycleProfile(b *testing.B) {
	if os.Getenv("RSS_PROFILE") == "" {
		b.Skip("RSS_PROFILE=1 runs it")
	}
	if _, err := exec.LookPath("strace"); err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	direct, closeDirect := directClient(b)
	defer closeDirect()
	n := cycles(1000)
	for _, p := range []struct {
		name    string
		client  runtime.RuntimeServiceClient
		handler string
		clients int
	}{
		{"containerd-1", h.cri, "resource-slot", 1},
		{"direct-1", direct, "", 1},
		{"direct-32", direct, "", 32},
	} {
		b.Run(p.name, func(b *testing.B) {
			run := func(n int) time.Duration {
				start := time.Now()
				if errs := runParallel(n, p.clients, func(int) error { return podCycle(ctx, p.client, p.handler) }); len(errs) > 0 {
					b.Fatal(errs[0])
				}
				return time.Since(start)
			}
			run(50) // warm up: the directory pool, connections
			pid := h.sandboxer.Process.Pid
			cpu0 := procCPU(pid)
			wall := run(n)
			cpu := procCPU(pid) - cpu0
			calls, secs := straceCount(b, pid, func() { run(n / 2) })
			perCycle := func(v float64) float64 { return v / float64(n/2) }
			total := 0
			for _, c := range calls {
				total += c
			}
			syncs := calls["fdatasync"] + calls["fsync"] + calls["syncfs"]
			fmt.Printf("%s: %d cycles, %d client(s): %.3f ms/cycle wall; daemon CPU %.3f ms/cycle; %.1f syscalls/cycle, %.2f syncs/cycle taking %.3f ms/cycle (under strace)\n",
				b.Name(), n, p.clients, ms(wall)/float64(n), ms(cpu)/float64(n), perCycle(float64(total)), perCycle(float64(syncs)),
				perCycle((secs["fdatasync"]+secs["fsync"]+secs["syncfs"])*1000))
			names := make([]string, 0, len(calls))
			for name := range calls {
				names = append(names, name)
			}
			sort.Slice(names, func(i, j int) bool { return calls[names[i]] > calls[names[j]] })
			var top []string
			for _, name := range names {
				if c := perCycle(float64(calls[name])); c >= 0.1 {
					top = append(top, fmt.Sprintf("%s %.1f", name, c))
				}
			}
			fmt.Printf("%s: syscalls per cycle: %s\n", b.Name(), strings.Join(top, ", "))
		})
	}
}

// procCPU is a process's user and system CPU time.
func procCPU(pid int) time.Duration {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * time.Second / 100 // USER_HZ
}

// straceCount runs fn with strace -c -f attached to pid and returns the
// calls and seconds of each syscall.
func straceCount(b *testing.B, pid int, fn func()) (map[string]int, map[string]float64) {
	out := filepath.Join(b.TempDir(), "strace")
	cmd := exec.Command("strace", "-c", "-f", "-w", "-o", out, "-p", strconv.Itoa(pid))
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond) // attached to every thread
	fn()
	cmd.Process.Signal(syscall.SIGINT)
	cmd.Wait()
	f, err := os.Open(out)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	calls, secs := map[string]int{}, map[string]float64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// % time     seconds  usecs/call     calls    errors syscall
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 || strings.HasPrefix(fields[0], "%") || strings.HasPrefix(fields[0], "-") {
			continue
		}
		name := fields[len(fields)-1]
		if name == "total" {
			continue
		}
		s, err1 := strconv.ParseFloat(fields[1], 64)
		c, err2 := strconv.Atoi(fields[3])
		if err1 != nil || err2 != nil {
			continue
		}
		calls[name], secs[name] = c, s
	}
	return calls, secs
}

// profileDaemon, with RSS_PROFILE_DIR set, records a CPU profile of the
// daemon for d from its admin socket's /debug/pprof (in the background)
// into the directory, named after the benchmark; wait waits for it.
func profileDaemon(b *testing.B, d time.Duration) (wait func()) {
	dir := os.Getenv("RSS_PROFILE_DIR")
	if dir == "" {
		return func() {}
	}
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", h.AdminSock())
	}}}
	path := filepath.Join(dir, strings.ReplaceAll(b.Name(), "/", "_")+".prof")
	done := make(chan struct{})
	go func() {
		defer close(done)
		resp, err := client.Get(fmt.Sprintf("http://admin/debug/pprof/profile?seconds=%d", int(d.Seconds())))
		if err != nil {
			b.Errorf("profile: %v", err)
			return
		}
		defer resp.Body.Close()
		data, err := io.ReadAll(resp.Body)
		if err == nil {
			err = os.WriteFile(path, data, 0o644)
		}
		if err != nil {
			b.Errorf("profile: %v", err)
			return
		}
		fmt.Printf("%s: daemon CPU profile of %s in %s\n", b.Name(), d, path)
	}()
	return func() { <-done }
}
