package cri

import (
	"bytes"
	"encoding/json"
	"sync"
	"time"

	"github.com/containerd/log"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/sandboxer"
)

// Listing many pods or containers re-encodes nothing that did not change:
// each item of a list (a runtime.PodSandbox, a runtime.Container) is kept
// encoded, as the field it is in the list's response, and a response is
// those bytes put together, set as the message's unknown fields: on the
// wire they are the repeated items field, which every client decodes as
// such. An item is encoded again only when what it shows changes (a
// pod's or container's state); the rest of it (names, labels,
// annotations, image) never changes after creation.

// listItemField is the field number of the items in every list response
// and stream message used here (ListPodSandboxResponse.items,
// StreamPodSandboxesResponse.pod_sandboxes, ListContainersResponse and
// StreamContainersResponse.containers).
const listItemField = 1

// encodedItem is one item of a list, encoded with its field tag.
type encodedItem struct {
	// stamp (a creation time) tells apart two objects with the same ID.
	stamp int64
	state int32
	// wire is the tag, the length and the encoded message.
	wire []byte
}

// itemCache holds encoded items by ID.
type itemCache struct{ idCache[encodedItem] }

// get returns the encoded item of id, encoding it with make when the
// cache holds none for stamp and state.
func (c *itemCache) get(id string, stamp time.Time, state int32, make func() proto.Message) []byte {
	if e, ok := c.load(id); ok && e.state == state && e.stamp == stamp.UnixNano() {
		return e.wire
	}
	msg, err := proto.Marshal(make())
	if err != nil {
		// The messages are built from recorded values only.
		log.L.WithError(err).WithField("id", id).Error("cri: encode list item")
		return nil
	}
	wire := protowire.AppendTag(nil, listItemField, protowire.BytesType)
	wire = protowire.AppendBytes(wire, msg)
	c.store(id, encodedItem{stamp: stamp.UnixNano(), state: state, wire: wire})
	return wire
}

// idCache is a map by object ID kept beside the records: forget and
// prune keep it to the objects that exist.
type idCache[V any] struct {
	mu sync.RWMutex
	m  map[string]V
}

func (c *idCache[V]) load(id string) (V, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	v, ok := c.m[id]
	return v, ok
}

func (c *idCache[V]) store(id string, v V) {
	c.mu.Lock()
	if c.m == nil {
		c.m = map[string]V{}
	}
	c.m[id] = v
	c.mu.Unlock()
}

func (c *idCache[V]) forget(id string) {
	c.mu.Lock()
	delete(c.m, id)
	c.mu.Unlock()
}

// prune drops the entries of objects that no longer exist, when the cache
// holds more than live ones (removed behind the service's back).
func (c *idCache[V]) prune(live int, exists func(id string) bool) {
	c.mu.RLock()
	n := len(c.m)
	c.mu.RUnlock()
	if n <= live {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for id := range c.m {
		if !exists(id) {
			delete(c.m, id)
		}
	}
}

// encodedList is the items of a list response, encoded.
type encodedList struct {
	items [][]byte
	size  int
}

func (l *encodedList) add(wire []byte) {
	l.items = append(l.items, wire)
	l.size += len(wire)
}

// setItems makes the items of l, from..to, the repeated items field of m.
func (l *encodedList) setItems(m proto.Message, from, to int) {
	m.ProtoReflect().SetUnknown(join(l.items[from:to]))
}

func join(items [][]byte) protoreflect.RawFields {
	n := 0
	for _, w := range items {
		n += len(w)
	}
	buf := make([]byte, 0, n)
	for _, w := range items {
		buf = append(buf, w...)
	}
	return buf
}

// chunks calls send with messages of at most streamChunk items.
func (l *encodedList) chunks(newMsg func() proto.Message, send func(proto.Message) error) error {
	for from := 0; from < len(l.items); from += streamChunk {
		m := newMsg()
		l.setItems(m, from, min(from+streamChunk, len(l.items)))
		if err := send(m); err != nil {
			return err
		}
	}
	return nil
}

// labelsOf decodes the labels of an encoded item (a PodSandbox or a
// Container: both have labels as field 6), for label selectors, which are
// rare: no labels are kept decoded for them.
func labelsOf(wire []byte, into proto.Message) map[string]string {
	_, _, n := protowire.ConsumeTag(wire)
	msg, _ := protowire.ConsumeBytes(wire[n:])
	if err := proto.Unmarshal(msg, into); err != nil {
		return nil
	}
	switch m := into.(type) {
	case *runtime.PodSandbox:
		return m.GetLabels()
	case *runtime.Container:
		return m.GetLabels()
	}
	return nil
}

// decodePodConfig decodes a sandbox's PodSandboxConfig (nil when it was created
// without one, or it does not decode). Decoded on demand: what listing
// needs of it is kept encoded, and keeping every pod's config decoded
// cost more memory than the rest of the pod.
func decodePodConfig(st *sandboxer.State) *runtime.PodSandboxConfig {
	if len(st.Config) == 0 {
		return nil
	}
	var cfg runtime.PodSandboxConfig
	if err := json.Unmarshal(st.Config, &cfg); err != nil {
		log.L.WithError(err).WithField("sandbox", st.ID).Warn("cri: undecodable pod config; showing the pod without it")
		return nil
	}
	return &cfg
}

// decodeListed decodes what a list shows of a sandbox's config: its
// metadata, labels and annotations, into a PodSandboxConfig without the
// rest (half the cost of decoding all of it).
func decodeListed(st *sandboxer.State) *runtime.PodSandboxConfig {
	if len(st.Config) == 0 {
		return nil
	}
	var cfg struct {
		Metadata    *runtime.PodSandboxMetadata `json:"metadata"`
		Labels      map[string]string           `json:"labels"`
		Annotations map[string]string           `json:"annotations"`
	}
	if err := json.Unmarshal(st.Config, &cfg); err != nil {
		return decodePodConfig(st)
	}
	return &runtime.PodSandboxConfig{Metadata: cfg.Metadata, Labels: cfg.Labels, Annotations: cfg.Annotations}
}

// podNameOfState is the pod name of a sandbox, decoding only the
// metadata of its config.
func podNameOfState(st *sandboxer.State) (podName, bool) {
	if len(st.Config) == 0 {
		return podName{}, false
	}
	// The metadata is the config's first member (encoding/json follows
	// the struct's order): read up to it, not the whole config, which
	// cost 3% of a direct pod cycle's CPU.
	dec := json.NewDecoder(bytes.NewReader(st.Config))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return podName{}, false
	}
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return podName{}, false
		}
		if t != "metadata" {
			var skip json.RawMessage
			if dec.Decode(&skip) != nil {
				return podName{}, false
			}
			continue
		}
		var md *runtime.PodSandboxMetadata
		if dec.Decode(&md) != nil || md == nil {
			return podName{}, false
		}
		return podName{md.GetName(), md.GetNamespace(), md.GetUid(), md.GetAttempt()}, true
	}
	return podName{}, false
}
