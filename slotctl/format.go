package slotctl

import (
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kuasar-io/resource-slot-sandboxer/admin/api"
)

const none = "-"

func table(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 4, 2, ' ', 0) }

func row(tw *tabwriter.Writer, cells ...string) { fmt.Fprintln(tw, strings.Join(cells, "\t")) }

// num writes a number with up to three decimals and no trailing zeros.
func num(f float64) string {
	return strings.TrimSuffix(strings.TrimRight(fmt.Sprintf("%.3f", f), "0"), ".")
}

func cores(p *float64) string {
	if p == nil {
		return none
	}
	return num(*p)
}

// bytesOf writes bytes in the largest binary unit that keeps the value
// ≥ 1, with up to two decimals: 1.5Gi.
func bytesOf(v float64) string {
	if math.Abs(v) < 1024 {
		return num(v)
	}
	units := []string{"Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}
	i := -1
	for math.Abs(v) >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	return strings.TrimSuffix(strings.TrimRight(fmt.Sprintf("%.2f", v), "0"), ".") + units[i]
}

func bytesPtr[T int64 | uint64](p *T) string {
	if p == nil {
		return none
	}
	return bytesOf(float64(*p))
}

func count[T int64 | uint64](p *T) string {
	if p == nil {
		return none
	}
	return fmt.Sprint(*p)
}

// rate writes a per-second value with SI prefixes: 100M (bits/s).
func rate(p *int64, unit string) string {
	if p == nil {
		return none
	}
	v := float64(*p)
	for _, u := range []string{"", "k", "M", "G", "T", "P"} {
		if math.Abs(v) < 1000 || u == "P" {
			return strings.TrimSuffix(strings.TrimRight(fmt.Sprintf("%.2f", v), "0"), ".") + u + unit
		}
		v /= 1000
	}
	return none
}

// age writes how long ago t was: 45s, 12m, 3h, 5d.
func age(t *time.Time, now time.Time) string {
	if t == nil || t.IsZero() {
		return none
	}
	d := now.Sub(*t)
	switch {
	case d < 0:
		return "0s"
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	default:
		return fmt.Sprintf("%dd", int(d.Hours()/24))
	}
}

func writeList(w io.Writer, list []api.Sandbox, now time.Time) {
	tw := table(w)
	row(tw, "ID", "MODE", "PHASE", "CREATED", "STARTED", "CPU", "CPU-REQ", "MEMORY", "MEMORY-REQ", "PIDS", "CONTAINERS")
	for _, s := range list {
		created := s.CreatedAt
		row(tw, s.ID, s.Mode, s.Phase, age(&created, now), age(s.StartedAt, now),
			cores(s.Limits.CPU), cores(s.Requests.CPU), bytesPtr(s.Limits.Memory), bytesPtr(s.Requests.Memory),
			count(s.Limits.Pids), fmt.Sprint(s.Containers))
	}
	tw.Flush()
}

func writeLimits(w io.Writer, l api.Limits) {
	src := func(keys ...string) string {
		var out []string
		for _, k := range keys {
			if s, ok := l.Sources[k]; ok {
				out = append(out, s)
			}
		}
		if len(out) == 0 {
			return none
		}
		if len(out) == 2 && out[0] == out[1] {
			out = out[:1]
		}
		return strings.Join(out, ", ")
	}
	tw := table(w)
	row(tw, "RESOURCE", "LIMIT", "REQUEST", "SOURCE")
	row(tw, "cpu", cores(l.Limits.CPU), cores(l.Requests.CPU), src("cpu_limit", "cpu_request"))
	row(tw, "memory", bytesPtr(l.Limits.Memory), bytesPtr(l.Requests.Memory), src("memory_limit", "memory_request"))
	row(tw, "pids", count(l.Limits.Pids), none, src("pid_limit"))
	row(tw, "storage", bytesPtr(l.Limits.Storage), none, src("storage_limit"))
	row(tw, "network-ingress", rate(l.NetworkIngressBps, "bit/s"), none, src("network_ingress_bps"))
	row(tw, "network-egress", rate(l.NetworkEgressBps, "bit/s"), none, src("network_egress_bps"))
	row(tw, "disk-read", rate(l.DiskReadBps, "B/s"), none, src("disk_read_bps"))
	row(tw, "disk-write", rate(l.DiskWriteBps, "B/s"), none, src("disk_write_bps"))
	row(tw, "disk-read-iops", count(l.DiskReadIOPS), none, src("disk_read_iops"))
	row(tw, "disk-write-iops", count(l.DiskWriteIOPS), none, src("disk_write_iops"))
	tw.Flush()
}

// share is usage as a percentage of a limit.
func share(used, limit float64) string {
	if limit <= 0 {
		return none
	}
	return num(math.Round(used/limit*1000)/10) + "%"
}

func writeUsage(w io.Writer, u api.Usage) {
	fmt.Fprintf(w, "sandbox %s: %s, %s mode, %s usage at %s\n\n", u.ID, u.Phase, u.Mode, u.Source, u.Timestamp.Local().Format(time.TimeOnly))
	tw := table(w)
	row(tw, "RESOURCE", "USAGE", "LIMIT", "OF LIMIT")
	pct := func(used *float64, limit *float64) string {
		if used == nil || limit == nil {
			return none
		}
		return share(*used, *limit)
	}
	if u.CPUCores != nil {
		row(tw, "cpu (cores)", num(*u.CPUCores), cores(u.Limits.CPU), pct(u.CPUCores, u.Limits.CPU))
	}
	if u.CPUSeconds != nil {
		row(tw, "cpu time", (time.Duration(*u.CPUSeconds * float64(time.Second))).Round(time.Millisecond).String(), none, none)
	}
	asF := func(p *uint64) *float64 {
		if p == nil {
			return nil
		}
		f := float64(*p)
		return &f
	}
	asFI := func(p *int64) *float64 {
		if p == nil {
			return nil
		}
		f := float64(*p)
		return &f
	}
	if u.MemoryBytes != nil {
		row(tw, "memory", bytesPtr(u.MemoryBytes), bytesPtr(u.Limits.Memory), pct(asF(u.MemoryBytes), asFI(u.Limits.Memory)))
	}
	if u.MemoryRSSBytes != nil {
		row(tw, "memory rss", bytesPtr(u.MemoryRSSBytes), none, none)
	}
	if u.Pids != nil {
		row(tw, "pids", count(u.Pids), count(u.Limits.Pids), pct(asF(u.Pids), asFI(u.Limits.Pids)))
	}
	for _, m := range []struct {
		name string
		v    *uint64
	}{
		{"disk read", u.DiskReadBytes}, {"disk write", u.DiskWriteBytes},
		{"net rx", u.NetRxBytes}, {"net tx", u.NetTxBytes},
	} {
		if m.v != nil {
			row(tw, m.name, bytesPtr(m.v), none, none)
		}
	}
	tw.Flush()
	for _, v := range u.Violations {
		fmt.Fprintf(w, "over its limit: %s\n", v)
	}
	for _, v := range u.Unenforced {
		fmt.Fprintf(w, "not enforced: %s\n", v)
	}
}

func writeCapacity(w io.Writer, c api.Capacity) {
	fmt.Fprintf(w, "policy %s, %d sandboxes hold resources\n\n", c.Policy, c.Sandboxes)
	tw := table(w)
	row(tw, "RESOURCE", "CAPACITY", "OVERCOMMIT", "ALLOCATABLE", "ALLOCATED", "REQUESTED", "LIMITED", "UNLIMITED", "FREE", "USED")
	for _, r := range c.Resources {
		f := num
		if r.Unit == "bytes" {
			f = bytesOf
		}
		requested := none
		if r.Requested != nil {
			requested = f(*r.Requested)
		}
		row(tw, r.Resource, f(r.Capacity), num(r.Overcommit), f(r.Allocatable), f(r.Allocated), requested,
			f(r.Limited), fmt.Sprint(r.Unlimited), f(r.Free), share(r.Allocated, r.Allocatable))
	}
	tw.Flush()
	if len(c.Rejections) > 0 {
		fmt.Fprintln(w)
		tw := table(w)
		row(tw, "REJECTED", "POLICY", "COUNT")
		for _, r := range c.Rejections {
			row(tw, r.Resource, r.Policy, fmt.Sprint(r.Count))
		}
		tw.Flush()
	}
}

func money(v float64) string { return fmt.Sprintf("%.4f", v) }

func writeCost(w io.Writer, c api.Cost) {
	p := c.Prices
	fmt.Fprintf(w, "prices per hour (%s): cpu core %s, memory GiB %s, pid %s, storage GiB %s\n\n",
		c.Currency, num(p.CPUCoreHour), num(p.MemoryGiBHour), num(p.PidHour), num(p.StorageGiBHour))
	tw := table(w)
	row(tw, "SANDBOX", "PHASE", "CPU-CORE-H", "MEMORY-GIB-H", "PID-H", "STORAGE-GIB-H", "COST ("+c.Currency+")")
	for _, s := range c.Sandboxes {
		row(tw, s.ID, s.Phase, num(s.CPUCoreHours), num(s.MemoryGiBHours), num(s.PidHours), num(s.StorageGiBHours), money(s.Cost))
	}
	t := c.Total
	row(tw, "TOTAL", "", num(t.CPUCoreHours), num(t.MemoryGiBHours), num(t.PidHours), num(t.StorageGiBHours), money(t.Cost))
	tw.Flush()
}
