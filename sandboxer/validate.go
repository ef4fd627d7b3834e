package sandboxer

import (
	"fmt"

	"github.com/containerd/errdefs"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// validatePodConfig refuses pod settings that a real runtime would refuse
// when it creates the sandbox, so that a slot pod is admitted exactly when
// a runc pod would be. Today: the user namespace options, checked as
// containerd's pod sandbox controller and runc check them.
func validatePodConfig(cfg *runtime.PodSandboxConfig) error {
	userns := cfg.GetLinux().GetSecurityContext().GetNamespaceOptions().GetUsernsOptions()
	if userns == nil {
		return nil
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: linux.security_context.namespace_options.userns_options: "+format, append([]any{errdefs.ErrInvalidArgument}, args...)...)
	}
	for _, m := range []struct {
		kind     string
		mappings []*runtime.IDMapping
	}{{"uids", userns.GetUids()}, {"gids", userns.GetGids()}} {
		if len(m.mappings) > 1 {
			return bad("only one %s mapping is supported, got %d", m.kind, len(m.mappings))
		}
		for _, mp := range m.mappings {
			if mp.GetLength() < 1 {
				return bad("%s mapping of length %d", m.kind, mp.GetLength())
			}
			// The pod's processes start as root: its ID must be mapped.
			if mp.GetContainerId() != 0 {
				return bad("%s mapping %d-%d does not map container ID 0", m.kind, mp.GetContainerId(), uint64(mp.GetContainerId())+uint64(mp.GetLength())-1)
			}
		}
	}
	switch mode := userns.GetMode(); mode {
	case runtime.NamespaceMode_NODE:
		if len(userns.GetUids()) != 0 || len(userns.GetGids()) != 0 {
			return bad("mode NODE takes no mappings")
		}
	case runtime.NamespaceMode_POD:
		if len(userns.GetUids()) == 0 || len(userns.GetGids()) == 0 {
			return bad("mode POD needs a uid and a gid mapping")
		}
	default:
		return bad("unsupported mode %s", mode)
	}
	return nil
}
