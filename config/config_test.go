package config

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestDefault(t *testing.T) {
	cfg := Default()
	require.NoError(t, cfg.Validate())
	assert.Equal(t, Config{
		Listen:            DefaultListen,
		Dir:               DefaultDir,
		LogLevel:          "info",
		Mode:              "slot",
		ContainerdAddress: "/run/containerd/containerd.sock.ttrpc",
		Fsync:             true,
		StopTimeout:       Duration(10 * time.Second),
		ShimOrphanTimeout: Duration(time.Hour),
		CreatedGrace:      Duration(10 * time.Minute),
		UsageInterval:     Duration(10 * time.Second),
		Capacity:          Capacity{Overcommit: Overcommit{CPU: 1, Memory: 1, Pids: 1}, Policy: "off"},
		Cost:              Cost{Currency: "USD"},
		VM: VM{
			LibvirtSocket: "/var/run/libvirt/libvirt-sock", GuestDir: DefaultGuestDir, Accel: "auto",
			DefaultVCPUs: 1, DefaultMemory: 512 << 20, GuestOverhead: 64 << 20, QEMUOverhead: 256 << 20,
			Network: "ethernet", ReadyTimeout: Duration(time.Minute),
			VirtioFSD: "/usr/lib/qemu/virtiofsd", SocketDir: "/run/resource-slot-sandboxer/vm",
		},
	}, cfg)
	assert.Equal(t, "/run/resource-slot-sandboxer-task.sock", cfg.TaskSocketPath())
	assert.Equal(t, "/run/resource-slot-sandboxer-task-upstream.sock", cfg.TaskUpstreamPath())
}

// tomlKeys are the keys of every Config field.
func tomlKeys(t *testing.T) []string {
	t.Helper()
	var keys []string
	rt := reflect.TypeFor[Config]()
	for i := range rt.NumField() {
		key := rt.Field(i).Tag.Get("toml")
		require.NotEmpty(t, key, "field %s has no toml key", rt.Field(i).Name)
		if rt.Field(i).Type.Kind() == reflect.Struct {
			continue // a [table]: its keys are checked in capacity_test.go
		}
		keys = append(keys, key)
	}
	return keys
}

// TestDocumentedExample keeps config/resource-slot.toml, the documented
// example, complete and equal to the defaults.
func TestDocumentedExample(t *testing.T) {
	const path = "resource-slot.toml"
	cfg, err := Load(path)
	require.NoError(t, err)
	require.NoError(t, cfg.Validate())
	want := Default()
	want.TaskSocket = "" // documented as "" (derived)
	assert.Equal(t, want, cfg)

	data, err := os.ReadFile(path)
	require.NoError(t, err)
	for _, key := range tomlKeys(t) {
		assert.Regexp(t, regexp.MustCompile(`(?m)^`+regexp.QuoteMeta(key)+` = `), string(data), "%s is not documented", key)
	}
}

func TestLoad(t *testing.T) {
	for _, tc := range []struct {
		desc string
		toml string
		want func(c *Config) // applied to Default()
	}{
		{
			desc: "full",
			toml: mustRead(t, filepath.Join("testdata", "full.toml")),
			want: func(c *Config) {
				c.Listen = "/run/rss/controller.sock"
				c.Dir = "/srv/rss/state"
				c.LogLevel = "debug"
				c.Mode = "vm"
				c.TaskSocket = "/run/rss/task.sock"
				c.ShimOrphanTimeout = Duration(30 * time.Minute)
				c.ContainerdAddress = ""
				c.Fsync = false
				c.StopTimeout = Duration(90 * time.Second)
				c.CreatedGrace = 0
			},
		},
		{
			desc: "empty file keeps the defaults",
			toml: "",
			want: func(*Config) {},
		},
		{
			desc: "comments only",
			toml: "# nothing\n\n   # at all\n",
			want: func(*Config) {},
		},
		{
			desc: "a few keys",
			toml: "mode = \"vm\"\nstop_timeout = \"250ms\"\n",
			want: func(c *Config) {
				c.Mode = "vm"
				c.StopTimeout = Duration(250 * time.Millisecond)
			},
		},
		{
			desc: "literal strings",
			toml: "dir = '/srv/state'\n",
			want: func(c *Config) { c.Dir = "/srv/state" },
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "config.toml")
			require.NoError(t, os.WriteFile(path, []byte(tc.toml), 0o600))
			cfg, err := Load(path)
			require.NoError(t, err)
			want := Default()
			tc.want(&want)
			assert.Equal(t, want, cfg)
			assert.NoError(t, cfg.Validate())
		})
	}
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(data)
}

func TestLoadErrors(t *testing.T) {
	t.Run("missing file", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "absent.toml")
		_, err := Load(path)
		require.Error(t, err)
		assert.True(t, errors.Is(err, fs.ErrNotExist), "error %v", err)
		assert.Contains(t, err.Error(), path)
	})
	t.Run("bad file names itself", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "bad.toml")
		require.NoError(t, os.WriteFile(path, []byte("nope = 1\n"), 0o600))
		_, err := Load(path)
		require.Error(t, err)
		assert.Contains(t, err.Error(), path)
		assert.Contains(t, err.Error(), `line 1, column 1: unknown key "nope"`)
	})
}

func TestDecodeErrors(t *testing.T) {
	for _, tc := range []struct {
		desc string
		toml string
		want []string // in the message
	}{
		{
			desc: "unknown key",
			toml: "mode = \"slot\"\n\n  nope = true\n",
			want: []string{`line 3, column 3: unknown key "nope"`},
		},
		{
			desc: "misspelled key",
			toml: "listen = \"/run/x.sock\"\nstop-timeout = \"10s\"\n",
			want: []string{`line 2, column 1: unknown key "stop-timeout"`},
		},
		{
			desc: "every unknown key",
			toml: "foo = 1\nlisten = \"/run/x.sock\"\n[bar]\nbaz = 2\n",
			want: []string{`line 1, column 1: unknown key "foo"`, `line 3, column 2: unknown key "bar"`},
		},
		{
			desc: "dotted unknown key",
			toml: "log.level = \"info\"\n",
			want: []string{`unknown key "log`, "line 1"},
		},
		{
			desc: "integer for a string",
			toml: "mode = \"slot\"\nlisten = 5\n",
			want: []string{"line 2, column 10", "integer"},
		},
		{
			desc: "string for a bool",
			toml: "fsync = \"yes\"\n",
			want: []string{"line 1, column 9", "string"},
		},
		{
			desc: "table for a string",
			toml: "\n[listen]\n",
			want: []string{"line 2"},
		},
		{
			desc: "array for a string",
			toml: "dir = [\"/a\"]\n",
			want: []string{"line 1"},
		},
		{
			desc: "bad duration",
			toml: "\n\nstop_timeout = \"abc\"\n",
			want: []string{"line 3, column 16", `invalid duration "abc"`},
		},
		{
			desc: "duration without unit",
			toml: "created_grace = \"600\"\n",
			want: []string{"line 1", `invalid duration "600"`},
		},
		{
			desc: "bare integer duration",
			toml: "mode = \"slot\"\nstop_timeout = 10\n",
			want: []string{"line 2", "stop_timeout"},
		},
		{
			desc: "bare integer grace",
			toml: "created_grace = 600\n",
			want: []string{"line 1", "created_grace"},
		},
		{
			desc: "bare integer orphan timeout",
			toml: "shim_orphan_timeout = 3600\n",
			want: []string{"line 1", "shim_orphan_timeout"},
		},
		{
			desc: "bare integer duration in a table",
			toml: "[vm]\nready_timeout = 90\n",
			want: []string{"line 2", "vm.ready_timeout", "duration string"},
		},
		{
			desc: "float duration",
			toml: "stop_timeout = 1.5\n",
			want: []string{"line 1", "stop_timeout"},
		},
		{
			desc: "bool duration",
			toml: "\nstop_timeout = true\n",
			want: []string{"line 2", "stop_timeout"},
		},
		{
			desc: "syntax error",
			toml: "mode = \"slot\"\nlisten = \n",
			want: []string{"line 2"},
		},
		{
			desc: "unterminated string",
			toml: "listen = \"/run/x.sock\n",
			want: []string{"line 1"},
		},
		{
			desc: "duplicate key",
			toml: "listen = \"/a\"\nlisten = \"/b\"\n",
			want: []string{"line 2", "already defined"},
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			cfg := Default()
			err := Decode([]byte(tc.toml), &cfg)
			require.Error(t, err)
			for _, s := range tc.want {
				assert.Contains(t, err.Error(), s)
			}
			assert.False(t, strings.HasPrefix(err.Error(), "toml:"), "error %q", err)
		})
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		desc   string
		change func(c *Config)
		want   []string // one per error, in order; none: valid
	}{
		{desc: "default", change: func(*Config) {}},
		{desc: "vm mode", change: func(c *Config) { c.Mode = "vm" }},
		{desc: "no events", change: func(c *Config) { c.ContainerdAddress = "" }},
		{desc: "no collection", change: func(c *Config) { c.CreatedGrace = 0 }},
		{desc: "every log level", change: func(c *Config) { c.LogLevel = "trace" }},
		{desc: "debug", change: func(c *Config) { c.LogLevel = "debug" }},
		{desc: "warn", change: func(c *Config) { c.LogLevel = "warn" }},
		{desc: "error", change: func(c *Config) { c.LogLevel = "error" }},
		{desc: "explicit task socket", change: func(c *Config) { c.TaskSocket = "/run/other.sock" }},
		{desc: "listen without .sock", change: func(c *Config) { c.Listen = "/run/controller" }},
		{
			desc:   "relative listen",
			change: func(c *Config) { c.Listen = "controller.sock" },
			want:   []string{`listen: "controller.sock" must be an absolute path`, `task_socket: "controller-task.sock" must be an absolute path`},
		},
		{
			desc:   "relative listen with an absolute task socket",
			change: func(c *Config) { c.Listen = "./controller.sock"; c.TaskSocket = "/run/task.sock" },
			want:   []string{`listen: "./controller.sock" must be an absolute path`},
		},
		{
			desc:   "empty listen",
			change: func(c *Config) { c.Listen = "" },
			want:   []string{`listen: "" must be an absolute path`, `task_socket: "-task.sock" must be an absolute path`},
		},
		{
			desc:   "relative dir",
			change: func(c *Config) { c.Dir = "state" },
			want:   []string{`dir: "state" must be an absolute path`},
		},
		{
			desc:   "empty dir",
			change: func(c *Config) { c.Dir = "" },
			want:   []string{`dir: "" must be an absolute path`},
		},
		{
			desc:   "relative task socket",
			change: func(c *Config) { c.TaskSocket = "task.sock" },
			want:   []string{`task_socket: "task.sock" must be an absolute path`},
		},
		{
			desc:   "task socket is listen",
			change: func(c *Config) { c.TaskSocket = c.Listen },
			want:   []string{"task_socket: must differ from listen"},
		},
		{
			desc:   "task socket is listen spelled differently",
			change: func(c *Config) { c.TaskSocket = "/run/./resource-slot-sandboxer.sock" },
			want:   []string{"task_socket: must differ from listen"},
		},
		{
			desc:   "task socket is listen with a double slash",
			change: func(c *Config) { c.TaskSocket = "/run//resource-slot-sandboxer.sock" },
			want:   []string{"task_socket: must differ from listen"},
		},
		{
			desc:   "listen is the task shim's upstream",
			change: func(c *Config) { c.TaskSocket = "/run/t.sock"; c.Listen = "/run/t-upstream.sock" },
			want:   []string{"listen: must differ from the task shim's upstream socket /run/t-upstream.sock"},
		},
		{
			desc:   "relative containerd address",
			change: func(c *Config) { c.ContainerdAddress = "containerd.sock" },
			want:   []string{`containerd_address: "containerd.sock" must be an absolute path or empty`},
		},
		{
			desc:   "unknown log level",
			change: func(c *Config) { c.LogLevel = "verbose" },
			want:   []string{`log_level: "verbose" is not one of`},
		},
		{
			desc:   "empty log level",
			change: func(c *Config) { c.LogLevel = "" },
			want:   []string{`log_level: "" is not one of`},
		},
		{
			desc:   "unknown mode",
			change: func(c *Config) { c.Mode = "kata" },
			want:   []string{`mode: "kata" must be "slot" or "vm"`},
		},
		{
			desc:   "mode is case sensitive",
			change: func(c *Config) { c.Mode = "SLOT" },
			want:   []string{`mode: "SLOT" must be`},
		},
		{
			desc:   "empty mode",
			change: func(c *Config) { c.Mode = "" },
			want:   []string{`mode: "" must be`},
		},
		{
			desc:   "zero stop timeout",
			change: func(c *Config) { c.StopTimeout = 0 },
			want:   []string{"stop_timeout: 0s must be positive"},
		},
		{
			desc:   "negative stop timeout",
			change: func(c *Config) { c.StopTimeout = Duration(-time.Second) },
			want:   []string{"stop_timeout: -1s must be positive"},
		},
		{
			desc:   "zero orphan timeout",
			change: func(c *Config) { c.ShimOrphanTimeout = 0 },
			want:   []string{"shim_orphan_timeout: 0s must be positive"},
		},
		{
			desc:   "negative created grace",
			change: func(c *Config) { c.CreatedGrace = Duration(-time.Second) },
			want:   []string{"created_grace: -1s must not be negative"},
		},
		{
			desc: "several at once",
			change: func(c *Config) {
				c.Dir = "rel"
				c.LogLevel = "loud"
				c.Mode = "kata"
				c.StopTimeout = 0
				c.CreatedGrace = Duration(-time.Minute)
			},
			want: []string{
				`dir: "rel" must be an absolute path`,
				`log_level: "loud" is not one of`,
				`mode: "kata" must be`,
				"stop_timeout: 0s must be positive",
				"created_grace: -1m0s must not be negative",
			},
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			c := Default()
			tc.change(&c)
			err := c.Validate()
			if len(tc.want) == 0 {
				assert.NoError(t, err)
				return
			}
			require.Error(t, err)
			lines := strings.Split(err.Error(), "\n")
			require.Len(t, lines, len(tc.want), "errors: %q", err)
			for i, want := range tc.want {
				assert.Contains(t, lines[i], want)
			}
		})
	}
}

// TestDecodeThenValidate: a file with decodable but invalid values is
// reported by Validate with every problem.
func TestDecodeThenValidate(t *testing.T) {
	cfg := Default()
	require.NoError(t, Decode([]byte(`
listen = "relative.sock"
mode = "kvm"
stop_timeout = "0s"
created_grace = "-1s"
containerd_address = "containerd.sock"
`), &cfg))
	err := cfg.Validate()
	require.Error(t, err)
	for _, key := range []string{"listen:", "task_socket:", "mode:", "stop_timeout:", "created_grace:", "containerd_address:"} {
		assert.Contains(t, err.Error(), key)
	}
}

func TestTaskSocketPath(t *testing.T) {
	for _, tc := range []struct {
		desc       string
		listen     string
		taskSocket string
		want       string
	}{
		{desc: "derived from .sock", listen: "/run/a.sock", want: "/run/a-task.sock"},
		{desc: "derived without .sock", listen: "/run/a", want: "/run/a-task.sock"},
		{desc: "only the last .sock", listen: "/run/a.sock.sock", want: "/run/a.sock-task.sock"},
		{desc: ".sock inside the name", listen: "/run/a.socket", want: "/run/a.socket-task.sock"},
		{desc: "explicit", listen: "/run/a.sock", taskSocket: "/run/b.sock", want: "/run/b.sock"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			c := Config{Listen: tc.listen, TaskSocket: tc.taskSocket}
			assert.Equal(t, tc.want, c.TaskSocketPath())
		})
	}
}

func TestDuration(t *testing.T) {
	for _, tc := range []struct {
		desc    string
		text    string
		want    Duration
		wantErr bool
		back    string
	}{
		{desc: "seconds", text: "10s", want: Duration(10 * time.Second), back: "10s"},
		{desc: "compound", text: "1m30s", want: Duration(90 * time.Second), back: "1m30s"},
		{desc: "milliseconds", text: "250ms", want: Duration(250 * time.Millisecond), back: "250ms"},
		{desc: "zero", text: "0s", want: 0, back: "0s"},
		{desc: "bare zero", text: "0", want: 0, back: "0s"},
		{desc: "negative", text: "-1s", want: Duration(-time.Second), back: "-1s"},
		{desc: "no unit", text: "10", wantErr: true},
		{desc: "words", text: "ten seconds", wantErr: true},
		{desc: "empty", text: "", wantErr: true},
		{desc: "days", text: "1d", wantErr: true},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			d := Duration(42)
			err := d.UnmarshalText([]byte(tc.text))
			if tc.wantErr {
				require.Error(t, err)
				assert.Contains(t, err.Error(), "invalid duration")
				assert.Equal(t, Duration(42), d, "unchanged on error")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, d)
			back, err := d.MarshalText()
			require.NoError(t, err)
			assert.Equal(t, tc.back, string(back))
		})
	}
}
