package sandboxer

import (
	"context"
	"encoding/json"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/cgmetrics"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// Wait blocks until the sandbox stops, or ctx ends.
func (c *Controller) Wait(ctx context.Context, id string) (sandbox.ExitStatus, error) {
	sb, err := c.get(id)
	if err != nil {
		return sandbox.ExitStatus{}, err
	}
	select {
	case <-sb.exited:
	case <-ctx.Done():
		return sandbox.ExitStatus{}, ctx.Err()
	case <-c.closing:
		return sandbox.ExitStatus{}, errShuttingDown
	}
	st := sb.snap.Load().state
	es := sandbox.ExitStatus{ExitStatus: st.ExitStatus}
	if st.ExitedAt != nil {
		es.ExitedAt = *st.ExitedAt
	}
	return es, nil
}

// Status reports a sandbox's state; verbose adds its ResourceInfo, usage
// and config under the "info" key, which crictl inspectp shows.
func (c *Controller) Status(ctx context.Context, id string, verbose bool) (sandbox.ControllerStatus, error) {
	sb, err := c.get(id)
	if err != nil {
		return sandbox.ControllerStatus{}, err
	}
	snap := sb.snap.Load()
	st := snap.state
	status := sandbox.ControllerStatus{
		SandboxID: id,
		Pid:       st.Pid,
		State:     StateNotReady,
		CreatedAt: st.CreatedAt,
	}
	if st.Phase == PhaseReady && !sb.unknown.Load() {
		status.State = StateReady
		status.Address = c.opts.TaskAddress
		status.Version = TaskAPIVersion
	}
	if st.ExitedAt != nil {
		status.ExitedAt = *st.ExitedAt
	}
	if !verbose {
		return status, nil
	}
	var usage *resourceinfo.Usage
	if st.Phase == PhaseReady {
		if u, _, err := c.Usage(ctx, id); err != nil {
			log.G(ctx).WithError(err).Warn("sandbox usage")
		} else {
			usage = &u
		}
	}
	status.Info, err = verboseInfo(st, c.Dir(sb.id), snap.info, usage)
	if err != nil {
		return sandbox.ControllerStatus{}, err
	}
	return status, nil
}

// verboseInfo is the info map of a verbose Status, which crictl inspectp
// prints key by key. containerd's CRI decodes and re-encodes the "info"
// key as its own SandboxInfo (keeping only its fields), so ours are under
// their own keys: "resourceInfo" and "sandboxer".
func verboseInfo(st *State, dir string, ri resourceinfo.ResourceInfo, usage *resourceinfo.Usage) (map[string]string, error) {
	criInfo := struct {
		Pid    uint32          `json:"pid"`
		Status string          `json:"processStatus"`
		Config json.RawMessage `json:"config,omitempty"`
	}{Pid: st.Pid, Status: string(st.Phase), Config: st.Config}
	own := struct {
		Mode  string              `json:"mode"`
		Phase Phase               `json:"phase"`
		Dir   string              `json:"dir"`
		Usage *resourceinfo.Usage `json:"usage,omitempty"`
	}{st.Mode, st.Phase, dir, usage}
	info := map[string]string{}
	for key, v := range map[string]any{"info": criInfo, "resourceInfo": ri, "sandboxer": own} {
		data, err := json.Marshal(v)
		if err != nil {
			return nil, err
		}
		info[key] = string(data)
	}
	return info, nil
}

// Metrics returns the sandbox's usage as cgroup metrics.
func (c *Controller) Metrics(ctx context.Context, id string) (*types.Metric, error) {
	sb, err := c.get(id)
	if err != nil {
		return nil, err
	}
	snap := sb.snap.Load()
	u, _, err := c.Usage(ctx, id)
	if err != nil {
		return nil, err
	}
	data, err := typeurl.MarshalAnyToProto(cgmetrics.From(snap.info.Resources, u))
	if err != nil {
		return nil, err
	}
	return &types.Metric{ID: id, Timestamp: timestamp(u.Timestamp), Data: data}, nil
}
