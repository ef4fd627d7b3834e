package journal

import (
	"encoding/binary"
	"hash/crc32"
)

// On-disk format. A segment is a file of fixed size, written with zeros
// when it is created so that appending never allocates:
//
//	[0, headerSize)   segment header (first 64 bytes used)
//	[headerSize, …)   records, each 8-byte aligned
//
// Segment header:
//
//	[0:4]   segMagic
//	[4:8]   format version
//	[8:16]  number: the segment's incarnation; records carry it, so the
//	        records a recycled file held in an earlier life never count
//	[16:24] size of the file
//	[24]    flags (flagFree: the segment holds nothing; its number is
//	        kept so that numbers are never reused)
//	[60:64] CRC-32C of [0:60]
//
// Record:
//
//	[0:4]   recMagic
//	[4:8]   CRC-32C of [8 : recHeader+idlen]: the header and the ID
//	[8:16]  seq: global, +1 per record
//	[16:24] segment number
//	[24:32] synced: offset in this segment up to which the segment was
//	        durable when this record was written. A damaged record below
//	        it was synced before a later record was written: that is
//	        corruption, not a torn write.
//	[32:36] payload length
//	[36:40] CRC-32C of the payload
//	[40]    kind
//	[41]    ID length
//	[42:48] zero
//	[48:48+idlen]      ID
//	[…:…+payload len]  payload, then zeros up to 8-byte alignment

const (
	headerSize = 4096
	segMagic   = 0x4a535352 // "RSSJ"
	recMagic   = 0x43525352 // "RSRC"
	version    = 1
	flagFree   = 1

	recHeader = 48
	maxIDLen  = 255
	// MaxPayload bounds one record's payload.
	MaxPayload = 16 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// Kind is what a record says about its ID.
type Kind uint8

const (
	// Put records the whole current state of an ID.
	Put Kind = 1
	// Delete records that an ID is gone.
	Delete Kind = 2
	// seal ends a segment: every segment but the newest ends with one.
	seal Kind = 3
)

func (k Kind) String() string {
	switch k {
	case Put:
		return "put"
	case Delete:
		return "delete"
	case seal:
		return "seal"
	}
	return "unknown"
}

type segHeader struct {
	number uint64
	size   int64
	free   bool
}

func encodeSegHeader(h segHeader) []byte {
	b := make([]byte, 64)
	binary.LittleEndian.PutUint32(b[0:], segMagic)
	binary.LittleEndian.PutUint32(b[4:], version)
	binary.LittleEndian.PutUint64(b[8:], h.number)
	binary.LittleEndian.PutUint64(b[16:], uint64(h.size))
	if h.free {
		b[24] = flagFree
	}
	binary.LittleEndian.PutUint32(b[60:], crc(b[:60]))
	return b
}

func decodeSegHeader(b []byte) (segHeader, bool) {
	if len(b) < 64 || binary.LittleEndian.Uint32(b[0:]) != segMagic ||
		binary.LittleEndian.Uint32(b[60:]) != crc(b[:60]) ||
		binary.LittleEndian.Uint32(b[4:]) != version {
		return segHeader{}, false
	}
	return segHeader{
		number: binary.LittleEndian.Uint64(b[8:]),
		size:   int64(binary.LittleEndian.Uint64(b[16:])),
		free:   b[24]&flagFree != 0,
	}, true
}

func align8(n int64) int64 { return (n + 7) &^ 7 }

// recordSize is the space a record takes in a segment.
func recordSize(idLen, payloadLen int) int64 {
	return align8(int64(recHeader + idLen + payloadLen))
}

var sealSize = recordSize(0, 0)

type recHdr struct {
	seq     uint64
	segment uint64
	synced  int64
	plen    uint32
	pcrc    uint32
	kind    Kind
	id      string
}

// appendRecord encodes a record at the end of buf.
func appendRecord(buf []byte, h recHdr, payload []byte) []byte {
	start := len(buf)
	size := int(recordSize(len(h.id), len(payload)))
	buf = append(buf, make([]byte, size)...)
	b := buf[start:]
	binary.LittleEndian.PutUint32(b[0:], recMagic)
	binary.LittleEndian.PutUint64(b[8:], h.seq)
	binary.LittleEndian.PutUint64(b[16:], h.segment)
	binary.LittleEndian.PutUint64(b[24:], uint64(h.synced))
	binary.LittleEndian.PutUint32(b[32:], uint32(len(payload)))
	binary.LittleEndian.PutUint32(b[36:], crc(payload))
	b[40] = byte(h.kind)
	b[41] = byte(len(h.id))
	copy(b[recHeader:], h.id)
	copy(b[recHeader+len(h.id):], payload)
	binary.LittleEndian.PutUint32(b[4:], crc(b[8:recHeader+len(h.id)]))
	return buf
}

// parseHeader decodes the header of a record of segment number at the
// start of b. ok is false when there is no intact header of this segment
// there (zeros, garbage, a torn write, or a record of an earlier life of
// the file).
func parseHeader(b []byte, number uint64) (h recHdr, size int64, ok bool) {
	if len(b) < recHeader || binary.LittleEndian.Uint32(b[0:]) != recMagic {
		return h, 0, false
	}
	idLen := int(b[41])
	if len(b) < recHeader+idLen || binary.LittleEndian.Uint32(b[4:]) != crc(b[8:recHeader+idLen]) {
		return h, 0, false
	}
	h = recHdr{
		seq:     binary.LittleEndian.Uint64(b[8:]),
		segment: binary.LittleEndian.Uint64(b[16:]),
		synced:  int64(binary.LittleEndian.Uint64(b[24:])),
		plen:    binary.LittleEndian.Uint32(b[32:]),
		pcrc:    binary.LittleEndian.Uint32(b[36:]),
		kind:    Kind(b[40]),
		id:      string(b[recHeader : recHeader+idLen]),
	}
	if h.segment != number || h.plen > MaxPayload {
		return h, 0, false
	}
	return h, recordSize(idLen, int(h.plen)), true
}
