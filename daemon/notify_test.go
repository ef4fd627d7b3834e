package daemon

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/config"
)

// freePort returns a TCP port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestRunNotifiesSystemd runs the daemon in-process under a fake systemd:
// a unixgram NOTIFY_SOCKET receives READY=1 once it serves, WATCHDOG=1
// pings at half of WATCHDOG_USEC, and STOPPING=1 when it shuts down. It
// also checks the admin socket (0600) and the metrics endpoint.
func TestRunNotifiesSystemd(t *testing.T) {
	dir, err := os.MkdirTemp("", "rss-notify-") // short: socket paths
	require.NoError(t, err)
	defer os.RemoveAll(dir)

	notifySock := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifySock, Net: "unixgram"})
	require.NoError(t, err)
	defer conn.Close()
	msgs := make(chan string, 1000)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := conn.ReadFromUnix(buf)
			if err != nil {
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	t.Setenv("NOTIFY_SOCKET", notifySock)
	t.Setenv("WATCHDOG_USEC", strconv.Itoa(int((100 * time.Millisecond).Microseconds())))
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))

	cfg := config.Default()
	cfg.Listen = filepath.Join(dir, "sb.sock")
	cfg.Dir = filepath.Join(dir, "state")
	cfg.ContainerdAddress = ""
	cfg.Fsync = false
	cfg.MetricsAddress = fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg.Capacity.CPU, cfg.Capacity.Memory, cfg.Capacity.Pids = 2, 1<<30, 100
	cfg.Capacity.Policy = config.PolicyEnforce
	// No task shim: the test drives the daemon's own sockets.
	superviseShim = false
	defer func() { superviseShim = true }()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg, func() { close(ready) }) }()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("Run: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("the daemon did not become ready")
	}

	next := func(what string) string {
		t.Helper()
		select {
		case m := <-msgs:
			return m
		case <-time.After(10 * time.Second):
			t.Fatalf("no %s datagram", what)
			return ""
		}
	}
	assert.Equal(t, "READY=1", next("READY"))
	for range 3 {
		assert.Equal(t, "WATCHDOG=1", next("WATCHDOG"))
	}

	// The admin socket is root's only and answers.
	fi, err := os.Stat(cfg.AdminSocketPath())
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	assert.True(t, fi.Mode()&os.ModeSocket != 0)
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", cfg.AdminSocketPath())
	}}}
	resp, err := client.Get("http://admin/v1/capacity")
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Contains(t, string(body), `"policy":"enforce"`)
	assert.Contains(t, string(body), `"capacity":2,`)

	// The metrics endpoint.
	for _, path := range []string{"/healthz", "/metrics"} {
		resp, err := http.Get("http://" + cfg.MetricsAddress + path)
		require.NoError(t, err)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		assert.Equal(t, http.StatusOK, resp.StatusCode, path)
		if path == "/metrics" {
			assert.Contains(t, string(body), `resource_slot_capacity{resource="cpu"} 2`)
		}
	}

	cancel()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return")
	}
	// Watchdog pings may still be queued before STOPPING=1.
	var last string
	for last != "STOPPING=1" {
		last = next("STOPPING")
		require.Contains(t, []string{"WATCHDOG=1", "STOPPING=1"}, last)
	}
	_, err = os.Stat(cfg.AdminSocketPath())
	assert.True(t, os.IsNotExist(err), "the admin socket is removed")
	_, err = net.DialTimeout("tcp", cfg.MetricsAddress, time.Second)
	assert.Error(t, err, "the metrics endpoint is closed")
	assert.False(t, strings.Contains(last, "ERRNO"))
}

// TestRunRefusesTakenMetricsAddress: a metrics address in use fails the
// start with its key, and leaves no admin socket.
func TestRunRefusesTakenMetricsAddress(t *testing.T) {
	dir, err := os.MkdirTemp("", "rss-ops-")
	require.NoError(t, err)
	defer os.RemoveAll(dir)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer taken.Close()
	cfg := config.Default()
	cfg.Listen = filepath.Join(dir, "sb.sock")
	cfg.Dir = filepath.Join(dir, "state")
	cfg.ContainerdAddress = ""
	cfg.MetricsAddress = taken.Addr().String()
	cfg.Capacity.CPU, cfg.Capacity.Memory, cfg.Capacity.Pids = 1, 1<<30, 100
	err = Run(context.Background(), cfg, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "metrics_address")
	_, err = os.Stat(cfg.AdminSocketPath())
	assert.True(t, os.IsNotExist(err))
}
