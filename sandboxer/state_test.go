package sandboxer

import (
	"context"
	"encoding/json"
	"math"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
	"github.com/kuasar-io/resource-slot-sandboxer/slot"
)

func TestStripNulls(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`{"a":null}`, `{}`},
		{`{"a":null,"b":1}`, `{"b":1}`},
		{`{"a":1,"b":null}`, `{"a":1}`},
		{`{"a":1,"b":null,"c":2}`, `{"a":1,"c":2}`},
		{`{"a":null,"b":null}`, `{}`},
		{`{"a":{"b":null},"c":[null,1],"d":null}`, `{"a":{},"c":[null,1]}`},
		{`{"s":"x:null,","t":null}`, `{"s":"x:null,"}`},
		{`{"s":"q\":null}","t":null}`, `{"s":"q\":null}"}`},
		{`{"k\\":null}`, `{}`},
		{`{"nullable":"null","n":0}`, `{"nullable":"null","n":0}`},
		{`[{"a":null}]`, `[{}]`},
	} {
		got := stripNulls([]byte(tc.in))
		assert.Equal(t, tc.want, string(got), tc.in)
		assert.True(t, json.Valid(got), tc.in)
	}
}

// fullState is a state with every kind of field set.
func fullState() *State {
	now := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	cpu, mem := 1.5, int64(1<<30)
	return &State{
		Version: stateVersion, ID: "sb", Mode: "slot", Phase: PhaseReady,
		CreatedAt: now, StartedAt: &now, Pid: 7, NetNSPath: "/x",
		Annotations: map[string]string{"a": "null", "b": ":null,"},
		Config:      json.RawMessage(`{"metadata":{"name":"p"}}`),
		Spec: &resourceinfo.Spec{
			Annotations: resourceinfo.Resources{CPULimit: &cpu, Unified: map[string]string{"memory.high": "max"}},
			Linux:       resourceinfo.Resources{MemoryLimit: &mem, HugepageLimits: map[string]uint64{"2MB": 4 << 20}},
		},
		Containers: map[string]*Container{
			"c1": {Resources: resourceinfo.Resources{CPULimit: &cpu}, Task: &TaskRecord{
				Namespace: "k8s.io", Bundle: "/b", Status: TaskRunning, Pid: 1 << 22, CreatedAt: now, StartedAt: &now,
				Private: json.RawMessage(`{"simulation":{"exit_after":1000000000}}`), Meta: json.RawMessage(`{"name":"c"}`),
				Execs: map[string]*ExecRecord{"e1": {Spec: json.RawMessage(`{"args":["sh"]}`), Status: TaskRunning, Pid: 9, ExitedAt: &now}},
			}},
			"c2": {},
		},
		Ledger:             Ledger{CPUCoreSeconds: 3, Since: &now},
		ResourcesUpdatedAt: now,
	}
}

// TestEncodeStateRoundTrip: a journal record decodes to the state it was
// made of, though it has none of the null members.
func TestEncodeStateRoundTrip(t *testing.T) {
	for _, shared := range []bool{false, true} {
		st := fullState()
		if shared {
			// A shared spec's encoding is cached and put in last.
			st.Spec = internSpec(st.Spec)
			require.NotNil(t, sharedSpec(st.Spec))
		}
		testEncodeState(t, st)
	}
}

func testEncodeState(t *testing.T, st *State) {
	data, err := encodeState(st)
	require.NoError(t, err)
	var tree any
	require.NoError(t, json.Unmarshal(data, &tree))
	var noNull func(v any)
	noNull = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				assert.NotNil(t, x, "member %q is null", k)
				noNull(x)
			}
		case []any:
			for _, x := range v {
				noNull(x)
			}
		}
	}
	noNull(tree)
	full, err := json.Marshal(st)
	require.NoError(t, err)
	t.Logf("record %d bytes, %d with nulls", len(data), len(full))
	back, err := decodeState(data, "sb")
	require.NoError(t, err)
	var want State
	require.NoError(t, json.Unmarshal(full, &want))
	assert.Equal(t, &want, back)
}

// TestCloneShares: a clone owns what a change writes into (the state, its
// container map, containers and task records), and shares what a change
// only ever replaces. A field added to these types must be either copied
// by clone or listed here as replaced, never written through.
func TestCloneShares(t *testing.T) {
	replaced := map[string]bool{
		// Set at Create, never changed.
		"State.Annotations": true, "State.Config": true,
		// Replaced as a whole by a change.
		"State.StartedAt": true, "State.ExitedAt": true, "State.Spec": true, "Ledger.Since": true,
		"Container.Resources":  true,
		"TaskRecord.StartedAt": true, "TaskRecord.ExitedAt": true, "TaskRecord.Meta": true,
		"TaskRecord.Private": true, "TaskRecord.LegacySimulation": true,
		"ExecRecord.Spec": true, "ExecRecord.ExitedAt": true,
	}
	st := fullState()
	c := st.clone()
	assert.Equal(t, st, c)
	var walk func(path string, a, b reflect.Value)
	walk = func(path string, a, b reflect.Value) {
		if replaced[path] {
			return
		}
		switch a.Kind() {
		case reflect.Pointer:
			if a.IsNil() {
				return
			}
			assert.NotEqual(t, a.Pointer(), b.Pointer(), "%s is shared by a clone: copy it in clone, or list it as replaced", path)
			walk(path, a.Elem(), b.Elem())
		case reflect.Map:
			if a.IsNil() {
				return
			}
			assert.NotEqual(t, a.Pointer(), b.Pointer(), "%s is shared by a clone", path)
			for _, k := range a.MapKeys() {
				walk(path, a.MapIndex(k), b.MapIndex(k))
			}
		case reflect.Slice:
			if a.Len() > 0 {
				assert.NotEqual(t, a.Pointer(), b.Pointer(), "%s is shared by a clone", path)
			}
		case reflect.Struct:
			if a.Type() == reflect.TypeOf(time.Time{}) {
				return
			}
			for i := range a.NumField() {
				walk(a.Type().Name()+"."+a.Type().Field(i).Name, a.Field(i), b.Field(i))
			}
		}
	}
	walk("State", reflect.ValueOf(st), reflect.ValueOf(c))
}

// TestSameResourceInputs: a clone has the same inputs, a change of any
// of them is seen.
func TestSameResourceInputs(t *testing.T) {
	st := fullState()
	assert.True(t, sameResourceInputs(st, st.clone()))
	two := 2.0
	for desc, change := range map[string]func(*State){
		"pod annotation":      func(s *State) { sp := *s.Spec; sp.Annotations.CPULimit = &two; s.Spec = &sp },
		"pod linux":           func(s *State) { sp := *s.Spec; sp.Linux.Unified = map[string]string{}; s.Spec = &sp },
		"overhead":            func(s *State) { sp := *s.Spec; sp.Overhead.PidLimit = new(int64); s.Spec = &sp },
		"container resources": func(s *State) { s.Containers["c1"].Resources.CPULimit = &two },
		"new container":       func(s *State) { s.Containers["c3"] = &Container{} },
		"removed container":   func(s *State) { delete(s.Containers, "c2") },
	} {
		c := st.clone()
		change(c)
		assert.False(t, sameResourceInputs(st, c), desc)
	}
	c := st.clone()
	c.Phase, c.Containers["c1"].Task.Status = PhaseStopped, TaskPaused
	assert.True(t, sameResourceInputs(st, c), "a status is not a resource input")
	c.Containers["c1"].Task.Status = TaskStopped
	assert.False(t, sameResourceInputs(st, c), "an exit is: it goes into the pod's history")
}

// TestInternSpec: equal specs are shared, and a spec no sandbox holds is
// dropped.
func TestInternSpec(t *testing.T) {
	cpu := 1.5
	a := internSpec(&resourceinfo.Spec{Annotations: resourceinfo.Resources{CPULimit: &cpu}})
	cpu2 := 1.5
	b := internSpec(&resourceinfo.Spec{Annotations: resourceinfo.Resources{CPULimit: &cpu2}})
	assert.Same(t, a, b)
	other := 2.0
	c := internSpec(&resourceinfo.Spec{Annotations: resourceinfo.Resources{CPULimit: &other}})
	assert.NotSame(t, a, c)
	assert.Equal(t, 2.0, *c.Annotations.CPULimit)
}

// TestSharedSpecDerived: what is derived once per shared spec is what is
// computed for each sandbox.
func TestSharedSpecDerived(t *testing.T) {
	cpu, mem := 1.5, int64(1<<30)
	st := &State{ID: "sb", Spec: internSpec(&resourceinfo.Spec{
		Annotations: resourceinfo.Resources{CPULimit: &cpu},
		Linux:       resourceinfo.Resources{MemoryLimit: &mem, Unified: map[string]string{"memory.high": "max"}},
	}), ResourcesUpdatedAt: time.Date(2026, 3, 4, 5, 6, 7, 8, time.UTC)}
	require.NotNil(t, sharedSpec(st.Spec))
	want := resourceinfo.Compute(*st.Spec, nil)
	got := st.ResourceInfo()
	want.UpdatedAt, got.UpdatedAt = time.Time{}, time.Time{}
	assert.Equal(t, want, got)
	fast, err := encodeInfo(st, got)
	require.NoError(t, err)
	want.UpdatedAt = st.ResourcesUpdatedAt
	slow, err := json.MarshalIndent(want, "", "  ")
	require.NoError(t, err)
	assert.Equal(t, string(slow)+"\n", string(fast))
}

// TestDecodeStateForms: records and state.json decode whatever their
// form: the spec shared and last, not shared, a config that mentions
// "spec", the indented state.json of earlier versions; damage is refused.
func TestDecodeStateForms(t *testing.T) {
	st := fullState()
	st.Config = json.RawMessage(`{"annotations":{"a":"b","spec":"x"},"metadata":{"name":"p"}}`)
	want, err := json.Marshal(st)
	require.NoError(t, err)
	var wantState State
	require.NoError(t, json.Unmarshal(want, &wantState))
	shared := *st
	shared.Spec = internSpec(st.Spec)
	legacy, err := json.MarshalIndent(st, "", "  ")
	require.NoError(t, err)
	for desc, data := range map[string]func() ([]byte, error){
		"shared spec": func() ([]byte, error) { return encodeState(&shared) },
		"own spec":    func() ([]byte, error) { return encodeState(st) },
		"legacy":      func() ([]byte, error) { return append(legacy, '\n'), nil },
	} {
		b, err := data()
		require.NoError(t, err, desc)
		got, err := decodeState(b, "sb")
		require.NoError(t, err, desc)
		// Raw members keep the whitespace they were read with.
		a, _ := json.Marshal(wantState.Containers)
		g, _ := json.Marshal(got.Containers)
		assert.JSONEq(t, string(a), string(g), desc)
		assert.Equal(t, *wantState.Spec, *got.Spec, desc)
		assert.JSONEq(t, string(st.Config), string(got.Config), desc)
	}
	good, err := encodeState(&shared)
	require.NoError(t, err)
	for desc, bad := range map[string][]byte{
		"trailing data": append(append([]byte{}, good...), `{}`...),
		"unknown field": append([]byte(`{"bogus":1,`), good[1:]...),
		"truncated":     good[:len(good)/2],
		"empty":         nil,
	} {
		_, err := decodeState(bad, "sb")
		assert.Error(t, err, desc)
	}
}

// TestExitRecordedInHistory: a container's exit reaches the pod's
// history (kubelet's init-container rules need it), though it changes no
// resource value by itself: commit does not skip it.
func TestExitRecordedInHistory(t *testing.T) {
	ctx := context.Background()
	c := newController(t, t.TempDir(), slot.New())
	require.NoError(t, create(ctx, c, "sb", nil))
	_, err := c.Start(ctx, "sb")
	require.NoError(t, err)
	mem := int64(64 << 20)
	require.NoError(t, c.change(ctx, "sb", func(st *State) error {
		st.Containers = map[string]*Container{"c1": {
			Resources: resourceinfo.Resources{Name: "init", MemoryLimit: &mem},
			Task:      &TaskRecord{Status: TaskRunning},
		}}
		return nil
	}))
	require.NoError(t, c.change(ctx, "sb", func(st *State) error {
		st.Containers["c1"].Task.Status, st.Containers["c1"].Task.ExitStatus = TaskStopped, 0
		return nil
	}))
	v, err := c.Get("sb")
	require.NoError(t, err)
	require.Contains(t, v.State.Spec.Pod.Containers, "init")
	assert.True(t, v.State.Spec.Pod.Containers["init"].Completed, "the exit is in the history")
}

// TestIsIdentifier: the fast check accepts exactly what containerd's
// identifiers.Validate accepts.
func TestIsIdentifier(t *testing.T) {
	cases := []string{"", "a", "A9", "a.b", "a..b", ".a", "a.", "a-_b", "a_b-c.d", "a/b", "..", "a b", "ä",
		strings.Repeat("a", 76), strings.Repeat("a", 77), "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "a\x00"}
	r := rand.New(rand.NewPCG(1, 2))
	const alphabet = "aZ09._-/ \x00é"
	for range 20000 {
		b := make([]byte, r.IntN(10))
		for i := range b {
			b[i] = alphabet[r.IntN(len(alphabet))]
		}
		cases = append(cases, string(b))
	}
	for _, s := range cases {
		if got, want := isIdentifier(s), identifiers.Validate(s) == nil; got != want {
			t.Errorf("isIdentifier(%q) = %v, identifiers.Validate says %v", s, got, want)
		}
	}
}

// TestAppendPodStateIsEncodeState: the encoder of pod records without
// reflection writes what encoding/json does, byte for byte, and leaves
// the states it does not handle to it.
func TestAppendPodStateIsEncodeState(t *testing.T) {
	now := time.Date(2026, 12, 1, 17, 4, 5, 123456789, time.UTC)
	round := now.Truncate(time.Second)
	local := now.In(time.FixedZone("x", -5*3600-30*60))
	spec := internSpec(fullState().Spec)
	base := func() *State {
		return &State{Version: stateVersion, ID: "sb-1.a_b", Mode: "slot", Phase: PhaseCreated, CreatedAt: now, Spec: spec,
			Config: json.RawMessage(`{"metadata":{"name":"p"}}`)}
	}
	cases := map[string]func(s *State){
		"created":       func(*State) {},
		"no config":     func(s *State) { s.Config = nil },
		"no spec":       func(s *State) { s.Spec = nil },
		"ready":         func(s *State) { s.Phase, s.StartedAt, s.Pid = PhaseReady, &round, 42; s.Ledger.Since = &now },
		"stopped":       func(s *State) { s.Phase, s.StartedAt, s.ExitedAt, s.ExitStatus = PhaseStopped, &now, &local, 137 },
		"netns plain":   func(s *State) { s.NetNSPath = "/var/run/netns/cni-1234" },
		"netns escaped": func(s *State) { s.NetNSPath = "/run/\"a\\b\"<&>\x01é\u2028" },
		"annotations":   func(s *State) { s.Annotations = map[string]string{"b": "2", "a": "<1>"} },
		"empty map":     func(s *State) { s.Containers = map[string]*Container{} },
		"ledger floats": func(s *State) {
			s.Ledger = Ledger{CPUCoreSeconds: 1.5, MemoryByteSeconds: 3.2e21, PidSeconds: 1e-7, StorageByteSecs: 123456789.25}
		},
		"ledger zero":     func(s *State) { s.Ledger = Ledger{CPUCoreSeconds: math.Copysign(0, -1)} },
		"updated at":      func(s *State) { s.ResourcesUpdatedAt = now },
		"odd mode string": func(s *State) { s.Mode = "vm\n" },
	}
	for desc, change := range cases {
		st := base()
		change(st)
		enc := sharedEncoding(st.Spec)
		want, err := encodeStateJSON(st, enc)
		require.NoError(t, err, desc)
		got, ok := appendPodState(nil, st, enc)
		require.True(t, ok, desc)
		assert.Equal(t, string(want), string(got), desc)
		dec, err := decodeState(got, st.ID)
		require.NoError(t, err, desc)
		assert.Equal(t, st.Phase, dec.Phase, desc)
	}
	for desc, change := range map[string]func(s *State){
		"containers": func(s *State) { s.Containers = map[string]*Container{"c": {}} },
		"own spec": func(s *State) {
			s.Spec = &resourceinfo.Spec{Pod: resourceinfo.Pod{Containers: map[string]resourceinfo.PodContainer{"c": {}}}}
		},
		"year 10000": func(s *State) { s.CreatedAt = time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC) },
		"NaN ledger": func(s *State) { s.Ledger.PidSeconds = math.NaN() },
		"odd offset": func(s *State) { t := now.In(time.FixedZone("y", 7)); s.StartedAt = &t },
	} {
		st := base()
		change(st)
		// With the spec's encoding when it is shared, as encodeState
		// passes it: each is refused for its own value, not for a
		// missing encoding.
		_, ok := appendPodState(nil, st, sharedEncoding(st.Spec))
		assert.False(t, ok, desc)
	}
}
