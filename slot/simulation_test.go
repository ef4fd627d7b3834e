package slot

import (
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseSimulation(t *testing.T) {
	for _, tc := range []struct {
		desc string
		in   map[string]string
		want Simulation
		err  string // substring of the error; "" for none
	}{
		{desc: "none", in: nil},
		{desc: "all", in: map[string]string{
			AnnotationExitAfter: "30s", AnnotationExitCode: "3", AnnotationCPUUsage: "250m", AnnotationMemoryUsage: "64Mi",
		}, want: Simulation{ExitAfter: 30 * time.Second, ExitCode: 3, CPUUsage: 0.25, MemoryUsage: 64 << 20}},
		{desc: "exit code too big", in: map[string]string{AnnotationExitCode: "300"}, err: AnnotationExitCode},
		{desc: "negative duration", in: map[string]string{AnnotationExitAfter: "-1s"}, err: "positive duration"},
		{desc: "long duration text", in: map[string]string{AnnotationExitAfter: strings.Repeat("1", 40) + "s"}, err: "too long"},
		{desc: "beyond a year", in: map[string]string{AnnotationExitAfter: "9000h"}, err: "at most a year"},
		// ParseQuantity computes with 10^exponent: without the guard this
		// one costs seconds of CPU (issue 14, item 6).
		{desc: "huge exponent cpu", in: map[string]string{AnnotationCPUUsage: "1e30000000"}, err: "exponent out of range"},
		{desc: "huge exponent memory", in: map[string]string{AnnotationMemoryUsage: "9E27000000000000000"}, err: "exponent out of range"},
		{desc: "long quantity", in: map[string]string{AnnotationCPUUsage: strings.Repeat("9", 100)}, err: "too long"},
		{desc: "unit only", in: map[string]string{AnnotationMemoryUsage: "Gi"}, err: "not a Kubernetes quantity"},
		{desc: "negative cpu", in: map[string]string{AnnotationCPUUsage: "-1"}, err: "negative"},
		{desc: "too many cores", in: map[string]string{AnnotationCPUUsage: "2M"}, err: "at most a million"},
		{desc: "fractional bytes", in: map[string]string{AnnotationMemoryUsage: "0.5"}, err: "whole number"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			got, err := ParseSimulation(tc.in)
			if tc.err == "" {
				require.NoError(t, err)
				assert.Equal(t, tc.want, got)
				return
			}
			require.Error(t, err)
			assert.True(t, errdefs.IsInvalidArgument(err), "%v", err)
			assert.Contains(t, err.Error(), tc.err)
		})
	}
}
