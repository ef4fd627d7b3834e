package sandboxer

import (
	"testing"

	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func TestValidateUserns(t *testing.T) {
	m := func(container, length uint32) []*runtime.IDMapping {
		return []*runtime.IDMapping{{ContainerId: container, HostId: 100000, Length: length}}
	}
	for _, tc := range []struct {
		desc  string
		ns    *runtime.UserNamespace
		valid bool
	}{
		{"none", nil, true},
		{"pod with mappings", &runtime.UserNamespace{Mode: runtime.NamespaceMode_POD, Uids: m(0, 65536), Gids: m(0, 65536)}, true},
		{"node", &runtime.UserNamespace{Mode: runtime.NamespaceMode_NODE}, true},
		{"node with mappings", &runtime.UserNamespace{Mode: runtime.NamespaceMode_NODE, Uids: m(0, 1), Gids: m(0, 1)}, false},
		{"pod without mappings", &runtime.UserNamespace{Mode: runtime.NamespaceMode_POD}, false},
		{"container ID 0 not mapped", &runtime.UserNamespace{Mode: runtime.NamespaceMode_POD, Uids: m(1, 65536), Gids: m(0, 65536)}, false},
		{"two mappings", &runtime.UserNamespace{Mode: runtime.NamespaceMode_POD, Uids: append(m(0, 1), m(1, 1)...), Gids: m(0, 1)}, false},
		{"zero length", &runtime.UserNamespace{Mode: runtime.NamespaceMode_POD, Uids: m(0, 0), Gids: m(0, 1)}, false},
		{"container mode", &runtime.UserNamespace{Mode: runtime.NamespaceMode_CONTAINER}, false},
		{"target mode", &runtime.UserNamespace{Mode: runtime.NamespaceMode_TARGET}, false},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			cfg := &runtime.PodSandboxConfig{Linux: &runtime.LinuxPodSandboxConfig{SecurityContext: &runtime.LinuxSandboxSecurityContext{
				NamespaceOptions: &runtime.NamespaceOption{UsernsOptions: tc.ns},
			}}}
			err := validatePodConfig(cfg)
			if tc.valid {
				assert.NoError(t, err)
			} else {
				assert.True(t, errdefs.IsInvalidArgument(err), "got %v", err)
			}
		})
	}
}
