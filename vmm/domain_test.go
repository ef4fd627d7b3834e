package vmm

import (
	"encoding/xml"
	"errors"
	"flag"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

var update = flag.Bool("update", false, "rewrite vmm/testdata golden files")

func p[T any](v T) *T { return &v }

// testConfig is a fixed config: no file lookups, no probing.
func testConfig() Config {
	return Config{
		Kernel:     "/var/lib/rss/guest/vmlinux",
		Initrd:     "/var/lib/rss/guest/initramfs.cpio.gz",
		BaseDisk:   "/var/lib/rss/guest/base.qcow2",
		Emulator:   "/usr/bin/qemu-system-x86_64",
		DomainType: "qemu",
	}
}

const testDir = "/run/rss/sandboxes/sb1"

// info builds a ResourceInfo as resourceinfo.Compute would from
// annotations and pod linux resources.
func info(ann, lin resourceinfo.Resources) resourceinfo.ResourceInfo {
	return resourceinfo.Compute(resourceinfo.Spec{Annotations: ann, Linux: lin}, nil)
}

func TestDomainGolden(t *testing.T) {
	cases := []struct {
		name string
		id   string
		dir  string
		info resourceinfo.ResourceInfo
		cfg  func(*Config)
	}{
		{name: "none", id: "sb1", info: info(resourceinfo.Resources{}, resourceinfo.Resources{})},
		{name: "cpu", id: "sb1", info: info(resourceinfo.Resources{
			CPULimit: p(1.5), CPURequest: p(0.5),
		}, resourceinfo.Resources{})},
		{name: "memory", id: "sb1", info: info(resourceinfo.Resources{
			MemoryLimit: p(int64(256 * mib)), MemoryRequest: p(int64(128 * mib)),
		}, resourceinfo.Resources{MemorySwapLimit: p(int64(512 * mib))}),
			cfg: func(c *Config) { c.MaxMemory = 1024 * mib }},
		{name: "disk", id: "sb1", info: info(resourceinfo.Resources{
			DiskReadBps: p(int64(10 << 20)), DiskWriteBps: p(int64(5 << 20)),
			DiskReadIOPS: p(int64(1000)), DiskWriteIOPS: p(int64(500)),
			StorageLimit: p(int64(1 << 30)),
		}, resourceinfo.Resources{})},
		{name: "pids", id: "sb1", info: info(resourceinfo.Resources{PidLimit: p(int64(1000))}, resourceinfo.Resources{})},
		{name: "cpuset", id: "sb1", info: info(resourceinfo.Resources{CPULimit: p(2.0)}, resourceinfo.Resources{
			CPUSetCPUs: p("0-1,3"),
		}), cfg: func(c *Config) { c.MaxVCPUs = 4 }},
		{name: "escaping", id: "sb<&>'\"1", dir: "/run/rss/a&b <c>", info: info(resourceinfo.Resources{
			PidLimit: p(int64(10)),
		}, resourceinfo.Resources{}), cfg: func(c *Config) {
			c.Cmdline = "console=ttyS0 x=\"a&b\" <y>"
			c.Network = NetworkUser
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig()
			if tc.cfg != nil {
				tc.cfg(&cfg)
			}
			dir := tc.dir
			if dir == "" {
				dir = testDir
			}
			d, err := DomainFor(tc.id, dir, tc.info, cfg)
			if err != nil {
				t.Fatal(err)
			}
			got, err := d.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			golden := filepath.Join("testdata", tc.name+".xml")
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test ./vmm -run TestDomainGolden -update)", err)
			}
			if got != string(want) {
				t.Errorf("%s differs:\n--- got\n%s\n--- want\n%s", golden, got, want)
			}

			// Round trip: the golden file parses back to the same domain and
			// re-marshals byte for byte.
			back, err := ParseDomain(string(want))
			if err != nil {
				t.Fatal(err)
			}
			if back.Metadata == nil || back.Metadata.Sandbox == nil || back.Metadata.Sandbox.ID != tc.id ||
				back.Metadata.Sandbox.Dir != dir {
				t.Errorf("metadata after round trip: %+v", back.Metadata)
			}
			again, err := back.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			if again != string(want) {
				t.Errorf("round trip of %s differs:\n%s", golden, again)
			}
			// Well-formed XML whatever the input strings were.
			if err := xml.Unmarshal([]byte(got), new(struct{})); err != nil {
				t.Errorf("not well-formed: %v", err)
			}
		})
	}
}

func TestEscaping(t *testing.T) {
	d, err := DomainFor("a&b", "/x/<y>", info(resourceinfo.Resources{}, resourceinfo.Resources{}), testConfig())
	if err != nil {
		t.Fatal(err)
	}
	s, _ := d.Marshal()
	for _, want := range []string{"<id>a&amp;b</id>", "<dir>/x/&lt;y&gt;</dir>", "/x/&lt;y&gt;/disk.qcow2"} {
		if !strings.Contains(s, want) {
			t.Errorf("missing %q in\n%s", want, s)
		}
	}
	if strings.Contains(d.Name, "&") {
		t.Errorf("domain name %q not sanitized", d.Name)
	}
}

func TestSizeRules(t *testing.T) {
	cases := []struct {
		name     string
		r        resourceinfo.Resources
		cfg      func(*Config)
		vcpus    uint // current
		maxVCPUs uint
		memKiB   uint64 // currentMemory
		maxKiB   uint64 // memory
		period   *uint64
		quota    *int64
		shares   *uint64
		hard     uint64
		soft     uint64
		swap     uint64
		cmdline  string
	}{
		{name: "unlimited", vcpus: 1, maxVCPUs: 1, memKiB: 512 * 1024, maxKiB: 512 * 1024},
		{name: "defaults from config", cfg: func(c *Config) { c.DefaultVCPUs = 2; c.DefaultMemory = 1 << 30 },
			vcpus: 2, maxVCPUs: 2, memKiB: 1 << 20, maxKiB: 1 << 20},
		{name: "cpu 1.5", r: resourceinfo.Resources{CPULimit: p(1.5)}, vcpus: 2, maxVCPUs: 2,
			memKiB: 512 * 1024, maxKiB: 512 * 1024, period: p(uint64(100000)), quota: p(int64(150000))},
		{name: "cpu 0.1", r: resourceinfo.Resources{CPULimit: p(0.1)}, vcpus: 1, maxVCPUs: 1,
			memKiB: 512 * 1024, maxKiB: 512 * 1024, period: p(uint64(100000)), quota: p(int64(10000))},
		{name: "cpu 2 exactly", r: resourceinfo.Resources{CPULimit: p(2.0000000001)}, vcpus: 2, maxVCPUs: 2,
			memKiB: 512 * 1024, maxKiB: 512 * 1024, period: p(uint64(100000)), quota: p(int64(200000))},
		{name: "cpu with period", r: resourceinfo.Resources{CPULimit: p(0.25), CPUPeriod: p(uint64(50000))},
			vcpus: 1, maxVCPUs: 1, memKiB: 512 * 1024, maxKiB: 512 * 1024,
			period: p(uint64(50000)), quota: p(int64(12500))},
		{name: "tiny quota clamps to 1ms", r: resourceinfo.Resources{CPULimit: p(0.001)}, vcpus: 1, maxVCPUs: 1,
			memKiB: 512 * 1024, maxKiB: 512 * 1024, period: p(uint64(100000)), quota: p(int64(1000))},
		{name: "max vcpus headroom", r: resourceinfo.Resources{CPULimit: p(1.0)}, cfg: func(c *Config) { c.MaxVCPUs = 4 },
			vcpus: 1, maxVCPUs: 4, memKiB: 512 * 1024, maxKiB: 512 * 1024,
			period: p(uint64(100000)), quota: p(int64(100000))},
		{name: "shares", r: resourceinfo.Resources{CPUShares: p(uint64(512))}, vcpus: 1, maxVCPUs: 1,
			memKiB: 512 * 1024, maxKiB: 512 * 1024, shares: p(uint64(512))},
		{name: "memory 256Mi", r: resourceinfo.Resources{MemoryLimit: p(int64(256 * mib))}, vcpus: 1, maxVCPUs: 1,
			memKiB: 320 * 1024, maxKiB: 320 * 1024, hard: (320 + 256) * 1024},
		{name: "memory rounds up to MiB", r: resourceinfo.Resources{MemoryLimit: p(int64(100*mib + 1))},
			vcpus: 1, maxVCPUs: 1, memKiB: 165 * 1024, maxKiB: 165 * 1024, hard: (165 + 256) * 1024},
		{name: "memory headroom", r: resourceinfo.Resources{MemoryLimit: p(int64(256 * mib))},
			cfg: func(c *Config) { c.MaxMemory = 2 << 30 }, vcpus: 1, maxVCPUs: 1,
			memKiB: 320 * 1024, maxKiB: 2 << 20, hard: (320 + 256) * 1024},
		{name: "memory huge saturates", r: resourceinfo.Resources{MemoryLimit: p(int64(math.MaxInt64 - 10))},
			vcpus: 1, maxVCPUs: 1, memKiB: (math.MaxInt64/mib + 1) * 1024, maxKiB: (math.MaxInt64/mib + 1) * 1024,
			hard: (math.MaxInt64/mib+1)*1024 + 256*1024},
		{name: "request and swap", r: resourceinfo.Resources{
			MemoryLimit: p(int64(256 * mib)), MemoryRequest: p(int64(100 * mib)), MemorySwapLimit: p(int64(384 * mib)),
		}, vcpus: 1, maxVCPUs: 1, memKiB: 320 * 1024, maxKiB: 320 * 1024,
			hard: 576 * 1024, soft: 164 * 1024, swap: (576 + 128) * 1024},
		{name: "swap below memory means no swap", r: resourceinfo.Resources{
			MemoryLimit: p(int64(256 * mib)), MemorySwapLimit: p(int64(128 * mib)),
		}, vcpus: 1, maxVCPUs: 1, memKiB: 320 * 1024, maxKiB: 320 * 1024, hard: 576 * 1024, swap: 576 * 1024},
		{name: "pids", r: resourceinfo.Resources{PidLimit: p(int64(1000))}, vcpus: 1, maxVCPUs: 1,
			memKiB: 512 * 1024, maxKiB: 512 * 1024}, // the guest's pod cgroup holds it, not the domain
		{name: "custom port", cfg: func(c *Config) { c.ReadyPort = "x.y" }, vcpus: 1, maxVCPUs: 1,
			memKiB: 512 * 1024, maxKiB: 512 * 1024, cmdline: DefaultCmdline + " rss.port=x.y"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.DomainType = "kvm" // QEMU's own memory is QEMUOverhead alone; TCG's is TestQEMUOwnMemory's
			if tc.cfg != nil {
				tc.cfg(&cfg)
			}
			d, err := DomainFor("id", testDir, resourceinfo.ResourceInfo{Resources: tc.r}, cfg)
			if err != nil {
				t.Fatal(err)
			}
			cur := d.VCPU.Current
			if cur == 0 {
				cur = d.VCPU.Value
			}
			if cur != tc.vcpus || d.VCPU.Value != tc.maxVCPUs {
				t.Errorf("vcpus current %d max %d, want %d %d", cur, d.VCPU.Value, tc.vcpus, tc.maxVCPUs)
			}
			if d.CurrentMemory.Value != tc.memKiB || d.Memory.Value != tc.maxKiB {
				t.Errorf("memory current %d max %d KiB, want %d %d", d.CurrentMemory.Value, d.Memory.Value, tc.memKiB, tc.maxKiB)
			}
			var period *uint64
			var quota *int64
			var shares *uint64
			if d.CPUTune != nil {
				period, quota, shares = d.CPUTune.GlobalPeriod, d.CPUTune.GlobalQuota, d.CPUTune.Shares
				if d.CPUTune.Quota != nil || d.CPUTune.Period != nil {
					t.Errorf("per-vcpu quota set: the quota is global")
				}
			}
			if !eqPtr(period, tc.period) || !eqPtr(quota, tc.quota) || !eqPtr(shares, tc.shares) {
				t.Errorf("cputune period %v quota %v shares %v, want %v %v %v",
					deref(period), deref(quota), deref(shares), deref(tc.period), deref(tc.quota), deref(tc.shares))
			}
			var hard, soft, swap uint64
			if d.MemTune != nil {
				hard, soft, swap = val(d.MemTune.HardLimit), val(d.MemTune.SoftLimit), val(d.MemTune.SwapHardLimit)
			}
			if hard != tc.hard || soft != tc.soft || swap != tc.swap {
				t.Errorf("memtune hard %d soft %d swap %d, want %d %d %d", hard, soft, swap, tc.hard, tc.soft, tc.swap)
			}
			want := tc.cmdline
			if want == "" {
				want = DefaultCmdline
			}
			if d.OS.Cmdline != want {
				t.Errorf("cmdline %q, want %q", d.OS.Cmdline, want)
			}
			// SplitLive moves hard and swap out, leaves soft.
			lt := d.SplitLive()
			if lt.HardLimitKiB != tc.hard || lt.SwapHardLimitKiB != tc.swap {
				t.Errorf("SplitLive %+v", lt)
			}
			if d.MemTune != nil && (d.MemTune.HardLimit != nil || d.MemTune.SwapHardLimit != nil || val(d.MemTune.SoftLimit) != tc.soft) {
				t.Errorf("memtune after SplitLive %+v", d.MemTune)
			}
		})
	}
}

func TestDomainForInvalid(t *testing.T) {
	cases := map[string]resourceinfo.Resources{
		"negative cpu":    {CPULimit: p(-1.0)},
		"nan cpu":         {CPULimit: p(math.NaN())},
		"bad cpuset":      {CPUSetCPUs: p("0-1'/><x")},
		"negative memory": {MemoryLimit: p(int64(-1))},
		"negative iops":   {DiskReadIOPS: p(int64(-5))},
	}
	for name, r := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := DomainFor("id", testDir, resourceinfo.ResourceInfo{Resources: r}, testConfig())
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("err = %v, want invalid argument", err)
			}
		})
	}
	if _, err := DomainFor("id", "relative", resourceinfo.ResourceInfo{}, testConfig()); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("relative dir: %v", err)
	}
	cfg := testConfig()
	cfg.Network = "bridge"
	if _, err := DomainFor("id", testDir, resourceinfo.ResourceInfo{}, cfg); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("bad network: %v", err)
	}
}

func TestNames(t *testing.T) {
	if got := DomainName("rss-", "abc123"); got != "rss-abc123" {
		t.Errorf("plain id: %s", got)
	}
	long := strings.Repeat("a", 64)
	if got := DomainName("rss-", long); got != "rss-"+long {
		t.Errorf("64-char id: %s", got)
	}
	for _, id := range []string{"a/b", "a b", strings.Repeat("x", 70), "-x", "a<b"} {
		got := DomainName("rss-", id)
		if !strings.HasPrefix(got, "rss-h-") || len(got) != len("rss-h-")+24 {
			t.Errorf("DomainName(%q) = %q", id, got)
		}
	}
	if n := TapName(long); len(n) > 15 || !strings.HasPrefix(n, "rsv") {
		t.Errorf("tap %q", n)
	}
	if n := IFBName(long); len(n) > 15 || n == TapName(long) {
		t.Errorf("ifb %q", n)
	}
	if macFor("a") == macFor("b") || !strings.HasPrefix(macFor("a"), "52:54:00:") {
		t.Errorf("mac")
	}
	for s, ok := range map[string]bool{"0": true, "0-3": true, "0-1,3,5-7": true, "": false, "a": false, "0,": false, "1-": false} {
		if ValidCPUSet(s) != ok {
			t.Errorf("ValidCPUSet(%q) != %v", s, ok)
		}
	}
}

func deref[T any](p *T) any {
	if p == nil {
		return "nil"
	}
	return *p
}

func val(m *Memory) uint64 {
	if m == nil {
		return 0
	}
	return m.Value
}

func TestAgentSocketPath(t *testing.T) {
	if got := AgentSocketPath("/var/lib/x/sb1", "/run/s"); got != "/var/lib/x/sb1/agent.sock" {
		t.Errorf("short dir: %s", got)
	}
	deep := "/var/lib/kuasar-resource-vm/" + strings.Repeat("a", 64) + "/x"
	got := AgentSocketPath(deep, "/run/s")
	if !strings.HasPrefix(got, "/run/s/") || !strings.HasSuffix(got, ".sock") || len(got) > maxSocketPath {
		t.Errorf("deep dir: %s", got)
	}
	if got == AgentSocketPath(deep+"y", "/run/s") {
		t.Errorf("two deep dirs share a socket")
	}
	d, err := DomainFor("sb1", deep, resourceinfo.ResourceInfo{}, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	if src := d.Devices.Channels[1].Source; src.Path != AgentSocketPath(deep, "/run/resource-slot-sandboxer/vm") || src.Mode != "bind" {
		t.Errorf("agent channel %+v", src)
	}
}

func TestQEMUOwnMemory(t *testing.T) {
	r := resourceinfo.Resources{MemoryLimit: p(int64(256 * mib))}
	for _, tc := range []struct {
		desc    string
		typ     string
		images  int64
		hardMiB uint64
		tbCache bool
	}{
		{desc: "kvm: guest + QEMUOverhead", typ: "kvm", images: 70 * mib, hardMiB: 320 + 256},
		{desc: "tcg: + translation cache + boot images", typ: "qemu", images: 70 * mib, hardMiB: 320 + 256 + 128 + 70, tbCache: true},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			cfg := testConfig()
			cfg.DomainType, cfg.BootImages = tc.typ, tc.images
			d, err := DomainFor("id", testDir, resourceinfo.ResourceInfo{Resources: r}, cfg)
			if err != nil {
				t.Fatal(err)
			}
			if got := d.MemTune.HardLimit.Value; got != tc.hardMiB*1024 {
				t.Errorf("hard_limit %d KiB, want %d MiB", got, tc.hardMiB)
			}
			if got := d.Features.TCG != nil; got != tc.tbCache {
				t.Errorf("tcg tb-cache set: %v", got)
			} else if got && d.Features.TCG.TBCache.Value != 128 {
				t.Errorf("tb-cache %d MiB", d.Features.TCG.TBCache.Value)
			}
		})
	}
}
