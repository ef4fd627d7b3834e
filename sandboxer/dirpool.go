package sandboxer

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/statefile"
)

// PoolPrefix starts the names, in the state directory, of the sandbox
// directories being made or recycled; recovery skips them, as every name
// starting with a dot. They are beside the sandboxes', not in a directory
// of their own: a rename from one directory to another takes a lock of
// the whole file system (and updates the moved directory's ".."), which
// made the renames of 32 concurrent pod cycles wait 0.5 ms each.
const PoolPrefix = ".pool-"

// maxPooled bounds the recycled directories kept ready.
const maxPooled = 256

// dirPool makes sandbox directories and recycles them. Making a
// directory and its first file costs two inode allocations: 450 µs of
// CPU on the ext4 of the test host, as much as the rest of a pod's cycle,
// where a rename costs 30 and overwriting a file's block 25. So a new
// sandbox's directory is made in the pool with its resource_info.json and
// renamed into place, whole (a reader never sees it without the file); a
// removed sandbox's directory is renamed into the pool (it is gone at
// once) and emptied in the background but for its resource_info.json,
// which the next sandbox's overwrites before its directory is renamed
// into place, and the spares its next writes go to. Only a reader still
// holding the removed sandbox's file open can tell: it sees it
// rewritten.
type dirPool struct {
	root string
	seq  atomic.Uint64

	mu    sync.Mutex
	ready []string // emptied, holding a resource_info.json
	dirty []string // returned, to be emptied
	wake  chan struct{}
}

func newDirPool(root string) (*dirPool, error) {
	p := &dirPool{root: root, wake: make(chan struct{}, 1)}
	// What a previous run left is emptied again before it is used.
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		n, ok := strings.CutPrefix(e.Name(), PoolPrefix)
		if !ok || !e.IsDir() {
			continue
		}
		p.dirty = append(p.dirty, filepath.Join(root, e.Name()))
		if n, err := strconv.ParseUint(n, 10, 64); err == nil && n > p.seq.Load() {
			p.seq.Store(n)
		}
	}
	return p, nil
}

func (p *dirPool) name() string {
	return filepath.Join(p.root, PoolPrefix+strconv.FormatUint(p.seq.Add(1), 10))
}

// make puts a directory holding a resource_info.json of info at dir.
func (p *dirPool) make(dir string, info []byte) error {
	tmp := p.take()
	if tmp != "" {
		if err := statefile.OverwriteFile(filepath.Join(tmp, ResourceInfoFile), info); err != nil {
			p.discard(tmp)
			tmp = ""
		}
	}
	if tmp == "" {
		tmp = p.name()
		if err := os.Mkdir(tmp, 0o700); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(tmp, ResourceInfoFile), info, 0o600); err != nil {
			p.discard(tmp)
			return fmt.Errorf("write %s: %w", filepath.Join(dir, ResourceInfoFile), err)
		}
	}
	if err := statefile.Rename(tmp, dir); err != nil {
		p.give(tmp)
		if errors.Is(err, syscall.ENOTEMPTY) || errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("sandbox directory %s exists: %w", dir, errdefs.ErrAlreadyExists)
		}
		return err
	}
	return nil
}

// remove takes a sandbox's directory away: renamed into the pool, to be
// emptied and reused.
func (p *dirPool) remove(dir string) error {
	tmp := p.name()
	if err := statefile.Rename(dir, tmp); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return os.RemoveAll(dir)
	}
	p.give(tmp)
	return nil
}

func (p *dirPool) take() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := len(p.ready)
	if n == 0 {
		return ""
	}
	tmp := p.ready[n-1]
	p.ready = p.ready[:n-1]
	return tmp
}

// give queues a pooled directory to be emptied.
func (p *dirPool) give(tmp string) {
	p.mu.Lock()
	p.dirty = append(p.dirty, tmp)
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// discard removes a pooled directory rather than reuse it.
func (p *dirPool) discard(tmp string) {
	if err := os.RemoveAll(tmp); err != nil {
		log.L.WithError(err).WithField("path", tmp).Warn("remove pooled directory")
	}
}

// run empties returned directories until ctx ends.
func (p *dirPool) run(ctx context.Context) {
	for {
		p.mu.Lock()
		dirty := p.dirty
		p.dirty = nil
		p.mu.Unlock()
		for _, d := range dirty {
			p.recycle(d)
		}
		if len(dirty) == 0 {
			select {
			case <-ctx.Done():
				return
			case <-p.wake:
			}
		}
	}
}

// recycle empties a returned directory but for its resource_info.json
// and the spares (statefile.SpareName) and makes it ready, or removes it
// when enough are.
func (p *dirPool) recycle(d string) {
	p.mu.Lock()
	full := len(p.ready) >= maxPooled
	p.mu.Unlock()
	entries, err := os.ReadDir(d)
	if full || err != nil || lowSpace(p.root) {
		p.discard(d)
		return
	}
	kept := false
	stateSpare := false
	for _, e := range entries {
		stateSpare = stateSpare || e.Name() == statefile.SpareName(StateFile) && e.Type().IsRegular()
	}
	for _, e := range entries {
		switch {
		case e.Name() == ResourceInfoFile && e.Type().IsRegular():
			kept = true
			continue
		case e.Type().IsRegular() && isSpare(e.Name()):
			// The next sandbox's writes go to the spares
			// (statefile.WriteTemp): their inodes and blocks are reused.
			continue
		case e.Name() == StateFile && e.Type().IsRegular() && !stateSpare:
			// Kept as the spare of the next sandbox's first state.json.
			// Never read.
			if statefile.Rename(filepath.Join(d, e.Name()), filepath.Join(d, statefile.SpareName(StateFile))) == nil {
				continue
			}
		}
		if err := os.RemoveAll(filepath.Join(d, e.Name())); err != nil {
			p.discard(d)
			return
		}
	}
	if !kept {
		if err := os.WriteFile(filepath.Join(d, ResourceInfoFile), nil, 0o600); err != nil {
			p.discard(d)
			return
		}
	}
	p.mu.Lock()
	p.ready = append(p.ready, d)
	p.mu.Unlock()
}

// isSpare reports whether name is the spare of a file the daemon writes
// in a sandbox's directory.
func isSpare(name string) bool {
	switch name {
	case statefile.SpareName(ResourceInfoFile), statefile.SpareName(StateFile), statefile.SpareName(UsageFile):
		return true
	}
	return false
}

// lowSpace reports whether the file system of dir has less than 64 MiB or
// 1% free: then removed sandboxes give back their space rather than
// keep it for the next ones.
func lowSpace(dir string) bool {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return true
	}
	free := st.Bavail * uint64(st.Bsize)
	return free < 64<<20 || st.Bavail < st.Blocks/100
}
