package vmm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"
)

// GuestVersionFile, in a guest directory of scripts/build-guest.sh, says
// what the guest was built from, a key=value a line (kernel, kver,
// agent, ...).
const GuestVersionFile = "guest.version"

// checkGuestAgent refuses a guest of scripts/build-guest.sh built without
// the guest agent (its guest.version has no agent=: a script from before
// containers ran in the guest): its init reports READY and serves
// nothing, so every sandbox would wait ready_timeout for an agent that
// never answers, and fail with a console that looks healthy. A guest
// whose initramfs is not the guest directory's, or a directory without
// guest.version (not built by the script), is not checked.
func checkGuestAgent(cfg Config) error {
	if cfg.GuestDir == "" || filepath.Dir(cfg.Initrd) != filepath.Clean(cfg.GuestDir) {
		return nil
	}
	path := filepath.Join(cfg.GuestDir, GuestVersionFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("guest: %w", err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "agent="); ok && v != "" {
			return nil
		}
	}
	return fmt.Errorf("the guest in %s has no guest agent (%s names none: built by an older scripts/build-guest.sh); rebuild it with make guest: %w",
		cfg.GuestDir, path, errdefs.ErrFailedPrecondition)
}
