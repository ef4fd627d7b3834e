package sandboxer

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/proto"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/logsafe"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// Create records a sandbox, extracts its resources and prepares it in the
// backend. Nothing of it is left on disk when Create fails.
func (c *Controller) Create(ctx context.Context, info sandbox.Sandbox, opts ...sandbox.CreateOpt) error {
	id := info.ID
	if err := ValidateID("sandbox", id); err != nil {
		return err
	}
	var o sandbox.CreateOptions
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return fmt.Errorf("%w: %v", errdefs.ErrInvalidArgument, err)
		}
	}
	cfg, err := podSandboxConfig(ctx, o.Options)
	if err != nil {
		return err
	}
	return c.create(ctx, id, cfg, o)
}

// CreatePod is Create of a sandbox with a PodSandboxConfig already
// decoded: the direct CRI service's, which need not encode it into the
// options for Create to decode it again.
func (c *Controller) CreatePod(ctx context.Context, id string, cfg *runtime.PodSandboxConfig) error {
	if err := ValidateID("sandbox", id); err != nil {
		return err
	}
	return c.create(ctx, id, cfg, sandbox.CreateOptions{})
}

func (c *Controller) create(ctx context.Context, id string, cfg *runtime.PodSandboxConfig, o sandbox.CreateOptions) (retErr error) {
	if err := validatePodConfig(cfg); err != nil {
		return err
	}
	pod := PodOf(cfg)
	if err := pod.Validate(); err != nil {
		return err
	}
	spec, err := resourceinfo.FromPodSandboxConfig(cfg)
	if err != nil {
		return err
	}
	// The pod annotations are in the config; the state keeps the
	// request's only when they are what the resources come from.
	var annotations map[string]string
	if len(cfg.GetAnnotations()) == 0 && len(o.Annotations) > 0 {
		// Not from CRI: read the resources from the request's annotations.
		annotations = o.Annotations
		if spec.Annotations, err = resourceinfo.FromAnnotations(annotations); err != nil {
			return err
		}
	}
	var cfgJSON json.RawMessage
	if cfg != nil {
		// encoding/json, not protojson: containerd's CRI decodes it so.
		if cfgJSON, err = json.Marshal(cfg); err != nil {
			return fmt.Errorf("encode pod sandbox config: %w", err)
		}
	}

	sb := &sandboxEntry{id: id, exited: make(chan struct{})}
	dir := c.Dir(id)
	sb.op.Lock()
	defer sb.op.Unlock()
	c.mu.Lock()
	if _, ok := c.sandboxes[id]; ok {
		c.mu.Unlock()
		return fmt.Errorf("sandbox %s: %w", id, errdefs.ErrAlreadyExists)
	}
	c.sandboxes[id] = sb
	c.mu.Unlock()
	defer func() {
		if retErr != nil {
			sb.gone = true
			c.forget(id, sb)
		}
	}()

	st := &State{
		Version:     stateVersion,
		ID:          id,
		Mode:        c.Mode(),
		Phase:       PhaseCreated,
		CreatedAt:   c.opts.Now().UTC(),
		NetNSPath:   o.NetNSPath,
		Annotations: annotations,
		Config:      cfgJSON,
		Spec:        internSpec(&spec),
	}
	ri := st.ResourceInfo()
	st.ResourcesUpdatedAt = time.Now().UTC()
	ri.UpdatedAt = st.ResourcesUpdatedAt
	if err := c.opts.Admitter.Admit(ctx, id, ri.Resources); err != nil {
		return err
	}
	defer func() {
		if retErr != nil {
			c.opts.Admitter.Release(id)
		}
	}()
	riData, err := encodeInfo(st, ri)
	if err != nil {
		return err
	}
	// The directory appears whole, with its resource_info.json.
	if err := c.pool.make(dir, riData); err != nil {
		return storageError(dir, err)
	}
	defer func() {
		if retErr != nil {
			if err := c.pool.remove(dir); err != nil {
				log.G(ctx).WithError(err).Warn("remove directory of failed sandbox")
			}
		}
	}()
	if err := c.opts.Backend.Create(ctx, id, dir, ri, pod); err != nil {
		return fmt.Errorf("%s backend: create sandbox %s: %w", c.Mode(), id, err)
	}
	defer func() {
		if retErr != nil {
			if err := c.opts.Backend.Delete(context.WithoutCancel(ctx), id); err != nil {
				log.G(ctx).WithError(err).Warn("delete failed sandbox from backend")
			}
		}
	}()
	// Written, not synced (see commit): Start makes it durable. Its
	// resource_info.json is written already.
	if err := c.commitResources(sb, st, ri, false); err != nil {
		return err
	}
	logResources(ctx, "sandbox created", ri, riData)
	return nil
}

// PodOf is what a backend needs of a pod's config (nil: none, a caller
// other than CRI): its hostname, DNS configuration and sysctls, copied.
func PodOf(cfg *runtime.PodSandboxConfig) backend.Pod {
	var p backend.Pod
	if cfg == nil {
		return p
	}
	p.Hostname = cfg.GetHostname()
	if d := cfg.GetDnsConfig(); d != nil {
		p.DNS = &backend.DNS{
			Servers:  slices.Clone(d.GetServers()),
			Searches: slices.Clone(d.GetSearches()),
			Options:  slices.Clone(d.GetOptions()),
		}
	}
	p.Sysctls = maps.Clone(cfg.GetLinux().GetSysctls())
	return p
}

// podSandboxConfig decodes the CRI config containerd passes as options. A
// caller other than CRI may pass nothing, or another type, which is not
// an error: such a sandbox is sized from its annotations only. Options
// that claim to be a PodSandboxConfig, under typeurl's URL
// ("runtime.v1.PodSandboxConfig") or protobuf's
// ("type.googleapis.com/runtime.v1.PodSandboxConfig"), must decode: a pod
// whose limits cannot be read is refused, never created without them.
func podSandboxConfig(ctx context.Context, opts typeurl.Any) (*runtime.PodSandboxConfig, error) {
	if opts == nil || opts.GetTypeUrl() == "" {
		return nil, nil
	}
	url := opts.GetTypeUrl()
	if isPodSandboxConfig(url) {
		var cfg runtime.PodSandboxConfig
		if err := proto.Unmarshal(opts.GetValue(), &cfg); err != nil {
			return nil, fmt.Errorf("%w: malformed PodSandboxConfig in options: %v", errdefs.ErrInvalidArgument, err)
		}
		return &cfg, nil
	}
	if _, err := typeurl.UnmarshalAny(opts); err != nil {
		log.G(ctx).WithField("type", logsafe.String(url)).Warn("ignoring sandbox options of unknown type")
		return nil, nil
	}
	log.G(ctx).WithField("type", logsafe.String(url)).Warn("ignoring sandbox options that are not a PodSandboxConfig")
	return nil, nil
}

// isPodSandboxConfig reports whether a type URL names a PodSandboxConfig,
// whatever its prefix.
func isPodSandboxConfig(url string) bool {
	return url[strings.LastIndex(url, "/")+1:] == string(proto.MessageName(&runtime.PodSandboxConfig{}))
}
