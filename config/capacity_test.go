package config

import (
	"math"
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestOpsDefaults(t *testing.T) {
	c := Default()
	assert.Equal(t, "", c.MetricsAddress)
	assert.Equal(t, "/run/resource-slot-sandboxer-admin.sock", c.AdminSocketPath())
	assert.Equal(t, Capacity{Overcommit: Overcommit{CPU: 1, Memory: 1, Pids: 1}, Policy: PolicyOff}, c.Capacity)
	assert.Equal(t, Cost{Currency: "USD"}, c.Cost)

	c.Listen = "/run/resource-vm-sandboxer.sock"
	assert.Equal(t, "/run/resource-vm-sandboxer-admin.sock", c.AdminSocketPath(), "derived from listen")
	c.AdminSocket = "/run/admin.sock"
	assert.Equal(t, "/run/admin.sock", c.AdminSocketPath())
}

// TestDocumentedTables: the [capacity], [capacity.overcommit] and [cost]
// tables and each of their keys are in the documented example, whose
// values are the defaults (TestDocumentedExample compares them).
func TestDocumentedTables(t *testing.T) {
	data, err := os.ReadFile("resource-slot.toml")
	require.NoError(t, err)
	text := string(data)
	var walk func(prefix string, rt reflect.Type)
	walk = func(prefix string, rt reflect.Type) {
		// The keys of this table: from its header to the next one.
		section := text
		if prefix != "" {
			i := strings.Index(text, "\n["+prefix+"]\n")
			require.GreaterOrEqual(t, i, 0, "[%s] is not documented", prefix)
			section = text[i+len(prefix)+3:]
			if j := strings.Index(section, "\n["); j >= 0 {
				section = section[:j]
			}
		}
		for i := range rt.NumField() {
			f := rt.Field(i)
			key := f.Tag.Get("toml")
			if f.Type.Kind() == reflect.Struct {
				walk(strings.TrimPrefix(prefix+"."+key, "."), f.Type)
				continue
			}
			if prefix != "" {
				assert.Regexp(t, regexp.MustCompile(`(?m)^`+regexp.QuoteMeta(key)+` = `), section, "%s.%s is not documented", prefix, key)
			}
		}
	}
	walk("", reflect.TypeFor[Config]())
	for _, key := range []string{"metrics_address", "admin_socket"} {
		assert.Regexp(t, regexp.MustCompile(`(?m)^`+key+` = `), text)
	}
}

func TestDecodeOps(t *testing.T) {
	for _, tc := range []struct {
		desc string
		toml string
		want func(c *Config)
	}{
		{
			desc: "everything",
			toml: `
metrics_address = "127.0.0.1:9464"
admin_socket = "/run/rss/admin.sock"
[capacity]
cpu = 16
memory = "64Gi"
pids = 100000
policy = "enforce"
[capacity.overcommit]
cpu = 2.5
memory = 1
pids = 0.9
[cost]
cpu_core_hour = 0.031
memory_gib_hour = 0.004
pid_hour = 0.000001
storage_gib_hour = 0.0001
currency = "EUR"
`,
			want: func(c *Config) {
				c.MetricsAddress = "127.0.0.1:9464"
				c.AdminSocket = "/run/rss/admin.sock"
				c.Capacity = Capacity{CPU: 16, Memory: 64 << 30, Pids: 100000, Policy: "enforce",
					Overcommit: Overcommit{CPU: 2.5, Memory: 1, Pids: 0.9}}
				c.Cost = Cost{CPUCoreHour: 0.031, MemoryGiBHour: 0.004, PidHour: 0.000001, StorageGiBHour: 0.0001, Currency: "EUR"}
			},
		},
		{
			desc: "quantity strings and integers",
			toml: "[capacity]\ncpu = \"3500m\"\nmemory = 17179869184\npids = \"32k\"\n",
			want: func(c *Config) {
				c.Capacity.CPU = 3.5
				c.Capacity.Memory = 16 << 30
				c.Capacity.Pids = 32000
			},
		},
		{
			desc: "cpu as a float and a quoted integer, memory in decimal units",
			toml: "[capacity]\ncpu = 2.5\nmemory = \"1G\"\n",
			want: func(c *Config) { c.Capacity.CPU = 2.5; c.Capacity.Memory = 1e9 },
		},
		{
			desc: "inline overcommit, integer prices",
			toml: "[capacity]\novercommit = { cpu = 4 }\n[cost]\ncpu_core_hour = 1\n",
			want: func(c *Config) {
				c.Capacity.Overcommit = Overcommit{CPU: 4, Memory: 1, Pids: 1}
				c.Cost.CPUCoreHour = 1
			},
		},
		{
			desc: "dotted keys",
			toml: "capacity.policy = \"warn\"\ncost.currency = \"JPY\"\n",
			want: func(c *Config) { c.Capacity.Policy = "warn"; c.Cost.Currency = "JPY" },
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			cfg := Default()
			require.NoError(t, Decode([]byte(tc.toml), &cfg))
			want := Default()
			tc.want(&want)
			assert.Equal(t, want, cfg)
			assert.NoError(t, cfg.Validate())
		})
	}
}

func TestDecodeOpsErrors(t *testing.T) {
	for _, tc := range []struct {
		desc string
		toml string
		want []string
	}{
		{"bad memory quantity", "[capacity]\nmemory = \"lots\"\n", []string{"line 2", `invalid quantity "lots"`}},
		{"fractional memory", "[capacity]\nmemory = \"1.5\"\n", []string{"line 2", "not a whole number"}},
		{"bad cpu quantity", "[capacity]\ncpu = \"four\"\n", []string{"line 2", `invalid number of cores "four"`}},
		{"bool cpu", "[capacity]\ncpu = true\n", []string{`invalid number of cores "true"`}},
		{"unknown capacity key", "[capacity]\ndisk = 1\n", []string{`unknown key "capacity.disk"`}},
		{"unknown overcommit key", "[capacity.overcommit]\nstorage = 2\n", []string{`unknown key "capacity.overcommit.storage"`}},
		{"unknown cost key", "[cost]\ngpu_hour = 2\n", []string{`unknown key "cost.gpu_hour"`}},
		{"string price", "[cost]\ncpu_core_hour = \"0.1\"\n", []string{"line 2"}},
		{"string ratio", "[capacity.overcommit]\ncpu = \"2\"\n", []string{"line 2"}},
		{"capacity not a table", "capacity = 4\n", []string{"line 1"}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			cfg := Default()
			err := Decode([]byte(tc.toml), &cfg)
			require.Error(t, err)
			for _, s := range tc.want {
				assert.Contains(t, err.Error(), s)
			}
		})
	}
}

// TestValidateOps: every bad value, alone, is reported with its key; and
// all of them at once, each one.
func TestValidateOps(t *testing.T) {
	cases := []struct {
		desc   string
		change func(c *Config)
		want   string
	}{
		{"metrics address without port", func(c *Config) { c.MetricsAddress = "127.0.0.1" }, `metrics_address: "127.0.0.1" is not host:port`},
		{"metrics port not a number", func(c *Config) { c.MetricsAddress = "127.0.0.1:http" }, `metrics_address: "127.0.0.1:http": port "http" is not a number 0-65535`},
		{"metrics port too large", func(c *Config) { c.MetricsAddress = ":70000" }, `port "70000" is not a number`},
		{"metrics bad host", func(c *Config) { c.MetricsAddress = "a b:9464" }, `"a b" is neither an IP address nor a host name`},
		{"relative admin socket", func(c *Config) { c.AdminSocket = "admin.sock" }, `admin_socket: "admin.sock" must be an absolute path`},
		{"admin socket is listen", func(c *Config) { c.AdminSocket = c.Listen }, "admin_socket: must differ from listen"},
		{"admin socket is the task socket", func(c *Config) { c.AdminSocket = "/run//resource-slot-sandboxer-task.sock" }, "admin_socket: must differ from task_socket"},
		{"negative cpu", func(c *Config) { c.Capacity.CPU = -1 }, "capacity.cpu: -1 must be a number of cores ≥ 0"},
		{"NaN cpu", func(c *Config) { c.Capacity.CPU = Cores(math.NaN()) }, "capacity.cpu: NaN"},
		{"infinite cpu", func(c *Config) { c.Capacity.CPU = Cores(math.Inf(1)) }, "capacity.cpu: +Inf"},
		{"negative memory", func(c *Config) { c.Capacity.Memory = -1 }, "capacity.memory: -1 must be ≥ 0 bytes"},
		{"negative pids", func(c *Config) { c.Capacity.Pids = -5 }, "capacity.pids: -5 must be ≥ 0"},
		{"zero cpu overcommit", func(c *Config) { c.Capacity.Overcommit.CPU = 0 }, "capacity.overcommit.cpu: 0 must be a ratio > 0"},
		{"negative memory overcommit", func(c *Config) { c.Capacity.Overcommit.Memory = -1 }, "capacity.overcommit.memory: -1 must be a ratio > 0"},
		{"infinite pids overcommit", func(c *Config) { c.Capacity.Overcommit.Pids = math.Inf(1) }, "capacity.overcommit.pids: +Inf must be a ratio > 0"},
		{"NaN overcommit", func(c *Config) { c.Capacity.Overcommit.CPU = math.NaN() }, "capacity.overcommit.cpu: NaN"},
		{"unknown policy", func(c *Config) { c.Capacity.Policy = "strict" }, `capacity.policy: "strict" must be "off", "warn" or "enforce"`},
		{"empty policy", func(c *Config) { c.Capacity.Policy = "" }, `capacity.policy: "" must be`},
		{"policy is case sensitive", func(c *Config) { c.Capacity.Policy = "Enforce" }, `capacity.policy: "Enforce"`},
		{"negative cpu price", func(c *Config) { c.Cost.CPUCoreHour = -0.1 }, "cost.cpu_core_hour: -0.1 must be a price ≥ 0"},
		{"NaN memory price", func(c *Config) { c.Cost.MemoryGiBHour = math.NaN() }, "cost.memory_gib_hour: NaN must be a price ≥ 0"},
		{"negative pid price", func(c *Config) { c.Cost.PidHour = -1 }, "cost.pid_hour: -1"},
		{"infinite storage price", func(c *Config) { c.Cost.StorageGiBHour = math.Inf(1) }, "cost.storage_gib_hour: +Inf"},
		{"empty currency", func(c *Config) { c.Cost.Currency = "" }, `cost.currency: "" must be a short label`},
		{"currency with a space", func(c *Config) { c.Cost.Currency = "US D" }, `cost.currency: "US D"`},
		{"long currency", func(c *Config) { c.Cost.Currency = strings.Repeat("X", 17) }, "cost.currency:"},
	}
	all := Default()
	for _, tc := range cases {
		t.Run(tc.desc, func(t *testing.T) {
			c := Default()
			tc.change(&c)
			err := c.Validate()
			require.Error(t, err)
			lines := strings.Split(err.Error(), "\n")
			require.Len(t, lines, 1, "errors: %q", err)
			assert.Contains(t, lines[0], tc.want)
		})
	}
	// One bad value per key at once: each is reported.
	all.MetricsAddress = "nowhere"
	all.AdminSocket = "rel.sock"
	all.Capacity = Capacity{CPU: -1, Memory: -1, Pids: -1, Overcommit: Overcommit{CPU: 0, Memory: -1, Pids: math.NaN()}, Policy: "x"}
	all.Cost = Cost{CPUCoreHour: -1, MemoryGiBHour: -1, PidHour: -1, StorageGiBHour: -1}
	err := all.Validate()
	require.Error(t, err)
	for _, key := range []string{
		"metrics_address:", "admin_socket:", "capacity.cpu:", "capacity.memory:", "capacity.pids:",
		"capacity.overcommit.cpu:", "capacity.overcommit.memory:", "capacity.overcommit.pids:", "capacity.policy:",
		"cost.cpu_core_hour:", "cost.memory_gib_hour:", "cost.pid_hour:", "cost.storage_gib_hour:", "cost.currency:",
	} {
		assert.Contains(t, err.Error(), key)
	}
	assert.Len(t, strings.Split(err.Error(), "\n"), 14)
}

func TestValidOps(t *testing.T) {
	for _, tc := range []struct {
		desc   string
		change func(c *Config)
	}{
		{"metrics on localhost", func(c *Config) { c.MetricsAddress = "127.0.0.1:9464" }},
		{"metrics on every interface", func(c *Config) { c.MetricsAddress = ":9464" }},
		{"metrics on a free port", func(c *Config) { c.MetricsAddress = "127.0.0.1:0" }},
		{"metrics on IPv6", func(c *Config) { c.MetricsAddress = "[::1]:9464" }},
		{"metrics on a host name", func(c *Config) { c.MetricsAddress = "localhost:9464" }},
		{"overcommit below 1", func(c *Config) { c.Capacity.Overcommit.Memory = 0.8 }},
		{"warn", func(c *Config) { c.Capacity.Policy = "warn" }},
		{"free", func(c *Config) { c.Cost = Cost{Currency: "credits"} }},
		{"explicit admin socket", func(c *Config) { c.AdminSocket = "/run/x/admin.sock" }},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			c := Default()
			tc.change(&c)
			assert.NoError(t, c.Validate())
		})
	}
}

func TestQuantityText(t *testing.T) {
	var q Quantity
	require.NoError(t, q.UnmarshalText([]byte("2Gi")))
	assert.Equal(t, Quantity(2<<30), q)
	require.NoError(t, q.UnmarshalText([]byte("1e3")))
	assert.Equal(t, Quantity(1000), q)
	assert.Error(t, q.UnmarshalText([]byte("9Ei")), "beyond int64")
	var c Cores
	require.NoError(t, c.UnmarshalText([]byte("250m")))
	assert.Equal(t, Cores(0.25), c)
	require.NoError(t, c.UnmarshalText([]byte("8")))
	assert.Equal(t, Cores(8), c)
}
