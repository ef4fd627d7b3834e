package capacity

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
)

// Files the host's capacity is read from; tests replace them.
var (
	meminfoPath = "/proc/meminfo"
	pidMaxPath  = "/proc/sys/kernel/pid_max"
)

// HostCapacity is what the host has.
type HostCapacity struct {
	CPU    float64 // runtime.NumCPU: the CPUs this process may run on
	Memory int64   // MemTotal of /proc/meminfo, bytes
	Pids   int64   // /proc/sys/kernel/pid_max
}

// Host reads the host's capacity.
func Host() (HostCapacity, error) {
	h := HostCapacity{CPU: float64(runtime.NumCPU())}
	mem, err := memTotal(meminfoPath)
	if err != nil {
		return h, err
	}
	h.Memory = mem
	data, err := os.ReadFile(pidMaxPath)
	if err != nil {
		return h, err
	}
	if h.Pids, err = strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64); err != nil || h.Pids <= 0 {
		return h, fmt.Errorf("%s: not a positive number: %q", pidMaxPath, strings.TrimSpace(string(data)))
	}
	return h, nil
}

// memTotal reads "MemTotal: <n> kB" from a meminfo file.
func memTotal(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "MemTotal:" {
			continue
		}
		n, err := strconv.ParseInt(fields[1], 10, 64)
		if err != nil || n <= 0 {
			return 0, fmt.Errorf("%s: bad MemTotal %q", path, fields[1])
		}
		if len(fields) > 2 && fields[2] == "kB" {
			n *= 1024
		}
		return n, nil
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("%s: no MemTotal", path)
}
