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

func TestIsInitName(t *testing.T) {
	for name, want := range map[string]bool{
		"init": true, "init-myservice": true, "init-mydb": true, "istio-init": true, "linkerd-init": true,
		"db-init-2": true, "config_init": true, "init.1": true,
		"app": false, "initializer": false, "reinit": false, "sidecar": false, "": false, "web-initial": false,
	} {
		assert.Equal(t, want, IsInitName(name), "IsInitName(%q)", name)
	}
}

func TestSimulationOf(t *testing.T) {
	for _, tc := range []struct {
		desc           string
		name           string
		pod, container map[string]string
		want           Simulation
		err            string
	}{
		{desc: "an app container runs", name: "app"},
		{desc: "an init container completes", name: "init-db", want: Simulation{ExitAfter: DefaultInitExitAfter}},
		{desc: "no name", name: ""},
		{
			desc: "pod annotations keyed by name", name: "prepare",
			pod: map[string]string{
				PodAnnotationExitAfter + "prepare": "2s", PodAnnotationExitCode + "prepare": "3",
				PodAnnotationCPUUsage + "prepare": "250m", PodAnnotationMemoryUsage + "prepare": "64Mi",
				PodAnnotationExitAfter + "other": "1s",
			},
			want: Simulation{ExitAfter: 2 * time.Second, ExitCode: 3, CPUUsage: 0.25, MemoryUsage: 64 << 20},
		},
		{
			desc: "another container's pod annotations do not apply", name: "app",
			pod: map[string]string{PodAnnotationExitAfter + "other": "1s", AnnotationExitAfter: "1s"},
		},
		{
			desc: "the container's own annotation wins", name: "job",
			pod:       map[string]string{PodAnnotationExitAfter + "job": "1s", PodAnnotationExitCode + "job": "4"},
			container: map[string]string{AnnotationExitAfter: "5s"},
			want:      Simulation{ExitAfter: 5 * time.Second, ExitCode: 4},
		},
		{
			desc: "never keeps an init-named app running", name: "init",
			pod:  map[string]string{PodAnnotationExitAfter + "init": Never, PodAnnotationCPUUsage + "init": "1"},
			want: Simulation{CPUUsage: 1},
		},
		{desc: "never in the container's own", name: "istio-init", container: map[string]string{AnnotationExitAfter: Never}},
		{
			desc: "the exit code of a default completion", name: "init",
			pod:  map[string]string{PodAnnotationExitCode + "init": "1"},
			want: Simulation{ExitAfter: DefaultInitExitAfter, ExitCode: 1},
		},
		{
			desc: "a bad pod annotation is named", name: "prepare",
			pod: map[string]string{PodAnnotationExitAfter + "prepare": "soon"},
			err: PodAnnotationExitAfter + `prepare="soon"`,
		},
		{
			desc: "a bad pod quantity is named", name: "prepare",
			pod: map[string]string{PodAnnotationMemoryUsage + "prepare": "lots"},
			err: PodAnnotationMemoryUsage + `prepare="lots"`,
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			got, err := SimulationOf(tc.name, tc.pod, tc.container)
			if tc.err != "" {
				require.Error(t, err)
				assert.True(t, errdefs.IsInvalidArgument(err), "%v", err)
				assert.Contains(t, err.Error(), tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}
