// Package config is the daemon's TOML configuration: defaults, strict
// decoding (unknown keys are refused with their line) and validation.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
	"github.com/sirupsen/logrus"
)

// Defaults every deployment relies on (scripts, units and docs name them).
const (
	DefaultListen = "/run/resource-slot-sandboxer.sock"
	DefaultDir    = "/var/lib/kuasar-resource-slot"
)

// Config is the daemon configuration. Flags override it.
type Config struct {
	// Listen is the unix socket of the sandbox controller (gRPC).
	Listen string `toml:"listen"`
	// Dir is the state directory: <dir>/<sandbox-id>/resource_info.json.
	Dir string `toml:"dir"`
	// LogLevel is one of trace, debug, info, warn, error.
	LogLevel string `toml:"log_level"`
	// Mode selects the backend: "slot" (simulated) or "vm" (libvirt).
	Mode string `toml:"mode"`
	// TaskSocket is the unix socket of the task API (ttrpc) that Start
	// returns; default: the listen path with "-task.sock" for ".sock".
	TaskSocket string `toml:"task_socket"`
	// ShimOrphanTimeout is how long the task shim keeps serving while the
	// daemon is unreachable before it exits.
	ShimOrphanTimeout Duration `toml:"shim_orphan_timeout"`
	// ContainerdAddress is containerd's ttrpc socket, to which task events
	// are forwarded as a shim does; "" disables events.
	ContainerdAddress string `toml:"containerd_address"`
	// Fsync makes every state change durable before it is acknowledged
	// (fsync of the file and its directory). false keeps writes atomic
	// (they survive a killed daemon) but not durable across a power loss:
	// for slot mode used as a load generator.
	Fsync bool `toml:"fsync"`
	// StopTimeout is used when containerd stops a sandbox without one.
	StopTimeout Duration `toml:"stop_timeout"`
	// CreatedGrace is how long a sandbox may stay created but never
	// started before it is collected; 0 disables collection.
	CreatedGrace Duration `toml:"created_grace"`
	// UsageInterval is how often the usage of ready sandboxes is sampled
	// into usage.json and checked against their limits; 0 disables it.
	UsageInterval Duration `toml:"usage_interval"`
	// MetricsAddress is the host:port of the Prometheus endpoint
	// (/metrics, /healthz); "" disables it.
	MetricsAddress string `toml:"metrics_address"`
	// AdminSocket is the unix socket of the admin API (slotctl); default:
	// the listen path with "-admin.sock" for ".sock".
	AdminSocket string `toml:"admin_socket"`
	// AllowSharedSocketDir accepts socket directories (listen, task,
	// admin) that users other than root may write to: they could rename a
	// socket away and listen in its place. Refused by default.
	AllowSharedSocketDir bool `toml:"allow_shared_socket_dir"`
	// Capacity is the node capacity and the admission policy ([capacity]).
	Capacity Capacity `toml:"capacity"`
	// Cost holds the prices of cost estimation ([cost]).
	Cost Cost `toml:"cost"`
	// VM configures the vm backend ([vm]).
	VM VM `toml:"vm"`
}

// Default returns the configuration used when no file is given.
func Default() Config {
	return Config{
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
		Capacity:          defaultCapacity(),
		Cost:              defaultCost(),
		VM:                defaultVM(),
	}
}

// Duration is a time.Duration written as a Go duration string ("10s").
type Duration time.Duration

// UnmarshalText parses "10s", "5m".
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("invalid duration %q (want e.g. \"10s\", \"5m\")", b)
	}
	*d = Duration(v)
	return nil
}

// MarshalText writes the duration string.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// Load reads a TOML file over the defaults and validates the result.
func Load(path string) (Config, error) {
	cfg := Default()
	data, err := os.ReadFile(path)
	if err != nil {
		return cfg, fmt.Errorf("read config: %w", err)
	}
	if err := Decode(data, &cfg); err != nil {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// go-toml stores a TOML integer in a Duration as nanoseconds
// ("stop_timeout = 10" would be 10ns) and refuses a float or a bool without
// its line. Decode therefore first decodes into durationShadow, Config's
// layout with every Duration a string, where each of those is a type
// mismatch with its position; durationKeys are the dotted keys of the
// Durations, wherever they are in Config.
var durationShadow, durationKeys = shadowDurations(reflect.TypeFor[Config](), "")

func shadowDurations(t reflect.Type, prefix string) (reflect.Type, map[string]bool) {
	keys := map[string]bool{}
	var fields []reflect.StructField
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if !f.IsExported() || name == "" || name == "-" {
			continue
		}
		switch {
		case f.Type == reflect.TypeFor[Duration]():
			keys[prefix+name] = true
			fields = append(fields, reflect.StructField{Name: f.Name, Type: reflect.TypeFor[string](), Tag: f.Tag})
		case f.Type.Kind() == reflect.Struct:
			sub, subKeys := shadowDurations(f.Type, prefix+name+".")
			if len(subKeys) > 0 {
				maps.Copy(keys, subKeys)
				fields = append(fields, reflect.StructField{Name: f.Name, Type: sub, Tag: f.Tag})
			}
		}
	}
	return reflect.StructOf(fields), keys
}

// Decode decodes TOML strictly into cfg (which holds the defaults).
func Decode(data []byte, cfg *Config) error {
	var de *toml.DecodeError
	if err := toml.NewDecoder(bytes.NewReader(data)).Decode(reflect.New(durationShadow).Interface()); errors.As(err, &de) {
		if key := strings.Join(de.Key(), "."); durationKeys[key] {
			row, col := de.Position()
			return fmt.Errorf("line %d, column %d: %s must be a duration string such as \"10s\"", row, col, key)
		}
	}
	dec := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields()
	if err := dec.Decode(cfg); err != nil {
		var strict *toml.StrictMissingError
		if errors.As(err, &strict) {
			var errs []error
			for _, e := range strict.Errors {
				row, col := e.Position()
				errs = append(errs, fmt.Errorf("line %d, column %d: unknown key %q", row, col, strings.Join(e.Key(), ".")))
			}
			return errors.Join(errs...)
		}
		if errors.As(err, &de) {
			row, col := de.Position()
			return fmt.Errorf("line %d, column %d: %s", row, col, strings.TrimPrefix(de.Error(), "toml: "))
		}
		return err
	}
	return nil
}

// TaskSocketPath is the task API socket, derived from Listen if unset.
func (c Config) TaskSocketPath() string {
	if c.TaskSocket != "" {
		return c.TaskSocket
	}
	return strings.TrimSuffix(c.Listen, ".sock") + "-task.sock"
}

// TaskUpstreamPath is the daemon's own task server socket, which the task
// shim forwards to. It is derived from the task socket, not from Dir: the
// shim outlives the daemon, and a daemon restarted with another Dir must
// find the shim it reuses forwarding to where it listens.
func (c Config) TaskUpstreamPath() string {
	return strings.TrimSuffix(c.TaskSocketPath(), ".sock") + "-upstream.sock"
}

// Validate reports every invalid value at once.
func (c Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{key}, args...)...))
	}
	for _, p := range []struct{ key, path string }{{"listen", c.Listen}, {"dir", c.Dir}, {"task_socket", c.TaskSocketPath()}} {
		if !filepath.IsAbs(p.path) {
			bad(p.key, "%q must be an absolute path", p.path)
		}
	}
	if c.ContainerdAddress != "" && !filepath.IsAbs(c.ContainerdAddress) {
		bad("containerd_address", "%q must be an absolute path or empty", c.ContainerdAddress)
	}
	if filepath.Clean(c.TaskSocketPath()) == filepath.Clean(c.Listen) {
		bad("task_socket", "must differ from listen")
	}
	if filepath.Clean(c.TaskUpstreamPath()) == filepath.Clean(c.Listen) {
		bad("listen", "must differ from the task shim's upstream socket %s", c.TaskUpstreamPath())
	}
	if _, err := logrus.ParseLevel(c.LogLevel); err != nil {
		bad("log_level", "%q is not one of trace, debug, info, warn, error", c.LogLevel)
	}
	switch c.Mode {
	case "slot", "vm":
	default:
		bad("mode", "%q must be \"slot\" or \"vm\"", c.Mode)
	}
	if c.StopTimeout <= 0 {
		bad("stop_timeout", "%s must be positive", time.Duration(c.StopTimeout))
	}
	if c.ShimOrphanTimeout <= 0 {
		bad("shim_orphan_timeout", "%s must be positive", time.Duration(c.ShimOrphanTimeout))
	}
	if c.UsageInterval < 0 {
		bad("usage_interval", "%s must not be negative", time.Duration(c.UsageInterval))
	}
	if c.CreatedGrace < 0 {
		bad("created_grace", "%s must not be negative", time.Duration(c.CreatedGrace))
	}
	errs = append(errs, c.validateOps()...)
	errs = append(errs, c.VM.validate()...)
	return errors.Join(errs...)
}
