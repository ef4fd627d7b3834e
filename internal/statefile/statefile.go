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

// WriteTemp writes data, not synced, to a temp file beside name in dir and
// returns its path: the caller renames it over name, or removes it.
func WriteTemp(dir, name string, data []byte) (string, error) {
	tmp, err := writeTemp(dir, name, data, false)
	if err != nil && tmp != "" {
		os.Remove(tmp)
		tmp = ""
	}
	return tmp, err
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
