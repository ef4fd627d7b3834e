package sandboxer

import (
	"encoding/json"
	"math"
	"strconv"
	"time"
)

// appendPodState is encodeState's output for a state without containers
// whose spec is shared or absent, the records of a pod's cycle, written
// without reflection: encoding/json and stripNulls cost 8% of a direct
// pod cycle's CPU. ok is false when the state is not of that kind, or
// holds a value this encoder leaves to encoding/json (plainPodState); the
// caller then encodes it the general way. TestAppendPodStateIsEncodeState
// holds it to encoding/json's bytes.
func appendPodState(b []byte, s *State, spec []byte) (_ []byte, ok bool) {
	if !plainPodState(s, spec) {
		return nil, false
	}
	b = append(b, `{"version":`...)
	b = strconv.AppendInt(b, int64(s.Version), 10)
	b = append(b, `,"id":`...)
	b = appendString(b, s.ID)
	b = append(b, `,"mode":`...)
	b = appendString(b, s.Mode)
	b = append(b, `,"phase":`...)
	b = appendString(b, string(s.Phase))
	b = appendTime(append(b, `,"created_at":`...), s.CreatedAt)
	if s.StartedAt != nil {
		b = appendTime(append(b, `,"started_at":`...), *s.StartedAt)
	}
	if s.ExitedAt != nil {
		b = appendTime(append(b, `,"exited_at":`...), *s.ExitedAt)
	}
	b = append(b, `,"exit_status":`...)
	b = strconv.AppendUint(b, uint64(s.ExitStatus), 10)
	b = append(b, `,"pid":`...)
	b = strconv.AppendUint(b, uint64(s.Pid), 10)
	if s.NetNSPath != "" {
		b = append(b, `,"netns_path":`...)
		b = appendString(b, s.NetNSPath)
	}
	if len(s.Annotations) > 0 {
		// Only callers other than the CRI have them: rare. A map of
		// strings always encodes.
		ann, _ := json.Marshal(s.Annotations)
		b = append(append(b, `,"annotations":`...), ann...)
	}
	if s.Containers != nil {
		b = append(b, `,"containers":{}`...)
	}
	l := &s.Ledger
	b = appendFloat(append(b, `,"ledger":{"cpu_core_seconds":`...), l.CPUCoreSeconds)
	b = appendFloat(append(b, `,"memory_byte_seconds":`...), l.MemoryByteSeconds)
	b = appendFloat(append(b, `,"pid_seconds":`...), l.PidSeconds)
	b = appendFloat(append(b, `,"storage_byte_seconds":`...), l.StorageByteSecs)
	if l.Since != nil {
		b = appendTime(append(b, `,"since":`...), *l.Since)
	}
	b = append(b, '}')
	if !s.ResourcesUpdatedAt.IsZero() {
		b = appendTime(append(b, `,"resources_updated_at":`...), s.ResourcesUpdatedAt)
	}
	if len(s.Config) > 0 {
		b = append(append(b, `,"config":`...), s.Config...)
	}
	if spec != nil {
		b = append(append(b, `,"spec":`...), spec...)
	}
	return append(b, '}'), true
}

// plainPodState reports whether appendPodState encodes s: no containers,
// a shared spec (encoded as spec) or none, times that time.Time's
// MarshalJSON accepts (years 0-9999, an offset of whole minutes under a
// day) and finite ledger floats.
func plainPodState(s *State, spec []byte) bool {
	if len(s.Containers) > 0 || (s.Spec != nil && spec == nil) {
		return false
	}
	for _, t := range [...]*time.Time{&s.CreatedAt, s.StartedAt, s.ExitedAt, s.Ledger.Since, &s.ResourcesUpdatedAt} {
		if t == nil {
			continue
		}
		if y := t.Year(); y < 0 || y > 9999 {
			return false
		}
		if _, off := t.Zone(); off%60 != 0 || off <= -24*3600 || off >= 24*3600 {
			return false
		}
	}
	l := &s.Ledger
	for _, f := range [...]float64{l.CPUCoreSeconds, l.MemoryByteSeconds, l.PidSeconds, l.StorageByteSecs} {
		if math.IsInf(f, 0) || math.IsNaN(f) {
			return false
		}
	}
	return true
}

// appendTime is time.Time's MarshalJSON, for a time plainPodState let
// through.
func appendTime(b []byte, t time.Time) []byte {
	b = append(b, '"')
	b = t.AppendFormat(b, time.RFC3339Nano)
	return append(b, '"')
}

// appendFloat is encoding/json's float64, for a finite one.
func appendFloat(b []byte, f float64) []byte {
	format := byte('f')
	if abs := math.Abs(f); abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	b = strconv.AppendFloat(b, f, format, -1, 64)
	if format == 'e' {
		// e-09 is e-9.
		if n := len(b); n >= 4 && b[n-4] == 'e' && b[n-3] == '-' && b[n-2] == '0' {
			b[n-2] = b[n-1]
			b = b[:n-1]
		}
	}
	return b
}

// appendString is encoding/json's string: IDs, modes and phases are plain
// ASCII and are copied; anything else goes through encoding/json, with
// its escapes.
func appendString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}
