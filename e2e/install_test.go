package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// make runs a target of the repository's Makefile.
func makeTarget(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command("make", append([]string{"-s", "--no-print-directory", "-C", h.root}, args...)...)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "make %s:\n%s", strings.Join(args, " "), out)
	return string(out)
}

// files reads every file under root, by path relative to it.
func files(t *testing.T, root string) map[string]string {
	t.Helper()
	m := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(p)
		rel, _ := filepath.Rel(root, p)
		m[rel] = string(data)
		return err
	})
	require.NoError(t, err)
	return m
}

// TestInstallStaged installs into a DESTDIR: twice is once, and
// uninstall leaves no file behind.
func TestInstallStaged(t *testing.T) {
	dest := t.TempDir()
	makeTarget(t, "install", "DESTDIR="+dest, "PREFIX=/opt/rss")
	once := files(t, dest)
	for _, f := range []string{
		"opt/rss/bin/resource-slot-sandboxer", "opt/rss/bin/containerd-shim-resource-slot-v1", "opt/rss/bin/slotctl",
		"etc/systemd/system/kuasar-resource-slot.service", "etc/containerd/conf.d/resource-slot.toml",
		"etc/containerd/config.toml", "etc/kuasar-resource-slot/k8s/runtime-class.yaml",
	} {
		assert.Contains(t, once, f)
	}
	assert.Contains(t, once["etc/containerd/conf.d/resource-slot.toml"], `runtime_path = "/opt/rss/bin/containerd-shim-resource-slot-v1"`, "PREFIX, without DESTDIR")
	assert.Contains(t, once["etc/containerd/config.toml"], `imports = ["/etc/containerd/conf.d/resource-slot.toml"]`)
	assert.Contains(t, once["etc/systemd/system/kuasar-resource-slot.service"], "/opt/rss/bin/resource-slot-sandboxer")
	makeTarget(t, "install", "DESTDIR="+dest, "PREFIX=/opt/rss")
	assert.Equal(t, once, files(t, dest), "install twice = once")
	makeTarget(t, "uninstall", "DESTDIR="+dest, "PREFIX=/opt/rss")
	assert.Empty(t, files(t, dest), "uninstall removes every file")
}

// installNode is a containerd started with the configuration
// `containerd config default` prints, with its paths moved under base.
type installNode struct {
	t      *testing.T
	base   string
	config string
	cmd    *exec.Cmd
	sb     *exec.Cmd
}

func (n *installNode) sock() string   { return filepath.Join(n.base, "run", "containerd.sock") }
func (n *installNode) sbSock() string { return filepath.Join(n.base, "sb.sock") }
func (n *installNode) conf(p string) string {
	return filepath.Join(n.base, "etc", "containerd", p)
}

// defaultConfig is `containerd config default`, with what it would share
// with the host's containerd moved under base: root, state, sockets
// (containerd's, NRI's), /opt/containerd and the imports glob.
func (n *installNode) defaultConfig() string {
	out, err := exec.Command("containerd", "config", "default").Output()
	require.NoError(n.t, err)
	cfg := string(out)
	require.Contains(n.t, cfg, "imports = ['/etc/containerd/conf.d/*.toml']", "containerd 2.4's default imports conf.d")
	for _, r := range [][2]string{
		{"'/var/lib/containerd'", "'" + filepath.Join(n.base, "root") + "'"},
		{"'/run/containerd/containerd.sock", "'" + n.sock()},
		{"'/run/containerd'", "'" + filepath.Join(n.base, "state") + "'"},
		{"'/etc/containerd/conf.d/", "'" + n.conf("conf.d") + "/"},
		{"'/opt/containerd", "'" + filepath.Join(n.base, "opt")},
		{"'/var/run/nri/nri.sock'", "'" + filepath.Join(n.base, "nri.sock") + "'"},
	} {
		require.Contains(n.t, cfg, r[0])
		cfg = strings.ReplaceAll(cfg, r[0], r[1])
	}
	return cfg
}

func (n *installNode) start() {
	t := n.t
	t.Helper()
	logf, err := os.OpenFile(filepath.Join(n.base, "containerd.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	require.NoError(t, err)
	defer logf.Close()
	cmd := exec.Command("containerd", "--config", n.config)
	cmd.Stdout, cmd.Stderr, cmd.Dir = logf, logf, "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	require.NoError(t, cmd.Start())
	n.cmd = cmd
	go cmd.Wait()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", n.sock()); err == nil {
			c.Close()
			if n.runtimes() != nil {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not come up:\n%s", tailFile(filepath.Join(n.base, "containerd.log"), 30))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (n *installNode) stop() {
	if n.cmd == nil {
		return
	}
	n.cmd.Process.Signal(syscall.SIGTERM)
	deadline := time.Now().Add(15 * time.Second)
	for syscall.Kill(n.cmd.Process.Pid, 0) == nil && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	n.cmd.Process.Kill()
	n.cmd = nil
}

// runtimes are the CRI runtime handlers containerd has (crictl info),
// nil while its CRI is not up.
func (n *installNode) runtimes() map[string]any {
	out, err := exec.Command("crictl", "--runtime-endpoint", "unix://"+n.sock(), "--timeout", "5s", "info").Output()
	if err != nil {
		return nil
	}
	var info struct {
		Config struct {
			Containerd struct {
				Runtimes map[string]any `json:"runtimes"`
			} `json:"containerd"`
		} `json:"config"`
	}
	if json.Unmarshal(out, &info) != nil {
		return nil
	}
	return info.Config.Containerd.Runtimes
}

// TestInstallContainerd adds the drop-in to a containerd started with
// the configuration `containerd config default` prints (which imports
// conf.d/*.toml) and to the same without its imports line (what a
// containerd before 2.4 prints): twice is once, containerd gets the
// runtime handlers resource-slot and resource-vm and runs a pod with
// the first, and uninstall puts config.toml back byte for byte.
func TestInstallContainerd(t *testing.T) {
	for _, tc := range []struct {
		desc      string
		noImports bool
	}{
		{desc: "containerd config default"},
		{desc: "without imports", noImports: true},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			base, err := os.MkdirTemp("", "rss-in-")
			require.NoError(t, err)
			n := &installNode{t: t, base: base, config: filepath.Join(base, "etc", "containerd", "config.toml")}
			t.Cleanup(func() {
				n.stop()
				stopDaemon(n.sb, syscall.SIGTERM)
				for _, pid := range pidsWithArg("serve --socket " + filepath.Join(base, "sb-task.sock")) {
					syscall.Kill(pid, syscall.SIGTERM)
				}
				for _, m := range mountsUnder(base) {
					syscall.Unmount(m, syscall.MNT_DETACH)
				}
				if t.Failed() {
					fmt.Fprintf(os.Stderr, "==> containerd.log\n%s\n", tailFile(filepath.Join(base, "containerd.log"), 40))
				}
				os.RemoveAll(base)
			})
			require.NoError(t, os.MkdirAll(n.conf("conf.d"), 0o755))
			cfg := n.defaultConfig()
			if tc.noImports {
				cfg = strings.Replace(cfg, "imports = ['"+n.conf("conf.d")+"/*.toml']\n", "", 1)
			}
			require.NoError(t, os.WriteFile(n.config, []byte(cfg), 0o644))

			sbCfg := filepath.Join(base, "sb.toml")
			require.NoError(t, os.WriteFile(sbCfg, []byte(fmt.Sprintf("listen = %q\ndir = %q\ncontainerd_address = %q\n",
				n.sbSock(), filepath.Join(base, "state-sb"), n.sock()+".ttrpc")), 0o600))
			n.sb, err = startDaemon(h.bin, sbCfg, filepath.Join(base, "sb.log"), n.sbSock(), filepath.Join(base, "sb-task.sock"))
			require.NoError(t, err)

			vars := []string{
				"CONTAINERD_CONFIG=" + n.config, "CONTAINERD_DROPIN=" + n.conf("conf.d/resource-slot.toml"),
				"SLOT_SOCKET=" + n.sbSock(), "VM_SOCKET=" + filepath.Join(base, "vm.sock"), "PREFIX=" + filepath.Dir(h.bin),
			}
			makeTarget(t, append([]string{"install-containerd"}, vars...)...)
			once := files(t, filepath.Join(base, "etc"))
			makeTarget(t, append([]string{"install-containerd"}, vars...)...)
			assert.Equal(t, once, files(t, filepath.Join(base, "etc")), "install twice = once")
			installed, _ := os.ReadFile(n.config)
			if tc.noImports {
				assert.Contains(t, string(installed), `imports = ["`+n.conf("conf.d/resource-slot.toml")+`"]`)
			} else {
				assert.Equal(t, cfg, string(installed), "config.toml imports conf.d already: unchanged")
			}

			n.start()
			rt := n.runtimes()
			require.Contains(t, rt, "resource-slot")
			require.Contains(t, rt, "resource-vm")
			require.Contains(t, rt, "runc", "the operator's runtimes stay")
			assert.Equal(t, "resource-slot", rt["resource-slot"].(map[string]any)["sandboxer"])
			assert.Equal(t, filepath.Join(h.bin, "containerd-shim-resource-slot-v1"), rt["resource-slot"].(map[string]any)["runtimePath"])

			// A pod and a container through the installed handler.
			conn, err := grpc.NewClient("unix://"+n.sock(), grpc.WithTransportCredentials(insecure.NewCredentials()))
			require.NoError(t, err)
			defer conn.Close()
			cri := runtime.NewRuntimeServiceClient(conn)
			ctx := context.Background()
			pod := podConfig("installed", map[string]string{"resources.limits.cpu": "1"}, nil)
			resp, err := cri.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: pod, RuntimeHandler: "resource-slot"})
			require.NoError(t, err)
			data, err := os.ReadFile(filepath.Join(base, "state-sb", resp.PodSandboxId, "resource_info.json"))
			require.NoError(t, err)
			assert.Contains(t, string(data), `"cpu_limit": 1`)
			_, err = cri.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: resp.PodSandboxId})
			require.NoError(t, err)
			_, err = cri.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: resp.PodSandboxId})
			require.NoError(t, err)
			n.stop()

			makeTarget(t, append([]string{"uninstall-containerd"}, vars...)...)
			restored, err := os.ReadFile(n.config)
			require.NoError(t, err)
			assert.Equal(t, cfg, string(restored), "uninstall restores config.toml byte for byte")
			assert.NoFileExists(t, n.conf("conf.d/resource-slot.toml"))
			entries, _ := os.ReadDir(n.conf("conf.d"))
			assert.Empty(t, entries, "nothing left in conf.d")
			n.start()
			rt = n.runtimes()
			assert.NotContains(t, rt, "resource-slot")
			assert.Contains(t, rt, "runc")
		})
	}
}
