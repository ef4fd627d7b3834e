package sandboxer

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/types/known/timestamppb"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// UpdatedResourcesKey is the sandbox extension containerd's CRI (≥ 2.2)
// sets on UpdatePodSandboxResources (in-place pod resize).
const UpdatedResourcesKey = "updated-resources"

// updatedResources mirrors containerd's internal podsandbox.UpdatedResources,
// which typeurl encodes as JSON.
type updatedResources struct {
	Overhead  *runtime.LinuxContainerResources
	Resources *runtime.LinuxContainerResources
}

func init() {
	// The type URL containerd gives it: io.containerd.cri.v1.UpdatedResources.
	typeurl.Register(&updatedResources{}, "io.containerd.cri.v1", "UpdatedResources")
}

// decodeUpdatedResources returns the new pod resources and overhead; nil
// for a part the update does not carry.
func decodeUpdatedResources(a typeurl.Any) (linux, overhead *resourceinfo.Resources, err error) {
	var u updatedResources
	if err := json.Unmarshal(a.GetValue(), &u); err != nil {
		return nil, nil, fmt.Errorf("%w: malformed %s extension: %v", errdefs.ErrInvalidArgument, UpdatedResourcesKey, err)
	}
	if u.Resources != nil {
		r, err := resourceinfo.FromLinuxResources("updated-resources.resources", u.Resources)
		if err != nil {
			return nil, nil, err
		}
		linux = &r
	}
	if u.Overhead != nil {
		r, err := resourceinfo.FromLinuxResources("updated-resources.overhead", u.Overhead)
		if err != nil {
			return nil, nil, err
		}
		overhead = &r
	}
	return linux, overhead, nil
}

func timestamp(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		t = time.Now()
	}
	return timestamppb.New(t)
}
