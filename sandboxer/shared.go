package sandboxer

import (
	"bytes"
	"encoding/json"
	"hash/maphash"
	"runtime"
	"slices"
	"sync"
	"time"
	"weak"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/statefile"
	"github.com/kuasar-io/resource-slot-sandboxer/resourceinfo"
)

// Sandboxes with the same pod-level resources (the replicas of a
// workload) share one spec, interned weakly: a spec no sandbox holds any
// more is dropped. A spec is three Resources of mostly nil pointers, a
// fifth of a pod's memory, and with it go what is derived from it alone:
// its journal encoding, and, for a sandbox without containers, its
// effective resources and their resource_info.json, computed once per
// spec instead of at every create.
var sharedSpecs struct {
	mu      sync.RWMutex
	seed    maphash.Seed
	byHash  map[uint64][]weak.Pointer[resourceinfo.Spec]
	entries map[weak.Pointer[resourceinfo.Spec]]*specEntry
}

func init() { sharedSpecs.seed = maphash.MakeSeed() }

// specEntry is what is derived from a shared spec.
type specEntry struct {
	spec weak.Pointer[resourceinfo.Spec]
	// encoded is the spec as a journal record holds it.
	encoded []byte

	once sync.Once
	// ri are the effective resources of a sandbox without containers;
	// infoHead is their resource_info.json up to the value of its last
	// member, updated_at.
	ri       resourceinfo.ResourceInfo
	infoHead []byte
	infoErr  error
}

// updatedAtMember is how resource_info.json's last member begins.
const updatedAtMember = `"updated_at": `

func (e *specEntry) derive() {
	e.once.Do(func() {
		sp := e.spec.Value()
		if sp == nil {
			e.infoErr = errSpecGone
			return
		}
		e.ri = resourceinfo.Compute(*sp, nil)
		e.ri.Sources = internSources(e.ri.Sources)
		e.ri.UpdatedAt = time.Time{}
		data, err := statefile.EncodeJSON(e.ri)
		if err != nil {
			e.infoErr = err
			return
		}
		i := bytes.LastIndex(data, []byte(updatedAtMember))
		if i < 0 {
			e.infoErr = errNoUpdatedAt
			return
		}
		e.infoHead = data[:i+len(updatedAtMember)]
	})
}

var (
	errSpecGone    = errorString("shared spec collected")
	errNoUpdatedAt = errorString("resource_info.json without updated_at")
)

type errorString string

func (e errorString) Error() string { return string(e) }

// resources are the effective resources of a sandbox of this spec
// without containers.
func (e *specEntry) resources() resourceinfo.ResourceInfo {
	e.derive()
	return e.ri
}

// info is resource_info.json of a sandbox of this spec without
// containers, updated at at.
func (e *specEntry) info(at time.Time) ([]byte, error) {
	e.derive()
	if e.infoErr != nil {
		ri := e.ri
		ri.UpdatedAt = at
		return statefile.EncodeJSON(ri)
	}
	ts, err := json.Marshal(at)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 0, len(e.infoHead)+len(ts)+3)
	return append(append(append(out, e.infoHead...), ts...), "\n}\n"...), nil
}

// sharedEncoding is a shared spec's kept encoding; nil for a spec that is
// not shared.
func sharedEncoding(sp *resourceinfo.Spec) []byte {
	if e := sharedSpec(sp); e != nil {
		return e.encoded
	}
	return nil
}

// sharedSpec is what is derived from a shared spec; nil for one that is
// not shared.
func sharedSpec(sp *resourceinfo.Spec) *specEntry {
	if sp == nil {
		return nil
	}
	sharedSpecs.mu.RLock()
	defer sharedSpecs.mu.RUnlock()
	return sharedSpecs.entries[weak.Make(sp)]
}

// internSpec returns a spec equal to sp, shared if another sandbox has
// one; sp must not be changed afterwards.
func internSpec(sp *resourceinfo.Spec) *resourceinfo.Spec {
	if sp == nil || len(sp.Pod.Containers) > 0 {
		// A history names the pod's own containers: never shared, and
		// its encoding is not worth keeping.
		return sp
	}
	data, err := json.Marshal(sp)
	if err != nil {
		return sp
	}
	data = stripNulls(data)
	if p := lookupSpec(data); p != nil {
		return p
	}
	return addSpec(sp, data)
}

// internSpecJSON is internSpec of the spec encoded as raw (a journal
// record's, or state.json's): a spec already shared is found by its
// encoding, without decoding it.
func internSpecJSON(raw []byte) (*resourceinfo.Spec, error) {
	if p := lookupSpec(raw); p != nil {
		return p, nil
	}
	var sp resourceinfo.Spec
	if err := decodeStrict(raw, &sp); err != nil {
		return nil, err
	}
	return internSpec(&sp), nil
}

// lookupSpec finds the shared spec encoded as data.
func lookupSpec(data []byte) *resourceinfo.Spec {
	key := maphash.Bytes(sharedSpecs.seed, data)
	sharedSpecs.mu.RLock()
	defer sharedSpecs.mu.RUnlock()
	for _, w := range sharedSpecs.byHash[key] {
		// Equal encodings are equal specs; the hash alone could collide.
		if e := sharedSpecs.entries[w]; e != nil && bytes.Equal(e.encoded, data) {
			if p := w.Value(); p != nil {
				return p
			}
		}
	}
	return nil
}

// addSpec shares sp, encoded as data.
func addSpec(sp *resourceinfo.Spec, data []byte) *resourceinfo.Spec {
	key := maphash.Bytes(sharedSpecs.seed, data)
	e := &specEntry{spec: weak.Make(sp), encoded: data}
	sharedSpecs.mu.Lock()
	defer sharedSpecs.mu.Unlock()
	if sharedSpecs.byHash == nil {
		sharedSpecs.byHash = map[uint64][]weak.Pointer[resourceinfo.Spec]{}
		sharedSpecs.entries = map[weak.Pointer[resourceinfo.Spec]]*specEntry{}
	}
	sharedSpecs.byHash[key] = append(sharedSpecs.byHash[key], e.spec)
	sharedSpecs.entries[e.spec] = e
	runtime.AddCleanup(sp, dropSpec, key)
	return sp
}

// dropSpec forgets the collected specs of key.
func dropSpec(key uint64) {
	sharedSpecs.mu.Lock()
	defer sharedSpecs.mu.Unlock()
	live := sharedSpecs.byHash[key][:0]
	for _, w := range sharedSpecs.byHash[key] {
		if w.Value() != nil {
			live = append(live, w)
		} else {
			delete(sharedSpecs.entries, w)
		}
	}
	if len(live) == 0 {
		delete(sharedSpecs.byHash, key)
	} else {
		sharedSpecs.byHash[key] = live
	}
}

// sources shares the Sources maps of resources with the same content:
// most pods' values come from the same sources, and a map per pod was a
// tenth of a pod's memory. A shared map is never modified: it belongs to
// snapshots, which are immutable.
var sources struct {
	mu sync.Mutex
	m  map[string]map[string]resourceinfo.Source
}

// maxSources bounds the distinct maps kept for sharing.
const maxSources = 4096

func internSources(m map[string]resourceinfo.Source) map[string]resourceinfo.Source {
	if len(m) == 0 {
		return m
	}
	keys := make([]string, 0, len(m))
	n := 0
	for k, v := range m {
		keys = append(keys, k)
		n += len(k) + len(v) + 2
	}
	slices.Sort(keys)
	b := make([]byte, 0, n)
	for _, k := range keys {
		b = append(append(append(append(b, k...), '='), m[k]...), ';')
	}
	sources.mu.Lock()
	defer sources.mu.Unlock()
	if shared, ok := sources.m[string(b)]; ok {
		return shared
	}
	if sources.m == nil {
		sources.m = map[string]map[string]resourceinfo.Source{}
	}
	if len(sources.m) < maxSources {
		sources.m[string(b)] = m
	}
	return m
}
