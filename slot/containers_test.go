package slot

import (
	"context"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/backend"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

type exits chan uint32

func (e exits) Exited(_ backend.Process, status uint32, _ time.Time) { e <- status }
func (e exits) OOM(backend.Process)                                  {}

// TestPodAnnotationsUnderKubelet creates containers the way containerd
// does for kubelet: named by their OCI annotation, with no simulation
// annotation of their own, in a pod whose annotations are kubelet's.
func TestPodAnnotationsUnderKubelet(t *testing.T) {
	ctx := context.Background()
	ev := make(exits, 4)
	c := New().Containers(ev)
	pod := map[string]string{PodAnnotationExitAfter + "prepare": "50ms", PodAnnotationExitCode + "prepare": "7"}
	create := func(id, name string) backend.Process {
		t.Helper()
		p := backend.Process{Namespace: "k8s.io", SandboxID: "sb", ContainerID: id}
		_, err := c.Create(ctx, &backend.Container{
			Process:        p,
			Spec:           &specs.Spec{Annotations: map[string]string{resourceinfo.AnnotationContainerName: name}},
			PodAnnotations: pod,
		})
		require.NoError(t, err)
		_, err = c.Start(ctx, p)
		require.NoError(t, err)
		return p
	}
	create("c1", "prepare")
	select {
	case status := <-ev:
		assert.Equal(t, uint32(7), status, "as the pod annotation keyed by its name says")
	case <-time.After(10 * time.Second):
		t.Fatal("prepare did not complete")
	}
	create("c2", "init-db")
	select {
	case status := <-ev:
		assert.Zero(t, status, "an init-named container completes by default")
	case <-time.After(10 * time.Second):
		t.Fatal("init-db did not complete")
	}
	create("c3", "app")
	select {
	case <-ev:
		t.Fatal("an app container must not exit by itself")
	case <-time.After(2 * DefaultInitExitAfter):
	}

	_, err := c.Create(ctx, &backend.Container{
		Process:        backend.Process{Namespace: "k8s.io", SandboxID: "sb", ContainerID: "c4"},
		Spec:           &specs.Spec{Annotations: map[string]string{resourceinfo.AnnotationContainerName: "bad"}},
		PodAnnotations: map[string]string{PodAnnotationExitCode + "bad": "300"},
	})
	require.Error(t, err)
	assert.Contains(t, err.Error(), PodAnnotationExitCode+"bad")
}
