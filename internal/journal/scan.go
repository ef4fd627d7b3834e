package journal

import (
	"fmt"
)

// Record is one record found when the journal was opened.
type Record struct {
	Seq     uint64
	Kind    Kind
	ID      string
	Payload []byte
}

// Damage is a part of the journal that was durable and no longer reads
// back: not a write cut short by a crash (those are dropped silently, as
// they were never acknowledged), but data that was synced and then lost.
type Damage struct {
	// Path is the segment file.
	Path   string
	Offset int64
	// Seq is the damaged record's seq when its header was intact, else 0.
	Seq uint64
	// IDs are the IDs of the damaged records whose header was intact;
	// records whose header is damaged cannot be attributed.
	IDs    []string
	Reason string
}

func (d Damage) String() string {
	return fmt.Sprintf("%s at offset %d: %s (ids %v)", d.Path, d.Offset, d.Reason, d.IDs)
}

type scanned struct {
	records []Record
	sealed  bool
	// end is the offset after the last intact record.
	end    int64
	damage []Damage
}

// scanSegment reads the records of segment number from data, the whole
// file. A record is intact when its header and payload checksums hold,
// it belongs to this incarnation of the file and its seq is above the
// previous record's. What is not intact is skipped up to the next intact
// record: it is damage when that record says the skipped bytes had been
// synced before it was written, else the remains of a write cut short.
func scanSegment(data []byte, number uint64, path string) scanned {
	var s scanned
	off := int64(headerSize)
	size := int64(len(data))
	var lastSeq uint64
	haveLast := false
	intactAt := func(p int64) (recHdr, int64, []byte, bool) {
		h, n, ok := parseHeader(data[p:], number)
		if !ok || p+n > size || (haveLast && h.seq <= lastSeq) {
			return h, n, nil, false
		}
		idLen := int64(len(h.id))
		payload := data[p+recHeader+idLen : p+recHeader+idLen+int64(h.plen)]
		return h, n, payload, crc(payload) == h.pcrc
	}
	for off+recHeader <= size && !s.sealed {
		h, n, payload, ok := intactAt(off)
		if ok {
			lastSeq, haveLast = h.seq, true
			s.end = off + n
			off += n
			if h.kind == seal {
				s.sealed = true
				continue
			}
			s.records = append(s.records, Record{Seq: h.seq, Kind: h.kind, ID: h.id, Payload: payload})
			continue
		}
		// Not intact at off. When its header is, the ID is known.
		var ids []string
		var seq uint64
		from := off + 8
		if n > 0 && payload != nil {
			if h.kind != seal {
				ids, seq = []string{h.id}, h.seq
			}
			from = off + n
		}
		next := int64(-1)
		for p := from; p+recHeader <= size; p += 8 {
			if _, _, _, ok := intactAt(p); ok {
				next = p
				break
			}
		}
		if next < 0 {
			// Nothing intact follows: the end of what was written,
			// possibly cut short by a crash.
			break
		}
		nh, _, _, _ := intactAt(next)
		if nh.synced > off {
			s.damage = append(s.damage, Damage{Path: path, Offset: off, Seq: seq, IDs: ids, Reason: "damaged record in synced data"})
		}
		lastSeq, haveLast = nh.seq-1, true
		off = next
	}
	return s
}
