package sandboxer

import (
	"context"
	"time"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// Backend realizes sandboxes. The controller owns the API, the state and
// its persistence; a backend only makes a sandbox's resources real: the
// slot backend simulates them, the vm backend (package vmm) runs a libvirt
// domain per sandbox. Calls for one sandbox are serialized by the caller.
type Backend interface {
	// Mode names the backend ("slot", "vm") in status and metrics.
	Mode() string
	// Create prepares a sandbox. dir is its own state directory, already
	// created; the backend may keep files there. Create must leave nothing
	// behind when it fails.
	Create(ctx context.Context, id, dir string, info resourceinfo.ResourceInfo) error
	// Start runs a created sandbox and returns when it is ready. exited is
	// called at most once, from any goroutine, if the sandbox stops without
	// Stop having been called (a VM crash, a virsh destroy).
	Start(ctx context.Context, id string, exited ExitFunc) (pid uint32, err error)
	// Stop stops a started sandbox, forcefully after timeout. Stopping a
	// stopped sandbox is not an error.
	Stop(ctx context.Context, id string, timeout time.Duration) error
	// Update applies changed resources to a sandbox, live when running.
	Update(ctx context.Context, id string, info resourceinfo.ResourceInfo) error
	// Usage reports what the sandbox uses now.
	Usage(ctx context.Context, id string) (resourceinfo.Usage, error)
	// Recover re-attaches to a sandbox after a daemon restart. running is
	// what the state on disk says; Recover reports whether it still runs
	// and, when it does, arranges for exited to be called as Start does.
	Recover(ctx context.Context, id, dir string, info resourceinfo.ResourceInfo, running bool, exited ExitFunc) (alive bool, err error)
	// Delete releases everything the backend holds for the sandbox. It is
	// safe on a sandbox that never started or was already deleted.
	Delete(ctx context.Context, id string) error
}

// ExitFunc reports that a sandbox stopped by itself.
type ExitFunc = func(code uint32, at time.Time)
