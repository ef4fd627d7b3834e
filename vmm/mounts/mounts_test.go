package mounts

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("RSS_E2E") != "" {
			t.Fatal("the mount tests need root")
		}
		t.Skip("the mount tests need root")
	}
}

// sandboxDir is a sandbox directory whose mounts are all gone when the
// test ends, whatever it did.
func sandboxDir(t *testing.T) string {
	t.Helper()
	needRoot(t)
	dir := t.TempDir()
	t.Cleanup(func() {
		ms, _ := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
		for i := len(ms) - 1; i >= 0; i-- {
			_ = unix.Unmount(ms[i].Mountpoint, unix.MNT_DETACH)
		}
	})
	return dir
}

func mountsBelow(t *testing.T, p string) []*mountinfo.Info {
	t.Helper()
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(p))
	require.NoError(t, err)
	return ms
}

func mountAt(t *testing.T, ms []*mountinfo.Info, p string) *mountinfo.Info {
	t.Helper()
	for _, m := range ms {
		if m.Mountpoint == p {
			return m
		}
	}
	t.Fatalf("nothing mounted at %s", p)
	return nil
}

func hasOpt(opts, o string) bool {
	for _, x := range strings.Split(opts, ",") {
		if x == o {
			return true
		}
	}
	return false
}

// slaveNamespace starts a process in a mount namespace of its own whose
// mounts are slaves of the host's, as virtiofsd's are, and returns its
// mountinfo reader.
func slaveNamespace(t *testing.T) func(prefix string) []*mountinfo.Info {
	t.Helper()
	cmd := exec.Command("unshare", "-m", "--propagation", "slave", "sleep", "600")
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	pid := cmd.Process.Pid
	// Wait until it runs in its own namespace.
	self, _ := os.Readlink("/proc/self/ns/mnt")
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		ns, _ := os.Readlink("/proc/" + strconv.Itoa(pid) + "/ns/mnt")
		if ns != "" && ns != self {
			break
		}
		require.True(t, time.Now().Before(deadline), "unshare did not enter a new mount namespace")
	}
	return func(prefix string) []*mountinfo.Info {
		f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/mountinfo")
		require.NoError(t, err)
		defer f.Close()
		ms, err := mountinfo.GetMountsFromReader(f, mountinfo.PrefixFilter(prefix))
		require.NoError(t, err)
		return ms
	}
}

func TestSetupTeardown(t *testing.T) {
	dir := sandboxDir(t)
	require.NoError(t, Setup(dir))
	require.NoError(t, Setup(dir), "Setup is idempotent")
	work, export := filepath.Join(dir, WorkDir), filepath.Join(dir, ExportDir)

	ms := mountsBelow(t, dir)
	require.Len(t, ms, 2, "one mount each for the work and the export dir")
	w, e := mountAt(t, ms, work), mountAt(t, ms, export)
	assert.Contains(t, w.Optional, "shared:", "the work dir propagates")
	assert.Equal(t, w.Optional, e.Optional, "the export is in the work dir's peer group")
	assert.True(t, hasOpt(e.Options, "ro"), "the export is read-only: %s", e.Options)
	assert.True(t, hasOpt(w.Options, "rw"), "the work dir is writable: %s", w.Options)

	// The guest's view cannot be written to; the host's can.
	err := os.WriteFile(filepath.Join(export, "x"), nil, 0o644)
	assert.True(t, errors.Is(err, syscall.EROFS), "write to the export: %v", err)
	require.NoError(t, os.WriteFile(filepath.Join(work, "x"), []byte("1"), 0o644))
	data, err := os.ReadFile(filepath.Join(export, "x"))
	require.NoError(t, err)
	assert.Equal(t, "1", string(data))

	require.NoError(t, Teardown(dir))
	require.NoError(t, Teardown(dir), "Teardown is idempotent")
	assert.Empty(t, mountsBelow(t, dir))
	for _, d := range []string{work, export} {
		_, err := os.Lstat(d)
		assert.True(t, os.IsNotExist(err), "%s removed: %v", d, err)
	}
}

func TestAddRemoveContainer(t *testing.T) {
	dir := sandboxDir(t)
	require.NoError(t, Setup(dir))
	t.Cleanup(func() { _ = Teardown(dir) })
	work, export := filepath.Join(dir, WorkDir), filepath.Join(dir, ExportDir)
	// virtiofsd's namespace exists before the container does.
	guest := slaveNamespace(t)

	src := t.TempDir()
	roDir, rwFile, tree := filepath.Join(src, "ro"), filepath.Join(src, "hosts"), filepath.Join(src, "tree")
	require.NoError(t, os.Mkdir(roDir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(roDir, "f"), []byte("ro"), 0o644))
	require.NoError(t, os.WriteFile(rwFile, []byte("127.0.0.1 localhost\n"), 0o644))
	require.NoError(t, os.MkdirAll(filepath.Join(tree, "sub"), 0o755))
	require.NoError(t, unix.Mount("tmpfs", filepath.Join(tree, "sub"), "tmpfs", 0, "size=1m"))
	t.Cleanup(func() { _ = unix.Unmount(filepath.Join(tree, "sub"), unix.MNT_DETACH) })
	require.NoError(t, os.WriteFile(filepath.Join(tree, "sub", "deep"), []byte("deep"), 0o644))

	p, err := AddContainer(dir, "c1", []mount.Mount{{Type: "tmpfs", Source: "tmpfs", Options: []string{"size=4m"}}}, "", []Bind{
		{Source: roDir, ReadOnly: true},
		{Source: rwFile},
		{Source: tree, Recursive: true, NoExec: true},
		{Source: tree, Recursive: true, ReadOnly: true},
		{Source: tree, Recursive: true, RecursiveReadOnly: true},
	})
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(work, "c1", "rootfs"), p.HostRootfs)
	assert.Equal(t, "/run/rss/shared/c1/rootfs", p.GuestRootfs)
	assert.Len(t, p.GuestBinds, 5)
	assert.Equal(t, []string{"/run/rss/shared/c1/mounts/0", "/run/rss/shared/c1/mounts/1", "/run/rss/shared/c1/mounts/2"}, p.GuestBinds[:3])

	// "ro" makes the bind read-only, not the submounts it carries; "rro"
	// makes them all read-only (as in the guest's runc).
	for i, wantSubRO := range map[int]bool{3: false, 4: true} {
		err := os.WriteFile(filepath.Join(export, "c1", "mounts", strconv.Itoa(i), "g"), nil, 0o644)
		assert.True(t, errors.Is(err, syscall.EROFS), "the bind %d itself is read-only: %v", i, err)
		err = os.WriteFile(filepath.Join(export, "c1", "mounts", strconv.Itoa(i), "sub", "g"), nil, 0o644)
		assert.Equal(t, wantSubRO, errors.Is(err, syscall.EROFS), "the submount of bind %d: %v", i, err)
	}

	// The rootfs is writable through the export (a mount of its own).
	require.NoError(t, os.WriteFile(filepath.Join(export, "c1", "rootfs", "hello"), []byte("hi"), 0o644))
	data, err := os.ReadFile(filepath.Join(p.HostRootfs, "hello"))
	require.NoError(t, err)
	assert.Equal(t, "hi", string(data))

	// The read-only bind is read-only on the host, on the export and in
	// the slave namespace; the others are writable.
	for _, base := range []string{work, export} {
		err := os.WriteFile(filepath.Join(base, "c1", "mounts", "0", "g"), nil, 0o644)
		assert.True(t, errors.Is(err, syscall.EROFS), "write to the read-only bind below %s: %v", base, err)
		data, err := os.ReadFile(filepath.Join(base, "c1", "mounts", "2", "sub", "deep"))
		require.NoError(t, err, "rbind carries submounts below %s", base)
		assert.Equal(t, "deep", string(data))
	}
	require.NoError(t, os.WriteFile(filepath.Join(export, "c1", "mounts", "1"), []byte("10.0.0.1 x\n"), 0o644))
	data, err = os.ReadFile(rwFile)
	require.NoError(t, err)
	assert.Equal(t, "10.0.0.1 x\n", string(data), "a read-write file bind writes through")

	gms := guest(export)
	for _, m := range gms {
		t.Logf("guest ns: %s %s", m.Mountpoint, m.Options)
	}
	assert.True(t, hasOpt(mountAt(t, gms, filepath.Join(export, "c1", "mounts", "0")).Options, "ro"),
		"virtiofsd's copy of the read-only bind is read-only")
	assert.True(t, hasOpt(mountAt(t, gms, filepath.Join(export, "c1", "mounts", "1")).Options, "rw"))
	assert.True(t, hasOpt(mountAt(t, gms, filepath.Join(export, "c1", "mounts", "2")).Options, "noexec"))
	mountAt(t, gms, filepath.Join(export, "c1", "mounts", "2", "sub"))
	mountAt(t, gms, filepath.Join(export, "c1", "rootfs"))

	ids, err := Containers(dir)
	require.NoError(t, err)
	assert.Equal(t, []string{"c1"}, ids)

	require.NoError(t, RemoveContainer(dir, "c1"))
	require.NoError(t, RemoveContainer(dir, "c1"), "RemoveContainer is idempotent")
	for _, m := range mountsBelow(t, dir) {
		assert.Contains(t, []string{work, export}, m.Mountpoint, "left mounted on the host")
	}
	for _, m := range guest(dir) {
		assert.Contains(t, []string{work, export}, m.Mountpoint, "left mounted in the guest's namespace")
	}
	_, err = os.Lstat(filepath.Join(work, "c1"))
	assert.True(t, os.IsNotExist(err))
	// The sources are untouched.
	data, err = os.ReadFile(filepath.Join(roDir, "f"))
	require.NoError(t, err)
	assert.Equal(t, "ro", string(data))
	_, err = os.Stat(filepath.Join(tree, "sub", "deep"))
	assert.NoError(t, err)
}

func TestAddContainerRollsBack(t *testing.T) {
	dir := sandboxDir(t)
	require.NoError(t, Setup(dir))
	t.Cleanup(func() { _ = Teardown(dir) })
	_, err := AddContainer(dir, "c1", []mount.Mount{{Type: "tmpfs", Source: "tmpfs"}}, "", []Bind{
		{Source: t.TempDir()},
		{Source: filepath.Join(t.TempDir(), "missing")},
	})
	require.Error(t, err)
	assert.Len(t, mountsBelow(t, dir), 2, "only the shared dirs stay mounted")
	_, err = os.Lstat(filepath.Join(dir, WorkDir, "c1"))
	assert.True(t, os.IsNotExist(err))

	for _, id := range []string{"../x", "", "a/b", ".."} {
		_, err := AddContainer(dir, id, []mount.Mount{{Type: "tmpfs", Source: "tmpfs"}}, "", nil)
		assert.True(t, errdefs.IsInvalidArgument(err), "id %q: %v", id, err)
	}
	_, err = AddContainer(dir, "c2", nil, "", nil)
	assert.True(t, errdefs.IsInvalidArgument(err), "no rootfs: %v", err)
}

func TestAddContainerBindsRootfsDir(t *testing.T) {
	dir := sandboxDir(t)
	require.NoError(t, Setup(dir))
	t.Cleanup(func() { _ = Teardown(dir) })
	rootfs := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(rootfs, "etc-release"), []byte("x"), 0o644))
	p, err := AddContainer(dir, "c1", nil, rootfs, nil)
	require.NoError(t, err)
	_, err = os.Stat(filepath.Join(dir, ExportDir, "c1", "rootfs", "etc-release"))
	assert.NoError(t, err)
	assert.Empty(t, p.GuestBinds)
	require.NoError(t, RemoveContainer(dir, "c1"))
	_, err = os.Stat(filepath.Join(rootfs, "etc-release"))
	assert.NoError(t, err, "the rootfs itself is untouched")
}

// A symlink where a mount point is to be created is never followed.
func TestMountPointsFollowNoSymlink(t *testing.T) {
	needRoot(t)
	parentDir, outside := t.TempDir(), t.TempDir()
	require.NoError(t, os.Symlink(outside, filepath.Join(parentDir, "d")))
	require.NoError(t, os.Symlink(filepath.Join(outside, "f"), filepath.Join(parentDir, "f")))
	parent, err := openDir(parentDir)
	require.NoError(t, err)
	defer parent.Close()
	_, err = mkdirAt(parent, "d")
	assert.Error(t, err, "mkdirAt through a symlink")
	_, err = mkfileAt(parent, "f")
	assert.Error(t, err, "mkfileAt through a symlink")
	_, err = os.Lstat(filepath.Join(outside, "f"))
	assert.True(t, os.IsNotExist(err), "nothing created outside: %v", err)
	for _, name := range []string{"..", ".", "", "a/b"} {
		_, err := mkdirAt(parent, name)
		assert.True(t, errdefs.IsInvalidArgument(err), "mkdirAt(%q): %v", name, err)
	}
	_, err = openDir(filepath.Join(parentDir, "d"))
	assert.Error(t, err, "openDir of a symlink")
}

func TestSweepAndTeardownWithContainers(t *testing.T) {
	dir := sandboxDir(t)
	require.NoError(t, Setup(dir))
	for _, id := range []string{"c1", "c2", "c3"} {
		_, err := AddContainer(dir, id, []mount.Mount{{Type: "tmpfs", Source: "tmpfs"}}, "", []Bind{{Source: t.TempDir()}})
		require.NoError(t, err)
	}
	// A directory left without mounts counts too.
	require.NoError(t, os.Mkdir(filepath.Join(dir, WorkDir, "stale"), 0o755))
	removed, err := Sweep(dir, func(id string) bool { return id == "c1" })
	require.NoError(t, err)
	assert.ElementsMatch(t, []string{"c2", "c3", "stale"}, removed)
	ids, err := Containers(dir)
	require.NoError(t, err)
	assert.Equal(t, []string{"c1"}, ids)
	mountAt(t, mountsBelow(t, dir), filepath.Join(dir, WorkDir, "c1", "rootfs"))

	require.NoError(t, Teardown(dir))
	assert.Empty(t, mountsBelow(t, dir))
	_, err = os.Lstat(filepath.Join(dir, WorkDir))
	assert.True(t, os.IsNotExist(err))
}
