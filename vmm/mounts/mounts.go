// Package mounts makes a vm sandbox's containers' files visible to its
// guest: the container's root filesystem and the bind mounts of its OCI
// spec are mounted on the host below the sandbox's shared directory, which
// virtio-fs exports to the guest.
//
// Layout of a sandbox directory:
//
//	<dir>/shared.rw/                 WorkDir: where the host mounts; a bind
//	                                 mount of itself, shared (propagating)
//	<dir>/shared/                    ExportDir: what virtiofsd exports; a
//	                                 read-only bind of WorkDir in its peer
//	                                 group, so every mount made below
//	                                 WorkDir appears below it
//	<dir>/shared.rw/<cid>/rootfs     the container's rootfs (containerd's
//	                                 snapshot mounts)
//	<dir>/shared.rw/<cid>/mounts/<n> spec.Mounts[n] of a bind mount
//
// In the guest ExportDir is mounted at GuestRoot, so a container's rootfs
// is GuestRoot/<cid>/rootfs there.
//
// Why two directories: host mounts are private here, so a mount made after
// the VM started would never reach virtiofsd's mount namespace (a copy
// taken when it started) unless the export is a shared mount (VM-GUEST.md);
// and the guest must not be able to write to the export's top levels (a
// guest root could fill the daemon's disk, or plant a symlink where the
// host creates the next container's mount point). The export is read-only;
// the containers' rootfs and read-write volumes are mounts of their own
// below it and stay writable.
//
// Read-only binds are made read-only before they are attached
// (open_tree + mount_setattr + move_mount): a bind remounted read-only
// afterwards would be read-only on the host only, since mount flags set
// later do not propagate to the copies in virtiofsd's namespace.
//
// Mount points are created with one openat per path component and
// O_NOFOLLOW, and mounted through /proc/self/fd, so no symlink is ever
// followed out of WorkDir, whatever the guest did. Unmounts are lazy
// (MNT_DETACH): virtiofsd keeps files of a mount it exported open for as
// long as the guest caches them, and a plain unmount would fail with EBUSY
// until then (Kata Containers does the same).
package mounts

import (
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

const (
	// WorkDir is the host's own view of the shared directory.
	WorkDir = "shared.rw"
	// ExportDir is what virtio-fs exports to the guest.
	ExportDir = "shared"
	// GuestRoot is where the guest mounts the export.
	GuestRoot = "/run/rss/shared"
)

// Bind is a bind mount a container needs in the guest.
type Bind struct {
	// Source is the host path (a file or a directory).
	Source string
	// ReadOnly, NoSuid, NoDev and NoExec are the mount's flags, applied on
	// the host too, so the guest cannot write through a read-only bind
	// even as root. As with mount(2) they apply to the bind itself, not to
	// the submounts an rbind carries, unless RecursiveReadOnly (the OCI
	// "rro" option) makes them all read-only.
	ReadOnly, NoSuid, NoDev, NoExec bool
	RecursiveReadOnly               bool
	// Recursive binds the submounts of Source too (rbind).
	Recursive bool
}

// Prepared is where a container's files are, on the host and in the guest.
type Prepared struct {
	// HostRootfs and GuestRootfs are the rootfs mount point.
	HostRootfs, GuestRootfs string
	// GuestBinds are the guest paths of the binds, in order.
	GuestBinds []string
}

// Setup prepares the shared directory of a sandbox: WorkDir bound onto
// itself and made shared, ExportDir a read-only peer of it. Call it before
// the VM starts; it is idempotent.
func Setup(dir string) error {
	work, export := filepath.Join(dir, WorkDir), filepath.Join(dir, ExportDir)
	for _, d := range []string{work, export} {
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("shared dir: %w", err)
		}
		if fi, err := os.Lstat(d); err != nil || !fi.IsDir() {
			return fmt.Errorf("shared dir %s is not a directory (%v): %w", d, err, errdefs.ErrFailedPrecondition)
		}
	}
	if ok, err := mountinfo.Mounted(work); err != nil {
		return fmt.Errorf("shared dir %s: %w", work, err)
	} else if !ok {
		if err := unix.Mount(work, work, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s onto itself: %w", work, err)
		}
	}
	// Shared, so that what is mounted below reaches ExportDir and the
	// copies in virtiofsd's namespace.
	if err := unix.Mount("", work, "", unix.MS_SHARED, ""); err != nil {
		return fmt.Errorf("make %s shared: %w", work, err)
	}
	if ok, err := mountinfo.Mounted(export); err != nil {
		return fmt.Errorf("shared dir %s: %w", export, err)
	} else if !ok {
		// A bind of a shared mount joins its peer group. It is made
		// read-only before any VM copied it.
		if err := unix.Mount(work, export, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s onto %s: %w", work, export, err)
		}
	}
	if err := unix.Mount("", export, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return fmt.Errorf("make %s read-only: %w", export, err)
	}
	return nil
}

// Teardown unmounts everything below a sandbox's shared directories and
// the directories themselves, and removes them. It is idempotent, and
// removes nothing while something is still mounted below them.
func Teardown(dir string) error {
	work, export := filepath.Join(dir, WorkDir), filepath.Join(dir, ExportDir)
	var errs []error
	for _, d := range []string{export, work} {
		if err := unmountBelow(d); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	for _, d := range []string{export, work} {
		if err := removeUnmounted(d); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// AddContainer mounts a container's rootfs (rootfs, containerd's snapshot
// mounts; or, when there are none, a bind of rootfsDir, which containerd
// mounted itself) and its binds below the sandbox's WorkDir. What a
// previous attempt left for the same id is removed first. On failure
// nothing of the container stays mounted.
func AddContainer(dir, id string, rootfs []mount.Mount, rootfsDir string, binds []Bind) (_ *Prepared, retErr error) {
	if err := identifiers.Validate(id); err != nil {
		return nil, err
	}
	if len(rootfs) == 0 && rootfsDir == "" {
		return nil, fmt.Errorf("container %s has no rootfs: %w", id, errdefs.ErrInvalidArgument)
	}
	if err := RemoveContainer(dir, id); err != nil {
		return nil, err
	}
	root, err := openDir(filepath.Join(dir, WorkDir))
	if err != nil {
		return nil, err
	}
	defer root.Close()
	defer func() {
		if retErr != nil {
			if err := RemoveContainer(dir, id); err != nil {
				retErr = errors.Join(retErr, err)
			}
		}
	}()

	cdir, err := mkdirAt(root, id)
	if err != nil {
		return nil, err
	}
	defer cdir.Close()
	rfs, err := mkdirAt(cdir, "rootfs")
	if err != nil {
		return nil, err
	}
	defer rfs.Close()
	if len(rootfs) > 0 {
		if err := mount.All(rootfs, fdPath(rfs)); err != nil {
			return nil, fmt.Errorf("mount rootfs of %s: %w", id, err)
		}
	} else if err := bindAt(Bind{Source: rootfsDir, Recursive: true}, rfs); err != nil {
		return nil, fmt.Errorf("bind rootfs of %s: %w", id, err)
	}

	p := &Prepared{
		HostRootfs:  filepath.Join(dir, WorkDir, id, "rootfs"),
		GuestRootfs: path.Join(GuestRoot, id, "rootfs"),
	}
	if len(binds) == 0 {
		return p, nil
	}
	mdir, err := mkdirAt(cdir, "mounts")
	if err != nil {
		return nil, err
	}
	defer mdir.Close()
	for i, b := range binds {
		fi, err := os.Stat(b.Source)
		if err != nil {
			return nil, fmt.Errorf("bind mount source: %w", err)
		}
		name := strconv.Itoa(i)
		var target *os.File
		if fi.IsDir() {
			target, err = mkdirAt(mdir, name)
		} else {
			target, err = mkfileAt(mdir, name)
		}
		if err != nil {
			return nil, err
		}
		err = bindAt(b, target)
		target.Close()
		if err != nil {
			return nil, fmt.Errorf("bind %s: %w", b.Source, err)
		}
		p.GuestBinds = append(p.GuestBinds, path.Join(GuestRoot, id, "mounts", name))
	}
	return p, nil
}

// RemoveContainer unmounts what AddContainer mounted for id and removes
// its directory. Safe on a container that has nothing there.
func RemoveContainer(dir, id string) error {
	if err := identifiers.Validate(id); err != nil {
		return err
	}
	var errs []error
	for _, d := range []string{filepath.Join(dir, ExportDir, id), filepath.Join(dir, WorkDir, id)} {
		if err := unmountBelow(d); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return removeUnmounted(filepath.Join(dir, WorkDir, id))
}

// Containers lists the container ids that have a directory or a mount
// below the sandbox's WorkDir.
func Containers(dir string) ([]string, error) {
	work := filepath.Join(dir, WorkDir)
	seen := map[string]bool{}
	ents, err := os.ReadDir(work)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	for _, e := range ents {
		seen[e.Name()] = true
	}
	for _, base := range []string{work, filepath.Join(dir, ExportDir)} {
		ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(base))
		if err != nil {
			return nil, err
		}
		for _, m := range ms {
			rel, err := filepath.Rel(base, m.Mountpoint)
			if err != nil || rel == "." {
				continue
			}
			seen[strings.SplitN(rel, string(filepath.Separator), 2)[0]] = true
		}
	}
	ids := make([]string, 0, len(seen))
	for id := range seen {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids, nil
}

// Sweep removes what is mounted or left below the sandbox's WorkDir for
// containers keep does not want (a daemon that crashed between a
// container's removal and its unmount), and returns their ids.
func Sweep(dir string, keep func(id string) bool) ([]string, error) {
	ids, err := Containers(dir)
	if err != nil {
		return nil, err
	}
	var removed []string
	var errs []error
	for _, id := range ids {
		if keep(id) {
			continue
		}
		if identifiers.Validate(id) != nil {
			// Not a name AddContainer makes: unmount and remove it all
			// the same, by its path.
			if err := removeOdd(dir, id); err != nil {
				errs = append(errs, err)
				continue
			}
		} else if err := RemoveContainer(dir, id); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, id)
	}
	return removed, errors.Join(errs...)
}

func removeOdd(dir, name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsRune(name, '/') {
		return nil
	}
	var errs []error
	for _, d := range []string{filepath.Join(dir, ExportDir, name), filepath.Join(dir, WorkDir, name)} {
		if err := unmountBelow(d); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return removeUnmounted(filepath.Join(dir, WorkDir, name))
}

// unmountBelow lazily unmounts every mount at or below p, deepest first,
// and checks that none is left.
func unmountBelow(p string) error {
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(p))
	if err != nil {
		return fmt.Errorf("read mountinfo: %w", err)
	}
	points := make([]string, 0, len(ms))
	for _, m := range ms {
		points = append(points, m.Mountpoint)
	}
	// Deepest first; a mount point stacked twice appears twice.
	sort.SliceStable(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	var errs []error
	for _, mp := range points {
		if err := unix.Unmount(mp, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err != nil &&
			!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if left, err := mountinfo.GetMounts(mountinfo.PrefixFilter(p)); err != nil {
		return fmt.Errorf("read mountinfo: %w", err)
	} else if len(left) > 0 {
		return fmt.Errorf("%s: %d mounts left after unmounting (first %s): %w", p, len(left), left[0].Mountpoint, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// removeUnmounted removes p and what is below it once nothing is mounted
// there (os.RemoveAll follows no symlink; with no mount below p it cannot
// reach outside it).
func removeUnmounted(p string) error {
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(p))
	if err != nil {
		return fmt.Errorf("read mountinfo: %w", err)
	}
	if len(ms) > 0 {
		return fmt.Errorf("not removing %s: %s is mounted: %w", p, ms[0].Mountpoint, errdefs.ErrFailedPrecondition)
	}
	if err := os.RemoveAll(p); err != nil {
		return fmt.Errorf("remove %s: %w", p, err)
	}
	return nil
}

// openDir opens a directory the backend made, refusing a symlink.
func openDir(p string) (*os.File, error) {
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", p, err)
	}
	return os.NewFile(uintptr(fd), p), nil
}

func checkName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsRune(name, '/') {
		return fmt.Errorf("path component %q: %w", name, errdefs.ErrInvalidArgument)
	}
	return nil
}

// mkdirAt creates (or opens) the directory name in parent, refusing to
// follow a symlink there.
func mkdirAt(parent *os.File, name string) (*os.File, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	if err := unix.Mkdirat(int(parent.Fd()), name, 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
		return nil, fmt.Errorf("mkdir %s/%s: %w", parent.Name(), name, err)
	}
	fd, err := unix.Openat(int(parent.Fd()), name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s/%s: %w", parent.Name(), name, err)
	}
	return os.NewFile(uintptr(fd), parent.Name()+"/"+name), nil
}

// mkfileAt creates (or opens) the regular file name in parent as a mount
// point, refusing to follow a symlink there.
func mkfileAt(parent *os.File, name string) (*os.File, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	fd, err := unix.Openat(int(parent.Fd()), name, unix.O_RDONLY|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0o644)
	if err != nil {
		return nil, fmt.Errorf("create %s/%s: %w", parent.Name(), name, err)
	}
	f := os.NewFile(uintptr(fd), parent.Name()+"/"+name)
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("mount point %s is not a regular file (%v): %w", f.Name(), err, errdefs.ErrFailedPrecondition)
	}
	return f, nil
}

func fdPath(f *os.File) string { return "/proc/self/fd/" + strconv.Itoa(int(f.Fd())) }

// bindAt binds b.Source onto target with b's flags set before the mount
// is attached, so every propagated copy has them.
func bindAt(b Bind, target *os.File) error {
	flags := uint(unix.OPEN_TREE_CLONE | unix.O_CLOEXEC)
	if b.Recursive {
		flags |= unix.AT_RECURSIVE
	}
	fd, err := unix.OpenTree(unix.AT_FDCWD, b.Source, flags)
	if err != nil {
		return fmt.Errorf("open_tree %s: %w", b.Source, err)
	}
	defer unix.Close(fd)
	var attr uint64
	if b.ReadOnly || b.RecursiveReadOnly {
		attr |= unix.MOUNT_ATTR_RDONLY
	}
	if b.NoSuid {
		attr |= unix.MOUNT_ATTR_NOSUID
	}
	if b.NoDev {
		attr |= unix.MOUNT_ATTR_NODEV
	}
	if b.NoExec {
		attr |= unix.MOUNT_ATTR_NOEXEC
	}
	if attr != 0 {
		if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, &unix.MountAttr{Attr_set: attr}); err != nil {
			return fmt.Errorf("mount_setattr %s: %w", b.Source, err)
		}
		if b.RecursiveReadOnly && b.Recursive {
			if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH|unix.AT_RECURSIVE, &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY}); err != nil {
				return fmt.Errorf("mount_setattr %s (recursive read-only): %w", b.Source, err)
			}
		}
	}
	if err := unix.MoveMount(fd, "", int(target.Fd()), "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount %s onto %s: %w", b.Source, target.Name(), err)
	}
	return nil
}
