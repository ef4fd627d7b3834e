// Package slotctl is the command-line client of the sandboxer's admin API
// (cmd/slotctl is its main): list sandboxes, read and change their
// resources, watch their usage, read the node's capacity and the cost.
package slotctl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/kuasar-io/resource-slot-sandboxer/admin/api"
)

// Usage is the help text.
const Usage = `slotctl: operate resource-slot-sandboxer through its admin socket.

Usage:
  slotctl [--socket S] [-o table|json] COMMAND

Commands:
  list                          sandboxes: mode, phase, age, limits and requests
  resources limits ID           a sandbox's limits and requests, and their sources
  resources usage ID            what a ready sandbox uses now
  resources watch ID [--interval 2s]
                                usage, refreshed in place until interrupted
  resources set ID [--cpu N] [--memory Q] [--pids N] [--cpu-request N]
                   [--memory-request Q] [--storage Q]
                                resize a sandbox (as its resources.* annotations
                                would; "none" removes a value); admitted against
                                the capacity and applied live
  capacity                      node capacity, overcommit, allocated, free
  cost                          estimated cost per sandbox and in total

Flags:
  --socket S    admin socket (default $SLOTCTL_SOCKET, else ` + DefaultSocket + `)
  -o FORMAT     table (default) or json
  Quantities use Kubernetes syntax: 2, 500m, 2Gi.
`

type options struct {
	socket, output string
	interval       time.Duration
	set            api.SetResources
	given          map[string]bool
	help           bool
}

// Main runs slotctl with args (without the program name) and returns its
// exit status: 0, or 1 after one line on stderr. ctx ends a watch.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if err := run(ctx, args, stdout); err != nil {
		msg := strings.Join(strings.Fields(strings.ReplaceAll(err.Error(), "\n", "; ")), " ")
		fmt.Fprintf(stderr, "slotctl: %s\n", msg)
		return 1
	}
	return 0
}

// setFlags are the flags of "resources set", by flag name.
var setFlags = []string{"cpu", "memory", "pids", "cpu-request", "memory-request", "storage"}

func parse(args []string) (options, []string, error) {
	o := options{given: map[string]bool{}}
	fs := flag.NewFlagSet("slotctl", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	socket := DefaultSocket
	if s := os.Getenv("SLOTCTL_SOCKET"); s != "" {
		socket = s
	}
	fs.StringVar(&o.socket, "socket", socket, "")
	fs.StringVar(&o.output, "o", "table", "")
	fs.StringVar(&o.output, "output", "table", "")
	fs.DurationVar(&o.interval, "interval", 2*time.Second, "")
	fs.BoolVar(&o.help, "h", false, "")
	fs.BoolVar(&o.help, "help", false, "")
	values := map[string]*string{}
	for _, name := range setFlags {
		values[name] = fs.String(name, "", "")
	}
	// Flags may come before, between and after the words.
	var words []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				o.help = true
				return o, nil, nil
			}
			return o, nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		words = append(words, args[0])
		args = args[1:]
	}
	fs.Visit(func(f *flag.Flag) { o.given[f.Name] = true })
	set := func(name string) *string {
		if !o.given[name] {
			return nil
		}
		return values[name]
	}
	o.set = api.SetResources{
		CPU: set("cpu"), Memory: set("memory"), Pids: set("pids"),
		CPURequest: set("cpu-request"), MemoryRequest: set("memory-request"), Storage: set("storage"),
	}
	return o, words, nil
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	o, words, err := parse(args)
	if err != nil {
		return fmt.Errorf("%v (see slotctl --help)", err)
	}
	if o.help || len(words) == 0 || words[0] == "help" {
		if !o.help && len(words) == 0 {
			return errors.New("no command (see slotctl --help)")
		}
		_, err := io.WriteString(stdout, Usage)
		return err
	}
	if o.output != "table" && o.output != "json" {
		return fmt.Errorf("-o %q: want table or json", o.output)
	}
	cmd := words[0]
	if cmd == "resources" && len(words) > 1 {
		cmd += " " + words[1]
	}
	// Flags of one command only.
	for _, name := range setFlags {
		if o.given[name] && cmd != "resources set" {
			return fmt.Errorf("--%s applies to \"resources set\" only", name)
		}
	}
	if o.given["interval"] && cmd != "resources watch" {
		return errors.New("--interval applies to \"resources watch\" only")
	}
	c := NewClient(o.socket)
	out := &printer{w: stdout, json: o.output == "json"}
	needID := func() (string, error) {
		if len(words) != 3 {
			return "", fmt.Errorf("usage: slotctl %s ID", cmd)
		}
		return words[2], nil
	}
	noArgs := func(n int) error {
		if len(words) != n {
			return fmt.Errorf("unexpected arguments after %q: %s", cmd, strings.Join(words[n:], " "))
		}
		return nil
	}
	switch cmd {
	case "list":
		if err := noArgs(1); err != nil {
			return err
		}
		list, err := c.List(ctx)
		if err != nil {
			return err
		}
		return out.print(list, func(w io.Writer) { writeList(w, list, time.Now()) })
	case "resources limits":
		id, err := needID()
		if err != nil {
			return err
		}
		l, err := c.Limits(ctx, id)
		if err != nil {
			return err
		}
		return out.print(l, func(w io.Writer) { writeLimits(w, l) })
	case "resources usage":
		id, err := needID()
		if err != nil {
			return err
		}
		u, err := c.Usage(ctx, id)
		if err != nil {
			return err
		}
		return out.print(u, func(w io.Writer) { writeUsage(w, u) })
	case "resources watch":
		id, err := needID()
		if err != nil {
			return err
		}
		if o.interval <= 0 {
			return fmt.Errorf("--interval %s must be positive", o.interval)
		}
		return watch(ctx, c, id, o.interval, out)
	case "resources set":
		id, err := needID()
		if err != nil {
			return err
		}
		if o.set == (api.SetResources{}) {
			return errors.New("resources set: give at least one of --cpu, --memory, --pids, --cpu-request, --memory-request, --storage")
		}
		l, err := c.SetResources(ctx, id, o.set)
		if err != nil {
			return err
		}
		return out.print(l, func(w io.Writer) { writeLimits(w, l) })
	case "capacity":
		if err := noArgs(1); err != nil {
			return err
		}
		capa, err := c.Capacity(ctx)
		if err != nil {
			return err
		}
		return out.print(capa, func(w io.Writer) { writeCapacity(w, capa) })
	case "cost":
		if err := noArgs(1); err != nil {
			return err
		}
		cost, err := c.Cost(ctx)
		if err != nil {
			return err
		}
		return out.print(cost, func(w io.Writer) { writeCost(w, cost) })
	case "resources":
		return errors.New("resources: want limits, usage, watch or set (see slotctl --help)")
	default:
		return fmt.Errorf("unknown command %q (see slotctl --help)", cmd)
	}
}

// printer writes a value as JSON or as a table.
type printer struct {
	w    io.Writer
	json bool
}

func (p *printer) print(v any, table func(io.Writer)) error {
	if p.json {
		enc := json.NewEncoder(p.w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	var b bytes.Buffer
	table(&b)
	_, err := p.w.Write(b.Bytes())
	return err
}

// clearScreen moves the cursor home and clears the terminal.
const clearScreen = "\x1b[H\x1b[2J"

// watch shows a sandbox's usage every interval until ctx ends. A sandbox
// that goes away ends it with an error; other errors are shown and
// retried.
func watch(ctx context.Context, c *Client, id string, interval time.Duration, out *printer) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		u, err := c.Usage(ctx, id)
		if ctx.Err() != nil {
			return nil
		}
		var apiErr *APIError
		if errors.As(err, &apiErr) && apiErr.Code() == api.CodeNotFound {
			return err
		}
		if out.json {
			if err != nil {
				return err
			}
			if err := out.print(u, nil); err != nil {
				return err
			}
		} else {
			var b bytes.Buffer
			fmt.Fprintf(&b, "%sEvery %s: slotctl resources usage %s    %s\n\n", clearScreen, interval, id, time.Now().Format(time.TimeOnly))
			if err != nil {
				fmt.Fprintf(&b, "error: %v\n", err)
			} else {
				writeUsage(&b, u)
			}
			if _, err := out.w.Write(b.Bytes()); err != nil {
				return err
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}
