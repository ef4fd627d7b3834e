package guest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
)

// Controllers enabled for the children of the root and the pod cgroup.
var podControllers = []string{"cpu", "cpuset", "memory", "pids", "io"}

// optionalControllers are enabled where the kernel has them.
var optionalControllers = []string{"hugetlb", "rdma", "misc"}

// enableControllers enables the controllers in dir's cgroup.subtree_control.
func enableControllers(dir string) error {
	ctl := filepath.Join(dir, "cgroup.subtree_control")
	var errs []error
	for _, c := range podControllers {
		if err := os.WriteFile(ctl, []byte("+"+c), 0); err != nil {
			errs = append(errs, fmt.Errorf("enable %s in %s: %w", c, dir, err))
		}
	}
	avail, _ := os.ReadFile(filepath.Join(dir, "cgroup.controllers"))
	have := strings.Fields(string(avail))
	for _, c := range optionalControllers {
		for _, h := range have {
			if h == c {
				os.WriteFile(ctl, []byte("+"+c), 0)
			}
		}
	}
	return errors.Join(errs...)
}

// limit is one file of a cgroup and the value to write to it.
type limit struct {
	file, value string
	// optional files are skipped where the kernel lacks them (swap
	// accounting).
	optional bool
}

// podLimits turns PodResources into the files of the pod cgroup. An unset
// field is the kernel's default ("max"), except pids.max, whose default is
// the boot's rss.pids (bootPids > 0).
func podLimits(r *api.PodResources, bootPids int64) ([]limit, error) {
	if r == nil {
		r = &api.PodResources{}
	}
	quota := "max"
	if r.CpuQuota != nil && *r.CpuQuota > 0 {
		quota = strconv.FormatInt(*r.CpuQuota, 10)
	}
	period := uint64(100000)
	if r.CpuPeriod != nil && *r.CpuPeriod > 0 {
		period = *r.CpuPeriod
	}
	weight := uint64(100)
	if r.CpuWeight != nil {
		weight = *r.CpuWeight
	}
	bytesOrMax := func(v *int64) string {
		if v == nil || *v < 0 {
			return "max"
		}
		return strconv.FormatInt(*v, 10)
	}
	memMin := "0"
	if r.MemoryMin != nil && *r.MemoryMin > 0 {
		memMin = strconv.FormatInt(*r.MemoryMin, 10)
	}
	pids := "max"
	switch {
	case r.PidsMax != nil && *r.PidsMax >= 0:
		pids = strconv.FormatInt(*r.PidsMax, 10)
	case r.PidsMax == nil && bootPids > 0:
		pids = strconv.FormatInt(bootPids, 10)
	}
	cpus := ""
	if r.CpusetCpus != nil {
		cpus = strings.TrimSpace(*r.CpusetCpus)
		if strings.Trim(cpus, "0123456789,-") != "" || len(cpus) > 256 {
			return nil, fmt.Errorf("cpuset_cpus %q: %w", *r.CpusetCpus, errdefs.ErrInvalidArgument)
		}
	}
	return []limit{
		{file: "cpu.max", value: quota + " " + strconv.FormatUint(period, 10)},
		{file: "cpu.weight", value: strconv.FormatUint(weight, 10)},
		{file: "cpuset.cpus", value: cpus},
		{file: "memory.min", value: memMin},
		{file: "memory.max", value: bytesOrMax(r.MemoryMax)},
		{file: "memory.swap.max", value: bytesOrMax(r.MemorySwapMax), optional: true},
		{file: "pids.max", value: pids},
	}, nil
}

func readTrim(path string) (string, error) {
	b, err := os.ReadFile(path)
	return strings.TrimSpace(string(b)), err
}

// applyLimits writes limits to the cgroup dir, all or nothing: when the
// kernel refuses one, what was written before it is restored and the
// error names the file and value (InvalidArgument).
func applyLimits(dir string, limits []limit) error {
	var written []writtenLimit
	for _, l := range limits {
		path := filepath.Join(dir, l.file)
		old, err := readTrim(path)
		if err != nil {
			if l.optional && errors.Is(err, os.ErrNotExist) {
				log.L.WithField("file", l.file).Debug("cgroup file missing; limit skipped")
				continue
			}
			return rollback(dir, written, fmt.Errorf("read %s: %w", path, err))
		}
		if old == strings.TrimSpace(l.value) {
			continue
		}
		if err := os.WriteFile(path, []byte(l.value), 0); err != nil {
			err = fmt.Errorf("%s = %q: %v: %w", l.file, l.value, err, errdefs.ErrInvalidArgument)
			return rollback(dir, written, err)
		}
		written = append(written, writtenLimit{l.file, old})
	}
	return nil
}

// writtenLimit is a limit written, with the value it replaced.
type writtenLimit struct{ file, old string }

// rollback restores what was written, newest first, and returns err.
func rollback(dir string, written []writtenLimit, err error) error {
	for i := len(written) - 1; i >= 0; i-- {
		w := written[i]
		if rerr := os.WriteFile(filepath.Join(dir, w.file), []byte(w.old), 0); rerr != nil {
			log.L.WithError(rerr).WithField("file", w.file).Error("restore cgroup limit")
		}
	}
	return err
}

// readStats reads the cgroup v2 figures of dir.
func readStats(dir string) (*api.CgroupStats, error) {
	if _, err := os.Stat(dir); err != nil {
		return nil, err
	}
	st := &api.CgroupStats{}
	kv := func(file string, f func(k string, v uint64)) {
		b, err := os.ReadFile(filepath.Join(dir, file))
		if err != nil {
			return
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			if len(fs) != 2 {
				continue
			}
			if v, err := strconv.ParseUint(fs[1], 10, 64); err == nil {
				f(fs[0], v)
			}
		}
	}
	one := func(file string) uint64 {
		s, err := readTrim(filepath.Join(dir, file))
		if err != nil || s == "max" {
			return 0
		}
		v, _ := strconv.ParseUint(s, 10, 64)
		return v
	}
	kv("cpu.stat", func(k string, v uint64) {
		switch k {
		case "usage_usec":
			st.CpuUsageUsec = v
		case "user_usec":
			st.CpuUserUsec = v
		case "system_usec":
			st.CpuSystemUsec = v
		case "nr_periods":
			st.NrPeriods = v
		case "nr_throttled":
			st.NrThrottled = v
		case "throttled_usec":
			st.ThrottledUsec = v
		}
	})
	st.MemoryCurrent = one("memory.current")
	st.MemoryPeak = one("memory.peak")
	st.MemoryMax = one("memory.max")
	kv("memory.stat", func(k string, v uint64) {
		switch k {
		case "anon":
			st.MemoryAnon = v
		case "file":
			st.MemoryFile = v
		}
	})
	kv("memory.events", func(k string, v uint64) {
		switch k {
		case "oom":
			st.Oom = v
		case "oom_kill":
			st.OomKill = v
		}
	})
	st.PidsCurrent = one("pids.current")
	st.PidsMax = one("pids.max")
	kv("pids.events", func(k string, v uint64) {
		if k == "max" {
			st.PidsEventsMax = v
		}
	})
	st.CpuQuota = -1
	if s, err := readTrim(filepath.Join(dir, "cpu.max")); err == nil {
		fs := strings.Fields(s)
		if len(fs) == 2 {
			if fs[0] != "max" {
				st.CpuQuota, _ = strconv.ParseInt(fs[0], 10, 64)
			}
			st.CpuPeriod, _ = strconv.ParseUint(fs[1], 10, 64)
		}
	}
	return st, nil
}

// cgroupProcs lists the processes of dir and every cgroup below it.
func cgroupProcs(dir string) []int {
	var pids []int
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		if err != nil {
			return nil
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				pids = append(pids, pid)
			}
		}
		return nil
	})
	return pids
}

// populated reports whether dir or a cgroup below it has a process.
func populated(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
	if err != nil {
		return false
	}
	return bytes.Contains(b, []byte("populated 1"))
}
