package dropin

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/pelletier/go-toml/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const (
	configPath = "/etc/containerd/config.toml"
	dropinPath = "/etc/containerd/conf.d/resource-slot.toml"
)

// tree reads every file under root, by path.
func tree(t *testing.T, root string) map[string]string {
	t.Helper()
	files := map[string]string{}
	require.NoError(t, filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(p)
		rel, _ := filepath.Rel(root, p)
		files[rel] = string(data)
		return err
	}))
	return files
}

func TestInstallUninstall(t *testing.T) {
	for _, tc := range []struct {
		desc   string
		config *string // nil: no config.toml
		// wantConfig is config.toml after install; "" means unchanged.
		wantConfig string
	}{
		{
			// containerd 2.4's `containerd config default` (version 4)
			// imports conf.d/*.toml already.
			desc:   "default config imports conf.d",
			config: ptr("version = 4\nroot = '/var/lib/containerd'\nimports = ['/etc/containerd/conf.d/*.toml']\n\n[debug]\n  level = ''\n"),
		},
		{
			desc:   "relative glob",
			config: ptr("version = 3\nimports = [\"conf.d/*.toml\"]\n"),
		},
		{
			desc:   "the drop-in itself",
			config: ptr("version = 3\nimports = [\"/etc/containerd/conf.d/resource-slot.toml\"]\n"),
		},
		{
			// containerd 2.0-2.3 print version 3 without imports.
			desc:       "version 3 without imports",
			config:     ptr("version = 3\nroot = \"/var/lib/containerd\"\n\n[plugins]\n  [plugins.'io.containerd.cri.v1.runtime']\n    x = 1\n"),
			wantConfig: "version = 3\nimports = [\"/etc/containerd/conf.d/resource-slot.toml\"]\nroot = \"/var/lib/containerd\"\n\n[plugins]\n  [plugins.'io.containerd.cri.v1.runtime']\n    x = 1\n",
		},
		{
			desc:       "no version",
			config:     ptr("root = \"/var/lib/containerd\"\n"),
			wantConfig: "imports = [\"/etc/containerd/conf.d/resource-slot.toml\"]\nroot = \"/var/lib/containerd\"\n",
		},
		{
			desc:       "version on the last line without newline",
			config:     ptr("# mine\nversion = 3"),
			wantConfig: "# mine\nversion = 3\nimports = [\"/etc/containerd/conf.d/resource-slot.toml\"]",
		},
		{
			desc:       "other imports",
			config:     ptr("version = 3\nimports = ['/etc/containerd/other.toml'] # mine\n[grpc]\n"),
			wantConfig: "version = 3\nimports = ['/etc/containerd/other.toml', \"/etc/containerd/conf.d/resource-slot.toml\"] # mine\n[grpc]\n",
		},
		{
			desc:       "empty imports",
			config:     ptr("version = 3\nimports = []\n"),
			wantConfig: "version = 3\nimports = [\"/etc/containerd/conf.d/resource-slot.toml\"]\n",
		},
		{
			desc:       "multi-line imports with a trailing comma and comments",
			config:     ptr("version = 3\nimports = [\n  \"/a.toml\", # first ]\n  '/b].toml',\n]\n[x]\nimports = 1\n"),
			wantConfig: "version = 3\nimports = [\n  \"/a.toml\", # first ]\n  '/b].toml',\n \"/etc/containerd/conf.d/resource-slot.toml\"]\n[x]\nimports = 1\n",
		},
		{
			desc:       "an imports key in a table is not the top-level one",
			config:     ptr("version = 3\n[plugins.x]\nimports = ['/etc/containerd/conf.d/*.toml']\n"),
			wantConfig: "version = 3\nimports = [\"/etc/containerd/conf.d/resource-slot.toml\"]\n[plugins.x]\nimports = ['/etc/containerd/conf.d/*.toml']\n",
		},
		{
			desc:       "no config.toml",
			wantConfig: "# Created by resource-slot-sandboxer's make install (make uninstall removes\n# it): containerd reads imports only from a config file.\nversion = 3\nimports = [\"/etc/containerd/conf.d/resource-slot.toml\"]\n",
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			root := t.TempDir()
			o := Options{Root: root, Config: configPath, Dropin: dropinPath}
			if tc.config != nil {
				require.NoError(t, os.MkdirAll(filepath.Dir(o.path(configPath)), 0o755))
				require.NoError(t, os.WriteFile(o.path(configPath), []byte(*tc.config), 0o640))
			}
			before := tree(t, root)
			content := Content("/run/slot.sock", "/run/vm.sock", "/usr/local/bin/containerd-shim-resource-slot-v1")

			did, err := Install(o, content)
			require.NoError(t, err)
			assert.NotEmpty(t, did)
			got, err := os.ReadFile(o.path(dropinPath))
			require.NoError(t, err)
			assert.Equal(t, string(content), string(got))
			cfg, err := os.ReadFile(o.path(configPath))
			require.NoError(t, err)
			if tc.wantConfig == "" {
				assert.Equal(t, *tc.config, string(cfg), "config.toml unchanged")
			} else {
				assert.Equal(t, tc.wantConfig, string(cfg))
			}
			ok, err := imports(cfg, configPath, dropinPath)
			require.NoError(t, err)
			assert.True(t, ok, "config.toml imports the drop-in")
			if tc.config != nil {
				fi, err := os.Stat(o.path(configPath))
				require.NoError(t, err)
				assert.Equal(t, os.FileMode(0o640), fi.Mode().Perm(), "the mode is kept")
			}

			// Twice is once.
			installed := tree(t, root)
			did, err = Install(o, content)
			require.NoError(t, err)
			assert.Empty(t, did)
			assert.Equal(t, installed, tree(t, root))

			// Uninstall puts everything back, twice too.
			_, err = Uninstall(o)
			require.NoError(t, err)
			assert.Equal(t, before, tree(t, root))
			did, err = Uninstall(o)
			require.NoError(t, err)
			assert.Empty(t, did)
			assert.Equal(t, before, tree(t, root))
		})
	}
}

func TestUninstallKeepsLaterEdits(t *testing.T) {
	root := t.TempDir()
	o := Options{Root: root, Config: configPath, Dropin: dropinPath}
	require.NoError(t, os.MkdirAll(filepath.Dir(o.path(configPath)), 0o755))
	require.NoError(t, os.WriteFile(o.path(configPath), []byte("version = 3\n[grpc]\n"), 0o644))
	_, err := Install(o, Content("/s", "/v", "/shim"))
	require.NoError(t, err)

	// The operator adds something elsewhere: uninstall still restores our part.
	cfg, _ := os.ReadFile(o.path(configPath))
	require.NoError(t, os.WriteFile(o.path(configPath), append(cfg, "  address = \"/x\"\n"...), 0o644))
	_, err = Uninstall(o)
	require.NoError(t, err)
	cfg, _ = os.ReadFile(o.path(configPath))
	assert.Equal(t, "version = 3\n[grpc]\n  address = \"/x\"\n", string(cfg))

	// The operator rewrote the imports line: uninstall says so and leaves it.
	_, err = Install(o, Content("/s", "/v", "/shim"))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(o.path(configPath), []byte("version = 3\nimports = [\"/mine.toml\", \"/etc/containerd/conf.d/resource-slot.toml\"]\n"), 0o644))
	_, err = Uninstall(o)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "remove it by hand")
	_, err = os.Stat(o.path(dropinPath))
	assert.True(t, os.IsNotExist(err), "the drop-in is removed all the same")
}

func TestInstallRefuses(t *testing.T) {
	root := t.TempDir()
	o := Options{Root: root, Config: configPath, Dropin: dropinPath}
	require.NoError(t, os.MkdirAll(filepath.Dir(o.path(configPath)), 0o755))
	require.NoError(t, os.WriteFile(o.path(configPath), []byte("version = [\n"), 0o644))
	_, err := Install(o, Content("/s", "/v", "/shim"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "not valid TOML")
	cfg, _ := os.ReadFile(o.path(configPath))
	assert.Equal(t, "version = [\n", string(cfg), "a config it cannot read is left alone")

	_, err = Install(Options{Root: root, Config: "etc/config.toml", Dropin: dropinPath}, Content("/s", "/v", "/shim"))
	assert.Error(t, err, "relative paths")
	_, err = Install(o, []byte("x = ["))
	assert.Error(t, err, "a broken drop-in")
}

func TestContent(t *testing.T) {
	var cfg struct {
		Version      int `toml:"version"`
		ProxyPlugins map[string]struct {
			Type    string `toml:"type"`
			Address string `toml:"address"`
		} `toml:"proxy_plugins"`
		Plugins map[string]struct {
			Containerd struct {
				Runtimes map[string]map[string]any `toml:"runtimes"`
			} `toml:"containerd"`
		} `toml:"plugins"`
	}
	require.NoError(t, toml.Unmarshal(Content("/run/a.sock", "/run/b \"q\".sock", "/opt/bin/shim"), &cfg))
	assert.Equal(t, 3, cfg.Version)
	assert.Equal(t, "sandbox", cfg.ProxyPlugins["resource-slot"].Type)
	assert.Equal(t, "/run/a.sock", cfg.ProxyPlugins["resource-slot"].Address)
	assert.Equal(t, "/run/b \"q\".sock", cfg.ProxyPlugins["resource-vm"].Address)
	rt := cfg.Plugins["io.containerd.cri.v1.runtime"].Containerd.Runtimes
	for _, name := range []string{"resource-slot", "resource-vm"} {
		assert.Equal(t, name, rt[name]["sandboxer"])
		assert.Equal(t, "io.containerd.resource-slot.v1", rt[name]["runtime_type"])
		assert.Equal(t, "/opt/bin/shim", rt[name]["runtime_path"])
		assert.Equal(t, true, rt[name]["disable_pause_image_pull"])
	}
}

func ptr(s string) *string { return &s }
