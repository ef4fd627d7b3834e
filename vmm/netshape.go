package vmm

import (
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
)

// Network shaping of a sandbox's tap with tc.
//
// libvirt's own <bandwidth> element needs the sfq qdisc, which hosts like
// this one lack, so the backend shapes the tap itself with what is there
// (tbf, the ingress qdisc, u32 + mirred, ifb):
//
//   - the pod's ingress (host -> guest) leaves the host through the tap:
//     a tbf qdisc at the tap's root;
//   - the pod's egress (guest -> host) enters the host on the tap: the
//     tap's ingress qdisc redirects it (u32 match-all + mirred) to an ifb
//     device whose root is a tbf.
//
// Anything that fails is reported, never ignored: the caller records it in
// Usage.Unenforced.

// runCmd runs a command and returns its combined output in the error.
func runCmd(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// tbfArgs are the tbf parameters for rate bits/s: a burst of 20ms worth of
// traffic (at least 16 KiB, so a full-size frame always fits) and 50ms of
// queue.
func tbfArgs(bps int64) []string {
	burst := max(bps/8/50, 16*1024)
	return []string{"tbf", "rate", strconv.FormatInt(bps, 10) + "bit",
		"burst", strconv.FormatInt(burst, 10), "latency", "50ms"}
}

// shapeTap applies (or removes, for nil) the limits on tap, using ifb for
// the guest's egress. It returns one error per direction that could not
// be enforced.
func shapeTap(ctx context.Context, tap, ifb string, ingressBps, egressBps *int64) (ingErr, egErr error) {
	// Pod ingress: root tbf on the tap.
	if ingressBps != nil && *ingressBps > 0 {
		args := append([]string{"qdisc", "replace", "dev", tap, "root"}, tbfArgs(*ingressBps)...)
		ingErr = runCmd(ctx, "tc", args...)
	} else {
		_ = runCmd(ctx, "tc", "qdisc", "del", "dev", tap, "root")
	}

	// Pod egress: tap ingress -> ifb -> tbf.
	if egressBps != nil && *egressBps > 0 {
		egErr = shapeEgress(ctx, tap, ifb, *egressBps)
		if egErr != nil {
			unshapeEgress(ctx, tap, ifb)
		}
	} else {
		unshapeEgress(ctx, tap, ifb)
	}
	return ingErr, egErr
}

func shapeEgress(ctx context.Context, tap, ifb string, bps int64) error {
	if err := runCmd(ctx, "ip", "link", "show", "dev", ifb); err != nil {
		if err := runCmd(ctx, "ip", "link", "add", ifb, "type", "ifb"); err != nil {
			return err
		}
	}
	steps := [][]string{
		{"ip", "link", "set", "dev", ifb, "up"},
		append([]string{"tc", "qdisc", "replace", "dev", ifb, "root"}, tbfArgs(bps)...),
		{"tc", "qdisc", "replace", "dev", tap, "handle", "ffff:", "ingress"},
		{"tc", "filter", "replace", "dev", tap, "parent", "ffff:", "protocol", "all", "prio", "1",
			"handle", "800::800", "u32", "match", "u32", "0", "0",
			"action", "mirred", "egress", "redirect", "dev", ifb},
	}
	for _, s := range steps {
		if err := runCmd(ctx, s[0], s[1:]...); err != nil {
			return err
		}
	}
	return nil
}

// unshapeEgress removes the egress shaping; missing pieces are fine.
func unshapeEgress(ctx context.Context, tap, ifb string) {
	if tap != "" {
		_ = runCmd(ctx, "tc", "qdisc", "del", "dev", tap, "ingress")
	}
	if ifb != "" {
		_ = runCmd(ctx, "ip", "link", "del", "dev", ifb)
	}
}
