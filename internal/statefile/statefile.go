// Package statefile writes and reads the daemon's JSON state files so that a
// crash at any instant leaves either the previous or the new content, never
// a mix: write a temp file in the same directory, fsync it, rename it over
// the target, fsync the directory.
//
// containerd's pkg/atomicfile does the first three steps but names its temp
// files with bare digits and does not sync the directory; a sandboxer killed
// mid-write must be able to tell its temp files apart at start-up and find
// the rename durable, hence this small package.
package statefile

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// TempPrefix starts the name of every temp file this package creates.
const TempPrefix = ".tmp-"

// FileMode is the mode of state files: they hold pod configuration.
const FileMode = 0o600

// WriteJSON atomically replaces path with v encoded as indented JSON.
func WriteJSON(path string, v any) error {
	data, err := EncodeJSON(v)
	if err != nil {
		return fmt.Errorf("encode %s: %w", filepath.Base(path), err)
	}
	return Write(path, data)
}

// Write atomically and durably replaces path with data.
func Write(path string, data []byte) error {
	dir, base := filepath.Split(path)
	return WriteFiles(dir, true, File{Name: base, Data: data})
}

// File is one file of a WriteFiles call.
type File struct {
	Name string
	Data []byte
	// Derived marks a file that can be rebuilt from the others: it is
	// replaced atomically but its data is not synced.
	Derived bool
}

// WriteFiles atomically replaces each file of dir, in the order given: the
// caller puts its commit-point file last. With durable, the data of every
// file not Derived is synced before its rename and the renames are made
// durable with one sync of the directory; without, the files are still
// replaced whole (a killed process leaves old or new content, never a mix)
// but a power loss may lose the change.
func WriteFiles(dir string, durable bool, files ...File) (retErr error) {
	temps := make([]string, len(files))
	defer func() {
		if retErr != nil {
			for _, tmp := range temps {
				if tmp != "" {
					os.Remove(tmp)
				}
			}
		}
	}()
	for i, f := range files {
		tmp, err := writeTemp(dir, f.Name, f.Data, durable && !f.Derived)
		temps[i] = tmp
		if err != nil {
			return err
		}
	}
	for i, f := range files {
		if err := os.Rename(temps[i], filepath.Join(dir, f.Name)); err != nil {
			return fmt.Errorf("rename %s: %w", f.Name, err)
		}
		temps[i] = ""
	}
	if !durable {
		return nil
	}
	return SyncDir(dir)
}

// SparePrefix starts the name of the spare beside a file that WriteTemp
// writes and Swap exchanges with it (SpareName).
const SparePrefix = ".spare-"

// SpareName is the spare of name: the file WriteTemp writes the next
// content of name to, which Swap then exchanges with name, so that it
// holds name's previous content and its inode and blocks serve the next
// write. Creating a file and renaming it over another cost an inode's
// allocation and release, 0.4 ms of wall time and 0.2 ms of CPU on the
// ext4 of the test host where the exchange costs 0.03. A spare is never
// read: after a crash it holds an old or a torn content.
func SpareName(name string) string { return SparePrefix + name }

// WriteTemp writes data, not synced, to the spare of name in dir
// (SpareName) and returns its path: the caller swaps it with name (Swap),
// or leaves it. The caller serializes the writes of name in dir.
func WriteTemp(dir, name string, data []byte) (string, error) {
	spare := filepath.Join(dir, SpareName(name))
	if err := overwrite(spare, data, unix.O_CREAT); err != nil {
		// A torn spare is never read; removed, it gives its space back.
		os.Remove(spare)
		return "", fmt.Errorf("write %s: %w", filepath.Join(dir, name), err)
	}
	return spare, nil
}

// overwrite writes data over what path holds, in place, and cuts it to
// data's length: the file's blocks are reused, where truncating first
// would free and allocate them again.
func overwrite(path string, data []byte, flags int) error {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_CLOEXEC|flags, FileMode)
	if err != nil {
		return &fs.PathError{Op: "open", Path: path, Err: err}
	}
	for off := 0; off < len(data); {
		n, err := unix.Pwrite(fd, data[off:], int64(off))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			unix.Close(fd)
			return &fs.PathError{Op: "write", Path: path, Err: err}
		}
		off += n
	}
	if err := unix.Ftruncate(fd, int64(len(data))); err != nil {
		unix.Close(fd)
		return &fs.PathError{Op: "truncate", Path: path, Err: err}
	}
	if err := unix.Close(fd); err != nil {
		return &fs.PathError{Op: "close", Path: path, Err: err}
	}
	return nil
}

// Overwrite replaces the content of name in dir in place, or creates it
// through its spare (Replace) when it does not exist. Not atomic: a
// crash can leave the file torn. For files whose content is also held by
// something that outlives the crash (the journal for state.json), so
// that a torn file is never read as the truth.
func Overwrite(dir, name string, data []byte) error {
	err := overwrite(filepath.Join(dir, name), data, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return Replace(dir, name, data)
	}
	return err
}

// Replace atomically replaces name in dir with data, not synced, through
// its spare (WriteTemp, Swap).
func Replace(dir, name string, data []byte) error {
	spare, err := WriteTemp(dir, name, data)
	if err != nil {
		return err
	}
	if err := Swap(spare, filepath.Join(dir, name)); err != nil {
		return fmt.Errorf("replace %s: %w", name, err)
	}
	return nil
}

// Swap makes the spare written by WriteTemp the file to, atomically: an
// exchange (renameat2 RENAME_EXCHANGE), after which spare holds what to
// held; a rename where to does not exist yet or the file system cannot
// exchange. A reader of to sees the old content or the new one, whole;
// only a reader that still holds the old file open when the next write
// reaches the spare sees it change, as it would with a write in place.
func Swap(spare, to string) error {
	err := unix.Renameat2(unix.AT_FDCWD, spare, unix.AT_FDCWD, to, unix.RENAME_EXCHANGE)
	if err == nil {
		return nil
	}
	if err == unix.ENOENT || err == unix.EINVAL || err == unix.ENOSYS {
		// No file to exchange with (to is new, or spare was removed), or
		// no RENAME_EXCHANGE here: a rename.
		return Rename(spare, to)
	}
	return &os.LinkError{Op: "exchange", Old: spare, New: to, Err: err}
}

// Rename is rename(2) alone: os.Rename first stats the target, to refuse
// renaming onto a directory, which costs a path walk per rename.
func Rename(from, to string) error {
	if err := unix.Rename(from, to); err != nil {
		return &os.LinkError{Op: "rename", Old: from, New: to, Err: err}
	}
	return nil
}

// OverwriteFile writes data over what the existing file path holds, in
// place (its blocks reused), and cuts it to data's length.
func OverwriteFile(path string, data []byte) error { return overwrite(path, data, 0) }

// ReadSmall reads a small file with open, read and close only (os.ReadFile
// also stats it, reads again for EOF and registers it with the poller);
// buf is reused when it is large enough.
func ReadSmall(path string, buf []byte) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	if cap(buf) < 4096 {
		buf = make([]byte, 0, 4096)
	}
	buf = buf[:0]
	for {
		n, err := unix.Read(fd, buf[len(buf):cap(buf)])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, &fs.PathError{Op: "read", Path: path, Err: err}
		}
		if n == 0 {
			return buf, nil
		}
		buf = buf[:len(buf)+n]
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
	}
}

// SyncFS makes everything written to the file system holding dir durable
// (syncfs(2)): one call for what many files' syncs would cost.
func SyncFS(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
}

// writeTemp writes data to a temp file beside name.
func writeTemp(dir, name string, data []byte, sync bool) (string, error) {
	f, err := os.CreateTemp(dir, TempPrefix+name+"-*")
	if err != nil {
		return "", fmt.Errorf("write %s: %w", name, err)
	}
	defer f.Close()
	// CreateTemp creates the file with mode 0600, which is FileMode.
	if _, err := f.Write(data); err != nil {
		return f.Name(), fmt.Errorf("write %s: %w", name, err)
	}
	if sync {
		if err := f.Sync(); err != nil {
			return f.Name(), fmt.Errorf("sync %s: %w", name, err)
		}
	}
	if err := f.Close(); err != nil {
		return f.Name(), fmt.Errorf("close %s: %w", name, err)
	}
	return f.Name(), nil
}

// EncodeJSON is the encoding WriteJSON uses.
func EncodeJSON(v any) ([]byte, error) {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}

// ReadJSON decodes path into v, rejecting unknown fields and trailing data
// so that a damaged file is reported, not half-read.
func ReadJSON(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("decode %s: %w", path, err)
	}
	// Not dec.More: it reports no more for a stray ']' or '}'.
	if _, err := dec.Token(); err != io.EOF {
		return fmt.Errorf("decode %s: trailing data", path)
	}
	return nil
}

// SyncDir makes a rename or removal in dir durable.
func SyncDir(dir string) error {
	if dir == "" {
		dir = "."
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, os.ErrInvalid) {
		return fmt.Errorf("sync dir %s: %w", dir, err)
	}
	return nil
}

// RemoveTemp removes the temp files a crash left in dir and returns their
// names.
func RemoveTemp(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var removed []string
	for _, e := range entries {
		if !e.Type().IsRegular() || !strings.HasPrefix(e.Name(), TempPrefix) {
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return removed, err
		}
		removed = append(removed, e.Name())
	}
	return removed, nil
}
